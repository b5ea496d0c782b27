-- The audit events whose id is in $1, filtered by $2 user_id and $3 feature
-- (NULL for any) and, when $4, to threshold crossings only; in id order.
SELECT id, occurred_at, user_id, feature_name, action, product_id, delta,
       usage_before, usage_after, usage_limit, level_before, level_after
  FROM usage_events
 WHERE id = ANY ($1)
   AND ($2::text IS NULL OR user_id = $2)
   AND ($3::text IS NULL OR feature_name = $3)
   AND (NOT $4 OR level_after IS NOT NULL)
 ORDER BY id
