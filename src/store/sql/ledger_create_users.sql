-- Creates the rows of the users in $2 for feature $1 at the feature's default
-- tier; users that have a row keep it and their tier. A racing Reserve that
-- creates the same row first wins: ON CONFLICT waits for it, then does nothing.
INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
SELECT r.user_id, f.feature_name, f.default_tier, l.usage_limit
  FROM unnest($2::text[]) AS r(user_id)
  JOIN features AS f ON f.feature_name = $1::text
  JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
 ORDER BY r.user_id
ON CONFLICT DO NOTHING
