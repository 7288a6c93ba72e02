-- words.txt / gloss.txt rows (wnid, text), staged as CSV by the synset stage.
CREATE OR REPLACE TEMP TABLE words_new AS
SELECT * FROM read_csv($words, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'wnid': 'VARCHAR', 'text': 'VARCHAR'});
CREATE OR REPLACE TEMP TABLE gloss_new AS
SELECT * FROM read_csv($gloss, header = true, auto_detect = false, quote = '"', escape = '"',
    columns = {'wnid': 'VARCHAR', 'text': 'VARCHAR'});
