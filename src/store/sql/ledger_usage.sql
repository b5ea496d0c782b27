-- The counters and limits in force of the users in $2 that have a row for
-- feature $1, without locking: what a scan compares, before any correction
-- re-reads under the lock. Users without a row are at the default tier
-- (ledger_default_limit.sql) with nothing counted. A lookup by key per user,
-- so a page costs the same however many users exist.
SELECT t.user_id,
       true              AS has_row,
       t.current_usage,
       limit_in_force(t) AS usage_limit
  FROM user_tier_features AS t
 WHERE t.feature_name = $1::text AND t.user_id = ANY($2::text[])
