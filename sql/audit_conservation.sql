-- Conservation (SPEC: Failure behaviour), one row per difference, each naming its tar or shard:
-- per tar, images rows = the members the walk of its headers counted (raw_tars.num_members);
-- per tar, the bytes its walk read (tar_scans: headers, data, padding, end of archive, plus the
-- bytes inside damage rows) = its size as the raw listing gave it (raw_tars.size, a count the walk
-- does not make), and damaged bytes only where a damage row (no sha256) records them;
-- kept = planned, for the release ($release: the images of its synsets the index keeps, against its
-- plan); per written shard of the release, planned = shard samples + encode-time exclusions.
WITH
per_tar AS (
    SELECT r.tar, r.num_members, count(i.key) AS rows
    FROM raw_tars r LEFT JOIN images i ON i.tar = r.tar
    GROUP BY r.tar, r.num_members
),
tar_problems AS (
    SELECT 'tar ' || tar || ': ' || CASE
               WHEN num_members IS NULL THEN 'never fully indexed (' || rows || ' images rows, no member count)'
               ELSE num_members || ' members counted from its headers, ' || rows || ' images rows' END AS problem
    FROM per_tar WHERE num_members IS NULL OR num_members <> rows
    UNION ALL
    SELECT 'tar ' || tar || ': ' || count(*) || ' images rows, but it is not in raw_tars'
    FROM images WHERE tar NOT IN (SELECT tar FROM raw_tars) GROUP BY tar
),
byte_problems AS (
    SELECT 'tar ' || r.tar || ': ' || CASE
               WHEN s.accounted_bytes IS NULL OR s.damaged_bytes IS NULL
               THEN 'no count of the bytes its walk read (indexed by an older version: `imnet build` indexes it again)'
               ELSE 'its walk read ' || s.accounted_bytes || ' bytes of headers, data, padding and end of archive and '
                    || s.damaged_bytes || ' of damage, ' || (s.accounted_bytes + s.damaged_bytes)
                    || ' in all; its listing says ' || r.size || ' bytes' END AS problem
    FROM raw_tars r LEFT JOIN tar_scans s ON s.tar = r.tar
    WHERE r.num_members IS NOT NULL
      AND (s.accounted_bytes IS NULL OR s.damaged_bytes IS NULL OR s.accounted_bytes + s.damaged_bytes <> r.size)
    UNION ALL
    SELECT 'tar ' || s.tar || ': its walk read ' || s.damaged_bytes || ' bytes of damage, but no damage row records them'
    FROM tar_scans s JOIN raw_tars r ON r.tar = s.tar
    WHERE s.damaged_bytes > 0 AND NOT EXISTS (SELECT 1 FROM images i WHERE i.tar = s.tar AND i.sha256 IS NULL)
),
kept AS (SELECT i.key FROM images i SEMI JOIN release_synsets r ON r.release = $release AND r.wnid = i.wnid
         WHERE i.status = 'kept' OR i.excluded_at = 'encode'),
planned_keys AS (SELECT key FROM plan WHERE release = $release),
plan_problems AS (
    SELECT 'kept by the index but not planned: ' || count(*) || ' images, e.g. '
           || list(key ORDER BY key)[1:5]::VARCHAR AS problem
    FROM (SELECT key FROM kept EXCEPT ALL SELECT key FROM planned_keys) HAVING count(*) > 0
    UNION ALL
    SELECT 'planned but not kept by the index: ' || count(*) || ' images, e.g. '
           || list(key ORDER BY key)[1:5]::VARCHAR
    FROM (SELECT key FROM planned_keys EXCEPT ALL SELECT key FROM kept) HAVING count(*) > 0
),
planned AS (SELECT shard, count(*) AS n FROM plan WHERE release = $release GROUP BY shard),
written AS (SELECT shard, count(*) AS n FROM shard_samples WHERE release = $release GROUP BY shard),
refused AS (SELECT shard, count(*) AS n FROM shard_exclusions WHERE release = $release GROUP BY shard),
shard_problems AS (
    SELECT 'shard ' || s.shard || ': ' || coalesce(p.n, 0) || ' planned, ' || coalesce(w.n, 0)
           || ' samples + ' || coalesce(x.n, 0) || ' encode-time exclusions' AS problem
    FROM (SELECT shard FROM shards WHERE release = $release) s LEFT JOIN planned p USING (shard) LEFT JOIN written w USING (shard)
         LEFT JOIN refused x USING (shard)
    WHERE coalesce(p.n, 0) <> coalesce(w.n, 0) + coalesce(x.n, 0)
)
SELECT problem FROM (
    SELECT problem, 0 AS o FROM tar_problems
    UNION ALL SELECT problem, 0 FROM byte_problems
    UNION ALL SELECT problem, 1 FROM plan_problems
    UNION ALL SELECT problem, 2 FROM shard_problems
) ORDER BY o, problem;
