-- Users of a limited tier whose usage rose past the limit in force: each row
-- is the first Reserve or Restore that left the user above it.
--
-- A user may legitimately be above its limit after a downgrade or a lowered
-- limit, and then only releases until below; so only increases made since the
-- limit in force was last set are judged against it: after the user's last
-- tier, override or limit event, after its tier's limit was last updated, and
-- after an expired override stopped applying. Earlier increases were judged
-- against a limit this query cannot know.
SELECT u.user_id, u.feature_name, u.tier, u.current_usage,
       limit_in_force(u) AS usage_limit, e.id AS event_id, e.usage_after
  FROM user_tier_features AS u
  JOIN tier_limits AS l ON l.tier = u.tier AND l.feature_name = u.feature_name
 CROSS JOIN LATERAL (
        SELECT coalesce(max(a.id), 0) AS id FROM usage_events AS a
         WHERE a.user_id = u.user_id AND a.feature_name = u.feature_name
           AND a.action IN ('set_tier', 'override', 'tier_limit')) AS changed
  JOIN LATERAL (
        SELECT ev.id, ev.usage_after FROM usage_events AS ev
         WHERE ev.user_id = u.user_id AND ev.feature_name = u.feature_name
           AND ev.action IN ('reserve', 'restore') AND ev.delta > 0
           AND ev.usage_after > limit_in_force(u)
           AND ev.id > changed.id
           AND ev.occurred_at > l.updated_at
           AND NOT (u.override_active AND u.override_expires_at <= now()
                    AND ev.occurred_at <= u.override_expires_at)
         ORDER BY ev.id
         LIMIT 1) AS e ON true
 WHERE limit_in_force(u) IS NOT NULL
 ORDER BY u.user_id, u.feature_name
