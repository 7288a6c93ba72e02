-- Run first by `imnet verify` on its read-only connection: hold DuckDB to 512 MB or less
-- (catalog.held_to; the join and the sort of 13M rows spill to disk beyond), so that verify's
-- memory does not grow with the release.
SET memory_limit = $memory_limit;
