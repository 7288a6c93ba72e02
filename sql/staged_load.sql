-- Load one batch of staged encodes (stages/staged_encodes.STAGED_FIELDS) written as CSV.
INSERT INTO staged_images
SELECT * FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'codec': 'VARCHAR', 'key': 'VARCHAR', 'tar': 'VARCHAR', 'source_sha256': 'VARCHAR',
               'url': 'VARCHAR', 'offset': 'BIGINT', 'size': 'BIGINT', 'sha256': 'VARCHAR',
               'width': 'INTEGER', 'height': 'INTEGER', 'orig_width': 'INTEGER', 'orig_height': 'INTEGER',
               'repaired': 'BOOLEAN', 'reason': 'VARCHAR'});
