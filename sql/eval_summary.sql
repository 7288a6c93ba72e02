SELECT count(*) AS images, count(*) FILTER (WHERE phash IS NULL) AS undecodable,
       count(DISTINCT sha256) AS distinct_bytes
FROM eval_images;
