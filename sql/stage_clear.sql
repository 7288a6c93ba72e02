DELETE FROM stages WHERE stage = $stage;
