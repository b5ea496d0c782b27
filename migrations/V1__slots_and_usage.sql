-- The counters, the slot ledger and the audit trail.
--
-- Invariant kept by every function below, per (user_id, feature_name):
--   user_tier_features.current_usage = number of rows in slots
--                                    = sum of usage_events.delta
-- Every change of a user's slots happens while that transaction holds the lock
-- on the user's user_tier_features row, so changes of one user are serialised
-- and changes of different users never wait for each other.

-- What can be counted, and the tier a user starts at the first time it is seen.
CREATE TABLE features (
    feature_name text PRIMARY KEY,
    default_tier text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The limit of each tier for each feature. A tier is data: adding a row adds a
-- tier, no code change needed. NULL usage_limit means unlimited.
CREATE TABLE tier_limits (
    tier         text NOT NULL,
    feature_name text NOT NULL REFERENCES features,
    usage_limit  bigint CHECK (usage_limit >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tier, feature_name)
);

INSERT INTO features (feature_name, default_tier) VALUES ('product_slot', 'free');
INSERT INTO tier_limits (tier, feature_name, usage_limit) VALUES
    ('free', 'product_slot', 50),
    ('premium', 'product_slot', NULL);

ALTER TABLE features
    ADD FOREIGN KEY (default_tier, feature_name) REFERENCES tier_limits (tier, feature_name);

-- One row per user and feature: the counter and what limits it.
--
-- usage_limit is the tier's limit, copied here so that the Reserve check reads
-- only this row: everything the check depends on is under the row lock the
-- conditional UPDATE takes, so a concurrent tier or limit change is either
-- entirely before or entirely after it.
--
-- An override, while active and unexpired, replaces usage_limit (NULL
-- override_limit meaning unlimited). Expiry needs no job: the limit in force is
-- computed at the instant a statement runs (limit_in_force below).
CREATE TABLE user_tier_features (
    user_id             text        NOT NULL,
    feature_name        text        NOT NULL,
    tier                text        NOT NULL,
    current_usage       bigint      NOT NULL DEFAULT 0 CHECK (current_usage >= 0),
    usage_limit         bigint      CHECK (usage_limit >= 0),
    override_active     boolean     NOT NULL DEFAULT false,
    override_limit      bigint      CHECK (override_limit >= 0),
    override_expires_at timestamptz,
    override_reason     text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, feature_name),
    FOREIGN KEY (tier, feature_name) REFERENCES tier_limits (tier, feature_name)
);

-- ListAll walks one feature in user_id order.
CREATE INDEX user_tier_features_feature_user ON user_tier_features (feature_name, user_id);

-- The ledger: which products hold a slot. Its primary key is what makes a
-- retried Reserve or Release a no-op.
CREATE TABLE slots (
    user_id      text        NOT NULL,
    feature_name text        NOT NULL,
    product_id   text        NOT NULL,
    reserved_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, feature_name, product_id),
    FOREIGN KEY (user_id, feature_name) REFERENCES user_tier_features (user_id, feature_name)
);

-- Append-only audit trail: one row per change of usage, written in the same
-- transaction as the change, plus one per refusal (delta 0) and per
-- administrative change. The service never updates or deletes these rows.
CREATE TABLE usage_events (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    user_id      text        NOT NULL,
    feature_name text        NOT NULL,
    product_id   text,
    action       text        NOT NULL CHECK (action IN (
        'reserve', 'restore', 'release', 'denied', 'set_tier', 'override',
        'tier_limit', 'reconcile', 'backfill')),
    delta        bigint      NOT NULL,
    usage_before bigint      NOT NULL,
    usage_after  bigint      NOT NULL CHECK (usage_after = usage_before + delta),
    actor        text,
    request_id   text,
    old_value    text,
    new_value    text,
    reason       text
);

-- A user's history, newest first.
CREATE INDEX usage_events_user ON usage_events (user_id, feature_name, id);

-- The limit in force for a user row at this instant: an active, unexpired
-- override wins over the tier's limit. NULL means unlimited.
CREATE FUNCTION limit_in_force(u user_tier_features) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN u.override_active
             AND (u.override_expires_at IS NULL OR u.override_expires_at > now())
        THEN u.override_limit
        ELSE u.usage_limit
    END
$$;

-- Takes a slot for a product. Returns one row:
--   outcome    'reserved', 'already_held', 'denied' or 'unknown_feature'
--   tier, current_usage, usage_limit (in force; NULL = unlimited) after the call.
--
-- Why it is correct when many calls race on one user:
--
-- * The limit is enforced by one conditional UPDATE (step 1). PostgreSQL takes
--   the row lock, and if another transaction changed the row meanwhile it
--   re-evaluates the WHERE clause against the newest committed version, so two
--   calls can never both see the 50th slot as free. A call that gets the lock
--   holds it until commit; every other change of this user's slots waits.
-- * The slot row is inserted only while the row lock is held (step 2), so the
--   ledger and the counter change together. Its primary key decides a race
--   between two calls for the same product: the second finds the conflict and
--   gives back the increment it made, within its own uncommitted transaction,
--   so nobody ever sees it.
-- * Steps 3 and 4 run without the lock, but each statement of a PL/pgSQL
--   function sees everything committed before it starts; a refusal is reported
--   only after a fresh read confirms the user is at its limit.
--
-- A function rather than one SQL statement: a single statement reads the whole
-- ledger through one snapshot taken before it waited for the row lock, so it
-- could miss a slot that a racing call for the same product committed
-- meanwhile, and count that product twice.
CREATE FUNCTION usage_reserve(
    p_user_id    text,
    p_feature    text,
    p_product_id text,
    p_action     text,
    p_actor      text,
    p_request_id text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u user_tier_features;
BEGIN
    FOR attempt IN 1..3 LOOP
        -- 1. The atomic limit check: count the slot only if the limit allows.
        UPDATE user_tier_features AS t
           SET current_usage = t.current_usage + 1, updated_at = now()
         WHERE t.user_id = p_user_id AND t.feature_name = p_feature
           AND (limit_in_force(t) IS NULL OR t.current_usage < limit_in_force(t))
        RETURNING t.* INTO u;

        IF FOUND THEN
            -- 2. Under the row lock: record which product holds the slot.
            INSERT INTO slots (user_id, feature_name, product_id)
            VALUES (p_user_id, p_feature, p_product_id)
            ON CONFLICT DO NOTHING;

            IF NOT FOUND THEN
                UPDATE user_tier_features AS t
                   SET current_usage = t.current_usage - 1
                 WHERE t.user_id = p_user_id AND t.feature_name = p_feature
                RETURNING t.* INTO u;
                RETURN QUERY SELECT 'already_held', u.tier, u.current_usage, limit_in_force(u);
                RETURN;
            END IF;

            INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                      usage_before, usage_after, actor, request_id)
            VALUES (p_user_id, p_feature, p_product_id, p_action, 1,
                    u.current_usage - 1, u.current_usage, p_actor, p_request_id);
            RETURN QUERY SELECT 'reserved', u.tier, u.current_usage, limit_in_force(u);
            RETURN;
        END IF;

        -- 3. No row counted the slot: a new user, a product already held by a
        -- user at its limit, or a user at its limit.
        SELECT t.* INTO u FROM user_tier_features AS t
         WHERE t.user_id = p_user_id AND t.feature_name = p_feature;

        IF NOT FOUND THEN
            INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
            SELECT p_user_id, f.feature_name, f.default_tier, l.usage_limit
              FROM features AS f
              JOIN tier_limits AS l
                ON l.tier = f.default_tier AND l.feature_name = f.feature_name
             WHERE f.feature_name = p_feature
            ON CONFLICT DO NOTHING;
            IF NOT FOUND AND NOT EXISTS (
                SELECT FROM features AS f WHERE f.feature_name = p_feature
            ) THEN
                RETURN QUERY SELECT 'unknown_feature', NULL::text, NULL::bigint, NULL::bigint;
                RETURN;
            END IF;
            CONTINUE;
        END IF;

        IF EXISTS (
            SELECT FROM slots AS s
             WHERE s.user_id = p_user_id AND s.feature_name = p_feature
               AND s.product_id = p_product_id
        ) THEN
            RETURN QUERY SELECT 'already_held', u.tier, u.current_usage, limit_in_force(u);
            RETURN;
        END IF;

        -- 4. A release may have freed a slot since step 1: try again.
        CONTINUE WHEN limit_in_force(u) IS NULL OR u.current_usage < limit_in_force(u);

        INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                  usage_before, usage_after, actor, request_id)
        VALUES (p_user_id, p_feature, p_product_id, 'denied', 0,
                u.current_usage, u.current_usage, p_actor, p_request_id);
        RETURN QUERY SELECT 'denied', u.tier, u.current_usage, limit_in_force(u);
        RETURN;
    END LOOP;

    -- Three rounds of releases racing the check: report the user as full.
    RETURN QUERY SELECT 'denied', u.tier, u.current_usage, limit_in_force(u);
END
$$;

-- Frees the slot a product holds. Returns one row:
--   outcome    'released', 'not_held' or 'unknown_feature'
--   tier, current_usage, usage_limit after the call.
--
-- Like usage_reserve it takes the user's row lock first (by decrementing), so
-- both functions lock in the same order (user row, then slot) and cannot
-- deadlock each other. The DELETE of the slot decides a race between two
-- releases of the same product: the second deletes nothing and gives back its
-- decrement inside its own uncommitted transaction.
CREATE FUNCTION usage_release(
    p_user_id    text,
    p_feature    text,
    p_product_id text,
    p_actor      text,
    p_request_id text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u user_tier_features;
BEGIN
    UPDATE user_tier_features AS t
       SET current_usage = t.current_usage - 1, updated_at = now()
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       AND t.current_usage > 0
    RETURNING t.* INTO u;

    IF FOUND THEN
        DELETE FROM slots AS s
         WHERE s.user_id = p_user_id AND s.feature_name = p_feature
           AND s.product_id = p_product_id;

        IF FOUND THEN
            INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                      usage_before, usage_after, actor, request_id)
            VALUES (p_user_id, p_feature, p_product_id, 'release', -1,
                    u.current_usage + 1, u.current_usage, p_actor, p_request_id);
            RETURN QUERY SELECT 'released', u.tier, u.current_usage, limit_in_force(u);
            RETURN;
        END IF;

        UPDATE user_tier_features AS t
           SET current_usage = t.current_usage + 1
         WHERE t.user_id = p_user_id AND t.feature_name = p_feature
        RETURNING t.* INTO u;
        RETURN QUERY SELECT 'not_held', u.tier, u.current_usage, limit_in_force(u);
        RETURN;
    END IF;

    -- No slot counted: answer with the current usage (or the default tier's
    -- for a user never seen), writing nothing.
    RETURN QUERY
        SELECT 'not_held', coalesce(t.tier, f.default_tier), coalesce(t.current_usage, 0),
               CASE WHEN t.user_id IS NULL THEN l.usage_limit ELSE limit_in_force(t) END
          FROM features AS f
          JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
          LEFT JOIN user_tier_features AS t
            ON t.user_id = p_user_id AND t.feature_name = f.feature_name
         WHERE f.feature_name = p_feature;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_feature', NULL::text, NULL::bigint, NULL::bigint;
    END IF;
END
$$;
