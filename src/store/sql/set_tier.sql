-- Moves a user to a tier: $1 user_id, $2 feature, $3 tier, $4 actor, $5
-- request id. Why it is safe against racing Reserves: usage_set_tier
-- (migrations/V2__tiers_overrides_audit.sql).
-- Tier and override changes leave pending holds alone, so the pending count
-- read alongside is the one in force before and after the call.
SELECT r.outcome, r.tier, r.current_usage, r.usage_limit,
       coalesce((SELECT u.pending_usage FROM user_tier_features AS u
                  WHERE u.user_id = $1 AND u.feature_name = $2), 0) AS pending
  FROM usage_set_tier($1, $2, $3, $4, $5) AS r
