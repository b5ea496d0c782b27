-- The live products of the users in $1, ids as text. {products}, {id},
-- {user_id} and {deleted_at} are replaced by the configured identifiers, each
-- checked against information_schema and quoted first.
--
-- Run after the users' rows are locked, it sees every product committed before
-- the locks were granted. A product service reserves before it inserts and
-- deletes before it releases, so a product live here either holds its slot
-- already or will ask for it after this transaction; a slot whose product is
-- missing here may belong to an insert still in flight, which is why only
-- slots older than the grace period are released.
SELECT p.{user_id}::text AS user_id, p.{id}::text AS product_id
  FROM {products} AS p
 WHERE p.{user_id}::text = ANY($1::text[])
   AND p.{deleted_at} IS NULL
