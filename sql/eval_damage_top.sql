-- The damaged parts of the eval tars, the first $top of them in file order, each with the count of all
-- (release/card.py: the dataset card's decontamination section).
SELECT file, at_byte, bytes, reason, count(*) OVER () AS ranges
FROM eval_damage
ORDER BY file, at_byte
LIMIT $top;
