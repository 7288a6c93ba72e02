-- A digest of everything the plan depends on, to tell whether the plan is fresh.
SELECT md5(string_agg(key || '|' || tar || '|' || "offset" || '|' || sha256 || '|' || status,
                      ',' ORDER BY key, tar, "offset"))
FROM images;
