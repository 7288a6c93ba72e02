-- A stage's record in every release (the index changed: every release's plan is made again).
DELETE FROM stages WHERE stage = $stage;
