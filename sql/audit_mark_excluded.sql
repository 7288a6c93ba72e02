-- After audit_mark_repaired: exclusions made at encode time are carried back to the images table
-- (recorded with their reason, so no planned image is ever silently missing), and the synsets'
-- kept counts follow. The shard_exclusions rows of every release count (an image one release's
-- encoder refused is excluded in `images`); each release's own counts (classes.tsv, the card)
-- subtract only its own exclusions.
UPDATE images SET status = 'excluded', excluded_at = 'encode', reason = 'encode: ' || e.reason
FROM shard_exclusions e WHERE images.key = e.key AND images.status = 'kept';
UPDATE synsets SET num_kept = coalesce(
    (SELECT count(*) FROM images i WHERE i.wnid = synsets.wnid AND i.status = 'kept'), 0);
