-- Exclusion reasons grouped by their kind (the text before the first colon).
-- ('duplicate of <key>', issue 17, has no colon: its kind is the words before the key)
SELECT CASE WHEN starts_with(reason, 'duplicate of ') THEN 'duplicate of' ELSE split_part(reason, ':', 1) END
           AS reason, count(*) AS images
FROM images WHERE status = 'excluded' GROUP BY 1 ORDER BY 2 DESC, 1;
