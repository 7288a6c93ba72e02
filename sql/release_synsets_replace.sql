-- A release's synsets and labels ($path: a staged CSV of wnid,label; release/selection.py).
DELETE FROM release_synsets WHERE release = $release;
INSERT INTO release_synsets
SELECT $release AS release, wnid, label::INTEGER FROM read_csv($path, header = true, all_varchar = true);
