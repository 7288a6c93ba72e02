SELECT (SELECT count(*) FROM images) AS raw_images,
       (SELECT count(*) FROM images WHERE status = 'kept') AS kept,
       (SELECT count(*) FROM images WHERE status = 'excluded') AS excluded,
       (SELECT count(*) FROM shard_samples) AS samples,
       (SELECT count(*) FROM shard_samples WHERE repaired) AS repaired,
       (SELECT coalesce(sum(bytes), 0) FROM shards) AS shard_bytes,
       (SELECT coalesce(sum(size), 0) FROM images WHERE status = 'kept') AS source_bytes,
       (SELECT count(*) FROM shards) AS shards,
       (SELECT count(*) FROM synsets) AS synsets;
