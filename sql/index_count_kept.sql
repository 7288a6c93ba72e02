-- After a scan: each synset's member count (the walk of its tar's headers, raw_tars.num_members)
-- and kept count.
UPDATE synsets SET
    num_images = (SELECT t.num_members FROM raw_tars t WHERE t.wnid = synsets.wnid),
    num_kept = coalesce((SELECT count(*) FROM images i WHERE i.wnid = synsets.wnid AND i.status = 'kept'), 0);
