-- Staged encodes of one codec identity (stages/staged_encodes.publish_lookups).
SELECT count(*) AS images FROM staged_images WHERE codec = $codec;
