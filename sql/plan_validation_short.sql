-- Classes of a release that gave validation fewer than $val_per_class images (they hold that many or
-- fewer: one stays in train), with their planned images and validation images.
SELECT wnid, count(*) AS planned, count(*) FILTER (WHERE shard >= $first_validation) AS validation
FROM plan WHERE release = $release
GROUP BY wnid HAVING count(*) FILTER (WHERE shard >= $first_validation) < $val_per_class
ORDER BY wnid;
