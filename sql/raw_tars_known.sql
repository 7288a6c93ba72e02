SELECT tar, size, mtime, num_members FROM raw_tars;
