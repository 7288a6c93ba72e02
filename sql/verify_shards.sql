SELECT shard, path, num_samples, bytes, sha256, run_id FROM shards WHERE release = $release ORDER BY shard;
