-- Reserves slots for many products, all or nothing: $1 user_id, $2 feature,
-- $3 product ids, $4 audit action, $5 actor, $6 request id. See
-- usage_reserve_many (migrations/V6__holds_bulk_and_levels.sql).
SELECT outcome, tier, current_usage, usage_limit, pending, reserved, already_held,
       requested, available
  FROM usage_reserve_many($1, $2, $3, $4, $5, $6)
