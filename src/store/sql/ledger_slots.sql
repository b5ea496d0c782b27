-- The slots of the users in $2 for feature $1. `settled` is true for a
-- permanent slot older than $3 seconds: only such a slot may be released for
-- want of a product, since a younger one may belong to a product whose insert
-- has not committed yet. A pending hold is never settled: its product may
-- still be on its way, and if nobody confirms it the hold expiry frees it
-- (keeping `pending_usage` right).
SELECT s.user_id, s.product_id,
       s.hold_expires_at IS NULL
       AND s.reserved_at <= now() - make_interval(secs => $3::float8) AS settled
  FROM slots AS s
 WHERE s.feature_name = $1::text AND s.user_id = ANY($2::text[])
