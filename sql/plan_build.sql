-- The seeded global shuffle: kept images ordered by md5('<seed>:<key>') (ties by key), then cut
-- into num_shards contiguous runs; the first N mod S shards hold one more sample.
-- At the real release's size (13M images) the ordering is done on a narrow projection (row id and
-- key) and the wide columns are joined back afterwards, and DuckDB is held to 3 GB (it spills
-- beyond): sorting the wide rows took ~8 GB. The plan table is not stored in any particular order,
-- so DuckDB need not keep one while writing it (a third faster at 13M rows).
-- Its text columns are stored uncompressed: choosing and applying DuckDB's string compression was
-- a third of this statement's time, and reading them back compressed most of the slice queries'.
-- At 13M rows that makes the plan table 2.4 GB on disk instead of 0.9 GB, and the plan stage
-- ~35 s instead of ~57 s (bench/scale.py). It is rebuilt from `images` whenever the plan changes.
SET memory_limit = '3GB';
SET preserve_insertion_order = false;
CREATE OR REPLACE TABLE plan (  -- the columns of schema.sql's plan
    key VARCHAR NOT NULL USING COMPRESSION uncompressed,
    shard VARCHAR NOT NULL USING COMPRESSION uncompressed,
    position INTEGER NOT NULL,
    wnid VARCHAR USING COMPRESSION uncompressed,
    label INTEGER,
    tar VARCHAR USING COMPRESSION uncompressed,
    member VARCHAR USING COMPRESSION uncompressed,
    "offset" BIGINT,
    size BIGINT,
    sha256 VARCHAR USING COMPRESSION uncompressed,
    width INTEGER,
    height INTEGER,
    needs_repair BOOLEAN
);
INSERT INTO plan
WITH kept AS (
    SELECT i.rowid AS rid,
           row_number() OVER (ORDER BY md5($seed::VARCHAR || ':' || i.key), i.key) - 1 AS g
    FROM images i SEMI JOIN synsets s USING (wnid)
    -- what the index keeps: an image the encoder refused is planned again (and refused again, with
    -- its reason), so the plan depends on the index alone, whatever the last audit found
    WHERE i.status = 'kept' OR i.excluded_at = 'encode'
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
RESET preserve_insertion_order;
-- The slice queries that follow read the plan back 128 shards at a time while Python holds two
-- batches of their text: a smaller buffer pool keeps the stage under 4 GB (DuckDB would otherwise
-- keep the whole uncompressed table cached). The stage's connection closes after it.
SET memory_limit = '2GB';
