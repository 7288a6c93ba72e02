-- Where a catalog connection spills beyond its memory limit (storage/catalog.py Catalog._hold_memory):
-- beside the catalog file. Set only while DuckDB has not spilled: it refuses to move a folder it used.
SET temp_directory = $temp_directory;
