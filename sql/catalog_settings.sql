-- The memory limit and the temporary directory DuckDB holds now (storage/catalog.py Catalog._hold_memory).
SELECT current_setting('memory_limit') AS memory_limit, current_setting('temp_directory') AS temp_directory;
