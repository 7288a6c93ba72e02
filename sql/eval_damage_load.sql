-- Replace the damaged parts of the eval tars with those of the current IMNET_EVAL_EXCLUDE (stages/decontam.py).
DELETE FROM eval_damage;
INSERT INTO eval_damage (file, at_byte, bytes, reason)
SELECT file, at_byte, bytes, reason
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'file': 'VARCHAR', 'at_byte': 'BIGINT', 'bytes': 'BIGINT', 'reason': 'VARCHAR'});
