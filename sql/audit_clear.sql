-- No shard has been written yet: the shard tables are empty.
DELETE FROM shards;
DELETE FROM shard_samples;
DELETE FROM shard_exclusions;
