-- The seeded global shuffle: kept images ordered by md5('<seed>:<key>') (ties by key), then cut
-- into num_shards contiguous runs; the first N mod S shards hold one more sample.
-- At the real release's size (13M images) the ordering is done on a narrow projection (row id and
-- key) and the wide columns are joined back afterwards, and DuckDB is held to 3 GB (it spills
-- beyond): sorting the wide rows took ~8 GB. The plan table is not stored in any particular order,
-- so DuckDB need not keep one while writing it (a third faster at 13M rows).
SET memory_limit = $memory_limit;
SET preserve_insertion_order = false;
-- One release's plan (issue 25): the table holds every release's rows, each release's replaced here.
-- Its images are the kept images of its synsets (release_synsets, with its labels); those chosen for
-- validation (plan_validation.sql; none without val_per_class) are shuffled and cut the same way into
-- $validation_shards shards whose keys follow the $num_shards train shards'. The default release
-- (all synsets, no validation) gets exactly the rows of the plan before releases.
DELETE FROM plan WHERE release = $release;
INSERT INTO plan BY NAME
-- One sort of the narrow projection, as before releases: train images first, then validation ones,
-- each in the shuffle's order, so a validation image's place in its split is its row number less the
-- train images' count; its label is joined back with the wide columns. (A window partitioned by the
-- split and carrying the label through the sort peaked ~11 MB higher at 2M rows: 591 against 580 MB,
-- bench/scale.py --scaled-limits.)
WITH kept AS (
    SELECT i.rowid AS rid, v.rid IS NOT NULL AS validation,
           row_number() OVER (ORDER BY v.rid IS NOT NULL, md5($seed::VARCHAR || ':' || i.key), i.key) - 1 AS n
    FROM images i SEMI JOIN release_synsets r ON r.release = $release AND r.wnid = i.wnid
    LEFT JOIN plan_validation v ON v.rid = i.rowid
    -- what the index keeps: an image the encoder refused is planned again (and refused again, with
    -- its reason), so the plan depends on the index alone, whatever the last audit found
    WHERE i.status = 'kept' OR i.excluded_at = 'encode'
),
sizes AS (
    SELECT validation,
           sum(count(*)) OVER (ORDER BY validation) - count(*) AS before_split,  -- 0 for train
           count(*) // CASE WHEN validation THEN $validation_shards ELSE $num_shards END AS q,
           count(*) % CASE WHEN validation THEN $validation_shards ELSE $num_shards END AS r
    FROM kept GROUP BY validation
),
numbered AS (
    SELECT rid, validation, n - before_split AS g, q, r FROM kept JOIN sizes USING (validation)
),
placed AS (
    SELECT rid,
           CASE WHEN validation THEN $num_shards ELSE 0 END
           + CASE WHEN g < r * (q + 1) THEN g // (q + 1) ELSE r + (g - r * (q + 1)) // q END AS shard_no,
           CASE WHEN g < r * (q + 1) THEN g % (q + 1) ELSE (g - r * (q + 1)) % q END AS pos
    FROM numbered
)
SELECT i.key, lpad(p.shard_no::VARCHAR, 4, '0') AS shard, p.pos::INTEGER AS position, i.wnid, s.label, i.tar,
       i.member, i."offset", i.size, i.sha256, i.width, i.height, coalesce(i.needs_repair, false) AS needs_repair,
       $release AS release
FROM placed p JOIN images i ON i.rowid = p.rid JOIN release_synsets s ON s.release = $release AND s.wnid = i.wnid;
RESET preserve_insertion_order;
-- The slice queries that follow read the plan back 128 shards at a time while Python holds two
-- batches of their text: a smaller buffer pool keeps the stage under 4 GB (DuckDB would otherwise
-- keep the whole uncompressed table cached). The stage's connection closes after it.
SET memory_limit = $slices_memory_limit;
