-- Reserve and Release calls of any users in one transaction: $1 user ids,
-- $2 features, $3 kinds ('reserve' or 'release'), $4 product ids, $5 audit
-- actions of the reserves, $6 actors, $7 request ids, $8 hold times-to-live
-- in seconds (NULL for a permanent slot), $9 the longest wait for any one
-- lock (NULL: no limit). One row per call, by its 1-based position `ord`.
-- See usage_write_batch (migrations/V8__cross_user_write_batches.sql).
SELECT ord, outcome, tier, current_usage, usage_limit, pending
  FROM usage_write_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)
