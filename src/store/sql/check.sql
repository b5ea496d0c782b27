-- Every (user, feature) whose counter disagrees with its ledger or with the
-- sum of its audit deltas. An empty result means the invariant holds:
--   current_usage = slots held = sum of audited deltas.
-- Each table is read once and grouped, rather than probed once per user: a
-- per-user probe is planned from the statistics, and an audit trail written
-- mostly for a few users (a load test, one busy account) makes the planner
-- scan the whole trail for every user.
WITH held AS (
    SELECT user_id, feature_name, count(*) AS slots
      FROM slots
     GROUP BY user_id, feature_name
), audited AS (
    SELECT user_id, feature_name, sum(delta)::bigint AS audited
      FROM usage_events
     WHERE user_id IS NOT NULL
     GROUP BY user_id, feature_name
)
SELECT u.user_id, u.feature_name, u.current_usage,
       coalesce(h.slots, 0)   AS slots,
       coalesce(a.audited, 0) AS audited
  FROM user_tier_features AS u
  LEFT JOIN held    AS h USING (user_id, feature_name)
  LEFT JOIN audited AS a USING (user_id, feature_name)
 WHERE u.current_usage <> coalesce(h.slots, 0)
    OR u.current_usage <> coalesce(a.audited, 0)
 ORDER BY u.user_id, u.feature_name
