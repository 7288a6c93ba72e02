-- Why images were excluded, grouped by the kind of reason (text before the first colon,
-- keeping the stage prefix for encode-time exclusions).
SELECT coalesce(excluded_at, 'index') AS stage,
       CASE WHEN excluded_at = 'encode' THEN split_part(reason, ':', 2)
            WHEN starts_with(reason, 'duplicate of ') THEN 'duplicate of'  -- issue 17: IMNET_DEDUP=exact
            ELSE split_part(reason, ':', 1) END
           AS reason,
       count(*) AS images
FROM images WHERE status = 'excluded'
GROUP BY ALL ORDER BY images DESC, reason;
