-- A tar whose scan record says indexer version 3 is as version 4 would record it unless it holds an
-- image other than a JPEG (stages/fingerprints.py INDEX_VERSION): version 4 changed only what the trial
-- decode decides for those (the 5% rule for a cut-short PNG or GIF; TIFF, BMP, ... decoded to know
-- whether they are cut). Its record is marked version 4 here, so only the tars holding such a file are
-- read again (ImageNet: a few hundred of 19,167; a rescan of all is 1.1 TB read and hashed).
-- Any row with another format counts, whatever its status: a decision may change only for those.
UPDATE tar_scans SET index_version = $version
WHERE index_version = '3' AND $version = '4'
  AND tar NOT IN (SELECT DISTINCT tar FROM images WHERE format IS NOT NULL AND format NOT IN ('JPEG', 'MPO'));
