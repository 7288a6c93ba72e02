-- A range of shards' rows of the staged lookup (sql/staged_lookup_prepare.sql), in plan order.
SELECT * FROM staged_lookup WHERE shard >= $first AND shard <= $last ORDER BY shard, position;
