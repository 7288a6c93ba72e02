SELECT count(*) AS synsets, count(lemma) AS with_lemma, count(gloss) AS with_gloss,
       coalesce(sum(num_images), 0) AS images, min(num_images) AS smallest, max(num_images) AS largest
FROM synsets;
