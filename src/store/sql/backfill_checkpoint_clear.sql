-- Forgets the checkpoint of feature $1: the backfill finished, or a restart
-- was asked for.
DELETE FROM backfill_checkpoints WHERE feature_name = $1::text
