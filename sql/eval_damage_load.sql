-- Replace the damaged parts of the eval tars with those of the current IMNET_EVAL_EXCLUDE (stages/decontam.py).
DELETE FROM eval_damage;
INSERT INTO eval_damage (file, at_byte, bytes, reason)
SELECT file, at_byte, bytes, reason
-- max_line_size: an eval file's name may be up to 1 MiB of bytes (rawtar.MAX_HEADER_DATA), four times that as the
-- catalog writes it (each byte that is not UTF-8 escaped), once more in a reason: DuckDB's 2 MB default
-- failed the whole stage on one such row (SPEC: a hostile name never crashes a stage).
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"', max_line_size = 33554432,
    columns = {'file': 'VARCHAR', 'at_byte': 'BIGINT', 'bytes': 'BIGINT', 'reason': 'VARCHAR'});
