-- Products counted twice, or whose ledger row disagrees with their audit rows.
-- Replayed in order, the +1 (reserve, restore) and -1 (release) rows of one
-- product must alternate starting with +1, so the running sum stays 0 or 1,
-- and the product holds a slot exactly when the sum ends at 1.
--
-- Products touched by a backfill or a reconciliation are left out: those
-- passes repair a ledger whose past was not audited product by product, so
-- their rows need not alternate. The per-user check (check.sql) still covers
-- these users.
SELECT r.user_id, r.feature_name, r.product_id,
       min(r.running)::bigint AS lowest, max(r.running)::bigint AS highest,
       sum(r.delta)::bigint AS audited, bool_or(s.product_id IS NOT NULL) AS held
  FROM (SELECT user_id, feature_name, product_id, delta, action,
               sum(delta) OVER (PARTITION BY user_id, feature_name, product_id
                                ORDER BY id) AS running
          FROM usage_events
         WHERE product_id IS NOT NULL AND delta <> 0) AS r
  LEFT JOIN slots AS s
    ON s.user_id = r.user_id AND s.feature_name = r.feature_name
   AND s.product_id = r.product_id
 GROUP BY r.user_id, r.feature_name, r.product_id
HAVING NOT bool_or(r.action IN ('backfill', 'reconcile'))
   AND (min(r.running) < 0 OR max(r.running) > 1
        OR sum(r.delta) <> CASE WHEN bool_or(s.product_id IS NOT NULL) THEN 1 ELSE 0 END)
 ORDER BY r.user_id, r.feature_name, r.product_id
