/* Health-code inputs: declarations, test results, risk areas, quarantine orders, notices; `cityhall rules load`. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libpq-fe.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include "cityhall/audit.h"
#include "cityhall/pii.h"
#include "recompute.h"

typedef Cityhall__Healthcode__V1__DeclarationRequest DeclarationRequest;
typedef Cityhall__Healthcode__V1__TestResultBatch TestResultBatch;
typedef Cityhall__Healthcode__V1__TestResult TestResult;
typedef Cityhall__Healthcode__V1__BatchResponse BatchResponse;
typedef Cityhall__Healthcode__V1__RowError RowError;
typedef Cityhall__Healthcode__V1__RiskAreaBatch RiskAreaBatch;
typedef Cityhall__Healthcode__V1__RiskArea RiskArea;
typedef Cityhall__Healthcode__V1__QuarantineRequest QuarantineRequest;
typedef Cityhall__Healthcode__V1__QuarantineResponse QuarantineResponse;
typedef Cityhall__Healthcode__V1__Notice Notice;
typedef Cityhall__Healthcode__V1__NoticeList NoticeList;
typedef Google__Protobuf__Timestamp Timestamp;

#define TEST_ROWS_MAX   10000
#define AREAS_MAX       1000
#define REGIONS_MAX     30
#define SYMPTOMS_MAX    16
#define NOTICES_MAX     100
#define FUTURE_SKEW_S   300        /* a sample or event time may be this far ahead of our clock */
#define EARLIEST_S      1575158400 /* 2019-12-01: nothing in these inputs is older */
#define PLACE_MAX_BYTES 200
#define RULES_FILE_MAX  65536

/* The symptoms a declaration may name (the mini-program's check boxes). */
static const char *const symptom_names[] = {
    "fever",    "cough",       "sore_throat", "fatigue",  "loss_of_taste", "loss_of_smell", "shortness_of_breath",
    "headache", "muscle_ache", "chills",      "diarrhea", "nausea",        "runny_nose",    "congestion",
    NULL,
};

/* ---- statements ---- */

/*
 * A declaration, idempotent by (declared_by, Idempotency-Key): a retry inserts nothing. $1 resident, $2 symptoms,
 * $3 temperature (NULL: not measured), $4 regions, $5 contact flag, $6 citizen account, $7 key (NULL: none),
 * $8 request hash (hex). Columns: the hash and resident of the request that holds the key (ours when inserted).
 * DO UPDATE (of nothing) rather than DO NOTHING: it returns the row holding the key even when a concurrent request
 * committed it after this statement's snapshot, which a SELECT here could not see.
 */
static const ch_pg_stmt_t stmt_declare = {
    "hc_in_declare",
    "INSERT INTO declarations (resident_id, symptoms, temperature_c, visited_regions, contact_with_confirmed, "
    "                          declared_by, idem_key, request_hash) "
    "VALUES ($1::bigint, $2::text[], $3::double precision, $4::text[], $5::boolean, $6::uuid, $7, decode($8, 'hex')) "
    "ON CONFLICT (declared_by, idem_key) DO UPDATE SET idem_key = EXCLUDED.idem_key "
    "RETURNING encode(request_hash, 'hex'), resident_id",
    8};

/*
 * For the statements over thousands of rows: their estimated cost sets off JIT compilation, which takes longer than
 * running them (20-40 ms on these machines). Transaction-scoped: it ends with the submission.
 */
static const ch_pg_stmt_t stmt_no_jit = {"hc_in_no_jit", "SELECT set_config('jit', 'off', true)", 0};

/*
 * $1 ID hashes (hex text[]), in row order. Columns: position (1-based), resident or NULL. One index probe per row,
 * by construction: as a join, the planner merges 10 000 sorted hashes with the whole id_hmac index once the
 * registry is large (160 000 residents: 210 ms, a heap fetch per resident in random order, against 15 ms).
 */
static const ch_pg_stmt_t stmt_match = {
    "hc_in_match",
    "SELECT h.i, (SELECT r.resident_id FROM registry_residents r WHERE r.id_hmac = decode(h.hex, 'hex')) "
    "FROM unnest($1::text[]) WITH ORDINALITY AS h(hex, i)",
    1};

/* One multi-row insert from arrays: $1 residents, $2 sample times (µs), $3 results, $4 labs. Triggers enqueue. */
static const ch_pg_stmt_t stmt_tests_insert = {
    "hc_in_tests_insert",
    "INSERT INTO test_results (resident_id, sample_time, result, lab) "
    "SELECT u.r, timestamptz 'epoch' + u.t * interval '1 microsecond', u.res, u.lab "
    "FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[]) AS u(r, t, res, lab)",
    4};

/*
 * The access-log entries of a department write about many residents, in one statement: one entry per resident
 * that has a citizen account, with the actor fields ch_audit_query derives from the principal ($2..$7, as
 * ch_audit_stmt_append takes them). In citizen order: access_log_append locks per citizen.
 */
static const ch_pg_stmt_t stmt_audit_many = {
    "hc_in_audit_many",
    "SELECT count(access_log_append(c.citizen_id, $2, $3, $4, $5, $6, $7)) FROM "
    "(SELECT citizen_id FROM citizens WHERE registry_id = ANY ($1::bigint[]) ORDER BY citizen_id) c",
    7};

/* $1 regions, $2 levels, $3 from (µs), $4 until (µs), $5 uploader. Triggers enqueue the residents concerned. */
static const ch_pg_stmt_t stmt_areas_insert = {
    "hc_in_areas_insert",
    "INSERT INTO risk_areas (region, level, valid_from, valid_until, uploaded_by) "
    "SELECT u.region, u.level, timestamptz 'epoch' + u.f * interval '1 microsecond', "
    "       timestamptz 'epoch' + u.t * interval '1 microsecond', $5 "
    "FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(region, level, f, t)",
    5};

/* $1 ID hash (hex). Columns: resident, the resident's citizen account or NULL. */
static const ch_pg_stmt_t stmt_resident = {
    "hc_in_resident",
    "SELECT r.resident_id, (SELECT c.citizen_id::text FROM citizens c WHERE c.registry_id = r.resident_id) "
    "FROM registry_residents r WHERE r.id_hmac = decode($1, 'hex')",
    1};

/*
 * hc_quarantine_record (migration 0005): order or release, and a release's notice. $4 the time in µs, NULL for the
 * database's now() (the clock the rules evaluate with: an order "now" by this host's clock, a little ahead, would
 * otherwise look like one that starts later).
 */
static const ch_pg_stmt_t stmt_quarantine = {
    "hc_in_quarantine",
    "SELECT hc_quarantine_record($1::uuid, $2::bigint, $3, "
    "       coalesce(timestamptz 'epoch' + $4::bigint * interval '1 microsecond', now()), $5, $6, $7::uuid, $8, $9)",
    9};

/* $1 resident. The latest notices first. */
static const ch_pg_stmt_t stmt_notices = {
    "hc_in_notices",
    "SELECT notice_id::text, kind, title, body, (extract(epoch FROM issued_at) * 1000000)::bigint FROM notices "
    "WHERE resident_id = $1::bigint ORDER BY issued_at DESC, notice_id LIMIT 100",
    1};

const ch_pg_stmt_t *const hc_inputs_stmts[] = {
    &stmt_no_jit,
    &stmt_declare,
    &stmt_match,
    &stmt_tests_insert,
    &stmt_audit_many,
    &stmt_areas_insert,
    &stmt_resident,
    &stmt_quarantine,
    &stmt_notices,
    &hc_rc_stmt_state,
    &hc_rc_stmt_tests,
    &hc_rc_stmt_decls,
    &hc_rc_stmt_areas,
    &hc_rc_stmt_events,
    &hc_rc_stmt_write,
    &hc_stmt_enqueue_recompute,
    NULL,
};

int hc_init_inputs(const ch_config_t *config)
{
    return hc_recompute_start(config);
}

/* ---- small helpers ---- */

static int64_t ts_us(const Timestamp *t)
{
    return t->seconds * HC_US_PER_S + t->nanos / 1000;
}

static Timestamp *ts_new(ch_call_t *call, int64_t us)
{
    Timestamp *t = ch_call_alloc(call, sizeof(*t));
    google__protobuf__timestamp__init(t);
    t->seconds = us / HC_US_PER_S;
    t->nanos = (int32_t)(us % HC_US_PER_S) * 1000;
    if (t->nanos < 0) {
        t->nanos += 1000000000;
        t->seconds -= 1;
    }
    return t;
}

/* A sample or event time: set, not before 2019-12-01, not more than FUTURE_SKEW_S ahead. NULL or why not. */
static const char *time_problem(const Timestamp *t)
{
    if (t == NULL)
        return "required";
    if (t->seconds < EARLIEST_S)
        return "before 2019-12-01";
    if (t->seconds > (int64_t)time(NULL) + FUTURE_SKEW_S)
        return "in the future";
    return NULL;
}

static int region_ok(const char *s)
{
    return strlen(s) == 6 && strspn(s, "0123456789") == 6;
}

/* A lab id: 1 to 64 of [A-Za-z0-9._-], starting with a letter or digit (also safe inside an array literal). */
static int lab_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64 || s[0] == '.' || s[0] == '_' || s[0] == '-')
        return 0;
    return strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == n;
}

/* 18 characters, a final lower-case x read as X (people type it either way). */
static const char *id_normalize(const char *in, char out[19])
{
    size_t n = strlen(in);
    if (n == 0)
        return "required";
    if (n != 18)
        return "must be 18 characters";
    memcpy(out, in, 19);
    if (out[17] == 'x')
        out[17] = 'X';
    return NULL;
}

static void uuid_v4(char out[37])
{
    uint8_t b[16];
    if (RAND_bytes(b, sizeof(b)) != 1)
        abort();
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
             b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* Appends `s` to a PostgreSQL array literal being built (elements are validated to need no quoting). */
static void array_add(ch_buf_t *a, const char *s, size_t len)
{
    ch_buf_append(a, a->len == 1 ? "" : ",", a->len == 1 ? 0 : 1);
    ch_buf_append(a, s, len);
}

static const char *array_end(ch_call_t *call, ch_buf_t *a)
{
    ch_buf_append(a, "}", 1);
    const char *s = ch_call_strdup(call, a->base);
    ch_buf_free(a);
    return s;
}

/*
 * The access-log entry of a citizen's own request made through a delegation (staff at the counter) or a kiosk: the
 * citizen sees who acted for them. Returns the number of queries added (0 or 1).
 */
static int audit_if_acting(ch_call_t *call, const char *action, const char *purpose, ch_pg_query_t *q)
{
    const ch_principal_t *p = ch_call_principal(call);
    if ((p->actor == NULL || p->actor[0] == '\0') && (p->device == NULL || p->device[0] == '\0'))
        return 0;
    ch_audit_query(call, p->subject, action, purpose, q);
    return 1;
}

/* A department write about residents `ids` (a bigint[] literal), logged for each that has a citizen account. */
static void audit_many(ch_call_t *call, const char *ids, const char *action, const char *purpose, ch_pg_query_t *q)
{
    ch_pg_query_t one;
    ch_audit_query(call, "00000000-0000-0000-0000-000000000000", action, purpose, &one); /* the actor fields */
    const char **v = ch_call_alloc(call, 7 * sizeof(*v));
    v[0] = ids;
    for (int i = 1; i < 7; ++i)
        v[i] = one.values[i];
    *q = (ch_pg_query_t){&stmt_audit_many, v, NULL};
}

/* ---- POST /v1/health/declarations ---- */

typedef struct declare {
    const char *symptoms, *regions, *temperature, *hash;
    int64_t resident_id;
} declare_t;

static void on_declared_code(ch_call_t *call, int err, HealthCode *code)
{
    if (err != 0 || code == NULL) {
        ch_fail_err(call, err == CH_ENOTFOUND ? CH_EUNAVAIL : err);
        return;
    }
    ch_reply(call, 201, &code->base);
}

static void on_declared_recomputed(ch_call_t *call, int err, const hc_state_t *state)
{
    declare_t *d = ch_call_data(call);
    if (err != 0) {
        /* the declaration is committed; a retry with the same Idempotency-Key recomputes without declaring twice */
        ch_fail_err(call, err == CH_ENOTFOUND ? CH_EUNAVAIL : err);
        return;
    }
    int ret = hc_code_get(call, d->resident_id, on_declared_code);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_declared(ch_call_t *call, ch_pg_result_t *r)
{
    declare_t *d = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    /* a key used before: the same request is a retry, another one a misuse of the key */
    if (strcmp(PQgetvalue(res, 0, 0), d->hash) != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "Idempotency-Key was already used with a different request");
        return;
    }
    d->resident_id = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    int ret = hc_recompute(call, d->resident_id, on_declared_recomputed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_declare_subject(ch_call_t *call, int64_t resident_id)
{
    declare_t *d = ch_call_data(call);
    DeclarationRequest *req = ch_call_body(call);
    const ch_principal_t *p = ch_call_principal(call);
    d->resident_id = resident_id;
    const char **v = ch_call_alloc(call, 8 * sizeof(*v));
    v[0] = ch_call_printf(call, "%lld", (long long)resident_id);
    v[1] = d->symptoms;
    v[2] = d->temperature;
    v[3] = d->regions;
    v[4] = req->contact_with_confirmed ? "true" : "false";
    v[5] = p->subject;
    v[6] = ch_call_idempotency_key(call);
    v[7] = d->hash;
    ch_pg_query_t q[2] = {{&stmt_declare, v, NULL}};
    int n = 1 + audit_if_acting(call, "health.declaration", "health declaration made for the citizen", &q[1]);
    int ret = ch_call_pg(call, q, n, on_declared);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void hc_declare(ch_call_t *call)
{
    DeclarationRequest *req = ch_call_body(call);
    if (req->n_symptoms > SYMPTOMS_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "symptoms: at most %d", SYMPTOMS_MAX);
        return;
    }
    ch_buf_t a = {0};
    ch_buf_append(&a, "{", 1);
    for (size_t i = 0; i < req->n_symptoms; ++i) {
        const char *s = req->symptoms[i];
        if (s[0] == '\0')
            continue; /* "" stands for none */
        int known = 0;
        for (const char *const *n = symptom_names; *n != NULL && !known; ++n)
            known = strcmp(s, *n) == 0;
        if (!known) {
            ch_buf_free(&a);
            ch_fail(call, CH_CODE_INVALID_ARGUMENT,
                    "symptoms[%zu]: not a known symptom (fever, cough, sore_throat, "
                    "fatigue, loss_of_taste, loss_of_smell, shortness_of_breath, headache, muscle_ache, chills, "
                    "diarrhea, nausea, runny_nose, congestion)",
                    i);
            return;
        }
        array_add(&a, s, strlen(s));
    }
    const char *symptoms = array_end(call, &a);
    double t = req->temperature_c;
    if (!(t == 0 || (t >= 34 && t <= 43))) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "temperature_c: must be from 34 to 43, or 0 when not measured");
        return;
    }
    if (req->n_visited_regions > REGIONS_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "visited_regions: at most %d", REGIONS_MAX);
        return;
    }
    ch_buf_append(&a, "{", 1);
    for (size_t i = 0; i < req->n_visited_regions; ++i) {
        if (!region_ok(req->visited_regions[i])) {
            ch_buf_free(&a);
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "visited_regions[%zu]: must be a 6-digit region code", i);
            return;
        }
        array_add(&a, req->visited_regions[i], 6);
    }
    declare_t *d = ch_call_alloc(call, sizeof(*d));
    memset(d, 0, sizeof(*d));
    d->symptoms = symptoms;
    d->regions = array_end(call, &a);
    d->temperature = t == 0 ? NULL : ch_call_printf(call, "%.2f", t);
    /* the request's fingerprint: a retry under the same Idempotency-Key must be this very request */
    size_t len = protobuf_c_message_get_packed_size(&req->base);
    uint8_t *packed = ch_call_alloc(call, len + 1), digest[32];
    protobuf_c_message_pack(&req->base, packed);
    EVP_Digest(packed, len, digest, NULL, EVP_sha256(), NULL);
    char *hex = ch_call_alloc(call, 65);
    ch_hex(digest, sizeof(digest), hex);
    d->hash = hex;
    ch_call_set_data(call, d);
    int ret = hc_subject_resolve(call, req->dependent_id, on_declare_subject);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/health/test-results ---- */

/*
 * The rows as the worker thread sees them: a copy (ch_call_work's arg), since a worker must not touch call memory.
 * Checks that need no CPU (result, lab, time) are made on the loop first; the worker checks the ID numbers and
 * computes their keyed hashes.
 */
typedef struct tr_item {
    char id[19];
    char hex[65];
    const char *why; /* static text, or NULL */
} tr_item_t;

typedef struct tr_work {
    size_t n;
    tr_item_t items[];
} tr_work_t;

typedef struct tr_state {
    size_t n;
    const char **why;   /* per row: the reason it is refused, or NULL */
    const char **field; /* per row: the field concerned */
    int64_t *resident;
    int64_t *at;
    BatchResponse *resp;
} tr_state_t;

static void tr_work(void *arg)
{
    tr_work_t *w = arg;
    for (size_t i = 0; i < w->n; ++i) {
        tr_item_t *it = &w->items[i];
        if (it->why != NULL)
            continue;
        const char *why = NULL;
        if (ch_id_number_check(it->id, &why) != 0) {
            it->why = why;
            continue;
        }
        uint8_t mac[32];
        ch_pii_hmac(ch_pii, "id", it->id, 18, mac);
        ch_hex(mac, sizeof(mac), it->hex);
    }
    /* the numbers are not needed any more: do not leave them in memory longer than the request */
    for (size_t i = 0; i < w->n; ++i)
        OPENSSL_cleanse(w->items[i].id, sizeof(w->items[i].id));
}

/* 422 with every bad row (index and reason); nothing was written. */
static void tr_refuse(ch_call_t *call, tr_state_t *st)
{
    BatchResponse *resp = st->resp;
    size_t bad = 0;
    for (size_t i = 0; i < st->n; ++i)
        bad += st->why[i] != NULL;
    resp->rejected = ch_call_alloc(call, bad * sizeof(*resp->rejected));
    for (size_t i = 0; i < st->n; ++i) {
        if (st->why[i] == NULL)
            continue;
        RowError *e = ch_call_alloc(call, sizeof(*e));
        cityhall__healthcode__v1__row_error__init(e);
        e->index = (int32_t)i;
        e->reason = ch_call_printf(call, "%s: %s", st->field[i], st->why[i]);
        resp->rejected[resp->n_rejected++] = e;
    }
    resp->accepted = 0;
    ch_reply(call, 422, &resp->base);
}

static void on_tr_committed(ch_call_t *call, ch_pg_result_t *r)
{
    tr_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    hc_recompute_kick(); /* the codes are computed by the drainer: codes_changed stays 0 (asynchronous) */
    ch_reply(call, 200, &st->resp->base);
}

static void on_tr_matched(ch_call_t *call, ch_pg_result_t *r)
{
    tr_state_t *st = ch_call_data(call);
    TestResultBatch *req = ch_call_body(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    /* the rows were sent in order, skipping refused ones: map positions back to row indexes */
    PGresult *res = r->res[1];
    size_t *rowof = ch_call_alloc(call, (st->n + 1) * sizeof(*rowof)), k = 0;
    for (size_t i = 0; i < st->n; ++i)
        if (st->why[i] == NULL)
            rowof[++k] = i;
    for (int j = 0; j < PQntuples(res); ++j) {
        size_t pos = (size_t)strtoull(PQgetvalue(res, j, 0), NULL, 10);
        if (pos < 1 || pos > k)
            continue;
        size_t i = rowof[pos];
        if (PQgetisnull(res, j, 1)) {
            st->why[i] = "no registry resident with this number";
            st->field[i] = "id_number";
        } else {
            st->resident[i] = strtoll(PQgetvalue(res, j, 1), NULL, 10);
        }
    }
    for (size_t i = 0; i < st->n; ++i) {
        if (st->why[i] != NULL) {
            tr_refuse(call, st);
            return;
        }
    }
    /* every row is good: one transaction inserts them all (the trigger enqueues their residents) */
    ch_buf_t ids = {0}, ats = {0}, results = {0}, labs = {0};
    ch_buf_reserve(&ids, st->n * 12 + 2);
    ch_buf_reserve(&ats, st->n * 18 + 2);
    ch_buf_reserve(&results, st->n * 9 + 2);
    ch_buf_reserve(&labs, st->n * 8 + 2);
    ch_buf_append(&ids, "{", 1);
    ch_buf_append(&ats, "{", 1);
    ch_buf_append(&results, "{", 1);
    ch_buf_append(&labs, "{", 1);
    for (size_t i = 0; i < st->n; ++i) {
        char num[32];
        int n = snprintf(num, sizeof(num), "%lld", (long long)st->resident[i]);
        array_add(&ids, num, (size_t)n);
        n = snprintf(num, sizeof(num), "%lld", (long long)st->at[i]);
        array_add(&ats, num, (size_t)n);
        array_add(&results, req->results[i]->result, strlen(req->results[i]->result));
        array_add(&labs, req->results[i]->lab, strlen(req->results[i]->lab));
    }
    const char **v = ch_call_alloc(call, 4 * sizeof(*v));
    v[0] = array_end(call, &ids);
    v[1] = array_end(call, &ats);
    v[2] = array_end(call, &results);
    v[3] = array_end(call, &labs);
    st->resp->accepted = (int32_t)st->n;
    st->resp->codes_changed = 0;
    ch_pg_query_t q[3] = {{&stmt_no_jit, NULL, NULL}, {&stmt_tests_insert, v, NULL}};
    audit_many(call, v[0], "health.test_result", "test results uploaded by a laboratory", &q[2]);
    int ret = ch_call_pg_commit(call, q, 3, 200, &st->resp->base, on_tr_committed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_tr_checked(ch_call_t *call, void *arg)
{
    tr_state_t *st = ch_call_data(call);
    tr_work_t *w = arg;
    ch_buf_t hexes = {0};
    ch_buf_reserve(&hexes, w->n * 65 + 2);
    ch_buf_append(&hexes, "{", 1);
    for (size_t i = 0; i < w->n; ++i) {
        if (w->items[i].why != NULL && st->why[i] == NULL) {
            st->why[i] = w->items[i].why;
            st->field[i] = "id_number";
        }
        if (st->why[i] == NULL)
            array_add(&hexes, w->items[i].hex, 64);
    }
    if (hexes.len == 1) { /* no row left to look up: every one was refused already */
        ch_buf_free(&hexes);
        tr_refuse(call, st);
        return;
    }
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = array_end(call, &hexes);
    ch_pg_query_t q[2] = {{&stmt_no_jit, NULL, NULL}, {&stmt_match, v, NULL}};
    int ret = ch_call_pg(call, q, 2, on_tr_matched);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void hc_test_results(ch_call_t *call)
{
    if (hc_authority_or_respond(call) != 0)
        return;
    TestResultBatch *req = ch_call_body(call);
    size_t n = req->n_results;
    if (n == 0 || n > TEST_ROWS_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "results: 1 to %d rows", TEST_ROWS_MAX);
        return;
    }
    tr_state_t *st = ch_call_alloc(call, sizeof(*st));
    st->n = n;
    st->why = ch_call_alloc(call, n * sizeof(*st->why));
    st->field = ch_call_alloc(call, n * sizeof(*st->field));
    st->resident = ch_call_alloc(call, n * sizeof(*st->resident));
    st->at = ch_call_alloc(call, n * sizeof(*st->at));
    st->resp = ch_call_alloc(call, sizeof(*st->resp));
    cityhall__healthcode__v1__batch_response__init(st->resp);
    size_t size = sizeof(tr_work_t) + n * sizeof(tr_item_t);
    tr_work_t *w = malloc(size);
    if (w == NULL)
        abort();
    w->n = n;
    for (size_t i = 0; i < n; ++i) {
        const TestResult *row = req->results[i];
        tr_item_t *it = &w->items[i];
        memset(it, 0, sizeof(*it));
        st->why[i] = NULL;
        st->field[i] = NULL;
        st->resident[i] = 0;
        const char *why;
        if ((why = id_normalize(row->id_number, it->id)) != NULL) {
            st->why[i] = why;
            st->field[i] = "id_number";
        } else if ((why = time_problem(row->sample_time)) != NULL) {
            st->why[i] = why;
            st->field[i] = "sample_time";
        } else if (strcmp(row->result, "positive") != 0 && strcmp(row->result, "negative") != 0) {
            st->why[i] = "must be positive or negative";
            st->field[i] = "result";
        } else if (!lab_ok(row->lab)) {
            st->why[i] = "1 to 64 letters, digits, '.', '_' or '-'";
            st->field[i] = "lab";
        } else {
            st->at[i] = ts_us(row->sample_time);
        }
        it->why = st->why[i] != NULL ? "" : NULL; /* refused on the loop already: the worker skips it */
    }
    ch_call_set_data(call, st);
    int ret = ch_call_work(call, tr_work, on_tr_checked, w, size);
    OPENSSL_cleanse(w, size);
    free(w);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/health/risk-areas ---- */

static void on_areas_committed(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    hc_recompute_kick();
    ch_reply(call, 200, ch_call_data(call));
}

void hc_risk_areas(ch_call_t *call)
{
    if (hc_authority_or_respond(call) != 0)
        return;
    RiskAreaBatch *req = ch_call_body(call);
    if (req->n_areas == 0 || req->n_areas > AREAS_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "areas: 1 to %d areas", AREAS_MAX);
        return;
    }
    ch_buf_t regions = {0}, levels = {0}, froms = {0}, untils = {0};
    ch_buf_append(&regions, "{", 1);
    ch_buf_append(&levels, "{", 1);
    ch_buf_append(&froms, "{", 1);
    ch_buf_append(&untils, "{", 1);
    const char *problem = NULL;
    size_t i;
    for (i = 0; i < req->n_areas && problem == NULL; ++i) {
        const RiskArea *a = req->areas[i];
        if (!region_ok(a->region))
            problem = "region: must be a 6-digit region code";
        else if (strcmp(a->level, "high") != 0 && strcmp(a->level, "medium") != 0 && strcmp(a->level, "low") != 0)
            problem = "level: must be high, medium or low";
        else if (a->valid_from == NULL || a->valid_from->seconds < EARLIEST_S)
            problem = "valid_from: required, not before 2019-12-01";
        else if (a->valid_until == NULL || ts_us(a->valid_until) <= ts_us(a->valid_from))
            problem = "valid_until: required, after valid_from";
        if (problem != NULL)
            break;
        char num[32];
        array_add(&regions, a->region, 6);
        array_add(&levels, a->level, strlen(a->level));
        int n = snprintf(num, sizeof(num), "%lld", (long long)ts_us(a->valid_from));
        array_add(&froms, num, (size_t)n);
        n = snprintf(num, sizeof(num), "%lld", (long long)ts_us(a->valid_until));
        array_add(&untils, num, (size_t)n);
    }
    if (problem != NULL) {
        ch_buf_free(&regions);
        ch_buf_free(&levels);
        ch_buf_free(&froms);
        ch_buf_free(&untils);
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "areas[%zu].%s", i, problem);
        return;
    }
    const char **v = ch_call_alloc(call, 5 * sizeof(*v));
    v[0] = array_end(call, &regions);
    v[1] = array_end(call, &levels);
    v[2] = array_end(call, &froms);
    v[3] = array_end(call, &untils);
    v[4] = ch_call_principal(call)->subject;
    BatchResponse *resp = ch_call_alloc(call, sizeof(*resp));
    cityhall__healthcode__v1__batch_response__init(resp);
    resp->accepted = (int32_t)req->n_areas;
    ch_call_set_data(call, resp);
    ch_pg_query_t q[2] = {{&stmt_no_jit, NULL, NULL}, {&stmt_areas_insert, v, NULL}};
    int ret = ch_call_pg_commit(call, q, 2, 200, &resp->base, on_areas_committed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/health/quarantine-orders ---- */

typedef struct quarantine {
    char hex[65];
    int64_t at;
    int64_t resident_id;
    QuarantineResponse *resp;
} quarantine_t;

static void on_quarantine_recomputed(ch_call_t *call, int err, const hc_state_t *state)
{
    quarantine_t *qs = ch_call_data(call);
    if (err != 0)
        ch_log(HC_LOG_WARN, "hc_quarantine", "resident %lld: recompute after the %s failed (%d); the drainer does it",
               (long long)qs->resident_id, qs->resp->kind, err);
    ch_reply(call, 200, &qs->resp->base); /* committed: the answer does not depend on the recompute */
}

static void on_quarantine_committed(ch_call_t *call, ch_pg_result_t *r)
{
    quarantine_t *qs = ch_call_data(call);
    if (r->err == CH_EDB && r->sqlstate != NULL && strcmp(r->sqlstate, "CH422") == 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "no open quarantine order to release");
        return;
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    int ret = hc_recompute(call, qs->resident_id, on_quarantine_recomputed);
    if (ret != 0) {
        hc_recompute_kick();
        ch_reply(call, 200, &qs->resp->base);
    }
}

/* The notice's date, in China's calendar (UTC+8). */
static void china_date(int64_t us, char *out, size_t outlen)
{
    time_t t = (time_t)(us / HC_US_PER_S + 8 * 3600);
    struct tm tm;
    gmtime_r(&t, &tm);
    snprintf(out, outlen, "%04d年%02d月%02d日", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday);
}

static void on_quarantine_resident(ch_call_t *call, ch_pg_result_t *r)
{
    quarantine_t *qs = ch_call_data(call);
    QuarantineRequest *req = ch_call_body(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    if (PQntuples(r->res[0]) != 1) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "id_number: no registry resident with this number");
        return;
    }
    qs->resident_id = strtoll(PQgetvalue(r->res[0], 0, 0), NULL, 10);
    const char *citizen = PQgetisnull(r->res[0], 0, 1) ? NULL : ch_call_strdup(call, PQgetvalue(r->res[0], 0, 1));
    int release = strcmp(req->kind, "release") == 0;
    QuarantineResponse *resp = qs->resp;
    char *order_id = ch_call_alloc(call, 37), *notice_id = ch_call_alloc(call, 37);
    uuid_v4(order_id);
    uuid_v4(notice_id);
    resp->order_id = order_id;
    resp->kind = release ? "release" : "order";
    resp->notice_id = release ? notice_id : "";
    char date[64];
    china_date(qs->at, date, sizeof(date));
    const char **v = ch_call_alloc(call, 9 * sizeof(*v));
    v[0] = order_id;
    v[1] = ch_call_printf(call, "%lld", (long long)qs->resident_id);
    v[2] = resp->kind;
    v[3] = req->at != NULL ? ch_call_printf(call, "%lld", (long long)qs->at) : NULL;
    v[4] = req->place;
    v[5] = ch_call_principal(call)->subject;
    v[6] = release ? notice_id : NULL;
    v[7] = release ? "解除医学观察通知书" : NULL;
    v[8] = release ? ch_call_printf(call,
                                    "经医学观察，你已符合解除医学观察的条件，自%s起解除医学观察。"
                                    "请继续做好个人防护，如出现发热、咳嗽等症状请及时就医。",
                                    date)
                   : NULL;
    ch_pg_query_t q[2] = {{&stmt_quarantine, v, NULL}};
    int n = 1;
    if (citizen != NULL)
        ch_audit_query(call, citizen, "health.quarantine",
                       release ? "release from medical observation recorded" : "medical observation order recorded",
                       &q[n++]);
    int ret = ch_call_pg_commit(call, q, n, 200, &resp->base, on_quarantine_committed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void hc_quarantine(ch_call_t *call)
{
    if (hc_authority_or_respond(call) != 0)
        return;
    QuarantineRequest *req = ch_call_body(call);
    char id[19];
    const char *why = id_normalize(req->id_number, id);
    if (why != NULL && req->id_number[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "id_number: required");
        return;
    }
    if (why != NULL || ch_id_number_check(id, &why) != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "id_number: %s", why);
        return;
    }
    if (strcmp(req->kind, "order") != 0 && strcmp(req->kind, "release") != 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "kind: must be order or release");
        return;
    }
    if (req->at != NULL && (why = time_problem(req->at)) != NULL) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "at: %s", why);
        return;
    }
    size_t plen = strlen(req->place);
    if (plen > PLACE_MAX_BYTES) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "place: at most %d bytes", PLACE_MAX_BYTES);
        return;
    }
    for (size_t i = 0; i < plen; ++i) {
        if ((unsigned char)req->place[i] < 0x20 || req->place[i] == 0x7f) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "place: control characters are not allowed");
            return;
        }
    }
    quarantine_t *qs = ch_call_alloc(call, sizeof(*qs));
    memset(qs, 0, sizeof(*qs));
    if (req->at != NULL) {
        qs->at = ts_us(req->at);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        qs->at = (int64_t)ts.tv_sec * HC_US_PER_S + ts.tv_nsec / 1000;
    }
    qs->resp = ch_call_alloc(call, sizeof(*qs->resp));
    cityhall__healthcode__v1__quarantine_response__init(qs->resp);
    uint8_t mac[32];
    ch_pii_hmac(ch_pii, "id", id, 18, mac);
    OPENSSL_cleanse(id, sizeof(id));
    ch_hex(mac, sizeof(mac), qs->hex);
    ch_call_set_data(call, qs);
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = qs->hex;
    ch_pg_query_t q = {&stmt_resident, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_quarantine_resident);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- GET /v1/health/notices ---- */

static void on_notices(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    NoticeList *list = ch_call_alloc(call, sizeof(*list));
    cityhall__healthcode__v1__notice_list__init(list);
    int n = PQntuples(res);
    list->notices = ch_call_alloc(call, (size_t)(n > 0 ? n : 1) * sizeof(*list->notices));
    for (int i = 0; i < n; ++i) {
        Notice *m = ch_call_alloc(call, sizeof(*m));
        cityhall__healthcode__v1__notice__init(m);
        m->notice_id = ch_call_strdup(call, PQgetvalue(res, i, 0));
        m->kind = ch_call_strdup(call, PQgetvalue(res, i, 1));
        m->title = ch_call_strdup(call, PQgetvalue(res, i, 2));
        m->body = ch_call_strdup(call, PQgetvalue(res, i, 3));
        m->issued_at = ts_new(call, strtoll(PQgetvalue(res, i, 4), NULL, 10));
        list->notices[list->n_notices++] = m;
    }
    ch_reply(call, 200, &list->base);
}

static void on_notices_subject(ch_call_t *call, int64_t resident_id)
{
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = ch_call_printf(call, "%lld", (long long)resident_id);
    ch_pg_query_t q[2] = {{&stmt_notices, v, NULL}};
    int n = 1 + audit_if_acting(call, "health.notices.read", "notices read for the citizen", &q[1]);
    int ret = ch_call_pg(call, q, n, on_notices);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void hc_notices(ch_call_t *call)
{
    const char *dependent = ch_call_query(call, "dependent_id");
    int ret = hc_subject_resolve(call, dependent != NULL ? dependent : "", on_notices_subject);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- `cityhall rules load FILE.json` (off the loop: blocking libpq) ---- */

int hc_cmd_rules_load(const ch_config_t *config, int argc, char **argv)
{
    static const char cmd[] = "rules load";
    if (argc != 2) {
        fprintf(stderr, "usage: cityhall rules load FILE.json\n");
        return 2;
    }
    FILE *fp = fopen(argv[1], "rb");
    if (fp == NULL) {
        fprintf(stderr, "%s: could not open %s\n", cmd, argv[1]);
        return 2;
    }
    char *text = malloc(RULES_FILE_MAX + 1);
    if (text == NULL)
        abort();
    size_t len = fread(text, 1, RULES_FILE_MAX + 1, fp);
    fclose(fp);
    if (len > RULES_FILE_MAX) {
        fprintf(stderr, "%s: %s is larger than %d bytes\n", cmd, argv[1], RULES_FILE_MAX);
        free(text);
        return 2;
    }
    text[len] = '\0';
    hc_rules_t rules;
    char err[256];
    if (hc_rules_parse(text, len, 0, &rules, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: %s: %s (nothing was changed)\n", cmd, argv[1], err);
        free(text);
        return 2;
    }
    const char *keys[] = {"dbname", "connect_timeout", NULL};
    const char *vals[] = {config->pg_conninfo, "5", NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "%s: could not connect to PostgreSQL: %s", cmd, PQerrorMessage(conn));
        PQfinish(conn);
        free(text);
        return 1;
    }
    /* the next version and the switch in one transaction; the lock orders two concurrent loads */
    const char *params[1] = {text};
    PGresult *res = PQexec(conn, "BEGIN; LOCK TABLE rule_sets IN SHARE ROW EXCLUSIVE MODE");
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    int version = 0, previous = 0;
    if (ok) {
        res = PQexec(conn, "SELECT coalesce(max(version), 0) + 1, coalesce(max(version) FILTER (WHERE active), 0) "
                           "FROM rule_sets");
        ok = PQresultStatus(res) == PGRES_TUPLES_OK;
        if (ok) {
            version = atoi(PQgetvalue(res, 0, 0));
            previous = atoi(PQgetvalue(res, 0, 1));
        }
        PQclear(res);
    }
    if (ok) {
        res = PQexec(conn, "UPDATE rule_sets SET active = false WHERE active");
        ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
    }
    if (ok) {
        char v[16];
        snprintf(v, sizeof(v), "%d", version);
        const char *p2[2] = {v, params[0]};
        res = PQexecParams(conn, "INSERT INTO rule_sets (version, rules, active) VALUES ($1::int, $2::jsonb, true)", 2,
                           NULL, p2, NULL, NULL, 0);
        ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
    }
    if (ok) {
        res = PQexec(conn, "COMMIT");
        ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
    }
    if (!ok) {
        fprintf(stderr, "%s: %s", cmd, PQerrorMessage(conn));
        PQclear(PQexec(conn, "ROLLBACK"));
        PQfinish(conn);
        free(text);
        return 1;
    }
    PQfinish(conn);
    free(text);
    printf("rules load: rule set %d is active (it was %d); running gateways switch within seconds, and codes are "
           "recomputed with it as their inputs change\n",
           version, previous);
    return 0;
}
