-- Whether the catalog was made before releases (issue 25): it has a `stages` table without the
-- `release` column (sql/schema_releases.sql migrates it). A catalog without `stages` is not.
SELECT count(*) > 0 AS before FROM duckdb_tables() t
WHERE t.database_name = current_database() AND t.table_name = 'stages' AND NOT t.temporary
  AND NOT EXISTS (SELECT 1 FROM duckdb_columns() c WHERE c.database_name = t.database_name
                  AND c.table_name = 'stages' AND c.column_name = 'release');
