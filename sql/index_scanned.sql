SELECT tar, size, mtime FROM tar_scans;
