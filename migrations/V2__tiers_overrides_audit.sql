-- Administration: tier changes, per-user limit overrides, tier limits as data,
-- and what the audit trail and the admin listings read through.
--
-- Every function below is called as one statement, so a call is one
-- transaction: a client that goes away mid-call never leaves one open.

-- A tier's limit changing concerns every user of the tier, including a tier
-- with no user yet; that change gets one tier-wide row with no user (and no
-- usage), naming the tier, besides one row per user whose stored limit moved.
ALTER TABLE usage_events
    ALTER COLUMN user_id DROP NOT NULL,
    ALTER COLUMN usage_before DROP NOT NULL,
    ALTER COLUMN usage_after DROP NOT NULL,
    ADD COLUMN tier text,
    ADD CONSTRAINT usage_events_tier_wide CHECK (
        CASE WHEN user_id IS NULL
             THEN action = 'tier_limit' AND tier IS NOT NULL AND delta = 0
                  AND usage_before IS NULL AND usage_after IS NULL
             ELSE usage_before IS NOT NULL AND usage_after IS NOT NULL
        END);

-- Refusals of a feature over a time window (the admin summary). Partial, so
-- that only refused calls pay for it, never a reservation. A user's history
-- is read through usage_events_user (V1); a feature-wide listing, newest
-- first, walks the primary key backwards.
CREATE INDEX usage_events_denied ON usage_events (feature_name, occurred_at)
    WHERE action = 'denied';

-- No index orders user_tier_features by current_usage: it would make every
-- Reserve and Release update an index entry (losing heap-only updates) to
-- speed up an admin listing, which sorts one feature's rows instead.

-- How a limit reads in the audit trail.
CREATE FUNCTION limit_text(l bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(l::text, 'unlimited')
$$;

-- How an override reads in the audit trail: its limit, and its expiry in UTC
-- when it has one.
CREATE FUNCTION override_text(l bigint, expires_at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT limit_text(l) || coalesce(
        ' until ' || to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        '')
$$;

-- The usage of a user as usage_reserve reports it, for answers that change
-- nothing: a user never seen is at the feature's default tier with nothing
-- held. No row means the feature does not exist.
CREATE FUNCTION usage_current(p_user_id text, p_feature text)
RETURNS TABLE (tier text, current_usage bigint, usage_limit bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(u.tier, f.default_tier), coalesce(u.current_usage, 0),
           CASE WHEN u.user_id IS NULL THEN l.usage_limit ELSE limit_in_force(u) END
      FROM features AS f
      JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
      LEFT JOIN user_tier_features AS u
        ON u.user_id = p_user_id AND u.feature_name = f.feature_name
     WHERE f.feature_name = p_feature
$$;

-- Creates a user's row at the feature's default tier if it has none, exactly
-- as a first Reserve does; writes no audit row, as nothing is held yet.
-- Takes ROW EXCLUSIVE on user_tier_features, which usage_set_tier_limit waits
-- for before it rewrites limits: a statement run after this one in the same
-- transaction reads the tier limits as they are once any such change has
-- committed.
CREATE FUNCTION usage_ensure_user(p_user_id text, p_feature text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
    SELECT p_user_id, f.feature_name, f.default_tier, l.usage_limit
      FROM features AS f
      JOIN tier_limits AS l ON l.tier = f.default_tier AND l.feature_name = f.feature_name
     WHERE f.feature_name = p_feature
    ON CONFLICT DO NOTHING
$$;

-- Moves a user to another tier. Returns one row:
--   outcome    'changed', 'unchanged', 'unknown_tier' or 'unknown_feature'
--   tier, current_usage, usage_limit (in force) after the call.
--
-- Nothing held is touched: a user above the new limit keeps its slots and is
-- refused until releases bring it below. The new tier's limit is copied onto
-- the row while the row lock is held (SELECT ... FOR UPDATE), so a racing
-- usage_reserve, whose conditional UPDATE waits for that lock and then
-- re-evaluates its WHERE clause on the new row, runs entirely before the
-- change (under the old limit) or entirely after it (under the new one).
-- The tier's limit is read after usage_ensure_user took ROW EXCLUSIVE on the
-- table, so a concurrent usage_set_tier_limit is either committed and seen,
-- or waits until this call commits and then rewrites this row too.
CREATE FUNCTION usage_set_tier(
    p_user_id    text,
    p_feature    text,
    p_tier       text,
    p_actor      text,
    p_request_id text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u         user_tier_features;
    old_tier  text;
    new_limit bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM features AS f WHERE f.feature_name = p_feature) THEN
        RETURN QUERY SELECT 'unknown_feature', NULL::text, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    -- Tiers are never deleted, so a tier seen here still exists below.
    IF NOT EXISTS (
        SELECT FROM tier_limits AS l WHERE l.tier = p_tier AND l.feature_name = p_feature
    ) THEN
        RETURN QUERY SELECT 'unknown_tier', c.tier, c.current_usage, c.usage_limit
                       FROM usage_current(p_user_id, p_feature) AS c;
        RETURN;
    END IF;

    PERFORM usage_ensure_user(p_user_id, p_feature);
    SELECT t.* INTO u FROM user_tier_features AS t
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       FOR UPDATE;
    IF u.tier = p_tier THEN
        RETURN QUERY SELECT 'unchanged', u.tier, u.current_usage, limit_in_force(u);
        RETURN;
    END IF;

    old_tier := u.tier;
    SELECT l.usage_limit INTO new_limit FROM tier_limits AS l
     WHERE l.tier = p_tier AND l.feature_name = p_feature;
    UPDATE user_tier_features AS t
       SET tier = p_tier, usage_limit = new_limit, updated_at = now()
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
    RETURNING t.* INTO u;

    INSERT INTO usage_events (user_id, feature_name, action, delta, usage_before,
                              usage_after, actor, request_id, old_value, new_value)
    VALUES (p_user_id, p_feature, 'set_tier', 0, u.current_usage, u.current_usage,
            p_actor, p_request_id, old_tier, p_tier);
    RETURN QUERY SELECT 'changed', u.tier, u.current_usage, limit_in_force(u);
END
$$;

-- Grants a user a limit of its own (NULL = unlimited) until p_expires_at
-- (NULL = until cleared). Returns one row:
--   outcome    'changed', 'unchanged' or 'unknown_feature'
--   tier, current_usage, usage_limit (in force) after the call.
--
-- The override is written under the user's row lock, like usage_set_tier, so
-- a racing Reserve sees either the old limit or the new one, never a mix. It
-- lives next to the tier, so tier changes leave it in place, and its expiry
-- needs no job: limit_in_force compares it with now() whenever it is read.
CREATE FUNCTION usage_set_override(
    p_user_id    text,
    p_feature    text,
    p_limit      bigint,
    p_expires_at timestamptz,
    p_reason     text,
    p_actor      text,
    p_request_id text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u        user_tier_features;
    in_force boolean;
    old_text text;
BEGIN
    IF NOT EXISTS (SELECT FROM features AS f WHERE f.feature_name = p_feature) THEN
        RETURN QUERY SELECT 'unknown_feature', NULL::text, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;

    PERFORM usage_ensure_user(p_user_id, p_feature);
    SELECT t.* INTO u FROM user_tier_features AS t
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       FOR UPDATE;
    in_force := u.override_active
        AND (u.override_expires_at IS NULL OR u.override_expires_at > now());
    IF in_force AND u.override_limit IS NOT DISTINCT FROM p_limit
       AND u.override_expires_at IS NOT DISTINCT FROM p_expires_at THEN
        RETURN QUERY SELECT 'unchanged', u.tier, u.current_usage, limit_in_force(u);
        RETURN;
    END IF;

    old_text := CASE WHEN u.override_active
                     THEN override_text(u.override_limit, u.override_expires_at) END;
    UPDATE user_tier_features AS t
       SET override_active = true, override_limit = p_limit,
           override_expires_at = p_expires_at, override_reason = p_reason,
           updated_at = now()
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
    RETURNING t.* INTO u;

    INSERT INTO usage_events (user_id, feature_name, action, delta, usage_before,
                              usage_after, actor, request_id, old_value, new_value,
                              reason, tier)
    VALUES (p_user_id, p_feature, 'override', 0, u.current_usage, u.current_usage,
            p_actor, p_request_id, old_text, override_text(p_limit, p_expires_at),
            p_reason, u.tier);
    RETURN QUERY SELECT 'changed', u.tier, u.current_usage, limit_in_force(u);
END
$$;

-- Removes a user's override (expired or not), so the tier's limit applies.
-- Returns one row:
--   outcome    'changed', 'unchanged' (there was none) or 'unknown_feature'
--   tier, current_usage, usage_limit (in force) after the call.
-- Under the row lock, for the reason given at usage_set_override. A user
-- never seen has no override: nothing is written for it.
CREATE FUNCTION usage_clear_override(
    p_user_id    text,
    p_feature    text,
    p_reason     text,
    p_actor      text,
    p_request_id text
) RETURNS TABLE (outcome text, tier text, current_usage bigint, usage_limit bigint)
LANGUAGE plpgsql AS $$
DECLARE
    u        user_tier_features;
    old_text text;
BEGIN
    SELECT t.* INTO u FROM user_tier_features AS t
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
       FOR UPDATE;
    IF NOT FOUND OR NOT u.override_active THEN
        RETURN QUERY SELECT 'unchanged', c.tier, c.current_usage, c.usage_limit
                       FROM usage_current(p_user_id, p_feature) AS c;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'unknown_feature', NULL::text, NULL::bigint, NULL::bigint;
        END IF;
        RETURN;
    END IF;

    old_text := override_text(u.override_limit, u.override_expires_at);
    UPDATE user_tier_features AS t
       SET override_active = false, override_limit = NULL,
           override_expires_at = NULL, override_reason = NULL, updated_at = now()
     WHERE t.user_id = p_user_id AND t.feature_name = p_feature
    RETURNING t.* INTO u;

    INSERT INTO usage_events (user_id, feature_name, action, delta, usage_before,
                              usage_after, actor, request_id, old_value, new_value,
                              reason, tier)
    VALUES (p_user_id, p_feature, 'override', 0, u.current_usage, u.current_usage,
            p_actor, p_request_id, old_text, NULL, p_reason, u.tier);
    RETURN QUERY SELECT 'changed', u.tier, u.current_usage, limit_in_force(u);
END
$$;

-- Sets a tier's limit (NULL = unlimited), creating the tier if it is new, and
-- copies it onto every row of that tier, in this one transaction. Returns one
-- row:
--   outcome        'changed', 'unchanged' or 'unknown_feature'
--   old_limit      the limit before (NULL also for a new tier: see existed)
--   existed        whether the tier existed before
--   users_updated  rows whose stored tier limit changed
--
-- Rows with an override are rewritten too: the override keeps deciding while
-- it is in force, and when it expires the tier's new limit must apply, not
-- the one copied before.
--
-- Why the table lock: a user's first Reserve inserts its row with the limit
-- it read from tier_limits. Without the lock, that insert could read the old
-- limit, this function could commit without seeing the uncommitted row, and
-- the row would keep the old limit for good. SHARE ROW EXCLUSIVE conflicts
-- with the ROW EXCLUSIVE every writer of user_tier_features holds until it
-- commits (Reserve, Release, SetTier, overrides), and with itself: the lock
-- is granted once every such writer has finished, and writers arriving later
-- wait until this commits, then read the new limit. Readers are not blocked.
-- The cost is a pause of all writes of the feature's users while the tier's
-- rows are rewritten, which an UPDATE of all of them would largely impose
-- anyway through the row locks.
CREATE FUNCTION usage_set_tier_limit(
    p_tier       text,
    p_feature    text,
    p_limit      bigint,
    p_reason     text,
    p_actor      text,
    p_request_id text
) RETURNS TABLE (outcome text, old_limit bigint, existed boolean, users_updated bigint)
LANGUAGE plpgsql AS $$
DECLARE
    previous bigint;
    found_it boolean;
    updated  bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM features AS f WHERE f.feature_name = p_feature) THEN
        RETURN QUERY SELECT 'unknown_feature', NULL::bigint, false, 0::bigint;
        RETURN;
    END IF;

    LOCK TABLE user_tier_features IN SHARE ROW EXCLUSIVE MODE;

    SELECT l.usage_limit INTO previous FROM tier_limits AS l
     WHERE l.tier = p_tier AND l.feature_name = p_feature;
    found_it := FOUND;
    IF found_it AND previous IS NOT DISTINCT FROM p_limit THEN
        RETURN QUERY SELECT 'unchanged', previous, true, 0::bigint;
        RETURN;
    END IF;

    INSERT INTO tier_limits AS l (tier, feature_name, usage_limit)
    VALUES (p_tier, p_feature, p_limit)
    ON CONFLICT (tier, feature_name)
    DO UPDATE SET usage_limit = EXCLUDED.usage_limit, updated_at = now();

    WITH changed AS (
        UPDATE user_tier_features AS t
           SET usage_limit = p_limit, updated_at = now()
         WHERE t.tier = p_tier AND t.feature_name = p_feature
           AND t.usage_limit IS DISTINCT FROM p_limit
        RETURNING t.user_id, t.current_usage
    )
    INSERT INTO usage_events (user_id, feature_name, action, delta, usage_before,
                              usage_after, actor, request_id, old_value, new_value,
                              reason, tier)
    SELECT c.user_id, p_feature, 'tier_limit', 0, c.current_usage, c.current_usage,
           p_actor, p_request_id, limit_text(previous), limit_text(p_limit),
           p_reason, p_tier
      FROM changed AS c;
    GET DIAGNOSTICS updated = ROW_COUNT;

    INSERT INTO usage_events (user_id, feature_name, action, delta, actor, request_id,
                              old_value, new_value, reason, tier)
    VALUES (NULL, p_feature, 'tier_limit', 0, p_actor, p_request_id,
            CASE WHEN found_it THEN limit_text(previous) END, limit_text(p_limit),
            p_reason, p_tier);
    RETURN QUERY SELECT 'changed', previous, found_it, updated;
END
$$;
