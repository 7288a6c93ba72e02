-- Keep only the manifests of present, fresh shards (missing and stale ones are not loaded).
DELETE FROM manifests WHERE NOT list_contains($files, filename);
