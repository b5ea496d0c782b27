-- Releases the slots of many products: $1 user_id, $2 feature, $3 product
-- ids, $4 actor, $5 request id. See usage_release_many.
SELECT outcome, tier, current_usage, usage_limit, pending, released, not_held
  FROM usage_release_many($1, $2, $3, $4, $5)
