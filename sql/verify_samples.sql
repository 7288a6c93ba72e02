-- What one shard must hold, in order: each sample's payload digest and the fields its .cls and
-- .json carry (label and synset from the plan, sizes from the shard's manifest).
SELECT ss.key, ss.position, ss.webp_sha256, ss.webp_bytes, ss.width, ss.height, ss.orig_width,
       ss.orig_height, p.label, p.wnid, p.sha256 AS source_sha256
FROM shard_samples ss
LEFT JOIN plan p ON p.key = ss.key AND p.shard = ss.shard
WHERE ss.shard = $shard
ORDER BY ss.position;
