-- The raw release's synsets (the "all" selection of a release).
SELECT wnid FROM synsets ORDER BY wnid;
