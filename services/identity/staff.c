/* Counter staff (password + TOTP login, acting for a citizen present at the counter) and department clients. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <liboath/oath.h>
#include <sodium.h>
#include "cityhall/audit.h"
#include "cityhall/pii.h"
#include "identity.h"

/*
 * Staff login: one query loads the account; argon2id (~100 ms, 64 MiB) and the TOTP check run on a
 * worker thread (ch_call_work), never on the loop. An unknown or disabled username costs the same
 * argon2id verification (against a dummy hash) and gets the same 401. Failures are counted in
 * PostgreSQL (staff_accounts.failed_logins); the fifth consecutive one locks the account for 15
 * minutes. A TOTP code is accepted once: the accepting UPDATE moves totp_last_step forward only if the
 * code's time step is newer, so two concurrent logins with one code cannot both succeed.
 */

#define STAFF_SESSION_S    (12 * 3600) /* absolute limit of a staff session (refreshable within it) */
#define STAFF_PASSWORD_MAX 256
#define STAFF_SEALED_MAX   128 /* an encrypted 20-byte TOTP secret is 48 bytes */
#define TOTP_STEP_S        30
#define TOTP_DIGITS        6
#define TOTP_WINDOW        1 /* one step either side: codes of the previous, current and next 30 s */
#define TOTP_SECRET_BYTES  20

#define DELEGATION_S            (15 * 60)    /* absolute limit of a delegation's citizen session */
#define DELEGATION_TOKEN_S      DELEGATION_S /* its one token: the whole delegation, within the 5-15 min access-token range */
#define DELEGATION_PER_MIN      30           /* delegations one staff member may attempt per minute */
#define CLIENT_SESSION_S        3600         /* a department client's session */
#define CLIENT_ATTEMPTS_PER_MIN 10           /* client-token attempts per client id per minute */


static const char staff_wrong[] = "the username, password or code is wrong";
static const char client_wrong[] = "the client id or secret is wrong";

/* ---- statements ---- */

static const ch_pg_stmt_t stmt_staff_load = {
    "identity_staff_load",
    "SELECT staff_id, password_hash, encode(totp_secret_enc, 'hex'), totp_last_step, dept, hall, "
    "'staff' = ANY (roles), 'admin' = ANY (roles), "
    "coalesce(ceil(extract(epoch FROM locked_until - now())), 0)::bigint "
    "FROM staff_accounts WHERE username = $1 AND disabled_at IS NULL",
    1};

/* The accepting update: only a newer time step, only if not locked meanwhile. No row: refuse. */
static const ch_pg_stmt_t stmt_staff_accept = {
    "identity_staff_accept",
    "UPDATE staff_accounts SET failed_logins = 0, locked_until = NULL, totp_last_step = $2::bigint "
    "WHERE staff_id = $1::uuid AND totp_last_step < $2::bigint AND disabled_at IS NULL "
    "AND (locked_until IS NULL OR locked_until <= now()) RETURNING staff_id",
    2};

/* Five consecutive failures lock for 15 minutes; the counter restarts at zero when it locks. */
static const ch_pg_stmt_t stmt_staff_failed = {
    "identity_staff_failed",
    "UPDATE staff_accounts SET "
    "failed_logins = CASE WHEN failed_logins + 1 >= 5 THEN 0 ELSE failed_logins + 1 END, "
    "locked_until = CASE WHEN failed_logins + 1 >= 5 THEN now() + interval '15 minutes' ELSE locked_until END "
    "WHERE staff_id = $1::uuid RETURNING locked_until IS NOT NULL AND locked_until > now()",
    1};

/*
 * The citizen present at a counter or a kiosk: the registry resident with this keyed hash of the ID
 * number ($1, hex), whether the name ($2) matches, and the account bound to it (NULL when none).
 * Shared with kiosk.c.
 */
const ch_pg_stmt_t identity_stmt_present_citizen = {
    "identity_present_citizen",
    "SELECT c.citizen_id, r.name = $2 "
    "FROM registry_residents r LEFT JOIN citizens c ON c.registry_id = r.resident_id "
    "WHERE r.id_hmac = decode($1, 'hex')",
    2};

static const ch_pg_stmt_t stmt_delegation_insert = {
    "identity_delegation_insert",
    "INSERT INTO delegations (delegation_id, staff_id, citizen_id, purpose, expires_at, session_id) "
    "VALUES ($1::uuid, $2::uuid, $3::uuid, $4, to_timestamp($5::bigint), $6::uuid)",
    6};

static const ch_pg_stmt_t stmt_client_load = {
    "identity_client_load", "SELECT dept, secret_hash FROM dept_clients WHERE client_id = $1 AND disabled_at IS NULL",
    1};

const ch_pg_stmt_t *const identity_staff_stmts[] = {
    &stmt_staff_load,
    &stmt_staff_accept,
    &stmt_staff_failed,
    &identity_stmt_present_citizen,
    &stmt_delegation_insert,
    &stmt_client_load,
    NULL,
};

/* ---- shared helpers (kiosk.c uses the ones not static) ---- */

static pthread_once_t crypto_once = PTHREAD_ONCE_INIT;
static char dummy_hash[crypto_pwhash_STRBYTES];

/* libsodium picks its fastest argon2 code in sodium_init; liboath needs oath_init once per process. */
static void crypto_init(void)
{
    if (sodium_init() < 0 || oath_init() != OATH_OK)
        abort();
}

/* A hash of a random password with the same parameters, for unknown usernames (same cost, same answer). */
static pthread_once_t dummy_once = PTHREAD_ONCE_INIT;
static void dummy_init(void)
{
    char pw[32];
    randombytes_buf(pw, sizeof(pw));
    if (crypto_pwhash_str(dummy_hash, pw, sizeof(pw), crypto_pwhash_OPSLIMIT_INTERACTIVE,
                          crypto_pwhash_MEMLIMIT_INTERACTIVE) != 0)
        abort(); /* out of memory */
}

static int64_t wall_now(void)
{
    return (int64_t)time(NULL);
}

/*
 * A short identifier: 1..max bytes of a-z and 0-9 (A-Z too if upper_ok), '-' (and '.', '_' if dot_ok)
 * after the first character. Usernames, departments, halls, client and device ids. Shared with kiosk.c.
 */
int identity_ident_ok(const char *s, size_t max, int upper_ok, int dot_ok)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return 0;
    for (size_t i = 0; i < n; ++i) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (upper_ok && c >= 'A' && c <= 'Z') ||
                 (i > 0 && (c == '-' || (dot_ok && (c == '.' || c == '_'))));
        if (!ok)
            return 0;
    }
    return 1;
}

/*
 * An ID number as read from a card or typed: a final lower-case x is read as X (as realname.c does), then
 * ch_id_number_check. `out` has 19 bytes. Returns 0, or CH_EINVAL with the reason in `why`. Shared with kiosk.c.
 */
int identity_id_normalize(const char *in, char out[19], const char **why)
{
    if (strlen(in) != 18) {
        *why = "must be 18 characters";
        return CH_EINVAL;
    }
    memcpy(out, in, 19);
    if (out[17] == 'x')
        out[17] = 'X';
    return ch_id_number_check(out, why);
}

/* A name without leading and trailing ASCII spaces, in call memory (as realname.c compares). Shared with kiosk.c. */
char *identity_name_trim(ch_call_t *call, const char *in)
{
    while (*in == ' ')
        ++in;
    size_t n = strlen(in);
    while (n > 0 && in[n - 1] == ' ')
        --n;
    char *out = ch_call_alloc(call, n + 1);
    memcpy(out, in, n);
    out[n] = '\0';
    return out;
}

/*
 * Characters of text shown to people (a name, a purpose): valid UTF-8 without control characters (a
 * protobuf body is not checked for UTF-8 by the decoder, and PostgreSQL would refuse it). Returns the
 * number of characters, or -1.
 */
static long text_chars(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    long n = 0;
    while (*p != '\0') {
        unsigned c = *p, len = c < 0x80             ? 1
                               : (c & 0xe0) == 0xc0 ? 2
                               : (c & 0xf0) == 0xe0 ? 3
                               : (c & 0xf8) == 0xf0 ? 4
                                                    : 0;
        if (len == 0 || (len == 1 && (c < 0x20 || c == 0x7f)) || (len == 2 && c < 0xc2) || (len == 4 && c > 0xf4))
            return -1;
        unsigned cp = len == 1 ? c : c & (0x7f >> len);
        for (unsigned i = 1; i < len; ++i) {
            if ((p[i] & 0xc0) != 0x80)
                return -1;
            cp = cp << 6 | (p[i] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
            return -1;
        p += len;
        ++n;
    }
    return n;
}

static char *hex_of(ch_call_t *call, const uint8_t *p, size_t len)
{
    char *s = ch_call_alloc(call, 2 * len + 1);
    ch_hex(p, len, s);
    return s;
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

/*
 * Fills `q` with the look-up of the citizen present with this ID number and name (the number has been
 * checked with ch_id_number_check; only its keyed hash leaves this function). Shared with kiosk.c.
 */
void identity_present_citizen_query(ch_call_t *call, const char *id_number, const char *name, ch_pg_query_t *q)
{
    uint8_t mac[32];
    ch_pii_hmac(ch_pii, "id", id_number, strlen(id_number), mac);
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = hex_of(call, mac, sizeof(mac));
    v[1] = name;
    *q = (ch_pg_query_t){&identity_stmt_present_citizen, v, NULL};
}

/*
 * The citizen id from a result of identity_stmt_present_citizen, or NULL after answering 422: the pair
 * does not match the registry (never saying which half), or no account is bound to that resident yet.
 * An account is created only by an SMS login (citizens.phone_hmac is required), so a citizen without one
 * first logs in once with their phone and binds their real name.
 */
const char *identity_present_citizen_or_respond(ch_call_t *call, PGresult *res)
{
    if (PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 1), "t") != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "the ID number and name do not match the population registry");
        return NULL;
    }
    if (PQgetisnull(res, 0, 0)) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION,
                "the citizen has no account yet: they log in once with their phone and bind their real name");
        return NULL;
    }
    return ch_call_strdup(call, PQgetvalue(res, 0, 0));
}

/* An attempt counter in Redis: INCR, with the window's expiry set by the first attempt, atomically. */
static const char limit_lua[] =
    "local n = redis.call('INCR', KEYS[1]) if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end return n";

static int limit_hit(ch_call_t *call, const char *key, int window_s, ch_call_redis_cb cb)
{
    const char *argv[5] = {"EVAL", limit_lua, "1", key, ch_call_printf(call, "%d", window_s)};
    return ch_call_redis(call, cb, 5, argv, NULL);
}

/* The count from limit_hit's reply, or -1 after answering 503 (Redis down: limits cannot be enforced). */
static long long limit_count_or_respond(ch_call_t *call, redisReply *reply, int err)
{
    if (err != 0 || reply == NULL || reply->type != REDIS_REPLY_INTEGER) {
        ch_fail_err(call, err != 0 ? err : CH_EUNAVAIL);
        return -1;
    }
    return reply->integer;
}

/* ---- POST /v1/staff/login ---- */

typedef Cityhall__Identity__V1__StaffLoginRequest StaffLoginRequest;

/* What the worker needs and what it finds (copied into the gateway's memory by ch_call_work). */
typedef struct staff_check {
    int known; /* an account was found; otherwise the dummy hash is verified and the answer is 401 */
    char hash[crypto_pwhash_STRBYTES];
    char password[STAFF_PASSWORD_MAX + 1];
    char totp[TOTP_DIGITS + 1];
    uint8_t sealed[STAFF_SEALED_MAX];
    size_t sealed_len;
    int64_t last_step;
    int64_t now;
    int password_ok; /* out */
    int totp_ok;     /* out: a valid code of a step after last_step */
    int64_t step;    /* out: the time step of the code */
} staff_check_t;

/* The handler's state across its callbacks (in call memory). */
typedef struct staff_login {
    char *staff_id, *dept, *hall;
    const char *role;
    char session_id[37];
    char refresh[64];
    int64_t expires_at;
} staff_login_t;

/* liboath's comparison callback (0 = equal), in constant time. */
static int totp_cmp(void *handle, const char *test_otp)
{
    const char *given = handle;
    if (strlen(given) != TOTP_DIGITS || strlen(test_otp) != TOTP_DIGITS)
        return 1;
    return sodium_memcmp(given, test_otp, TOTP_DIGITS) == 0 ? 0 : 1;
}

/* On a worker thread: argon2id, then the TOTP code (the secret is decrypted only here). */
static void staff_check_work(void *arg)
{
    staff_check_t *c = arg;
    pthread_once(&crypto_once, crypto_init);
    pthread_once(&dummy_once, dummy_init);
    c->password_ok =
        crypto_pwhash_str_verify(c->known ? c->hash : dummy_hash, c->password, strlen(c->password)) == 0 && c->known;
    sodium_memzero(c->password, sizeof(c->password));
    c->totp_ok = 0;
    if (!c->known)
        return;
    ch_buf_t secret = {0};
    if (ch_pii_decrypt(ch_pii, c->sealed, c->sealed_len, &secret) == 0) {
        int pos = 0;
        uint64_t counter = 0;
        int rc = oath_totp_validate3_callback(secret.base, secret.len, (time_t)c->now, TOTP_STEP_S, 0, TOTP_DIGITS,
                                              TOTP_WINDOW, &pos, &counter, totp_cmp, c->totp);
        if (rc >= 0) {
            c->step = (int64_t)counter;
            c->totp_ok = c->step > c->last_step;
        }
        sodium_memzero(secret.base, secret.len);
    }
    ch_buf_free(&secret);
}

static void on_staff_session(ch_call_t *call, ch_pg_result_t *r)
{
    staff_login_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ch_principal_t p = {0};
    p.role = ch_role_parse(st->role);
    p.subject = st->staff_id;
    p.session_id = st->session_id;
    p.dept = st->dept;
    p.hall = st->hall;
    p.expires_at = st->expires_at;
    identity_reply_tokens(call, &p, st->refresh, 0);
}

static void on_staff_accepted(ch_call_t *call, ch_pg_result_t *r)
{
    staff_login_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    if (PQntuples(r->res[0]) != 1) {
        /* a concurrent login used this code first, or locked the account meanwhile */
        ch_fail(call, CH_CODE_UNAUTHENTICATED, staff_wrong);
        return;
    }
    char hash[65];
    identity_uuid(st->session_id);
    identity_secret(st->refresh);
    identity_secret_hash(st->refresh, hash);
    st->expires_at = wall_now() + STAFF_SESSION_S;
    const char *expires = ch_call_printf(call, "%lld", (long long)st->expires_at);
    const char *sv[9] = {st->session_id, st->role, st->staff_id, expires, "staff-console",
                         NULL,           NULL,     st->dept,     st->hall};
    const char *rv[2] = {hash, st->session_id};
    ch_pg_query_t q[2] = {{&identity_stmt_session_insert, sv, NULL}, {&identity_stmt_refresh_insert, rv, NULL}};
    int ret = ch_call_pg(call, q, 2, on_staff_session);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_staff_failure_recorded(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err); /* the failure may not be counted: do not confirm it either */
        return;
    }
    ch_fail(call, CH_CODE_UNAUTHENTICATED, staff_wrong);
}

static void on_staff_checked(ch_call_t *call, void *arg)
{
    staff_check_t *c = arg;
    staff_login_t *st = ch_call_data(call);
    if (!c->known) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, staff_wrong);
        return;
    }
    int ret;
    if (c->password_ok && c->totp_ok) {
        const char *v[2] = {st->staff_id, ch_call_printf(call, "%lld", (long long)c->step)};
        ch_pg_query_t q = {&stmt_staff_accept, v, NULL};
        ret = ch_call_pg(call, &q, 1, on_staff_accepted);
    } else {
        const char *v[1] = {st->staff_id};
        ch_pg_query_t q = {&stmt_staff_failed, v, NULL};
        ret = ch_call_pg(call, &q, 1, on_staff_failure_recorded);
    }
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void staff_check_submit(ch_call_t *call, staff_check_t *c)
{
    int ret = ch_call_work(call, staff_check_work, on_staff_checked, c, sizeof(*c));
    sodium_memzero(c->password, sizeof(c->password));
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_staff_loaded(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    StaffLoginRequest *req = ch_call_body(call);
    staff_login_t *st = ch_call_data(call);
    staff_check_t c;
    memset(&c, 0, sizeof(c));
    c.now = wall_now();
    snprintf(c.password, sizeof(c.password), "%s", req->password);
    snprintf(c.totp, sizeof(c.totp), "%s", strlen(req->totp) == TOTP_DIGITS ? req->totp : "");
    sodium_memzero(req->password, strlen(req->password));
    PGresult *res = r->res[0];
    if (PQntuples(res) == 1) {
        long long locked_for = atoll(PQgetvalue(res, 0, 8));
        if (locked_for > 0) {
            sodium_memzero(c.password, sizeof(c.password));
            ch_fail(call, CH_CODE_RESOURCE_EXHAUSTED,
                    "too many failed logins: this account is locked for %lld more minute%s", (locked_for + 59) / 60,
                    (locked_for + 59) / 60 == 1 ? "" : "s");
            return;
        }
        const char *hash = PQgetvalue(res, 0, 1);
        c.sealed_len = unhex(PQgetvalue(res, 0, 2), c.sealed, sizeof(c.sealed));
        if (strlen(hash) < sizeof(c.hash) && c.sealed_len > 0) {
            c.known = 1;
            memcpy(c.hash, hash, strlen(hash) + 1);
            c.last_step = atoll(PQgetvalue(res, 0, 3));
            st->staff_id = ch_call_strdup(call, PQgetvalue(res, 0, 0));
            st->dept = ch_call_strdup(call, PQgetvalue(res, 0, 4));
            st->hall = ch_call_strdup(call, PQgetvalue(res, 0, 5));
            /* An account holding both roles logs in as staff: admin work is a separate, explicit step. */
            st->role = strcmp(PQgetvalue(res, 0, 6), "t") == 0 ? "staff" : "admin";
        }
    }
    staff_check_submit(call, &c);
}

void identity_staff_login(ch_call_t *call)
{
    StaffLoginRequest *req = ch_call_body(call);
    if (req->username[0] == '\0' || req->password[0] == '\0' || req->totp[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "username, password and totp are required");
        return;
    }
    if (strlen(req->password) > STAFF_PASSWORD_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "password: at most %d bytes", STAFF_PASSWORD_MAX);
        return;
    }
    staff_login_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    ch_call_set_data(call, st);
    if (!identity_ident_ok(req->username, 64, 0, 1)) {
        /* cannot exist: the same work and the same answer as an unknown name */
        staff_check_t c;
        memset(&c, 0, sizeof(c));
        snprintf(c.password, sizeof(c.password), "%s", req->password);
        staff_check_submit(call, &c);
        return;
    }
    const char *v[1] = {req->username};
    ch_pg_query_t q = {&stmt_staff_load, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_staff_loaded);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/staff/delegations ---- */

typedef Cityhall__Identity__V1__DelegationRequest DelegationRequest;
typedef Cityhall__Identity__V1__DelegationResponse DelegationResponse;

typedef struct delegation {
    char delegation_id[37];
    char session_id[37];
    const char *citizen_id;
    int64_t expires_at;
} delegation_t;

static void on_delegation_committed(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    DelegationRequest *req = ch_call_body(call);
    delegation_t *d = ch_call_data(call);
    const ch_principal_t *staff = ch_call_principal(call);
    /* the citizen's token: its `act` claim names the staff member, everything done with it records both */
    ch_principal_t p = {0};
    p.role = CH_ROLE_CITIZEN;
    p.subject = d->citizen_id;
    p.session_id = d->session_id;
    p.dept = staff->dept;
    p.hall = staff->hall;
    p.actor = staff->subject;
    p.expires_at = d->expires_at;
    /*
     * One token for the whole 15-minute delegation: it cannot be refreshed, so a 10-minute token would end the
     * delegation early. It dies with the session (logout with it, or revocation) like any other token.
     */
    ch_buf_t buf = {0};
    int64_t exp = 0;
    if (ch_auth_issue(&p, DELEGATION_TOKEN_S, &buf, &exp) != 0 || buf.len == 0) {
        ch_buf_free(&buf);
        ch_fail_err(call, CH_EINVAL);
        return;
    }
    DelegationResponse *resp = ch_call_alloc(call, sizeof(*resp));
    cityhall__identity__v1__delegation_response__init(resp);
    resp->access_token = ch_call_strdup(call, buf.base);
    ch_buf_free(&buf);
    int64_t left = exp - wall_now();
    resp->expires_in = (int32_t)(left < 0 ? 0 : left > DELEGATION_TOKEN_S ? DELEGATION_TOKEN_S : left);
    resp->citizen_id = (char *)d->citizen_id;
    resp->masked_name = ch_call_alloc(call, 64);
    ch_name_mask(req->name, resp->masked_name, 64);
    resp->delegation_id = d->delegation_id;
    ch_reply(call, 200, &resp->base);
}

static void on_delegation_citizen(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    const char *citizen_id = identity_present_citizen_or_respond(call, r->res[0]);
    if (citizen_id == NULL)
        return;
    DelegationRequest *req = ch_call_body(call);
    const ch_principal_t *staff = ch_call_principal(call);
    delegation_t *d = ch_call_data(call);
    d->citizen_id = citizen_id;
    identity_uuid(d->delegation_id);
    identity_uuid(d->session_id);
    d->expires_at = wall_now() + DELEGATION_S;
    const char *expires = ch_call_printf(call, "%lld", (long long)d->expires_at);
    const char *sv[9] = {d->session_id, "citizen",      citizen_id,  expires,    "delegation",
                         NULL,          staff->subject, staff->dept, staff->hall};
    const char *dv[6] = {d->delegation_id, staff->subject, citizen_id, req->purpose, expires, d->session_id};
    ch_pg_query_t q[3] = {{&identity_stmt_session_insert, sv, NULL}, {&stmt_delegation_insert, dv, NULL}};
    /* the call's principal is the staff member: the entry shows them as the actor */
    ch_audit_query(call, citizen_id, "delegation.open", req->purpose, &q[2]);
    int ret = ch_call_pg(call, q, 3, on_delegation_committed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_delegation_limit(ch_call_t *call, redisReply *reply, int err)
{
    long long n = limit_count_or_respond(call, reply, err);
    if (n < 0)
        return;
    if (n > DELEGATION_PER_MIN) {
        ch_fail(call, CH_CODE_RESOURCE_EXHAUSTED, "too many delegations opened in the last minute");
        return;
    }
    DelegationRequest *req = ch_call_body(call);
    ch_pg_query_t q;
    identity_present_citizen_query(call, req->id_number, req->name, &q);
    int ret = ch_call_pg(call, &q, 1, on_delegation_citizen);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void identity_delegation_open(ch_call_t *call)
{
    DelegationRequest *req = ch_call_body(call);
    const ch_principal_t *staff = ch_call_principal(call);
    const char *why = NULL;
    long purpose_chars = text_chars(req->purpose);
    if (purpose_chars < 1 || purpose_chars > 200) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "purpose: 1 to 200 characters of text, shown to the citizen");
        return;
    }
    req->name = identity_name_trim(call, req->name);
    if (req->name[0] == '\0' || strlen(req->name) > 64 || text_chars(req->name) < 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "name: 1 to 64 bytes of text");
        return;
    }
    if (req->id_number[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "id_number: required");
        return;
    }
    char *id = ch_call_alloc(call, 19);
    if (identity_id_normalize(req->id_number, id, &why) != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "id_number: %s", why);
        return;
    }
    req->id_number = id;
    delegation_t *d = ch_call_alloc(call, sizeof(*d));
    memset(d, 0, sizeof(*d));
    ch_call_set_data(call, d);
    int ret = limit_hit(call, ch_call_printf(call, "id:delegation:%s", staff->subject), 60, on_delegation_limit);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/auth/client-token ---- */

typedef Cityhall__Identity__V1__ClientTokenRequest ClientTokenRequest;

typedef struct client_login {
    char session_id[37];
    char *dept;
    int64_t expires_at;
} client_login_t;

static void on_client_session(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ClientTokenRequest *req = ch_call_body(call);
    client_login_t *cl = ch_call_data(call);
    ch_principal_t p = {0};
    p.role = CH_ROLE_DEPT;
    p.subject = req->client_id;
    p.session_id = cl->session_id;
    p.dept = cl->dept;
    p.expires_at = cl->expires_at;
    identity_reply_tokens(call, &p, NULL, 0);
}

static void on_client_loaded(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ClientTokenRequest *req = ch_call_body(call);
    PGresult *res = r->res[0];
    char given[65];
    identity_secret_hash(req->client_secret, given);
    sodium_memzero(req->client_secret, strlen(req->client_secret));
    /* the comparison costs the same whether the client exists or not */
    int known = PQntuples(res) == 1 && strlen(PQgetvalue(res, 0, 1)) == 64;
    const char *stored =
        known ? PQgetvalue(res, 0, 1) : "0000000000000000000000000000000000000000000000000000000000000000";
    int match = sodium_memcmp(given, stored, 64) == 0 && known;
    if (!match) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, client_wrong);
        return;
    }
    client_login_t *cl = ch_call_data(call);
    cl->dept = ch_call_strdup(call, PQgetvalue(res, 0, 0));
    identity_uuid(cl->session_id);
    cl->expires_at = wall_now() + CLIENT_SESSION_S;
    const char *expires = ch_call_printf(call, "%lld", (long long)cl->expires_at);
    const char *sv[9] = {cl->session_id, "dept", req->client_id, expires, "dept-client", NULL, NULL, cl->dept, NULL};
    ch_pg_query_t q = {&identity_stmt_session_insert, sv, NULL};
    int ret = ch_call_pg(call, &q, 1, on_client_session);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_client_limit(ch_call_t *call, redisReply *reply, int err)
{
    long long n = limit_count_or_respond(call, reply, err);
    if (n < 0)
        return;
    if (n > CLIENT_ATTEMPTS_PER_MIN) {
        ch_fail(call, CH_CODE_RESOURCE_EXHAUSTED, "too many token requests for this client; retry in a minute");
        return;
    }
    ClientTokenRequest *req = ch_call_body(call);
    const char *v[1] = {req->client_id};
    ch_pg_query_t q = {&stmt_client_load, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_client_loaded);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void identity_client_token(ch_call_t *call)
{
    ClientTokenRequest *req = ch_call_body(call);
    if (req->client_id[0] == '\0' || req->client_secret[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "client_id and client_secret are required");
        return;
    }
    if (!identity_ident_ok(req->client_id, 64, 1, 1)) {
        /* no such client can exist; nothing to count it against either */
        ch_fail(call, CH_CODE_UNAUTHENTICATED, client_wrong);
        return;
    }
    client_login_t *cl = ch_call_alloc(call, sizeof(*cl));
    memset(cl, 0, sizeof(*cl));
    ch_call_set_data(call, cl);
    int ret = limit_hit(call, ch_call_printf(call, "id:client-token:%s", req->client_id), 60, on_client_limit);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- commands: `cityhall staff add`, `cityhall client add` (off the loop: blocking libpq) ---- */

/* The value of `--name VALUE` in argv (from index 1), or NULL. */
static const char *arg_value(int argc, char **argv, const char *name)
{
    for (int i = 1; i + 1 < argc; ++i)
        if (strcmp(argv[i], name) == 0)
            return argv[i + 1];
    return NULL;
}

/* Refuses anything but `--name value` pairs with the known names. */
static int args_known(int argc, char **argv, const char *const *names, const char *cmd)
{
    for (int i = 1; i < argc; i += 2) {
        int ok = 0;
        for (const char *const *n = names; *n != NULL; ++n)
            ok |= strcmp(argv[i], *n) == 0;
        if (!ok || i + 1 >= argc) {
            fprintf(stderr, "%s: unexpected argument \"%s\"\n", cmd, argv[i]);
            return 0;
        }
    }
    return 1;
}

static PGconn *connect_or_complain(const ch_config_t *config, const char *cmd)
{
    PGconn *conn = PQconnectdb(config->pg_conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "%s: could not connect to PostgreSQL: %s", cmd, PQerrorMessage(conn));
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

static int pii_or_complain(const ch_config_t *config, const char *cmd)
{
    char err[256];
    if (ch_pii == NULL && ch_pii_init(config->var_dir, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: could not load the data key (run `cityhall keys init` first): %s\n", cmd, err);
        return -1;
    }
    return 0;
}

/* A base32 (RFC 4648, no padding) string of `len` bytes into `out` (cap >= 8 * len / 5 + 2). */
static void base32(const uint8_t *in, size_t len, char *out, size_t cap)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    size_t o = 0;
    unsigned buf = 0;
    int bits = 0;
    for (size_t i = 0; i < len; ++i) {
        buf = (buf << 8) | in[i];
        bits += 8;
        while (bits >= 5 && o + 1 < cap) {
            out[o++] = alphabet[(buf >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    if (bits > 0 && o + 1 < cap)
        out[o++] = alphabet[(buf << (5 - bits)) & 31];
    out[o] = '\0';
}

/* A random password: four groups of five characters from an alphabet without look-alikes (~115 bits). */
static void random_password(char *out, size_t cap)
{
    static const char alphabet[] = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    size_t o = 0;
    for (int g = 0; g < 4; ++g) {
        if (g > 0 && o + 1 < cap)
            out[o++] = '-';
        for (int i = 0; i < 5 && o + 1 < cap; ++i)
            out[o++] = alphabet[randombytes_uniform(sizeof(alphabet) - 1)];
    }
    out[o] = '\0';
}

/* "staff,admin" into a PostgreSQL array literal; NULL for anything else. */
static const char *roles_array(const char *roles)
{
    if (strcmp(roles, "staff") == 0)
        return "{staff}";
    if (strcmp(roles, "admin") == 0)
        return "{admin}";
    if (strcmp(roles, "staff,admin") == 0 || strcmp(roles, "admin,staff") == 0)
        return "{staff,admin}";
    return NULL;
}

/*
 * Inserts a staff account. Returns 1 when created, 0 when `if_absent` and the username exists (nothing
 * changed: the demo seed keeps the printed values), -1 on error (printed).
 */
static int staff_insert(PGconn *conn, const char *cmd, const char *username, const char *password,
                        const uint8_t secret[TOTP_SECRET_BYTES], const char *dept, const char *hall, const char *roles,
                        int if_absent)
{
    pthread_once(&crypto_once, crypto_init);
    if (if_absent) {
        const char *v[1] = {username};
        PGresult *res =
            PQexecParams(conn, "SELECT 1 FROM staff_accounts WHERE username = $1", 1, NULL, v, NULL, NULL, 0);
        int ok = PQresultStatus(res) == PGRES_TUPLES_OK, exists = ok && PQntuples(res) == 1;
        if (!ok)
            fprintf(stderr, "%s: %s", cmd, PQerrorMessage(conn));
        PQclear(res);
        if (!ok)
            return -1;
        if (exists)
            return 0;
    }
    char hash[crypto_pwhash_STRBYTES];
    if (crypto_pwhash_str(hash, password, strlen(password), crypto_pwhash_OPSLIMIT_INTERACTIVE,
                          crypto_pwhash_MEMLIMIT_INTERACTIVE) != 0) {
        fprintf(stderr, "%s: could not hash the password (out of memory)\n", cmd);
        return -1;
    }
    ch_buf_t sealed = {0};
    ch_pii_encrypt(ch_pii, secret, TOTP_SECRET_BYTES, &sealed);
    char *sealed_hex = malloc(2 * sealed.len + 3);
    if (sealed_hex == NULL)
        abort();
    memcpy(sealed_hex, "\\x", 2);
    ch_hex((const uint8_t *)sealed.base, sealed.len, sealed_hex + 2);
    char staff_id[37];
    identity_uuid(staff_id);
    const char *v[7] = {staff_id, username, hash, sealed_hex, dept, hall, roles};
    PGresult *res =
        PQexecParams(conn,
                     "INSERT INTO staff_accounts (staff_id, username, password_hash, totp_secret_enc, dept, "
                     "hall, roles) VALUES ($1::uuid, $2, $3, $4::bytea, $5, $6, $7::text[]) "
                     "ON CONFLICT (username) DO NOTHING RETURNING staff_id",
                     7, NULL, v, NULL, NULL, 0);
    int ret;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "%s: could not create the account: %s", cmd, PQerrorMessage(conn));
        ret = -1;
    } else if (PQntuples(res) == 0) {
        ret = 0;
    } else {
        ret = 1;
    }
    PQclear(res);
    free(sealed_hex);
    ch_buf_free(&sealed);
    sodium_memzero(hash, sizeof(hash));
    return ret;
}

static void print_staff(const char *username, const char *password, const uint8_t secret[TOTP_SECRET_BYTES],
                        const char *dept, const char *hall, const char *roles)
{
    char b32[64];
    base32(secret, TOTP_SECRET_BYTES, b32, sizeof(b32));
    printf("  username:     %s\n"
           "  password:     %s\n"
           "  totp secret:  %s\n"
           "  otpauth uri:  otpauth://totp/cityhall:%s?secret=%s&issuer=cityhall&algorithm=SHA1&digits=%d&period=%d\n"
           "  dept:         %s\n"
           "  hall:         %s\n"
           "  roles:        %s\n",
           username, password, b32, username, b32, TOTP_DIGITS, TOTP_STEP_S, dept, hall, roles);
}

int identity_cmd_staff_add(const ch_config_t *config, int argc, char **argv)
{
    static const char cmd[] = "staff add";
    static const char *const names[] = {"--username", "--dept", "--hall", "--roles", NULL};
    if (!args_known(argc, argv, names, cmd))
        return 2;
    const char *username = arg_value(argc, argv, "--username"), *dept = arg_value(argc, argv, "--dept"),
               *hall = arg_value(argc, argv, "--hall"), *roles = arg_value(argc, argv, "--roles");
    if (username == NULL || dept == NULL || hall == NULL) {
        fprintf(stderr, "usage: cityhall staff add --username U --dept D --hall H [--roles staff,admin]\n");
        return 2;
    }
    const char *roles_pg = roles_array(roles != NULL ? roles : "staff");
    if (!identity_ident_ok(username, 64, 0, 1) || !identity_ident_ok(dept, 64, 0, 0) ||
        !identity_ident_ok(hall, 64, 0, 0) || roles_pg == NULL) {
        fprintf(stderr,
                "%s: username is 2-64 of a-z 0-9 . _ -; dept and hall 1-64 of a-z 0-9 -; "
                "roles one of staff, admin, staff,admin\n",
                cmd);
        return 2;
    }
    if (pii_or_complain(config, cmd) != 0)
        return 1;
    pthread_once(&crypto_once, crypto_init);
    PGconn *conn = connect_or_complain(config, cmd);
    if (conn == NULL)
        return 1;
    char password[32];
    uint8_t secret[TOTP_SECRET_BYTES];
    random_password(password, sizeof(password));
    randombytes_buf(secret, sizeof(secret));
    int ret = staff_insert(conn, cmd, username, password, secret, dept, hall, roles_pg, 0);
    PQfinish(conn);
    if (ret == 0)
        fprintf(stderr, "%s: the username %s is taken\n", cmd, username);
    if (ret != 1)
        return 1;
    printf("staff account created; the password and TOTP secret are shown only now:\n");
    print_staff(username, password, secret, dept, hall, roles != NULL ? roles : "staff");
    sodium_memzero(password, sizeof(password));
    sodium_memzero(secret, sizeof(secret));
    return 0;
}

static int client_insert(PGconn *conn, const char *cmd, const char *client_id, const char *secret, const char *dept,
                         int if_absent)
{
    char hash[65];
    identity_secret_hash(secret, hash);
    const char *v[3] = {client_id, dept, hash};
    PGresult *res = PQexecParams(conn,
                                 "INSERT INTO dept_clients (client_id, dept, secret_hash) VALUES ($1, $2, $3) "
                                 "ON CONFLICT (client_id) DO NOTHING RETURNING client_id",
                                 3, NULL, v, NULL, NULL, 0);
    int ret = PQresultStatus(res) != PGRES_TUPLES_OK ? -1 : PQntuples(res) == 1 ? 1 : 0;
    if (ret < 0)
        fprintf(stderr, "%s: could not register the client: %s", cmd, PQerrorMessage(conn));
    else if (ret == 0 && !if_absent)
        fprintf(stderr, "%s: the client id %s is taken\n", cmd, client_id);
    PQclear(res);
    return ret;
}

int identity_cmd_client_add(const ch_config_t *config, int argc, char **argv)
{
    static const char cmd[] = "client add";
    static const char *const names[] = {"--client-id", "--dept", NULL};
    if (!args_known(argc, argv, names, cmd))
        return 2;
    const char *client_id = arg_value(argc, argv, "--client-id"), *dept = arg_value(argc, argv, "--dept");
    if (client_id == NULL || dept == NULL) {
        fprintf(stderr, "usage: cityhall client add --client-id C --dept D\n");
        return 2;
    }
    if (!identity_ident_ok(client_id, 64, 1, 1) || !identity_ident_ok(dept, 64, 0, 0)) {
        fprintf(stderr, "%s: client id is 1-64 of A-Z a-z 0-9 . _ -; dept 1-64 of a-z 0-9 -\n", cmd);
        return 2;
    }
    PGconn *conn = connect_or_complain(config, cmd);
    if (conn == NULL)
        return 1;
    char secret[64];
    identity_secret(secret);
    int ret = client_insert(conn, cmd, client_id, secret, dept, 0);
    PQfinish(conn);
    if (ret != 1)
        return 1;
    printf("department client registered; the secret is shown only now:\n"
           "  client id:      %s\n"
           "  client secret:  %s\n"
           "  dept:           %s\n",
           client_id, secret, dept);
    sodium_memzero(secret, sizeof(secret));
    return 0;
}

/* ---- demo data for `cityhall seed` (C's seed.c passes its open connection) ---- */

/*
 * SYNTHETIC DEMO CREDENTIALS. Fixed so that what `cityhall seed` prints stays valid across runs; the
 * TOTP secret of each account is SHA-256("cityhall demo totp:" + username), first 20 bytes. Never use
 * them outside a demo: anyone who reads this file can log in as these accounts.
 */
static const struct {
    const char *username, *password, *dept, *hall, *roles, *label;
} demo_staff[] = {
    {"zhang.hukou", "demo-Hukou-2468", "police-hukou", "tianhe-hall", "{staff}", "公安户籍 household registration"},
    {"li.health", "demo-Health-1357", "health", "tianhe-hall", "{staff}", "卫健 health commission"},
    {"wang.medins", "demo-Medins-8642", "medical-insurance", "tianhe-hall", "{staff}", "医保 medical insurance"},
    {"chen.hrss", "demo-Hrss-9753", "hrss", "tianhe-hall", "{staff}", "人社 human resources & social security"},
    {"admin", "demo-Admin-0000", "platform", "tianhe-hall", "{admin}", "platform administrator"},
};
static const char demo_client_id[] = "health-authority";
static const char demo_client_dept[] = "health";
static const char demo_client_secret[] = "demo-health-authority-secret-not-for-production";

static void demo_totp_secret(const char *username, uint8_t out[TOTP_SECRET_BYTES])
{
    uint8_t digest[crypto_hash_sha256_BYTES];
    crypto_hash_sha256_state st;
    crypto_hash_sha256_init(&st);
    crypto_hash_sha256_update(&st, (const unsigned char *)"cityhall demo totp:", 19);
    crypto_hash_sha256_update(&st, (const unsigned char *)username, strlen(username));
    crypto_hash_sha256_final(&st, digest);
    memcpy(out, digest, TOTP_SECRET_BYTES);
}

int identity_seed_staff(const ch_config_t *config, void *pgconn)
{
    static const char cmd[] = "seed";
    PGconn *conn = pgconn;
    if (pii_or_complain(config, cmd) != 0)
        return 1;
    pthread_once(&crypto_once, crypto_init);
    printf(
        "\ncounter staff of the service hall tianhe-hall (SYNTHETIC DEMO CREDENTIALS: fixed, for trying the API "
        "only)\n"
        "  log in: POST /v1/staff/login {\"username\", \"password\", \"totp\"}; the 6-digit code from any TOTP app\n"
        "  (scan the otpauth URI) or `oathtool --totp -b <totp secret>` (Debian package oathtool); a code works once.\n"
        "  act for a citizen at the counter (帮办代办) with the staff token:\n"
        "    POST /v1/staff/delegations {\"id_number\", \"name\", \"purpose\"} -> a 15-minute citizen token with an "
        "act claim\n");
    for (size_t i = 0; i < sizeof(demo_staff) / sizeof(demo_staff[0]); ++i) {
        uint8_t secret[TOTP_SECRET_BYTES];
        demo_totp_secret(demo_staff[i].username, secret);
        if (staff_insert(conn, cmd, demo_staff[i].username, demo_staff[i].password, secret, demo_staff[i].dept,
                         demo_staff[i].hall, demo_staff[i].roles, 1) < 0)
            return 1;
        printf("\n  -- %s\n", demo_staff[i].label);
        char roles[16];
        snprintf(roles, sizeof(roles), "%.*s", (int)strlen(demo_staff[i].roles) - 2, demo_staff[i].roles + 1);
        print_staff(demo_staff[i].username, demo_staff[i].password, secret, demo_staff[i].dept, demo_staff[i].hall,
                    roles);
    }
    if (client_insert(conn, cmd, demo_client_id, demo_client_secret, demo_client_dept, 1) < 0)
        return 1;
    printf("\nhealth-authority department client (SYNTHETIC DEMO CREDENTIAL)\n"
           "  client id:      %s\n"
           "  client secret:  %s\n"
           "  dept:           %s\n"
           "  token: POST /v1/auth/client-token {\"client_id\", \"client_secret\"} -> a dept token (1 h session)\n",
           demo_client_id, demo_client_secret, demo_client_dept);
    return 0;
}
