-- Audit rows of corrections of feature $1: action $2 ('backfill' or
-- 'reconcile'), actor $3, then one row per element of the arrays $4..$10:
-- user, product (NULL for a whole-user row), usage before and after, old and
-- new value, reason. Written in the transaction of the correction they record.
INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                          usage_before, usage_after, actor, old_value, new_value, reason)
SELECT r.user_id, $1::text, r.product_id, $2::text, r.usage_after - r.usage_before,
       r.usage_before, r.usage_after, $3::text, r.old_value, r.new_value, r.reason
  FROM unnest($4::text[], $5::text[], $6::bigint[], $7::bigint[],
              $8::text[], $9::text[], $10::text[])
       AS r(user_id, product_id, usage_before, usage_after, old_value, new_value, reason)
