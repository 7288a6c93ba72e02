-- Carry what the encoder found back to the images table: repairs, for the samples of a range of
-- the release's shards (stages/audit.py runs it range by range after audit_replace: in DuckDB one
-- UPDATE of all 13M rows takes minutes, 16 UPDATEs of 800k rows take seconds). Rows that already
-- hold the value are left alone. (A repair is the source's: every release decodes it the same way.)
UPDATE images SET repaired = s.repaired
FROM shard_samples s
WHERE images.key = s.key AND images.status = 'kept' AND s.release = $release
  AND coalesce(s.shard, '') BETWEEN $first AND $last
  AND images.repaired IS DISTINCT FROM s.repaired;
