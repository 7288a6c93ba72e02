-- Where one sample came from and where it went: one row per release whose plan holds it (with the
-- release's name, '' for the default release; a row with no release when none plans it, e.g. an
-- excluded image). $by_name: look `$key` up as a raw member's name or stem instead (release/lineage.py).
SELECT i.key, i.wnid, i.tar, i.member, i."offset", i.size, i.sha256, i.status, i.reason,
       p.release, p.label, p.shard, p.position AS plan_position,
       -- the sample's index in the shard tar: its plan position less the images before it that the
       -- release's encoder refused (they are planned, not written)
       ss.position - (SELECT count(*) FROM shard_exclusions e
                      WHERE e.release = p.release AND e.shard = p.shard AND e.position < ss.position)
           AS position,
       s.path, s.run_id, s.code_version, s.written_at, ss.webp_sha256, ss.repaired
FROM images i
LEFT JOIN plan p ON p.key = i.key AND p.tar = i.tar AND p."offset" = i."offset"
LEFT JOIN shard_samples ss ON ss.release = p.release AND ss.key = i.key AND ss.shard = p.shard
LEFT JOIN shards s ON s.release = p.release AND s.shard = p.shard
WHERE CASE WHEN $by_name
           -- a raw member name, or its stem, that gave another key (sanitized: a dot in the stem, ...)
           THEN i.member = $key OR regexp_extract(i.member, '[^/]*$') = $key
                OR regexp_replace(regexp_extract(i.member, '[^/]*$'), '\.[^.]*$', '') = $key
           ELSE i.key = $key END
ORDER BY i.status DESC, i.tar, i."offset", p.release;
