-- No eval set (IMNET_EVAL_EXCLUDE unset): nothing to match.
DELETE FROM eval_images;
DELETE FROM eval_overlaps;
DELETE FROM eval_damage;
