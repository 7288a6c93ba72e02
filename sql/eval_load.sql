-- Replace the eval set's hashes with those of the current IMNET_EVAL_EXCLUDE (stages/decontam.py).
DELETE FROM eval_images;
INSERT INTO eval_images
SELECT file, sha256, phash
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'file': 'VARCHAR', 'sha256': 'VARCHAR', 'phash': 'BIGINT'});
