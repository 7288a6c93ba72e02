-- Replace the eval set's hashes with those of the current IMNET_EVAL_EXCLUDE (stages/decontam.py).
DELETE FROM eval_images;
INSERT INTO eval_images (file, sha256, phash, no_phash)
SELECT file, sha256, phash, NULLIF(no_phash, '')
-- max_line_size: an eval file's name may be up to 1 MiB of bytes (rawtar.MAX_HEADER_DATA), four times that as the
-- catalog writes it (each byte that is not UTF-8 escaped), once more in a reason: DuckDB's 2 MB default
-- failed the whole stage on one such row (SPEC: a hostile name never crashes a stage).
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"', max_line_size = 33554432,
    columns = {'file': 'VARCHAR', 'sha256': 'VARCHAR', 'phash': 'BIGINT', 'no_phash': 'VARCHAR'});
