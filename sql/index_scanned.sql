SELECT tar, size, mtime, index_version FROM tar_scans;
