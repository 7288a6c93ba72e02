-- Plan against shards: one row of counts; every count but planned/written/excluded must be 0.
WITH
lost AS (
    SELECT p.key FROM plan p
    WHERE NOT EXISTS (SELECT 1 FROM shard_samples s WHERE s.key = p.key AND s.shard = p.shard)
      AND NOT EXISTS (SELECT 1 FROM shard_exclusions e WHERE e.key = p.key AND e.shard = p.shard)
),
dups AS (SELECT key, count(*) - 1 AS extra FROM shard_samples GROUP BY key HAVING count(*) > 1),
misplaced AS (
    SELECT s.key FROM shard_samples s JOIN plan p USING (key)
    WHERE s.shard <> p.shard OR s.position <> p.position
),
unplanned AS (SELECT s.key FROM shard_samples s ANTI JOIN plan p USING (key))
SELECT (SELECT count(*) FROM plan) AS planned,
       (SELECT count(*) FROM shard_samples) AS written,
       (SELECT count(*) FROM shard_exclusions) AS excluded_at_encode,
       (SELECT count(*) FROM lost) AS lost,
       (SELECT coalesce(sum(extra), 0) FROM dups) AS duplicated,
       (SELECT count(*) FROM misplaced) AS misplaced,
       (SELECT count(*) FROM unplanned) AS unplanned,
       (SELECT list(key ORDER BY key)[1:5] FROM lost) AS lost_examples;
