-- The release's totals: raw images of its synsets; kept = what the index keeps of them less what
-- the release's own encoder refused (shard_exclusions; for the default release alone in a catalog,
-- exactly images.status = 'kept'); excluded = the rest.
WITH
mine AS (SELECT i.key, i.size, i.status, i.excluded_at
         FROM images i SEMI JOIN release_synsets r ON r.release = $release AND r.wnid = i.wnid),
kept AS (SELECT m.key, m.size FROM mine m
         ANTI JOIN (SELECT key FROM shard_exclusions WHERE release = $release) e ON e.key = m.key
         WHERE m.status = 'kept' OR m.excluded_at = 'encode')
SELECT (SELECT count(*) FROM mine) AS raw_images,
       (SELECT count(*) FROM kept) AS kept,
       (SELECT count(*) FROM mine) - (SELECT count(*) FROM kept) AS excluded,
       (SELECT count(*) FROM shard_samples WHERE release = $release) AS samples,
       (SELECT count(*) FROM shard_samples WHERE release = $release AND repaired) AS repaired,
       (SELECT coalesce(sum(bytes), 0) FROM shards WHERE release = $release) AS shard_bytes,
       (SELECT coalesce(sum(size), 0) FROM kept) AS source_bytes,
       (SELECT count(*) FROM shards WHERE release = $release) AS shards,
       (SELECT count(*) FROM release_synsets WHERE release = $release) AS synsets;
