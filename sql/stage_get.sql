SELECT input_fingerprint FROM stages WHERE stage = $stage;
