-- Run as a catalog connection opens (storage/catalog.py Catalog._hold_memory): hold DuckDB's buffer
-- pool to $memory_limit (a share of the memory this process may hold, its cgroup's limit included:
-- DuckDB's default is 80% of the host's RAM, more than a container or pod may have); beyond it,
-- joins, sorts and aggregates spill to the temporary directory (beside the catalog file).
SET memory_limit = $memory_limit;
