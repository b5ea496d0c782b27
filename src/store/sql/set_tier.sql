-- Moves a user to a tier: $1 user_id, $2 feature, $3 tier, $4 actor, $5
-- request id. Why it is safe against racing Reserves: usage_set_tier
-- (migrations/V2__tiers_overrides_audit.sql).
SELECT outcome, tier, current_usage, usage_limit
  FROM usage_set_tier($1, $2, $3, $4, $5)
