-- What the selected shards of the release ($release) must hold ($shards: a list of shard keys): each sample's payload digest
-- and the fields its .cls and .json carry (label and synset from the plan, sizes from the shard's
-- manifest), shard by shard, each shard's samples in order. The columns are verify.CATALOG_COLUMNS,
-- after the shard. `imnet verify` streams it once (one join and one sort, within verify_memory's
-- limit) into a local spool file and closes the catalog before it reads any shard file.
SELECT ss.shard, ss.key, p.label, p.wnid, ss.webp_sha256, ss.webp_bytes, ss.width, ss.height,
       ss.orig_width, ss.orig_height, p.sha256 AS source_sha256, coalesce(ss.repaired, false) AS repaired
FROM shard_samples ss
LEFT JOIN plan p ON p.release = ss.release AND p.key = ss.key AND p.shard = ss.shard
WHERE ss.release = $release AND list_contains($shards, ss.shard)
ORDER BY ss.shard, ss.position;
