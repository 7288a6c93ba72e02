-- Staged encodes per codec identity (stages/staged_encodes.py), for `imnet status`.
SELECT codec, count(*) AS images, count(reason) AS refused, coalesce(sum(size), 0) AS bytes
FROM staged_images GROUP BY codec ORDER BY codec;
