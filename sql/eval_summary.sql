-- The eval set's counts (stages/decontam.py, release/card.py): images without a pHash, and why
-- (eval_images.no_phash begins with perceptual.NO_DECODE or TOO_LARGE, or eval_pool.CRASHED; NULL on
-- a row hashed before the reason was recorded).
SELECT count(*) AS images,
       count(*) FILTER (WHERE phash IS NULL) AS no_phash,
       count(*) FILTER (WHERE phash IS NULL AND starts_with(no_phash, 'does not decode')) AS undecodable,
       count(*) FILTER (WHERE phash IS NULL AND starts_with(no_phash, 'crashed')) AS crashed,
       count(*) FILTER (WHERE phash IS NULL AND starts_with(no_phash, 'too large')) AS too_large,
       count(*) FILTER (WHERE phash IS NULL AND no_phash IS NULL) AS unrecorded,
       count(DISTINCT sha256) AS distinct_bytes
FROM eval_images;
