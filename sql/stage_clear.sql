DELETE FROM stages WHERE stage = $stage AND release = $release;
