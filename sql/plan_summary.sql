SELECT coalesce(sum(n), 0) AS samples, count(*) AS shards, min(n) AS smallest_shard, max(n) AS largest_shard
FROM (SELECT shard, count(*) AS n FROM plan WHERE release = $release GROUP BY shard);
