-- Carry what the encoder found back to the images table: repairs, for the samples of a range of
-- shards (core/audit.py runs it range by range after audit_replace: in DuckDB one UPDATE of all
-- 13M rows takes minutes, 16 UPDATEs of 800k rows take seconds). Rows that already hold the value
-- are left alone.
UPDATE images SET repaired = s.repaired
FROM shard_samples s
WHERE images.key = s.key AND images.status = 'kept' AND coalesce(s.shard, '') BETWEEN $first AND $last
  AND images.repaired IS DISTINCT FROM s.repaired;
