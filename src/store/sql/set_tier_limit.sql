-- Sets a tier's limit for every user of the tier: $1 tier, $2 feature, $3
-- limit (NULL = unlimited), $4 reason, $5 actor, $6 request id. Why the table
-- lock it takes: usage_set_tier_limit (migrations/V2__tiers_overrides_audit.sql).
SELECT outcome, old_limit, existed, users_updated
  FROM usage_set_tier_limit($1, $2, $3, $4, $5, $6)
