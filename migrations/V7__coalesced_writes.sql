-- Several Reserve and Release calls of one user in one statement.
--
-- When calls for the same user arrive faster than PostgreSQL can commit them
-- one by one (each must wait for the one before it to release the user's row
-- lock), the service queues them and sends the queue as one call of
-- usage_write_batch. Each item still goes through usage_reserve or
-- usage_release, with its own limit check, its own answer and its own audit
-- row, exactly as if it had been sent alone; what the items share is the
-- transaction, so one commit (one WAL flush) serves them all.
--
-- The arrays are parallel, one element per call, in arrival order:
--   p_kinds        'reserve' or 'release'
--   p_products     the product of the call
--   p_actions      the audit action of a reserve ('reserve' or 'restore');
--                  ignored for a release
--   p_actors, p_request_ids   as for usage_reserve / usage_release
--   p_hold_secs    the hold of a reserve in seconds, NULL for a permanent
--                  slot; ignored for a release
-- Returns one row per call: its 1-based position and what the single-call
-- function returned for it.
--
-- All items name one user and feature. The batch locks that user's counter
-- row before anything else and holds it to the commit, the lock every single
-- Reserve or Release that changes something takes first too; so a batch never
-- holds one of the user's rows while waiting for another, and never holds
-- another user's. If an item fails, the whole batch rolls back and nothing of
-- it is applied; the service then sends the items one by one.
CREATE FUNCTION usage_write_batch(
    p_user_id     text,
    p_feature     text,
    p_kinds       text[],
    p_products    text[],
    p_actions     text[],
    p_actors      text[],
    p_request_ids text[],
    p_hold_secs   float8[]
) RETURNS TABLE (ord integer, outcome text, tier text, current_usage bigint,
                 usage_limit bigint, pending bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM FROM user_tier_features AS t
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       FOR NO KEY UPDATE;
    FOR i IN 1..coalesce(array_length(p_kinds, 1), 0) LOOP
        IF p_kinds[i] = 'reserve' THEN
            RETURN QUERY
                SELECT i, r.* FROM usage_reserve(p_user_id, p_feature, p_products[i],
                                                 p_actions[i], p_actors[i], p_request_ids[i],
                                                 make_interval(secs => p_hold_secs[i])) AS r;
        ELSIF p_kinds[i] = 'release' THEN
            RETURN QUERY
                SELECT i, r.* FROM usage_release(p_user_id, p_feature, p_products[i],
                                                 p_actors[i], p_request_ids[i]) AS r;
        ELSE
            RAISE EXCEPTION 'usage_write_batch: unknown kind %', p_kinds[i]
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
END
$$;
