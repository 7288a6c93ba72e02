-- The staged encodes of a range of a release's shards under one codec identity, in plan order
-- (stages/staged_encodes.publish_lookups): a plan row's image, staged from the same source bytes.
SELECT p.shard, p.position, p.key, s.url, s."offset", s.size, s.sha256, s.width, s.height,
       s.orig_width, s.orig_height, s.repaired, s.reason
FROM plan p JOIN staged_images s ON s.key = p.key AND s.source_sha256 = p.sha256 AND s.codec = $codec
WHERE p.release = $release AND p.shard >= $first AND p.shard <= $last
ORDER BY p.shard, p.position;
