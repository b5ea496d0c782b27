-- One page of a feature's audit trail across users (tier-wide events
-- included), newest first: $1 feature, then as list_events_user.sql: $2
-- actions or NULL, $3 since or NULL, $4 until or NULL, $5 last id, $6 rows.
-- Walks the primary key backwards from $5, skipping other features' rows;
-- events written meanwhile get larger ids and never shift a page.
SELECT e.id, e.occurred_at, e.user_id, e.feature_name, e.product_id, e.action,
       e.delta, e.usage_before, e.usage_after, e.actor, e.request_id,
       e.old_value, e.new_value, e.reason, e.tier
  FROM usage_events AS e
 WHERE e.feature_name = $1
   AND ($2::text[] IS NULL OR e.action = ANY ($2))
   AND ($3::timestamptz IS NULL OR e.occurred_at >= $3)
   AND ($4::timestamptz IS NULL OR e.occurred_at < $4)
   AND e.id < $5
 ORDER BY e.id DESC
 LIMIT $6
