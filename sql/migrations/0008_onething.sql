-- One-thing applications (一件事): the versioned catalog, the department datasets the form is prefilled from,
-- applications and their items, the outbox the dispatcher drains, notifications and e-licences.
--
-- Split with 0009_onething_dispatch.sql (which runs after this file): 0009 owns the working-day calendar
-- (holidays, makeup_workdays, ot_is_working_day, ot_add_working_days, used by the submission's statements at
-- run time), dept_endpoints, callbacks_seen, item_events, escalations, and the indexes the dispatcher and the
-- staff queue read: outbox (next_attempt_at) WHERE state = 'pending', outbox (item_id), application_items
-- (department, state). They are not created here. The gateway's statements also write 0009's item_events (an
-- item's history) and access_log_pending (access-log entries appended to the chains asynchronously).
--
-- Personal data: no column holds a raw ID number. Datasets identify people by the keyed hash of their ID
-- number (ch_pii_hmac "id", the registry's id_hmac), so they join the registry without decrypting anything.
-- An application's form values (they contain ID numbers) are one JSON object {"<field name>": "<value>"}
-- sealed with ch_pii_encrypt (fields_enc: nonce || ciphertext || tag).

-- ---- the catalog ----

-- One version of the whole catalog (items, bundles with their dependency graph and unified form), as loaded by
-- `cityhall catalog load FILE.json` (services/onething/catalog/catalog-v1.json is version 1, inserted below).
-- A load inserts the next version and makes it the active one; an application records the version it was
-- submitted under and is always read against it. The JSON shape (checked by catalog.c before any insert):
--   {"departments": [{"code", "name"}],
--    "items": [{"code", "name", "department", "legal_days", "promised_days", "materials": [...]}],
--    "bundles": [{"code", "name", "description", "precheck", "consent_text",
--                 "items": [{"code", "depends_on": [item codes]}],
--                 "form": [{"name", "label", "type", "required", "options", "prefill": [fact keys],
--                           "items": [item codes using the field], constraints...}]}]}
CREATE TABLE catalog_versions (
    version   integer     PRIMARY KEY CHECK (version >= 1),
    catalog   jsonb       NOT NULL CHECK (jsonb_typeof(catalog -> 'items') = 'array'
                                          AND jsonb_typeof(catalog -> 'bundles') = 'array'),
    active    boolean     NOT NULL DEFAULT false,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    source    text        NOT NULL DEFAULT ''  -- the file it was loaded from
);
-- At most one active version; a load switches it in one transaction.
CREATE UNIQUE INDEX catalog_versions_active ON catalog_versions (active) WHERE active;

-- ---- department datasets (the merged data silos), keyed by ID-number hashes ----
-- Filled by `cityhall seed` (consistently with the synthetic registry) and `cityhall import dataset NAME FILE.csv`.
-- as_of: when the source system last vouched for the row (shown with every prefilled value).

-- Birth medical certificates (出生医学证明) as hospitals report them. The child has no ID number yet when the
-- hospital reports; child_id_hmac is filled once the birth is registered (synthetic data: always).
CREATE TABLE birth_records (
    cert_no          text        PRIMARY KEY CHECK (cert_no ~ '^[A-Z][0-9]{9}$'),
    child_name       text        NOT NULL CHECK (child_name <> '' AND octet_length(child_name) <= 64),
    child_sex        char(1)     NOT NULL CHECK (child_sex IN ('M', 'F')),
    child_birth_date date        NOT NULL,
    hospital         text        NOT NULL CHECK (hospital <> '' AND octet_length(hospital) <= 200),
    mother_id_hmac   bytea       NOT NULL CHECK (octet_length(mother_id_hmac) = 32),
    father_id_hmac   bytea       CHECK (octet_length(father_id_hmac) = 32),
    child_id_hmac    bytea       CHECK (octet_length(child_id_hmac) = 32),
    as_of            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX birth_records_mother ON birth_records (mother_id_hmac, child_birth_date DESC);
CREATE INDEX birth_records_father ON birth_records (father_id_hmac, child_birth_date DESC)
    WHERE father_id_hmac IS NOT NULL;
CREATE UNIQUE INDEX birth_records_child ON birth_records (child_id_hmac) WHERE child_id_hmac IS NOT NULL;

-- The marriage registry (婚姻登记). A dissolved marriage keeps its row with dissolved_on set.
CREATE TABLE marriages (
    cert_no         text        PRIMARY KEY CHECK (cert_no ~ '^[A-Za-z0-9-]{4,40}$'),
    husband_id_hmac bytea       NOT NULL CHECK (octet_length(husband_id_hmac) = 32),
    wife_id_hmac    bytea       NOT NULL CHECK (octet_length(wife_id_hmac) = 32),
    registered_on   date        NOT NULL,
    dissolved_on    date        CHECK (dissolved_on IS NULL OR dissolved_on >= registered_on),
    as_of           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX marriages_husband ON marriages (husband_id_hmac);
CREATE INDEX marriages_wife ON marriages (wife_id_hmac);

-- Social insurance (社会保险): one row per insured person, their current employer and status.
CREATE TABLE social_insurance (
    id_hmac       bytea       PRIMARY KEY CHECK (octet_length(id_hmac) = 32),
    employer      text        NOT NULL CHECK (octet_length(employer) <= 200), -- '' for flexible employment
    insured_since date        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('active', 'suspended', 'retired')),
    as_of         timestamptz NOT NULL DEFAULT now()
);

-- The business registry (市场主体登记): USCC (GB 32100, check character verified by the importer), legal
-- representative by ID-number hash.
CREATE TABLE businesses (
    uscc              text        PRIMARY KEY CHECK (uscc ~ '^[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}$'),
    name              text        NOT NULL CHECK (name <> '' AND octet_length(name) <= 200),
    legal_rep_id_hmac bytea       NOT NULL CHECK (octet_length(legal_rep_id_hmac) = 32),
    registered_on     date        NOT NULL,
    address           text        NOT NULL CHECK (octet_length(address) <= 200),
    status            text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deregistered')),
    as_of             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX businesses_legal_rep ON businesses (legal_rep_id_hmac);
CREATE INDEX businesses_name ON businesses (name);

-- Every load of a dataset: `cityhall seed` (source 'seed', with the last registry resident it derived rows from, so
-- that a later seed only looks at households that grew) and `cityhall import dataset` (source: the file's name).
CREATE TABLE dataset_loads (
    load_id          bigserial   PRIMARY KEY,
    dataset          text        NOT NULL,
    source           text        NOT NULL,
    rows             bigint      NOT NULL,
    through_resident bigint,
    loaded_at        timestamptz NOT NULL DEFAULT now()
);

-- ---- applications ----

-- One submission of one bundle by one citizen. The pre-check decides at once: 'accepted' (items created,
-- dispatchable ones with an outbox row) or 'rejected' (no items; precheck and precheck_errors say why).
-- Then in_progress, completed, partially_completed, rejected or withdrawn, as ot_refresh_application derives
-- from the items. 'submitted' exists for completeness: a submission is decided in its own transaction.
CREATE TABLE applications (
    application_id  uuid        PRIMARY KEY,
    citizen_id      uuid        NOT NULL REFERENCES citizens,
    bundle_code     text        NOT NULL,
    catalog_version integer     NOT NULL REFERENCES catalog_versions,
    state           text        NOT NULL CHECK (state IN ('submitted', 'accepted', 'in_progress', 'completed',
                                                          'partially_completed', 'rejected', 'withdrawn')),
    fields_enc      bytea       NOT NULL CHECK (octet_length(fields_enc) > 28), -- sealed JSON object of the form
    revision        integer     NOT NULL DEFAULT 0,  -- + 1 per supplement: supplements write only on top of what they read
    consent_at      timestamptz NOT NULL,
    precheck        text        NOT NULL DEFAULT '',  -- 'passed', or why the application was returned
    precheck_errors jsonb       NOT NULL DEFAULT '[]', -- [{"field", "reason"}]
    submitted_at    timestamptz NOT NULL,
    accepted_at     timestamptz,
    updated_at      timestamptz NOT NULL,
    finished_at     timestamptz,                       -- when it reached a final state
    rating          smallint    CHECK (rating BETWEEN 1 AND 5),
    rating_comment  text        CHECK (octet_length(rating_comment) <= 1000),
    rated_at        timestamptz,
    acted_by        text,        -- the staff member who submitted it for the citizen (delegation), if any
    CHECK ((rating IS NULL) = (rated_at IS NULL))
);
-- The citizen's list, newest first (keyset pagination on submitted_at, application_id).
CREATE INDEX applications_citizen ON applications (citizen_id, submitted_at DESC, application_id DESC);

-- One service item of an application. States: blocked_on_dependency -> dispatched -> in_review <->
-- supplement_requested -> approved -> issued; or rejected, failed_technical (retried by staff), withdrawn.
-- accepted_at and due_at are set when the item's clock starts: at submission for items dispatched at once, by
-- the dispatcher (ot_release_dependants) when a blocked item's dependencies are issued. The effective deadline
-- is due_at + paused_seconds (and, while paused, the time since paused_at): a supplement request pauses it.
-- dispatch_key is the item's idempotency key towards its department.
CREATE TABLE application_items (
    item_id           uuid        PRIMARY KEY,
    application_id    uuid        NOT NULL REFERENCES applications ON DELETE CASCADE,
    item_code         text        NOT NULL,
    position          smallint    NOT NULL,  -- order in the bundle
    department        text        NOT NULL,
    state             text        NOT NULL CHECK (state IN ('blocked_on_dependency', 'dispatched', 'in_review',
                                                            'supplement_requested', 'approved', 'issued',
                                                            'rejected', 'failed_technical', 'withdrawn')),
    depends_on        text[]      NOT NULL DEFAULT '{}',
    reason            text,
    supplement_fields text[]      NOT NULL DEFAULT '{}',
    accepted_at       timestamptz,
    due_at            timestamptz,
    paused_at         timestamptz,
    paused_seconds    bigint      NOT NULL DEFAULT 0 CHECK (paused_seconds >= 0),
    licence_id        uuid,
    updated_at        timestamptz NOT NULL,
    dispatch_key      text        NOT NULL UNIQUE,
    UNIQUE (application_id, item_code)  -- also the index of "the items of an application"
);

-- What the dispatcher must deliver: one row per item to send ('dispatch') or to send again after the citizen
-- supplied what was asked ('resubmit'). Written in the transaction that makes the item dispatchable; a
-- withdrawal cancels the rows still pending.
CREATE TABLE outbox (
    outbox_id       bigserial   PRIMARY KEY,
    item_id         uuid        NOT NULL REFERENCES application_items ON DELETE CASCADE,
    dept            text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('dispatch', 'resubmit')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text,
    state           text        NOT NULL DEFAULT 'pending'
                                CHECK (state IN ('pending', 'delivered', 'failed', 'cancelled'))
);

-- What the app polls (GET /v1/me/notifications), newest first.
CREATE TABLE notifications (
    notification_id bigserial   PRIMARY KEY,
    citizen_id      uuid        NOT NULL,
    kind            text        NOT NULL,
    text            text        NOT NULL,
    application_id  uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    read_at         timestamptz
);
CREATE INDEX notifications_citizen ON notifications (citizen_id, notification_id DESC);

-- E-licences (电子证照) issued by approved items. data: non-sensitive facts later items and forms consume, keyed
-- by form field name (the form prefills "licence:<type>.<field>" from the holder's newest licence of that type).
CREATE TABLE licences (
    licence_id         uuid        PRIMARY KEY,
    licence_number     text        NOT NULL UNIQUE,
    type               text        NOT NULL,  -- the item code that issued it
    holder_citizen_id  uuid,
    holder_resident_id bigint      REFERENCES registry_residents (resident_id),
    issuer             text        NOT NULL,  -- department
    issued_at          timestamptz NOT NULL,
    valid_until        timestamptz,
    signature          text        NOT NULL,  -- ES256 compact JWS over the licence's fields
    item_id            uuid        UNIQUE REFERENCES application_items,
    data               jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX licences_holder ON licences (holder_citizen_id, type, issued_at DESC);
ALTER TABLE application_items ADD FOREIGN KEY (licence_id) REFERENCES licences;

-- ---- functions ----

-- Recomputes an application's state from its items, under the application's row lock; call it in the
-- transaction that changed the items. Returns the state now. Rules: withdrawn stays withdrawn; an application
-- without items (returned by the pre-check) keeps its state; every item issued -> completed; every item final
-- (issued, rejected, withdrawn) with none issued -> rejected, with some issued -> partially_completed; an item
-- past dispatched (in review, waiting for a supplement, decided, failed_technical) -> in_progress; otherwise
-- unchanged (accepted). finished_at is set on reaching a final state.
CREATE FUNCTION ot_refresh_application(p_application uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_state  text;
    v_new    text;
    v_total  integer;
    v_issued integer;
    v_final  integer;
    v_moved  integer;
BEGIN
    SELECT state INTO v_state FROM applications WHERE application_id = p_application FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_state = 'withdrawn' THEN
        RETURN v_state;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE state = 'issued'),
           count(*) FILTER (WHERE state IN ('issued', 'rejected', 'withdrawn')),
           count(*) FILTER (WHERE state NOT IN ('blocked_on_dependency', 'dispatched'))
    INTO v_total, v_issued, v_final, v_moved
    FROM application_items WHERE application_id = p_application;
    IF v_total = 0 THEN
        RETURN v_state;
    END IF;
    v_new := CASE WHEN v_issued = v_total THEN 'completed'
                  WHEN v_final = v_total AND v_issued = 0 THEN 'rejected'
                  WHEN v_final = v_total THEN 'partially_completed'
                  WHEN v_moved > 0 THEN 'in_progress'
                  ELSE v_state END;
    IF v_new <> v_state THEN
        UPDATE applications
        SET state = v_new, updated_at = now(),
            finished_at = CASE WHEN v_new IN ('completed', 'partially_completed', 'rejected') THEN now() END
        WHERE application_id = p_application;
    END IF;
    RETURN v_new;
END
$$;

-- The writes of a batch of submissions (group commit: the submissions a gateway thread received while earlier
-- batches were committing share one transaction, one WAL flush). Each submission's answer was fixed by the
-- gateway before: ids, states, deadlines, the pre-check's verdict. Arrays per submission (p_*), per item (p_item_*,
-- p_item_sub its submission's 1-based position) and per access-log entry (p_log_*). A submission whose
-- Idempotency-Key (p_claim_*, NULL key: none) another request claimed first writes nothing: its position is
-- returned, and the gateway replays the first answer. The access-log entries passed here are those made on behalf
-- of a citizen (a delegation, a kiosk), appended in citizen order so that concurrent batches take the per-citizen
-- advisory locks of access_log_append in one order; a citizen's own entries go, in the same transaction, to
-- access_log_pending (0009), which the dispatcher drains into the chains within about a second, so that a batch
-- never waits for a citizen's chain lock (one citizen submitting fast would otherwise serialize every batch).
CREATE FUNCTION ot_submit_batch(p_ids uuid[], p_citizens uuid[], p_bundles text[], p_versions integer[],
                                p_states text[], p_fields text[], p_at timestamptz[], p_prechecks text[],
                                p_errors text[], p_acted_by text[], p_note_kinds text[], p_note_texts text[],
                                p_claim_scope text[], p_claim_key text[], p_claim_route text[], p_claim_hash text[],
                                p_claim_status integer[], p_claim_response text[],
                                p_item_sub integer[], p_item_ids uuid[], p_item_codes text[], p_item_pos integer[],
                                p_item_depts text[], p_item_states text[], p_item_deps text[], p_item_due timestamptz[],
                                p_log_sub integer[], p_log_citizen uuid[], p_log_role text[], p_log_actor text[],
                                p_log_dept text[], p_log_behalf text[], p_log_action text[], p_log_purpose text[])
RETURNS SETOF integer
LANGUAGE plpgsql AS $$
DECLARE
    k    integer;
    n    integer := coalesce(cardinality(p_ids), 0);
    skip boolean[] := array_fill(false, ARRAY[greatest(n, 1)]);
    r    record;
BEGIN
    FOR k IN 1 .. n LOOP
        IF p_claim_key[k] IS NOT NULL THEN
            INSERT INTO idempotency_keys (scope, key, route, request_hash, status, response)
            VALUES (p_claim_scope[k], p_claim_key[k], p_claim_route[k], decode(p_claim_hash[k], 'hex'),
                    p_claim_status[k], decode(p_claim_response[k], 'hex'))
            ON CONFLICT DO NOTHING;
            IF NOT FOUND THEN
                skip[k] := true;
                RETURN NEXT k;
            END IF;
        END IF;
    END LOOP;
    INSERT INTO applications (application_id, citizen_id, bundle_code, catalog_version, state, fields_enc, consent_at,
                              precheck, precheck_errors, submitted_at, accepted_at, updated_at, acted_by)
    SELECT u.id, u.citizen, u.bundle, u.version, u.state, decode(u.fields, 'hex'), u.at, u.precheck, u.errors::jsonb,
           u.at, CASE WHEN u.state = 'accepted' THEN u.at END, u.at, u.acted_by
    FROM unnest(p_ids, p_citizens, p_bundles, p_versions, p_states, p_fields, p_at, p_prechecks, p_errors, p_acted_by)
         WITH ORDINALITY AS u(id, citizen, bundle, version, state, fields, at, precheck, errors, acted_by, k)
    WHERE NOT skip[u.k];
    INSERT INTO application_items (item_id, application_id, item_code, position, department, state, depends_on,
                                   accepted_at, due_at, updated_at, dispatch_key)
    SELECT u.id, p_ids[u.sub], u.code, u.pos, u.dept, u.state, coalesce(string_to_array(nullif(u.deps, ''), ','), '{}'),
           CASE WHEN u.state = 'dispatched' THEN p_at[u.sub] END, u.due, p_at[u.sub], u.id::text
    FROM unnest(p_item_sub, p_item_ids, p_item_codes, p_item_pos, p_item_depts, p_item_states, p_item_deps, p_item_due)
         AS u(sub, id, code, pos, dept, state, deps, due)
    WHERE NOT skip[u.sub]
    ORDER BY u.sub, u.pos;
    INSERT INTO outbox (item_id, dept, kind)
    SELECT u.id, u.dept, 'dispatch'
    FROM unnest(p_item_sub, p_item_ids, p_item_depts, p_item_states) AS u(sub, id, dept, state)
    WHERE NOT skip[u.sub] AND u.state = 'dispatched';
    INSERT INTO notifications (citizen_id, kind, text, application_id)
    SELECT u.citizen, u.kind, u.text, u.id
    FROM unnest(p_ids, p_citizens, p_note_kinds, p_note_texts) WITH ORDINALITY AS u(id, citizen, kind, text, k)
    WHERE NOT skip[u.k];
    FOR r IN
        SELECT u.* FROM unnest(p_log_sub, p_log_citizen, p_log_role, p_log_actor, p_log_dept, p_log_behalf,
                               p_log_action, p_log_purpose) WITH ORDINALITY
                        AS u(sub, citizen, role, actor, dept, behalf, action, purpose, k)
        WHERE NOT skip[u.sub] ORDER BY u.citizen, u.k
    LOOP
        PERFORM access_log_append(r.citizen, r.role, r.actor, r.dept, r.behalf, r.action, r.purpose);
    END LOOP;
END
$$;

-- A citizen's supplement (POST /v1/onething/applications/{id}/supplements), decided by the gateway before this
-- transaction: the new sealed form values (written only on top of the revision the gateway read: CH409 otherwise),
-- and each answered item's next state: 'in_review' (its department works cityhall's staff queue) or 'dispatched'
-- with a 'resubmit' outbox row (its department has its own system). The deadline clock resumes: the time since
-- paused_at is added to paused_seconds. Locks the application's items in item-id order, then the application:
-- the order of every writer (the dispatcher's decisions lock an item, then its application).
CREATE FUNCTION ot_supplement_apply(p_application uuid, p_revision integer, p_fields_enc bytea, p_items uuid[],
                                    p_states text[], p_now timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
BEGIN
    PERFORM 1 FROM application_items WHERE application_id = p_application ORDER BY item_id FOR UPDATE;
    UPDATE applications SET fields_enc = p_fields_enc, revision = revision + 1, updated_at = p_now
    WHERE application_id = p_application AND revision = p_revision AND state IN ('accepted', 'in_progress');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the application changed meanwhile' USING ERRCODE = 'CH409';
    END IF;
    FOR k IN 1 .. coalesce(cardinality(p_items), 0) LOOP
        IF p_states[k] NOT IN ('in_review', 'dispatched') THEN
            RAISE EXCEPTION 'bad state %', p_states[k];
        END IF;
        UPDATE application_items
        SET state = p_states[k], supplement_fields = '{}', reason = NULL, updated_at = p_now,
            paused_seconds = paused_seconds + CASE WHEN paused_at IS NULL THEN 0
                                                   ELSE greatest(0, floor(extract(epoch FROM p_now - paused_at)))::bigint END,
            paused_at = NULL
        WHERE item_id = p_items[k] AND application_id = p_application AND state = 'supplement_requested';
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the item no longer waits for a supplement' USING ERRCODE = 'CH409';
        END IF;
        IF p_states[k] = 'dispatched' THEN
            INSERT INTO outbox (item_id, dept, kind)
            SELECT item_id, department, 'resubmit' FROM application_items WHERE item_id = p_items[k];
        END IF;
    END LOOP;
    PERFORM ot_refresh_application(p_application);
END
$$;

-- A withdrawal by the citizen, allowed until an item is approved: every item not final becomes 'withdrawn', the
-- outbox rows still pending are cancelled, the application ends 'withdrawn' and the citizen is notified.
-- Returns the items withdrawn and the state each had. Errors: CH404 not this citizen's application; CH4WF the
-- application is already final (or withdrawn); CH4WA an item was already approved or issued. Lock order: pending
-- outbox rows, items (item-id order), then the application (a deadlock with a dispatcher batch that locked the
-- same outbox rows in another order is retried by the gateway).
CREATE FUNCTION ot_withdraw(p_application uuid, p_citizen uuid, p_now timestamptz)
RETURNS TABLE (item_id uuid, from_state text)
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
BEGIN
    PERFORM 1 FROM applications a WHERE a.application_id = p_application AND a.citizen_id = p_citizen;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such application' USING ERRCODE = 'CH404';
    END IF;
    -- the dispatcher's settling locks outbox rows, then items; its decisions an item, then the application
    PERFORM 1 FROM outbox o
    WHERE o.state = 'pending' AND o.item_id IN (SELECT i.item_id FROM application_items i
                                                WHERE i.application_id = p_application)
    ORDER BY o.outbox_id FOR UPDATE;
    PERFORM 1 FROM application_items i WHERE i.application_id = p_application ORDER BY i.item_id FOR UPDATE;
    SELECT a.state INTO v_state FROM applications a WHERE a.application_id = p_application FOR UPDATE;
    IF v_state NOT IN ('submitted', 'accepted', 'in_progress') THEN
        RAISE EXCEPTION 'the application is %', v_state USING ERRCODE = 'CH4WF';
    END IF;
    IF EXISTS (SELECT 1 FROM application_items i WHERE i.application_id = p_application
               AND i.state IN ('approved', 'issued')) THEN
        RAISE EXCEPTION 'an item was already approved' USING ERRCODE = 'CH4WA';
    END IF;
    RETURN QUERY
    WITH old AS (
        SELECT i.item_id, i.state FROM application_items i
        WHERE i.application_id = p_application AND i.state NOT IN ('rejected', 'withdrawn')
    ), upd AS (
        UPDATE application_items i
        SET state = 'withdrawn', updated_at = p_now,
            paused_seconds = i.paused_seconds + CASE WHEN i.paused_at IS NULL THEN 0
                                   ELSE greatest(0, floor(extract(epoch FROM p_now - i.paused_at)))::bigint END,
            paused_at = NULL
        FROM old WHERE i.item_id = old.item_id
        RETURNING i.item_id
    )
    SELECT old.item_id, old.state FROM old JOIN upd USING (item_id) ORDER BY old.item_id;
    UPDATE outbox o SET state = 'cancelled', last_error = 'withdrawn by the citizen'
    WHERE o.state = 'pending' AND o.item_id IN (SELECT i.item_id FROM application_items i
                                                WHERE i.application_id = p_application);
    UPDATE applications SET state = 'withdrawn', updated_at = p_now, finished_at = p_now
    WHERE application_id = p_application;
    INSERT INTO notifications (citizen_id, kind, text, application_id)
    VALUES (p_citizen, 'application_withdrawn', '您已撤回申请，尚未办结的事项已终止办理', p_application);
END
$$;

-- What a citizen's form can be prefilled from: one row per fact ("me.name", "family.mother.id_number",
-- "birth_record.cert_no", "licence:BIRTH_CERT.child.birth_cert_no", ...) with its source (the dataset, or
-- licence:<type>), its as-of time, and whether the value is sealed (hex of an AES-GCM ciphertext: ID and phone
-- numbers, opened by the gateway). Only the datasets named in p_datasets are read ('account', 'registry',
-- 'marriages', 'birth_records', 'social_insurance', 'businesses', 'licences'); the registry entry of the
-- citizen is what every other dataset is looked up by. The parents of a newborn come from the newest birth
-- record (within a year) naming the citizen as mother or father, else from the citizen's current marriage.
CREATE FUNCTION ot_prefill_facts(p_citizen uuid, p_datasets text[])
RETURNS TABLE (fact text, val text, src text, at_time timestamptz, is_sealed boolean)
LANGUAGE sql STABLE AS $$
WITH acct AS (
    SELECT * FROM citizens WHERE citizen_id = p_citizen
), me AS (
    SELECT r.* FROM acct JOIN registry_residents r ON r.resident_id = acct.registry_id
), mar AS (
    SELECT m.*, CASE WHEN m.husband_id_hmac = me.id_hmac THEN m.wife_id_hmac ELSE m.husband_id_hmac END AS spouse
    FROM me JOIN marriages m ON (m.husband_id_hmac = me.id_hmac OR m.wife_id_hmac = me.id_hmac)
    WHERE 'marriages' = ANY (p_datasets) AND m.dissolved_on IS NULL
    ORDER BY m.registered_on DESC LIMIT 1
), birth AS (
    SELECT b.* FROM me JOIN birth_records b ON (b.mother_id_hmac = me.id_hmac OR b.father_id_hmac = me.id_hmac)
    WHERE 'birth_records' = ANY (p_datasets)
      AND b.child_birth_date > (now() AT TIME ZONE 'Asia/Shanghai')::date - 366
    ORDER BY b.child_birth_date DESC, b.cert_no LIMIT 1
), parents AS (
    SELECT birth.mother_id_hmac AS mother, birth.father_id_hmac AS father, 'birth_records' AS src, birth.as_of
    FROM birth
    UNION ALL
    SELECT CASE WHEN me.sex = 'F' THEN me.id_hmac ELSE mar.spouse END,
           CASE WHEN me.sex = 'F' THEN mar.spouse ELSE me.id_hmac END, 'marriages', mar.as_of
    FROM me, mar WHERE NOT EXISTS (SELECT 1 FROM birth)
), mother AS (
    SELECT r.*, p.src AS via, p.as_of AS via_as_of FROM parents p JOIN registry_residents r ON r.id_hmac = p.mother
), father AS (
    SELECT r.*, p.src AS via, p.as_of AS via_as_of FROM parents p JOIN registry_residents r ON r.id_hmac = p.father
), si AS (
    SELECT s.* FROM me JOIN social_insurance s ON s.id_hmac = me.id_hmac WHERE 'social_insurance' = ANY (p_datasets)
), mother_si AS (
    SELECT s.* FROM parents p JOIN social_insurance s ON s.id_hmac = p.mother
    WHERE 'social_insurance' = ANY (p_datasets)
), biz AS (
    SELECT count(*) AS n, max(b.as_of) AS as_of
    FROM me JOIN businesses b ON b.legal_rep_id_hmac = me.id_hmac AND b.status = 'active'
    WHERE 'businesses' = ANY (p_datasets)
), lic AS (
    SELECT DISTINCT ON (l.type) l.type, l.data, l.issued_at
    FROM licences l WHERE 'licences' = ANY (p_datasets) AND l.holder_citizen_id = p_citizen
    ORDER BY l.type, l.issued_at DESC
)
SELECT 'account.phone', encode(phone_enc, 'hex'), 'account', created_at, true FROM acct
    WHERE 'account' = ANY (p_datasets)
UNION ALL SELECT x.f, x.v, 'registry', me.created_at, x.s FROM me, LATERAL (VALUES
        ('me.name', me.name, false), ('me.id_number', encode(me.id_enc, 'hex'), true),
        ('me.sex', me.sex::text, false), ('me.birth_date', me.birth_date::text, false),
        ('me.address', me.address, false),
        ('me.parent_role', CASE me.sex WHEN 'F' THEN 'mother' WHEN 'M' THEN 'father' END, false)) x(f, v, s)
    WHERE 'registry' = ANY (p_datasets) AND x.v IS NOT NULL
UNION ALL SELECT x.f, x.v, 'marriages', mar.as_of, x.s FROM mar
    LEFT JOIN registry_residents sp ON sp.id_hmac = mar.spouse,
    LATERAL (VALUES ('marriage.cert_no', mar.cert_no, false), ('marriage.registered_on', mar.registered_on::text, false),
                    ('spouse.name', sp.name, false), ('spouse.id_number', encode(sp.id_enc, 'hex'), true)) x(f, v, s)
    WHERE x.v IS NOT NULL
UNION ALL SELECT x.f, x.v, 'birth_records', birth.as_of, false FROM birth, LATERAL (VALUES
        ('birth_record.cert_no', birth.cert_no), ('birth_record.child_name', birth.child_name),
        ('birth_record.child_sex', birth.child_sex::text), ('birth_record.child_birth_date', birth.child_birth_date::text),
        ('birth_record.hospital', birth.hospital)) x(f, v)
UNION ALL SELECT x.f, x.v, mother.via, mother.via_as_of, x.s FROM mother, LATERAL (VALUES
        ('family.mother.name', mother.name, false), ('family.mother.id_number', encode(mother.id_enc, 'hex'), true)) x(f, v, s)
UNION ALL SELECT x.f, x.v, father.via, father.via_as_of, x.s FROM father, LATERAL (VALUES
        ('family.father.name', father.name, false), ('family.father.id_number', encode(father.id_enc, 'hex'), true)) x(f, v, s)
UNION ALL SELECT x.f, x.v, 'social_insurance', si.as_of, false FROM si, LATERAL (VALUES
        ('social_insurance.employer', nullif(si.employer, '')), ('social_insurance.insured_since', si.insured_since::text),
        ('social_insurance.status', si.status)) x(f, v)
    WHERE x.v IS NOT NULL
UNION ALL SELECT 'family.mother.employer', mother_si.employer, 'social_insurance', mother_si.as_of, false FROM mother_si
    WHERE mother_si.employer <> ''
UNION ALL SELECT 'businesses.legal_rep_count', biz.n::text, 'businesses', coalesce(biz.as_of, now()), false FROM biz
    WHERE 'businesses' = ANY (p_datasets) AND EXISTS (SELECT 1 FROM me)
UNION ALL SELECT 'licence:' || lic.type || '.' || d.key, d.value, 'licence:' || lic.type, lic.issued_at, false
    FROM lic, jsonb_each_text(lic.data) d
$$;

-- ---- the first catalog version: services/onething/catalog/catalog-v1.json, verbatim ----
-- (tests/integration/test_onething_applications.py checks that the two stay identical)
INSERT INTO catalog_versions (version, catalog, active, source)
VALUES (1, $catalog${
  "title": "cityhall one-thing catalog (一件事目录)",
  "departments": [
    {"code": "health", "name": "卫生健康委员会"},
    {"code": "police-hukou", "name": "公安局户政管理"},
    {"code": "police-seal", "name": "公安局治安管理（印章刻制）"},
    {"code": "medical-insurance", "name": "医疗保障局"},
    {"code": "hrss", "name": "人力资源和社会保障局"},
    {"code": "market-regulation", "name": "市场监督管理局"},
    {"code": "tax", "name": "税务局"},
    {"code": "bank", "name": "开户银行（银企对接平台）"},
    {"code": "housing-fund", "name": "住房公积金管理中心"}
  ],
  "items": [
    {"code": "BIRTH_CERT", "name": "出生医学证明", "department": "health", "legal_days": 20, "promised_days": 3,
     "materials": ["医疗机构出具的出生医学证明首次签发登记表", "父母双方身份证件"]},
    {"code": "HUKOU_REG", "name": "出生登记（户口登记）", "department": "police-hukou", "legal_days": 20, "promised_days": 5,
     "materials": ["出生医学证明", "父母双方居民户口簿", "结婚证（非婚生育的除外）"]},
    {"code": "MED_INS", "name": "城乡居民基本医疗保险参保登记", "department": "medical-insurance", "legal_days": 15,
     "promised_days": 3, "materials": ["新生儿居民户口簿"]},
    {"code": "SOCIAL_CARD", "name": "社会保障卡申领", "department": "hrss", "legal_days": 20, "promised_days": 10,
     "materials": ["新生儿居民户口簿", "监护人身份证件"]},
    {"code": "VACCINE_CERT", "name": "预防接种证办理", "department": "health", "legal_days": 10, "promised_days": 1,
     "materials": ["出生医学证明或出生信息", "监护人身份证件"]},
    {"code": "MATERNITY", "name": "生育津贴申领", "department": "hrss", "legal_days": 20, "promised_days": 10,
     "materials": ["生育医学证明", "本人银行账户信息"]},

    {"code": "BIZ_REG", "name": "企业设立登记（营业执照）", "department": "market-regulation", "legal_days": 15,
     "promised_days": 1, "materials": ["公司章程", "法定代表人身份证件", "住所使用证明"]},
    {"code": "SEAL", "name": "公章刻制备案", "department": "police-seal", "legal_days": 5, "promised_days": 1,
     "materials": ["营业执照", "法定代表人身份证件"]},
    {"code": "TAX_REG", "name": "新办纳税人涉税事项（税务登记、发票申领）", "department": "tax", "legal_days": 10,
     "promised_days": 1, "materials": ["营业执照", "法定代表人身份证件"]},
    {"code": "SI_ACCOUNT", "name": "单位社会保险登记", "department": "hrss", "legal_days": 10, "promised_days": 1,
     "materials": ["营业执照"]},
    {"code": "BANK_APPT", "name": "银行开户预约", "department": "bank", "legal_days": 5, "promised_days": 1,
     "materials": ["营业执照", "公章", "法定代表人身份证件"]},

    {"code": "PENSION", "name": "基本养老保险待遇核定（退休审批）", "department": "hrss", "legal_days": 20,
     "promised_days": 10, "materials": ["本人身份证件", "人事档案（用人单位或档案管理机构提供）", "本人银行账户信息"]},
    {"code": "RETIREE_MED_INS", "name": "退休人员医疗保险待遇变更", "department": "medical-insurance", "legal_days": 15,
     "promised_days": 5, "materials": ["退休审批结果"]},
    {"code": "HF_WITHDRAW", "name": "退休提取住房公积金", "department": "housing-fund", "legal_days": 10,
     "promised_days": 3, "materials": ["退休审批结果", "本人银行账户信息"]},
    {"code": "RETIREE_COMMUNITY", "name": "退休人员社会化管理服务登记", "department": "hrss", "legal_days": 15,
     "promised_days": 5, "materials": ["退休审批结果"]}
  ],
  "bundles": [
    {
      "code": "birth",
      "name": "出生一件事",
      "description": "新生儿出生医学证明、户口登记、医保参保、社保卡、预防接种证和生育津贴，一张表单一次提交。",
      "precheck": "birth",
      "consent_text": "本人同意平台为办理出生一件事，调取并向相关部门共享出生医学证明、户籍、婚姻登记和社会保险信息。",
      "items": [
        {"code": "BIRTH_CERT", "depends_on": []},
        {"code": "HUKOU_REG", "depends_on": ["BIRTH_CERT"]},
        {"code": "MED_INS", "depends_on": ["HUKOU_REG"]},
        {"code": "SOCIAL_CARD", "depends_on": ["HUKOU_REG"]},
        {"code": "VACCINE_CERT", "depends_on": []},
        {"code": "MATERNITY", "depends_on": []}
      ],
      "form": [
        {"name": "child.name", "label": "新生儿姓名", "type": "string", "required": true, "max_len": 64,
         "prefill": ["birth_record.child_name"],
         "items": ["BIRTH_CERT", "HUKOU_REG", "MED_INS", "SOCIAL_CARD", "VACCINE_CERT"]},
        {"name": "child.sex", "label": "新生儿性别", "type": "enum", "required": true, "options": ["M", "F"],
         "prefill": ["birth_record.child_sex"],
         "items": ["BIRTH_CERT", "HUKOU_REG", "MED_INS", "SOCIAL_CARD", "VACCINE_CERT"]},
        {"name": "child.birth_date", "label": "出生日期", "type": "date", "required": true, "not_future": true,
         "prefill": ["birth_record.child_birth_date"],
         "items": ["BIRTH_CERT", "HUKOU_REG", "MED_INS", "SOCIAL_CARD", "VACCINE_CERT", "MATERNITY"]},
        {"name": "child.hospital", "label": "出生医院", "type": "string", "required": true, "max_len": 100,
         "prefill": ["birth_record.hospital"], "items": ["BIRTH_CERT", "VACCINE_CERT"]},
        {"name": "child.birth_cert_no", "label": "出生医学证明编号", "type": "string", "required": true,
         "pattern": "^[A-Z][0-9]{9}$",
         "prefill": ["licence:BIRTH_CERT.child.birth_cert_no", "birth_record.cert_no"],
         "items": ["BIRTH_CERT", "HUKOU_REG"]},
        {"name": "mother.name", "label": "母亲姓名", "type": "string", "required": true, "max_len": 64,
         "prefill": ["family.mother.name"], "items": ["BIRTH_CERT", "HUKOU_REG", "MATERNITY"]},
        {"name": "mother.id_number", "label": "母亲身份证号码", "type": "id_number", "required": true,
         "prefill": ["family.mother.id_number"], "items": ["BIRTH_CERT", "HUKOU_REG", "MATERNITY"]},
        {"name": "father.name", "label": "父亲姓名", "type": "string", "required": true, "max_len": 64,
         "prefill": ["family.father.name"], "items": ["BIRTH_CERT", "HUKOU_REG"]},
        {"name": "father.id_number", "label": "父亲身份证号码", "type": "id_number", "required": true,
         "prefill": ["family.father.id_number"], "items": ["BIRTH_CERT", "HUKOU_REG"]},
        {"name": "parents.marriage_cert_no", "label": "结婚证字号", "type": "string", "required": false,
         "max_len": 40, "prefill": ["marriage.cert_no"], "items": ["HUKOU_REG"]},
        {"name": "hukou.follow", "label": "随父或随母落户", "type": "enum", "required": true,
         "options": ["mother", "father"], "prefill": ["me.parent_role"], "items": ["HUKOU_REG"]},
        {"name": "hukou.address", "label": "落户地址", "type": "string", "required": true, "max_len": 200,
         "prefill": ["me.address"], "items": ["HUKOU_REG", "MED_INS"]},
        {"name": "applicant.phone", "label": "联系电话", "type": "phone", "required": true,
         "prefill": ["account.phone"],
         "items": ["BIRTH_CERT", "HUKOU_REG", "MED_INS", "SOCIAL_CARD", "VACCINE_CERT", "MATERNITY"]},
        {"name": "social_card.bank", "label": "社保卡合作银行", "type": "enum", "required": true,
         "options": ["工商银行", "农业银行", "中国银行", "建设银行", "广州银行"], "items": ["SOCIAL_CARD"]},
        {"name": "vaccine.clinic", "label": "预防接种单位", "type": "string", "required": false, "max_len": 100,
         "items": ["VACCINE_CERT"]},
        {"name": "maternity.employer", "label": "母亲参保单位", "type": "string", "required": false,
         "max_len": 100, "prefill": ["family.mother.employer"], "items": ["MATERNITY"]},
        {"name": "maternity.bank_account", "label": "生育津贴收款银行账号", "type": "string", "required": true,
         "pattern": "^[0-9]{12,19}$", "items": ["MATERNITY"]}
      ]
    },
    {
      "code": "business_opening",
      "name": "企业开办一件事",
      "description": "营业执照、公章刻制、涉税事项、单位社保登记和银行开户预约，一次提交，一日办结。",
      "precheck": "business_opening",
      "consent_text": "本人同意平台为办理企业开办，调取并向相关部门共享户籍和市场主体登记信息。",
      "items": [
        {"code": "BIZ_REG", "depends_on": []},
        {"code": "SEAL", "depends_on": ["BIZ_REG"]},
        {"code": "TAX_REG", "depends_on": ["BIZ_REG"]},
        {"code": "SI_ACCOUNT", "depends_on": ["BIZ_REG"]},
        {"code": "BANK_APPT", "depends_on": ["BIZ_REG"]}
      ],
      "form": [
        {"name": "company.name", "label": "企业名称", "type": "string", "required": true, "max_len": 120,
         "items": ["BIZ_REG", "SEAL", "TAX_REG", "SI_ACCOUNT", "BANK_APPT"]},
        {"name": "company.type", "label": "企业类型", "type": "enum", "required": true,
         "options": ["limited_company", "sole_proprietorship", "partnership"], "items": ["BIZ_REG", "TAX_REG"]},
        {"name": "company.address", "label": "住所", "type": "string", "required": true, "max_len": 200,
         "items": ["BIZ_REG", "TAX_REG"]},
        {"name": "company.registered_capital", "label": "注册资本（万元）", "type": "int", "required": true,
         "min": 1, "max": 10000000, "items": ["BIZ_REG"]},
        {"name": "company.business_scope", "label": "经营范围", "type": "string", "required": true,
         "max_len": 500, "items": ["BIZ_REG", "TAX_REG"]},
        {"name": "legal_rep.name", "label": "法定代表人姓名", "type": "string", "required": true, "max_len": 64,
         "prefill": ["me.name"], "items": ["BIZ_REG", "SEAL", "TAX_REG", "SI_ACCOUNT", "BANK_APPT"]},
        {"name": "legal_rep.id_number", "label": "法定代表人身份证号码", "type": "id_number", "required": true,
         "prefill": ["me.id_number"], "items": ["BIZ_REG", "SEAL", "TAX_REG", "BANK_APPT"]},
        {"name": "applicant.phone", "label": "联系电话", "type": "phone", "required": true,
         "prefill": ["account.phone"], "items": ["BIZ_REG", "SEAL", "TAX_REG", "SI_ACCOUNT", "BANK_APPT"]},
        {"name": "seal.count", "label": "刻制印章枚数", "type": "int", "required": true, "min": 1, "max": 5,
         "items": ["SEAL"]},
        {"name": "tax.invoice", "label": "申领发票", "type": "bool", "required": true, "items": ["TAX_REG"]},
        {"name": "si.employees", "label": "参保职工人数", "type": "int", "required": true, "min": 0,
         "max": 100000, "items": ["SI_ACCOUNT"]},
        {"name": "bank.name", "label": "开户银行", "type": "enum", "required": true,
         "options": ["工商银行", "农业银行", "中国银行", "建设银行", "招商银行", "广州银行"], "items": ["BANK_APPT"]},
        {"name": "bank.appointment_date", "label": "预约开户日期", "type": "date", "required": true,
         "not_past": true, "items": ["BANK_APPT"]}
      ]
    },
    {
      "code": "retirement",
      "name": "退休一件事",
      "description": "退休审批（养老金待遇核定）、医保待遇变更、退休提取公积金和社会化管理服务登记，一次提交。",
      "precheck": "retirement",
      "consent_text": "本人同意平台为办理退休一件事，调取并向相关部门共享户籍和社会保险信息。",
      "items": [
        {"code": "PENSION", "depends_on": []},
        {"code": "RETIREE_MED_INS", "depends_on": ["PENSION"]},
        {"code": "HF_WITHDRAW", "depends_on": ["PENSION"]},
        {"code": "RETIREE_COMMUNITY", "depends_on": ["PENSION"]}
      ],
      "form": [
        {"name": "retiree.name", "label": "姓名", "type": "string", "required": true, "max_len": 64,
         "prefill": ["me.name"], "items": ["PENSION", "RETIREE_MED_INS", "HF_WITHDRAW", "RETIREE_COMMUNITY"]},
        {"name": "retiree.id_number", "label": "身份证号码", "type": "id_number", "required": true,
         "prefill": ["me.id_number"], "items": ["PENSION", "RETIREE_MED_INS", "HF_WITHDRAW", "RETIREE_COMMUNITY"]},
        {"name": "retiree.category", "label": "人员类别（女性：工人50岁、干部55岁为原法定退休年龄）", "type": "enum",
         "required": true, "options": ["worker", "cadre"], "items": ["PENSION"]},
        {"name": "retire.date", "label": "申请退休日期", "type": "date", "required": true, "items": ["PENSION"]},
        {"name": "retiree.employer", "label": "参保单位", "type": "string", "required": false, "max_len": 100,
         "prefill": ["social_insurance.employer"], "items": ["PENSION"]},
        {"name": "pension.bank_account", "label": "养老金收款银行账号", "type": "string", "required": true,
         "pattern": "^[0-9]{12,19}$", "items": ["PENSION", "HF_WITHDRAW"]},
        {"name": "applicant.phone", "label": "联系电话", "type": "phone", "required": true,
         "prefill": ["account.phone"], "items": ["PENSION", "RETIREE_MED_INS", "HF_WITHDRAW", "RETIREE_COMMUNITY"]},
        {"name": "community.address", "label": "居住地址（社区管理）", "type": "string", "required": true,
         "max_len": 200, "prefill": ["me.address"], "items": ["RETIREE_COMMUNITY"]}
      ]
    }
  ]
}$catalog$, true, 'catalog-v1.json');
