-- Record the tars whose rows index_load just loaded, in the same transaction (stages/fingerprints.py):
-- a tar counts as scanned only once its rows are in. `num_records` is what the walk of the tar's
-- headers found (members and damage alike); it becomes raw_tars.num_members, the count every
-- conservation check holds the images rows to. `accounted_bytes` / `damaged_bytes`: the bytes the
-- walk read as headers, data, padding and end of archive / inside damage (rawtar.ByteCount), which
-- the conservation check holds to the tar's listed size (raw_tars.size).
INSERT OR REPLACE INTO tar_scans (tar, size, mtime, num_records, index_version, accounted_bytes, damaged_bytes)
SELECT tar, size, mtime, num_records, index_version, accounted_bytes, damaged_bytes
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'tar': 'VARCHAR', 'size': 'BIGINT', 'mtime': 'VARCHAR', 'num_records': 'INTEGER',
               'index_version': 'VARCHAR', 'accounted_bytes': 'BIGINT', 'damaged_bytes': 'BIGINT'});
UPDATE raw_tars SET num_members = s.num_records FROM tar_scans s WHERE raw_tars.tar = s.tar;
