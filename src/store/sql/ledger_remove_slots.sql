-- Releases the slots of feature $1 named by the (user, product) pairs of $2 and
-- $3. Run under the users' row locks, like usage_release.
DELETE FROM slots AS s
 USING unnest($2::text[], $3::text[]) AS r(user_id, product_id)
 WHERE s.feature_name = $1::text
   AND s.user_id = r.user_id
   AND s.product_id = r.product_id
