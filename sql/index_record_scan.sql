INSERT OR REPLACE INTO tar_scans VALUES ($tar, $size, $mtime, $num_records, $index_version);
