-- One page of a user's audit trail, newest first: $1 user_id, $2 feature, $3
-- actions or NULL for all, $4 since (inclusive) or NULL, $5 until (exclusive)
-- or NULL, $6 the id of the last event of the previous page (the largest
-- bigint for the first), $7 rows.
--
-- The user and feature are plain equalities, never "NULL or equal", so even a
-- generic plan walks the usage_events_user index (user_id, feature_name, id)
-- backwards from $6 and reads only this user's rows: a page costs the rows it
-- returns plus those the other filters skip, never a scan of the table.
-- Reading strictly below the last id, events written while a caller pages
-- (which get larger ids) never shift a page: nothing is returned twice.
SELECT e.id, e.occurred_at, e.user_id, e.feature_name, e.product_id, e.action,
       e.delta, e.usage_before, e.usage_after, e.actor, e.request_id,
       e.old_value, e.new_value, e.reason, e.tier
  FROM usage_events AS e
 WHERE e.user_id = $1 AND e.feature_name = $2
   AND ($3::text[] IS NULL OR e.action = ANY ($3))
   AND ($4::timestamptz IS NULL OR e.occurred_at >= $4)
   AND ($5::timestamptz IS NULL OR e.occurred_at < $5)
   AND e.id < $6
 ORDER BY e.id DESC
 LIMIT $7
