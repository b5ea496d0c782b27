-- One keyset page of a feature's users in user_id order: $1 feature, $2 tier
-- or NULL for all, $3 the last user_id of the previous page ('' for the first),
-- $4 rows. Reading strictly after the last key, in the order of the
-- (feature_name, user_id) index, means a row is never returned twice and a row
-- that existed throughout is never skipped, whatever is written meanwhile.
SELECT u.user_id, u.tier, u.current_usage, limit_in_force(u) AS usage_limit,
       u.pending_usage AS pending
  FROM user_tier_features AS u
 WHERE u.feature_name = $1
   AND ($2::text IS NULL OR u.tier = $2)
   AND u.user_id > $3
 ORDER BY u.user_id
 LIMIT $4
