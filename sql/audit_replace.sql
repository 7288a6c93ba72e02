-- Replace the shard tables with what the manifests say.
DELETE FROM shards;
INSERT INTO shards BY NAME
SELECT shard, path, num_samples, planned, bytes, sha256, fingerprint, plan_digest, run_id, code_version,
       written_at, seconds
FROM manifests;
DELETE FROM shard_samples;
INSERT INTO shard_samples BY NAME
SELECT shard, s.key, s.position, s.width, s.height, s.orig_width, s.orig_height, s.webp_bytes,
       s.webp_sha256, s.repaired
FROM (SELECT shard, unnest(samples) AS s FROM manifests);
DELETE FROM shard_exclusions;
INSERT INTO shard_exclusions BY NAME
SELECT shard, e.key, e.position, e.reason
FROM (SELECT shard, unnest(excluded) AS e FROM manifests);
-- Exclusions made at encode time are re-derived from the current manifests each time (a rebuilt
-- shard may now hold an image an earlier encoder excluded).
UPDATE images SET status = 'kept', reason = NULL, excluded_at = NULL WHERE excluded_at = 'encode';
-- The manifests are in the shard tables now; free their memory before the reconciliation.
DROP TABLE manifests;
