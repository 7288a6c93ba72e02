SELECT count(*) AS tars, coalesce(sum(size), 0) AS bytes, coalesce(sum(num_members), 0) AS members
FROM raw_tars;
