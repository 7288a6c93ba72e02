-- Slice rows of a range of shards, in SLICE_COLUMNS order (see release/plan.py).
SELECT shard, position, key, wnid, label, tar, member, "offset", size, sha256, width, height, needs_repair
FROM plan WHERE release = $release AND shard >= $first AND shard <= $last
ORDER BY shard, position;
