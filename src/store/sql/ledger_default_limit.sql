-- The limit of feature $1's default tier: a new user's limit. NULL is unlimited.
SELECT l.usage_limit
  FROM features AS f
  JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
 WHERE f.feature_name = $1::text
