-- Every product of $1 feature holding a slot, with its user.
SELECT user_id, product_id FROM slots WHERE feature_name = $1
