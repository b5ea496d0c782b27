-- Sets a user's limit override: $1 user_id, $2 feature, $3 limit (NULL =
-- unlimited), $4 expiry (NULL = none), $5 reason, $6 actor, $7 request id.
-- Written under the user's row lock: usage_set_override
-- (migrations/V2__tiers_overrides_audit.sql).
SELECT outcome, tier, current_usage, usage_limit
  FROM usage_set_override($1, $2, $3, $4, $5, $6, $7)
