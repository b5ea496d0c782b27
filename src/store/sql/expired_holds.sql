-- Up to $1 users with at least one expired hold, for the sweep.
SELECT DISTINCT user_id, feature_name
  FROM slots
 WHERE hold_expires_at <= now()
 LIMIT $1
