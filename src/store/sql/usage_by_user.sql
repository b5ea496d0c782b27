-- The counter of every user of $1 feature.
SELECT user_id, current_usage FROM user_tier_features WHERE feature_name = $1
