-- Takes slots for feature $1: one per (user, product) pair of $2 and $3. Run
-- under the users' row locks, after reading that none of these slots exists:
-- a conflict here means the invariant is already broken, and fails the
-- transaction rather than hiding it.
INSERT INTO slots (user_id, feature_name, product_id)
SELECT r.user_id, $1::text, r.product_id
  FROM unnest($2::text[], $3::text[]) AS r(user_id, product_id)
