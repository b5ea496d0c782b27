-- One keyset page of a feature's users in user_id order: $1 feature, $2 tier
-- or NULL for all, $3 minimum utilization (a fraction of the limit in force)
-- or NULL, $4 only users over their limit, $5 the last user_id of the previous
-- page ('' for the first), $6 rows. Reading strictly after the last key, in
-- the order of the (feature_name, user_id) index, means a row is never
-- returned twice and a row that existed throughout is never skipped, whatever
-- is written meanwhile. Utilization is compared in numeric, so 0.8 of 50 is
-- exactly 40; an unlimited user matches neither filter.
SELECT u.user_id, u.tier, u.current_usage, limit_in_force(u) AS usage_limit,
       u.pending_usage AS pending
  FROM user_tier_features AS u
 WHERE u.feature_name = $1
   AND ($2::text IS NULL OR u.tier = $2)
   AND ($3::float8 IS NULL
        OR u.current_usage >= $3::float8::numeric * limit_in_force(u))
   AND (NOT $4::bool OR u.current_usage > limit_in_force(u))
   AND u.user_id > $5
 ORDER BY u.user_id
 LIMIT $6
