-- How many users own a live product: the length of the backfill's progress bar.
SELECT count(DISTINCT p.{user_id}) AS users
  FROM {products} AS p
 WHERE p.{deleted_at} IS NULL
