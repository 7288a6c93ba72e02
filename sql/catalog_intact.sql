-- One table of the catalog ($table, from catalog_tables), every row read whole: DuckDB verifies
-- the checksum of each block as it loads it, so a block damaged anywhere in the table's data fails
-- this statement (catalog.Catalog.check_intact; its cost at the real size is noted there). One
-- hash per row (the row as a struct) makes every column's blocks load.
SELECT count(*) AS n, sum(hash(t)) AS h FROM query_table($table) t;
