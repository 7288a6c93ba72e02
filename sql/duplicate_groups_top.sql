-- The largest groups of identical raw members (filtered_index metadata).
SELECT first_key, copies, kept, sha256, keys FROM duplicate_groups ORDER BY copies DESC, first_key LIMIT 50;
