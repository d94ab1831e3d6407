-- Identity: the population registry (户籍) merged into the platform, real-name binding of citizen accounts,
-- dependents (children under 14, elderly parents), and the citizen-visible, hash-chained access log.
--
-- Personal data: no column holds a raw ID number or phone number. An ID number is stored AES-256-GCM
-- encrypted (id_enc: nonce || ciphertext || tag, key in <var>/keys/data.key, outside the database) next to
-- its keyed hash (id_hmac = HMAC-SHA-256 over "id" || 0x00 || number), which is what look-ups use, and its
-- masked form for display (4401**********123X). A registry phone number is kept only as its keyed hash.

CREATE TABLE registry_residents (
    resident_id  bigserial   PRIMARY KEY,
    id_hmac      bytea       NOT NULL UNIQUE CHECK (octet_length(id_hmac) = 32),
    id_enc       bytea       NOT NULL,
    id_masked    text        NOT NULL,
    name         text        NOT NULL CHECK (name <> '' AND octet_length(name) <= 64),
    sex          char(1)     CHECK (sex IN ('M', 'F')),
    birth_date   date,
    region       char(6),                -- the administrative division code (GB/T 2260), e.g. 440106
    address      text,
    household_id text,                   -- 户号: residents of one household share it
    phone_hmac   bytea       CHECK (phone_hmac IS NULL OR octet_length(phone_hmac) = 32),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX registry_residents_phone ON registry_residents (phone_hmac) WHERE phone_hmac IS NOT NULL;
CREATE INDEX registry_residents_household ON registry_residents (household_id) WHERE household_id IS NOT NULL;

-- Real-name binding: one registry resident to at most one account (the UNIQUE constraint is what makes a
-- second account's bind fail with 409, whatever the interleaving), set together with the time it was verified.
ALTER TABLE citizens
    ADD COLUMN registry_id bigint UNIQUE REFERENCES registry_residents (resident_id),
    ADD COLUMN real_name_verified_at timestamptz,
    ADD CONSTRAINT citizens_real_name_both CHECK ((registry_id IS NULL) = (real_name_verified_at IS NULL));

-- People a citizen may act for in the health-code and one-thing modules.
CREATE TABLE dependents (
    guardian_id uuid        NOT NULL REFERENCES citizens (citizen_id) ON DELETE CASCADE,
    resident_id bigint      NOT NULL REFERENCES registry_residents (resident_id),
    relation    text        NOT NULL CHECK (relation IN ('child', 'parent')),
    added_at    timestamptz NOT NULL,
    PRIMARY KEY (guardian_id, resident_id)
);
CREATE INDEX dependents_resident ON dependents (resident_id);

-- Adds a dependent after the handler checked the registry match and the age rules; re-checks, under a lock
-- on the guardian's row, what concurrent requests could break: the guardian is still verified, the pair is
-- new, and the guardian has fewer than p_max dependents. Errors (the transaction, and with it the
-- Idempotency-Key claim, then rolls back): CH422 not verified, CH409 already a dependent, CH4MX limit reached.
CREATE FUNCTION identity_dependent_add(p_guardian uuid, p_resident bigint, p_relation text, p_added_at timestamptz,
                                       p_max integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM 1 FROM citizens WHERE citizen_id = p_guardian AND registry_id IS NOT NULL FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the guardian has no verified real name' USING ERRCODE = 'CH422';
    END IF;
    -- A VOLATILE function takes a fresh snapshot per statement: what follows sees every add committed
    -- before the lock above was granted.
    IF EXISTS (SELECT 1 FROM dependents WHERE guardian_id = p_guardian AND resident_id = p_resident) THEN
        RAISE EXCEPTION 'already a dependent' USING ERRCODE = 'CH409';
    END IF;
    SELECT count(*) INTO n FROM dependents WHERE guardian_id = p_guardian;
    IF n >= p_max THEN
        RAISE EXCEPTION 'too many dependents' USING ERRCODE = 'CH4MX';
    END IF;
    INSERT INTO dependents (guardian_id, resident_id, relation, added_at)
    VALUES (p_guardian, p_resident, p_relation, p_added_at);
END
$$;

-- The access log: every read of a citizen's data by staff, kiosk or department, shown to the citizen.
-- Each citizen's entries form a hash chain: hash = sha256(prev_hash || canonical text of the row), where
-- prev_hash is the hash of the citizen's previous entry (NULL for the first). Editing, deleting or
-- reordering an entry breaks the chain at that entry (`cityhall audit verify`); truncating the newest
-- entries is not detectable from the table alone (anchoring chain heads elsewhere is future work).
-- The table grows without bound: partitioning by `at` (monthly) is the planned next step, with the
-- primary key then becoming (entry_id, at); nothing here depends on the table being unpartitioned.
CREATE TABLE access_log (
    entry_id     bigserial   PRIMARY KEY,
    citizen_id   uuid        NOT NULL,   -- no foreign key: the log outlives accounts and must never block them
    at           timestamptz NOT NULL,
    actor_role   text        NOT NULL,   -- staff, kiosk, dept, admin (citizen for its own delegated sessions)
    actor        text        NOT NULL,   -- staff id, kiosk device id, department client id
    actor_dept   text,
    on_behalf_of text,                   -- the citizen a delegated or kiosk session was acting for
    action       text        NOT NULL,   -- "registry.read", "delegation.open", ...
    purpose      text        NOT NULL,
    prev_hash    bytea,
    hash         bytea       NOT NULL
);
CREATE INDEX access_log_citizen ON access_log (citizen_id, entry_id);

-- One field of the canonical text: '-' for NULL, else <octet length>:<value>, so that no two different rows
-- (moving characters between fields included) share a canonical text. gateway/audit.c re-implements this
-- byte for byte for `cityhall audit verify`.
CREATE FUNCTION access_log_field(v text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN v IS NULL THEN '-' ELSE octet_length(v)::text || ':' || v END
$$;

-- The canonical text of an entry: a version tag and a newline, then entry id, citizen id, time in integer microseconds
-- since the epoch, actor role, actor, department, on-behalf-of, action and purpose.
CREATE FUNCTION access_log_canonical(p_entry_id bigint, p_citizen_id uuid, p_at timestamptz, p_actor_role text,
                                     p_actor text, p_actor_dept text, p_on_behalf_of text, p_action text,
                                     p_purpose text) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT convert_to('cityhall.access_log.v1' || chr(10)
                      || access_log_field(p_entry_id::text)
                      || access_log_field(p_citizen_id::text)
                      || access_log_field(((extract(epoch FROM p_at) * 1000000)::bigint)::text)
                      || access_log_field(p_actor_role)
                      || access_log_field(p_actor)
                      || access_log_field(p_actor_dept)
                      || access_log_field(p_on_behalf_of)
                      || access_log_field(p_action)
                      || access_log_field(p_purpose), 'UTF8')
$$;

-- Appends one entry to a citizen's chain; called in the transaction of the read it records.
-- Concurrent appends for one citizen are serialized by a transaction-scoped advisory lock. The previous
-- hash is read only after the lock is granted, by a statement of its own: a VOLATILE function takes a
-- fresh snapshot per statement (READ COMMITTED), so it sees the entry of whoever held the lock before
-- (a single SQL statement would read with the snapshot of its start and could fork the chain).
CREATE FUNCTION access_log_append(p_citizen_id uuid, p_actor_role text, p_actor text, p_actor_dept text,
                                  p_on_behalf_of text, p_action text, p_purpose text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_prev bytea;
    v_id   bigint;
    v_at   timestamptz := now();
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_citizen_id::text, 0));
    SELECT hash INTO v_prev FROM access_log WHERE citizen_id = p_citizen_id ORDER BY entry_id DESC LIMIT 1;
    v_id := nextval('access_log_entry_id_seq');
    INSERT INTO access_log (entry_id, citizen_id, at, actor_role, actor, actor_dept, on_behalf_of, action, purpose,
                            prev_hash, hash)
    VALUES (v_id, p_citizen_id, v_at, p_actor_role, p_actor, p_actor_dept, p_on_behalf_of, p_action, p_purpose, v_prev,
            sha256(coalesce(v_prev, ''::bytea)
                   || access_log_canonical(v_id, p_citizen_id, v_at, p_actor_role, p_actor, p_actor_dept,
                                           p_on_behalf_of, p_action, p_purpose)));
    RETURN v_id;
END
$$;
