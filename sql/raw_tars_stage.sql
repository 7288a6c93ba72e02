CREATE OR REPLACE TEMP TABLE raw_tars_new AS
SELECT * FROM read_csv($path, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'tar': 'VARCHAR', 'wnid': 'VARCHAR', 'size': 'BIGINT', 'mtime': 'VARCHAR'});
