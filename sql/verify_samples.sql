-- What a batch of shards must hold ($shards: a list of shard keys, $first and $last the least and the
-- greatest of them: a range DuckDB can skip row groups by), each shard's samples in order:
-- each sample's payload digest and the fields its .cls and .json carry (label and synset from the
-- plan, sizes from the shard's manifest). The columns are verify.CATALOG_COLUMNS, after the shard.
-- Streamed by `imnet verify` a few shards at a time, so memory does not grow with the release.
SELECT ss.shard, ss.key, p.label, p.wnid, ss.webp_sha256, ss.webp_bytes, ss.width, ss.height,
       ss.orig_width, ss.orig_height, p.sha256 AS source_sha256, coalesce(ss.repaired, false) AS repaired
FROM shard_samples ss
LEFT JOIN (SELECT key, shard, label, wnid, sha256 FROM plan
      WHERE shard BETWEEN $first AND $last AND list_contains($shards, shard)) p
       ON p.key = ss.key AND p.shard = ss.shard
WHERE ss.shard BETWEEN $first AND $last AND list_contains($shards, ss.shard)
ORDER BY ss.shard, ss.position;
