-- The catalog: every table the project keeps (SPEC: Catalog). Idempotent.
CREATE TABLE IF NOT EXISTS raw_tars (
    tar VARCHAR PRIMARY KEY,      -- file name, <wnid>.tar; or <wnid>/, a folder of extracted files (storage/rawfolders.py)
    wnid VARCHAR NOT NULL,
    size BIGINT NOT NULL,         -- a folder's: the sum of its file sizes
    mtime VARCHAR,                -- modification time or ETag, to notice a changed tar; a folder's: a digest of its listing
    num_members INTEGER
);
CREATE TABLE IF NOT EXISTS synsets (
    wnid VARCHAR PRIMARY KEY,
    label INTEGER NOT NULL,       -- index in the sorted list of synsets (tars or folders)
    lemma VARCHAR,
    gloss VARCHAR,
    num_images INTEGER,           -- members in the raw tar
    num_kept INTEGER              -- kept by the filtered index
);
CREATE TABLE IF NOT EXISTS images (
    key VARCHAR NOT NULL,
    wnid VARCHAR NOT NULL,
    tar VARCHAR NOT NULL,         -- <wnid>.tar, or the synset folder <wnid>/
    member VARCHAR,               -- the member's name (a folder's file: its path inside the folder)
    "offset" BIGINT,              -- byte offset of the member's data in its tar (a folder's file: its
                                  -- number in the folder's listing; its bytes are the whole file)
    size BIGINT,
    sha256 VARCHAR,
    width INTEGER,
    height INTEGER,
    format VARCHAR,
    mode VARCHAR,
    status VARCHAR NOT NULL,      -- kept | excluded
    reason VARCHAR,               -- why excluded (or why it needs repair)
    needs_repair BOOLEAN,         -- the index saw a truncated file; the encoder repairs it
    repaired BOOLEAN,             -- set by the audit from the shard manifests
    excluded_at VARCHAR           -- index | encode
);
CREATE TABLE IF NOT EXISTS tar_scans (
    tar VARCHAR PRIMARY KEY,
    size BIGINT,
    mtime VARCHAR,
    num_records INTEGER,
    index_version VARCHAR         -- a tar scanned by an older indexer is scanned again
);
-- Its text columns are stored uncompressed: choosing and applying DuckDB's string compression was
-- a third of plan_build's time, and reading them back compressed most of the slice queries'.
-- At 13M rows that makes the plan table 2.4 GB on disk instead of 0.9 GB, and the plan stage
-- ~35 s instead of ~57 s (bench/scale.py). A release's rows are made again from `images` whenever
-- its plan changes (sql/plan_build.sql).
CREATE TABLE IF NOT EXISTS plan (
    key VARCHAR NOT NULL USING COMPRESSION uncompressed,
    shard VARCHAR NOT NULL USING COMPRESSION uncompressed,  -- the partition key, 0000 ...
    position INTEGER NOT NULL,    -- position in the shard's plan slice
    wnid VARCHAR USING COMPRESSION uncompressed,
    label INTEGER,                -- the release's label (release_synsets)
    tar VARCHAR USING COMPRESSION uncompressed,
    member VARCHAR USING COMPRESSION uncompressed,
    "offset" BIGINT,
    size BIGINT,
    sha256 VARCHAR USING COMPRESSION uncompressed,
    width INTEGER,
    height INTEGER,
    needs_repair BOOLEAN
);
CREATE TABLE IF NOT EXISTS shards (
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
    release VARCHAR NOT NULL DEFAULT '',  -- the release the shard belongs to ('' = the default release)
    PRIMARY KEY (release, shard)
);
CREATE TABLE IF NOT EXISTS shard_samples (
    key VARCHAR NOT NULL,
    shard VARCHAR NOT NULL,
    position INTEGER NOT NULL,    -- position in the shard's plan slice
    width INTEGER,
    height INTEGER,
    orig_width INTEGER,
    orig_height INTEGER,
    webp_bytes BIGINT,            -- the stored image's bytes and sha256, whatever the release's codec
    webp_sha256 VARCHAR,          -- (named for WebP, the default; a JPEG release's <key>.jpg: issue 25)
    repaired BOOLEAN
);
CREATE TABLE IF NOT EXISTS shard_exclusions (
    key VARCHAR NOT NULL,
    shard VARCHAR NOT NULL,
    position INTEGER,
    reason VARCHAR
);
CREATE TABLE IF NOT EXISTS stages (
    stage VARCHAR NOT NULL,
    input_fingerprint VARCHAR,    -- what the stage's output depends on; equal means fresh
    run_id VARCHAR,
    updated_at TIMESTAMP,
    release VARCHAR NOT NULL DEFAULT '',  -- a release's own stage (shuffled_plan, shard_audit); '' for
                                          -- the shared stages and the default release
    PRIMARY KEY (release, stage)
);
-- Beyond the release (issue 17; stages/decontam.py, image/perceptual.py): each raw image's 64-bit
-- pHash (signed, NULL when not hashed) and the first key with the same sha256. Added by ALTER so
-- catalogs made before them gain the columns too, at the end of the table as index_load.sql writes.
ALTER TABLE images ADD COLUMN IF NOT EXISTS phash BIGINT;
ALTER TABLE images ADD COLUMN IF NOT EXISTS duplicate_of VARCHAR;
-- The bytes each tar's walk read (storage/rawtar.py ByteCount): headers (pax and GNU long-name headers
-- included), data, padding and end of archive / inside damage rows. Their sum must be the tar's
-- listed size (sql/audit_conservation.sql). NULL: scanned by an older indexer (INDEX_VERSION < 3).
ALTER TABLE tar_scans ADD COLUMN IF NOT EXISTS accounted_bytes BIGINT;
ALTER TABLE tar_scans ADD COLUMN IF NOT EXISTS damaged_bytes BIGINT;
CREATE TABLE IF NOT EXISTS eval_images (
    file VARCHAR NOT NULL,        -- path under IMNET_EVAL_EXCLUDE (<tar>/<member> inside a tar)
    sha256 VARCHAR NOT NULL,
    phash BIGINT                  -- NULL when the file does not decode as an image
);
-- Why an eval image has no pHash (NULL when it has one): "does not decode: ...", "too large: ...",
-- "crashed the pHash's process 2 times (...)" (stages/eval_pool.py). Added by ALTER so a catalog made
-- before it gains it (its rows then NULL: counted as "unrecorded" by sql/eval_summary.sql).
ALTER TABLE eval_images ADD COLUMN IF NOT EXISTS no_phash VARCHAR;
-- The parts of eval tars that are no member (a damaged header, a tail cut or not a tar, compressed data
-- that cannot be read on: storage/rawtar.py's and storage/compressed_tar.py's damage): the eval images
-- there could not be hashed, so decontamination covers less (stages/eval_pool.py; the dataset card
-- says so). Replaced with eval_images; a catalog made before it gains it empty.
CREATE TABLE IF NOT EXISTS eval_damage (
    file VARCHAR NOT NULL,        -- the eval tar, as eval_images.file names it (path under IMNET_EVAL_EXCLUDE)
    at_byte BIGINT NOT NULL,      -- where the damage starts in the tar (a compressed one: in its decompressed data)
    bytes BIGINT NOT NULL,        -- how long it is (0: where the tar ends or cannot be read on)
    reason VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS eval_overlaps (
    key VARCHAR NOT NULL,
    tar VARCHAR NOT NULL,
    "offset" BIGINT,
    eval_file VARCHAR NOT NULL,   -- the eval image it copies (the exclusion reason names it)
    distance INTEGER              -- pHash Hamming distance; -1: byte-identical (sha256)
);
-- Groups of raw members with identical bytes: one row per sha256 held by more than one member.
CREATE OR REPLACE VIEW duplicate_groups AS
SELECT sha256, min(key) AS first_key, count(*) AS copies,
       count(*) FILTER (WHERE status = 'kept') AS kept,
       string_agg(key, ' ' ORDER BY key) AS keys
FROM images WHERE sha256 IS NOT NULL
GROUP BY sha256 HAVING count(*) > 1;

-- Releases (issue 25, SPEC: Releases): one catalog holds several releases made from the one index.
-- The per-release tables carry the release's name ('' = the default release, IMNET_RELEASES
-- unset); the raw, synset and index tables are shared. Added by ALTER so catalogs made before
-- releases gain the column too (their rows are the default release's); stages and shards, whose
-- primary keys gain the release, are rebuilt once by sql/schema_releases.sql
-- (storage/catalog.py migrate_releases).
ALTER TABLE plan ADD COLUMN IF NOT EXISTS release VARCHAR DEFAULT '';
ALTER TABLE shard_samples ADD COLUMN IF NOT EXISTS release VARCHAR DEFAULT '';
ALTER TABLE shard_exclusions ADD COLUMN IF NOT EXISTS release VARCHAR DEFAULT '';
-- Each release's synsets and their labels (written by its shuffled_plan: release/selection.py):
-- label = index in the sorted list of the release's synsets as given (a synset absent from the raw
-- release keeps its label and holds no image).
CREATE TABLE IF NOT EXISTS release_synsets (
    release VARCHAR NOT NULL,
    wnid VARCHAR NOT NULL,
    label INTEGER NOT NULL,
    PRIMARY KEY (release, wnid)
);
-- Staged encodes (issue 25, stages/staged_encodes.py): with more than one release, the index's pass
-- encodes each kept image once per codec identity a release asks for (image/encode.codec_identity)
-- and commits a tar's encoded images as one file, `url`, the image's at `offset`. A shard run reads
-- them from there instead of reading and encoding the source. `reason` set: the encoder refused the
-- image (no bytes; the shard run records the exclusion). Dropped with the tar's index rows.
CREATE TABLE IF NOT EXISTS staged_images (
    codec VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    tar VARCHAR NOT NULL,
    source_sha256 VARCHAR NOT NULL,
    url VARCHAR NOT NULL,
    "offset" BIGINT NOT NULL,
    size BIGINT NOT NULL,
    sha256 VARCHAR,
    width INTEGER,
    height INTEGER,
    orig_width INTEGER,
    orig_height INTEGER,
    repaired BOOLEAN,
    reason VARCHAR
);
