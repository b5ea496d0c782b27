-- Every (user, feature) whose counter disagrees with its ledger or with the
-- sum of its audit deltas. An empty result means the invariant holds:
--   current_usage = slots held = sum of audited deltas.
SELECT u.user_id, u.feature_name, u.current_usage, s.slots, e.audited
  FROM user_tier_features AS u
 CROSS JOIN LATERAL (
        SELECT count(*) AS slots FROM slots
         WHERE user_id = u.user_id AND feature_name = u.feature_name) AS s
 CROSS JOIN LATERAL (
        SELECT coalesce(sum(delta), 0)::bigint AS audited FROM usage_events
         WHERE user_id = u.user_id AND feature_name = u.feature_name) AS e
 WHERE u.current_usage <> s.slots OR u.current_usage <> e.audited
 ORDER BY u.user_id, u.feature_name
