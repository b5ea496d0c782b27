-- Removes a user's limit override: $1 user_id, $2 feature, $3 reason, $4
-- actor, $5 request id. Written under the user's row lock:
-- usage_clear_override (migrations/V2__tiers_overrides_audit.sql).
SELECT outcome, tier, current_usage, usage_limit
  FROM usage_clear_override($1, $2, $3, $4, $5)
