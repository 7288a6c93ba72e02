-- What the audit checks per manifest before loading it into the shard tables.
SELECT filename, fingerprint, bytes, num_samples FROM manifests;
