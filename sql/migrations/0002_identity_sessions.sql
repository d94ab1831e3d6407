-- Identity: citizen accounts (found by a keyed hash of the phone number), sessions of every role, and
-- rotating refresh tokens. Redis holds only what may be lost: SMS codes, limits and lockouts.

-- A citizen account, created at the first SMS login. The phone number is never stored in clear: the
-- HMAC-SHA-256 (ch_pii_hmac "phone") finds the account, the AES-256-GCM ciphertext (ch_pii_encrypt)
-- lets the owner see it masked. Real-name columns are added by 0003.
CREATE TABLE citizens (
    citizen_id    uuid        PRIMARY KEY,
    phone_hmac    bytea       NOT NULL UNIQUE CHECK (octet_length(phone_hmac) = 32),
    phone_enc     bytea       NOT NULL CHECK (octet_length(phone_enc) > 28), -- nonce(12) || ciphertext || tag(16)
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz NOT NULL DEFAULT now()
);

-- One login of any role (citizen, staff, kiosk, delegation, department client). A session ends at
-- expires_at (the absolute limit, fixed at login), when revoked (logout, deletion by its owner, reuse
-- of a spent refresh token, idle timeout), or when it was not refreshed for the idle limit: last_seen_at
-- moves at each refresh. The gateway refuses tokens of a revoked session at once (ch_auth_revoke);
-- revoked_at here is what survives restarts.
CREATE TABLE sessions (
    session_id     uuid        PRIMARY KEY,
    role           text        NOT NULL CHECK (role IN ('citizen', 'staff', 'kiosk', 'dept', 'admin')),
    subject        text        NOT NULL CHECK (length(subject) BETWEEN 1 AND 128), -- citizen id, staff id, ...
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    revoked_at     timestamptz,
    revoked_reason text        CHECK (revoked_reason ~ '^[a-z_]{1,32}$'),
    client         text        NOT NULL DEFAULT '' CHECK (length(client) <= 64), -- what logged in (user agent, kiosk)
    device         text,       -- the kiosk a citizen session is bound to
    actor          text,       -- the staff member acting for the citizen (delegation)
    dept           text,
    hall           text,
    CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL)),
    CHECK (expires_at > created_at)
);
-- GET /v1/me/sessions and "revoke every session of this account" look up the live sessions of a subject.
CREATE INDEX sessions_live_by_subject ON sessions (subject, created_at) WHERE revoked_at IS NULL;
-- The gateway loads revoked sessions that have not expired yet at start-up (ch_auth_init).
CREATE INDEX sessions_revoked_unexpired ON sessions (expires_at) WHERE revoked_at IS NOT NULL;

-- Refresh tokens are opaque random secrets; only their SHA-256 is stored. Each one is used once: a
-- refresh marks it spent and issues the next. A spent token presented again means it was copied, and
-- the whole session is revoked (identity_refresh_rotate below).
CREATE TABLE refresh_tokens (
    token_hash bytea       PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    session_id uuid        NOT NULL REFERENCES sessions ON DELETE CASCADE,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    spent_at   timestamptz
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

-- Rotates a refresh token in one statement (hence one transaction), deciding under row locks so that
-- two concurrent uses of one token count as a reuse:
--   'rotated'  the token was live and its session too: it is spent, p_new is issued, last_seen_at moves;
--   'reuse'    the token was already spent while its session was live: the session is revoked now;
--   'idle'     the session was not refreshed for p_idle_s seconds: revoked ('idle_timeout'), token spent;
--   'ended'    the session was already revoked or past its absolute limit;
--   'unknown'  no such token.
-- The session's fields come back for 'rotated' (to sign the new access token) and its id for 'reuse'
-- and 'idle' (to revoke its tokens in the gateways).
CREATE FUNCTION identity_refresh_rotate(p_old bytea, p_new bytea, p_idle_s integer)
RETURNS TABLE (outcome text, session_id uuid, role text, subject text, expires_at bigint, device text,
               actor text, dept text, hall text)
LANGUAGE plpgsql AS $$
DECLARE
    t refresh_tokens%ROWTYPE;
    s sessions%ROWTYPE;
BEGIN
    -- Lock order everywhere: the token, then its session (logout and deletion lock only the session).
    SELECT * INTO t FROM refresh_tokens r WHERE r.token_hash = p_old FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown';
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT * INTO s FROM sessions x WHERE x.session_id = t.session_id FOR UPDATE;
    session_id := s.session_id;
    IF s.revoked_at IS NOT NULL OR s.expires_at <= now() THEN
        outcome := 'ended';
    ELSIF t.spent_at IS NOT NULL THEN
        UPDATE sessions x SET revoked_at = now(), revoked_reason = 'refresh_reuse' WHERE x.session_id = s.session_id;
        outcome := 'reuse';
    ELSIF s.last_seen_at <= now() - make_interval(secs => p_idle_s) THEN
        UPDATE refresh_tokens r SET spent_at = now() WHERE r.token_hash = p_old;
        UPDATE sessions x SET revoked_at = now(), revoked_reason = 'idle_timeout' WHERE x.session_id = s.session_id;
        outcome := 'idle';
    ELSE
        UPDATE refresh_tokens r SET spent_at = now() WHERE r.token_hash = p_old;
        UPDATE sessions x SET last_seen_at = now() WHERE x.session_id = s.session_id;
        INSERT INTO refresh_tokens (token_hash, session_id) VALUES (p_new, s.session_id);
        outcome := 'rotated';
        role := s.role;
        subject := s.subject;
        expires_at := floor(extract(epoch FROM s.expires_at))::bigint;
        device := s.device;
        actor := s.actor;
        dept := s.dept;
        hall := s.hall;
    END IF;
    RETURN NEXT;
END
$$;
