-- What overlaps_settle.sql found (filtered_index metadata, the dataset card).
SELECT (SELECT count(*) FROM duplicate_groups) AS duplicate_groups,
       (SELECT count(*) FROM images WHERE duplicate_of IS NOT NULL) AS duplicate_copies,
       (SELECT count(*) FROM images WHERE starts_with(reason, 'duplicate of ')) AS dedup_excluded,
       (SELECT count(*) FROM eval_overlaps WHERE distance < 0) AS eval_overlaps_exact,
       (SELECT count(*) FROM eval_overlaps WHERE distance >= 0) AS eval_overlaps_near;
