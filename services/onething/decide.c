/* Decisions on items: signed department callbacks and staff decisions, both applied by one SQL function. */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/crypto.h>
#include "cityhall/pii.h"
#include "dispatch.h"

typedef Cityhall__Onething__V1__DepartmentCallback DepartmentCallback;
typedef Cityhall__Onething__V1__CallbackAck CallbackAck;
typedef Cityhall__Onething__V1__Decision Decision;
typedef Cityhall__Onething__V1__Task Task;
typedef Google__Protobuf__Timestamp Timestamp;

/*
 * Every decision takes two round trips. The first reads what the decision needs (the item and its department,
 * for a callback also the department's secret and whether the callback was seen; for an approval the form values
 * and a fresh licence sequence number). The gateway then checks the signature, validates, and for an approval
 * numbers and signs the licence. The second runs ot_decide (0009), which re-checks the item's state under its row
 * lock and applies everything in one transaction: the state change, the licence, dependants unblocked with their
 * outbox rows, notifications, the application's state, and the callback's id. A department retrying a callback
 * gets the acknowledgement stored with it. Nothing here ever logs form values.
 */

#define SIGNATURE_WINDOW_S 300
#define REASON_MAX         500
#define FIELDS_MAX         64

/* $1 item id, $2 the decision: the item, its application and applicant; for an approval also what the licence needs. */
const ch_pg_stmt_t ot_stmt_decide_context = {
    "ot_decide_context",
    "SELECT i.department, i.state, i.item_code, ot_item_name(a.catalog_version, i.item_code), a.citizen_id, r.name, "
    "       CASE WHEN $2 = 'approve' THEN encode(a.fields_enc, 'hex') END, "
    "       CASE WHEN $2 = 'approve' THEN ot_item_fields(a.catalog_version, a.bundle_code, i.item_code)::text END, "
    "       CASE WHEN $2 = 'approve' THEN nextval('licence_seq') END, "
    "       i.application_id, floor(extract(epoch FROM ot_effective_due(i.due_at, i.paused_seconds, i.paused_at, "
    "now())))::bigint, "
    "       EXISTS (SELECT 1 FROM escalations e WHERE e.item_id = i.item_id AND e.resolved_at IS NULL), "
    "       (SELECT floor(extract(epoch FROM min(coalesce(o.delivered_at, o.created_at))))::bigint FROM outbox o "
    "        WHERE o.item_id = i.item_id) "
    "FROM application_items i JOIN applications a USING (application_id) "
    "     LEFT JOIN citizens c ON c.citizen_id = a.citizen_id "
    "     LEFT JOIN registry_residents r ON r.resident_id = c.registry_id "
    "WHERE i.item_id = $1::uuid",
    2};
enum {
    X_DEPT,
    X_STATE,
    X_CODE,
    X_NAME,
    X_CITIZEN,
    X_HOLDER,
    X_FIELDS,
    X_ITEM_FIELDS,
    X_SEQ,
    X_APP,
    X_DUE,
    X_ESC,
    X_RECEIVED
};

/* $1 dept, $2 callback id: the department's sealed secret (NULL: no endpoint) and the callback's stored ack. */
const ch_pg_stmt_t ot_stmt_callback_context = {
    "ot_callback_context",
    "SELECT (SELECT encode(secret_enc, 'hex') FROM dept_endpoints WHERE dept = $1), s.item_id, s.state "
    "FROM (SELECT 1) one LEFT JOIN callbacks_seen s ON s.dept = $1 AND s.callback_id = $2",
    2};

const ch_pg_stmt_t ot_stmt_decide = {
    "ot_decide",
    "SELECT outcome, item_state, application_state FROM ot_decide($1::uuid, $2, $3, $4, $5, $6::text[], $7, $8, "
    "$9::uuid, $10, to_timestamp($11::bigint), to_timestamp($12::bigint), $13, $14::jsonb)",
    14};

/* ---- helpers ---- */

static int is_uuid(const char *s)
{
    if (s == NULL || strlen(s) != 36)
        return 0;
    for (int i = 0; i < 36; ++i) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return 0;
        } else if (!isxdigit((unsigned char)s[i])) {
            return 0;
        }
    }
    return 1;
}

/* Printable ASCII without spaces, 1..max bytes (callback ids, licence numbers). */
static int token_ok(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return 0;
    for (size_t i = 0; i < n; ++i)
        if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f)
            return 0;
    return 1;
}

/* Valid UTF-8 without control characters (texts shown to people). */
static int text_ok(const char *s, size_t max)
{
    const unsigned char *p = (const unsigned char *)s;
    if (strlen(s) > max)
        return 0;
    while (*p != '\0') {
        unsigned c = *p, len = c < 0x80             ? 1
                               : (c & 0xe0) == 0xc0 ? 2
                               : (c & 0xf0) == 0xe0 ? 3
                               : (c & 0xf8) == 0xf0 ? 4
                                                    : 0;
        if (len == 0 || (len == 1 && (c < 0x20 || c == 0x7f)) || (len == 2 && c < 0xc2))
            return 0;
        for (unsigned i = 1; i < len; ++i)
            if ((p[i] & 0xc0) != 0x80)
                return 0;
        p += len;
    }
    return 1;
}

static int dept_ok(const char *s)
{
    size_t n = s != NULL ? strlen(s) : 0;
    if (n == 0 || n > 64)
        return 0;
    for (size_t i = 0; i < n; ++i) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && c == '-')))
            return 0;
    }
    return 1;
}

static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = strlen(hex) / 2;
    if (n > cap)
        return 0;
    for (size_t i = 0; i < n; ++i) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return 0;
        out[i] = (uint8_t)v;
    }
    return n;
}

/* A PostgreSQL text[] literal of `fields` (call memory). */
static const char *array_literal(ch_call_t *call, char **fields, size_t n)
{
    ch_buf_t b = {0};
    ch_buf_append(&b, "{", 1);
    for (size_t i = 0; i < n; ++i) {
        if (i > 0)
            ch_buf_append(&b, ",", 1);
        ch_buf_append(&b, "\"", 1);
        for (const char *p = fields[i]; *p != '\0'; ++p) {
            if (*p == '"' || *p == '\\')
                ch_buf_append(&b, "\\", 1);
            ch_buf_append(&b, p, 1);
        }
        ch_buf_append(&b, "\"", 1);
    }
    ch_buf_append(&b, "}", 1);
    char *s = ch_call_strdup(call, b.base);
    ch_buf_free(&b);
    return s;
}

/* The decision's shared state across the two round trips (call memory). */
typedef struct decide_state {
    int staff; /* 1: POST /v1/staff/tasks/{id}/decision; 0: a department callback */
    const char *item_id, *dept, *decision, *reason, *callback_id, *dept_number;
    char **fields;
    size_t nfields;
    const char *actor_role, *actor;
    /* from the context read, for the staff answer */
    Task *task;
    ot_licence_t licence;
    int approving;
} decide_state_t;

/* The form values that go into a licence's data: the item's fields, never ID or phone numbers. */
static json_t *licence_facts(const char *fields_hex, const char *item_fields_json)
{
    json_t *values = fields_hex != NULL ? ot_fields_open(fields_hex) : NULL;
    json_t *spec = json_loads(item_fields_json != NULL ? item_fields_json : "[]", 0, NULL);
    json_t *facts = json_object();
    size_t i;
    json_t *f;
    json_array_foreach(spec, i, f)
    {
        const char *name = json_string_value(json_object_get(f, "name"));
        const char *type = json_string_value(json_object_get(f, "type"));
        if (name == NULL || values == NULL ||
            (type != NULL && (strcmp(type, "id_number") == 0 || strcmp(type, "phone") == 0)))
            continue;
        json_t *v = json_object_get(values, name);
        if (v != NULL)
            json_object_set(facts, name, v);
    }
    json_decref(spec);
    json_decref(values);
    return facts;
}

static Timestamp *ts_at(ch_call_t *call, int64_t s)
{
    Timestamp *t = ch_call_alloc(call, sizeof(*t));
    google__protobuf__timestamp__init(t);
    t->seconds = s;
    return t;
}

static void on_decided(ch_call_t *call, ch_pg_result_t *r)
{
    decide_state_t *st = ch_call_data(call);
    if (r->err == CH_EDB && r->sqlstate != NULL) {
        const char *msg = r->message != NULL ? r->message : "";
        if (strcmp(r->sqlstate, "CH404") == 0)
            ch_fail(call, CH_CODE_NOT_FOUND, st->staff ? "no such task" : "no such item");
        else if (strcmp(r->sqlstate, "CH422") == 0)
            ch_fail(call, CH_CODE_FAILED_PRECONDITION, "%s", msg);
        else if (strcmp(r->sqlstate, "CH400") == 0)
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "%s", msg);
        else if (strcmp(r->sqlstate, "23505") == 0)
            ch_fail(call, CH_CODE_ALREADY_EXISTS, "licence_number: already issued");
        else if (strcmp(r->sqlstate, "40P01") == 0 || strcmp(r->sqlstate, "40001") == 0)
            ch_fail(call, CH_CODE_ABORTED, "a concurrent change got in the way; retry");
        else
            ch_fail_err(call, r->err);
        return;
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail_err(call, CH_EDB);
        return;
    }
    const char *outcome = PQgetvalue(res, 0, 0), *state = PQgetvalue(res, 0, 1);
    /* an approval may have unblocked dependants, a retry queued the item again: wake this process's workers */
    if (strcmp(outcome, "applied") == 0 && (st->approving || strcmp(st->decision, "retry") == 0))
        ot_dispatch_wake();
    if (!st->staff) {
        CallbackAck *ack = ch_call_alloc(call, sizeof(*ack));
        cityhall__onething__v1__callback_ack__init(ack);
        ack->item_id = (char *)st->item_id;
        ack->state = ch_call_strdup(call, state);
        ch_reply(call, 200, &ack->base);
        return;
    }
    Task *t = st->task;
    t->state = ch_call_strdup(call, state);
    int final = strcmp(state, "issued") == 0 || strcmp(state, "rejected") == 0;
    t->overdue = !final && strcmp(state, "supplement_requested") != 0 && t->due_at != NULL &&
                 t->due_at->seconds <= (int64_t)time(NULL);
    if (final)
        t->escalated = 0;
    ch_reply(call, 200, &t->base);
}

/* Runs ot_decide with what the context read found; answers on error. */
static void decide_run(ch_call_t *call, decide_state_t *st)
{
    char issued[24] = "", until[24] = "";
    const char *lic_id = NULL, *lic_no = NULL, *lic_sig = NULL, *lic_data = NULL;
    if (st->approving) {
        snprintf(issued, sizeof(issued), "%lld", (long long)st->licence.issued_at);
        snprintf(until, sizeof(until), "%lld", (long long)st->licence.valid_until);
        lic_id = st->licence.licence_id;
        lic_no = st->licence.number;
        lic_sig = st->licence.signature;
        lic_data = st->licence.data_json;
    }
    const char **v = ch_call_alloc(call, 14 * sizeof(*v));
    v[0] = st->item_id;
    v[1] = st->dept;
    v[2] = st->callback_id;
    v[3] = st->decision;
    v[4] = st->reason;
    v[5] = array_literal(call, st->fields, st->nfields);
    v[6] = st->actor_role;
    v[7] = st->actor;
    v[8] = lic_id;
    v[9] = lic_no;
    v[10] = st->approving ? ch_call_strdup(call, issued) : NULL;
    v[11] = st->approving ? ch_call_strdup(call, until) : NULL;
    v[12] = lic_sig;
    v[13] = lic_data;
    ch_pg_query_t q = {&ot_stmt_decide, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_decided);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/*
 * After the context read: 404 when the item is not this department's (answered like an unknown item), then the
 * licence for an approval. Returns 0 to go on, or -1 after answering.
 */
static int context_check_or_respond(ch_call_t *call, decide_state_t *st, PGresult *res)
{
    if (PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, X_DEPT), st->dept) != 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, st->staff ? "no such task" : "no such item");
        return -1;
    }
    if (st->staff) {
        Task *t = ch_call_alloc(call, sizeof(*t));
        cityhall__onething__v1__task__init(t);
        t->task_id = (char *)st->item_id;
        t->application_id = ch_call_strdup(call, PQgetvalue(res, 0, X_APP));
        t->item_code = ch_call_strdup(call, PQgetvalue(res, 0, X_CODE));
        t->item_name = ch_call_strdup(call, PQgetvalue(res, 0, X_NAME));
        t->department = (char *)st->dept;
        if (!PQgetisnull(res, 0, X_DUE))
            t->due_at = ts_at(call, strtoll(PQgetvalue(res, 0, X_DUE), NULL, 10));
        if (!PQgetisnull(res, 0, X_RECEIVED))
            t->received_at = ts_at(call, strtoll(PQgetvalue(res, 0, X_RECEIVED), NULL, 10));
        t->escalated = strcmp(PQgetvalue(res, 0, X_ESC), "t") == 0;
        char masked[64] = "";
        if (!PQgetisnull(res, 0, X_HOLDER))
            ch_name_mask(PQgetvalue(res, 0, X_HOLDER), masked, sizeof(masked));
        t->applicant_masked_name = ch_call_strdup(call, masked);
        st->task = t;
    }
    if (strcmp(st->decision, "approve") == 0) {
        const char *state = PQgetvalue(res, 0, X_STATE);
        /*
         * Staff: refuse before numbering and signing a licence that could not be issued (ot_decide checks
         * again). A department callback goes on to ot_decide whatever the state read here: a concurrent
         * duplicate of it may have committed in between, and only ot_decide's dedup answers that atomically.
         */
        if (st->staff && strcmp(state, "in_review") != 0) {
            ch_fail(call, CH_CODE_FAILED_PRECONDITION, "the item is %s, not in review", state);
            return -1;
        }
        json_t *facts = licence_facts(PQgetisnull(res, 0, X_FIELDS) ? NULL : PQgetvalue(res, 0, X_FIELDS),
                                      PQgetisnull(res, 0, X_ITEM_FIELDS) ? NULL : PQgetvalue(res, 0, X_ITEM_FIELDS));
        int ret = ot_licence_issue(call, PQgetvalue(res, 0, X_CODE), PQgetvalue(res, 0, X_NAME), st->dept,
                                   PQgetisnull(res, 0, X_HOLDER) ? "" : PQgetvalue(res, 0, X_HOLDER),
                                   strtoll(PQgetvalue(res, 0, X_SEQ), NULL, 10), st->dept_number, facts, &st->licence);
        json_decref(facts);
        if (ret != 0) {
            ch_fail_err(call, ret);
            return -1;
        }
        st->approving = 1;
    }
    return 0;
}

/* Appends "; "-separated text to an error message, never past its end. */
static void add_error(char *buf, size_t cap, size_t *len, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void add_error(char *buf, size_t cap, size_t *len, const char *fmt, ...)
{
    if (*len + 3 >= cap)
        return;
    if (*len > 0) {
        memcpy(buf + *len, "; ", 3);
        *len += 2;
    }
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, cap - *len, fmt, ap);
    va_end(ap);
    if (n > 0)
        *len = *len + (size_t)n < cap ? *len + (size_t)n : cap - 1;
}

/* Checks what the body says before any read: the decision's name and what it needs. 0, or -1 after answering 400. */
static int decision_valid_or_respond(ch_call_t *call, decide_state_t *st)
{
    static const char *const dept_decisions[] = {"in_review", "approve", "reject", "request_supplement", NULL};
    static const char *const staff_decisions[] = {"approve", "reject", "request_supplement", "retry", NULL};
    int known = 0;
    for (const char *const *d = st->staff ? staff_decisions : dept_decisions; *d != NULL; ++d)
        known |= strcmp(*d, st->decision) == 0;
    char errors[768] = "";
    size_t len = 0;
    if (!known)
        add_error(errors, sizeof(errors), &len, "decision: expected %s",
                  st->staff ? "approve, reject, request_supplement or retry"
                            : "in_review, approve, reject or request_supplement");
    if (!text_ok(st->reason, REASON_MAX))
        add_error(errors, sizeof(errors), &len, "reason: at most %d bytes of text without control characters",
                  REASON_MAX);
    else if (strcmp(st->decision, "reject") == 0 && st->reason[strspn(st->reason, " ")] == '\0')
        add_error(errors, sizeof(errors), &len, "reason: required when rejecting");
    if (strcmp(st->decision, "request_supplement") == 0) {
        if (st->nfields == 0)
            add_error(errors, sizeof(errors), &len, "fields: name the fields the citizen must supply again");
        if (st->nfields > FIELDS_MAX)
            add_error(errors, sizeof(errors), &len, "fields: at most %d", FIELDS_MAX);
        for (size_t i = 0; i < st->nfields && i < FIELDS_MAX; ++i)
            if (!token_ok(st->fields[i], 128)) {
                add_error(errors, sizeof(errors), &len, "fields[%zu]: not a field name", i);
                break;
            }
    } else if (st->nfields > 0) {
        add_error(errors, sizeof(errors), &len, "fields: only for request_supplement");
    }
    if (st->dept_number != NULL && st->dept_number[0] != '\0' &&
        (strcmp(st->decision, "approve") != 0 || !token_ok(st->dept_number, 64)))
        add_error(errors, sizeof(errors), &len, "licence_number: 1-64 printable characters, only with approve");
    if (len > 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "%s", errors);
        return -1;
    }
    return 0;
}

/* ---- POST /v1/departments/{dept}/callbacks ---- */

int ot_signature_parse(const char *h, long long *t, char v1[65])
{
    if (h == NULL)
        return -1;
    int got_t = 0, got_v = 0;
    const char *p = h;
    while (*p != '\0') {
        while (*p == ' ' || *p == ',')
            ++p;
        if (strncmp(p, "t=", 2) == 0) {
            char *end;
            *t = strtoll(p + 2, &end, 10);
            if (end == p + 2)
                return -1;
            got_t = 1;
            p = end;
        } else if (strncmp(p, "v1=", 3) == 0) {
            size_t n = strspn(p + 3, "0123456789abcdefABCDEF");
            if (n != 64)
                return -1;
            for (size_t i = 0; i < 64; ++i)
                v1[i] = (char)tolower((unsigned char)p[3 + i]);
            v1[64] = '\0';
            got_v = 1;
            p += 3 + n;
        } else {
            p += strcspn(p, ",");
        }
    }
    return got_t && got_v ? 0 : -1;
}

typedef struct callback_state {
    decide_state_t d;
    long long t;
    char v1[65];
    int with_item; /* the item id looked like a uuid: its context was read too */
} callback_state_t;

static void on_callback_context(ch_call_t *call, ch_pg_result_t *r)
{
    callback_state_t *cs = ch_call_data(call);
    decide_state_t *st = &cs->d;
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *auth = r->res[0];
    if (PQntuples(auth) != 1 || PQgetisnull(auth, 0, 0)) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "the signature does not verify");
        return;
    }
    /* the signature over "<t>.<raw body>" with the department's secret, compared in constant time */
    uint8_t sealed[512];
    size_t sn = unhex(PQgetvalue(auth, 0, 0), sealed, sizeof(sealed));
    ch_buf_t secret = {0};
    if (sn == 0 || ch_pii_decrypt(ch_pii, sealed, sn, &secret) != 0) {
        ch_buf_free(&secret);
        ch_fail_err(call, CH_EINVAL);
        return;
    }
    h2o_req_t *req = ch_call_req(call);
    int ok = ot_signature_check(secret.base, secret.len, cs->t, cs->v1, req != NULL ? req->entity.base : "",
                                req != NULL ? req->entity.len : 0) == 0;
    OPENSSL_cleanse(secret.base, secret.len);
    ch_buf_free(&secret);
    if (!ok) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "the signature does not verify");
        return;
    }
    /* authenticated: a callback seen before gets its first acknowledgement, whatever this copy says */
    if (!PQgetisnull(auth, 0, 1)) {
        CallbackAck *ack = ch_call_alloc(call, sizeof(*ack));
        cityhall__onething__v1__callback_ack__init(ack);
        ack->item_id = ch_call_strdup(call, PQgetvalue(auth, 0, 1));
        ack->state = ch_call_strdup(call, PQgetvalue(auth, 0, 2));
        ch_reply(call, 200, &ack->base);
        return;
    }
    if (!cs->with_item) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such item");
        return;
    }
    if (decision_valid_or_respond(call, st) != 0 || context_check_or_respond(call, st, r->res[1]) != 0)
        return;
    decide_run(call, st);
}

void ot_callback(ch_call_t *call)
{
    DepartmentCallback *body = ch_call_body(call);
    const char *dept = ch_call_param(call, "dept");
    callback_state_t *cs = ch_call_alloc(call, sizeof(*cs));
    memset(cs, 0, sizeof(*cs));
    ch_call_set_data(call, cs);
    /* authenticate first: nothing about items is said to a caller whose signature is not checked yet */
    if (!dept_ok(dept) || ot_signature_parse(ch_call_header(call, "x-cityhall-signature"), &cs->t, cs->v1) != 0) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "missing or malformed x-cityhall-signature (t=<unix>,v1=<hex>)");
        return;
    }
    long long now = (long long)time(NULL);
    if (cs->t < now - SIGNATURE_WINDOW_S || cs->t > now + SIGNATURE_WINDOW_S) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "the signature's timestamp is not within 5 minutes of now");
        return;
    }
    if (!token_ok(body->callback_id, 128)) {
        /* checked before the read (a bad id cannot be looked up); says nothing about any item */
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "callback_id: 1-128 printable characters");
        return;
    }
    decide_state_t *st = &cs->d;
    st->staff = 0;
    st->item_id = body->item_id;
    st->dept = dept;
    st->decision = body->decision;
    st->reason = body->reason;
    st->callback_id = body->callback_id;
    st->dept_number = body->licence_number;
    st->fields = body->fields;
    st->nfields = body->n_fields;
    st->actor_role = "dept";
    st->actor = dept;
    cs->with_item = is_uuid(body->item_id);
    const char **cv = ch_call_alloc(call, 2 * sizeof(*cv));
    cv[0] = dept;
    cv[1] = body->callback_id;
    const char **iv = ch_call_alloc(call, 2 * sizeof(*iv));
    iv[0] = body->item_id;
    iv[1] = body->decision;
    ch_pg_query_t q[2] = {{&ot_stmt_callback_context, cv, NULL}, {&ot_stmt_decide_context, iv, NULL}};
    int ret = ch_call_pg(call, q, cs->with_item ? 2 : 1, on_callback_context);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/staff/tasks/{id}/decision ---- */

static void on_staff_context(ch_call_t *call, ch_pg_result_t *r)
{
    decide_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    if (context_check_or_respond(call, st, r->res[0]) != 0)
        return;
    decide_run(call, st);
}

void ot_decide(ch_call_t *call)
{
    Decision *body = ch_call_body(call);
    const ch_principal_t *p = ch_call_principal(call);
    const char *id = ch_call_param(call, "id");
    decide_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    ch_call_set_data(call, st);
    st->staff = 1;
    st->item_id = id;
    st->dept = p->dept != NULL ? p->dept : "";
    st->decision = body->decision;
    st->reason = body->reason;
    st->fields = body->fields;
    st->nfields = body->n_fields;
    st->actor_role = "staff";
    st->actor = p->subject;
    if (!is_uuid(id) || !dept_ok(st->dept)) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such task");
        return;
    }
    if (decision_valid_or_respond(call, st) != 0)
        return;
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = id;
    v[1] = body->decision;
    ch_pg_query_t q = {&ot_stmt_decide_context, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_staff_context);
    if (ret != 0)
        ch_fail_err(call, ret);
}
