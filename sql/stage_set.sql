INSERT OR REPLACE INTO stages VALUES ($stage, $fingerprint, $run_id, now()::TIMESTAMP);
