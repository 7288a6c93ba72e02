-- Drop index rows of tars that are gone from the raw root or are about to be rescanned.
DELETE FROM images WHERE tar NOT IN (SELECT tar FROM raw_tars) OR tar IN (SELECT tar FROM rescan);
DELETE FROM tar_scans WHERE tar NOT IN (SELECT tar FROM raw_tars) OR tar IN (SELECT tar FROM rescan);
DELETE FROM staged_images WHERE tar NOT IN (SELECT tar FROM raw_tars) OR tar IN (SELECT tar FROM rescan);
