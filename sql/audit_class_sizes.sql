-- Samples per class in the shards, bucketed for a histogram.
SELECT bucket, count(*) AS classes FROM (
    SELECT s.wnid, (count(ss.key) // $width) * $width AS bucket
    FROM synsets s LEFT JOIN images i ON i.wnid = s.wnid AND i.status = 'kept'
    LEFT JOIN shard_samples ss ON ss.key = i.key
    GROUP BY s.wnid
) GROUP BY bucket ORDER BY bucket;
