SELECT p.shard, p.planned, coalesce(s.num_samples, 0) AS written, coalesce(e.n, 0) AS excluded,
       coalesce(s.bytes, 0) AS bytes, coalesce(r.n, 0) AS repaired, s.path, s.run_id, s.code_version
FROM (SELECT shard, count(*) AS planned FROM plan WHERE release = $release GROUP BY shard) p
LEFT JOIN (SELECT * FROM shards WHERE release = $release) s USING (shard)
LEFT JOIN (SELECT shard, count(*) AS n FROM shard_exclusions WHERE release = $release GROUP BY shard) e USING (shard)
LEFT JOIN (SELECT shard, count(*) AS n FROM shard_samples WHERE release = $release AND repaired GROUP BY shard) r
    USING (shard)
ORDER BY p.shard;
