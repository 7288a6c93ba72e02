-- classes.tsv beside _info.json: one row per label (every synset of the release), its kept images.
SELECT label, wnid, coalesce(lemma, '') AS lemma, coalesce(gloss, '') AS gloss, coalesce(num_kept, 0) AS count
FROM synsets ORDER BY label;
