-- The ids of audit events after $1, and of the earlier ids in $2 that were
-- still missing, in id order, at most $3. Reads the primary key only.
SELECT id FROM usage_events
 WHERE id > $1 OR id = ANY ($2)
 ORDER BY id
 LIMIT $3
