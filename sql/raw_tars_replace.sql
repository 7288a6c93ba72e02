-- Replace the inventory with the rows staged in raw_tars_new (a temporary table). A tar's member
-- count comes from the index's walk of its headers (index_record_scans): kept for a tar whose
-- scan is of these very bytes (same size and mtime), else unknown until filtered_index scans it.
DELETE FROM raw_tars;
INSERT INTO raw_tars
SELECT n.tar, n.wnid, n.size, n.mtime, s.num_records
FROM raw_tars_new n LEFT JOIN tar_scans s ON s.tar = n.tar AND s.size = n.size AND s.mtime = n.mtime;
