-- Replace the eval set's hashes with those of the current IMNET_EVAL_EXCLUDE (stages/decontam.py).
DELETE FROM eval_images;
INSERT INTO eval_images (file, sha256, phash, no_phash)
SELECT file, sha256, phash, NULLIF(no_phash, '')
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'file': 'VARCHAR', 'sha256': 'VARCHAR', 'phash': 'BIGINT', 'no_phash': 'VARCHAR'});
