-- The slice files of a range of shards, rendered here rather than row by row in Python: for each
-- shard, its rows as CSV text in position order, byte for byte what release/plan.py render_slice
-- writes for them (Python's csv.writer: "\n" line ends, NULL as an empty field, booleans as
-- True/False) without the header line, as long as no text field needs quoting. `exotic` marks the
-- shards where one does (a comma, a double quote, a newline or a carriage return): release/plan.py
-- renders those in Python.
SELECT shard,
       bool_or(contains(key, ',') OR contains(key, '"') OR contains(key, chr(10)) OR contains(key, chr(13))
               OR contains(wnid, ',') OR contains(wnid, '"') OR contains(wnid, chr(10)) OR contains(wnid, chr(13))
               OR contains(tar, ',') OR contains(tar, '"') OR contains(tar, chr(10)) OR contains(tar, chr(13))
               OR contains(member, ',') OR contains(member, '"') OR contains(member, chr(10))
               OR contains(member, chr(13))
               OR contains(sha256, ',') OR contains(sha256, '"') OR contains(sha256, chr(10))
               OR contains(sha256, chr(13))) AS exotic,
       string_agg(concat(position, ',', key, ',', wnid, ',', label, ',', tar, ',', member, ',', "offset", ',',
                         size, ',', sha256, ',', width, ',', height, ',',
                         CASE WHEN needs_repair THEN 'True' WHEN NOT needs_repair THEN 'False' END, chr(10)),
                  '' ORDER BY position) AS body
FROM plan WHERE release = $release AND shard >= $first AND shard <= $last
GROUP BY shard
ORDER BY shard;
