-- Run first by the audit, on its own connection: hold DuckDB to 3 GB, or less where this process may
-- hold less (catalog.held_to; it spills to disk beyond).
-- At the real release's size the manifests (3.4 GB of JSON, 13M samples) and the reconciliation's
-- joins would otherwise grow the audit past 5 GB, DuckDB's default limit being 80% of RAM.
SET memory_limit = $memory_limit;
