-- A release's validation choice ($val_per_class = N > 0): of each class's images the plan takes
-- (what the index keeps), the N first in the order of md5('<seed>:validation:<key>') (ties by key),
-- a keyed hash independent of the train shuffle's; a class with N or fewer keeps one image for train
-- (it gives N - 1 ... 0 to validation: counted by plan_validation_short.sql). Held in a temp table
-- of row ids for plan_build.sql; empty when N = 0.
-- Held to plan_build's memory limit (a window over every kept image of the release at 13M rows).
SET memory_limit = $memory_limit;
CREATE OR REPLACE TEMP TABLE plan_validation AS
SELECT rid FROM (
    SELECT i.rowid AS rid,
           row_number() OVER (PARTITION BY i.wnid ORDER BY md5($seed::VARCHAR || ':validation:' || i.key), i.key) AS rank,
           count(*) OVER (PARTITION BY i.wnid) AS n
    FROM images i SEMI JOIN release_synsets r ON r.release = $release AND r.wnid = i.wnid
    WHERE $val_per_class > 0 AND (i.status = 'kept' OR i.excluded_at = 'encode')
) WHERE rank <= least($val_per_class, n - 1);
