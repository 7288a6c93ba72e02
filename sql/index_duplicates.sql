-- The same key in more than one place: the one in the key's own synset (its tar or folder is the
-- wnid before the key's `_`) stays, else the first by (tar, offset); the others are excluded. So a
-- file misplaced in another synset's tar never takes the key from the real one.
-- (A synset folder's files: offset is the file's number in the folder's listing; the reason names the file.)
UPDATE images SET status = 'kept', reason = NULL, excluded_at = NULL
WHERE starts_with(reason, 'duplicate key');
UPDATE images AS i SET status = 'excluded', excluded_at = 'index',
    reason = 'duplicate key: also in ' || CASE WHEN ends_with(d.first_tar, '/') THEN d.first_tar || d.first_member
                                              ELSE d.first_tar || ' at byte ' || d.first_offset END
FROM (
    SELECT key, tar, "offset",
           first_value(tar) OVER w AS first_tar, first_value("offset") OVER w AS first_offset,
           first_value(member) OVER w AS first_member,
           row_number() OVER w AS n
    FROM images WHERE status = 'kept' OR excluded_at = 'encode'  -- kept by the index
    WINDOW w AS (PARTITION BY key ORDER BY wnid <> split_part(key, '_', 1), tar, "offset")
) d
WHERE d.n > 1 AND i.key = d.key AND i.tar = d.tar AND i."offset" = d."offset";
