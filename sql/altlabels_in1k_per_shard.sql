-- Per shard of the release, the written samples whose synset is one of the 1,000 ImageNet-1k wnids
-- ($wnids): the shard_lengths of _info.json's train_in1k split (release/altlabels.py).
SELECT s.shard, count(*) FILTER (WHERE list_contains($wnids, p.wnid)) AS n
FROM shard_samples s JOIN plan p ON p.release = s.release AND p.shard = s.shard AND p.position = s.position
WHERE s.release = $release
GROUP BY s.shard ORDER BY s.shard;
