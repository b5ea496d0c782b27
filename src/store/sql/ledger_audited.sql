-- The sum of the audited deltas of each user in $2 for feature $1. Corrections
-- start their audit rows from it, so that afterwards the trail sums to the
-- corrected counter. Read under the users' row locks: no delta can be added
-- meanwhile.
SELECT e.user_id, coalesce(sum(e.delta), 0)::bigint AS audited
  FROM usage_events AS e
 WHERE e.feature_name = $1::text AND e.user_id = ANY($2::text[])
 GROUP BY e.user_id
