-- Load one batch of scan records written by the indexer as CSV.
INSERT INTO images
SELECT key, wnid, tar, member, "offset", size, sha256, width, height, format, mode, status, reason,
       needs_repair, NULL AS repaired, CASE WHEN status = 'excluded' THEN 'index' END AS excluded_at,
       phash, NULL AS duplicate_of  -- issue 17 (schema.sql adds both columns)
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'key': 'VARCHAR', 'wnid': 'VARCHAR', 'tar': 'VARCHAR', 'member': 'VARCHAR',
               'offset': 'BIGINT', 'size': 'BIGINT', 'sha256': 'VARCHAR', 'width': 'INTEGER',
               'height': 'INTEGER', 'format': 'VARCHAR', 'mode': 'VARCHAR', 'status': 'VARCHAR',
               'reason': 'VARCHAR', 'needs_repair': 'BOOLEAN', 'phash': 'BIGINT'});
