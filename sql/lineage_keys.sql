-- The keys of the raw members named `$name`, or of that last path part, or stem (release/lineage.py
-- name_ranges; sql/lineage.sql then gives their rows): looked for among the keys such a member can
-- have, $lo1..$hi3 (each an equality or a key prefix: no scan of every row's name, 13M at the real
-- size), and among the rows keyed by where they are (a name refused as unsafe: `<wnid>__member_<n>`,
-- `<wnid>__damage_<n>`, always excluded).
SELECT DISTINCT key FROM (
    SELECT key, member FROM images
    WHERE key BETWEEN $lo1 AND $hi1 OR key BETWEEN $lo2 AND $hi2 OR key BETWEEN $lo3 AND $hi3
    UNION ALL
    SELECT key, member FROM images WHERE status = 'excluded' AND contains(key, '__')
) i
WHERE i.member = $name OR regexp_extract(i.member, '[^/]*$') = $name
      OR regexp_replace(regexp_extract(i.member, '[^/]*$'), '\.[^.]*$', '') = $name
ORDER BY key;
