-- Where samples came from and where they went: one row per image of one of `$keys` and release whose
-- plan holds it (with the release's name, '' for the default release; a row with no release when
-- none plans it, e.g. an excluded image). $by_name: only the images of the raw member named `$name`,
-- or of that last path part, or stem (a stem that gave another key: sanitized for a dot in it, ...;
-- their keys from sql/lineage_keys.sql); else every image of those keys. (Chosen first, apart: a
-- filter on the images after the joins reads every row of `images` and `plan`, seconds at the real size.)
WITH found AS (
    SELECT * FROM images i
    WHERE i.key = ANY($keys)
      AND (NOT $by_name OR i.member = $name OR regexp_extract(i.member, '[^/]*$') = $name
           OR regexp_replace(regexp_extract(i.member, '[^/]*$'), '\.[^.]*$', '') = $name)
)
SELECT i.key, i.wnid, i.tar, i.member, i."offset", i.size, i.sha256, i.status, i.reason,
       p.release, p.label, p.shard, p.position AS plan_position,
       -- the sample's index in the shard tar: its plan position less the images before it that the
       -- release's encoder refused (they are planned, not written)
       ss.position - (SELECT count(*) FROM shard_exclusions e
                      WHERE e.release = p.release AND e.shard = p.shard AND e.position < ss.position)
           AS position,
       s.path, s.run_id, s.code_version, s.written_at, ss.webp_sha256, ss.repaired
FROM found i
LEFT JOIN plan p ON p.key = i.key AND p.tar = i.tar AND p."offset" = i."offset"
LEFT JOIN shard_samples ss ON ss.release = p.release AND ss.key = i.key AND ss.shard = p.shard
LEFT JOIN shards s ON s.release = p.release AND s.shard = p.shard
ORDER BY i.status DESC, i.tar, i."offset", p.release;
