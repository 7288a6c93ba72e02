SELECT shard, path, num_samples, bytes, sha256 FROM shards ORDER BY shard;
