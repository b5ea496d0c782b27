-- Holds that expire, bulk reservations, and usage levels for threshold events.
--
-- Locking is unchanged: every function takes the user's user_tier_features row
-- lock before it touches that user's slots, so user row first, then slots.

-- A slot with hold_expires_at is pending: it counts toward the limit, and it is
-- free again once that instant has passed, whether or not the sweep has
-- deleted it yet. NULL means permanent.
ALTER TABLE slots ADD COLUMN hold_expires_at timestamptz;
CREATE INDEX slots_hold_expiry ON slots (hold_expires_at) WHERE hold_expires_at IS NOT NULL;

-- pending_usage: how many of current_usage are pending holds.
-- usage_level: where usage stood at the last audited change (see usage_level),
-- so that a threshold crossing is reported once, on the change that made it.
ALTER TABLE user_tier_features
    ADD COLUMN pending_usage bigint NOT NULL DEFAULT 0 CHECK (pending_usage >= 0),
    ADD COLUMN usage_level smallint NOT NULL DEFAULT 1;

ALTER TABLE usage_events DROP CONSTRAINT usage_events_action_check;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_action_check CHECK (action IN (
    'reserve', 'restore', 'release', 'denied', 'set_tier', 'override',
    'tier_limit', 'reconcile', 'backfill', 'hold', 'confirm', 'expire'));

-- The limit in force after the event, and the levels before and after it when
-- the event crossed a threshold (both NULL otherwise).
ALTER TABLE usage_events
    ADD COLUMN usage_limit bigint,
    ADD COLUMN level_before smallint,
    ADD COLUMN level_after smallint;

-- 0 unlimited, 1 below 80% of the limit, 2 from 80% up to the limit, 3 at or
-- above the limit. Matches the UsageLevel enum of the API.
CREATE FUNCTION usage_level(p_usage bigint, p_limit bigint) RETURNS smallint
LANGUAGE sql IMMUTABLE AS $$
    SELECT (CASE
        WHEN p_limit IS NULL THEN 0
        WHEN p_usage >= p_limit THEN 3
        WHEN p_usage * 5 >= p_limit * 4 THEN 2
        ELSE 1
    END)::smallint
$$;

UPDATE user_tier_features AS u
   SET usage_level = usage_level(u.current_usage, limit_in_force(u));

-- Stamps every audit row with the limit in force and, when the user's level
-- changed since its last audited change, with the crossing. Being a trigger,
-- it covers every writer of usage_events, administrative changes included.
-- Writers hold the user's row lock when they audit a change of usage, so the
-- stored level moves in the same order as the changes.
CREATE FUNCTION usage_events_stamp_level() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    u     user_tier_features;
    level smallint;
BEGIN
    SELECT t.* INTO u FROM user_tier_features AS t
     WHERE t.user_id = NEW.user_id AND t.feature_name = NEW.feature_name;
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;

    NEW.usage_limit := limit_in_force(u);
    level := usage_level(NEW.usage_after, NEW.usage_limit);
    IF level <> u.usage_level THEN
        NEW.level_before := u.usage_level;
        NEW.level_after := level;
        UPDATE user_tier_features AS t SET usage_level = level
         WHERE t.user_id = NEW.user_id AND t.feature_name = NEW.feature_name;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER usage_events_stamp_level BEFORE INSERT ON usage_events
    FOR EACH ROW EXECUTE FUNCTION usage_events_stamp_level();

-- Frees the expired holds of one user, auditing each as 'expire', and returns
-- how many. Takes the user's row lock only when there is something to free.
CREATE FUNCTION usage_expire_holds(p_user_id text, p_feature text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    u     user_tier_features;
    freed record;
    n     integer := 0;
BEGIN
    IF NOT EXISTS (
        SELECT FROM slots AS s
         WHERE s.user_id = p_user_id AND s.feature_name = p_feature
           AND s.hold_expires_at <= now()
    ) THEN
        RETURN 0;
    END IF;

    PERFORM FROM user_tier_features AS t
      WHERE t.user_id = p_user_id AND t.feature_name = p_feature
        FOR UPDATE;

    -- A fresh snapshot after the lock: holds confirmed or released by a call
    -- that held the lock before us are no longer expired candidates.
    FOR freed IN
        DELETE FROM slots AS s
         WHERE s.user_id = p_user_id AND s.feature_name = p_feature
           AND s.hold_expires_at <= now()
        RETURNING s.product_id
    LOOP
        UPDATE user_tier_features AS t
           SET current_usage = t.current_usage - 1,
               pending_usage = t.pending_usage - 1,
               updated_at = now()
         WHERE t.user_id = p_user_id AND t.feature_name = p_feature
        RETURNING t.* INTO u;
        INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                  usage_before, usage_after, actor)
        VALUES (p_user_id, p_feature, freed.product_id, 'expire', -1,
                u.current_usage + 1, u.current_usage, 'usage-service');
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- Creates the user's row at the feature's default tier if it has none, now
-- with its usage level. Returns false when the feature does not exist.
DROP FUNCTION usage_ensure_user(text, text);
CREATE FUNCTION usage_ensure_user(p_user_id text, p_feature text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit, usage_level)
    SELECT p_user_id, f.feature_name, f.default_tier, l.usage_limit,
           usage_level(0, l.usage_limit)
      FROM features AS f
      JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
     WHERE f.feature_name = p_feature
    ON CONFLICT DO NOTHING;
    RETURN EXISTS (SELECT FROM features AS f WHERE f.feature_name = p_feature);
END
$$;

-- usage_reserve, now with an optional hold. The concurrency argument of V1
-- holds unchanged; what is new:
-- * p_hold_ttl not NULL: the slot is pending until now() + p_hold_ttl, and
--   audited as 'hold'.
-- * A product whose slot is an expired hold is free: its slot is taken over
--   (audited as 'expire' then as the new action).
-- * Before refusing a user at its limit, its expired holds are freed and the
--   check is tried again, so the limit is right even when the sweep is late.
DROP FUNCTION usage_reserve(text, text, text, text, text, text);
CREATE FUNCTION usage_reserve(
    p_user_id    text,
    p_feature    text,
    p_product_id text,
    p_action     text,
    p_actor      text,
    p_request_id text,
    p_hold_ttl   interval
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint,
                 pending bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u          user_tier_features;
    v_pending  integer := (p_hold_ttl IS NOT NULL)::integer;
    v_expires  timestamptz := now() + p_hold_ttl;
    v_action   text := CASE WHEN p_hold_ttl IS NULL THEN p_action ELSE 'hold' END;
BEGIN
    FOR attempt IN 1..3 LOOP
        -- 1. The atomic limit check.
        UPDATE user_tier_features AS t
           SET current_usage = t.current_usage + 1,
               pending_usage = t.pending_usage + v_pending,
               updated_at = now()
         WHERE t.user_id = p_user_id AND t.feature_name = p_feature
           AND (limit_in_force(t) IS NULL OR t.current_usage < limit_in_force(t))
        RETURNING t.* INTO u;

        IF FOUND THEN
            -- 2. Under the row lock: record which product holds the slot.
            INSERT INTO slots (user_id, feature_name, product_id, hold_expires_at)
            VALUES (p_user_id, p_feature, p_product_id, v_expires)
            ON CONFLICT DO NOTHING;

            IF NOT FOUND THEN
                -- Held already. An expired hold is free: take it over.
                UPDATE slots AS s SET hold_expires_at = v_expires, reserved_at = now()
                 WHERE s.user_id = p_user_id AND s.feature_name = p_feature
                   AND s.product_id = p_product_id AND s.hold_expires_at <= now();
                IF FOUND THEN
                    UPDATE user_tier_features AS t
                       SET current_usage = t.current_usage - 1,
                           pending_usage = t.pending_usage - 1
                     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
                    RETURNING t.* INTO u;
                    INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                              usage_before, usage_after, actor, request_id)
                    VALUES (p_user_id, p_feature, p_product_id, 'expire', -1,
                            u.current_usage, u.current_usage - 1, p_actor, p_request_id),
                           (p_user_id, p_feature, p_product_id, v_action, 1,
                            u.current_usage - 1, u.current_usage, p_actor, p_request_id);
                    RETURN QUERY SELECT 'reserved'::text, u.tier, u.current_usage,
                                        limit_in_force(u), u.pending_usage;
                    RETURN;
                END IF;

                UPDATE user_tier_features AS t
                   SET current_usage = t.current_usage - 1,
                       pending_usage = t.pending_usage - v_pending
                 WHERE t.user_id = p_user_id AND t.feature_name = p_feature
                RETURNING t.* INTO u;
                RETURN QUERY SELECT 'already_held'::text, u.tier, u.current_usage,
                                    limit_in_force(u), u.pending_usage;
                RETURN;
            END IF;

            INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                      usage_before, usage_after, actor, request_id)
            VALUES (p_user_id, p_feature, p_product_id, v_action, 1,
                    u.current_usage - 1, u.current_usage, p_actor, p_request_id);
            RETURN QUERY SELECT 'reserved'::text, u.tier, u.current_usage,
                                limit_in_force(u), u.pending_usage;
            RETURN;
        END IF;

        -- 3. Nothing counted: a new user, a user at its limit, or a product
        -- already held by a user at its limit.
        SELECT t.* INTO u FROM user_tier_features AS t
         WHERE t.user_id = p_user_id AND t.feature_name = p_feature;
        IF NOT FOUND THEN
            IF NOT usage_ensure_user(p_user_id, p_feature) THEN
                RETURN QUERY SELECT 'unknown_feature'::text, NULL::text, NULL::bigint,
                                    NULL::bigint, NULL::bigint;
                RETURN;
            END IF;
            CONTINUE;
        END IF;

        CONTINUE WHEN usage_expire_holds(p_user_id, p_feature) > 0;

        IF EXISTS (
            SELECT FROM slots AS s
             WHERE s.user_id = p_user_id AND s.feature_name = p_feature
               AND s.product_id = p_product_id
        ) THEN
            RETURN QUERY SELECT 'already_held'::text, u.tier, u.current_usage,
                                limit_in_force(u), u.pending_usage;
            RETURN;
        END IF;

        -- 4. A release may have freed a slot since step 1: try again.
        CONTINUE WHEN limit_in_force(u) IS NULL OR u.current_usage < limit_in_force(u);

        INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                  usage_before, usage_after, actor, request_id)
        VALUES (p_user_id, p_feature, p_product_id, 'denied', 0,
                u.current_usage, u.current_usage, p_actor, p_request_id);
        RETURN QUERY SELECT 'denied'::text, u.tier, u.current_usage, limit_in_force(u),
                            u.pending_usage;
        RETURN;
    END LOOP;

    RETURN QUERY SELECT 'denied'::text, u.tier, u.current_usage, limit_in_force(u),
                        u.pending_usage;
END
$$;

-- usage_release, now aware of pending slots: releasing a hold also lowers
-- pending_usage. Locking as in V1.
DROP FUNCTION usage_release(text, text, text, text, text);
CREATE FUNCTION usage_release(
    p_user_id    text,
    p_feature    text,
    p_product_id text,
    p_actor      text,
    p_request_id text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint,
                 pending bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u       user_tier_features;
    v_hold  timestamptz;
BEGIN
    UPDATE user_tier_features AS t
       SET current_usage = t.current_usage - 1, updated_at = now()
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       AND t.current_usage > 0
    RETURNING t.* INTO u;

    IF FOUND THEN
        DELETE FROM slots AS s
         WHERE s.user_id = p_user_id AND s.feature_name = p_feature
           AND s.product_id = p_product_id
        RETURNING s.hold_expires_at INTO v_hold;

        IF FOUND THEN
            IF v_hold IS NOT NULL THEN
                UPDATE user_tier_features AS t SET pending_usage = t.pending_usage - 1
                 WHERE t.user_id = p_user_id AND t.feature_name = p_feature
                RETURNING t.* INTO u;
            END IF;
            INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                      usage_before, usage_after, actor, request_id)
            VALUES (p_user_id, p_feature, p_product_id, 'release', -1,
                    u.current_usage + 1, u.current_usage, p_actor, p_request_id);
            RETURN QUERY SELECT 'released'::text, u.tier, u.current_usage,
                                limit_in_force(u), u.pending_usage;
            RETURN;
        END IF;

        UPDATE user_tier_features AS t
           SET current_usage = t.current_usage + 1
         WHERE t.user_id = p_user_id AND t.feature_name = p_feature
        RETURNING t.* INTO u;
        RETURN QUERY SELECT 'not_held'::text, u.tier, u.current_usage, limit_in_force(u),
                            u.pending_usage;
        RETURN;
    END IF;

    RETURN QUERY
        SELECT 'not_held'::text, coalesce(t.tier, f.default_tier), coalesce(t.current_usage, 0),
               CASE WHEN t.user_id IS NULL THEN l.usage_limit ELSE limit_in_force(t) END,
               coalesce(t.pending_usage, 0)
          FROM features AS f
          JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
          LEFT JOIN user_tier_features AS t
            ON t.user_id = p_user_id AND t.feature_name = f.feature_name
         WHERE f.feature_name = p_feature;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_feature'::text, NULL::text, NULL::bigint,
                            NULL::bigint, NULL::bigint;
    END IF;
END
$$;

-- Makes a live hold permanent ('confirmed', audited as 'confirm' with delta
-- 0). A permanent slot is left as it is ('already_confirmed'). A product with
-- no slot, an expired hold included, is reserved again through usage_reserve
-- (audited as 'confirm' with delta 1): 're_reserved', or 'denied' at the limit.
CREATE FUNCTION usage_confirm(
    p_user_id    text,
    p_feature    text,
    p_product_id text,
    p_actor      text,
    p_request_id text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint,
                 pending bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u user_tier_features;
BEGIN
    PERFORM usage_expire_holds(p_user_id, p_feature);

    SELECT t.* INTO u FROM user_tier_features AS t
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       FOR UPDATE;
    IF FOUND THEN
        UPDATE slots AS s SET hold_expires_at = NULL
         WHERE s.user_id = p_user_id AND s.feature_name = p_feature
           AND s.product_id = p_product_id AND s.hold_expires_at IS NOT NULL;
        IF FOUND THEN
            UPDATE user_tier_features AS t
               SET pending_usage = t.pending_usage - 1, updated_at = now()
             WHERE t.user_id = p_user_id AND t.feature_name = p_feature
            RETURNING t.* INTO u;
            INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                      usage_before, usage_after, actor, request_id)
            VALUES (p_user_id, p_feature, p_product_id, 'confirm', 0,
                    u.current_usage, u.current_usage, p_actor, p_request_id);
            RETURN QUERY SELECT 'confirmed'::text, u.tier, u.current_usage,
                                limit_in_force(u), u.pending_usage;
            RETURN;
        END IF;

        IF EXISTS (
            SELECT FROM slots AS s
             WHERE s.user_id = p_user_id AND s.feature_name = p_feature
               AND s.product_id = p_product_id
        ) THEN
            RETURN QUERY SELECT 'already_confirmed'::text, u.tier, u.current_usage,
                                limit_in_force(u), u.pending_usage;
            RETURN;
        END IF;
    END IF;

    RETURN QUERY
        SELECT CASE r.outcome WHEN 'reserved' THEN 're_reserved' ELSE r.outcome END,
               r.tier, r.current_usage, r.usage_limit, r.pending
          FROM usage_reserve(p_user_id, p_feature, p_product_id, 'confirm',
                             p_actor, p_request_id, NULL) AS r;
END
$$;

-- Reserves slots for many products at once, all or nothing. Returns one row:
--   outcome 'reserved', 'denied' or 'unknown_feature', the usage after the
--   call, the products reserved and those already held, and for a refusal how
--   many slots were asked for and how many were free.
--
-- The user's row is locked first; from then on no slot of this user changes
-- but through this call, so the products found free are still free when the
-- conditional UPDATE (the same atomic check as usage_reserve, for n slots at
-- once) takes them all or none.
CREATE FUNCTION usage_reserve_many(
    p_user_id     text,
    p_feature     text,
    p_product_ids text[],
    p_action      text,
    p_actor       text,
    p_request_id  text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint,
                 pending bigint, reserved text[], already_held text[],
                 requested bigint, available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u      user_tier_features;
    locked user_tier_features;
    v_new  text[];
    v_held text[];
    n      bigint;
BEGIN
    IF NOT usage_ensure_user(p_user_id, p_feature) THEN
        RETURN QUERY SELECT 'unknown_feature'::text, NULL::text, NULL::bigint, NULL::bigint,
                            NULL::bigint, NULL::text[], NULL::text[], NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    PERFORM usage_expire_holds(p_user_id, p_feature);

    SELECT t.* INTO locked FROM user_tier_features AS t
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       FOR UPDATE;
    u := locked;

    SELECT coalesce(array_agg(p.id ORDER BY p.id) FILTER (WHERE s.product_id IS NULL), '{}'),
           coalesce(array_agg(p.id ORDER BY p.id) FILTER (WHERE s.product_id IS NOT NULL), '{}')
      INTO v_new, v_held
      FROM (SELECT DISTINCT unnest(p_product_ids) AS id) AS p
      LEFT JOIN slots AS s
        ON s.user_id = p_user_id AND s.feature_name = p_feature AND s.product_id = p.id;
    n := cardinality(v_new);

    IF n > 0 THEN
        UPDATE user_tier_features AS t
           SET current_usage = t.current_usage + n, updated_at = now()
         WHERE t.user_id = p_user_id AND t.feature_name = p_feature
           AND (limit_in_force(t) IS NULL OR t.current_usage + n <= limit_in_force(t))
        RETURNING t.* INTO u;

        IF NOT FOUND THEN
            -- We hold the lock: the row read above is still the current one.
            u := locked;
            INSERT INTO usage_events (user_id, feature_name, action, delta, usage_before,
                                      usage_after, actor, request_id, reason)
            VALUES (p_user_id, p_feature, 'denied', 0, u.current_usage, u.current_usage,
                    p_actor, p_request_id, format('bulk of %s products', n));
            RETURN QUERY SELECT 'denied'::text, u.tier, u.current_usage, limit_in_force(u),
                                u.pending_usage, '{}'::text[], v_held, n,
                                greatest(limit_in_force(u) - u.current_usage, 0);
            RETURN;
        END IF;

        INSERT INTO slots (user_id, feature_name, product_id)
        SELECT p_user_id, p_feature, id FROM unnest(v_new) AS id;

        INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                  usage_before, usage_after, actor, request_id)
        SELECT p_user_id, p_feature, x.id, p_action, 1,
               u.current_usage - n + x.ord - 1, u.current_usage - n + x.ord,
               p_actor, p_request_id
          FROM unnest(v_new) WITH ORDINALITY AS x(id, ord)
         ORDER BY x.ord;
    END IF;

    RETURN QUERY SELECT 'reserved'::text, u.tier, u.current_usage, limit_in_force(u),
                        u.pending_usage, v_new, v_held, n, NULL::bigint;
END
$$;

-- Releases the slots of many products at once; never refused. Returns the
-- usage after the call, the products released and those that held no slot.
CREATE FUNCTION usage_release_many(
    p_user_id     text,
    p_feature     text,
    p_product_ids text[],
    p_actor       text,
    p_request_id  text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint,
                 pending bigint, released text[], not_held text[])
LANGUAGE plpgsql AS $$
DECLARE
    u          user_tier_features;
    v_released text[];
    v_pending  bigint;
    n          bigint;
BEGIN
    SELECT t.* INTO u FROM user_tier_features AS t
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       FOR UPDATE;

    IF FOUND THEN
        WITH gone AS (
            DELETE FROM slots AS s
             WHERE s.user_id = p_user_id AND s.feature_name = p_feature
               AND s.product_id = ANY (p_product_ids)
            RETURNING s.product_id, s.hold_expires_at
        )
        SELECT coalesce(array_agg(product_id ORDER BY product_id), '{}'),
               count(*) FILTER (WHERE hold_expires_at IS NOT NULL)
          INTO v_released, v_pending
          FROM gone;
        n := cardinality(v_released);

        IF n > 0 THEN
            UPDATE user_tier_features AS t
               SET current_usage = t.current_usage - n,
                   pending_usage = t.pending_usage - v_pending,
                   updated_at = now()
             WHERE t.user_id = p_user_id AND t.feature_name = p_feature
            RETURNING t.* INTO u;

            INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                      usage_before, usage_after, actor, request_id)
            SELECT p_user_id, p_feature, x.id, 'release', -1,
                   u.current_usage + n - x.ord + 1, u.current_usage + n - x.ord,
                   p_actor, p_request_id
              FROM unnest(v_released) WITH ORDINALITY AS x(id, ord)
             ORDER BY x.ord;
        END IF;

        RETURN QUERY SELECT 'released'::text, u.tier, u.current_usage, limit_in_force(u),
                            u.pending_usage, v_released,
                            ARRAY(SELECT DISTINCT id FROM unnest(p_product_ids) AS id
                                   WHERE id <> ALL (v_released) ORDER BY id);
        RETURN;
    END IF;

    RETURN QUERY
        SELECT 'released'::text, f.default_tier, 0::bigint, l.usage_limit, 0::bigint,
               '{}'::text[],
               ARRAY(SELECT DISTINCT id FROM unnest(p_product_ids) AS id ORDER BY id)
          FROM features AS f
          JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
         WHERE f.feature_name = p_feature;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_feature'::text, NULL::text, NULL::bigint, NULL::bigint,
                            NULL::bigint, NULL::text[], NULL::text[];
    END IF;
END
$$;
