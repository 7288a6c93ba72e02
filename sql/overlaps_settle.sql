-- The exclusions the filtered index settles after every tar is scanned, before the plan
-- (stages/decontam.py settle_index): eval overlaps, duplicate_of, and IMNET_DEDUP=exact.
-- Runs before index_duplicates.sql (repeated keys) or, under IMNET_DEDUP=exact, before
-- index_keys_copies.sql (repeated keys and later copies, decided together), which see what these rules kept.
-- "Kept by the index": kept, or refused only by the encoder (planned again, see plan_build.sql),
-- or excluded as a repeated key (index_duplicates.sql decides those again after this).
--
-- 1. Undo the earlier results of these rules and of dedup (the eval set or the dedup mode may have changed).
UPDATE images SET status = 'kept', reason = NULL, excluded_at = NULL
WHERE starts_with(reason, 'eval overlap: ') OR starts_with(reason, 'duplicate of ');
-- 2. duplicate_of: the first key (sorted) with the same sha256, NULL for that key itself and
--    for bytes held once.
UPDATE images AS i SET duplicate_of = CASE WHEN d.first_key <> i.key THEN d.first_key END
FROM (SELECT sha256, min(key) AS first_key FROM images WHERE sha256 IS NOT NULL GROUP BY sha256) d
WHERE i.sha256 = d.sha256 AND i.duplicate_of IS DISTINCT FROM CASE WHEN d.first_key <> i.key THEN d.first_key END;
-- 3. Eval overlaps: byte-identical (sha256), or pHash within $threshold bits. Near candidates come
--    from multi-index hashing: 4 bands of 16 bits; a pair within $threshold bits differs by at
--    most $radius (= $threshold // 4) bits in some band, so the eval side's band values, and with
--    $radius = 1 each of their 16 one-bit neighbours, are joined to the raw side's band values
--    by equality (hash joins), then the exact distance is taken of the candidates only.
CREATE OR REPLACE TEMP TABLE index_candidates AS
SELECT key, tar, "offset", sha256, phash FROM images
WHERE status = 'kept' OR excluded_at = 'encode' OR starts_with(reason, 'duplicate key');
CREATE OR REPLACE TABLE eval_overlaps AS
WITH eval_bands AS (
    SELECT e.file, e.phash, b.band, (e.phash >> (16 * b.band)) & 65535 AS value
    FROM eval_images e, range(4) b(band) WHERE e.phash IS NOT NULL
),
eval_keys AS (
    SELECT file, phash, band, value FROM eval_bands
    UNION ALL
    SELECT file, phash, band, xor(value, (1::BIGINT) << f.bit) FROM eval_bands, range(16) f(bit) WHERE $radius >= 1
),
raw_bands AS (
    SELECT c.key, c.tar, c."offset", c.phash, b.band, (c.phash >> (16 * b.band)) & 65535 AS value
    FROM index_candidates c, range(4) b(band) WHERE c.phash IS NOT NULL
),
near AS (
    SELECT DISTINCT r.key, r.tar, r."offset", k.file, bit_count(xor(r.phash, k.phash))::INTEGER AS distance
    FROM raw_bands r JOIN eval_keys k ON k.band = r.band AND k.value = r.value
    WHERE bit_count(xor(r.phash, k.phash)) <= $threshold
),
exact AS (
    SELECT c.key, c.tar, c."offset", e.file, -1 AS distance
    FROM index_candidates c JOIN eval_images e ON e.sha256 = c.sha256
),
matches AS (SELECT * FROM exact UNION ALL SELECT * FROM near)
-- one eval file per raw image: a byte-identical one first, then the nearest, then by name
SELECT key, tar, "offset", arg_min(file, (distance, file)) AS eval_file, min(distance) AS distance
FROM matches GROUP BY key, tar, "offset";
UPDATE images AS i SET status = 'excluded', excluded_at = 'index', reason = 'eval overlap: ' || o.eval_file
FROM eval_overlaps o WHERE i.key = o.key AND i.tar = o.tar AND i."offset" = o."offset";
-- (IMNET_DEDUP=exact's later copies: index_keys_copies.sql with stages/decontam.py, after this.)
DROP TABLE index_candidates;
