-- The next $3 users after $2, in user id order: every user with a live product
-- in the catalogue or a counter of feature $1, each once. Both halves walk an
-- index in order and stop early, so a page costs the same at the start and at
-- the end of the catalogue. Reads only: safe at any time.
SELECT u.user_id
  FROM ((SELECT DISTINCT p.{user_id}::text AS user_id
           FROM {products} AS p
          WHERE p.{deleted_at} IS NULL AND p.{user_id}::text > $2::text
          ORDER BY 1
          LIMIT $3)
        UNION
        (SELECT t.user_id
           FROM user_tier_features AS t
          WHERE t.feature_name = $1::text AND t.user_id > $2::text
          ORDER BY 1
          LIMIT $3)) AS u
 ORDER BY u.user_id
 LIMIT $3
