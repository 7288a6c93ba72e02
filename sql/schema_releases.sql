-- A catalog made before releases (issue 25): `stages` and `shards` gain a `release` column in their
-- primary keys, which DuckDB cannot alter in place, so both are rebuilt (a few thousand rows at most).
-- Every existing row is the default release's (''). The default release's synsets and labels are
-- the raw release's (what its plan was made with), so release_synsets gets them when there is a plan.
-- Run once, in one transaction, by storage/catalog.py (Catalog.migrate_releases).
CREATE TABLE stages_by_release (
    stage VARCHAR NOT NULL,
    input_fingerprint VARCHAR,
    run_id VARCHAR,
    updated_at TIMESTAMP,
    release VARCHAR NOT NULL DEFAULT '',
    PRIMARY KEY (release, stage)
);
INSERT INTO stages_by_release SELECT stage, input_fingerprint, run_id, updated_at, '' FROM stages;
DROP TABLE stages;
ALTER TABLE stages_by_release RENAME TO stages;
CREATE TABLE shards_by_release (
    shard VARCHAR NOT NULL,
    path VARCHAR,
    num_samples INTEGER,
    planned INTEGER,
    bytes BIGINT,
    sha256 VARCHAR,
    fingerprint VARCHAR,
    plan_digest VARCHAR,
    run_id VARCHAR,
    code_version VARCHAR,
    written_at VARCHAR,
    seconds DOUBLE,
    release VARCHAR NOT NULL DEFAULT '',
    PRIMARY KEY (release, shard)
);
INSERT INTO shards_by_release BY NAME SELECT *, '' AS release FROM shards;
DROP TABLE shards;
ALTER TABLE shards_by_release RENAME TO shards;
DELETE FROM release_synsets WHERE release = '';
INSERT INTO release_synsets SELECT '' AS release, wnid, label FROM synsets
WHERE EXISTS (SELECT 1 FROM plan);
