-- Makes a hold permanent: $1 user_id, $2 feature, $3 product_id, $4 actor,
-- $5 request id. See usage_confirm.
SELECT outcome, tier, current_usage, usage_limit, pending
  FROM usage_confirm($1, $2, $3, $4, $5)
