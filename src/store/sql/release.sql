-- Frees a product's slot: $1 user_id, $2 feature, $3 product_id, $4 actor,
-- $5 request id. See usage_release (migrations/V6__holds_bulk_and_levels.sql).
SELECT outcome, tier, current_usage, usage_limit, pending
  FROM usage_release($1, $2, $3, $4, $5)
