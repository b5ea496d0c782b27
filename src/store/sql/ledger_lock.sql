-- Locks the rows of the users in $2 for feature $1, in user id order, and
-- reads their counters. Holding a user's row lock is what usage_reserve and
-- usage_release hold while they change that user's slots, so until commit no
-- Reserve or Release of these users can run, and the ledger read next is
-- exactly what will be corrected. Locking in one order means two callers that
-- lock several users cannot deadlock; Reserve and Release lock one user only.
SELECT t.user_id,
       true                 AS has_row,
       t.current_usage,
       limit_in_force(t)    AS usage_limit
  FROM user_tier_features AS t
 WHERE t.feature_name = $1::text AND t.user_id = ANY($2::text[])
 ORDER BY t.user_id
   FOR UPDATE
