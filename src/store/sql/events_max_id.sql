-- The newest audit event id, 0 when there is none.
SELECT coalesce(max(id), 0) FROM usage_events
