-- Conservation (SPEC: Failure behaviour), one row per difference, each naming its tar or shard:
-- per tar, images rows = the members the walk of its headers counted (raw_tars.num_members);
-- kept = planned; per written shard, planned = shard samples + encode-time exclusions.
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
kept AS (SELECT key FROM images WHERE status = 'kept' OR excluded_at = 'encode'),
plan_problems AS (
    SELECT 'kept by the index but not planned: ' || count(*) || ' images, e.g. '
           || list(key ORDER BY key)[1:5]::VARCHAR AS problem
    FROM (SELECT key FROM kept EXCEPT ALL SELECT key FROM plan) HAVING count(*) > 0
    UNION ALL
    SELECT 'planned but not kept by the index: ' || count(*) || ' images, e.g. '
           || list(key ORDER BY key)[1:5]::VARCHAR
    FROM (SELECT key FROM plan EXCEPT ALL SELECT key FROM kept) HAVING count(*) > 0
),
planned AS (SELECT shard, count(*) AS n FROM plan GROUP BY shard),
written AS (SELECT shard, count(*) AS n FROM shard_samples GROUP BY shard),
refused AS (SELECT shard, count(*) AS n FROM shard_exclusions GROUP BY shard),
shard_problems AS (
    SELECT 'shard ' || s.shard || ': ' || coalesce(p.n, 0) || ' planned, ' || coalesce(w.n, 0)
           || ' samples + ' || coalesce(x.n, 0) || ' encode-time exclusions' AS problem
    FROM shards s LEFT JOIN planned p USING (shard) LEFT JOIN written w USING (shard)
         LEFT JOIN refused x USING (shard)
    WHERE coalesce(p.n, 0) <> coalesce(w.n, 0) + coalesce(x.n, 0)
)
SELECT problem FROM (
    SELECT problem, 0 AS o FROM tar_problems
    UNION ALL SELECT problem, 1 FROM plan_problems
    UNION ALL SELECT problem, 2 FROM shard_problems
) ORDER BY o, problem;
