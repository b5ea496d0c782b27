-- Whether $3 more slots could be reserved now by $1 user_id for $2 feature,
-- with the usage as Get reports it. Expired holds count as free, as they do
-- for Reserve. Reads only. No row means the feature does not exist.
SELECT g.tier, g.current_usage, g.usage_limit, g.pending,
       (g.usage_limit IS NULL OR g.current_usage - g.expired + $3 <= g.usage_limit) AS allowed
  FROM (
    SELECT coalesce(u.tier, f.default_tier) AS tier,
           coalesce(u.current_usage, 0)     AS current_usage,
           CASE WHEN u.user_id IS NULL THEN l.usage_limit
                ELSE limit_in_force(u) END  AS usage_limit,
           coalesce(u.pending_usage, 0)     AS pending,
           (SELECT count(*) FROM slots AS s
             WHERE s.user_id = $1 AND s.feature_name = $2
               AND s.hold_expires_at <= now()) AS expired
      FROM features AS f
      JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
      LEFT JOIN user_tier_features AS u ON u.user_id = $1 AND u.feature_name = f.feature_name
     WHERE f.feature_name = $2
  ) AS g
