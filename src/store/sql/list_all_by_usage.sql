-- One keyset page of a feature's users, largest usage first, ties by user_id:
-- $1 feature, $2 tier or NULL, $3 minimum utilization or NULL, $4 only users
-- over their limit (all three as in list_all.sql), then the key of the last
-- row of the previous page, $5 its current_usage and $6 its user_id (for the
-- first page: the largest bigint and ''), $7 rows.
--
-- The order is total, so a user whose usage does not change between pages is
-- returned exactly once; one whose usage changes may move across the page
-- boundary. No index serves this order (see V2): each page sorts the
-- feature's matching rows, keeping only the top $7.
SELECT u.user_id, u.tier, u.current_usage, limit_in_force(u) AS usage_limit,
       u.pending_usage AS pending
  FROM user_tier_features AS u
 WHERE u.feature_name = $1
   AND ($2::text IS NULL OR u.tier = $2)
   AND ($3::float8 IS NULL
        OR u.current_usage >= $3::float8::numeric * limit_in_force(u))
   AND (NOT $4::bool OR u.current_usage > limit_in_force(u))
   AND (u.current_usage < $5 OR (u.current_usage = $5 AND u.user_id > $6))
 ORDER BY u.current_usage DESC, u.user_id
 LIMIT $7
