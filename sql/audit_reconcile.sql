-- The release's plan against its shards: one row of counts; every count but planned/written/excluded
-- must be 0. misplaced (a sample whose plan row names another shard or position) and unplanned (a
-- sample with no plan row) come from one pass: samples left-joined to the plan.
WITH
p AS (SELECT key, shard, position FROM plan WHERE release = $release),
ss AS (SELECT key, shard, position FROM shard_samples WHERE release = $release),
ex AS (SELECT key, shard FROM shard_exclusions WHERE release = $release),
lost AS MATERIALIZED (
    SELECT p.key FROM p
    WHERE NOT EXISTS (SELECT 1 FROM ss s WHERE s.key = p.key AND s.shard = p.shard)
      AND NOT EXISTS (SELECT 1 FROM ex e WHERE e.key = p.key AND e.shard = p.shard)
),
dups AS (SELECT key, count(*) - 1 AS extra FROM ss GROUP BY key HAVING count(*) > 1),
against_plan AS MATERIALIZED (
    SELECT count(*) FILTER (WHERE p.key IS NOT NULL AND (s.shard <> p.shard OR s.position <> p.position))
               AS misplaced,
           count(*) FILTER (WHERE p.key IS NULL) AS unplanned
    FROM ss s LEFT JOIN p ON p.key = s.key
)
SELECT (SELECT count(*) FROM p) AS planned,
       (SELECT count(*) FROM ss) AS written,
       (SELECT count(*) FROM ex) AS excluded_at_encode,
       (SELECT count(*) FROM lost) AS lost,
       (SELECT coalesce(sum(extra), 0) FROM dups) AS duplicated,
       (SELECT misplaced FROM against_plan) AS misplaced,
       (SELECT unplanned FROM against_plan) AS unplanned,
       (SELECT list(key ORDER BY key)[1:5] FROM lost) AS lost_examples;
