CREATE OR REPLACE TEMP TABLE rescan AS
SELECT * FROM read_csv($path, header = true, auto_detect = false, columns = {'tar': 'VARCHAR'});
