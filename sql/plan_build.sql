-- The seeded global shuffle: kept images ordered by md5('<seed>:<key>') (ties by key), then cut
-- into num_shards contiguous runs; the first N mod S shards hold one more sample.
-- At the real release's size (13M images) the ordering is done on a narrow projection (row id and
-- key) and the wide columns are joined back afterwards, and DuckDB is held to 3 GB (it spills
-- beyond): sorting the wide rows took ~8 GB. The plan table is not stored in any particular order,
-- so DuckDB need not keep one while writing it (a third faster at 13M rows).
SET memory_limit = '3GB';
SET preserve_insertion_order = false;
CREATE OR REPLACE TABLE plan AS
WITH kept AS (
    SELECT i.rowid AS rid,
           row_number() OVER (ORDER BY md5($seed::VARCHAR || ':' || i.key), i.key) - 1 AS g
    FROM images i SEMI JOIN synsets s USING (wnid)
    WHERE i.status = 'kept'
),
sizes AS (
    SELECT count(*) // $num_shards AS q, count(*) % $num_shards AS r FROM kept
),
placed AS (
    SELECT rid,
           CASE WHEN g < r * (q + 1) THEN g // (q + 1) ELSE r + (g - r * (q + 1)) // q END AS shard_no,
           CASE WHEN g < r * (q + 1) THEN g % (q + 1) ELSE (g - r * (q + 1)) % q END AS pos
    FROM kept, sizes
)
SELECT i.key, lpad(p.shard_no::VARCHAR, 4, '0') AS shard, p.pos::INTEGER AS position, i.wnid, s.label, i.tar,
       i.member, i."offset", i.size, i.sha256, i.width, i.height, coalesce(i.needs_repair, false) AS needs_repair
FROM placed p JOIN images i ON i.rowid = p.rid JOIN synsets s ON s.wnid = i.wnid;
RESET memory_limit;
RESET preserve_insertion_order;
