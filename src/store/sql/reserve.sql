-- Takes a slot for a product: $1 user_id, $2 feature, $3 product_id,
-- $4 audit action ('reserve' or 'restore'), $5 actor, $6 request id,
-- $7 hold time-to-live in seconds (NULL for a permanent slot).
-- The limit check and its concurrency argument live in usage_reserve
-- (migrations/V1__slots_and_usage.sql, extended in V6).
SELECT outcome, tier, current_usage, usage_limit, pending
  FROM usage_reserve($1, $2, $3, $4, $5, $6, make_interval(secs => $7::float8))
