-- Records that a backfill of feature $1 completed every user up to $2, once
-- every batch up to that user has committed. Never moves back: workers may
-- record their checkpoints out of order.
INSERT INTO backfill_checkpoints (feature_name, last_user_id)
VALUES ($1::text, $2::text)
ON CONFLICT (feature_name)
DO UPDATE SET last_user_id = greatest(backfill_checkpoints.last_user_id, excluded.last_user_id),
              updated_at = now()
