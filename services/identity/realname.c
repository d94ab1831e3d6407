/* Real-name binding against the registry, /v1/me, dependents, and the access log (reading it, `audit verify`). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <openssl/evp.h>
#include <libpq-fe.h>
#include "identity.h"
#include "cityhall/audit.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"

typedef Cityhall__Identity__V1__Me Me;
typedef Cityhall__Identity__V1__RealNameRequest RealNameRequest;
typedef Cityhall__Identity__V1__RealNameResponse RealNameResponse;
typedef Cityhall__Identity__V1__AddDependentRequest AddDependentRequest;
typedef Cityhall__Identity__V1__Dependent Dependent;
typedef Cityhall__Identity__V1__DependentList DependentList;
typedef Cityhall__Identity__V1__AccessLogEntry AccessLogEntry;
typedef Cityhall__Identity__V1__AccessLogPage AccessLogPage;
typedef Google__Protobuf__Timestamp Timestamp;

/*
 * Registry look-ups are limited, because a registry that answers "match" or "no match" is an oracle for
 * who is who: per account (every attempt that reaches the registry, fixed window) and per target ID number
 * (keyed by its HMAC, across accounts). A malformed number or a wrong check character is refused before
 * either counter moves: it reveals nothing about the registry.
 */
#define LOOKUPS_PER_ACCOUNT      5
#define LOOKUPS_ACCOUNT_WINDOW_S 3600
#define LOOKUPS_PER_TARGET       10
#define LOOKUPS_TARGET_WINDOW_S  86400
#define DEPENDENTS_MAX           4
#define NAME_MAX_BYTES           64
#define ACCESS_LOG_PAGE_DEFAULT  20
#define ACCESS_LOG_PAGE_MAX      100

/* One message for an unknown number and for a known number with another name: never reveal which. */
#define NO_MATCH "the ID number and name do not match the registry"

/* ---- statements ---- */

/*
 * Matches the registry and binds in one statement (one transaction): `r` is the resident with this ID hash
 * and exactly this name, `me` the account before the statement, `u` the bind itself, which only fills an
 * account that has no real name yet. A resident bound to another account makes the UPDATE fail on
 * citizens.registry_id's UNIQUE constraint (23505), whatever the interleaving of the two binds.
 * $1 citizen_id, $2 id_hmac (bytea), $3 name.
 * Columns: resident_id, id_masked, my registry_id before, bound now (0/1), account exists.
 */
static const ch_pg_stmt_t stmt_bind = {
    "identity_realname_bind",
    "WITH r AS (SELECT resident_id, id_masked FROM registry_residents WHERE id_hmac = $2::bytea AND name = $3), "
    "me AS (SELECT registry_id FROM citizens WHERE citizen_id = $1::uuid), "
    "u AS (UPDATE citizens c SET registry_id = r.resident_id, real_name_verified_at = now() FROM r "
    "      WHERE c.citizen_id = $1::uuid AND c.registry_id IS NULL RETURNING c.registry_id) "
    "SELECT (SELECT resident_id FROM r), (SELECT id_masked FROM r), (SELECT registry_id FROM me), "
    "       (SELECT count(*) FROM u), EXISTS (SELECT 1 FROM me)",
    3};

/* The account and its real name. $1 citizen_id. */
static const ch_pg_stmt_t stmt_me = {
    "identity_me",
    "SELECT c.citizen_id::text, encode(c.phone_enc, 'hex'), extract(epoch FROM c.created_at)::numeric(20,6)::text, "
    "       c.registry_id IS NOT NULL, r.name, r.id_masked "
    "FROM citizens c LEFT JOIN registry_residents r ON r.resident_id = c.registry_id WHERE c.citizen_id = $1::uuid",
    1};

/* A guardian's dependents, oldest addition first. $1 guardian citizen_id. */
static const ch_pg_stmt_t stmt_dependents = {
    "identity_dependents",
    "SELECT d.resident_id::text, d.relation, r.name, r.id_masked, extract(epoch FROM d.added_at)::numeric(20,6)::text "
    "FROM dependents d JOIN registry_residents r ON r.resident_id = d.resident_id "
    "WHERE d.guardian_id = $1::uuid ORDER BY d.added_at, d.resident_id",
    1};

/*
 * Everything the dependent rules need, read in one statement: the guardian's real name and birth date, the
 * matched resident (ID hash and exact name), whether the resident is under 14 today by China's calendar (the
 * database clock, in Asia/Shanghai), the relative ages, how many dependents the guardian has, whether this
 * one is among them, and whether the two are family by the government's own records: one household (户号) in the
 * population registry, or mother/father and child on a birth medical certificate. Knowing a person's ID number
 * and name is not enough to see their health code. $1 guardian citizen_id, $2 id_hmac, $3 name.
 * Columns: guardian registry_id, resident_id, id_masked, name, under 14, older than guardian, younger than
 * guardian, count, already, family.
 */
static const ch_pg_stmt_t stmt_dependent_check = {
    "identity_dependent_check",
    "SELECT g.registry_id, r.resident_id, r.id_masked, r.name, "
    "       coalesce(r.birth_date + interval '14 years' > (now() AT TIME ZONE 'Asia/Shanghai')::date, false), "
    "       coalesce(r.birth_date < gr.birth_date, false), coalesce(r.birth_date > gr.birth_date, false), "
    "       (SELECT count(*) FROM dependents WHERE guardian_id = $1::uuid), "
    "       EXISTS (SELECT 1 FROM dependents WHERE guardian_id = $1::uuid AND resident_id = r.resident_id), "
    "       coalesce(gr.household_id = r.household_id, false) "
    "       OR EXISTS (SELECT 1 FROM birth_records b WHERE b.child_id_hmac = r.id_hmac "
    "                  AND gr.id_hmac IN (b.mother_id_hmac, b.father_id_hmac)) "
    "       OR EXISTS (SELECT 1 FROM birth_records b WHERE b.child_id_hmac = gr.id_hmac "
    "                  AND r.id_hmac IN (b.mother_id_hmac, b.father_id_hmac)) "
    "FROM citizens g LEFT JOIN registry_residents gr ON gr.resident_id = g.registry_id "
    "LEFT JOIN registry_residents r ON r.id_hmac = $2::bytea AND r.name = $3 "
    "WHERE g.citizen_id = $1::uuid",
    3};

/* The add itself: identity_dependent_add re-checks what concurrent adds could break, under the guardian's row lock. */
static const ch_pg_stmt_t stmt_dependent_add = {
    "identity_dependent_add", "SELECT identity_dependent_add($1::uuid, $2::bigint, $3, $4::timestamptz, $5::int)", 5};

/* One page of the caller's access log, newest first, after the cursor $2 (NULL: from the newest). $3 rows. */
static const ch_pg_stmt_t stmt_access_log = {
    "identity_access_log",
    "SELECT entry_id::text, extract(epoch FROM at)::numeric(20,6)::text, actor_role, actor, actor_dept, on_behalf_of, "
    "       action, purpose "
    "FROM access_log a WHERE a.citizen_id = $1::uuid AND a.entry_id < coalesce($2::bigint, 9223372036854775807) "
    "ORDER BY a.entry_id DESC LIMIT $3::int", /* a.: the output column entry_id is text */
    3};

const ch_pg_stmt_t *const identity_realname_stmts[] = {
    &stmt_bind, &stmt_me, &stmt_dependents, &stmt_dependent_check, &stmt_dependent_add, &stmt_access_log, NULL,
};

/* ---- small helpers ---- */

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

/* Decodes lower- or upper-case hex into `out` (room for strlen(hex)/2); returns the length or -1. */
static long hex_decode(const char *hex, uint8_t *out)
{
    size_t n = strlen(hex);
    if (n % 2 != 0)
        return -1;
    for (size_t i = 0; i < n / 2; ++i) {
        int hi = hexval((unsigned char)hex[2 * i]), lo = hexval((unsigned char)hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return (long)(n / 2);
}

static const char *value_or_null(PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int value_true(PGresult *res, int row, int col)
{
    return !PQgetisnull(res, row, col) && PQgetvalue(res, row, col)[0] == 't';
}

static char *masked_name(ch_call_t *call, const char *name)
{
    char *out = ch_call_alloc(call, 64);
    ch_name_mask(name, out, 64);
    return out;
}

/*
 * Appends to the citizen's access log when the caller is not the citizen alone: a staff member acting for
 * them (delegation) or a kiosk session. Returns the number of queries added (0 or 1).
 */
static int audit_if_acting(ch_call_t *call, const char *action, ch_pg_query_t *q)
{
    const ch_principal_t *p = ch_call_principal(call);
    int delegated = p->actor != NULL && p->actor[0] != '\0';
    int kiosk = p->device != NULL && p->device[0] != '\0';
    if (!delegated && !kiosk)
        return 0;
    ch_audit_query(call, p->subject, action,
                   delegated ? "acting for the citizen at a service counter" : "self-service kiosk session", q);
    return 1;
}

/*
 * Normalizes and checks an ID number: a final lower-case x is read as X (people type it either way; the
 * check character is defined as upper-case X), then GB 11643 format, birth date and check character.
 * Answers 422 with the reason (never the number) and returns -1 when it is not valid.
 */
static int id_number_or_respond(ch_call_t *call, const char *in, char out[19])
{
    const char *why = "must be 18 characters";
    size_t n = strlen(in);
    if (n == 18) {
        memcpy(out, in, 19);
        if (out[17] == 'x')
            out[17] = 'X';
        if (ch_id_number_check(out, &why) == 0)
            return 0;
    } else if (n == 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "id_number: required");
        return -1;
    }
    ch_fail(call, CH_CODE_FAILED_PRECONDITION, "id_number: %s", why);
    return -1;
}

/* Trims ASCII spaces; a name is required, at most 64 bytes, without control characters. */
static const char *name_or_respond(ch_call_t *call, const char *in)
{
    while (*in == ' ')
        ++in;
    size_t n = strlen(in);
    while (n > 0 && in[n - 1] == ' ')
        --n;
    if (n == 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "name: required");
        return NULL;
    }
    if (n > NAME_MAX_BYTES) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "name: at most %d bytes", NAME_MAX_BYTES);
        return NULL;
    }
    for (size_t i = 0; i < n; ++i) {
        if ((unsigned char)in[i] < 0x20 || in[i] == 0x7f) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "name: control characters are not allowed");
            return NULL;
        }
    }
    char *s = ch_call_alloc(call, n + 1);
    memcpy(s, in, n);
    s[n] = '\0';
    return s;
}

/* ---- the registry look-up limits (Redis) ---- */

/*
 * KEYS[1] the account's counter, KEYS[2] the target's; ARGV window of each, then the account's maximum.
 * Both are fixed windows that start with the first attempt. An account over its limit does not move the
 * target's counter (it would otherwise let one account use up a stranger's daily attempts faster).
 * Returns {account count, target count (0 if not counted), seconds left in the window that refuses}.
 */
static const char lookup_script[] = "local a = redis.call('INCR', KEYS[1]) "
                                    "if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end "
                                    "if a > tonumber(ARGV[3]) then return {a, 0, redis.call('TTL', KEYS[1])} end "
                                    "local b = redis.call('INCR', KEYS[2]) "
                                    "if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end "
                                    "return {a, b, redis.call('TTL', KEYS[2])}";

typedef struct lookup_state {
    char id[19];
    const char *name;
    const char *relation; /* dependents only */
    uint8_t hmac[32];
    void (*next)(ch_call_t *call);
    Dependent *dep; /* the answer of a dependent add */
} lookup_state_t;

static void on_lookup_counted(ch_call_t *call, redisReply *reply, int err)
{
    lookup_state_t *st = ch_call_data(call);
    if (err != 0) {
        ch_fail_err(call, err); /* the limits are a security control: fail closed (503) */
        return;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 3 || reply->element[0]->type != REDIS_REPLY_INTEGER ||
        reply->element[1]->type != REDIS_REPLY_INTEGER || reply->element[2]->type != REDIS_REPLY_INTEGER) {
        ch_fail_err(call, CH_EDB);
        return;
    }
    long long account = reply->element[0]->integer, target = reply->element[1]->integer;
    long long left = reply->element[2]->integer > 0 ? reply->element[2]->integer : 1;
    if (account > LOOKUPS_PER_ACCOUNT) {
        ch_fail(call, CH_CODE_RESOURCE_EXHAUSTED,
                "too many registry look-ups from this account; try again in %lld minutes", (left + 59) / 60);
        return;
    }
    if (target > LOOKUPS_PER_TARGET) {
        ch_fail(call, CH_CODE_RESOURCE_EXHAUSTED, "too many look-ups of this ID number today; try again in %lld hours",
                (left + 3599) / 3600);
        return;
    }
    st->next(call);
}

/* Counts one registry look-up for the caller and for the target number, then runs st->next. */
static void count_lookup(ch_call_t *call, lookup_state_t *st)
{
    const ch_principal_t *p = ch_call_principal(call);
    char hex[65];
    ch_hex(st->hmac, sizeof(st->hmac), hex);
    const char *argv[8] = {
        "EVAL",
        lookup_script,
        "2",
        ch_call_printf(call, "id:lookup:account:%s", p->subject),
        ch_call_printf(call, "id:lookup:target:%s", hex),
        ch_call_printf(call, "%d", LOOKUPS_ACCOUNT_WINDOW_S),
        ch_call_printf(call, "%d", LOOKUPS_TARGET_WINDOW_S),
        ch_call_printf(call, "%d", LOOKUPS_PER_ACCOUNT),
    };
    int ret = ch_call_redis(call, on_lookup_counted, 8, argv, NULL);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* Reads and validates {id_number, name}, computes the look-up hash; answers and returns NULL on bad input. */
static lookup_state_t *lookup_begin_or_respond(ch_call_t *call, const char *id_number, const char *name_in)
{
    lookup_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    const char *name = name_or_respond(call, name_in);
    if (name == NULL || id_number_or_respond(call, id_number, st->id) != 0)
        return NULL;
    st->name = name;
    ch_pii_hmac(ch_pii, "id", st->id, 18, st->hmac);
    ch_call_set_data(call, st);
    return st;
}

/* ---- POST /v1/me/real-name ---- */

static void on_bound(ch_call_t *call, ch_pg_result_t *r)
{
    lookup_state_t *st = ch_call_data(call);
    if (r->err == CH_EDB && r->sqlstate != NULL && strcmp(r->sqlstate, "23505") == 0) {
        ch_fail(call, CH_CODE_ALREADY_EXISTS, "this ID number is already bound to another account");
        return;
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1 || !value_true(res, 0, 4)) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such account");
        return;
    }
    const char *resident = value_or_null(res, 0, 0), *mine = value_or_null(res, 0, 2);
    if (resident == NULL) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, NO_MATCH);
        return;
    }
    int bound_now = strcmp(PQgetvalue(res, 0, 3), "0") != 0;
    if (!bound_now && (mine == NULL || strcmp(mine, resident) != 0)) {
        /* the account already carries another identity (or one was bound to it a moment ago) */
        ch_fail(call, CH_CODE_ALREADY_EXISTS, "this account is already bound to another identity");
        return;
    }
    RealNameResponse *resp = ch_call_alloc(call, sizeof(*resp));
    cityhall__identity__v1__real_name_response__init(resp);
    resp->real_name_verified = 1;
    resp->masked_id_number = ch_call_strdup(call, PQgetvalue(res, 0, 1));
    resp->masked_name = masked_name(call, st->name);
    ch_reply(call, 200, &resp->base);
}

static void real_name_match(ch_call_t *call)
{
    lookup_state_t *st = ch_call_data(call);
    const ch_principal_t *p = ch_call_principal(call);
    const char **v = ch_call_alloc(call, 3 * sizeof(*v));
    v[0] = p->subject;
    v[1] = bytea_param(call, st->hmac, sizeof(st->hmac));
    v[2] = st->name;
    ch_pg_query_t q[2] = {{&stmt_bind, v, NULL}};
    int n = 1 + audit_if_acting(call, "realname.bind", &q[1]);
    int ret = ch_call_pg(call, q, n, on_bound);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void identity_real_name(ch_call_t *call)
{
    RealNameRequest *req = ch_call_body(call);
    lookup_state_t *st = lookup_begin_or_respond(call, req->id_number, req->name);
    if (st == NULL)
        return;
    st->next = real_name_match;
    count_lookup(call, st);
}

/* ---- dependents ---- */

static Dependent *dependent_from_row(ch_call_t *call, PGresult *res, int row)
{
    Dependent *d = ch_call_alloc(call, sizeof(*d));
    cityhall__identity__v1__dependent__init(d);
    d->dependent_id = ch_call_strdup(call, PQgetvalue(res, row, 0));
    d->relation = ch_call_strdup(call, PQgetvalue(res, row, 1));
    d->masked_name = masked_name(call, PQgetvalue(res, row, 2));
    d->masked_id_number = ch_call_strdup(call, PQgetvalue(res, row, 3));
    d->added_at = ch_call_timestamp(call, PQgetvalue(res, row, 4));
    return d;
}

static Dependent **dependents_from_result(ch_call_t *call, PGresult *res, size_t *n)
{
    *n = (size_t)PQntuples(res);
    Dependent **list = ch_call_alloc(call, (*n + 1) * sizeof(*list));
    for (size_t i = 0; i < *n; ++i)
        list[i] = dependent_from_row(call, res, (int)i);
    return list;
}

static void on_dependent_added(ch_call_t *call, ch_pg_result_t *r)
{
    lookup_state_t *st = ch_call_data(call);
    if (r->err == CH_EDB && r->sqlstate != NULL) {
        if (strcmp(r->sqlstate, "CH409") == 0 || strcmp(r->sqlstate, "23505") == 0) {
            ch_fail(call, CH_CODE_ALREADY_EXISTS, "this person is already one of your dependents");
            return;
        }
        if (strcmp(r->sqlstate, "CH4MX") == 0) {
            ch_fail(call, CH_CODE_FAILED_PRECONDITION, "at most %d dependents", DEPENDENTS_MAX);
            return;
        }
        if (strcmp(r->sqlstate, "CH422") == 0) {
            ch_fail(call, CH_CODE_FAILED_PRECONDITION, "verify your real name before adding dependents");
            return;
        }
        if (strcmp(r->sqlstate, "23503") == 0) { /* the resident left the registry in between */
            ch_fail(call, CH_CODE_FAILED_PRECONDITION, NO_MATCH);
            return;
        }
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ch_reply(call, 201, &st->dep->base);
}

static void on_dependent_checked(ch_call_t *call, ch_pg_result_t *r)
{
    lookup_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such account");
        return;
    }
    const char *guardian = value_or_null(res, 0, 0), *resident = value_or_null(res, 0, 1);
    if (guardian == NULL) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "verify your real name before adding dependents");
        return;
    }
    if (resident == NULL) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, NO_MATCH);
        return;
    }
    if (strcmp(guardian, resident) == 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "you cannot be your own dependent");
        return;
    }
    if (value_true(res, 0, 8)) {
        ch_fail(call, CH_CODE_ALREADY_EXISTS, "this person is already one of your dependents");
        return;
    }
    if (atoi(PQgetvalue(res, 0, 7)) >= DEPENDENTS_MAX) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "at most %d dependents", DEPENDENTS_MAX);
        return;
    }
    int child = strcmp(st->relation, "child") == 0;
    if (child && !(value_true(res, 0, 4) && value_true(res, 0, 6))) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "a child dependent must be under 14 and younger than you");
        return;
    }
    if (!child && !value_true(res, 0, 5)) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "a parent dependent must be older than you");
        return;
    }
    if (!value_true(res, 0, 9)) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION,
                "a dependent must share your household in the population registry or be your %s on a birth "
                "medical certificate; otherwise ask at a service hall",
                child ? "child" : "parent");
        return;
    }

    /* The answer is fixed before the write, so that a retry with the same Idempotency-Key replays it. */
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    Dependent *d = ch_call_alloc(call, sizeof(*d));
    cityhall__identity__v1__dependent__init(d);
    d->dependent_id = ch_call_strdup(call, resident);
    d->relation = (char *)st->relation;
    d->masked_name = masked_name(call, PQgetvalue(res, 0, 3));
    d->masked_id_number = ch_call_strdup(call, PQgetvalue(res, 0, 2));
    d->added_at = ch_call_alloc(call, sizeof(*d->added_at));
    google__protobuf__timestamp__init(d->added_at);
    d->added_at->seconds = tv.tv_sec;
    d->added_at->nanos = (int32_t)tv.tv_usec * 1000;
    st->dep = d;

    const ch_principal_t *p = ch_call_principal(call);
    const char **v = ch_call_alloc(call, 5 * sizeof(*v));
    v[0] = p->subject;
    v[1] = d->dependent_id;
    v[2] = st->relation;
    v[3] = ch_call_printf(call, "%04d-%02d-%02d %02d:%02d:%02d.%06ld+00", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                          tm.tm_hour, tm.tm_min, tm.tm_sec, (long)tv.tv_usec);
    v[4] = ch_call_printf(call, "%d", DEPENDENTS_MAX);
    ch_pg_query_t q[2] = {{&stmt_dependent_add, v, NULL}};
    int n = 1 + audit_if_acting(call, "dependents.add", &q[1]);
    int ret = ch_call_pg_commit(call, q, n, 201, &d->base, on_dependent_added);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void dependent_match(ch_call_t *call)
{
    lookup_state_t *st = ch_call_data(call);
    const ch_principal_t *p = ch_call_principal(call);
    const char **v = ch_call_alloc(call, 3 * sizeof(*v));
    v[0] = p->subject;
    v[1] = bytea_param(call, st->hmac, sizeof(st->hmac));
    v[2] = st->name;
    ch_pg_query_t q = {&stmt_dependent_check, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_dependent_checked);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/*
 * POST /v1/me/dependents. Rules: the guardian has a verified real name; the pair matches the registry (same
 * limits as real-name binding); not the guardian; not already a dependent (409); at most 4. A "child" is under
 * 14 today by birth date and younger than the guardian. A "parent" is older than the guardian; any registry
 * match will do, in the same household or not (grown-up children seldom share their parents' 户口, and the
 * synthetic registry has no kinship records to check against).
 */
void identity_dependent_add(ch_call_t *call)
{
    AddDependentRequest *req = ch_call_body(call);
    const char *relation;
    if (strcmp(req->relation, "child") == 0) {
        relation = "child";
    } else if (strcmp(req->relation, "parent") == 0) {
        relation = "parent";
    } else {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "relation: must be \"child\" or \"parent\"");
        return;
    }
    lookup_state_t *st = lookup_begin_or_respond(call, req->id_number, req->name);
    if (st == NULL)
        return;
    st->relation = relation;
    st->next = dependent_match;
    count_lookup(call, st);
}

static void on_dependents(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    DependentList *list = ch_call_alloc(call, sizeof(*list));
    cityhall__identity__v1__dependent_list__init(list);
    list->dependents = dependents_from_result(call, r->res[0], &list->n_dependents);
    ch_reply(call, 200, &list->base);
}

void identity_dependents_list(ch_call_t *call)
{
    const ch_principal_t *p = ch_call_principal(call);
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = p->subject;
    ch_pg_query_t q[2] = {{&stmt_dependents, v, NULL}};
    int n = 1 + audit_if_acting(call, "dependents.read", &q[1]);
    int ret = ch_call_pg(call, q, n, on_dependents);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- GET /v1/me ---- */

static void on_me(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such account");
        return;
    }
    Me *me = ch_call_alloc(call, sizeof(*me));
    cityhall__identity__v1__me__init(me);
    me->citizen_id = ch_call_strdup(call, PQgetvalue(res, 0, 0));
    me->created_at = ch_call_timestamp(call, PQgetvalue(res, 0, 2));
    me->real_name_verified = value_true(res, 0, 3);
    me->masked_phone = "";
    const char *phone_hex = value_or_null(res, 0, 1);
    if (phone_hex != NULL) {
        uint8_t *sealed = ch_call_alloc(call, strlen(phone_hex) / 2 + 1);
        long len = hex_decode(phone_hex, sealed);
        ch_buf_t phone = {0};
        /* a phone that does not decrypt (another data key) shows as "", never as an error */
        if (len > 0 && ch_pii_decrypt(ch_pii, sealed, (size_t)len, &phone) == 0 && phone.len == 11) {
            me->masked_phone = ch_call_alloc(call, 12);
            ch_phone_mask(phone.base, me->masked_phone);
        }
        if (phone.base != NULL)
            OPENSSL_cleanse(phone.base, phone.len);
        ch_buf_free(&phone);
    }
    if (me->real_name_verified) {
        me->masked_name = masked_name(call, PQgetvalue(res, 0, 4));
        me->masked_id_number = ch_call_strdup(call, PQgetvalue(res, 0, 5));
    } else {
        me->masked_name = "";
        me->masked_id_number = "";
    }
    me->dependents = dependents_from_result(call, r->res[1], &me->n_dependents);
    ch_reply(call, 200, &me->base);
}

void identity_me(ch_call_t *call)
{
    const ch_principal_t *p = ch_call_principal(call);
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = p->subject;
    ch_pg_query_t q[3] = {{&stmt_me, v, NULL}, {&stmt_dependents, v, NULL}};
    int n = 2 + audit_if_acting(call, "account.read", &q[2]);
    int ret = ch_call_pg(call, q, n, on_me);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- GET /v1/me/access-log ---- */

/* The opaque page token: base64url of "al1:<entry id>", the last entry of the previous page. */
#define PAGE_TOKEN_PREFIX "al1:"

static char *page_token_encode(ch_call_t *call, const char *entry_id)
{
    char plain[40];
    int n = snprintf(plain, sizeof(plain), PAGE_TOKEN_PREFIX "%s", entry_id);
    ch_buf_t buf = {0};
    ch_b64url_encode((const uint8_t *)plain, (size_t)n, &buf);
    char *s = ch_call_strdup(call, buf.base);
    ch_buf_free(&buf);
    return s;
}

/* Returns the cursor (entry id) of a page token, or -1 when the token is not one of ours. */
static long long page_token_decode(const char *token)
{
    size_t len = strlen(token);
    if (len == 0 || len > 40)
        return -1;
    uint8_t plain[40];
    long n = ch_b64url_decode(token, len, plain);
    size_t pre = sizeof(PAGE_TOKEN_PREFIX) - 1;
    if (n <= (long)pre || n > 24 || memcmp(plain, PAGE_TOKEN_PREFIX, pre) != 0)
        return -1;
    long long v = 0;
    for (long i = (long)pre; i < n; ++i) {
        if (plain[i] < '0' || plain[i] > '9' || v > 922337203685477579LL)
            return -1;
        v = v * 10 + (plain[i] - '0');
    }
    return v > 0 ? v : -1;
}

typedef struct access_log_state {
    int page_size;
} access_log_state_t;

static void on_access_log(ch_call_t *call, ch_pg_result_t *r)
{
    access_log_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    int rows = PQntuples(res);
    int n = rows > st->page_size ? st->page_size : rows; /* one row more than the page says there is a next */
    AccessLogPage *page = ch_call_alloc(call, sizeof(*page));
    cityhall__identity__v1__access_log_page__init(page);
    page->entries = ch_call_alloc(call, ((size_t)n + 1) * sizeof(*page->entries));
    page->n_entries = (size_t)n;
    for (int i = 0; i < n; ++i) {
        AccessLogEntry *e = ch_call_alloc(call, sizeof(*e));
        cityhall__identity__v1__access_log_entry__init(e);
        e->entry_id = ch_call_strdup(call, PQgetvalue(res, i, 0));
        e->at = ch_call_timestamp(call, PQgetvalue(res, i, 1));
        e->actor_role = ch_call_strdup(call, PQgetvalue(res, i, 2));
        e->actor = ch_call_strdup(call, PQgetvalue(res, i, 3));
        e->actor_department = ch_call_strdup(call, PQgetvalue(res, i, 4));
        e->on_behalf_of = ch_call_strdup(call, PQgetvalue(res, i, 5));
        e->action = ch_call_strdup(call, PQgetvalue(res, i, 6));
        e->purpose = ch_call_strdup(call, PQgetvalue(res, i, 7));
        page->entries[i] = e;
    }
    page->next_page_token = rows > st->page_size ? page_token_encode(call, PQgetvalue(res, n - 1, 0)) : "";
    ch_reply(call, 200, &page->base);
}

void identity_access_log(ch_call_t *call)
{
    const ch_principal_t *p = ch_call_principal(call);
    access_log_state_t *st = ch_call_alloc(call, sizeof(*st));
    st->page_size = ACCESS_LOG_PAGE_DEFAULT;
    const char *size = ch_call_query(call, "page_size");
    if (size != NULL && size[0] != '\0') {
        long v = 0;
        int ok = strlen(size) <= 9;
        for (const char *c = size; ok && *c != '\0'; ++c) {
            ok = *c >= '0' && *c <= '9';
            v = v * 10 + (*c - '0');
        }
        if (!ok) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "page_size: must be a number from 1 to %d", ACCESS_LOG_PAGE_MAX);
            return;
        }
        if (v > 0)
            st->page_size = v > ACCESS_LOG_PAGE_MAX ? ACCESS_LOG_PAGE_MAX : (int)v;
    }
    const char *token = ch_call_query(call, "page_token");
    const char *cursor = NULL;
    if (token != NULL && token[0] != '\0') {
        long long c = page_token_decode(token);
        if (c < 0) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "page_token: not a token this list gave out");
            return;
        }
        cursor = ch_call_printf(call, "%lld", c);
    }
    ch_call_set_data(call, st);
    const char **v = ch_call_alloc(call, 3 * sizeof(*v));
    v[0] = p->subject;
    v[1] = cursor;
    v[2] = ch_call_printf(call, "%d", st->page_size + 1);
    ch_pg_query_t q[2] = {{&stmt_access_log, v, NULL}};
    int n = 1 + audit_if_acting(call, "access_log.read", &q[1]);
    int ret = ch_call_pg(call, q, n, on_access_log);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- `cityhall audit verify` ---- */

/* Appends one field of the canonical text: "-" for NULL, else "<octet length>:<value>" (access_log_field in SQL). */
static void canonical_field(ch_buf_t *buf, const char *v)
{
    if (v == NULL) {
        ch_buf_append(buf, "-", 1);
        return;
    }
    char len[24];
    int n = snprintf(len, sizeof(len), "%zu:", strlen(v));
    ch_buf_append(buf, len, (size_t)n);
    ch_buf_append(buf, v, strlen(v));
}

/*
 * Checks every citizen's chain in one consistent snapshot, read through a cursor in batches (blocking libpq:
 * this is a command, off any event loop). For each entry, in entry order per citizen: prev_hash must be the
 * previous entry's hash (NULL for the first) and hash must be sha256(prev_hash || canonical text), the canonical
 * text rebuilt here exactly as access_log_canonical builds it in SQL.
 */
int identity_cmd_audit_verify(const ch_config_t *config, int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "usage: cityhall audit verify\n");
        return 2;
    }
    PGconn *conn = PQconnectdb(config->pg_conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "audit verify: could not connect to PostgreSQL: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return 2;
    }
    int ret = 2;
    PGresult *res = PQexec(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
    PQclear(res);
    res = PQexec(conn, "DECLARE entries NO SCROLL CURSOR FOR "
                       "SELECT entry_id::text, citizen_id::text, ((extract(epoch FROM at) * 1000000)::bigint)::text, "
                       "       actor_role, actor, actor_dept, on_behalf_of, action, purpose, "
                       "       encode(prev_hash, 'hex'), encode(hash, 'hex') "
                       "FROM access_log a ORDER BY a.citizen_id, a.entry_id"); /* a.: not the text columns */
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        fprintf(stderr, "audit verify: could not read the access log: %s", PQerrorMessage(conn));
        PQclear(res);
        PQfinish(conn);
        return 2;
    }
    PQclear(res);

    EVP_MD_CTX *sha = EVP_MD_CTX_new();
    if (sha == NULL)
        abort();
    ch_buf_t canon = {0};
    char citizen[64] = "", prev_hex[65] = "";
    int have_prev = 0;
    long long entries = 0, chains = 0;
    for (;;) {
        res = PQexec(conn, "FETCH 10000 FROM entries");
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            fprintf(stderr, "audit verify: could not read the access log: %s", PQerrorMessage(conn));
            PQclear(res);
            goto out;
        }
        int rows = PQntuples(res);
        if (rows == 0) {
            PQclear(res);
            break;
        }
        for (int i = 0; i < rows; ++i) {
            const char *entry = PQgetvalue(res, i, 0), *cid = PQgetvalue(res, i, 1);
            if (strcmp(cid, citizen) != 0) {
                snprintf(citizen, sizeof(citizen), "%s", cid);
                have_prev = 0;
                ++chains;
            }
            const char *prev = value_or_null(res, i, 9), *hash = PQgetvalue(res, i, 10);
            if (have_prev ? prev == NULL || strcmp(prev, prev_hex) != 0 : prev != NULL) {
                printf("audit verify: entry %s (citizen %s) is broken: its prev_hash is not the hash of the entry "
                       "before it\n",
                       entry, cid);
                PQclear(res);
                ret = 1;
                goto out;
            }
            canon.len = 0;
            ch_buf_append(&canon, "cityhall.access_log.v1\n", 23);
            for (int c = 0; c <= 8; ++c)
                canonical_field(&canon, value_or_null(res, i, c));
            uint8_t prev_bin[32], digest[32];
            long prev_len = prev != NULL ? hex_decode(prev, prev_bin) : 0;
            char digest_hex[65];
            EVP_DigestInit_ex(sha, EVP_sha256(), NULL);
            if (prev_len > 0)
                EVP_DigestUpdate(sha, prev_bin, (size_t)prev_len);
            EVP_DigestUpdate(sha, canon.base, canon.len);
            EVP_DigestFinal_ex(sha, digest, NULL);
            ch_hex(digest, sizeof(digest), digest_hex);
            if (prev_len < 0 || strcmp(digest_hex, hash) != 0) {
                printf("audit verify: entry %s (citizen %s) is broken: its hash does not match its contents\n", entry,
                       cid);
                PQclear(res);
                ret = 1;
                goto out;
            }
            snprintf(prev_hex, sizeof(prev_hex), "%s", hash);
            have_prev = 1;
            ++entries;
        }
        PQclear(res);
    }
    printf("audit verify: OK (%lld entries in %lld chains)\n", entries, chains);
    ret = 0;
out:
    ch_buf_free(&canon);
    EVP_MD_CTX_free(sha);
    PQfinish(conn);
    return ret;
}
