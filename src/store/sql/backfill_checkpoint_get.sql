-- The last user a backfill of feature $1 completed, if one was interrupted.
SELECT last_user_id FROM backfill_checkpoints WHERE feature_name = $1::text
