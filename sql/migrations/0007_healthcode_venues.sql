-- Health code: venues (场所码) and the check-ins scanned at their doors, confirmed cases and the close contacts
-- their check-ins reveal, and appeals decided by two staff members (four-eyes). Runs after 0005 (health_codes,
-- test_results, contact_marks, health_overrides, the recompute queue), which this file writes into.

-- A venue registered by counter staff (or `cityhall seed`: created_by NULL). Its printed QR code is a signed
-- token (ES256, typ venue+jwt, the health-code keyring) naming venue_id, so an app can tell a forged venue code
-- offline; the token is made when the venue is created and is not stored.
CREATE TABLE venues (
    venue_id   uuid        PRIMARY KEY,
    name       text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    region     char(6)     NOT NULL CHECK (region ~ '^[1-8][0-9]{5}$'), -- GB/T 2260 division code
    address    text        NOT NULL CHECK (char_length(address) BETWEEN 1 AND 200),
    created_by uuid        REFERENCES staff_accounts (staff_id),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX venues_region ON venues (region);

-- One scan of a venue code: the write-heaviest table of the platform. Rows arrive in multi-row INSERTs, one
-- per group commit of a gateway thread (services/healthcode/venues.c). checkin_id is a time-ordered UUID
-- (version 7, made by the gateway), so the primary key grows at its right edge like the time indexes.
--
-- No foreign keys, on purpose: a foreign-key check takes a KEY SHARE lock on the parent row, and thousands of
-- concurrent scans at one busy venue would serialize on that row (MultiXacts). Venues and residents are never
-- deleted, and the handler checks that the venue exists before the row is queued.
--
-- Scale-out: the table grows without bound; the next step is declarative partitioning by range of `at`
-- (daily or weekly partitions, the primary key then (checkin_id, at)), old partitions detached after the
-- retention period (contact tracing looks back 14 days). Nothing here depends on the table being unpartitioned.
CREATE TABLE checkins (
    checkin_id  uuid        PRIMARY KEY,
    venue_id    uuid        NOT NULL,
    resident_id bigint      NOT NULL,   -- registry_residents.resident_id (the citizen or a dependent)
    at          timestamptz NOT NULL
);
-- The contact query: who was at venue V between t - T and t + T.
CREATE INDEX checkins_venue_at ON checkins (venue_id, at);
-- A confirmed case's own check-ins of the last 14 days.
CREATE INDEX checkins_resident_at ON checkins (resident_id, at);

-- A confirmed case reported by the health authority. Reporting the same case twice (same resident, same time)
-- records it once.
CREATE TABLE confirmed_cases (
    case_id      uuid        PRIMARY KEY,
    resident_id  bigint      NOT NULL REFERENCES registry_residents (resident_id),
    confirmed_at timestamptz NOT NULL,
    reported_by  text        NOT NULL,   -- the department client id
    contacts     integer     NOT NULL DEFAULT 0 CHECK (contacts >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (resident_id, confirmed_at)
);

-- The close contacts of a confirmed case: every other resident checked in at a venue where the case was
-- within p_window of one of the case's check-ins in the 14 days up to p_confirmed_at. One set-based query: the
-- case's check-ins by (resident_id, at), then, for each, the check-ins of that venue in the window by
-- (venue_id, at). A STABLE, non-strict SQL function of one SELECT is inlined into the statement that calls it,
-- so EXPLAIN of `SELECT * FROM hc_case_contacts(...)` shows the plan the gateway's statement runs.
CREATE FUNCTION hc_case_contacts(p_case bigint, p_confirmed_at timestamptz, p_window interval)
RETURNS TABLE (resident_id bigint, first_overlap timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT k.resident_id, min(k.at)
    FROM checkins c
    JOIN checkins k ON k.venue_id = c.venue_id AND k.at >= c.at - p_window AND k.at <= c.at + p_window
    WHERE c.resident_id = p_case
      AND c.at >= p_confirmed_at - interval '14 days' AND c.at <= p_confirmed_at
      AND k.resident_id <> p_case
    GROUP BY k.resident_id
$$;

-- An appeal of a code's color by a citizen (for themself or a dependent), decided by two staff members: one
-- proposes (approve with a color, or reject), a second one confirms or declines. Only a confirmed approval
-- changes a color, through a row of health_overrides written in the same transaction.
--   submitted --proposal--> proposed --confirmed--> approved | rejected
--                              \--declined--> submitted (the proposal is cleared; a new one may be made)
CREATE TABLE appeals (
    appeal_id       uuid        PRIMARY KEY,
    resident_id     bigint      NOT NULL REFERENCES registry_residents (resident_id),
    citizen_id      uuid        NOT NULL REFERENCES citizens (citizen_id), -- who filed it
    reason          text        NOT NULL CHECK (char_length(reason) BETWEEN 1 AND 1000),
    color_at_appeal text        NOT NULL CHECK (color_at_appeal IN ('green', 'yellow', 'red')),
    state           text        NOT NULL DEFAULT 'submitted'
                                CHECK (state IN ('submitted', 'proposed', 'approved', 'rejected')),
    created_at      timestamptz NOT NULL,
    proposed_by     uuid        REFERENCES staff_accounts (staff_id),
    proposed_decision text      CHECK (proposed_decision IN ('approve', 'reject')),
    proposed_color  text        CHECK (proposed_color IN ('green', 'yellow')),
    proposal_note   text        CHECK (char_length(proposal_note) <= 1000),
    proposed_at     timestamptz,
    decided_by      uuid        REFERENCES staff_accounts (staff_id),
    decision_note   text        CHECK (char_length(decision_note) <= 1000),
    decided_at      timestamptz,
    -- four-eyes, whatever the application does: the one who decides is not the one who proposed
    CHECK (decided_by <> proposed_by),
    CHECK ((state = 'submitted') = (proposed_by IS NULL)),
    CHECK ((proposed_by IS NULL) = (proposed_decision IS NULL) AND (proposed_by IS NULL) = (proposed_at IS NULL)),
    CHECK ((proposed_decision = 'approve') = (proposed_color IS NOT NULL)),
    CHECK ((state IN ('approved', 'rejected')) = (decided_by IS NOT NULL)),
    CHECK ((decided_by IS NULL) = (decided_at IS NULL)),
    CHECK (state <> 'approved' OR proposed_decision = 'approve'),
    CHECK (state <> 'rejected' OR proposed_decision = 'reject')
);
-- One open appeal per resident (a second one is 409 whatever the interleaving).
CREATE UNIQUE INDEX appeals_one_open ON appeals (resident_id) WHERE state IN ('submitted', 'proposed');
-- The staff queue: open appeals, oldest first.
CREATE INDEX appeals_open_queue ON appeals (created_at, appeal_id) WHERE state IN ('submitted', 'proposed');
-- A citizen's own appeals, and those about the resident bound to their account.
CREATE INDEX appeals_by_citizen ON appeals (citizen_id, created_at);
CREATE INDEX appeals_by_resident ON appeals (resident_id, created_at);

-- Records that staff saw or acted on an appeal, in the access log of the citizen who filed it and, when the
-- resident it is about has an account of their own, in that one too. Called in the statement that reads or
-- changes the appeal (so only when it did). Returns the number of entries written.
CREATE FUNCTION hc_appeal_audit(p_citizen uuid, p_resident bigint, p_role text, p_actor text, p_dept text,
                                p_behalf text, p_action text, p_purpose text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_own uuid;
BEGIN
    PERFORM access_log_append(p_citizen, p_role, p_actor, p_dept, p_behalf, p_action, p_purpose);
    SELECT citizen_id INTO v_own FROM citizens WHERE registry_id = p_resident;
    IF v_own IS NOT NULL AND v_own <> p_citizen THEN
        PERFORM access_log_append(v_own, p_role, p_actor, p_dept, p_behalf, p_action, p_purpose);
        RETURN 2;
    END IF;
    RETURN 1;
END
$$;

-- Records a confirmed case in one transaction: the case, a positive test result for it (what turns its code red),
-- a close-contact mark for every resident hc_case_contacts finds and a secondary mark for the residents who overlapped
-- with those contacts in the same way (contacts at one remove). The recompute of every code touched is queued in the
-- same transaction by 0005's triggers on test_results and contact_marks (hc_enqueue). The caller
-- counted the close contacts just before (its answer states that number, stored with its Idempotency-Key); if a
-- check-in committed in between, the count differs and the function fails with SQLSTATE CHRTY: the caller counts
-- again and retries. Reporting a case again (the same time, or a later confirmation of the same resident within the
-- look-back) marks nobody twice: a contact released from quarantine meanwhile does not turn red again for the same
-- overlaps. Returns the number of close contacts.
CREATE FUNCTION hc_confirmed_case_apply(p_case uuid, p_resident bigint, p_confirmed_at timestamptz,
                                        p_window interval, p_reported_by text, p_expected integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_case uuid;
    v_n    integer;
BEGIN
    INSERT INTO confirmed_cases (case_id, resident_id, confirmed_at, reported_by)
    VALUES (p_case, p_resident, p_confirmed_at, p_reported_by)
    ON CONFLICT (resident_id, confirmed_at) DO NOTHING
    RETURNING case_id INTO v_case;
    IF v_case IS NULL THEN
        SELECT case_id INTO v_case FROM confirmed_cases WHERE resident_id = p_resident AND confirmed_at = p_confirmed_at;
    ELSE
        INSERT INTO test_results (resident_id, sample_time, result, lab)
        VALUES (p_resident, p_confirmed_at, 'positive', left('confirmed-case.' || p_reported_by, 64));
    END IF;

    CREATE TEMP TABLE IF NOT EXISTS hc_case_close (resident_id bigint PRIMARY KEY) ON COMMIT DROP;
    TRUNCATE hc_case_close;
    INSERT INTO hc_case_close SELECT c.resident_id FROM hc_case_contacts(p_resident, p_confirmed_at, p_window) c;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n <> p_expected THEN
        RAISE EXCEPTION 'the close contacts changed while the case was recorded' USING ERRCODE = 'CHRTY';
    END IF;

    INSERT INTO contact_marks (resident_id, kind, source_case, marked_at)
    SELECT c.resident_id, 'close', v_case::text, now() FROM hc_case_close c
    WHERE NOT EXISTS (SELECT 1 FROM contact_marks m JOIN confirmed_cases k ON m.source_case = k.case_id::text
                      WHERE k.resident_id = p_resident AND m.resident_id = c.resident_id AND m.kind = 'close'
                        AND m.marked_at > p_confirmed_at - interval '14 days');
    -- one remove: who overlapped with a close contact, except the case and the close contacts themselves
    INSERT INTO contact_marks (resident_id, kind, source_case, marked_at)
    SELECT DISTINCT s.resident_id, 'secondary', v_case::text, now()
    FROM hc_case_close c, LATERAL hc_case_contacts(c.resident_id, p_confirmed_at, p_window) s
    WHERE s.resident_id <> p_resident
      AND NOT EXISTS (SELECT 1 FROM hc_case_close x WHERE x.resident_id = s.resident_id)
      AND NOT EXISTS (SELECT 1 FROM contact_marks m JOIN confirmed_cases k ON m.source_case = k.case_id::text
                      WHERE k.resident_id = p_resident AND m.resident_id = s.resident_id
                        AND m.marked_at > p_confirmed_at - interval '14 days');

    UPDATE confirmed_cases SET contacts = v_n WHERE case_id = v_case;
    RETURN v_n;
END
$$;
