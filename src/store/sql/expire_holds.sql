-- Frees the expired holds of $1 user_id for $2 feature; returns how many.
-- One user's row lock, for one short transaction.
SELECT usage_expire_holds($1, $2)
