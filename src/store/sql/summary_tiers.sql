-- Per tier of $1 feature: users, slots held, users at or over their limit in
-- force, and users at or above $2/$3 of it (integer arithmetic, so the
-- threshold is exact). Tiers without users are listed with zeros. Run in the
-- summary's read-only snapshot: see Store::summary.
SELECT l.tier, l.usage_limit,
       count(u.user_id) AS users,
       coalesce(sum(u.current_usage), 0)::bigint AS slots,
       count(*) FILTER (WHERE u.current_usage >= limit_in_force(u)) AS users_at_limit,
       count(*) FILTER (
           WHERE u.current_usage * $3::bigint >= limit_in_force(u) * $2::bigint
       ) AS users_near_limit
  FROM tier_limits AS l
  LEFT JOIN user_tier_features AS u
    ON u.tier = l.tier AND u.feature_name = l.feature_name
 WHERE l.feature_name = $1
 GROUP BY l.tier, l.usage_limit
 ORDER BY l.tier
