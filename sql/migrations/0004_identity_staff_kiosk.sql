-- Identity: counter staff accounts, delegations (staff acting for a present citizen), department clients,
-- self-service kiosks and the nonces of their attestations. Runs after 0002 (citizens, sessions) and 0003.

-- A counter staff member (or platform administrator), created by `cityhall staff add`. The password is
-- kept as a libsodium argon2id string (crypto_pwhash_str); the TOTP secret (20 random bytes) AES-256-GCM
-- encrypted with the data key (ch_pii_encrypt). A TOTP code is single use: a login is accepted only with
-- a code of a time step after totp_last_step. Five consecutive failures lock the account for 15 minutes.
CREATE TABLE staff_accounts (
    staff_id        uuid        PRIMARY KEY,
    username        text        NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9][a-z0-9._-]{1,63}$'),
    password_hash   text        NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    totp_secret_enc bytea       NOT NULL CHECK (octet_length(totp_secret_enc) > 28), -- nonce || ciphertext || tag
    totp_last_step  bigint      NOT NULL DEFAULT 0,  -- the 30 s time step of the last accepted code
    dept            text        NOT NULL CHECK (dept ~ '^[a-z0-9][a-z0-9-]{0,63}$'),
    hall            text        NOT NULL CHECK (hall ~ '^[a-z0-9][a-z0-9-]{0,63}$'),
    roles           text[]      NOT NULL CHECK (cardinality(roles) >= 1 AND roles <@ ARRAY['staff', 'admin']),
    failed_logins   integer     NOT NULL DEFAULT 0 CHECK (failed_logins >= 0),
    locked_until    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    disabled_at     timestamptz
);

-- One delegation (帮办代办): a staff member opened a short citizen session for a citizen present at the
-- counter (ID card read + name matched the registry). The session (role citizen, actor = staff_id) is
-- written in the same transaction, and so is the "delegation.open" entry of the citizen's access log.
-- No foreign key to sessions: sessions may be purged one day, the record of the delegation stays.
CREATE TABLE delegations (
    delegation_id uuid        PRIMARY KEY,
    staff_id      uuid        NOT NULL REFERENCES staff_accounts,
    citizen_id    uuid        NOT NULL REFERENCES citizens,
    purpose       text        NOT NULL CHECK (length(purpose) BETWEEN 1 AND 200),
    opened_at     timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL CHECK (expires_at > opened_at),
    session_id    uuid        NOT NULL UNIQUE
);
CREATE INDEX delegations_by_citizen ON delegations (citizen_id, opened_at);
CREATE INDEX delegations_by_staff ON delegations (staff_id, opened_at);

-- A department system or the health authority (client credentials grant). The secret is 32 random
-- bytes, so its SHA-256 (hex) is enough: there is nothing to brute-force that a slow hash would protect.
CREATE TABLE dept_clients (
    client_id   text        PRIMARY KEY CHECK (client_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    dept        text        NOT NULL CHECK (dept ~ '^[a-z0-9][a-z0-9-]{0,63}$'),
    secret_hash text        NOT NULL CHECK (secret_hash ~ '^[0-9a-f]{64}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

-- A registered self-service kiosk and its P-256 public key (SubjectPublicKeyInfo PEM). The device signs
-- each attestation (ID card read + face-match score + nonce + time) with the private key it holds.
CREATE TABLE kiosks (
    device_id      text        PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    hall           text        NOT NULL CHECK (hall ~ '^[a-z0-9][a-z0-9-]{0,63}$'),
    public_key_pem text        NOT NULL CHECK (public_key_pem LIKE '-----BEGIN PUBLIC KEY-----%'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    disabled_at    timestamptz
);

-- Nonces of accepted attestations, inserted in the transaction that opens the kiosk session, so a replay
-- is refused even after Redis lost everything. An attestation is accepted only within 120 s of its own
-- time, so nonces older than that can go: the kiosk handler deletes a device's nonces older than an hour.
CREATE TABLE kiosk_nonces (
    device_id text        NOT NULL REFERENCES kiosks,
    nonce     text        NOT NULL CHECK (length(nonce) BETWEEN 16 AND 64),
    used_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, nonce)
);
