-- Replace the inventory with the rows staged in raw_tars_new (a temporary table).
DELETE FROM raw_tars;
INSERT INTO raw_tars SELECT tar, wnid, size, mtime, num_members FROM raw_tars_new;
