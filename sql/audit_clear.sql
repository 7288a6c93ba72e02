-- No shard of the release has been written yet: its rows of the shard tables go.
DELETE FROM shards WHERE release = $release;
DELETE FROM shard_samples WHERE release = $release;
DELETE FROM shard_exclusions WHERE release = $release;
