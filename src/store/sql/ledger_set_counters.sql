-- Sets the counters of feature $1: user $2[i] to $3[i]. Run under the users'
-- row locks, in the transaction that changed their slots, so that counter and
-- ledger change together.
UPDATE user_tier_features AS t
   SET current_usage = r.current_usage, updated_at = now()
  FROM unnest($2::text[], $3::bigint[]) AS r(user_id, current_usage)
 WHERE t.feature_name = $1::text AND t.user_id = r.user_id
