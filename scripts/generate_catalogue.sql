-- Fills the catalogue's products table (tests/fixtures/catalogue.sql) with
-- `catalogue.products` products spread over `catalogue.users` users. Set both
-- first, in the same session:
--
--   SET catalogue.users = 100000; SET catalogue.products = 1000000;
--
-- Deterministic, so two runs make the same catalogue:
-- * users are `user-0000000` .. in order; product i of the even spread goes to
--   user i % users;
-- * every tenth product of a user (its 4th, 14th, ...) is soft-deleted;
-- * every hundredth user (user-0000000, user-0000100, ...) gets 60 more live
--   products, so that with its share it holds more than the Free limit of 50.
--   Spread out, so every batch of users looks alike.
WITH params AS (
    SELECT current_setting('catalogue.users')::bigint    AS users,
           current_setting('catalogue.products')::bigint AS products
), extra AS (
    SELECT users, products, (users / 100) * 60 AS extra FROM params
)
INSERT INTO products (user_id, name, deleted_at)
SELECT format('user-%s', lpad((i % e.users)::text, 7, '0')),
       format('product %s', i),
       CASE WHEN (i / e.users) % 10 = 3 THEN now() - interval '1 day' END
  FROM extra AS e, generate_series(0, greatest(e.products - e.extra, 0) - 1) AS i
UNION ALL
SELECT format('user-%s', lpad((i / 60 * 100)::text, 7, '0')),
       format('extra product %s', i),
       NULL
  FROM extra AS e, generate_series(0, least(e.extra, e.products) - 1) AS i;

ANALYZE products;
