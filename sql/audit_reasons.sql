-- Why images of the release's synsets were excluded, grouped by the kind of reason (text before the
-- first colon, keeping the stage prefix for encode-time exclusions): the index's exclusions, and the
-- release's own encoder's (shard_exclusions; another release's refusals are not this release's).
SELECT stage, reason, count(*) AS images FROM (
    SELECT coalesce(i.excluded_at, 'index') AS stage,
           CASE WHEN starts_with(i.reason, 'duplicate of ') THEN 'duplicate of'  -- issue 17: IMNET_DEDUP=exact
                ELSE split_part(i.reason, ':', 1) END AS reason
    FROM images i SEMI JOIN release_synsets r ON r.release = $release AND r.wnid = i.wnid
    WHERE i.status = 'excluded' AND i.excluded_at IS DISTINCT FROM 'encode'
    UNION ALL
    SELECT 'encode' AS stage, split_part('encode: ' || e.reason, ':', 2) AS reason
    FROM shard_exclusions e WHERE e.release = $release
)
GROUP BY ALL ORDER BY images DESC, reason;
