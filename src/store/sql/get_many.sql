-- The usage of several users at once: $1 user ids and $2 features, parallel
-- arrays. One row per pair whose feature exists, by the pair's 1-based
-- position `ord`; the columns are those of get.sql, computed the same way.
SELECT r.ord::integer                   AS ord,
       coalesce(u.tier, f.default_tier) AS tier,
       coalesce(u.current_usage, 0)     AS current_usage,
       CASE WHEN u.user_id IS NULL THEN l.usage_limit
            ELSE limit_in_force(u) END  AS usage_limit,
       coalesce(u.pending_usage, 0)     AS pending
  FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(user_id, feature_name, ord)
  JOIN features AS f ON f.feature_name = r.feature_name
  JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
  LEFT JOIN user_tier_features AS u ON u.user_id = r.user_id AND u.feature_name = f.feature_name
