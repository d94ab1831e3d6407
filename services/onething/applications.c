/* One-thing applications: the bundle list, the prefilled form, submission with its pre-check, the citizen's views. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/time.h>
#include <time.h>
#include <openssl/crypto.h>
#include "catalog.h"
#include "cityhall/audit.h"
#include "cityhall/batcher.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"

typedef Cityhall__Onething__V1__BundleList BundleList;
typedef Cityhall__Onething__V1__Form Form;
typedef Cityhall__Onething__V1__FormField FormField;
typedef Cityhall__Onething__V1__FieldValue FieldValue;
typedef Cityhall__Onething__V1__SubmitApplicationRequest SubmitApplicationRequest;
typedef Cityhall__Onething__V1__FieldError FieldError;
typedef Cityhall__Onething__V1__ApplicationItem ApplicationItem;
typedef Cityhall__Onething__V1__Application Application;
typedef Cityhall__Onething__V1__ApplicationList ApplicationList;
typedef Cityhall__Onething__V1__SupplementRequest SupplementRequest;
typedef Cityhall__Onething__V1__RateRequest RateRequest;
typedef Cityhall__Onething__V1__Notification Notification;
typedef Cityhall__Onething__V1__NotificationList NotificationList;
typedef Google__Protobuf__Timestamp Timestamp;

/*
 * How a request flows. Every route first learns the catalog it works with: the active version for the bundle
 * list, the form and a submission (one small query, which returns the document only when this process has not
 * parsed that version yet), an application's own version for everything about an application. Form values are
 * checked in C against the catalog; facts come from ot_prefill_facts (0008); every department dataset read on
 * the citizen's behalf appends "dataset.read:<name>" to the citizen's access log in the transaction that reads
 * (the form) or that records the submission (the pre-check). A submission's answer (ids, states, deadlines) is
 * fixed before its one write transaction, so that a retry with the same Idempotency-Key replays it exactly.
 */

#define PAGE_DEFAULT       20
#define PAGE_MAX           100
#define FIELDS_MAX         128
#define BUSINESSES_PER_REP 5   /* a person may be the legal representative of at most this many businesses */
#define RATING_COMMENT_MAX 500 /* characters */

/* ---- statements ---- */

#define EPOCH(x) "extract(epoch FROM " x ")::numeric(20,6)::text"

/* The active catalog version; its document only when the caller has not parsed that version ($1) yet. */
static const ch_pg_stmt_t stmt_catalog_active = {
    "ot_catalog_active",
    "SELECT version, CASE WHEN version = $1::int THEN NULL ELSE catalog::text END FROM catalog_versions WHERE active",
    1};

/* Catalog versions by number ($1 int[]). */
static const ch_pg_stmt_t stmt_catalog_versions = {
    "ot_catalog_versions", "SELECT version, catalog::text FROM catalog_versions WHERE version = ANY ($1::int[])", 1};

/* What the form can be prefilled from: $1 citizen, $2 datasets (text[]). */
static const ch_pg_stmt_t stmt_facts = {
    "ot_facts", "SELECT fact, val, src, " EPOCH("at_time") ", is_sealed FROM ot_prefill_facts($1::uuid, $2::text[])",
    2};

/* How many calendar days after $1 (China Standard Time) each number of working days $2 (int[]) ends
   (ot_add_working_days, 0009: the same time of day on the n-th working day). */
static const ch_pg_stmt_t stmt_due = {
    "ot_due",
    "SELECT d, (ot_add_working_days($1::timestamptz, d) AT TIME ZONE 'Asia/Shanghai')::date "
    "          - ($1::timestamptz AT TIME ZONE 'Asia/Shanghai')::date "
    "FROM unnest($2::int[]) AS d",
    2};

/* The applicant's registry entry (the keyed hash of their ID number), if their real name is verified. */
#define ME_HMAC                                                                                                        \
    "(SELECT encode(r.id_hmac, 'hex') FROM citizens c JOIN registry_residents r ON r.resident_id = c.registry_id "     \
    "WHERE c.citizen_id = $1::uuid)"

/*
 * The birth pre-check's data: $1 citizen, $2 birth certificate number, $3 mother's and $4 father's ID hash,
 * $5 the marriage certificate number given (NULL: none). Columns: applicant hash, record found, child name,
 * sex, birth date, record's mother and father hashes, registry names of mother and father, marriage matches.
 */
static const ch_pg_stmt_t stmt_precheck_birth = {
    "ot_precheck_birth",
    "SELECT " ME_HMAC ", b.cert_no IS NOT NULL, b.child_name, b.child_sex, b.child_birth_date::text, "
    "       encode(b.mother_id_hmac, 'hex'), encode(b.father_id_hmac, 'hex'), "
    "       (SELECT name FROM registry_residents WHERE id_hmac = $3::bytea), "
    "       (SELECT name FROM registry_residents WHERE id_hmac = $4::bytea), "
    "       EXISTS (SELECT 1 FROM marriages m WHERE m.cert_no = $5 AND m.wife_id_hmac = $3::bytea "
    "               AND m.husband_id_hmac = $4::bytea) "
    "FROM (SELECT 1) one LEFT JOIN birth_records b ON b.cert_no = $2",
    5};

/* The business pre-check's data: $1 citizen, $2 legal representative's ID hash, $3 company name. */
static const ch_pg_stmt_t stmt_precheck_business = {
    "ot_precheck_business",
    "SELECT " ME_HMAC ", (SELECT name FROM registry_residents WHERE id_hmac = $2::bytea), "
    "       (SELECT count(*) FROM businesses WHERE legal_rep_id_hmac = $2::bytea AND status = 'active'), "
    "       EXISTS (SELECT 1 FROM businesses WHERE name = $3 AND status = 'active')",
    3};

/* The retirement pre-check's data: $1 citizen, $2 the retiree's ID hash. */
static const ch_pg_stmt_t stmt_precheck_retirement = {
    "ot_precheck_retirement",
    "SELECT " ME_HMAC ", r.name, r.sex, r.birth_date::text, s.id_hmac IS NOT NULL, s.insured_since::text, s.status "
    "FROM (SELECT 1) one LEFT JOIN registry_residents r ON r.id_hmac = $2::bytea "
    "LEFT JOIN social_insurance s ON s.id_hmac = $2::bytea",
    2};

/* No pre-check: only the applicant's verified real name. */
static const ch_pg_stmt_t stmt_precheck_none = {"ot_precheck_none", "SELECT " ME_HMAC, 1};

/* A batch of submissions (ot_submit_batch, 0008): per submission, per item, per access-log entry arrays. */
static const ch_pg_stmt_t stmt_submit_batch = {
    "ot_submit_batch",
    "SELECT * FROM ot_submit_batch($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[], "
    "$7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], "
    "$15::text[], $16::text[], $17::int[], $18::text[], $19::int[], $20::uuid[], $21::text[], $22::int[], "
    "$23::text[], $24::text[], $25::text[], $26::timestamptz[], $27::int[], $28::uuid[], $29::text[], $30::text[], "
    "$31::text[], $32::text[], $33::text[], $34::text[])",
    34};

/* The first event of each item a batch wrote (item_events, 0009): $1 items, $2 states, $3 actor roles, $4 actors,
   $5 times. Items of a submission the batch did not write (its key was claimed first) do not exist. */
static const ch_pg_stmt_t stmt_events_batch = {
    "ot_events_batch",
    "INSERT INTO item_events (item_id, at, from_state, to_state, actor_role, actor, note) "
    "SELECT u.id, u.at, NULL, u.state, u.role, u.actor, 'submitted' "
    "FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) AS u(id, state, role, actor, at) "
    "WHERE EXISTS (SELECT 1 FROM application_items x WHERE x.item_id = u.id)",
    5};

/*
 * The pre-check's access-log entries of a batch's citizens acting alone (access_log_pending, 0009): recorded in the
 * batch's transaction, appended to the citizens' hash chains within about a second by the dispatcher's drain, so
 * that a submission never holds a citizen's chain lock while its batch commits. $1 applications (an entry of a
 * submission the batch did not write is dropped), $2 citizens, $3 roles, $4 actors, $5 departments, $6 actions,
 * $7 purposes. Entries on behalf of a citizen (a delegation, a kiosk) need on_behalf_of, which that table has not:
 * ot_submit_batch appends those itself.
 */
static const ch_pg_stmt_t stmt_logs_batch = {
    "ot_logs_batch",
    "INSERT INTO access_log_pending (citizen_id, actor_role, actor, actor_dept, action, purpose) "
    "SELECT u.citizen, u.role, u.actor, u.dept, u.action, u.purpose "
    "FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) WITH ORDINALITY "
    "     AS u(app, citizen, role, actor, dept, action, purpose, k) "
    "WHERE EXISTS (SELECT 1 FROM applications a WHERE a.application_id = u.app) ORDER BY u.citizen, u.k",
    7};

/* An application and its items, one row per item (the application's columns repeated). */
#define APP_COLUMNS                                                                                                    \
    "a.application_id::text, a.bundle_code, a.catalog_version, a.state, "                                              \
    "extract(epoch FROM a.submitted_at)::numeric(20,6)::text, extract(epoch FROM a.updated_at)::numeric(20,6)::text, " \
    "a.precheck, coalesce(a.rating, 0), a.precheck_errors::text, i.item_id::text, i.item_code, i.department, "         \
    "i.state, coalesce(i.reason, ''), array_to_string(i.supplement_fields, ','), "                                     \
    "extract(epoch FROM i.due_at)::numeric(20,6)::text, coalesce(i.licence_id::text, ''), "                            \
    "extract(epoch FROM i.updated_at)::numeric(20,6)::text"
enum {
    C_APP_ID,
    C_BUNDLE,
    C_VERSION,
    C_STATE,
    C_SUBMITTED,
    C_UPDATED,
    C_PRECHECK,
    C_RATING,
    C_ERRORS,
    C_ITEM_ID,
    C_ITEM_CODE,
    C_ITEM_DEPT,
    C_ITEM_STATE,
    C_ITEM_REASON,
    C_ITEM_SUPPLEMENT,
    C_ITEM_DUE,
    C_ITEM_LICENCE,
    C_ITEM_UPDATED,
    C_NCOLUMNS
};

/* One of the citizen's applications with its items. $1 application, $2 citizen. */
static const ch_pg_stmt_t stmt_app_get = {
    "ot_app_get",
    "SELECT " APP_COLUMNS " FROM applications a LEFT JOIN application_items i USING (application_id) "
    "WHERE a.application_id = $1::uuid AND a.citizen_id = $2::uuid ORDER BY i.position",
    2};

/* The same, with what a supplement needs: the revision, the sealed values, whether each item's department has
   its own system (dept_endpoints, 0009). */
static const ch_pg_stmt_t stmt_app_get_full = {
    "ot_app_get_full",
    "SELECT " APP_COLUMNS ", a.revision, encode(a.fields_enc, 'hex'), "
    "       EXISTS (SELECT 1 FROM dept_endpoints e WHERE e.dept = i.department) "
    "FROM applications a LEFT JOIN application_items i USING (application_id) "
    "WHERE a.application_id = $1::uuid AND a.citizen_id = $2::uuid ORDER BY i.position",
    2};

/* A page of the citizen's applications, newest first, after the cursor ($2 submitted_at in microseconds since
   the epoch, $3 application id; NULL: from the newest), $4 applications. */
static const ch_pg_stmt_t stmt_app_list = {
    "ot_app_list",
    "WITH page AS (SELECT * FROM applications WHERE citizen_id = $1::uuid AND ($2::bigint IS NULL OR "
    "              (submitted_at, application_id) < (timestamptz 'epoch' + $2::bigint * interval '1 microsecond', "
    "                                                $3::uuid)) "
    "              ORDER BY submitted_at DESC, application_id DESC LIMIT $4::int) "
    "SELECT " APP_COLUMNS ", (extract(epoch FROM a.submitted_at) * 1000000)::bigint::text "
    "FROM page a LEFT JOIN application_items i USING (application_id) "
    "ORDER BY a.submitted_at DESC, a.application_id DESC, i.position",
    4};

/* A supplement's writes (ot_supplement_apply, 0008): $1 application, $2 revision read, $3 sealed values,
   $4 items answered, $5 their new states, $6 time. */
static const ch_pg_stmt_t stmt_supplement_apply = {
    "ot_supplement_apply",
    "SELECT ot_supplement_apply($1::uuid, $2::int, $3::bytea, $4::uuid[], $5::text[], $6::timestamptz)", 6};

/* $1 items, $2 their new states, $3 actor role, $4 actor, $5 time. */
static const ch_pg_stmt_t stmt_events_supplement = {
    "ot_events_supplement",
    "INSERT INTO item_events (item_id, at, from_state, to_state, actor_role, actor, note) "
    "SELECT i, $5::timestamptz, 'supplement_requested', s, $3, $4, 'supplement received' "
    "FROM unnest($1::uuid[], $2::text[]) AS u(i, s)",
    5};

/* A withdrawal (ot_withdraw, 0008) and its events: $1 application, $2 citizen, $3 time, $4 actor role, $5 actor. */
static const ch_pg_stmt_t stmt_withdraw = {
    "ot_withdraw",
    "WITH w AS (SELECT * FROM ot_withdraw($1::uuid, $2::uuid, $3::timestamptz)) "
    "INSERT INTO item_events (item_id, at, from_state, to_state, actor_role, actor, note) "
    "SELECT item_id, $3::timestamptz, from_state, 'withdrawn', $4, $5, 'withdrawn by the citizen' FROM w",
    5};

/* Escalations of withdrawn items are over (escalations, 0009). $1 application, $2 time. */
static const ch_pg_stmt_t stmt_withdraw_escalations = {
    "ot_withdraw_escalations",
    "UPDATE escalations SET resolved_at = $2::timestamptz WHERE resolved_at IS NULL AND item_id IN "
    "(SELECT item_id FROM application_items WHERE application_id = $1::uuid AND state = 'withdrawn')",
    2};

/*
 * A rating, once, on a final application: $1 application, $2 citizen, $3 stars, $4 comment. Columns: the state
 * and rating before, and whether this statement rated it (a concurrent rating makes it 0 with no rating seen).
 */
static const ch_pg_stmt_t stmt_rate = {
    "ot_rate",
    "WITH a AS (SELECT state, rating FROM applications WHERE application_id = $1::uuid AND citizen_id = $2::uuid), "
    "u AS (UPDATE applications SET rating = $3::smallint, rating_comment = nullif($4, ''), rated_at = now() "
    "      WHERE application_id = $1::uuid AND citizen_id = $2::uuid AND rating IS NULL "
    "        AND state IN ('completed', 'partially_completed', 'rejected', 'withdrawn') RETURNING 1) "
    "SELECT (SELECT state FROM a), (SELECT rating FROM a), (SELECT count(*) FROM u)",
    4};

/* A page of the citizen's notifications, newest first, after $2 (NULL: from the newest); $3 rows. */
static const ch_pg_stmt_t stmt_notifications = {
    "ot_notifications",
    "SELECT notification_id::text, kind, text, coalesce(application_id::text, ''), " EPOCH(
        "created_at") ", "
                      "       read_at IS NOT NULL "
                      "FROM notifications n WHERE n.citizen_id = $1::uuid AND n.notification_id < coalesce($2::bigint, "
                      "9223372036854775807) ORDER BY n.notification_id DESC LIMIT $3::int",
    3};

const ch_pg_stmt_t *const ot_applications_stmts[] = {
    &stmt_catalog_active,
    &stmt_catalog_versions,
    &stmt_facts,
    &stmt_due,
    &stmt_precheck_birth,
    &stmt_precheck_business,
    &stmt_precheck_retirement,
    &stmt_precheck_none,
    &stmt_submit_batch,
    &stmt_events_batch,
    &stmt_logs_batch,
    &stmt_app_get,
    &stmt_app_get_full,
    &stmt_app_list,
    &stmt_supplement_apply,
    &stmt_events_supplement,
    &stmt_withdraw,
    &stmt_withdraw_escalations,
    &stmt_rate,
    &stmt_notifications,
    NULL,
};

int ot_init_applications(const ch_config_t *config)
{
    return 0;
}

/* ---- small helpers ---- */

/* A random UUIDv4 (text, 37 bytes); -1 when the kernel has no entropy yet. */
static int uuid_v4(char out[37])
{
    unsigned char u[16];
    if (getrandom(u, sizeof(u), GRND_NONBLOCK) != sizeof(u))
        return -1;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3],
             u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
    return 0;
}

/* A path parameter that can be an application id: a UUID in canonical form (lower-cased here), else NULL. */
static const char *uuid_param(ch_call_t *call, const char *s)
{
    if (s == NULL || strlen(s) != 36)
        return NULL;
    char *out = ch_call_strdup(call, s);
    for (int i = 0; i < 36; ++i) {
        char c = out[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (c != '-')
                return NULL;
        } else if (c >= 'A' && c <= 'F') {
            out[i] = (char)(c - 'A' + 'a');
        } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return NULL;
        }
    }
    return out;
}

typedef struct now {
    int64_t sec;
    int32_t usec;
} now_t;

static now_t now_get(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (now_t){tv.tv_sec, (int32_t)tv.tv_usec};
}

/* The time as PostgreSQL reads it exactly ("2026-11-28 20:00:00.123456+00"). */
static const char *now_text(ch_call_t *call, now_t t)
{
    struct tm tm;
    time_t s = (time_t)t.sec;
    gmtime_r(&s, &tm);
    return ch_call_printf(call, "%04d-%02d-%02d %02d:%02d:%02d.%06d+00", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                          tm.tm_hour, tm.tm_min, tm.tm_sec, (int)t.usec);
}

static Timestamp *now_timestamp(ch_call_t *call, now_t t)
{
    Timestamp *ts = ch_call_alloc(call, sizeof(*ts));
    google__protobuf__timestamp__init(ts);
    ts->seconds = t.sec;
    ts->nanos = t.usec * 1000;
    return ts;
}

static const char *value_or_null(PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int value_true(PGresult *res, int row, int col)
{
    return !PQgetisnull(res, row, col) && PQgetvalue(res, row, col)[0] == 't';
}

/* A bytea parameter in text form: \x and lower-case hex. */
static const char *bytea_param(ch_call_t *call, const uint8_t *p, size_t len)
{
    char *s = ch_call_alloc(call, 2 * len + 3);
    s[0] = '\\';
    s[1] = 'x';
    ch_hex(p, len, s + 2);
    return s;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes hex into call memory; returns the length or -1. */
static long hex_decode(ch_call_t *call, const char *hex, uint8_t **out)
{
    size_t n = strlen(hex);
    if (n % 2 != 0)
        return -1;
    uint8_t *b = ch_call_alloc(call, n / 2 + 1);
    for (size_t i = 0; i < n / 2; ++i) {
        int hi = hexval((unsigned char)hex[2 * i]), lo = hexval((unsigned char)hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        b[i] = (uint8_t)(hi << 4 | lo);
    }
    *out = b;
    return (long)(n / 2);
}

/* Opens a sealed value given as hex (ID number, phone, form values) into call memory; NULL if it does not open. */
static char *unseal_hex(ch_call_t *call, const char *hex)
{
    uint8_t *sealed;
    long len = hex_decode(call, hex, &sealed);
    if (len <= 0)
        return NULL;
    ch_buf_t plain = {0};
    char *out = NULL;
    if (ch_pii_decrypt(ch_pii, sealed, (size_t)len, &plain) == 0) {
        out = ch_call_alloc(call, plain.len + 1);
        memcpy(out, plain.base, plain.len);
        out[plain.len] = '\0';
    }
    if (plain.base != NULL)
        OPENSSL_cleanse(plain.base, plain.cap);
    ch_buf_free(&plain);
    return out;
}

/* Seals bytes for a bytea parameter. */
static const char *seal_param(ch_call_t *call, const char *plain, size_t len)
{
    ch_buf_t sealed = {0};
    ch_pii_encrypt(ch_pii, plain, len, &sealed);
    const char *p = bytea_param(call, (const uint8_t *)sealed.base, sealed.len);
    ch_buf_free(&sealed);
    return p;
}

/* Appends `s` as one element of a PostgreSQL array literal (always quoted; NULL for a NULL element). */
static void array_elem(ch_buf_t *b, const char *s)
{
    if (b->len > 1)
        ch_buf_append(b, ",", 1);
    if (s == NULL) {
        ch_buf_append(b, "NULL", 4);
        return;
    }
    ch_buf_append(b, "\"", 1);
    for (const char *c = s; *c != '\0'; ++c) {
        if (*c == '"' || *c == '\\')
            ch_buf_append(b, "\\", 1);
        ch_buf_append(b, c, 1);
    }
    ch_buf_append(b, "\"", 1);
}

/* Finishes an array literal begun with "{" into call memory and frees the buffer. */
static const char *array_end(ch_call_t *call, ch_buf_t *b)
{
    ch_buf_append(b, "}", 1);
    const char *s = ch_call_strdup(call, b->base);
    ch_buf_free(b);
    return s;
}

/* A deadlock or serialization failure: the transaction did nothing and may simply run again. */
static int retryable(const ch_pg_result_t *r)
{
    return r->err == CH_EDB && r->sqlstate != NULL &&
           (strcmp(r->sqlstate, "40P01") == 0 || strcmp(r->sqlstate, "40001") == 0);
}

/* A masked ID number as the form shows it: 4 characters, ten stars, 4 characters. */
static int looks_masked_id(const char *s)
{
    if (strlen(s) != 18)
        return 0;
    for (int i = 0; i < 18; ++i)
        if ((i >= 4 && i < 14) != (s[i] == '*'))
            return 0;
    return 1;
}

/* A masked phone number: 3 digits, four stars, 4 digits. */
static int looks_masked_phone(const char *s)
{
    if (strlen(s) != 11)
        return 0;
    for (int i = 0; i < 11; ++i)
        if ((i >= 3 && i < 7) != (s[i] == '*'))
            return 0;
    return 1;
}

/* page_size of a list: default, capped; -1 after answering 400. */
static int page_size_or_respond(ch_call_t *call)
{
    const char *size = ch_call_query(call, "page_size");
    if (size == NULL || size[0] == '\0')
        return PAGE_DEFAULT;
    long v = 0;
    int ok = strlen(size) <= 9;
    for (const char *c = size; ok && *c != '\0'; ++c) {
        ok = *c >= '0' && *c <= '9';
        v = v * 10 + (*c - '0');
    }
    if (!ok) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "page_size: must be a number from 1 to %d", PAGE_MAX);
        return -1;
    }
    return v <= 0 ? PAGE_DEFAULT : v > PAGE_MAX ? PAGE_MAX : (int)v;
}

/* Opaque page tokens: base64url of "<prefix><cursor>". */
static char *page_token_encode(ch_call_t *call, const char *prefix, const char *cursor)
{
    const char *plain = ch_call_printf(call, "%s%s", prefix, cursor);
    ch_buf_t buf = {0};
    ch_b64url_encode((const uint8_t *)plain, strlen(plain), &buf);
    char *s = ch_call_strdup(call, buf.base);
    ch_buf_free(&buf);
    return s;
}

/* The cursor of a page token with `prefix`, or NULL when the token is not one of ours. */
static char *page_token_decode(ch_call_t *call, const char *token, const char *prefix)
{
    size_t len = strlen(token);
    if (len == 0 || len > 120)
        return NULL;
    uint8_t plain[100];
    long n = ch_b64url_decode(token, len, plain);
    size_t pre = strlen(prefix);
    if (n <= (long)pre || n >= (long)sizeof(plain) || memcmp(plain, prefix, pre) != 0)
        return NULL;
    plain[n] = '\0';
    for (long i = (long)pre; i < n; ++i)
        if (!((plain[i] >= '0' && plain[i] <= '9') || (plain[i] >= 'a' && plain[i] <= 'f') || plain[i] == '-' ||
              plain[i] == ':'))
            return NULL;
    return ch_call_strdup(call, (const char *)plain + pre);
}

/* The datasets of `bits` as a text[] literal. */
static const char *datasets_param(ch_call_t *call, unsigned bits)
{
    ch_buf_t b = {0};
    ch_buf_append(&b, "{", 1);
    for (unsigned i = 0; i < OT_DS__COUNT; ++i)
        if (bits & (1u << i))
            array_elem(&b, ot_dataset_name(i));
    return array_end(call, &b);
}

/* Access-log entries for the logged datasets of `bits`, appended to q from index n; returns the new count. */
static int audit_datasets(ch_call_t *call, unsigned bits, const char *purpose, ch_pg_query_t *q, int n)
{
    const ch_principal_t *p = ch_call_principal(call);
    for (unsigned i = 0; i < OT_DS__COUNT; ++i)
        if ((bits & (1u << i)) && ot_dataset_logged(i))
            ch_audit_query(call, p->subject, ch_call_printf(call, "dataset.read:%s", ot_dataset_name(i)), purpose,
                           &q[n++]);
    return n;
}

/* ---- the catalog a request works with ---- */

/* The first member of every handler's state: the catalog it works with and what to do once it is known. */
typedef struct flow {
    const ot_catalog_t *cat;
    void (*next)(ch_call_t *call);
} flow_t;

static void on_catalog_active(ch_call_t *call, ch_pg_result_t *r)
{
    flow_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    st->cat = NULL;
    if (PQntuples(res) == 1) {
        int version = atoi(PQgetvalue(res, 0, 0));
        const char *doc = value_or_null(res, 0, 1);
        st->cat = doc != NULL ? ot_catalog_cache(version, doc, strlen(doc)) : ot_catalog_cached(version);
        if (st->cat == NULL) {
            /* a document that does not parse was put there behind `catalog load`'s back */
            ch_fail_err(call, CH_EINVAL);
            return;
        }
        ot_catalog_set_active_hint(version);
    }
    st->next(call);
}

/* Learns the active catalog (NULL when none is installed) into st->cat, then runs st->next. */
static void with_active_catalog(ch_call_t *call, flow_t *st, void (*next)(ch_call_t *call))
{
    st->next = next;
    ch_call_set_data(call, st);
    int hint = ot_catalog_active_hint();
    if (hint != 0 && ot_catalog_cached(hint) == NULL)
        hint = 0;
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = ch_call_printf(call, "%d", hint);
    ch_pg_query_t q = {&stmt_catalog_active, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_catalog_active);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_catalog_versions(ch_call_t *call, ch_pg_result_t *r)
{
    flow_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    for (int i = 0; i < PQntuples(res); ++i) {
        const char *doc = PQgetvalue(res, i, 1);
        if (ot_catalog_cache(atoi(PQgetvalue(res, i, 0)), doc, strlen(doc)) == NULL) {
            ch_fail_err(call, CH_EINVAL);
            return;
        }
    }
    st->next(call);
}

/* Makes sure the catalog versions of `res` (column `col`) are parsed, then runs next (at once if they are). */
static void with_versions_of(ch_call_t *call, flow_t *st, PGresult *res, int col, void (*next)(ch_call_t *call))
{
    ch_buf_t b = {0};
    ch_buf_append(&b, "{", 1);
    int missing = 0;
    for (int i = 0; i < PQntuples(res); ++i) {
        const char *v = value_or_null(res, i, col);
        if (v != NULL && ot_catalog_cached(atoi(v)) == NULL) {
            array_elem(&b, v);
            ++missing;
        }
    }
    st->next = next;
    ch_call_set_data(call, st);
    if (missing == 0) {
        ch_buf_free(&b);
        next(call);
        return;
    }
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = array_end(call, &b);
    ch_pg_query_t q = {&stmt_catalog_versions, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_catalog_versions);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- GET /v1/onething/bundles ---- */

static void bundles_reply(ch_call_t *call)
{
    flow_t *st = ch_call_data(call);
    if (st->cat == NULL) {
        BundleList *empty = ch_call_alloc(call, sizeof(*empty));
        cityhall__onething__v1__bundle_list__init(empty);
        ch_reply(call, 200, &empty->base);
        return;
    }
    ch_reply(call, 200, st->cat->bundle_list);
}

void ot_bundles(ch_call_t *call)
{
    flow_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    with_active_catalog(call, st, bundles_reply);
}

/* ---- facts: what ot_prefill_facts returned ---- */

enum { F_KEY, F_VALUE, F_SOURCE, F_AS_OF, F_SEALED };

/* The row of the first of `keys` present in the facts, or -1. */
static int fact_row(PGresult *res, const char *const *keys, size_t n)
{
    for (size_t k = 0; k < n; ++k)
        for (int i = 0; i < PQntuples(res); ++i)
            if (strcmp(PQgetvalue(res, i, F_KEY), keys[k]) == 0)
                return i;
    return -1;
}

/* The plain value of a fact row (a sealed one opened), or NULL when a sealed value does not open. */
static const char *fact_value(ch_call_t *call, PGresult *res, int row)
{
    const char *v = PQgetvalue(res, row, F_VALUE);
    return value_true(res, row, F_SEALED) ? unseal_hex(call, v) : ch_call_strdup(call, v);
}

/* How a prefilled value is shown: ID and phone numbers masked, everything else as it is. */
static char *shown_value(ch_call_t *call, const ot_field_t *f, const char *plain)
{
    if (f->type == OT_ID_NUMBER && strlen(plain) == 18) {
        char *m = ch_call_alloc(call, 19);
        ch_id_number_mask(plain, m);
        return m;
    }
    if (f->type == OT_PHONE && strlen(plain) == 11) {
        char *m = ch_call_alloc(call, 12);
        ch_phone_mask(plain, m);
        return m;
    }
    return ch_call_strdup(call, plain);
}

/* ---- GET /v1/onething/bundles/{code}/form ---- */

typedef struct form_state {
    flow_t flow;
    const ot_bundle_t *bundle;
} form_state_t;

static void on_form_facts(ch_call_t *call, ch_pg_result_t *r)
{
    form_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    const ot_bundle_t *b = st->bundle;
    Form *form = ch_call_alloc(call, sizeof(*form));
    cityhall__onething__v1__form__init(form);
    form->bundle_code = (char *)b->code;
    form->catalog_version = st->flow.cat->version;
    form->consent_text = (char *)b->consent_text;
    form->n_fields = b->n_fields;
    form->fields = ch_call_alloc(call, (b->n_fields + 1) * sizeof(*form->fields));
    for (size_t i = 0; i < b->n_fields; ++i) {
        const ot_field_t *f = &b->fields[i];
        FormField *ff = ch_call_alloc(call, sizeof(*ff));
        cityhall__onething__v1__form_field__init(ff);
        ff->name = (char *)f->name;
        ff->label = (char *)f->label;
        ff->type = (char *)f->type_name;
        ff->required = f->required;
        ff->n_options = f->n_options;
        ff->options = (char **)f->options;
        ff->n_items = f->n_items;
        ff->items = (char **)f->items;
        ff->value = "";
        ff->source = "";
        int row = fact_row(res, f->prefill, f->n_prefill);
        const char *plain = row >= 0 ? fact_value(call, res, row) : NULL;
        if (plain != NULL) {
            ff->value = shown_value(call, f, plain);
            ff->source = ch_call_strdup(call, PQgetvalue(res, row, F_SOURCE));
            ff->as_of = ch_call_timestamp(call, value_or_null(res, row, F_AS_OF));
        }
        form->fields[i] = ff;
    }
    ch_reply(call, 200, &form->base);
}

static void form_read(ch_call_t *call)
{
    form_state_t *st = ch_call_data(call);
    const char *code = ch_call_param(call, "code");
    st->bundle = st->flow.cat != NULL ? ot_catalog_bundle(st->flow.cat, code) : NULL;
    if (st->bundle == NULL) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such bundle");
        return;
    }
    /* the facts and the access-log entries of the datasets they come from, in one transaction */
    const ch_principal_t *p = ch_call_principal(call);
    unsigned ds = st->bundle->datasets;
    ch_pg_query_t *q = ch_call_alloc(call, (1 + OT_DS__COUNT) * sizeof(*q));
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = p->subject;
    v[1] = datasets_param(call, ds);
    q[0] = (ch_pg_query_t){&stmt_facts, v, NULL};
    int n = audit_datasets(call, ds, ch_call_printf(call, "one-thing form prefill: %s", st->bundle->code), q, 1);
    int ret = ch_call_pg(call, q, n, on_form_facts);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void ot_form(ch_call_t *call)
{
    form_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    with_active_catalog(call, &st->flow, form_read);
}

/* ---- deadlines: working days, cached per calendar day ---- */

/*
 * The deadline of an item dispatched at submission is ot_add_working_days(acceptance, promised days): the same time
 * of day on the n-th working day. It depends on the acceptance's date (China Standard Time) and n only, and takes
 * the database a millisecond or two (a walk over the holiday calendar), so the calendar-day offset of each n is
 * kept per date for a minute (a holiday added later is seen within that minute) and the time computed here.
 */
#define DUE_MAX_DAYS 365
#define DUE_TTL_S    60

typedef struct due_cache {
    long day;                       /* the CST date the offsets are for (days since the epoch) */
    int64_t fetched;                /* when (Unix seconds) */
    short offset[DUE_MAX_DAYS + 1]; /* calendar days; -1 unknown */
} due_cache_t;

static pthread_mutex_t due_lock = PTHREAD_MUTEX_INITIALIZER; /* guards due_cache */
static due_cache_t due_cache = {.day = -1};

static long cst_day(now_t t)
{
    return (long)((t.sec + 8 * 3600) / 86400);
}

/* The offset of `days` working days from a time on CST date `day`, or -1 when not known (fresh). */
static int due_offset(long day, int days, int64_t now)
{
    int off = -1;
    pthread_mutex_lock(&due_lock);
    if (due_cache.day == day && now - due_cache.fetched < DUE_TTL_S && days >= 0 && days <= DUE_MAX_DAYS)
        off = due_cache.offset[days];
    pthread_mutex_unlock(&due_lock);
    return off;
}

static void due_learn(long day, int64_t now, PGresult *res)
{
    pthread_mutex_lock(&due_lock);
    if (due_cache.day != day || now - due_cache.fetched >= DUE_TTL_S) {
        due_cache.day = day;
        due_cache.fetched = now;
        for (int i = 0; i <= DUE_MAX_DAYS; ++i)
            due_cache.offset[i] = -1;
    }
    for (int i = 0; i < PQntuples(res); ++i) {
        int d = atoi(PQgetvalue(res, i, 0));
        if (d >= 0 && d <= DUE_MAX_DAYS && !PQgetisnull(res, i, 1))
            due_cache.offset[d] = (short)atoi(PQgetvalue(res, i, 1));
    }
    pthread_mutex_unlock(&due_lock);
}

/* ---- POST /v1/onething/applications ---- */

typedef struct submit_state {
    flow_t flow;
    const ot_bundle_t *bundle;
    const char **values;  /* per form field: the checked value, or NULL when empty */
    const char **reasons; /* per form field: why its value is refused, or NULL */
    const char **hmacs;   /* per form field: the ID number's keyed hash (bytea text) */
    char *masked;         /* per form field: the value is the form's masked placeholder */
    int n_masked;
    FieldError **others; /* unknown and repeated fields */
    size_t n_others;
    unsigned read; /* OT_DS_* datasets read so far */
    int restarted;
    now_t now;
    const char *now_s;
    FieldError **findings; /* the pre-check's */
    size_t n_findings;
    Application *app;
    const char *fail_message; /* a 422 to answer once the reads are logged (NULL: the field errors, 400) */
} submit_state_t;

static int field_index(const ot_bundle_t *b, const char *name)
{
    for (size_t i = 0; i < b->n_fields; ++i)
        if (strcmp(b->fields[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* The value of a form field by name (NULL when empty or not in the form). */
static const char *field_value(const submit_state_t *st, const char *name)
{
    int i = field_index(st->bundle, name);
    return i >= 0 ? st->values[i] : NULL;
}

static const char *field_hmac(const submit_state_t *st, const char *name)
{
    int i = field_index(st->bundle, name);
    return i >= 0 ? st->hmacs[i] : NULL;
}

static FieldError *field_error(ch_call_t *call, const char *field, const char *reason)
{
    FieldError *e = ch_call_alloc(call, sizeof(*e));
    cityhall__onething__v1__field_error__init(e);
    e->field = (char *)field;
    e->reason = (char *)reason;
    return e;
}

/* Answers 400 listing every refused field (as much as fits in an error message, then a count). */
static void fail_fields(ch_call_t *call, FieldError *const *errs, size_t n)
{
    ch_buf_t msg = {0};
    size_t shown = 0;
    for (size_t i = 0; i < n; ++i) {
        const char *field = errs[i]->field, *reason = errs[i]->reason;
        /* the error body has room for a message of about 500 bytes: the rest is counted */
        if (msg.len + strlen(field) + strlen(reason) + 4 < 440) {
            if (msg.len > 0)
                ch_buf_append(&msg, "; ", 2);
            ch_buf_append(&msg, field, strlen(field));
            ch_buf_append(&msg, ": ", 2);
            ch_buf_append(&msg, reason, strlen(reason));
            ++shown;
        }
    }
    if (shown < n)
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "%zu fields are invalid: %s; and %zu more", n, msg.base, n - shown);
    else
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "%zu field%s invalid: %s", n, n == 1 ? " is" : "s are", msg.base);
    ch_buf_free(&msg);
}

/* Answers 400 with every refused field, in form order, then the unknown ones; returns 1 if it answered. */
static int field_errors_or_continue(ch_call_t *call, submit_state_t *st)
{
    const ot_bundle_t *b = st->bundle;
    FieldError **errs = ch_call_alloc(call, (b->n_fields + st->n_others + 1) * sizeof(*errs));
    size_t n = 0;
    for (size_t i = 0; i < b->n_fields; ++i)
        if (st->reasons[i] != NULL)
            errs[n++] = field_error(call, b->fields[i].name, st->reasons[i]);
    for (size_t i = 0; i < st->n_others; ++i)
        errs[n++] = st->others[i];
    if (n == 0)
        return 0;
    fail_fields(call, errs, n);
    return 1;
}

/* A field name as an error may echo it: only when it looks like one (never a value typed in the wrong place). */
static const char *echo_name(ch_call_t *call, const char *name, size_t index)
{
    size_t n = strlen(name);
    if (n > 0 && n <= 64 && strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789._") == n)
        return name;
    return ch_call_printf(call, "fields[%zu]", index);
}

static void submit_precheck(ch_call_t *call);

static void on_logged_then_fail(ch_call_t *call, ch_pg_result_t *r)
{
    submit_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    if (st->fail_message != NULL)
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "%s", st->fail_message);
    else if (!field_errors_or_continue(call, st))
        ch_fail_err(call, CH_EINVAL);
}

/*
 * Datasets were read but the request ends in an error before its write: their access-log entries go in a
 * transaction of their own before answering (what was read is never shown, but it was read).
 */
static void log_reads_then_fail(ch_call_t *call, submit_state_t *st)
{
    ch_pg_query_t *q = ch_call_alloc(call, OT_DS__COUNT * sizeof(*q));
    int n = audit_datasets(call, st->read, ch_call_printf(call, "one-thing application: %s", st->bundle->code), q, 0);
    if (n == 0) {
        ch_pg_result_t none = {0};
        on_logged_then_fail(call, &none);
        return;
    }
    int ret = ch_call_pg(call, q, n, on_logged_then_fail);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_submit_facts(ch_call_t *call, ch_pg_result_t *r)
{
    submit_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    const ot_bundle_t *b = st->bundle;
    int bad = 0;
    for (size_t i = 0; i < b->n_fields; ++i) {
        if (!st->masked[i])
            continue;
        const ot_field_t *f = &b->fields[i];
        int row = fact_row(res, f->prefill, f->n_prefill);
        const char *plain = row >= 0 && value_true(res, row, F_SEALED) ? fact_value(call, res, row) : NULL;
        if (plain != NULL && strcmp(shown_value(call, f, plain), st->values[i]) == 0) {
            st->values[i] = plain;
        } else {
            st->reasons[i] = "a masked number stands only for the prefilled one: type the full number";
            bad = 1;
        }
    }
    if (bad) {
        log_reads_then_fail(call, st);
        return;
    }
    submit_precheck(call);
}

static void submit_check(ch_call_t *call)
{
    submit_state_t *st = ch_call_data(call);
    SubmitApplicationRequest *req = ch_call_body(call);
    if (st->flow.cat == NULL || (st->bundle = ot_catalog_bundle(st->flow.cat, req->bundle_code)) == NULL) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such bundle");
        return;
    }
    const ot_bundle_t *b = st->bundle;
    st->values = ch_call_alloc(call, b->n_fields * sizeof(*st->values));
    st->reasons = ch_call_alloc(call, b->n_fields * sizeof(*st->reasons));
    st->hmacs = ch_call_alloc(call, b->n_fields * sizeof(*st->hmacs));
    st->masked = ch_call_alloc(call, b->n_fields);
    memset(st->values, 0, b->n_fields * sizeof(*st->values));
    memset(st->reasons, 0, b->n_fields * sizeof(*st->reasons));
    memset(st->hmacs, 0, b->n_fields * sizeof(*st->hmacs));
    memset(st->masked, 0, b->n_fields);
    st->n_masked = 0;
    st->n_others = 0;
    st->others = ch_call_alloc(call, (req->n_fields + 2) * sizeof(*st->others));
    char *seen = ch_call_alloc(call, b->n_fields);
    memset(seen, 0, b->n_fields);
    if (req->n_fields > FIELDS_MAX)
        st->others[st->n_others++] = field_error(call, "fields", ch_call_printf(call, "at most %d", FIELDS_MAX));
    for (size_t k = 0; k < req->n_fields && k < FIELDS_MAX; ++k) {
        const FieldValue *fv = req->fields[k];
        int i = field_index(b, fv->name);
        if (i < 0) {
            st->others[st->n_others++] = field_error(call, echo_name(call, fv->name, k), "not a field of this form");
            continue;
        }
        if (seen[i]) {
            st->reasons[i] = "given more than once";
            continue;
        }
        seen[i] = 1;
        const ot_field_t *f = &b->fields[i];
        if ((f->type == OT_ID_NUMBER && looks_masked_id(fv->value)) ||
            (f->type == OT_PHONE && looks_masked_phone(fv->value))) {
            st->masked[i] = 1;
            st->values[i] = fv->value;
            ++st->n_masked;
            continue;
        }
        const char *norm = NULL;
        const char *why = ot_field_check(call, f, fv->value, &norm);
        if (norm != NULL && norm[0] == '\0')
            continue; /* empty: as if not given */
        if (why != NULL)
            st->reasons[i] = why;
        else
            st->values[i] = norm;
    }
    for (size_t i = 0; i < b->n_fields; ++i)
        if (b->fields[i].required && st->values[i] == NULL && st->reasons[i] == NULL)
            st->reasons[i] = "required";
    if (field_errors_or_continue(call, st))
        return;
    if (!req->consent) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION,
                "consent: the citizen must consent to the data sharing the bundle needs (consent: true)");
        return;
    }
    if (st->n_masked == 0) {
        submit_precheck(call);
        return;
    }
    /* masked placeholders stand for the prefilled values: read those facts again */
    unsigned ds = 0;
    for (size_t i = 0; i < b->n_fields; ++i)
        if (st->masked[i])
            ds |= ot_prefill_datasets(&b->fields[i]);
    st->read |= ds;
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = ch_call_principal(call)->subject;
    v[1] = datasets_param(call, ds);
    ch_pg_query_t q = {&stmt_facts, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_submit_facts);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void ot_submit(ch_call_t *call)
{
    SubmitApplicationRequest *req = ch_call_body(call);
    if (req->bundle_code[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "bundle_code: required");
        return;
    }
    submit_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    /* with the active version this process knows, the check that it is still active rides with the pre-check */
    int hint = ot_catalog_active_hint();
    st->flow.cat = hint != 0 ? ot_catalog_cached(hint) : NULL;
    if (st->flow.cat == NULL) {
        with_active_catalog(call, &st->flow, submit_check);
        return;
    }
    ch_call_set_data(call, st);
    submit_check(call);
}

/* ---- the automatic pre-check ---- */

static void finding(ch_call_t *call, submit_state_t *st, const char *field, const char *reason)
{
    if (st->findings == NULL)
        st->findings = ch_call_alloc(call, 32 * sizeof(*st->findings));
    if (st->n_findings < 32)
        st->findings[st->n_findings++] = field_error(call, field, reason);
}

/* The keyed hash of an ID number as a bytea parameter. */
static const char *id_hmac_param(ch_call_t *call, const char *id)
{
    uint8_t mac[32];
    ch_pii_hmac(ch_pii, "id", id, strlen(id), mac);
    return bytea_param(call, mac, sizeof(mac));
}

/* "\x<hex>" against the hex a statement returned. */
static int same_hmac(const char *param, const char *hex)
{
    return param != NULL && hex != NULL && strcmp(param + 2, hex) == 0;
}

/* Equal texts; an empty form value (NULL) equals nothing. */
static int same_text(const char *a, const char *b)
{
    return a != NULL && b != NULL && strcmp(a, b) == 0;
}

/* The 17th character of an ID number is odd for men. */
static int id_is_male(const char *id)
{
    return id != NULL && strlen(id) == 18 && (id[16] - '0') % 2 == 1;
}

static void findings_birth(ch_call_t *call, submit_state_t *st, PGresult *res)
{
    const char *me = value_or_null(res, 0, 0);
    const char *mother = field_hmac(st, "mother.id_number"), *father = field_hmac(st, "father.id_number");
    if (!same_hmac(mother, me) && !same_hmac(father, me))
        finding(call, st, "applicant", "the applicant must be the child's mother or father");
    if (id_is_male(field_value(st, "mother.id_number")))
        finding(call, st, "mother.id_number", "is a man's ID number");
    if (field_value(st, "father.id_number") != NULL && !id_is_male(field_value(st, "father.id_number")))
        finding(call, st, "father.id_number", "is a woman's ID number");
    if (!value_true(res, 0, 1)) {
        finding(call, st, "child.birth_cert_no", "no hospital birth record has this certificate number");
    } else {
        if (!same_text(PQgetvalue(res, 0, 2), field_value(st, "child.name")))
            finding(call, st, "child.name", "does not match the hospital birth record");
        if (!same_text(PQgetvalue(res, 0, 3), field_value(st, "child.sex")))
            finding(call, st, "child.sex", "does not match the hospital birth record");
        if (!same_text(PQgetvalue(res, 0, 4), field_value(st, "child.birth_date")))
            finding(call, st, "child.birth_date", "does not match the hospital birth record");
        if (!same_hmac(mother, value_or_null(res, 0, 5)))
            finding(call, st, "mother.id_number", "is not the mother in the hospital birth record");
        const char *rec_father = value_or_null(res, 0, 6);
        if (rec_father != NULL && !same_hmac(father, rec_father))
            finding(call, st, "father.id_number", "is not the father in the hospital birth record");
    }
    const char *mother_name = value_or_null(res, 0, 7), *father_name = value_or_null(res, 0, 8);
    if (mother_name != NULL && !same_text(mother_name, field_value(st, "mother.name")))
        finding(call, st, "mother.name", "does not match the registry for this ID number");
    if (father_name != NULL && field_value(st, "father.name") != NULL &&
        strcmp(father_name, field_value(st, "father.name")) != 0)
        finding(call, st, "father.name", "does not match the registry for this ID number");
    const char *follow = field_value(st, "hukou.follow");
    if (follow != NULL && strcmp(follow, "mother") == 0 && mother_name == NULL)
        finding(call, st, "hukou.follow", "the mother has no household registration in this province");
    if (follow != NULL && strcmp(follow, "father") == 0 && father_name == NULL)
        finding(call, st, "hukou.follow", "the father has no household registration in this province");
    if (field_value(st, "parents.marriage_cert_no") != NULL && !value_true(res, 0, 9))
        finding(call, st, "parents.marriage_cert_no", "does not match a marriage registration of the parents");
}

static void findings_business(ch_call_t *call, submit_state_t *st, PGresult *res)
{
    const char *me = value_or_null(res, 0, 0), *rep = field_hmac(st, "legal_rep.id_number");
    if (!same_hmac(rep, me))
        finding(call, st, "legal_rep.id_number",
                "the legal representative applies in person (or at a counter acting for them)");
    const char *name = value_or_null(res, 0, 1);
    if (name == NULL)
        finding(call, st, "legal_rep.id_number", "is not in the population registry");
    else if (!same_text(name, field_value(st, "legal_rep.name")))
        finding(call, st, "legal_rep.name", "does not match the registry for this ID number");
    if (atoll(PQgetvalue(res, 0, 2)) >= BUSINESSES_PER_REP)
        finding(call, st, "legal_rep.id_number",
                ch_call_printf(call, "is already the legal representative of %d businesses", BUSINESSES_PER_REP));
    if (value_true(res, 0, 3))
        finding(call, st, "company.name", "is already registered");
}

/*
 * The statutory retirement date (NPC Standing Committee decision of 2024-09-13, in force 2025-01-01): men 60,
 * women cadres 55, women workers 50, raised for later births by one month per four months of birth (women
 * workers: per two months) from January 1965, 1970 and 1975 respectively, up to 63, 58 and 55.
 */
static long statutory_retirement(long birth, int male, int cadre)
{
    int y, m, d;
    ot_civil_from_days(birth, &y, &m, &d);
    int base = male ? 60 : cadre ? 55 : 50, from = male ? 1965 : cadre ? 1970 : 1975, step = male || cadre ? 4 : 2;
    int cap = male || cadre ? 36 : 60;
    int since = (y - from) * 12 + (m - 1); /* months of birth since January of `from` */
    int extra = since < 0 ? 0 : since / step + 1;
    if (extra > cap)
        extra = cap;
    int months = (y + base) * 12 + (m - 1) + extra;
    int ry = months / 12, rm = months % 12 + 1;
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (ry % 4 == 0 && ry % 100 != 0) || ry % 400 == 0;
    int dim = mdays[rm - 1] + (rm == 2 && leap);
    return ot_days_from_civil(ry, rm, d > dim ? dim : d);
}

static void findings_retirement(ch_call_t *call, submit_state_t *st, PGresult *res)
{
    const char *me = value_or_null(res, 0, 0), *who = field_hmac(st, "retiree.id_number");
    if (!same_hmac(who, me))
        finding(call, st, "retiree.id_number", "the retiree applies in person (or at a counter acting for them)");
    const char *name = value_or_null(res, 0, 1);
    if (name == NULL) {
        finding(call, st, "retiree.id_number", "is not in the population registry");
        return;
    }
    if (!same_text(name, field_value(st, "retiree.name")))
        finding(call, st, "retiree.name", "does not match the registry for this ID number");
    if (field_value(st, "retire.date") == NULL) {
        finding(call, st, "retire.date", "required by the pre-check");
        return;
    }
    long retire = ot_date_days(field_value(st, "retire.date"));
    const char *born = value_or_null(res, 0, 3);
    if (born != NULL) {
        const char *category = field_value(st, "retiree.category");
        long due = statutory_retirement(ot_date_days(born), strcmp(PQgetvalue(res, 0, 2), "M") == 0,
                                        category != NULL && strcmp(category, "cadre") == 0);
        if (retire < due) {
            int y, m, d;
            ot_civil_from_days(due, &y, &m, &d);
            finding(call, st, "retire.date",
                    ch_call_printf(call, "is before the statutory retirement date %04d-%02d-%02d", y, m, d));
        }
    }
    if (!value_true(res, 0, 4)) {
        finding(call, st, "retiree.id_number", "has no social insurance record");
        return;
    }
    const char *status = PQgetvalue(res, 0, 6);
    if (strcmp(status, "retired") == 0)
        finding(call, st, "retiree.id_number", "already draws a pension");
    else if (strcmp(status, "active") != 0)
        finding(call, st, "retiree.id_number", "the social insurance is suspended");
    /* at least 15 years of contributions; from 2030 six months more each year, up to 20 years */
    int y, m, d;
    ot_civil_from_days(retire, &y, &m, &d);
    int need = 180 + (y > 2029 ? (y - 2029) * 6 : 0);
    if (need > 240)
        need = 240;
    long since = ot_date_days(PQgetvalue(res, 0, 5));
    if (since < 0 || (retire - since) * 12 / 365 < need)
        finding(call, st, "retire.date",
                ch_call_printf(call, "fewer than %d years and %d months of contributions by this date", need / 12,
                               need % 12));
}

/* ---- the submission's answer and its one write transaction ---- */

static const char *bundle_item_deps(ch_call_t *call, const ot_bundle_item_t *bi)
{
    ch_buf_t b = {0};
    for (size_t d = 0; d < bi->n_depends_on; ++d) {
        if (d > 0)
            ch_buf_append(&b, ",", 1);
        ch_buf_append(&b, bi->depends_on[d], strlen(bi->depends_on[d]));
    }
    const char *s = ch_call_strdup(call, b.base != NULL ? b.base : "");
    ch_buf_free(&b);
    return s;
}

/* The sealed form values: {"<field>": "<value>", ...} in form order, only the fields given. */
static const char *sealed_fields(ch_call_t *call, const ot_bundle_t *b, const char *const *values)
{
    json_t *obj = json_object();
    for (size_t i = 0; i < b->n_fields; ++i)
        if (values[i] != NULL)
            json_object_set_new(obj, b->fields[i].name, json_string(values[i]));
    char *text = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(obj);
    if (text == NULL)
        abort();
    size_t len = strlen(text);
    const char *p = seal_param(call, text, len);
    OPENSSL_cleanse(text, len);
    free(text);
    return p;
}

/* ---- submissions: the group commit ---- */

/*
 * A submission is queued once its answer is fixed; what a loop thread has queued goes to PostgreSQL as one batch
 * (ot_submit_batch: one transaction, one WAL flush for all; gateway/batcher.c decides when), up to one batch in
 * flight per pool connection at once. Each request is answered after its batch committed. A batch the database
 * refuses (a constraint) is sent again one submission at a time, so that one bad submission fails alone.
 */
#define SUBMIT_BATCH_MAX         128
#define SUBMIT_QUEUE_MAX         4096
#define SUBMIT_INFLIGHT_PER_CONN 2
#define SUBMIT_WINDOW_MS         2

enum {
    S_ID,
    S_CITIZEN,
    S_BUNDLE,
    S_VERSION,
    S_STATE,
    S_FIELDS,
    S_AT,
    S_PRECHECK,
    S_ERRORS,
    S_ACTED_BY,
    S_NOTE_KIND,
    S_NOTE_TEXT,
    S_CLAIM,
    S_EVENT_ROLE = S_CLAIM + 6,
    S_EVENT_ACTOR,
    S__COUNT
};
enum { I_ID, I_CODE, I_POS, I_DEPT, I_STATE, I_DEPS, I_DUE, I__COUNT };
enum { L__COUNT = 7 }; /* ch_audit_append's parameters: citizen, role, actor, dept, on behalf of, action, purpose */

/* One submission from its queueing until its batch committed: malloc'd copies (its request may die first). */
typedef struct sub_entry {
    ch_call_t *call;  /* held until answered or dropped */
    Application *app; /* the answer, in the call's memory (valid while the request is) */
    char *s[S__COUNT];
    char *(*items)[I__COUNT];
    size_t n_items;
    char *(*logs)[L__COUNT];
    size_t n_logs;
} sub_entry_t;

typedef struct sub_batch {
    ch_batcher_t *b;
    unsigned n;
    sub_entry_t *e[SUBMIT_BATCH_MAX];
} sub_batch_t;

static __thread ch_batcher_t *sub_batcher;

static char *own(const char *s)
{
    if (s == NULL)
        return NULL;
    char *d = strdup(s);
    if (d == NULL)
        abort();
    return d;
}

static sub_entry_t *entry_new(void)
{
    sub_entry_t *e = calloc(1, sizeof(*e));
    if (e == NULL)
        abort();
    return e;
}

/* Frees an entry (and lets go of its call when it was held). */
static void entry_free(sub_entry_t *e)
{
    for (int k = 0; k < S__COUNT; ++k)
        free(e->s[k]);
    for (size_t i = 0; i < e->n_items; ++i)
        for (int k = 0; k < I__COUNT; ++k)
            free(e->items[i][k]);
    free(e->items);
    for (size_t i = 0; i < e->n_logs; ++i)
        for (int k = 0; k < L__COUNT; ++k)
            free(e->logs[i][k]);
    free(e->logs);
    if (e->call != NULL)
        ch_call_unhold(e->call);
    free(e);
}

static void entry_answer(sub_entry_t *e, int err, int replay)
{
    if (!ch_call_gone(e->call)) {
        if (err != 0)
            ch_fail_err(e->call, err);
        else if (replay)
            ch_call_idempotency_replay(e->call); /* its key was claimed first by another request */
        else
            ch_reply(e->call, 201, &e->app->base);
    }
    entry_free(e);
}

static void on_batch_committed(void *arg, ch_pg_result_t *r)
{
    sub_batch_t *batch = arg;
    ch_batcher_t *b = batch->b;
    if (r->err == CH_EDB && batch->n > 1) {
        /* one submission the database refuses must not fail the others: each goes again alone */
        for (unsigned i = 0; i < batch->n; ++i)
            ch_batcher_send(b, (void **)&batch->e[i], 1);
    } else if (r->err != 0) {
        for (unsigned i = 0; i < batch->n; ++i)
            entry_answer(batch->e[i], r->err, 0);
    } else {
        ot_dispatch_wake(); /* the batch's dispatched items are in the outbox now */
        uint8_t replay[SUBMIT_BATCH_MAX] = {0};
        PGresult *res = r->res[0];
        for (int row = 0; row < PQntuples(res); ++row) {
            long k = strtol(PQgetvalue(res, row, 0), NULL, 10);
            if (k >= 1 && k <= (long)batch->n)
                replay[k - 1] = 1;
        }
        for (unsigned i = 0; i < batch->n; ++i)
            entry_answer(batch->e[i], 0, replay[i]);
    }
    free(batch);
    ch_batcher_done(b);
}

/* Sends `n` entries as one transaction (they are answered by on_batch_committed). */
static int batch_send(ch_batcher_t *b, void **entries_, unsigned n)
{
    sub_entry_t **entries = (sub_entry_t **)entries_;
    sub_batch_t *batch = malloc(sizeof(*batch));
    if (batch == NULL)
        abort();
    batch->b = b;
    batch->n = n;
    memcpy(batch->e, entries, n * sizeof(*entries));
    enum { NARR = 34 + 5 + 7 };
    ch_buf_t a[NARR];
    for (int k = 0; k < NARR; ++k) {
        a[k] = (ch_buf_t){0};
        ch_buf_append(&a[k], "{", 1);
    }
    /* per submission: $1..$12 its row, $13..$18 its claim */
    static const int sub_cols[18] = {S_ID,    S_CITIZEN,   S_BUNDLE,    S_VERSION,   S_STATE,     S_FIELDS,
                                     S_AT,    S_PRECHECK,  S_ERRORS,    S_ACTED_BY,  S_NOTE_KIND, S_NOTE_TEXT,
                                     S_CLAIM, S_CLAIM + 1, S_CLAIM + 2, S_CLAIM + 3, S_CLAIM + 4, S_CLAIM + 5};
    char num[16];
    for (unsigned i = 0; i < n; ++i) {
        sub_entry_t *e = entries[i];
        int keyed = e->s[S_CLAIM + 1] != NULL;
        for (int k = 0; k < 18; ++k)
            array_elem(&a[k], k >= 12 && !keyed ? NULL : e->s[sub_cols[k]]);
        snprintf(num, sizeof(num), "%u", i + 1);
        for (size_t t = 0; t < e->n_items; ++t) {
            array_elem(&a[18], num);
            for (int k = 0; k < I__COUNT; ++k)
                array_elem(&a[19 + k], e->items[t][k]);
            array_elem(&a[34], e->items[t][I_ID]);
            array_elem(&a[35], e->items[t][I_STATE]);
            array_elem(&a[36], e->s[S_EVENT_ROLE]);
            array_elem(&a[37], e->s[S_EVENT_ACTOR]);
            array_elem(&a[38], e->s[S_AT]);
        }
        for (size_t t = 0; t < e->n_logs; ++t) {
            char **l = e->logs[t];
            if (l[4] != NULL) { /* on behalf of someone: appended by ot_submit_batch */
                array_elem(&a[26], num);
                for (int k = 0; k < L__COUNT; ++k)
                    array_elem(&a[27 + k], l[k]);
            } else {
                array_elem(&a[39], e->s[S_ID]);
                for (int k = 0; k < L__COUNT; ++k)
                    if (k != 4)
                        array_elem(&a[40 + k - (k > 4)], l[k]);
            }
        }
    }
    const char *v[NARR];
    for (int k = 0; k < NARR; ++k) {
        ch_buf_append(&a[k], "}", 1);
        v[k] = a[k].base;
    }
    ch_pg_query_t q[3] = {
        {&stmt_submit_batch, v, NULL}, {&stmt_events_batch, v + 34, NULL}, {&stmt_logs_batch, v + 39, NULL}};
    /* on the thread's pool; any call of the batch names the thread (all are held) */
    int ret = ch_call_pg_detached(entries[0]->call, q, 3, on_batch_committed, batch); /* copies the parameters */
    for (int k = 0; k < NARR; ++k)
        ch_buf_free(&a[k]);
    if (ret != 0)
        free(batch);
    return ret;
}

static ch_call_t *entry_call(void *e)
{
    return ((sub_entry_t *)e)->call;
}

static void entry_fail(void *e, int err)
{
    entry_answer(e, err, 0);
}

static void entry_drop(void *e)
{
    entry_free(e);
}

static const ch_batcher_ops_t submit_ops = {
    .call = entry_call,
    .send = batch_send,
    .fail = entry_fail,
    .drop = entry_drop,
};

static const ch_batcher_config_t submit_batching = {
    .batch_max = SUBMIT_BATCH_MAX,
    .queue_max = SUBMIT_QUEUE_MAX,
    .window_ms = SUBMIT_WINDOW_MS,
    .soft = 0, /* one per pool connection */
    .inflight_per_conn = SUBMIT_INFLIGHT_PER_CONN,
};

/* Queues a submission whose answer is fixed; answers 503 itself when the queue is full. */
static void submit_enqueue(ch_call_t *call, sub_entry_t *e)
{
    ch_batcher_t *b = ch_batcher_thread(call, &sub_batcher, &submit_batching, &submit_ops);
    e->call = call;
    if (ch_batcher_push(b, call, e) != 0) {
        e->call = NULL; /* not held */
        entry_free(e);
        ch_fail_err(call, CH_EFULL);
    }
}

static void on_prechecked(ch_call_t *call, ch_pg_result_t *r)
{
    submit_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    /* the catalog version checked so far must still be the active one: else start again with the new one */
    PGresult *active = r->res[0], *res = r->res[1];
    int version = PQntuples(active) == 1 ? atoi(PQgetvalue(active, 0, 0)) : 0;
    if (version != st->flow.cat->version) {
        const char *doc = PQntuples(active) == 1 ? value_or_null(active, 0, 1) : NULL;
        const ot_catalog_t *cat = version == 0  ? NULL
                                  : doc != NULL ? ot_catalog_cache(version, doc, strlen(doc))
                                                : ot_catalog_cached(version);
        if (version != 0 && cat == NULL) {
            ch_fail_err(call, CH_EINVAL);
            return;
        }
        if (version != 0)
            ot_catalog_set_active_hint(version);
        if (st->restarted++ > 0 || cat == NULL) {
            ch_fail(call, CH_CODE_UNAVAILABLE, "the catalog is being changed; retry shortly");
            return;
        }
        submit_state_t fresh = {0};
        fresh.flow.cat = cat;
        fresh.restarted = st->restarted;
        *st = fresh;
        submit_check(call);
        return;
    }
    if (r->nres > 2)
        due_learn(cst_day(st->now), st->now.sec, r->res[2]);
    if (PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
        st->fail_message = "verify your real name before applying";
        log_reads_then_fail(call, st);
        return;
    }
    const ot_bundle_t *b = st->bundle;
    switch (b->precheck) {
    case OT_PRECHECK_BIRTH:
        findings_birth(call, st, res);
        break;
    case OT_PRECHECK_BUSINESS:
        findings_business(call, st, res);
        break;
    case OT_PRECHECK_RETIREMENT:
        findings_retirement(call, st, res);
        break;
    case OT_PRECHECK_NONE:
        break;
    }
    const ch_principal_t *p = ch_call_principal(call);
    int accepted = st->n_findings == 0;

    /* the answer, fixed before the write */
    char app_id[37];
    if (uuid_v4(app_id) != 0) {
        ch_fail(call, CH_CODE_UNAVAILABLE, "entropy not available yet");
        return;
    }
    Application *app = ch_call_alloc(call, sizeof(*app));
    cityhall__onething__v1__application__init(app);
    app->application_id = ch_call_strdup(call, app_id);
    app->bundle_code = (char *)b->code;
    app->catalog_version = st->flow.cat->version;
    app->state = accepted ? "accepted" : "rejected";
    app->submitted_at = now_timestamp(call, st->now);
    app->updated_at = app->submitted_at;
    app->n_errors = st->n_findings;
    app->errors = st->findings;
    ch_buf_t verdict = {0};
    if (accepted) {
        ch_buf_append(&verdict, "passed", 6);
    } else {
        ch_buf_append(&verdict, "returned: ", 10);
        for (size_t i = 0; i < st->n_findings; ++i) {
            const char *s =
                ch_call_printf(call, "%s%s %s", i > 0 ? "; " : "", st->findings[i]->field, st->findings[i]->reason);
            ch_buf_append(&verdict, s, strlen(s));
        }
    }
    app->precheck = ch_call_strdup(call, verdict.base);
    ch_buf_free(&verdict);
    st->app = app;

    /* the write, queued for this thread's group commit with copies of everything it needs */
    sub_entry_t *e = entry_new();
    const char *delegated = p->actor != NULL && p->actor[0] != '\0' ? p->actor : NULL;
    if (accepted) {
        app->n_items = b->n_items;
        app->items_total = (int32_t)b->n_items;
        app->items = ch_call_alloc(call, (b->n_items + 1) * sizeof(*app->items));
        e->items = calloc(b->n_items, sizeof(*e->items));
        if (e->items == NULL)
            abort();
        for (size_t i = 0; i < b->n_items; ++i) {
            const ot_bundle_item_t *bi = &b->items[i];
            ApplicationItem *it = ch_call_alloc(call, sizeof(*it));
            cityhall__onething__v1__application_item__init(it);
            char id[37];
            if (uuid_v4(id) != 0) {
                entry_free(e);
                ch_fail(call, CH_CODE_UNAVAILABLE, "entropy not available yet");
                return;
            }
            it->item_id = ch_call_strdup(call, id);
            it->item_code = (char *)bi->item->code;
            it->name = (char *)bi->item->name;
            it->department = (char *)bi->item->department;
            it->state = bi->n_depends_on == 0 ? "dispatched" : "blocked_on_dependency";
            it->updated_at = app->submitted_at;
            const char *due_text = NULL;
            if (bi->n_depends_on == 0) {
                int off = due_offset(cst_day(st->now), bi->item->promised_days, st->now.sec);
                if (off < 0) {
                    entry_free(e);
                    ch_fail_err(call, CH_EINVAL);
                    return;
                }
                now_t due = {st->now.sec + (int64_t)off * 86400, st->now.usec};
                it->due_at = now_timestamp(call, due);
                due_text = now_text(call, due);
            }
            app->items[i] = it;
            char **row = e->items[e->n_items++];
            row[I_ID] = own(id);
            row[I_CODE] = own(it->item_code);
            row[I_POS] = own(ch_call_printf(call, "%zu", i));
            row[I_DEPT] = own(it->department);
            row[I_STATE] = own(it->state);
            row[I_DEPS] = own(bundle_item_deps(call, bi));
            row[I_DUE] = own(due_text);
        }
    }

    /* the findings as stored: [{"field", "reason"}] */
    json_t *errs = json_array();
    for (size_t i = 0; i < st->n_findings; ++i)
        json_array_append_new(
            errs, json_pack("{s:s,s:s}", "field", st->findings[i]->field, "reason", st->findings[i]->reason));
    char *errs_text = json_dumps(errs, JSON_COMPACT);
    json_decref(errs);
    if (errs_text == NULL)
        abort();
    e->s[S_ID] = own(app->application_id);
    e->s[S_CITIZEN] = own(p->subject);
    e->s[S_BUNDLE] = own(b->code);
    e->s[S_VERSION] = own(ch_call_printf(call, "%d", st->flow.cat->version));
    e->s[S_STATE] = own(app->state);
    e->s[S_FIELDS] = own(sealed_fields(call, b, st->values) + 2); /* hex, without the bytea "\x" */
    e->s[S_AT] = own(st->now_s);
    e->s[S_PRECHECK] = own(app->precheck);
    e->s[S_ERRORS] = errs_text;
    e->s[S_ACTED_BY] = own(delegated);
    e->s[S_NOTE_KIND] = own(accepted ? "application_accepted" : "application_returned");
    e->s[S_NOTE_TEXT] = own(
        accepted ? ch_call_printf(call, "您的「%s」申请已受理，共 %zu 个事项，正在分送各部门办理", b->name, b->n_items)
                 : ch_call_printf(call, "您的「%s」申请未通过自动预审，请核对后重新提交", b->name));
    e->s[S_EVENT_ROLE] = own(delegated != NULL ? "staff" : "citizen");
    e->s[S_EVENT_ACTOR] = own(delegated != NULL ? delegated : p->subject);
    const char *claim[6];
    if (ch_call_idempotency_claim(call, 201, &app->base, claim) == 0)
        for (int k = 0; k < 6; ++k)
            e->s[S_CLAIM + k] = own(claim[k]);
    /* the access-log entries of the pre-check's reads, as ch_audit_query makes them for this principal */
    ch_pg_query_t aq[OT_DS__COUNT];
    int na = audit_datasets(call, st->read, ch_call_printf(call, "one-thing application: %s", b->code), aq, 0);
    e->logs = calloc((size_t)na + 1, sizeof(*e->logs));
    if (e->logs == NULL)
        abort();
    for (int k = 0; k < na; ++k, ++e->n_logs)
        for (int c = 0; c < L__COUNT; ++c)
            e->logs[k][c] = own(aq[k].values[c]);
    e->app = app;
    submit_enqueue(call, e);
}

static void submit_precheck(ch_call_t *call)
{
    submit_state_t *st = ch_call_data(call);
    const ot_bundle_t *b = st->bundle;
    const ch_principal_t *p = ch_call_principal(call);
    for (size_t i = 0; i < b->n_fields; ++i)
        if (b->fields[i].type == OT_ID_NUMBER && st->values[i] != NULL)
            st->hmacs[i] = id_hmac_param(call, st->values[i]);
    st->now = now_get();
    st->now_s = now_text(call, st->now);

    ch_pg_query_t q[3];
    const char **cv = ch_call_alloc(call, sizeof(*cv));
    cv[0] = ch_call_printf(call, "%d", st->flow.cat->version);
    q[0] = (ch_pg_query_t){&stmt_catalog_active, cv, NULL};
    const char **v = ch_call_alloc(call, 5 * sizeof(*v));
    v[0] = p->subject;
    st->read |= OT_DS_REGISTRY;
    switch (b->precheck) {
    case OT_PRECHECK_BIRTH:
        v[1] = field_value(st, "child.birth_cert_no");
        v[2] = field_hmac(st, "mother.id_number");
        v[3] = field_hmac(st, "father.id_number");
        v[4] = field_value(st, "parents.marriage_cert_no");
        st->read |= OT_DS_BIRTH_RECORDS | (v[4] != NULL ? OT_DS_MARRIAGES : 0);
        q[1] = (ch_pg_query_t){&stmt_precheck_birth, v, NULL};
        break;
    case OT_PRECHECK_BUSINESS:
        v[1] = field_hmac(st, "legal_rep.id_number");
        v[2] = field_value(st, "company.name");
        st->read |= OT_DS_BUSINESSES;
        q[1] = (ch_pg_query_t){&stmt_precheck_business, v, NULL};
        break;
    case OT_PRECHECK_RETIREMENT:
        v[1] = field_hmac(st, "retiree.id_number");
        st->read |= OT_DS_SOCIAL_INSURANCE;
        q[1] = (ch_pg_query_t){&stmt_precheck_retirement, v, NULL};
        break;
    case OT_PRECHECK_NONE:
        q[1] = (ch_pg_query_t){&stmt_precheck_none, v, NULL};
        break;
    }
    /* the promised deadlines of the items dispatched at once, unless this date's are known already */
    ch_buf_t days = {0};
    ch_buf_append(&days, "{", 1);
    int missing = 0;
    for (size_t i = 0; i < b->n_items; ++i) {
        if (b->items[i].n_depends_on != 0)
            continue;
        array_elem(&days, ch_call_printf(call, "%d", b->items[i].item->promised_days));
        missing += due_offset(cst_day(st->now), b->items[i].item->promised_days, st->now.sec) < 0;
    }
    const char **dv = ch_call_alloc(call, 2 * sizeof(*dv));
    dv[0] = st->now_s;
    dv[1] = array_end(call, &days);
    q[2] = (ch_pg_query_t){&stmt_due, dv, NULL};
    int ret = ch_call_pg(call, q, missing > 0 ? 3 : 2, on_prechecked);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- an application as the citizen sees it ---- */

/*
 * Builds the application whose rows (APP_COLUMNS, items in position order) start at `row`; returns the row after
 * them. Item names come from the application's catalog version: app_names fills them once it is parsed.
 */
static int app_from_rows(ch_call_t *call, PGresult *res, int row, Application **out)
{
    int rows = PQntuples(res), end = row;
    const char *id = PQgetvalue(res, row, C_APP_ID);
    while (end < rows && strcmp(PQgetvalue(res, end, C_APP_ID), id) == 0)
        ++end;
    Application *app = ch_call_alloc(call, sizeof(*app));
    cityhall__onething__v1__application__init(app);
    app->application_id = ch_call_strdup(call, id);
    app->bundle_code = ch_call_strdup(call, PQgetvalue(res, row, C_BUNDLE));
    app->catalog_version = atoi(PQgetvalue(res, row, C_VERSION));
    app->state = ch_call_strdup(call, PQgetvalue(res, row, C_STATE));
    app->submitted_at = ch_call_timestamp(call, PQgetvalue(res, row, C_SUBMITTED));
    app->updated_at = ch_call_timestamp(call, PQgetvalue(res, row, C_UPDATED));
    app->precheck = ch_call_strdup(call, PQgetvalue(res, row, C_PRECHECK));
    app->rating = atoi(PQgetvalue(res, row, C_RATING));
    app->items = ch_call_alloc(call, (size_t)(end - row + 1) * sizeof(*app->items));
    for (int r = row; r < end; ++r) {
        if (PQgetisnull(res, r, C_ITEM_ID))
            continue;
        ApplicationItem *it = ch_call_alloc(call, sizeof(*it));
        cityhall__onething__v1__application_item__init(it);
        it->item_id = ch_call_strdup(call, PQgetvalue(res, r, C_ITEM_ID));
        it->item_code = ch_call_strdup(call, PQgetvalue(res, r, C_ITEM_CODE));
        it->name = it->item_code; /* until app_names */
        it->department = ch_call_strdup(call, PQgetvalue(res, r, C_ITEM_DEPT));
        it->state = ch_call_strdup(call, PQgetvalue(res, r, C_ITEM_STATE));
        it->reason = ch_call_strdup(call, PQgetvalue(res, r, C_ITEM_REASON));
        const char *sup = PQgetvalue(res, r, C_ITEM_SUPPLEMENT);
        if (sup[0] != '\0') {
            char *copy = ch_call_strdup(call, sup);
            size_t n = 1;
            for (const char *c = copy; *c != '\0'; ++c)
                n += *c == ',';
            it->supplement_fields = ch_call_alloc(call, (n + 1) * sizeof(char *));
            for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save))
                it->supplement_fields[it->n_supplement_fields++] = tok;
        }
        it->due_at = ch_call_timestamp(call, value_or_null(res, r, C_ITEM_DUE));
        it->licence_id = ch_call_strdup(call, PQgetvalue(res, r, C_ITEM_LICENCE));
        it->updated_at = ch_call_timestamp(call, PQgetvalue(res, r, C_ITEM_UPDATED));
        if (strcmp(it->state, "issued") == 0)
            ++app->items_done;
        app->items[app->n_items++] = it;
    }
    app->items_total = (int32_t)app->n_items;
    json_t *errs = json_loads(PQgetvalue(res, row, C_ERRORS), 0, NULL);
    if (json_is_array(errs) && json_array_size(errs) > 0) {
        app->errors = ch_call_alloc(call, (json_array_size(errs) + 1) * sizeof(*app->errors));
        size_t i;
        json_t *e;
        json_array_foreach(errs, i, e)
        {
            const char *field = json_string_value(json_object_get(e, "field"));
            const char *reason = json_string_value(json_object_get(e, "reason"));
            app->errors[app->n_errors++] = field_error(call, ch_call_strdup(call, field != NULL ? field : ""),
                                                       ch_call_strdup(call, reason != NULL ? reason : ""));
        }
    }
    json_decref(errs);
    *out = app;
    return end;
}

/* Item names from the application's own catalog version (parsed by then: with_versions_of). */
static void app_names(Application *app)
{
    const ot_catalog_t *cat = ot_catalog_cached(app->catalog_version);
    for (size_t i = 0; cat != NULL && i < app->n_items; ++i) {
        const ot_item_t *it = ot_catalog_item_by_code(cat, app->items[i]->item_code);
        if (it != NULL)
            app->items[i]->name = (char *)it->name;
    }
}

/* ---- GET /v1/onething/applications/{id} ---- */

typedef struct view_state {
    flow_t flow;
    Application *app;
    ApplicationList *list;
    int page;
} view_state_t;

static void view_reply(ch_call_t *call)
{
    view_state_t *st = ch_call_data(call);
    app_names(st->app);
    ch_reply(call, 200, &st->app->base);
}

static void on_app_read(ch_call_t *call, ch_pg_result_t *r)
{
    view_state_t *st = ch_call_data(call);
    if (r->err == CH_EDB && r->sqlstate != NULL) {
        /* the refusals of ot_withdraw, run in front of the read */
        if (strcmp(r->sqlstate, "CH404") == 0) {
            ch_fail(call, CH_CODE_NOT_FOUND, "no such application");
            return;
        }
        if (strcmp(r->sqlstate, "CH4WA") == 0) {
            ch_fail(call, CH_CODE_FAILED_PRECONDITION,
                    "the application can no longer be withdrawn: an item was already approved");
            return;
        }
        if (strcmp(r->sqlstate, "CH4WF") == 0) {
            ch_fail(call, CH_CODE_FAILED_PRECONDITION,
                    "the application can no longer be withdrawn: it is already finished or withdrawn");
            return;
        }
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[r->nres - 1];
    if (PQntuples(res) == 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such application");
        return;
    }
    app_from_rows(call, res, 0, &st->app);
    with_versions_of(call, &st->flow, res, C_VERSION, view_reply);
}

/* Reads one application of the caller (after the statements `before`, in the same transaction) and answers it. */
static void app_read_reply(ch_call_t *call, const char *id, const ch_pg_query_t *before, int n)
{
    view_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    ch_call_set_data(call, st);
    ch_pg_query_t *q = ch_call_alloc(call, (size_t)(n + 1) * sizeof(*q));
    for (int i = 0; i < n; ++i)
        q[i] = before[i];
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = id;
    v[1] = ch_call_principal(call)->subject;
    q[n] = (ch_pg_query_t){&stmt_app_get, v, NULL};
    int ret = ch_call_pg(call, q, n + 1, on_app_read);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void ot_application(ch_call_t *call)
{
    const char *id = uuid_param(call, ch_call_param(call, "id"));
    if (id == NULL) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such application");
        return;
    }
    app_read_reply(call, id, NULL, 0);
}

/* ---- GET /v1/onething/applications ---- */

#define APP_PAGE_PREFIX "ap1:"

static void list_reply(ch_call_t *call)
{
    view_state_t *st = ch_call_data(call);
    for (size_t i = 0; i < st->list->n_applications; ++i)
        app_names(st->list->applications[i]);
    ch_reply(call, 200, &st->list->base);
}

static void on_app_list(ch_call_t *call, ch_pg_result_t *r)
{
    view_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    int page = st->page;
    ApplicationList *list = ch_call_alloc(call, sizeof(*list));
    cityhall__onething__v1__application_list__init(list);
    list->applications = ch_call_alloc(call, ((size_t)page + 2) * sizeof(*list->applications));
    list->next_page_token = "";
    int row = 0, last = -1;
    while (row < PQntuples(res)) {
        if ((int)list->n_applications == page) {
            /* one application more than the page: there is a next page, after the last one shown */
            list->next_page_token = page_token_encode(
                call, APP_PAGE_PREFIX,
                ch_call_printf(call, "%s:%s", PQgetvalue(res, last, C_NCOLUMNS), PQgetvalue(res, last, C_APP_ID)));
            break;
        }
        last = row;
        row = app_from_rows(call, res, row, &list->applications[list->n_applications++]);
    }
    st->list = list;
    with_versions_of(call, &st->flow, res, C_VERSION, list_reply);
}

void ot_applications(ch_call_t *call)
{
    int page = page_size_or_respond(call);
    if (page < 0)
        return;
    const char *token = ch_call_query(call, "page_token");
    const char *cursor_us = NULL, *cursor_id = NULL;
    if (token != NULL && token[0] != '\0') {
        char *c = page_token_decode(call, token, APP_PAGE_PREFIX);
        char *colon = c != NULL ? strchr(c, ':') : NULL;
        if (colon == NULL || uuid_param(call, colon + 1) == NULL || colon == c || colon - c > 19 ||
            strspn(c, "0123456789") != (size_t)(colon - c)) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "page_token: not a token this list gave out");
            return;
        }
        *colon = '\0';
        cursor_us = c;
        cursor_id = colon + 1;
    }
    view_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    st->page = page;
    ch_call_set_data(call, st);
    const char **v = ch_call_alloc(call, 4 * sizeof(*v));
    v[0] = ch_call_principal(call)->subject;
    v[1] = cursor_us;
    v[2] = cursor_id;
    v[3] = ch_call_printf(call, "%d", page + 1);
    ch_pg_query_t q = {&stmt_app_list, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_app_list);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/onething/applications/{id}/supplements ---- */

typedef struct supplement_state {
    flow_t flow;
    Application *app;
    int revision;
    const char *fields_hex;
    char *has_endpoint; /* per item of app: its department has its own system */
} supplement_state_t;

static void on_supplemented(ch_call_t *call, ch_pg_result_t *r)
{
    supplement_state_t *st = ch_call_data(call);
    if ((r->err == CH_EDB && r->sqlstate != NULL && strcmp(r->sqlstate, "CH409") == 0) || retryable(r)) {
        ch_fail(call, CH_CODE_ABORTED, "the application changed meanwhile: read it again, then send the supplement");
        return;
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ot_dispatch_wake(); /* a resubmission to a department's own system waits in the outbox */
    ch_reply(call, 200, &st->app->base);
}

/* Whether item `it` asked for field `name`. */
static int item_asks(const ApplicationItem *it, const char *name)
{
    for (size_t k = 0; k < it->n_supplement_fields; ++k)
        if (strcmp(it->supplement_fields[k], name) == 0)
            return 1;
    return 0;
}

static void supplement_apply(ch_call_t *call)
{
    supplement_state_t *st = ch_call_data(call);
    SupplementRequest *req = ch_call_body(call);
    Application *app = st->app;
    app_names(app);
    if (strcmp(app->state, "accepted") != 0 && strcmp(app->state, "in_progress") != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "the application is %s: nothing can be supplemented", app->state);
        return;
    }
    size_t asking = 0;
    for (size_t i = 0; i < app->n_items; ++i)
        asking += strcmp(app->items[i]->state, "supplement_requested") == 0;
    if (asking == 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "no item of the application is waiting for a supplement");
        return;
    }
    const ot_catalog_t *cat = ot_catalog_cached(app->catalog_version);
    const ot_bundle_t *b = cat != NULL ? ot_catalog_bundle(cat, app->bundle_code) : NULL;
    if (b == NULL) {
        ch_fail_err(call, CH_EINVAL);
        return;
    }
    /* every field given: asked for by a waiting item, given once, valid; values in form order */
    FieldError **errs = ch_call_alloc(call, (req->n_fields + b->n_fields + 2) * sizeof(*errs));
    size_t nerr = 0;
    const char **values = ch_call_alloc(call, b->n_fields * sizeof(*values));
    memset(values, 0, b->n_fields * sizeof(*values));
    if (req->n_fields == 0)
        errs[nerr++] = field_error(call, "fields", "send the fields that were asked for");
    for (size_t k = 0; k < req->n_fields && k < FIELDS_MAX; ++k) {
        const FieldValue *fv = req->fields[k];
        int i = field_index(b, fv->name), asked = 0;
        for (size_t m = 0; i >= 0 && m < app->n_items && !asked; ++m)
            asked = strcmp(app->items[m]->state, "supplement_requested") == 0 && item_asks(app->items[m], fv->name);
        if (!asked) {
            errs[nerr++] = field_error(call, echo_name(call, fv->name, k), "was not asked for");
            continue;
        }
        const ot_field_t *f = &b->fields[i];
        if (values[i] != NULL) {
            errs[nerr++] = field_error(call, f->name, "given more than once");
            continue;
        }
        if ((f->type == OT_ID_NUMBER && looks_masked_id(fv->value)) ||
            (f->type == OT_PHONE && looks_masked_phone(fv->value))) {
            errs[nerr++] = field_error(call, f->name, "type the full number");
            continue;
        }
        const char *norm = NULL, *why = ot_field_check(call, f, fv->value, &norm);
        if (why == NULL && norm[0] == '\0')
            why = "required";
        if (why != NULL)
            errs[nerr++] = field_error(call, f->name, why);
        else
            values[i] = norm;
    }
    /* an item goes back to review with everything it asked for, or stays waiting: never half answered */
    char *answered = ch_call_alloc(call, app->n_items + 1);
    size_t n_answered = 0;
    for (size_t m = 0; m < app->n_items; ++m) {
        ApplicationItem *it = app->items[m];
        answered[m] = 0;
        if (strcmp(it->state, "supplement_requested") != 0)
            continue;
        size_t given = 0;
        for (size_t k = 0; k < it->n_supplement_fields; ++k) {
            int i = field_index(b, it->supplement_fields[k]);
            given += i >= 0 && values[i] != NULL;
        }
        if (given == it->n_supplement_fields && given > 0) {
            answered[m] = 1;
            ++n_answered;
        } else if (given > 0) {
            for (size_t k = 0; k < it->n_supplement_fields; ++k) {
                int i = field_index(b, it->supplement_fields[k]);
                if (i < 0 || values[i] == NULL)
                    errs[nerr++] = field_error(
                        call, it->supplement_fields[k],
                        ch_call_printf(call, "also asked for by %s: send it with the others", it->item_code));
            }
        }
    }
    if (nerr > 0) {
        fail_fields(call, errs, nerr);
        return;
    }

    /* the new form values: the sealed ones with the supplement on top */
    char *plain = unseal_hex(call, st->fields_hex);
    json_t *obj = plain != NULL ? json_loads(plain, 0, NULL) : NULL;
    if (plain != NULL)
        OPENSSL_cleanse(plain, strlen(plain));
    if (!json_is_object(obj)) {
        json_decref(obj);
        ch_fail_err(call, CH_EINVAL);
        return;
    }
    for (size_t i = 0; i < b->n_fields; ++i)
        if (values[i] != NULL)
            json_object_set_new(obj, b->fields[i].name, json_string(values[i]));
    char *text = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(obj);
    if (text == NULL)
        abort();
    const char *sealed = seal_param(call, text, strlen(text));
    OPENSSL_cleanse(text, strlen(text));
    free(text);

    /* the answer, fixed before the write: only the answered items move */
    now_t now = now_get();
    Timestamp *ts = now_timestamp(call, now);
    ch_buf_t ids = {0}, states = {0};
    ch_buf_append(&ids, "{", 1);
    ch_buf_append(&states, "{", 1);
    for (size_t m = 0; m < app->n_items; ++m) {
        if (!answered[m])
            continue;
        ApplicationItem *it = app->items[m];
        it->state = st->has_endpoint[m] ? "dispatched" : "in_review";
        it->reason = "";
        it->n_supplement_fields = 0;
        it->supplement_fields = NULL;
        it->updated_at = ts;
        array_elem(&ids, it->item_id);
        array_elem(&states, it->state);
    }
    app->updated_at = ts;
    const ch_principal_t *p = ch_call_principal(call);
    int delegated = p->actor != NULL && p->actor[0] != '\0';
    const char **v = ch_call_alloc(call, 6 * sizeof(*v));
    v[0] = app->application_id;
    v[1] = ch_call_printf(call, "%d", st->revision);
    v[2] = sealed;
    v[3] = array_end(call, &ids);
    v[4] = array_end(call, &states);
    v[5] = now_text(call, now);
    const char **ev = ch_call_alloc(call, 5 * sizeof(*ev));
    ev[0] = v[3];
    ev[1] = v[4];
    ev[2] = delegated ? "staff" : "citizen";
    ev[3] = delegated ? p->actor : p->subject;
    ev[4] = v[5];
    ch_pg_query_t q[2] = {{&stmt_supplement_apply, v, NULL}, {&stmt_events_supplement, ev, NULL}};
    int ret = ch_call_pg_commit(call, q, 2, 200, &app->base, on_supplemented);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_supplement_read(ch_call_t *call, ch_pg_result_t *r)
{
    supplement_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) == 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such application");
        return;
    }
    app_from_rows(call, res, 0, &st->app);
    st->revision = atoi(PQgetvalue(res, 0, C_NCOLUMNS));
    st->fields_hex = ch_call_strdup(call, PQgetvalue(res, 0, C_NCOLUMNS + 1));
    st->has_endpoint = ch_call_alloc(call, st->app->n_items + 1);
    size_t m = 0;
    for (int i = 0; i < PQntuples(res) && m < st->app->n_items; ++i)
        if (!PQgetisnull(res, i, C_ITEM_ID))
            st->has_endpoint[m++] = value_true(res, i, C_NCOLUMNS + 2);
    with_versions_of(call, &st->flow, res, C_VERSION, supplement_apply);
}

void ot_supplement(ch_call_t *call)
{
    const char *id = uuid_param(call, ch_call_param(call, "id"));
    if (id == NULL) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such application");
        return;
    }
    supplement_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    ch_call_set_data(call, st);
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = id;
    v[1] = ch_call_principal(call)->subject;
    ch_pg_query_t q = {&stmt_app_get_full, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_supplement_read);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/onething/applications/{id}/withdrawal ---- */

#define WITHDRAW_ATTEMPTS 3

typedef struct withdraw_state {
    view_state_t view; /* first: on_app_read reads the call's data as a view_state_t */
    const char *id;
    int attempts;
} withdraw_state_t;

static void withdraw_run(ch_call_t *call);

static void on_withdrawn(ch_call_t *call, ch_pg_result_t *r)
{
    withdraw_state_t *st = ch_call_data(call);
    if (retryable(r) && ++st->attempts < WITHDRAW_ATTEMPTS) {
        withdraw_run(call);
        return;
    }
    on_app_read(call, r);
}

/* The withdrawal, then the application as it is now, in one transaction. */
static void withdraw_run(ch_call_t *call)
{
    withdraw_state_t *st = ch_call_data(call);
    const ch_principal_t *p = ch_call_principal(call);
    int delegated = p->actor != NULL && p->actor[0] != '\0';
    const char *now = now_text(call, now_get());
    const char **v = ch_call_alloc(call, 5 * sizeof(*v));
    v[0] = st->id;
    v[1] = p->subject;
    v[2] = now;
    v[3] = delegated ? "staff" : "citizen";
    v[4] = delegated ? p->actor : p->subject;
    const char **ev = ch_call_alloc(call, 2 * sizeof(*ev));
    ev[0] = st->id;
    ev[1] = now;
    const char **gv = ch_call_alloc(call, 2 * sizeof(*gv));
    gv[0] = st->id;
    gv[1] = p->subject;
    ch_pg_query_t q[3] = {{&stmt_withdraw, v, NULL}, {&stmt_withdraw_escalations, ev, NULL}, {&stmt_app_get, gv, NULL}};
    int ret = ch_call_pg(call, q, 3, on_withdrawn);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void ot_withdraw(ch_call_t *call)
{
    const char *id = uuid_param(call, ch_call_param(call, "id"));
    if (id == NULL) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such application");
        return;
    }
    withdraw_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    st->id = id;
    ch_call_set_data(call, st);
    withdraw_run(call);
}

/* ---- POST /v1/onething/applications/{id}/rating ---- */

static void on_rated(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQgetisnull(res, 0, 0)) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such application");
        return;
    }
    if (strcmp(PQgetvalue(res, 0, 2), "1") == 0) {
        on_app_read(call, r);
        return;
    }
    const char *state = PQgetvalue(res, 0, 0);
    int final = strcmp(state, "completed") == 0 || strcmp(state, "partially_completed") == 0 ||
                strcmp(state, "rejected") == 0 || strcmp(state, "withdrawn") == 0;
    if (!final)
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "only a finished application can be rated (it is %s)", state);
    else
        ch_fail(call, CH_CODE_ALREADY_EXISTS, "the application was already rated");
}

void ot_rate(ch_call_t *call)
{
    const char *id = uuid_param(call, ch_call_param(call, "id"));
    if (id == NULL) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such application");
        return;
    }
    RateRequest *req = ch_call_body(call);
    if (req->stars < 1 || req->stars > 5) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "stars: from 1 to 5");
        return;
    }
    ot_field_t comment = {.name = "comment", .type = OT_STRING, .max_len = RATING_COMMENT_MAX};
    const char *text = NULL, *why = ot_field_check(call, &comment, req->comment, &text);
    if (why != NULL) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "comment: %s", why);
        return;
    }
    view_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    ch_call_set_data(call, st);
    const char **v = ch_call_alloc(call, 4 * sizeof(*v));
    v[0] = id;
    v[1] = ch_call_principal(call)->subject;
    v[2] = ch_call_printf(call, "%d", req->stars);
    v[3] = text;
    const char **gv = ch_call_alloc(call, 2 * sizeof(*gv));
    gv[0] = id;
    gv[1] = v[1];
    ch_pg_query_t q[2] = {{&stmt_rate, v, NULL}, {&stmt_app_get, gv, NULL}};
    int ret = ch_call_pg(call, q, 2, on_rated);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- GET /v1/me/notifications ---- */

#define NOTE_PAGE_PREFIX "nt1:"

static void on_notifications(ch_call_t *call, ch_pg_result_t *r)
{
    view_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    int rows = PQntuples(res), n = rows > st->page ? st->page : rows;
    NotificationList *list = ch_call_alloc(call, sizeof(*list));
    cityhall__onething__v1__notification_list__init(list);
    list->notifications = ch_call_alloc(call, ((size_t)n + 1) * sizeof(*list->notifications));
    for (int i = 0; i < n; ++i) {
        Notification *nt = ch_call_alloc(call, sizeof(*nt));
        cityhall__onething__v1__notification__init(nt);
        nt->notification_id = ch_call_strdup(call, PQgetvalue(res, i, 0));
        nt->kind = ch_call_strdup(call, PQgetvalue(res, i, 1));
        nt->text = ch_call_strdup(call, PQgetvalue(res, i, 2));
        nt->application_id = ch_call_strdup(call, PQgetvalue(res, i, 3));
        nt->created_at = ch_call_timestamp(call, PQgetvalue(res, i, 4));
        nt->read = value_true(res, i, 5);
        list->notifications[list->n_notifications++] = nt;
    }
    list->next_page_token = rows > n ? page_token_encode(call, NOTE_PAGE_PREFIX, PQgetvalue(res, n - 1, 0)) : "";
    ch_reply(call, 200, &list->base);
}

void ot_notifications(ch_call_t *call)
{
    int page = page_size_or_respond(call);
    if (page < 0)
        return;
    const char *token = ch_call_query(call, "page_token"), *cursor = NULL;
    if (token != NULL && token[0] != '\0') {
        char *c = page_token_decode(call, token, NOTE_PAGE_PREFIX);
        if (c == NULL || strlen(c) > 18 || strspn(c, "0123456789") != strlen(c)) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "page_token: not a token this list gave out");
            return;
        }
        cursor = c;
    }
    view_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    st->page = page;
    ch_call_set_data(call, st);
    const char **v = ch_call_alloc(call, 3 * sizeof(*v));
    v[0] = ch_call_principal(call)->subject;
    v[1] = cursor;
    v[2] = ch_call_printf(call, "%d", page + 1);
    ch_pg_query_t q = {&stmt_notifications, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_notifications);
    if (ret != 0)
        ch_fail_err(call, ret);
}
