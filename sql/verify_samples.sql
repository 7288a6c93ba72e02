SELECT key, position, webp_sha256 FROM shard_samples WHERE shard = $shard ORDER BY position;
