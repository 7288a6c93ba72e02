-- Load shard manifests (a JSON file per shard, written by the shard runs) into a temporary table,
-- with the file each row came from. The audit is the catalog's single writer for the shard tables.
CREATE OR REPLACE TEMP TABLE manifests AS
SELECT * FROM read_json($files, format = 'auto', maximum_object_size = 268435456, filename = true, columns = {
    'shard': 'VARCHAR', 'path': 'VARCHAR', 'fingerprint': 'VARCHAR', 'plan_digest': 'VARCHAR',
    'code_version': 'VARCHAR', 'planned': 'INTEGER', 'num_samples': 'INTEGER', 'bytes': 'BIGINT',
    'sha256': 'VARCHAR', 'run_id': 'VARCHAR', 'written_at': 'VARCHAR', 'seconds': 'DOUBLE',
    'samples': 'STRUCT(key VARCHAR, position INTEGER, width INTEGER, height INTEGER, orig_width INTEGER, orig_height INTEGER, webp_bytes BIGINT, webp_sha256 VARCHAR, repaired BOOLEAN)[]',
    'excluded': 'STRUCT(key VARCHAR, position INTEGER, reason VARCHAR)[]'
});
