-- The release's shards that hold samples, in order (audit_mark_repaired runs over ranges of them).
SELECT DISTINCT coalesce(shard, '') AS shard FROM shard_samples WHERE release = $release ORDER BY shard;
