UPDATE synsets SET num_kept = coalesce(
    (SELECT count(*) FROM images i WHERE i.wnid = synsets.wnid AND i.status = 'kept'), 0);
