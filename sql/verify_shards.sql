SELECT shard, path, num_samples, planned, bytes, sha256, run_id FROM shards WHERE release = $release ORDER BY shard;
