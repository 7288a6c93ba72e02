-- The tables the catalog file holds (whatever version of schema.sql made it).
SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND NOT temporary ORDER BY table_name;
