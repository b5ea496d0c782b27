-- Refused Reserves of $1 feature in the last 24 hours and 7 days, through the
-- partial index usage_events_denied, and the instant they are counted from
-- (the snapshot's transaction start).
SELECT count(*) FILTER (WHERE e.occurred_at > now() - interval '24 hours') AS last_24h,
       count(*) AS last_7d,
       now() AS computed_at
  FROM usage_events AS e
 WHERE e.feature_name = $1 AND e.action = 'denied'
   AND e.occurred_at > now() - interval '7 days'
