SELECT input_fingerprint FROM stages WHERE stage = $stage AND release = $release;
