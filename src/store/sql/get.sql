-- The usage of $1 user_id for $2 feature. A user never seen is reported at
-- the feature's default tier with zero usage, without writing a row. No row
-- at all means the feature does not exist.
SELECT coalesce(u.tier, f.default_tier) AS tier,
       coalesce(u.current_usage, 0)     AS current_usage,
       CASE WHEN u.user_id IS NULL THEN l.usage_limit
            ELSE limit_in_force(u) END  AS usage_limit,
       coalesce(u.pending_usage, 0)     AS pending
  FROM features AS f
  JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
  LEFT JOIN user_tier_features AS u ON u.user_id = $1 AND u.feature_name = f.feature_name
 WHERE f.feature_name = $2
