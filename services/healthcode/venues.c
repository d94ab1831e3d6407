/* Venues (场所码), check-ins written by group commit, confirmed cases and their close contacts, demo venues. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <jansson.h>
#include <libpq-fe.h>
#include "cityhall/batcher.h"
#include "healthcode.h"
#include "venues.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"

typedef Cityhall__Healthcode__V1__CreateVenueRequest CreateVenueRequest;
typedef Cityhall__Healthcode__V1__Venue Venue;
typedef Cityhall__Healthcode__V1__CheckinRequest CheckinRequest;
typedef Cityhall__Healthcode__V1__CheckinResponse CheckinResponse;
typedef Cityhall__Healthcode__V1__ConfirmedCase ConfirmedCase;
typedef Cityhall__Healthcode__V1__ConfirmedCaseResponse ConfirmedCaseResponse;
typedef Google__Protobuf__Timestamp Timestamp;

#define VENUE_NAME_MAX    100 /* characters */
#define VENUE_ADDRESS_MAX 200
#define VENUE_TOKEN_TYP   "venue+jwt"

/*
 * Close contact: checked in at a venue within CONTACT_WINDOW of a confirmed case's check-in there, in the 14 days up
 * to the confirmation (hc_case_contacts in sql/migrations/0007_healthcode_venues.sql).
 */
#define CONTACT_WINDOW "2 hours"
/* A confirmation time later than this in the future is refused (clock skew between systems is tolerated). */
#define CASE_FUTURE_SKEW_S 300
/* The contact count the answer states is re-checked when it commits; a check-in arriving in between: read again. */
#define CASE_ATTEMPTS 3

/*
 * Group commit of check-ins, per loop thread (gateway/batcher.c): a check-in is queued once its answer is ready and
 * goes to PostgreSQL with the others of its batch as one multi-row INSERT; each request is answered only after the
 * batch holding its row committed.
 */
#define CHECKIN_BATCH_MAX         256
#define CHECKIN_QUEUE_MAX         4096 /* rows waiting per thread; beyond it: 503 */
#define CHECKIN_INFLIGHT_PER_CONN 2
#define CHECKIN_WINDOW_MS         2

/* Venues known to exist, per thread (venues are never deleted). Cleared when half full. */
#define VENUE_CACHE_SLOTS 8192

/* ---- statements ---- */

/* $1 venue_id, $2 name, $3 region, $4 address, $5 created_by (staff id). */
static const ch_pg_stmt_t stmt_venue_insert = {
    "hc_venue_insert",
    "INSERT INTO venues (venue_id, name, region, address, created_by) VALUES ($1::uuid, $2, $3, $4, $5::uuid)", 5};

/* $1 venue_id: one row when the venue exists. */
static const ch_pg_stmt_t stmt_venue_exists = {"hc_venue_exists", "SELECT 1 FROM venues WHERE venue_id = $1::uuid", 1};

/*
 * One batch of check-ins without Idempotency-Keys. Arrays, one element per check-in: $1 checkin ids, $2 venue ids,
 * $3 resident ids, $4 times (Unix microseconds, made by the gateway: the answer states them before the commit).
 */
static const ch_pg_stmt_t stmt_checkin_batch = {
    "hc_checkin_batch",
    "INSERT INTO checkins (checkin_id, venue_id, resident_id, at) "
    "SELECT c, v, r, timestamptz 'epoch' + u * interval '1 microsecond' "
    "FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[]) AS t(c, v, r, u)",
    4};

/*
 * The same with the Idempotency-Key claims of the calls that carry one ($5..$10: the six values of
 * ch_call_idempotency_claim per check-in, NULL for a call without a key), claimed in the same transaction. A key
 * claimed already (a retry racing its original, here or on another gateway) is skipped, not an error, and so is
 * its check-in; the statement returns the 1-based positions of those, which are answered by replaying the stored
 * answer. No key appears twice in one batch (the batcher holds the second back).
 */
static const ch_pg_stmt_t stmt_checkin_batch_idem = {
    "hc_checkin_batch_idem",
    "WITH i AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], "
    "             $7::text[], $8::text[], $9::int[], $10::text[]) WITH ORDINALITY "
    "             AS t(c, v, r, u, scope, key, route, hash, status, resp, n)), "
    "k AS (INSERT INTO idempotency_keys (scope, key, route, request_hash, status, response) "
    "      SELECT scope, key, route, decode(hash, 'hex'), status, decode(resp, 'hex') FROM i WHERE key IS NOT NULL "
    "      ON CONFLICT (scope, key) DO NOTHING RETURNING scope, key), "
    "w AS (INSERT INTO checkins (checkin_id, venue_id, resident_id, at) "
    "      SELECT c, v, r, timestamptz 'epoch' + u * interval '1 microsecond' FROM i "
    "      WHERE key IS NULL OR EXISTS (SELECT 1 FROM k WHERE k.scope = i.scope AND k.key = i.key)) "
    "SELECT n FROM i WHERE key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM k WHERE k.scope = i.scope AND k.key = i.key)",
    10};

/*
 * The resident of a confirmed case (by ID hash) and how many close contacts its check-ins reveal now.
 * $1 id_hmac (bytea), $2 confirmed_at (Unix microseconds), $3 window.
 */
static const ch_pg_stmt_t stmt_case_read = {
    "hc_case_read",
    "SELECT r.resident_id, (SELECT count(*) FROM hc_case_contacts(r.resident_id, "
    "       timestamptz 'epoch' + $2::bigint * interval '1 microsecond', $3::interval)) "
    "FROM registry_residents r WHERE r.id_hmac = $1::bytea",
    3};

/*
 * Records the case, its positive test, the close-contact marks and the recomputes they need, in one transaction
 * (hc_confirmed_case_apply, 0007); fails with SQLSTATE CHRTY when the contacts are no longer the $6 counted.
 * $1 case_id, $2 resident_id, $3 confirmed_at (Unix microseconds), $4 window, $5 reporting client, $6 expected.
 */
static const ch_pg_stmt_t stmt_case_apply = {
    "hc_case_apply",
    "SELECT hc_confirmed_case_apply($1::uuid, $2::bigint, timestamptz 'epoch' + $3::bigint * interval '1 microsecond', "
    "$4::interval, $5, $6::int)",
    6};

/* ---- small helpers ---- */

/* Random bytes from a per-thread buffer refilled by getrandom(2) (check-in ids are made at request rate). */
static void random_bytes(uint8_t *out, size_t n)
{
    static __thread uint8_t pool[4096];
    static __thread size_t left;
    while (n > 0) {
        if (left == 0) {
            size_t got = 0;
            while (got < sizeof(pool)) {
                ssize_t r = getrandom(pool + got, sizeof(pool) - got, 0);
                if (r < 0 && errno != EINTR)
                    abort();
                if (r > 0)
                    got += (size_t)r;
            }
            left = sizeof(pool);
        }
        size_t take = n < left ? n : left;
        memcpy(out, pool + sizeof(pool) - left, take);
        memset(pool + sizeof(pool) - left, 0, take);
        left -= take;
        out += take;
        n -= take;
    }
}

void hc_uuid_format(const uint8_t b[16], char out[37])
{
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    for (int i = 0; i < 16; ++i) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *o++ = '-';
        *o++ = hex[b[i] >> 4];
        *o++ = hex[b[i] & 15];
    }
    *o = '\0';
}

/* A random UUID (version 4). */
void hc_uuid_v4(char out[37])
{
    uint8_t b[16];
    random_bytes(b, sizeof(b));
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    hc_uuid_format(b, out);
}

/* A time-ordered UUID (version 7, RFC 9562): 48 bits of Unix milliseconds, then random bits. */
static void uuid_v7(int64_t unix_us, char out[37])
{
    uint8_t b[16];
    uint64_t ms = (uint64_t)(unix_us / 1000);
    random_bytes(b + 6, 10);
    for (int i = 0; i < 6; ++i)
        b[i] = (uint8_t)(ms >> (40 - 8 * i));
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x70);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    hc_uuid_format(b, out);
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

/* Parses the canonical 8-4-4-4-12 form (either case) into 16 bytes; returns 0 or -1. */
int hc_uuid_parse(const char *s, uint8_t out[16])
{
    if (s == NULL || strlen(s) != 36)
        return -1;
    for (int i = 0, k = 0; i < 36; ++i) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return -1;
            continue;
        }
        int hi = hexval((unsigned char)s[i]), lo = hexval((unsigned char)s[i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[k++] = (uint8_t)(hi << 4 | lo);
        ++i;
    }
    return 0;
}

int64_t hc_unix_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

Timestamp *hc_timestamp_us(ch_call_t *call, int64_t us)
{
    Timestamp *ts = ch_call_alloc(call, sizeof(*ts));
    google__protobuf__timestamp__init(ts);
    ts->seconds = us / 1000000;
    ts->nanos = (int32_t)(us % 1000000) * 1000;
    if (ts->nanos < 0) {
        ts->seconds -= 1;
        ts->nanos += 1000000000;
    }
    return ts;
}

/*
 * Counts the characters of a UTF-8 string; -1 when it is not valid UTF-8 (overlong forms, surrogates and code
 * points past U+10FFFF included) or holds a control character (newlines are allowed when `newlines`).
 */
long hc_text_chars(const char *s, int newlines)
{
    const unsigned char *p = (const unsigned char *)s;
    long n = 0;
    while (*p != 0) {
        uint32_t c = *p;
        int extra;
        if (c < 0x80) {
            if ((c < 0x20 && !(newlines && (c == '\n' || c == '\r' || c == '\t'))) || c == 0x7f)
                return -1;
            extra = 0;
        } else if ((c & 0xe0) == 0xc0) {
            c &= 0x1f, extra = 1;
        } else if ((c & 0xf0) == 0xe0) {
            c &= 0x0f, extra = 2;
        } else if ((c & 0xf8) == 0xf0) {
            c &= 0x07, extra = 3;
        } else {
            return -1;
        }
        for (int i = 1; i <= extra; ++i) {
            if ((p[i] & 0xc0) != 0x80)
                return -1;
            c = c << 6 | (p[i] & 0x3f);
        }
        if ((extra == 1 && c < 0x80) || (extra == 2 && c < 0x800) || (extra == 3 && c < 0x10000) || c > 0x10ffff ||
            (c >= 0xd800 && c <= 0xdfff) || (c >= 0x80 && c < 0xa0))
            return -1;
        p += extra + 1;
        ++n;
    }
    return n;
}

/* Copies `in` without leading and trailing ASCII spaces into the call's memory. */
static char *trimmed(ch_call_t *call, const char *in)
{
    while (*in == ' ')
        ++in;
    size_t n = strlen(in);
    while (n > 0 && in[n - 1] == ' ')
        --n;
    char *s = ch_call_alloc(call, n + 1);
    memcpy(s, in, n);
    s[n] = '\0';
    return s;
}

/* Appends one element of a PostgreSQL array literal: NULL, or the value double-quoted with " and \ escaped. */
static void array_elem(ch_buf_t *b, const char *v)
{
    if (b->len > 1)
        ch_buf_append(b, ",", 1);
    if (v == NULL) {
        ch_buf_append(b, "NULL", 4);
        return;
    }
    ch_buf_reserve(b, strlen(v) * 2 + 2);
    b->base[b->len++] = '"';
    for (const char *p = v; *p != '\0'; ++p) {
        if (*p == '"' || *p == '\\')
            b->base[b->len++] = '\\';
        b->base[b->len++] = *p;
    }
    b->base[b->len++] = '"';
    b->base[b->len] = '\0';
}

/* Appends an element that needs no quoting (digits, a UUID). */
static void array_raw(ch_buf_t *b, const char *v, size_t len)
{
    if (b->len > 1)
        ch_buf_append(b, ",", 1);
    ch_buf_append(b, v, len);
}

/* ---- the venue QR: a signed token (keyring loaded once at start-up) ---- */

static ch_keyring_t *venue_ring;

static int venue_ring_load(const ch_config_t *config, char *err, size_t errlen)
{
    char dir[512];
    snprintf(dir, sizeof(dir), "%s/keys/healthcode", config->var_dir);
    venue_ring = ch_keyring_load(dir, err, errlen);
    return venue_ring != NULL ? 0 : -1;
}

/*
 * The text of a venue's printed QR code: a compact JWS (ES256, typ venue+jwt, the health-code keyring, whose public
 * keys GET /v1/health/keys serves) with claims {iss, sub: venue_id, nm: name, rg: region, iat}. It has no expiry:
 * a printed code stays on the door; a forged one does not verify. Appends to `out`; returns 0 or CH_EINVAL.
 */
static int venue_token(const char *venue_id, const char *name, const char *region, ch_buf_t *out)
{
    json_t *claims = json_pack("{s:s, s:s, s:s, s:s, s:I}", "iss", "cityhall", "sub", venue_id, "nm", name, "rg",
                               region, "iat", (json_int_t)time(NULL));
    if (claims == NULL)
        return CH_EINVAL;
    char *text = json_dumps(claims, JSON_COMPACT);
    json_decref(claims);
    if (text == NULL)
        return CH_EINVAL;
    int ret = ch_jws_sign(venue_ring, VENUE_TOKEN_TYP, text, strlen(text), out);
    free(text);
    return ret;
}

/* ---- POST /v1/venues ---- */

static void on_venue_created(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ch_reply(call, 201, ch_call_data(call));
}

void hc_venue_create(ch_call_t *call)
{
    CreateVenueRequest *req = ch_call_body(call);
    const ch_principal_t *p = ch_call_principal(call);
    const char *name = trimmed(call, req->name), *address = trimmed(call, req->address);
    long name_chars = hc_text_chars(name, 0), address_chars = hc_text_chars(address, 0);
    if (name_chars <= 0 || name_chars > VENUE_NAME_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "name: %s",
                name_chars == 0  ? "required"
                : name_chars < 0 ? "must be text without control characters"
                                 : "at most 100 characters");
        return;
    }
    if (address_chars <= 0 || address_chars > VENUE_ADDRESS_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "address: %s",
                address_chars == 0  ? "required"
                : address_chars < 0 ? "must be text without control characters"
                                    : "at most 200 characters");
        return;
    }
    const char *region = req->region;
    int region_ok = strlen(region) == 6 && region[0] >= '1' && region[0] <= '8';
    for (int i = 0; region_ok && i < 6; ++i)
        region_ok = region[i] >= '0' && region[i] <= '9';
    if (!region_ok) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "region: must be a 6-digit division code (GB/T 2260), e.g. 440106");
        return;
    }
    uint8_t staff[16];
    if (hc_uuid_parse(p->subject, staff) != 0) {
        ch_fail(call, CH_CODE_PERMISSION_DENIED, "only a staff account can register venues");
        return;
    }

    Venue *v = ch_call_alloc(call, sizeof(*v));
    cityhall__healthcode__v1__venue__init(v);
    char *id = ch_call_alloc(call, 37);
    hc_uuid_v4(id);
    v->venue_id = id;
    v->name = (char *)name;
    v->region = ch_call_strdup(call, region);
    v->address = (char *)address;
    ch_buf_t token = {0};
    if (venue_token(id, name, region, &token) != 0) {
        ch_buf_free(&token);
        ch_fail(call, CH_CODE_INTERNAL, "could not sign the venue code");
        return;
    }
    v->qr_text = ch_call_strdup(call, token.base);
    ch_buf_free(&token);
    ch_call_set_data(call, v);

    const char **vals = ch_call_alloc(call, 5 * sizeof(*vals));
    vals[0] = id;
    vals[1] = name;
    vals[2] = v->region;
    vals[3] = address;
    vals[4] = p->subject;
    ch_pg_query_t q = {&stmt_venue_insert, vals, NULL};
    int ret = ch_call_pg_commit(call, &q, 1, 201, &v->base, on_venue_created);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- venues known to exist (per thread) ---- */

typedef struct venue_cache {
    unsigned used;
    uint8_t keys[VENUE_CACHE_SLOTS][16];
    uint8_t full[VENUE_CACHE_SLOTS];
} venue_cache_t;

static __thread venue_cache_t *venue_cache;

static size_t venue_slot(const uint8_t id[16])
{
    uint64_t a, b;
    memcpy(&a, id, 8);
    memcpy(&b, id + 8, 8);
    uint64_t h = (a ^ (b * 0x9E3779B97F4A7C15ULL)) * 0xff51afd7ed558ccdULL;
    return (size_t)(h >> 32) % VENUE_CACHE_SLOTS;
}

static int venue_known(const uint8_t id[16])
{
    if (venue_cache == NULL)
        return 0;
    for (size_t i = venue_slot(id), k = 0; k < VENUE_CACHE_SLOTS && venue_cache->full[i];
         ++k, i = (i + 1) % VENUE_CACHE_SLOTS)
        if (memcmp(venue_cache->keys[i], id, 16) == 0)
            return 1;
    return 0;
}

static void venue_remember(const uint8_t id[16])
{
    if (venue_cache == NULL) {
        venue_cache = calloc(1, sizeof(*venue_cache));
        if (venue_cache == NULL)
            abort();
    }
    if (venue_known(id))
        return;
    if (venue_cache->used >= VENUE_CACHE_SLOTS / 2) {
        /* a memory bound, not an eviction policy: the venues in use come back at one query each */
        memset(venue_cache->full, 0, sizeof(venue_cache->full));
        venue_cache->used = 0;
    }
    size_t i = venue_slot(id);
    while (venue_cache->full[i])
        i = (i + 1) % VENUE_CACHE_SLOTS;
    memcpy(venue_cache->keys[i], id, 16);
    venue_cache->full[i] = 1;
    ++venue_cache->used;
}

/* ---- check-ins: the group commit (gateway/batcher.c) ---- */

/* One check-in from its queueing until its batch committed. Lives in malloc'd memory: its request may die first. */
typedef struct checkin {
    ch_call_t *call;       /* held (ch_batcher_push) until answered or dropped; answered only if not ch_call_gone */
    CheckinResponse *resp; /* in the call's memory (valid while the request is) */
    const char *claim[6];  /* Idempotency-Key claim (ch_call_idempotency_claim), claim[1] NULL without a key */
    int64_t resident_id;
    int64_t at_us;
    char id[37];
    char venue[37];
} checkin_t;

typedef struct checkin_batch {
    ch_batcher_t *b;
    unsigned n;
    checkin_t *e[CHECKIN_BATCH_MAX];
} checkin_batch_t;

static __thread ch_batcher_t *batcher;

/* Lets go of an entry: its call (answered or gone) and its memory. */
static void checkin_free(checkin_t *e)
{
    ch_call_unhold(e->call);
    free(e);
}

static void checkin_drop(void *arg)
{
    checkin_free(arg);
}

static void checkin_fail(void *arg, int err)
{
    checkin_t *e = arg;
    if (!ch_call_gone(e->call))
        ch_fail_err(e->call, err);
    checkin_free(e);
}

static void checkin_answer(checkin_t *e, int replay)
{
    if (!ch_call_gone(e->call)) {
        if (replay)
            ch_call_idempotency_replay(e->call); /* its key was claimed first by another request */
        else
            ch_reply(e->call, 201, &e->resp->base);
    }
    checkin_free(e);
}

static ch_call_t *checkin_call(void *arg)
{
    return ((checkin_t *)arg)->call;
}

/* A second request with a key already in a batch waits for the next one (where its claim then conflicts). */
static int checkin_conflicts(const void *a, const void *b)
{
    const checkin_t *x = a, *y = b;
    return x->claim[1] != NULL && y->claim[1] != NULL && strcmp(x->claim[0], y->claim[0]) == 0 &&
           strcmp(x->claim[1], y->claim[1]) == 0;
}

static void on_batch_committed(void *arg, ch_pg_result_t *r)
{
    checkin_batch_t *batch = arg;
    ch_batcher_t *b = batch->b;
    if (r->err != 0) {
        for (unsigned i = 0; i < batch->n; ++i)
            checkin_fail(batch->e[i], r->err);
    } else {
        /* the idempotent variant lists the (1-based) positions whose key another request had claimed */
        uint8_t replay[CHECKIN_BATCH_MAX] = {0};
        PGresult *res = r->res[0];
        for (int row = 0; PQresultStatus(res) == PGRES_TUPLES_OK && row < PQntuples(res); ++row) {
            long n = strtol(PQgetvalue(res, row, 0), NULL, 10);
            if (n >= 1 && n <= (long)batch->n)
                replay[n - 1] = 1;
        }
        for (unsigned i = 0; i < batch->n; ++i)
            checkin_answer(batch->e[i], replay[i]);
    }
    free(batch);
    ch_batcher_done(b);
}

/* One multi-row INSERT of entries[0..n) (with the Idempotency-Key claims of those that carry one). */
static int checkin_send(ch_batcher_t *b, void **entries, unsigned n)
{
    checkin_batch_t *batch = malloc(sizeof(*batch));
    if (batch == NULL)
        abort();
    batch->b = b;
    batch->n = n;
    unsigned keyed = 0;
    for (unsigned i = 0; i < n; ++i) {
        batch->e[i] = entries[i];
        keyed += batch->e[i]->claim[1] != NULL;
    }
    ch_buf_t a[10];
    unsigned na = keyed != 0 ? 10 : 4;
    for (unsigned k = 0; k < na; ++k) {
        a[k] = (ch_buf_t){0};
        ch_buf_reserve(&a[k], (size_t)n * (k < 2 ? 37 : 24) + 8);
        ch_buf_append(&a[k], "{", 1);
    }
    char num[24];
    for (unsigned i = 0; i < n; ++i) {
        checkin_t *e = batch->e[i];
        array_raw(&a[0], e->id, 36);
        array_raw(&a[1], e->venue, 36);
        array_raw(&a[2], num, (size_t)snprintf(num, sizeof(num), "%" PRId64, e->resident_id));
        array_raw(&a[3], num, (size_t)snprintf(num, sizeof(num), "%" PRId64, e->at_us));
        for (unsigned k = 4; k < na; ++k)
            array_elem(&a[k], e->claim[1] != NULL ? e->claim[k - 4] : NULL);
    }
    const char *v[10];
    for (unsigned k = 0; k < na; ++k) {
        ch_buf_append(&a[k], "}", 1);
        v[k] = a[k].base;
    }
    ch_pg_query_t q = {keyed != 0 ? &stmt_checkin_batch_idem : &stmt_checkin_batch, v, NULL};
    /* on the thread's pool; any call of the batch names the thread (all are held) */
    int ret = ch_call_pg_detached(batch->e[0]->call, &q, 1, on_batch_committed, batch); /* copies the parameters */
    for (unsigned k = 0; k < na; ++k)
        ch_buf_free(&a[k]);
    if (ret != 0)
        free(batch);
    return ret;
}

static const ch_batcher_ops_t checkin_ops = {
    .call = checkin_call,
    .send = checkin_send,
    .fail = checkin_fail,
    .drop = checkin_drop,
    .conflicts = checkin_conflicts,
};

/*
 * One batch in flight per thread when a row arrives or a batch commits: batches as large as the load allows, and
 * fewer transactions cost PostgreSQL less CPU per row (~6 % per check-in measured at 32 clients against one batch
 * per pool connection).
 */
static const ch_batcher_config_t checkin_batching = {
    .batch_max = CHECKIN_BATCH_MAX,
    .queue_max = CHECKIN_QUEUE_MAX,
    .window_ms = CHECKIN_WINDOW_MS,
    .soft = 1,
    .inflight_per_conn = CHECKIN_INFLIGHT_PER_CONN,
};

/* Queues a check-in whose answer is ready; answers 503 itself when the queue is full. */
static void checkin_enqueue(ch_call_t *call, checkin_t *e)
{
    ch_batcher_t *b = ch_batcher_thread(call, &batcher, &checkin_batching, &checkin_ops);
    e->call = call;
    if (ch_batcher_push(b, call, e) != 0) {
        free(e);
        ch_fail_err(call, CH_EFULL);
    }
}

/* ---- POST /v1/venues/{id}/checkins ---- */

typedef struct checkin_state {
    uint8_t venue[16];
    char venue_id[37];
    int64_t resident_id;
} checkin_state_t;

static void on_checkin_code(ch_call_t *call, int err, HealthCode *code)
{
    checkin_state_t *st = ch_call_data(call);
    if (err != 0) {
        ch_fail_err(call, err);
        return;
    }
    checkin_t *e = malloc(sizeof(*e));
    if (e == NULL)
        abort();
    memset(e, 0, sizeof(*e));
    e->resident_id = st->resident_id;
    e->at_us = hc_unix_now_us();
    uuid_v7(e->at_us, e->id);
    memcpy(e->venue, st->venue_id, sizeof(e->venue));

    CheckinResponse *resp = ch_call_alloc(call, sizeof(*resp));
    cityhall__healthcode__v1__checkin_response__init(resp);
    resp->checkin_id = ch_call_strdup(call, e->id);
    resp->at = hc_timestamp_us(call, e->at_us);
    resp->code = code;
    e->resp = resp;
    if (ch_call_idempotency_claim(call, 201, &resp->base, e->claim) != 0)
        e->claim[1] = NULL;
    checkin_enqueue(call, e);
}

static void checkin_with_subject(ch_call_t *call, int64_t resident_id)
{
    checkin_state_t *st = ch_call_data(call);
    st->resident_id = resident_id;
    int ret = hc_code_get(call, resident_id, on_checkin_code);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void checkin_at_known_venue(ch_call_t *call)
{
    CheckinRequest *req = ch_call_body(call);
    int ret = hc_subject_resolve(call, req->dependent_id, checkin_with_subject);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_venue_checked(ch_call_t *call, ch_pg_result_t *r)
{
    checkin_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    if (PQntuples(r->res[0]) == 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such venue");
        return;
    }
    venue_remember(st->venue);
    checkin_at_known_venue(call);
}

void hc_checkin(ch_call_t *call)
{
    checkin_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    if (hc_uuid_parse(ch_call_param(call, "id"), st->venue) != 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such venue");
        return;
    }
    hc_uuid_format(st->venue, st->venue_id); /* canonical lower case */
    ch_call_set_data(call, st);
    if (venue_known(st->venue)) {
        checkin_at_known_venue(call);
        return;
    }
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = ch_call_strdup(call, st->venue_id);
    ch_pg_query_t q = {&stmt_venue_exists, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_venue_checked);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/health/confirmed-cases ---- */

typedef struct case_state {
    char id[19];
    const char *hmac_param;
    int64_t confirmed_us;
    int64_t resident_id;
    char case_id[37];
    int attempts;
    ConfirmedCaseResponse *resp;
} case_state_t;

static void case_read(ch_call_t *call);

static void on_case_recomputed(ch_call_t *call, int err, const hc_state_t *state)
{
    /* the case's own code is also queued for recompute in the committed transaction: answer either way */
    case_state_t *st = ch_call_data(call);
    ch_reply(call, 200, &st->resp->base);
}

static void on_case_applied(ch_call_t *call, ch_pg_result_t *r)
{
    case_state_t *st = ch_call_data(call);
    if (r->err == CH_EDB && r->sqlstate != NULL && strcmp(r->sqlstate, "CHRTY") == 0 && st->attempts < CASE_ATTEMPTS) {
        case_read(call); /* a check-in committed between the count and the marks: count again */
        return;
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    /* the case turns red now; its contacts through the recompute queue filled in the same transaction */
    if (hc_recompute(call, st->resident_id, on_case_recomputed) != 0)
        ch_reply(call, 200, &st->resp->base);
}

static void on_case_read(ch_call_t *call, ch_pg_result_t *r)
{
    case_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail(call, CH_CODE_NOT_FOUND, "id_number: no such resident in the registry");
        return;
    }
    st->resident_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    long contacts = strtol(PQgetvalue(res, 0, 1), NULL, 10);
    ConfirmedCaseResponse *resp = ch_call_alloc(call, sizeof(*resp));
    cityhall__healthcode__v1__confirmed_case_response__init(resp);
    resp->contacts = (int32_t)contacts;
    st->resp = resp;

    const char **v = ch_call_alloc(call, 6 * sizeof(*v));
    v[0] = st->case_id;
    v[1] = ch_call_printf(call, "%" PRId64, st->resident_id);
    v[2] = ch_call_printf(call, "%" PRId64, st->confirmed_us);
    v[3] = CONTACT_WINDOW;
    v[4] = ch_call_principal(call)->subject;
    v[5] = ch_call_printf(call, "%ld", contacts);
    ch_pg_query_t q = {&stmt_case_apply, v, NULL};
    int ret = ch_call_pg_commit(call, &q, 1, 200, &resp->base, on_case_applied);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void case_read(ch_call_t *call)
{
    case_state_t *st = ch_call_data(call);
    ++st->attempts;
    const char **v = ch_call_alloc(call, 3 * sizeof(*v));
    v[0] = st->hmac_param;
    v[1] = ch_call_printf(call, "%" PRId64, st->confirmed_us);
    v[2] = CONTACT_WINDOW;
    ch_pg_query_t q = {&stmt_case_read, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_case_read);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void hc_confirmed_case(ch_call_t *call)
{
    if (hc_authority_or_respond(call) != 0)
        return;
    ConfirmedCase *req = ch_call_body(call);
    case_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    const char *why = "required";
    size_t n = strlen(req->id_number);
    if (n == 18) {
        memcpy(st->id, req->id_number, 19);
        if (st->id[17] == 'x')
            st->id[17] = 'X';
    }
    if (n != 18 || ch_id_number_check(st->id, &why) != 0) {
        if (n != 0 && n != 18)
            why = "must be 18 characters";
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "id_number: %s", why);
        return;
    }
    int64_t now = hc_unix_now_us();
    if (req->confirmed_at == NULL) {
        st->confirmed_us = now;
    } else {
        if (req->confirmed_at->nanos < 0 || req->confirmed_at->nanos > 999999999 ||
            req->confirmed_at->seconds > now / 1000000 + CASE_FUTURE_SKEW_S || req->confirmed_at->seconds < 0) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "confirmed_at: must not be in the future");
            return;
        }
        st->confirmed_us = req->confirmed_at->seconds * 1000000 + req->confirmed_at->nanos / 1000;
    }
    uint8_t mac[32];
    ch_pii_hmac(ch_pii, "id", st->id, 18, mac);
    char *hmac = ch_call_alloc(call, 2 * sizeof(mac) + 3);
    hmac[0] = '\\';
    hmac[1] = 'x';
    ch_hex(mac, sizeof(mac), hmac + 2);
    st->hmac_param = hmac;
    hc_uuid_v4(st->case_id);
    ch_call_set_data(call, st);
    case_read(call);
}

/* ---- demo venues for `cityhall seed` ---- */

/* SYNTHETIC demo venues: fixed ids, so that what `cityhall seed` prints stays valid across runs. */
static const struct {
    const char *id, *name, *region, *address;
} demo_venues[] = {
    {"5e1f0000-0000-4000-8000-000000000001", "天河城购物中心", "440106", "广州市天河区天河路208号"},
    {"5e1f0000-0000-4000-8000-000000000002", "广州南站", "440113", "广州市番禺区石壁街道南站北路"},
    {"5e1f0000-0000-4000-8000-000000000003", "深圳湾体育中心", "440305", "深圳市南山区滨海大道3001号"},
    {"5e1f0000-0000-4000-8000-000000000004", "佛山祖庙", "440604", "佛山市禅城区祖庙路21号"},
};

int hc_seed(const ch_config_t *config, int argc, char **argv)
{
    /* the arguments are the other modules' (identity: --citizens N): nothing here takes any */
    char err[512];
    if (venue_ring == NULL && venue_ring_load(config, err, sizeof(err)) != 0) {
        fprintf(stderr, "seed: the health-code keyring: %s (run `cityhall keys init` first)\n", err);
        return 1;
    }
    char conninfo[1100];
    snprintf(conninfo, sizeof(conninfo), "%s connect_timeout=10", config->pg_conninfo);
    PGconn *conn = PQconnectdb(conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "seed: could not connect to PostgreSQL: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return 1;
    }
    int ret = 1;
    size_t nvenues = sizeof(demo_venues) / sizeof(demo_venues[0]);
    for (size_t i = 0; i < nvenues; ++i) {
        const char *v[4] = {demo_venues[i].id, demo_venues[i].name, demo_venues[i].region, demo_venues[i].address};
        PGresult *res = PQexecParams(conn,
                                     "INSERT INTO venues (venue_id, name, region, address) "
                                     "VALUES ($1::uuid, $2, $3, $4) ON CONFLICT (venue_id) DO NOTHING",
                                     4, NULL, v, NULL, NULL, 0);
        int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok)
            fprintf(stderr, "seed: demo venue: %s", PQerrorMessage(conn));
        PQclear(res);
        if (!ok)
            goto out;
    }

    char base[200];
    if (config->https_port != 0)
        snprintf(base, sizeof(base), "curl -sk -H 'content-type: application/json' https://127.0.0.1:%d",
                 config->https_port);
    else
        snprintf(base, sizeof(base),
                 "curl -s --http2-prior-knowledge -H 'content-type: application/json' http://127.0.0.1:%d",
                 config->http_port);
    printf("\n=== health code: SYNTHETIC demo venues (场所码) ===\n"
           "    qr_text is what the venue's printed QR code holds: a JWS (ES256, typ venue+jwt) that verifies with\n"
           "    GET /v1/health/keys; scanning it checks in at POST /v1/venues/<venue id>/checkins\n\n");
    for (size_t i = 0; i < nvenues; ++i) {
        ch_buf_t token = {0};
        if (venue_token(demo_venues[i].id, demo_venues[i].name, demo_venues[i].region, &token) != 0) {
            fprintf(stderr, "seed: could not sign a demo venue code\n");
            ch_buf_free(&token);
            goto out;
        }
        printf("  %s  %s  %s (%s)\n    qr_text: %s\n", demo_venues[i].id, demo_venues[i].region, demo_venues[i].name,
               demo_venues[i].address, token.base);
        ch_buf_free(&token);
    }
    printf(
        "\ntry the health code (TOKEN: a citizen access token of a real-name bound account, e.g. 19900000001 above):\n"
        "  %s/v1/health/code -H \"Authorization: Bearer $TOKEN\"\n"
        "  %s/v1/venues/%s/checkins -H \"Authorization: Bearer $TOKEN\" -d '{}'\n"
        "  %s/v1/venues/%s/checkins -H \"Authorization: Bearer $TOKEN\" \\\n"
        "       -d '{\"dependent_id\":\"<resident id from GET /v1/me/dependents>\"}'   # for an elderly parent\n"
        "  %s/v1/health/verify -d '{\"token\":\"<token of the code above>\"}'\n"
        "  %s/v1/health/keys\n"
        "  # staff (STAFF_TOKEN from POST /v1/staff/login): register a venue and get its QR text\n"
        "  %s/v1/venues -H \"Authorization: Bearer $STAFF_TOKEN\" \\\n"
        "       -d '{\"name\":\"示例餐厅\",\"region\":\"440106\",\"address\":\"广州市天河区体育西路1号\"}'\n"
        "  # appeal a yellow or red code; two different staff members decide it\n"
        "  %s/v1/health/appeals -H \"Authorization: Bearer $TOKEN\" -d '{\"reason\":\"...\"}'\n"
        "  %s/v1/staff/health/appeals -H \"Authorization: Bearer $STAFF_TOKEN\"\n\n",
        base, base, demo_venues[0].id, base, demo_venues[1].id, base, base, base, base, base);
    ret = 0;
out:
    PQfinish(conn);
    return ret;
}

/* ---- module plumbing ---- */

int hc_init_venues(const ch_config_t *config)
{
    char err[512];
    if (venue_ring_load(config, err, sizeof(err)) != 0) {
        fprintf(stderr, "healthcode: venue codes need the health-code keyring: %s\n", err);
        return -1;
    }
    return 0;
}

const ch_pg_stmt_t *const hc_venues_stmts[] = {
    &stmt_venue_insert,
    &stmt_venue_exists,
    &stmt_checkin_batch,
    &stmt_checkin_batch_idem,
    &stmt_case_read,
    &stmt_case_apply,
    NULL,
};
