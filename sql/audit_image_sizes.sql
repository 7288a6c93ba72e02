-- Source short-side lengths of the release's stored samples, bucketed for a histogram.
SELECT (least(orig_width, orig_height) // $width) * $width AS bucket, count(*) AS images
FROM shard_samples WHERE release = $release GROUP BY bucket ORDER BY bucket;
