SELECT count(*) AS tars, coalesce(sum(size), 0) AS bytes, coalesce(sum(num_members), 0) AS members,
       count(*) FILTER (WHERE num_members IS NULL) AS tars_to_count
FROM raw_tars;
