-- One-thing dispatch (runs after 0008_onething): department endpoints and callbacks, the delivery record, the
-- working-day calendar and deadlines, escalations, e-licence numbering, and the SQL functions that move items
-- through their states so that every decision path (department callback, staff decision, delivery, sweeper)
-- applies the same rules in one transaction.

-- ---- departments ----

-- A department that has its own system: its items are POSTed to `url` (http://IP:PORT/path, loopback in tests)
-- signed with `secret` (HMAC-SHA-256), and its callbacks are checked with the same secret. The secret is sealed
-- with the data key (ch_pii_encrypt). A department without a row works cityhall's staff queue instead.
CREATE TABLE dept_endpoints (
    dept       text        PRIMARY KEY CHECK (dept ~ '^[a-z0-9][a-z0-9-]{0,63}$'),
    url        text        NOT NULL CHECK (url ~ '^http://' AND length(url) <= 600),
    secret_enc bytea       NOT NULL CHECK (octet_length(secret_enc) > 28), -- nonce || ciphertext || tag
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Callbacks already applied, so that a department retrying one gets the same acknowledgement and nothing changes
-- twice. Inserted in the transaction that applies the callback (a failed callback leaves no row).
CREATE TABLE callbacks_seen (
    dept        text        NOT NULL,
    callback_id text        NOT NULL CHECK (length(callback_id) BETWEEN 1 AND 128),
    item_id     uuid        NOT NULL,
    decision    text        NOT NULL,
    state       text        NOT NULL,  -- the item's state acknowledged
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dept, callback_id)
);

-- Every failed delivery attempt of an outbox row: what the department answered (HTTP status) or why nothing came
-- back. Never a body, never personal data. (A successful one is the outbox row's delivered_at.)
CREATE TABLE dispatch_attempts (
    attempt_id bigserial   PRIMARY KEY,
    outbox_id  bigint      NOT NULL,
    item_id    uuid        NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    status     text        NOT NULL CHECK (status IN ('failed')),
    error      text
);
CREATE INDEX dispatch_attempts_item ON dispatch_attempts (item_id, attempt_id);

-- The history of every item: who moved it from which state to which (department, staff member, the dispatcher,
-- the citizen through a supplement, the sweeper).
CREATE TABLE item_events (
    event_id   bigserial   PRIMARY KEY,
    item_id    uuid        NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    from_state text,
    to_state   text        NOT NULL,
    actor_role text        NOT NULL,  -- dept, staff, system
    actor      text        NOT NULL,
    note       text
);
CREATE INDEX item_events_item ON item_events (item_id, event_id);

-- Access-log entries of deliveries, waiting to be appended to the citizens' hash chains. A delivery's transaction
-- records here which department received which applicant's form values (durably, with the delivery); the
-- sweeper thread appends them to the access log within about a second (ot_access_log_drain), outside the
-- workers' transactions: the chain's per-citizen lock is then never held while a worker waits for its commit,
-- and a citizen's own submissions never queue behind a dispatch batch.
CREATE TABLE access_log_pending (
    pending_id   bigserial   PRIMARY KEY,
    citizen_id   uuid        NOT NULL,
    actor_role   text        NOT NULL,
    actor        text        NOT NULL,
    actor_dept   text,
    action       text        NOT NULL,
    purpose      text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Appends up to p_limit pending entries to the access log (in citizen order, the order every writer of the log
-- takes its per-citizen locks in) and deletes them; returns how many. Several sweepers may run: SKIP LOCKED.
CREATE FUNCTION ot_access_log_drain(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN
        SELECT * FROM access_log_pending ORDER BY citizen_id, pending_id LIMIT p_limit FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM access_log_append(r.citizen_id, r.actor_role, r.actor, r.actor_dept, NULL, r.action, r.purpose);
        DELETE FROM access_log_pending WHERE pending_id = r.pending_id;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- Outbox look-ups of the workers and of the staff queue.
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX outbox_item ON outbox (item_id);
CREATE INDEX application_items_queue ON application_items (department, state);
-- The sweeper's candidates: items being worked whose promised deadline has passed (a legal deadline is never
-- before the promised one, and pauses only move deadlines later, so due_at <= now bounds both).
CREATE INDEX application_items_due ON application_items (due_at)
    WHERE state IN ('dispatched', 'in_review', 'failed_technical');

-- ---- deadlines ----

-- Public holidays (days off although weekdays) and make-up working days (调休: weekends worked instead). Working
-- days are Monday to Friday except holidays, plus make-up days. Dates are civil dates in China Standard Time.
CREATE TABLE holidays (
    day  date PRIMARY KEY,
    name text NOT NULL
);
CREATE TABLE makeup_workdays (
    day  date PRIMARY KEY,
    name text NOT NULL
);

-- The calendar the deadline arithmetic reads: every day from 2020 to 2040 with whether it is a working day and
-- seq, the number of working days up to and including it. "n working days after d" is then one index look-up
-- (the working day whose seq is seq(d) + n), which matters: every submission computes its items' deadlines.
-- Rebuilt whenever holidays or makeup_workdays change; days outside it take the slow path below.
CREATE TABLE working_calendar (
    day     date    PRIMARY KEY,
    working boolean NOT NULL,
    seq     integer NOT NULL
);
CREATE UNIQUE INDEX working_calendar_seq ON working_calendar (seq) WHERE working;

CREATE FUNCTION ot_calendar_rebuild() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM working_calendar;
    INSERT INTO working_calendar (day, working, seq)
    SELECT day, working, sum(working::integer) OVER (ORDER BY day)::integer
    FROM (SELECT g::date AS day,
                 CASE WHEN EXISTS (SELECT 1 FROM holidays h WHERE h.day = g::date) THEN false
                      WHEN EXISTS (SELECT 1 FROM makeup_workdays m WHERE m.day = g::date) THEN true
                      ELSE extract(isodow FROM g) < 6 END AS working
          FROM generate_series(date '2020-01-01', date '2040-12-31', interval '1 day') g) d;
    RETURN NULL;
END
$$;
CREATE TRIGGER holidays_calendar AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON holidays
    FOR EACH STATEMENT EXECUTE FUNCTION ot_calendar_rebuild();
CREATE TRIGGER makeup_workdays_calendar AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON makeup_workdays
    FOR EACH STATEMENT EXECUTE FUNCTION ot_calendar_rebuild();
-- (the seed rows below fire the triggers: the calendar is built by the inserts)

CREATE FUNCTION ot_is_working_day(p_day date) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT working FROM working_calendar WHERE day = p_day),
                    CASE WHEN EXISTS (SELECT 1 FROM holidays WHERE day = p_day) THEN false
                         WHEN EXISTS (SELECT 1 FROM makeup_workdays WHERE day = p_day) THEN true
                         ELSE extract(isodow FROM p_day) < 6 END)
$$;

-- The day by day count, for dates the calendar does not cover.
CREATE FUNCTION ot_add_working_days_slow(p_start timestamptz, p_days integer) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_local timestamp := p_start AT TIME ZONE 'Asia/Shanghai';
    v_day   date := v_local::date;
    v_n     integer := 0;
BEGIN
    WHILE v_n < p_days LOOP
        v_day := v_day + 1;
        IF ot_is_working_day(v_day) THEN
            v_n := v_n + 1;
        END IF;
    END LOOP;
    RETURN (v_day + v_local::time) AT TIME ZONE 'Asia/Shanghai';
END
$$;

-- The moment `p_days` working days after `p_start`: the same time of day (China Standard Time) on the p_days-th
-- working day after the start's civil date. 0 days is the start itself.
CREATE FUNCTION ot_add_working_days(p_start timestamptz, p_days integer) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_days <= 0 THEN p_start
                ELSE coalesce((SELECT (t.day + (p_start AT TIME ZONE 'Asia/Shanghai')::time) AT TIME ZONE 'Asia/Shanghai'
                               FROM working_calendar s JOIN working_calendar t ON t.working AND t.seq = s.seq + p_days
                               WHERE s.day = (p_start AT TIME ZONE 'Asia/Shanghai')::date),
                              ot_add_working_days_slow(p_start, p_days)) END
$$;

-- The 2026 and 2027 public holidays as the State Council publishes them (2027 as projected: the lunar dates are
-- fixed, the make-up days are announced late in the year before and may differ).
INSERT INTO holidays (day, name)
SELECT d::date, n FROM (VALUES
    ('2026-01-01', '元旦'), ('2026-01-02', '元旦'), ('2026-01-03', '元旦'),
    ('2026-02-15', '春节'), ('2026-02-16', '春节'), ('2026-02-17', '春节'), ('2026-02-18', '春节'),
    ('2026-02-19', '春节'), ('2026-02-20', '春节'), ('2026-02-21', '春节'), ('2026-02-22', '春节'),
    ('2026-02-23', '春节'),
    ('2026-04-04', '清明节'), ('2026-04-05', '清明节'), ('2026-04-06', '清明节'),
    ('2026-05-01', '劳动节'), ('2026-05-02', '劳动节'), ('2026-05-03', '劳动节'), ('2026-05-04', '劳动节'),
    ('2026-05-05', '劳动节'),
    ('2026-06-19', '端午节'), ('2026-06-20', '端午节'), ('2026-06-21', '端午节'),
    ('2026-09-25', '中秋节'), ('2026-09-26', '中秋节'), ('2026-09-27', '中秋节'),
    ('2026-10-01', '国庆节'), ('2026-10-02', '国庆节'), ('2026-10-03', '国庆节'), ('2026-10-04', '国庆节'),
    ('2026-10-05', '国庆节'), ('2026-10-06', '国庆节'), ('2026-10-07', '国庆节'),
    ('2027-01-01', '元旦'), ('2027-01-02', '元旦'), ('2027-01-03', '元旦'),
    ('2027-02-05', '春节'), ('2027-02-06', '春节'), ('2027-02-07', '春节'), ('2027-02-08', '春节'),
    ('2027-02-09', '春节'), ('2027-02-10', '春节'), ('2027-02-11', '春节'),
    ('2027-04-03', '清明节'), ('2027-04-04', '清明节'), ('2027-04-05', '清明节'),
    ('2027-05-01', '劳动节'), ('2027-05-02', '劳动节'), ('2027-05-03', '劳动节'), ('2027-05-04', '劳动节'),
    ('2027-05-05', '劳动节'),
    ('2027-06-09', '端午节'), ('2027-06-10', '端午节'), ('2027-06-11', '端午节'),
    ('2027-09-15', '中秋节'), ('2027-09-16', '中秋节'), ('2027-09-17', '中秋节'),
    ('2027-10-01', '国庆节'), ('2027-10-02', '国庆节'), ('2027-10-03', '国庆节'), ('2027-10-04', '国庆节'),
    ('2027-10-05', '国庆节'), ('2027-10-06', '国庆节'), ('2027-10-07', '国庆节')
) AS h(d, n);
INSERT INTO makeup_workdays (day, name)
SELECT d::date, n FROM (VALUES
    ('2026-01-04', '元旦调休'), ('2026-02-14', '春节调休'), ('2026-02-28', '春节调休'),
    ('2026-05-09', '劳动节调休'), ('2026-09-20', '国庆节调休'), ('2026-10-10', '国庆节调休'),
    ('2027-02-20', '春节调休'), ('2027-04-25', '劳动节调休'), ('2027-09-26', '国庆节调休'),
    ('2027-10-09', '国庆节调休')
) AS w(d, n);

-- An escalation: level 1 when an item passes its promised deadline, level 2 when it passes its legal one.
-- Resolved when the item reaches a final state.
CREATE TABLE escalations (
    item_id     uuid        NOT NULL,
    level       smallint    NOT NULL CHECK (level IN (1, 2)),
    raised_at   timestamptz NOT NULL,
    due_at      timestamptz NOT NULL,  -- the deadline that was missed
    resolved_at timestamptz,
    PRIMARY KEY (item_id, level)
);
CREATE INDEX escalations_open ON escalations (item_id) WHERE resolved_at IS NULL;

-- ---- messages to the citizen ----

-- Key events also go out by SMS: a queue the dispatch threads drain through the SMS provider (the phone number
-- is looked up and decrypted there, never stored here).
CREATE TABLE sms_queue (
    sms_id     bigserial   PRIMARY KEY,
    citizen_id uuid        NOT NULL,
    kind       text        NOT NULL,
    text       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz,
    attempts   integer     NOT NULL DEFAULT 0
);
CREATE INDEX sms_queue_unsent ON sms_queue (sms_id) WHERE sent_at IS NULL;

-- A notification of one application's citizen (and an SMS for key events).
CREATE FUNCTION ot_notify(p_app uuid, p_kind text, p_text text, p_sms boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_citizen uuid;
BEGIN
    SELECT citizen_id INTO v_citizen FROM applications WHERE application_id = p_app;
    INSERT INTO notifications (citizen_id, kind, text, application_id) VALUES (v_citizen, p_kind, p_text, p_app);
    IF p_sms THEN
        INSERT INTO sms_queue (citizen_id, kind, text) VALUES (v_citizen, p_kind, p_text);
    END IF;
END
$$;

-- ---- licences ----

CREATE SEQUENCE licence_seq;

-- ---- the catalog as dispatch reads it ----

-- The item definition of `p_code` in catalog version `p_version` (NULL when unknown).
CREATE FUNCTION ot_catalog_item(p_version integer, p_code text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT it FROM catalog_versions v, jsonb_array_elements(v.catalog -> 'items') it
    WHERE v.version = p_version AND it ->> 'code' = p_code
$$;

CREATE FUNCTION ot_item_name(p_version integer, p_code text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(ot_catalog_item(p_version, p_code) ->> 'name', p_code)
$$;

-- The form fields item `p_code` uses in bundle `p_bundle`: [{"name", "type"}, ...] in form order.
CREATE FUNCTION ot_item_fields(p_version integer, p_bundle text, p_code text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('name', f ->> 'name', 'type', f ->> 'type') ORDER BY n), '[]')
    FROM catalog_versions v, jsonb_array_elements(v.catalog -> 'bundles') b,
         jsonb_array_elements(b -> 'form') WITH ORDINALITY AS x(f, n)
    WHERE v.version = p_version AND b ->> 'code' = p_bundle AND (f -> 'items') ? p_code
$$;

-- ---- state changes ----

CREATE FUNCTION ot_item_event(p_item uuid, p_from text, p_to text, p_role text, p_actor text, p_note text)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO item_events (item_id, from_state, to_state, actor_role, actor, note)
    VALUES (p_item, p_from, p_to, p_role, p_actor, p_note)
$$;

-- Moves the blocked items of an application whose dependencies are all issued to `dispatched`, each with an
-- outbox row, and starts their deadline clocks if the submission did not. Returns how many moved.
CREATE FUNCTION ot_release_dependants(p_app uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d     record;
    moved integer := 0;
BEGIN
    FOR d IN
        SELECT i.item_id, i.item_code, i.department, a.catalog_version
        FROM application_items i JOIN applications a USING (application_id)
        WHERE i.application_id = p_app AND i.state = 'blocked_on_dependency'
          AND NOT EXISTS (SELECT 1 FROM unnest(i.depends_on) dep
                          WHERE NOT EXISTS (SELECT 1 FROM application_items x
                                            WHERE x.application_id = p_app AND x.item_code = dep AND x.state = 'issued'))
        ORDER BY i.item_id
        FOR UPDATE OF i
    LOOP
        UPDATE application_items
        SET state = 'dispatched', updated_at = now(), accepted_at = coalesce(accepted_at, now()),
            due_at = coalesce(due_at, ot_add_working_days(now(),
                         coalesce((ot_catalog_item(d.catalog_version, d.item_code) ->> 'promised_days')::integer, 0)))
        WHERE item_id = d.item_id;
        INSERT INTO outbox (item_id, dept, kind) VALUES (d.item_id, d.department, 'dispatch');
        PERFORM ot_item_event(d.item_id, 'blocked_on_dependency', 'dispatched', 'system', 'cityhall',
                              'dependencies issued');
        moved := moved + 1;
    END LOOP;
    RETURN moved;
END
$$;

-- Rejects, transitively, the blocked items that depend on a rejected one: they can never be dispatched.
CREATE FUNCTION ot_reject_dependants(p_app uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d record;
BEGIN
    LOOP
        SELECT i.item_id, x.item_code AS failed INTO d
        FROM application_items i JOIN application_items x
             ON x.application_id = i.application_id AND x.item_code = ANY (i.depends_on) AND x.state = 'rejected'
        WHERE i.application_id = p_app AND i.state = 'blocked_on_dependency'
        LIMIT 1;
        EXIT WHEN NOT FOUND;
        UPDATE application_items SET state = 'rejected', reason = 'depends on ' || d.failed || ', which was rejected',
               updated_at = now()
        WHERE item_id = d.item_id;
        PERFORM ot_item_event(d.item_id, 'blocked_on_dependency', 'rejected', 'system', 'cityhall',
                              'dependency ' || d.failed || ' rejected');
    END LOOP;
END
$$;

-- One decision on an item, from its department's system (p_callback_id set: applied at most once per id) or from
-- a staff member of that department (p_callback_id NULL). Errors: CH404 no such item in this department, CH422
-- the decision does not fit the item's state, CH400 bad supplement fields. A licence (p_licence_*) is inserted
-- on approval: its number, dates and signature were made by the caller just before.
-- Returns the outcome ('applied' or 'duplicate'), the item's state and the application's.
CREATE FUNCTION ot_decide(p_item uuid, p_dept text, p_callback_id text, p_decision text, p_reason text,
                          p_fields text[], p_actor_role text, p_actor text,
                          p_licence_id uuid, p_licence_number text, p_issued_at timestamptz,
                          p_valid_until timestamptz, p_signature text, p_licence_data jsonb)
RETURNS TABLE (outcome text, item_state text, application_state text)
LANGUAGE plpgsql AS $$
DECLARE
    it       application_items%ROWTYPE;
    app      applications%ROWTYPE;
    v_name   text;
    v_to     text;
    v_known  text[];
    v_bad    text[];
    v_seen   callbacks_seen%ROWTYPE;
BEGIN
    IF p_callback_id IS NOT NULL THEN
        INSERT INTO callbacks_seen (dept, callback_id, item_id, decision, state)
        VALUES (p_dept, p_callback_id, p_item, p_decision, '')
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO v_seen FROM callbacks_seen s WHERE s.dept = p_dept AND s.callback_id = p_callback_id;
            outcome := 'duplicate';
            item_state := v_seen.state;
            SELECT a.state INTO application_state
            FROM application_items i JOIN applications a USING (application_id) WHERE i.item_id = v_seen.item_id;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    SELECT * INTO it FROM application_items i WHERE i.item_id = p_item FOR UPDATE;
    IF NOT FOUND OR it.department <> p_dept THEN
        RAISE EXCEPTION 'no such item' USING ERRCODE = 'CH404';
    END IF;
    SELECT * INTO app FROM applications a WHERE a.application_id = it.application_id;
    IF app.state = 'withdrawn' THEN
        RAISE EXCEPTION 'the application was withdrawn' USING ERRCODE = 'CH422';
    END IF;
    v_name := ot_item_name(app.catalog_version, it.item_code);

    IF p_decision = 'in_review' THEN
        IF it.state NOT IN ('dispatched', 'in_review') THEN
            RAISE EXCEPTION 'the item is %, not waiting for review', it.state USING ERRCODE = 'CH422';
        END IF;
        v_to := 'in_review';
        UPDATE application_items SET state = v_to, updated_at = now() WHERE item_id = p_item;

    ELSIF p_decision = 'approve' THEN
        IF it.state NOT IN ('dispatched', 'in_review') OR (p_actor_role = 'staff' AND it.state <> 'in_review') THEN
            RAISE EXCEPTION 'the item is %, not in review', it.state USING ERRCODE = 'CH422';
        END IF;
        INSERT INTO licences (licence_id, licence_number, type, holder_citizen_id, holder_resident_id, issuer,
                              issued_at, valid_until, signature, item_id, data)
        SELECT p_licence_id, p_licence_number, it.item_code, app.citizen_id, c.registry_id, it.department,
               p_issued_at, p_valid_until, p_signature, p_item, coalesce(p_licence_data, '{}')
        FROM citizens c WHERE c.citizen_id = app.citizen_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the applicant has no account' USING ERRCODE = 'CH422';
        END IF;
        PERFORM ot_item_event(p_item, it.state, 'approved', p_actor_role, p_actor, NULL);
        v_to := 'issued';
        UPDATE application_items SET state = v_to, licence_id = p_licence_id, reason = NULL, updated_at = now()
        WHERE item_id = p_item;
        PERFORM ot_notify(app.application_id, 'item_issued',
                          '「' || v_name || '」已办结，电子证照 ' || p_licence_number || ' 已签发', false);
        PERFORM ot_release_dependants(app.application_id);

    ELSIF p_decision = 'reject' THEN
        IF it.state NOT IN ('dispatched', 'in_review', 'supplement_requested', 'failed_technical')
           OR (p_actor_role = 'staff' AND it.state NOT IN ('in_review', 'failed_technical')) THEN
            RAISE EXCEPTION 'the item is %, not in review', it.state USING ERRCODE = 'CH422';
        END IF;
        IF coalesce(btrim(p_reason), '') = '' THEN
            RAISE EXCEPTION 'reason: required when rejecting' USING ERRCODE = 'CH400';
        END IF;
        v_to := 'rejected';
        UPDATE application_items
        SET state = v_to, reason = p_reason, updated_at = now(),
            paused_seconds = paused_seconds + CASE WHEN paused_at IS NULL THEN 0
                                                   ELSE floor(extract(epoch FROM now() - paused_at))::bigint END,
            paused_at = NULL
        WHERE item_id = p_item;
        PERFORM ot_reject_dependants(app.application_id);
        PERFORM ot_notify(app.application_id, 'item_rejected', '「' || v_name || '」未通过审核：' || p_reason, true);

    ELSIF p_decision = 'request_supplement' THEN
        IF it.state NOT IN ('dispatched', 'in_review') OR (p_actor_role = 'staff' AND it.state <> 'in_review') THEN
            RAISE EXCEPTION 'the item is %, not in review', it.state USING ERRCODE = 'CH422';
        END IF;
        IF coalesce(cardinality(p_fields), 0) = 0 THEN
            RAISE EXCEPTION 'fields: name the fields the citizen must supply again' USING ERRCODE = 'CH400';
        END IF;
        SELECT coalesce(array_agg(f ->> 'name'), '{}') INTO v_known
        FROM jsonb_array_elements(ot_item_fields(app.catalog_version, app.bundle_code, it.item_code)) f;
        SELECT array_agg(x ORDER BY n) INTO v_bad FROM unnest(p_fields) WITH ORDINALITY AS u(x, n)
        WHERE NOT x = ANY (v_known);
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'fields: not fields of this item: %', array_to_string(v_bad, ', ') USING ERRCODE = 'CH400';
        END IF;
        v_to := 'supplement_requested';
        UPDATE application_items
        SET state = v_to, supplement_fields = ARRAY(SELECT DISTINCT unnest(p_fields) ORDER BY 1),
            reason = nullif(btrim(coalesce(p_reason, '')), ''), paused_at = now(), updated_at = now()
        WHERE item_id = p_item;
        PERFORM ot_notify(app.application_id, 'supplement_requested',
                          '「' || v_name || '」需要补充材料：' || array_to_string(p_fields, '、')
                          || coalesce('（' || nullif(btrim(coalesce(p_reason, '')), '') || '）', ''), true);

    ELSIF p_decision = 'retry' AND p_callback_id IS NULL THEN
        IF it.state <> 'failed_technical' THEN
            RAISE EXCEPTION 'only an item that failed to reach its department can be retried (it is %)', it.state
                USING ERRCODE = 'CH422';
        END IF;
        v_to := 'dispatched';
        UPDATE application_items SET state = v_to, updated_at = now() WHERE item_id = p_item;
        INSERT INTO outbox (item_id, dept, kind) VALUES (p_item, it.department, 'dispatch');

    ELSE
        RAISE EXCEPTION 'decision: expected %',
            CASE WHEN p_callback_id IS NULL THEN 'approve, reject, request_supplement or retry'
                 ELSE 'in_review, approve, reject or request_supplement' END
            USING ERRCODE = 'CH400';
    END IF;

    IF it.state <> v_to THEN
        PERFORM ot_item_event(p_item, CASE WHEN p_decision = 'approve' THEN 'approved' ELSE it.state END, v_to,
                              p_actor_role, p_actor, p_reason);
    END IF;
    IF v_to IN ('issued', 'rejected') THEN
        UPDATE escalations SET resolved_at = now() WHERE item_id = p_item AND resolved_at IS NULL;
    END IF;
    application_state := ot_refresh_application(app.application_id);
    IF application_state IN ('completed', 'partially_completed', 'rejected')
       AND app.state NOT IN ('completed', 'partially_completed', 'rejected') THEN
        PERFORM ot_notify(app.application_id, 'application_' || application_state,
                          CASE application_state WHEN 'completed' THEN '您的申请已全部办结'
                                                 WHEN 'partially_completed' THEN '您的申请已办结，部分事项未通过'
                                                 ELSE '您的申请未通过' END, true);
    END IF;
    IF p_callback_id IS NOT NULL THEN
        UPDATE callbacks_seen s SET state = v_to WHERE s.dept = p_dept AND s.callback_id = p_callback_id;
    END IF;
    outcome := 'applied';
    item_state := v_to;
    RETURN NEXT;
END
$$;

-- The outcome of one worker batch, applied set-wise (this runs for every item dispatched). Times are taken when
-- the batch is settled (clock_timestamp), not when its transaction began: deliveries happened in between.
-- For each outbox row:
-- 'delivered' (the department answered 2xx), 'queued' (no endpoint: the item joins the staff queue),
-- 'failed' (an error or non-2xx: retried after p_delays_ms, or failed for good after p_max_attempts),
-- 'deferred' (not tried: its endpoint failed earlier in the batch; no attempt counted),
-- 'cancelled' (the item no longer waits for dispatch: withdrawn, decided meanwhile).
-- Rows no longer pending (a withdrawal cancelled them meanwhile) are left as they are. A delivery moves its item
-- from dispatched to in_review (the outbox row is its record: no item event), and tells the applicant's access
-- log which department now holds which items' form values: one entry per applicant and department per batch,
-- through access_log_pending.
-- Failed attempts are kept in dispatch_attempts. Returns how many items gave up (failed_technical).
CREATE FUNCTION ot_outbox_settle(p_ids bigint[], p_outcomes text[], p_errors text[], p_delays_ms integer[],
                                 p_max_attempts integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_logs   text[];
    v_failed uuid[];
    v_apps   uuid[];
    v_item   uuid;
    r        record;
BEGIN
    WITH s AS (
        SELECT * FROM unnest(p_ids, p_outcomes, p_errors, p_delays_ms) AS s(outbox_id, outcome, error, delay_ms)
    ), u AS (
        UPDATE outbox o
        SET attempts = o.attempts + CASE WHEN s.outcome IN ('delivered', 'failed') THEN 1 ELSE 0 END,
            state = CASE WHEN s.outcome IN ('delivered', 'queued') THEN 'delivered'
                         WHEN s.outcome = 'cancelled' THEN 'cancelled'
                         WHEN s.outcome = 'failed' AND o.attempts + 1 >= p_max_attempts THEN 'failed'
                         ELSE 'pending' END,
            delivered_at = CASE WHEN s.outcome IN ('delivered', 'queued') THEN clock_timestamp() ELSE o.delivered_at END,
            next_attempt_at = CASE WHEN s.outcome IN ('failed', 'deferred')
                                   THEN clock_timestamp() + s.delay_ms * interval '1 millisecond'
                                   ELSE o.next_attempt_at END,
            last_error = CASE WHEN s.outcome IN ('failed', 'cancelled') THEN s.error ELSE o.last_error END
        FROM s
        WHERE o.outbox_id = ANY (p_ids) AND o.outbox_id = s.outbox_id AND o.state = 'pending'
        RETURNING o.outbox_id, o.item_id, o.state, o.dept, s.outcome, s.error
    ), attempts AS (
        INSERT INTO dispatch_attempts (outbox_id, item_id, status, error)
        SELECT outbox_id, item_id, 'failed', error FROM u WHERE outcome = 'failed'
    ), moved AS (
        UPDATE application_items i SET state = 'in_review', updated_at = clock_timestamp()
        FROM u WHERE i.item_id = u.item_id AND u.state = 'delivered' AND i.state = 'dispatched'
        RETURNING i.item_id, i.application_id
    ), gave_up AS (
        UPDATE application_items i SET state = 'failed_technical', updated_at = clock_timestamp()
        FROM u WHERE i.item_id = u.item_id AND u.state = 'failed' AND u.outcome = 'failed' AND i.state = 'dispatched'
        RETURNING i.item_id, i.application_id
    )
    SELECT (SELECT array_agg(item_id ORDER BY item_id) FROM gave_up),
           (SELECT array_agg(DISTINCT application_id ORDER BY application_id)
            FROM (SELECT application_id FROM moved UNION SELECT application_id FROM gave_up) c),
           (SELECT array_agg(a.citizen_id::text || '|' || x.dept || '|' || x.codes ORDER BY a.citizen_id, x.dept)
            FROM (SELECT i.application_id, u.dept, string_agg(i.item_code, ', ' ORDER BY i.item_code) AS codes
                  FROM u JOIN application_items i ON i.item_id = u.item_id
                  WHERE u.outcome = 'delivered'
                  GROUP BY i.application_id, u.dept) x
                 JOIN applications a USING (application_id))
    INTO v_failed, v_apps, v_logs;

    -- the applications whose items moved: accepted -> in_progress (in application order, as every writer locks them)
    PERFORM ot_refresh_application(x) FROM unnest(coalesce(v_apps, '{}')) AS x ORDER BY x;

    -- the department's system now holds these form values: the citizen sees it in the access log (appended by
    -- ot_access_log_drain shortly)
    INSERT INTO access_log_pending (citizen_id, actor_role, actor, actor_dept, action, purpose)
    SELECT split_part(e, '|', 1)::uuid, 'dept', split_part(e, '|', 2), split_part(e, '|', 2), 'onething.dispatch',
           'one-thing items sent to the department: ' || split_part(e, '|', 3)
    FROM unnest(coalesce(v_logs, '{}')) AS e;

    -- retries exhausted: the item waits for staff, and the citizen is told
    FOREACH v_item IN ARRAY coalesce(v_failed, '{}') LOOP
        SELECT i.application_id, i.item_code, a.catalog_version INTO r
        FROM application_items i JOIN applications a USING (application_id) WHERE i.item_id = v_item;
        PERFORM ot_item_event(v_item, 'dispatched', 'failed_technical', 'system', 'cityhall',
                              'delivery failed ' || p_max_attempts || ' times');
        PERFORM ot_notify(r.application_id, 'item_delayed',
                          '「' || ot_item_name(r.catalog_version, r.item_code)
                          || '」暂时无法送达办理部门，工作人员将跟进处理', false);
    END LOOP;
    RETURN coalesce(cardinality(v_failed), 0);
END
$$;

-- An item's deadline as it stands: due_at moved on by the time the item waited for the citizen (paused_seconds,
-- and while it waits, the time since paused_at).
CREATE FUNCTION ot_effective_due(p_due timestamptz, p_paused_seconds bigint, p_paused_at timestamptz,
                                 p_now timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_due + make_interval(secs => p_paused_seconds
                                         + CASE WHEN p_paused_at IS NULL OR p_now < p_paused_at THEN 0
                                                ELSE extract(epoch FROM p_now - p_paused_at) END)
$$;

-- The deadline sweep at `p_now`: raises level 1 escalations for items past their promised deadline and level 2
-- for items past their legal one (both moved on by the time the item waited for the citizen), and notifies the
-- citizen once per escalation. Items waiting for the citizen (supplement_requested) are not overdue.
-- Returns the escalations raised. One sweep at a time (an advisory lock; other sweepers skip).
CREATE FUNCTION ot_sweep(p_now timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r      record;
    raised integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended('ot_sweep', 0)) THEN
        RETURN 0;
    END IF;
    FOR r IN
        SELECT i.item_id, i.application_id, i.item_code, a.catalog_version, d.level, d.due
        FROM application_items i JOIN applications a USING (application_id),
             LATERAL (SELECT 1 AS level, i.due_at + make_interval(secs => i.paused_seconds) AS due
                      UNION ALL
                      SELECT 2, ot_add_working_days(i.accepted_at,
                                    (ot_catalog_item(a.catalog_version, i.item_code) ->> 'legal_days')::integer)
                                + make_interval(secs => i.paused_seconds)
                      WHERE i.accepted_at IS NOT NULL
                        AND ot_catalog_item(a.catalog_version, i.item_code) ? 'legal_days') d
        WHERE i.state IN ('dispatched', 'in_review', 'failed_technical') AND i.due_at <= p_now
          AND a.state <> 'withdrawn' AND d.due IS NOT NULL AND d.due <= p_now
          AND NOT EXISTS (SELECT 1 FROM escalations e WHERE e.item_id = i.item_id AND e.level = d.level)
        ORDER BY i.item_id, d.level
    LOOP
        INSERT INTO escalations (item_id, level, raised_at, due_at) VALUES (r.item_id, r.level, p_now, r.due)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            raised := raised + 1;
            PERFORM ot_item_event(r.item_id, NULL, 'escalated', 'system', 'sweeper',
                                  CASE r.level WHEN 1 THEN 'past the promised deadline' ELSE 'past the legal deadline' END);
            PERFORM ot_notify(r.application_id, 'item_escalated',
                              '「' || ot_item_name(r.catalog_version, r.item_code) || '」已超过'
                              || CASE r.level WHEN 1 THEN '承诺' ELSE '法定' END || '办结时限，已督办', r.level = 2);
        END IF;
    END LOOP;
    RETURN raised;
END
$$;
