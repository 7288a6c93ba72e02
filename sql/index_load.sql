-- Load one batch of scan records written by the indexer as CSV.
INSERT INTO images
SELECT key, wnid, tar, member, "offset", size, sha256, width, height, format, mode, status, reason,
       needs_repair, NULL AS repaired, CASE WHEN status = 'excluded' THEN 'index' END AS excluded_at,
       phash, NULL AS duplicate_of  -- issue 17 (schema.sql adds both columns)
-- max_line_size: a member's name may be up to 1 MiB of bytes (rawtar.MAX_HEADER_DATA), four times that as the
-- catalog writes it (each byte that is not UTF-8 escaped), once more in a reason: DuckDB's 2 MB default
-- failed the whole stage on one such row (SPEC: a hostile name never crashes a stage).
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"', max_line_size = 33554432,
    columns = {'key': 'VARCHAR', 'wnid': 'VARCHAR', 'tar': 'VARCHAR', 'member': 'VARCHAR',
               'offset': 'BIGINT', 'size': 'BIGINT', 'sha256': 'VARCHAR', 'width': 'INTEGER',
               'height': 'INTEGER', 'format': 'VARCHAR', 'mode': 'VARCHAR', 'status': 'VARCHAR',
               'reason': 'VARCHAR', 'needs_repair': 'BOOLEAN', 'phash': 'BIGINT'});
