-- classes.tsv beside a release's _info.json: one row per label of the release (every synset of its
-- list, release_synsets), its kept images: those the index keeps less those the release's own
-- encoder refused (for the default release alone in a catalog, exactly synsets.num_kept).
WITH refused AS (SELECT key FROM shard_exclusions WHERE release = $release),
counts AS (
    SELECT i.wnid, count(*) AS n
    FROM images i SEMI JOIN release_synsets r ON r.release = $release AND r.wnid = i.wnid
    ANTI JOIN refused x ON x.key = i.key
    WHERE i.status = 'kept' OR i.excluded_at = 'encode'
    GROUP BY i.wnid
)
SELECT r.label, r.wnid, coalesce(s.lemma, '') AS lemma, coalesce(s.gloss, '') AS gloss, coalesce(c.n, 0) AS count
FROM release_synsets r LEFT JOIN synsets s USING (wnid) LEFT JOIN counts c USING (wnid)
WHERE r.release = $release
ORDER BY r.label;
