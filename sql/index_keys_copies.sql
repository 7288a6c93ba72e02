-- IMNET_DEDUP=exact (stages/decontam.py settle_keys_and_copies): the rows kept by the index
-- (kept, or refused only by the encoder) that share a key or bytes with another, in the order
-- (key, own synset first, tar, offset) in which they are settled: a row stays unless a row kept
-- before it holds its key (index_duplicates.sql's rule: the one in the key's own synset, else the
-- first by tar, offset) or its bytes (the first by key).
-- First undo index_duplicates.sql's earlier results (overlaps_settle.sql undid dedup's).
UPDATE images SET status = 'kept', reason = NULL, excluded_at = NULL
WHERE starts_with(reason, 'duplicate key');
WITH held AS (
    SELECT key, wnid, tar, "offset", member, sha256 FROM images WHERE status = 'kept' OR excluded_at = 'encode'
)
SELECT key, tar, "offset", member, sha256 FROM held
WHERE key IN (SELECT key FROM held GROUP BY key HAVING count(*) > 1)
   OR sha256 IN (SELECT sha256 FROM held WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING count(*) > 1)
ORDER BY key, wnid <> split_part(key, '_', 1), tar, "offset";
