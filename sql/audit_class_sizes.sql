-- Samples per class of the release ($release) in its shards, bucketed for a histogram (every
-- synset of the release, those with no sample in bucket 0).
SELECT bucket, count(*) AS classes FROM (
    SELECT r.wnid, (count(ss.key) // $width) * $width AS bucket
    FROM release_synsets r
    LEFT JOIN plan p ON p.release = r.release AND p.wnid = r.wnid
    LEFT JOIN shard_samples ss ON ss.release = p.release AND ss.shard = p.shard AND ss.position = p.position
    WHERE r.release = $release
    GROUP BY r.wnid
) GROUP BY bucket ORDER BY bucket;
