INSERT OR REPLACE INTO stages (stage, input_fingerprint, run_id, updated_at, release)
VALUES ($stage, $fingerprint, $run_id, now()::TIMESTAMP, $release);
