SELECT shard, path, num_samples, bytes, sha256 FROM shards WHERE release = $release ORDER BY shard;
