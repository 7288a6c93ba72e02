-- The exclusions stages/decontam.py settle_keys_and_copies decided (IMNET_DEDUP=exact).
UPDATE images AS i SET status = 'excluded', excluded_at = 'index', reason = x.reason
FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'key': 'VARCHAR', 'tar': 'VARCHAR', 'offset': 'BIGINT', 'reason': 'VARCHAR'}) x
WHERE i.key = x.key AND i.tar = x.tar AND i."offset" = x."offset";
