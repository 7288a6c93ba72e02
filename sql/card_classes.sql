-- Synsets of the release with at least one written sample (the dataset card's class count).
SELECT count(DISTINCT p.wnid) AS classes
FROM shard_samples s JOIN plan p ON p.release = s.release AND p.shard = s.shard AND p.position = s.position
WHERE s.release = $release;
