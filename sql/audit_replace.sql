-- Replace the release's rows of the shard tables with what its manifests say (other releases' rows
-- stay as their audits left them).
DELETE FROM shards WHERE release = $release;
INSERT INTO shards BY NAME
SELECT shard, path, num_samples, planned, bytes, sha256, fingerprint, plan_digest, run_id, code_version,
       written_at, seconds, $release AS release
FROM manifests;
DELETE FROM shard_samples WHERE release = $release;
INSERT INTO shard_samples BY NAME
SELECT shard, s.key, s.position, s.width, s.height, s.orig_width, s.orig_height, s.webp_bytes,
       s.webp_sha256, s.repaired, $release AS release
FROM (SELECT shard, unnest(samples) AS s FROM manifests);
DELETE FROM shard_exclusions WHERE release = $release;
INSERT INTO shard_exclusions BY NAME
SELECT shard, e.key, e.position, e.reason, $release AS release
FROM (SELECT shard, unnest(excluded) AS e FROM manifests);
-- Exclusions made at encode time are re-derived from the current manifests each time (a rebuilt
-- shard may now hold an image an earlier encoder excluded): from every release's rows
-- (audit_mark_excluded.sql), so one release's audit keeps the others' refusals.
UPDATE images SET status = 'kept', reason = NULL, excluded_at = NULL WHERE excluded_at = 'encode';
-- The manifests are in the shard tables now; free their memory before the reconciliation.
DROP TABLE manifests;
