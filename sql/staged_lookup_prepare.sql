-- The staged encodes of a release's plan rows under one codec identity, in plan order, once for
-- all its shards (stages/staged_encodes.publish_lookups reads them a batch of shards at a time:
-- one join over the plan instead of one per batch).
CREATE OR REPLACE TEMP TABLE staged_lookup AS
SELECT p.shard, p.position, p.key, s.url, s."offset", s.size, s.sha256, s.width, s.height,
       s.orig_width, s.orig_height, s.repaired, s.reason
FROM plan p JOIN staged_images s ON s.key = p.key AND s.source_sha256 = p.sha256
WHERE p.release = $release AND s.codec = $codec
ORDER BY p.shard, p.position;
