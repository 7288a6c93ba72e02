SELECT shard, count(*) AS n FROM plan GROUP BY shard ORDER BY shard;
