-- Reserve and Release calls of any users in one statement.
--
-- V7's usage_write_batch served the calls of one user. Under load from many
-- users at once (the common case: each call names a different user) nothing
-- queued per user, so every call was its own statement and its own commit,
-- and PostgreSQL spent most of its time on what each transaction costs
-- rather than on the work inside. This version takes the user and feature of
-- each call too, so that the calls that arrive while the service's writes are
-- in flight, whoever they are for, go together in one transaction.
--
-- Each item still goes through usage_reserve or usage_release, with its own
-- limit check, its own answer and its own audit row, exactly as if it had
-- been sent alone. Only the transaction is shared.
--
-- Locking. The calls run grouped by (user, feature), the groups in
-- (user_id, feature_name) order and the calls of one group in arrival order.
-- Whatever a call changes, the first lock it takes is its user's counter
-- row (the conditional UPDATE, or the FOR UPDATE of usage_expire_holds), and
-- it takes the user's slot rows only under that lock; a refusal takes none.
-- The locks are held to the commit. So a batch takes its users' locks in one
-- global order, the order the reconciliation (ledger_lock.sql) takes them in
-- too, and two batches cannot deadlock; a single call holds one user's locks
-- and never waits for another user's. Refusals of a user at its limit take
-- no lock, so batches of them run side by side as single calls do. Should
-- anything still deadlock (a writer that locks several users in another
-- order), PostgreSQL aborts one side; a batch that fails is rolled back as a
-- whole, and the service then sends its calls one by one.
--
-- One user's row held for long (a backfill's batch of users, a session left
-- idle in a transaction) must not hold up every user that happens to share
-- a batch with it: p_lock_timeout, when not NULL, is the longest the batch
-- waits for any one lock (PostgreSQL's lock_timeout, for this transaction
-- only). Past it the batch fails with lock_not_available and is sent again
-- call by call, the held user's calls waiting on their own.
--
-- The arrays are parallel, one element per call, in arrival order:
--   p_user_ids, p_features   whose slot the call reserves or releases
--   p_kinds        'reserve' or 'release'
--   p_products     the product of the call
--   p_actions      the audit action of a reserve ('reserve' or 'restore');
--                  ignored for a release
--   p_actors, p_request_ids   as for usage_reserve / usage_release
--   p_hold_secs    the hold of a reserve in seconds, NULL for a permanent
--                  slot; ignored for a release
-- and p_lock_timeout as above ('200ms', say). Returns one row per call: its
-- 1-based position in the arrays and what the single-call function returned
-- for it.
DROP FUNCTION usage_write_batch(text, text, text[], text[], text[], text[], text[], float8[]);

CREATE FUNCTION usage_write_batch(
    p_user_ids    text[],
    p_features    text[],
    p_kinds       text[],
    p_products    text[],
    p_actions     text[],
    p_actors      text[],
    p_request_ids text[],
    p_hold_secs   float8[],
    p_lock_timeout text
) RETURNS TABLE (ord integer, outcome text, tier text, current_usage bigint,
                 usage_limit bigint, pending bigint)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    IF p_lock_timeout IS NOT NULL THEN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
    END IF;
    FOR c IN
        SELECT q.i::integer AS i, q.user_id, q.feature
          FROM unnest(p_user_ids, p_features) WITH ORDINALITY AS q(user_id, feature, i)
         ORDER BY q.user_id, q.feature, q.i
    LOOP
        IF p_kinds[c.i] = 'reserve' THEN
            RETURN QUERY
                SELECT c.i, r.* FROM usage_reserve(c.user_id, c.feature, p_products[c.i],
                                                   p_actions[c.i], p_actors[c.i],
                                                   p_request_ids[c.i],
                                                   make_interval(secs => p_hold_secs[c.i])) AS r;
        ELSIF p_kinds[c.i] = 'release' THEN
            RETURN QUERY
                SELECT c.i, r.* FROM usage_release(c.user_id, c.feature, p_products[c.i],
                                                   p_actors[c.i], p_request_ids[c.i]) AS r;
        ELSE
            RAISE EXCEPTION 'usage_write_batch: unknown kind %', p_kinds[c.i]
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
END
$$;
