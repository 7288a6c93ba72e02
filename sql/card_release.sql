-- A named release's facts for its card: its synsets, and those the raw release does not hold.
SELECT count(*) AS synsets,
       count(*) FILTER (WHERE r.wnid NOT IN (SELECT wnid FROM synsets)) AS absent
FROM release_synsets r WHERE r.release = $release;
