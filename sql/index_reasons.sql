-- Exclusion reasons grouped by their kind (the text before the first colon).
SELECT split_part(reason, ':', 1) AS reason, count(*) AS images
FROM images WHERE status = 'excluded' GROUP BY 1 ORDER BY 2 DESC, 1;
