-- One row per synset tar; label = index in the sorted wnid list. Lemma and gloss come from
-- the staged words/gloss tables (empty when words.txt / gloss.txt are absent).
DELETE FROM synsets;
INSERT INTO synsets
SELECT t.wnid,
       (row_number() OVER (ORDER BY t.wnid) - 1)::INTEGER AS label,
       w.text AS lemma,
       g.text AS gloss,
       t.num_members AS num_images,
       (SELECT count(*) FROM images i WHERE i.wnid = t.wnid AND i.status = 'kept')::INTEGER AS num_kept
FROM raw_tars t
LEFT JOIN words_new w ON w.wnid = t.wnid
LEFT JOIN gloss_new g ON g.wnid = t.wnid;
