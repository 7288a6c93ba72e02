-- The seeded global shuffle: kept images ordered by md5('<seed>:<key>') (ties by key), then cut
-- into num_shards contiguous runs; the first N mod S shards hold one more sample.
CREATE OR REPLACE TABLE plan AS
WITH kept AS (
    SELECT i.key, i.wnid, s.label, i.tar, i.member, i."offset", i.size, i.sha256, i.width, i.height,
           coalesce(i.needs_repair, false) AS needs_repair,
           row_number() OVER (ORDER BY md5($seed::VARCHAR || ':' || i.key), i.key) - 1 AS g
    FROM images i JOIN synsets s USING (wnid)
    WHERE i.status = 'kept'
),
sizes AS (
    SELECT count(*) // $num_shards AS q, count(*) % $num_shards AS r FROM kept
),
placed AS (
    SELECT kept.*,
           CASE WHEN g < r * (q + 1) THEN g // (q + 1) ELSE r + (g - r * (q + 1)) // q END AS shard_no,
           CASE WHEN g < r * (q + 1) THEN g % (q + 1) ELSE (g - r * (q + 1)) % q END AS pos
    FROM kept, sizes
)
SELECT key, lpad(shard_no::VARCHAR, 4, '0') AS shard, pos::INTEGER AS position, wnid, label, tar, member,
       "offset", size, sha256, width, height, needs_repair
FROM placed;
