SELECT count(*) AS images,
       count(*) FILTER (WHERE status = 'kept') AS kept,
       count(*) FILTER (WHERE status = 'excluded') AS excluded,
       count(*) FILTER (WHERE needs_repair) AS needs_repair,
       coalesce(sum(size), 0) AS bytes
FROM images;
