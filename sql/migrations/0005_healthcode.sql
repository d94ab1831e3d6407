-- Health code: versioned rule sets, the codes themselves, the inputs they are computed from (declarations, test
-- results, risk areas, quarantine orders, contact marks, appeal overrides), notices, and the recompute queue.
--
-- Health status is sensitive personal data (PIPL art. 28): these tables key people by registry resident id only
-- (never an ID number), and reasons carry no personal data.
--
-- Growth: test_results, declarations and contact_marks grow without bound. Partitioning them by time (monthly, on
-- sample_time / declared_at / marked_at, the primary key then including that column) is the planned next step;
-- every query here filters by resident and time, so nothing depends on the tables being unpartitioned.

-- ---- rule sets ----

-- The rules as versioned data: thresholds, windows and the color of each reason (services/healthcode/rules.c
-- defines the schema and the evaluation order). `cityhall rules load FILE.json` inserts the next version and makes
-- it the active one in one transaction; gateways pick it up within seconds (NOTIFY hc_rules, and a poll).
-- Exactly one rule set is active: at most one by the unique index, at least one by the deferred check.
CREATE TABLE rule_sets (
    version   integer     PRIMARY KEY CHECK (version >= 1),
    rules     jsonb       NOT NULL CHECK (jsonb_typeof(rules) = 'object'),
    loaded_at timestamptz NOT NULL DEFAULT now(),
    active    boolean     NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX rule_sets_one_active ON rule_sets ((true)) WHERE active;

CREATE FUNCTION rule_sets_check_active() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(*) FROM rule_sets WHERE active) <> 1 THEN
        RAISE EXCEPTION 'exactly one rule set must be active' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER rule_sets_exactly_one_active AFTER INSERT OR UPDATE OR DELETE ON rule_sets
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION rule_sets_check_active();

-- Gateways LISTEN on hc_rules (their background thread) and reload the active rule set at once.
CREATE FUNCTION rule_sets_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hc_rules', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER rule_sets_changed AFTER INSERT OR UPDATE OR DELETE ON rule_sets
    FOR EACH STATEMENT EXECUTE FUNCTION rule_sets_notify();

-- Rule set 1. tests/unit/test_rules.c reads this dollar-quoted document out of this file and checks it against the
-- engine's schema, so the text cannot drift from what the C code accepts.
INSERT INTO rule_sets (version, rules, active) VALUES (1, $rules$
{
    "lookback_days": 14,
    "fever_threshold_c": 37.3,
    "negative_tests_to_clear": 2,
    "negative_test_spacing_hours": 24,
    "required_test_hours": 48,
    "visit_window_days": 14,
    "reason_colors": {
        "POSITIVE_TEST": "red",
        "CLOSE_CONTACT": "red",
        "HIGH_RISK_AREA": "red",
        "QUARANTINE": "red",
        "SYMPTOMS": "yellow",
        "FEVER": "yellow",
        "MEDIUM_RISK_AREA": "yellow",
        "SECONDARY_CONTACT": "yellow",
        "TEST_OVERDUE": "yellow"
    }
}
$rules$::jsonb, true);

-- ---- the codes ----

-- One row per resident whose code was ever computed (rows are materialised by the first recompute, i.e. the first
-- input that concerns the resident). A resident without a row is green with no reasons under the active rule set.
-- `version` increases with every change of color, reasons or rule version: caches compare it. `as_of` is when the
-- code last changed. Written only by services/healthcode/recompute.c.
CREATE TABLE health_codes (
    resident_id  bigint      PRIMARY KEY REFERENCES registry_residents (resident_id),
    code_id      uuid        NOT NULL UNIQUE DEFAULT gen_random_uuid(), -- pseudonymous: the QR token's sub
    color        text        NOT NULL CHECK (color IN ('green', 'yellow', 'red')),
    reasons      jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(reasons) = 'array'),
    rule_version integer     NOT NULL,
    as_of        timestamptz NOT NULL,
    version      bigint      NOT NULL DEFAULT 1 CHECK (version >= 1),
    updated_at   timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80); -- room for HOT updates: a recompute changes no indexed column

-- ---- the recompute queue ----

-- One row per resident whose code must be computed again: now (an input arrived: due_at = now()) or later (the
-- code changes with time alone, e.g. a 14-day look-back ending: due_at = that moment). `seq` changes with every
-- enqueue; a recompute reads it before the inputs and writes its result only if the row still has that seq (then
-- deletes or reschedules it). So a result computed from inputs that were already stale when it was written is never
-- stored, whoever computes (the request that brought the input, or the background drainer of any gateway), and an
-- input is never left unprocessed: the row stays until a recompute that saw it succeeds.
-- Every input table below enqueues from a trigger, in the transaction that writes the input: writers need not
-- remember to, and the invariant "a committed input has a queue row with a newer seq" holds for every writer.
CREATE SEQUENCE hc_recompute_seq;
CREATE TABLE hc_recompute_queue (
    resident_id bigint      PRIMARY KEY,      -- no foreign key: a queue row must never block a registry operation
    seq         bigint      NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    due_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hc_recompute_queue_due ON hc_recompute_queue (due_at);

-- Queues residents for a recompute now (in resident order, so that two bulk enqueues lock rows in one order). One
-- sequence value serves the whole call: a seq only has to differ from the values its row had before.
CREATE FUNCTION hc_enqueue(p_residents bigint[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO hc_recompute_queue (resident_id, seq, enqueued_at, due_at)
    SELECT s.r, n.v, now(), now()
    FROM (SELECT DISTINCT r FROM unnest(p_residents) AS u(r) WHERE r IS NOT NULL ORDER BY r) s,
         (SELECT nextval('hc_recompute_seq') AS v) n
    ON CONFLICT (resident_id) DO UPDATE SET seq = EXCLUDED.seq, enqueued_at = EXCLUDED.enqueued_at,
                                            due_at = EXCLUDED.due_at
$$;

CREATE FUNCTION hc_enqueue_new_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM hc_enqueue(ARRAY(SELECT resident_id FROM new_rows));
    RETURN NULL;
END
$$;

CREATE FUNCTION hc_enqueue_old_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM hc_enqueue(ARRAY(SELECT resident_id FROM old_rows));
    RETURN NULL;
END
$$;

-- ---- inputs ----

-- A citizen's health declaration (健康申报), for themselves or a dependent. `declared_by` is the citizen account;
-- (declared_by, idem_key) makes a retried POST idempotent, request_hash tells a retry from another request.
CREATE TABLE declarations (
    declaration_id         bigserial   PRIMARY KEY,
    resident_id            bigint      NOT NULL REFERENCES registry_residents (resident_id),
    declared_at            timestamptz NOT NULL DEFAULT now(),
    symptoms               text[]      NOT NULL DEFAULT '{}' CHECK (cardinality(symptoms) <= 16),
    temperature_c          double precision CHECK (temperature_c IS NULL OR temperature_c BETWEEN 34 AND 43),
    visited_regions        text[]      NOT NULL DEFAULT '{}' CHECK (cardinality(visited_regions) <= 30),
    contact_with_confirmed boolean     NOT NULL DEFAULT false,
    declared_by            uuid        NOT NULL,
    idem_key               text,
    request_hash           bytea,
    UNIQUE (declared_by, idem_key)
);
CREATE INDEX declarations_resident ON declarations (resident_id, declared_at DESC);
CREATE INDEX declarations_contact ON declarations (resident_id, declared_at DESC) WHERE contact_with_confirmed;
-- a risk-area upload finds who declared a visit to its regions
CREATE INDEX declarations_regions ON declarations USING gin (visited_regions);

-- Test results from the health authority's labs (核酸检测结果). No foreign key: the upload checks every row against
-- the registry in bulk, and a row trigger per insert would cost more than the insert (10 000 rows a request).
CREATE TABLE test_results (
    result_id   bigserial   PRIMARY KEY,
    resident_id bigint      NOT NULL,
    sample_time timestamptz NOT NULL,
    result      text        NOT NULL CHECK (result IN ('positive', 'negative')),
    lab         text        NOT NULL CHECK (lab ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    received_at timestamptz NOT NULL DEFAULT now()
);
-- the latest tests of a resident
CREATE INDEX test_results_resident ON test_results (resident_id, sample_time DESC);
-- the latest positive of a resident, however many negatives came after it
CREATE INDEX test_results_positive ON test_results (resident_id, sample_time DESC) WHERE result = 'positive';

-- Risk areas (中高风险地区) as uploaded, history kept: for a region and a moment, the record covering that moment that
-- was uploaded last decides (a new upload supersedes earlier ones for its window only).
CREATE TABLE risk_areas (
    area_id     bigserial   PRIMARY KEY,
    region      text        NOT NULL CHECK (region ~ '^[0-9]{6}$'),
    level       text        NOT NULL CHECK (level IN ('high', 'medium', 'low')),
    valid_from  timestamptz NOT NULL,
    valid_until timestamptz NOT NULL,
    uploaded_at timestamptz NOT NULL DEFAULT now(),
    uploaded_by text        NOT NULL,
    CHECK (valid_until > valid_from)
);
CREATE INDEX risk_areas_region ON risk_areas (region, valid_until);
-- a risk-area upload finds the residents of its regions (identity's table; the index is for this module's query)
CREATE INDEX registry_residents_region ON registry_residents (region);

-- Quarantine (medical observation, 医学观察) orders and releases, as events.
CREATE TABLE quarantine_orders (
    order_id    uuid        PRIMARY KEY,
    resident_id bigint      NOT NULL REFERENCES registry_residents (resident_id),
    kind        text        NOT NULL CHECK (kind IN ('order', 'release')),
    at          timestamptz NOT NULL,
    place       text        NOT NULL DEFAULT '' CHECK (length(place) <= 200),
    recorded_at timestamptz NOT NULL DEFAULT now(),
    recorded_by text        NOT NULL   -- the department client
);
CREATE INDEX quarantine_orders_resident ON quarantine_orders (resident_id, kind, at DESC);

-- Notices issued to a resident (解除医学观察通知书 on a release), listed by GET /v1/health/notices. No personal data
-- in title or body beyond what the resident already knows (dates only).
CREATE TABLE notices (
    notice_id   uuid        PRIMARY KEY,
    resident_id bigint      NOT NULL REFERENCES registry_residents (resident_id),
    kind        text        NOT NULL CHECK (kind IN ('quarantine_release')),
    title       text        NOT NULL,
    body        text        NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    order_id    uuid        REFERENCES quarantine_orders (order_id)
);
CREATE INDEX notices_resident ON notices (resident_id, issued_at DESC);

-- Contacts found by check-in overlap with a confirmed case (venues.c writes them): 'close' (same venue, same time:
-- red until released) or 'secondary' (one remove: yellow for the look-back).
CREATE TABLE contact_marks (
    mark_id     bigserial   PRIMARY KEY,
    resident_id bigint      NOT NULL REFERENCES registry_residents (resident_id),
    kind        text        NOT NULL CHECK (kind IN ('close', 'secondary')),
    source_case text        NOT NULL CHECK (length(source_case) BETWEEN 1 AND 64), -- the case's id, never an ID number
    marked_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX contact_marks_resident ON contact_marks (resident_id, kind, marked_at DESC);

-- An approved appeal's decision (appeals.c writes it after the second staff member agreed): the code takes `color`
-- from decided_at until expires_at, over every reason known at decided_at (a later event still counts).
CREATE TABLE health_overrides (
    override_id bigserial   PRIMARY KEY,
    resident_id bigint      NOT NULL REFERENCES registry_residents (resident_id),
    color       text        NOT NULL CHECK (color IN ('green', 'yellow', 'red')),
    reason      text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    appeal_id   text        NOT NULL CHECK (length(appeal_id) BETWEEN 1 AND 64),
    decided_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CHECK (expires_at > decided_at)
);
CREATE INDEX health_overrides_resident ON health_overrides (resident_id, decided_at DESC);

-- ---- every input enqueues its residents, in its own transaction ----

CREATE TRIGGER declarations_enqueue AFTER INSERT ON declarations
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hc_enqueue_new_rows();
CREATE TRIGGER test_results_enqueue AFTER INSERT ON test_results
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hc_enqueue_new_rows();
CREATE TRIGGER quarantine_orders_enqueue AFTER INSERT ON quarantine_orders
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hc_enqueue_new_rows();
CREATE TRIGGER contact_marks_enqueue AFTER INSERT ON contact_marks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hc_enqueue_new_rows();
CREATE TRIGGER health_overrides_enqueue AFTER INSERT ON health_overrides
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hc_enqueue_new_rows();
-- an override revoked or shortened (UPDATE) or removed (DELETE) changes the code too
CREATE TRIGGER health_overrides_enqueue_update AFTER UPDATE ON health_overrides
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hc_enqueue_new_rows();
CREATE TRIGGER health_overrides_enqueue_delete AFTER DELETE ON health_overrides
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION hc_enqueue_old_rows();

-- A risk-area upload concerns the residents of its regions and those who declared a visit to one of them within
-- the active rule set's look-back (a visit counts only while its declaration is within the look-back).
CREATE FUNCTION hc_enqueue_risk_areas() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_regions text[] := ARRAY(SELECT DISTINCT region FROM new_rows);
    v_days    integer := coalesce((SELECT (rules ->> 'lookback_days')::integer FROM rule_sets WHERE active), 14);
BEGIN
    PERFORM hc_enqueue(ARRAY(
        SELECT resident_id FROM registry_residents WHERE region::text = ANY (v_regions)
        UNION
        SELECT resident_id FROM declarations
        WHERE visited_regions && v_regions AND declared_at > now() - make_interval(days => v_days)));
    RETURN NULL;
END
$$;
CREATE TRIGGER risk_areas_enqueue AFTER INSERT ON risk_areas
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION hc_enqueue_risk_areas();

-- Records a quarantine order or release (QuarantineRequest) with, for a release, its notice. A release needs an
-- order not yet released (CH422 otherwise: the transaction, Idempotency-Key claim included, rolls back).
CREATE FUNCTION hc_quarantine_record(p_order_id uuid, p_resident bigint, p_kind text, p_at timestamptz, p_place text,
                                     p_by text, p_notice_id uuid, p_title text, p_body text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- one writer per resident at a time, so that two releases cannot both see the order open
    PERFORM pg_advisory_xact_lock(hashtextextended('hc_quarantine:' || p_resident::text, 0));
    IF p_kind = 'release' AND NOT EXISTS (
            SELECT 1 FROM quarantine_orders o WHERE o.resident_id = p_resident AND o.kind = 'order'
            AND o.at <= p_at AND o.at > coalesce((SELECT max(r.at) FROM quarantine_orders r
                                                  WHERE r.resident_id = p_resident AND r.kind = 'release'),
                                                 '-infinity')) THEN
        RAISE EXCEPTION 'no open quarantine order to release' USING ERRCODE = 'CH422';
    END IF;
    INSERT INTO quarantine_orders (order_id, resident_id, kind, at, place, recorded_by)
    VALUES (p_order_id, p_resident, p_kind, p_at, p_place, p_by);
    IF p_kind = 'release' THEN
        INSERT INTO notices (notice_id, resident_id, kind, title, body, issued_at, order_id)
        VALUES (p_notice_id, p_resident, 'quarantine_release', p_title, p_body, now(), p_order_id);
    END IF;
END
$$;
