SELECT shard, count(*) AS n FROM plan WHERE release = $release GROUP BY shard ORDER BY shard;
