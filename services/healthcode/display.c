/* The health code as shown and signed: the display path and its caches, QR images, verification, paper codes. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <hiredis/hiredis.h>
#include <openssl/rand.h>
#include "healthcode.h"
#include "qr.h"
#include "cityhall/audit.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"

/*
 * How the display path is served (the hottest route of the platform):
 *
 *   per-thread cache (no lock, no I/O) -> Redis hc:code:<resident_id> -> PostgreSQL, then sign (ES256).
 *
 * A thread's cache entry holds the signed token and the response bodies already encoded (JSON and protobuf),
 * so a hit is a few table look-ups and a copy. An entry is served while its token has more than
 * TOKEN_REFRESH_S left; in its last minute, one request refreshes it while the others are still given the old
 * (valid) token. Invalidation is process-wide through a table of generation counters (gen_table): every entry
 * remembers the counter of its resident's slot when its fill *started*; hc_cache_invalidate (R's recompute,
 * after its commit) and the Redis channel "ch:hc" (other processes) bump the counter, so any entry filled
 * from data read before the change stops matching. An entry that no longer matches is dropped, never served.
 *
 * Degraded mode: Redis down -> PostgreSQL; PostgreSQL down too -> what this process still holds (this thread's
 * entry, else another thread's, read under that thread's lock) while its token is valid; else 503.
 */

#define TOKEN_TTL_S            300         /* a QR token's lifetime: a screenshot goes stale within minutes */
#define TOKEN_REFRESH_S        60          /* a cached token is re-signed when less than this is left */
#define TOKEN_MIN_LEFT_S       5           /* degraded: a held token is still served while this much is left */
#define PAPER_TTL_S            (7 * 86400) /* paper codes, for people without phones */
#define VERIFY_LEEWAY_S        30          /* clock skew between the signing and the verifying host */
#define CODE_SETS              32768       /* per thread, 2 ways each: at most 65536 residents' codes per thread */
#define CITIZEN_SETS           32768       /* per thread, 2 ways: citizen account -> registry resident */
#define GEN_SLOTS              65536       /* invalidation counters, shared by every thread; a power of two */
#define REFRESH_STUCK_US       3000000     /* a refresh not finished by then is presumed dead (its client left) */
#define REDIS_SET_MAX_US       1000000     /* a fill that took longer does not write Redis (see DEL_DELAY_US) */
#define DEL_DELAY_US           2000000     /* hc_cache_invalidate deletes the Redis copy again this much later */
#define DEL_QUEUE_MAX          (1u << 20)
#define FRESH_FROM_PG_US       2000000 /* after an invalidation, fills skip Redis this long (see gen_bump) */
#define KEYS_RESCAN_S          2       /* a stat(2) of the key folder; keys are parsed only when it changed */
#define PAPER_RESYNC_S         5       /* paper codes and revocations re-read from PostgreSQL */
#define PAPER_RESYNC_OVERLAP_S 60      /* commits become visible out of updated_at order: re-read a margin */
#define REDIS_PING_US          1000000
#define REDIS_DEAD_US          3500000 /* no answer to our PINGs for this long: reconnect */
#define TOKEN_MAX              4096    /* a longer "token" is refused before any parsing */
#define VERIFIED_SLOTS         4096    /* per thread: tokens whose signature verified (a power of two) */
#define CHANNEL                "ch:hc"
#define PAPER_CHANNEL          "ch:hc:paper"
#define NOT_BOUND              "bind your real name first"
#define NO_DEPENDENT           "no such dependent"

/* gateway/log.c's logger: JSON lines on stderr (not in the module contract yet; levels debug..error = 0..3). */
void ch_log(int level, const char *event, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
enum { LOG_INFO = 1, LOG_WARN = 2, LOG_ERROR = 3 };

typedef Cityhall__Healthcode__V1__VerifyRequest VerifyRequest;
typedef Cityhall__Healthcode__V1__VerifyResponse VerifyResponse;
typedef Cityhall__Healthcode__V1__PaperCodeRequest PaperCodeRequest;
typedef Cityhall__Healthcode__V1__PaperCode PaperCode;
typedef Google__Protobuf__Timestamp Timestamp;

/* ---- statements ---- */

/* $1 citizen_id. The account's registry resident (NULL: not real-name bound; no row: no such account). */
static const ch_pg_stmt_t stmt_citizen = {"hc_display_citizen",
                                          "SELECT registry_id FROM citizens WHERE citizen_id = $1::uuid", 1};

/* $1 guardian citizen_id, $2 resident_id: one row when the resident is a registered dependent of the guardian. */
static const ch_pg_stmt_t stmt_dependent = {
    "hc_display_dependent", "SELECT 1 FROM dependents WHERE guardian_id = $1::uuid AND resident_id = $2::bigint", 2};

/*
 * A resident's code and name (masked in C at once; the name is never cached unmasked). No health_codes row:
 * green, no reasons, at the active rule version (rule_sets, R's migration 0005). $1 resident_id.
 * Columns: name, code_id, color, reasons, rule_version, as_of, version, active rule version.
 */
static const ch_pg_stmt_t stmt_state = {
    "hc_display_state",
    "SELECT r.name, h.code_id::text, h.color, h.reasons::text, h.rule_version, "
    "       extract(epoch FROM h.as_of)::bigint, h.version, "
    "       (SELECT coalesce(max(s.version), 1) FROM rule_sets s WHERE s.active) "
    "FROM registry_residents r LEFT JOIN health_codes h ON h.resident_id = r.resident_id "
    "WHERE r.resident_id = $1::bigint",
    1};

/* Paper codes: the registry match ($1 id hash hex, $2 name) with the resident's citizen account, if any. */
static const ch_pg_stmt_t stmt_paper_match = {"hc_display_paper_match",
                                              "SELECT r.resident_id, r.name = $2, (SELECT c.citizen_id::text FROM "
                                              "citizens c WHERE c.registry_id = r.resident_id) "
                                              "FROM registry_residents r WHERE r.id_hmac = decode($1, 'hex')",
                                              2};

/* $1 paper_id, $2 resident_id, $3 color, $4 staff id, $5 issued (Unix s), $6 expires (Unix s). */
static const ch_pg_stmt_t stmt_paper_insert = {
    "hc_display_paper_insert",
    "INSERT INTO hc_paper_codes (paper_id, resident_id, color, issued_by, issued_at, expires_at) "
    "VALUES ($1::uuid, $2::bigint, $3, $4, to_timestamp($5::bigint), to_timestamp($6::bigint))",
    6};

/* $1 paper_id. Columns: resident_id, revoked, expires_at (Unix s), the resident's citizen account or NULL. */
static const ch_pg_stmt_t stmt_paper_get = {
    "hc_display_paper_get",
    "SELECT p.resident_id, p.revoked_at IS NOT NULL, extract(epoch FROM p.expires_at)::bigint, "
    "       (SELECT c.citizen_id::text FROM citizens c WHERE c.registry_id = p.resident_id) "
    "FROM hc_paper_codes p WHERE p.paper_id = $1::uuid",
    1};

/* $1 paper_id, $2 staff id. */
static const ch_pg_stmt_t stmt_paper_revoke = {
    "hc_display_paper_revoke",
    "UPDATE hc_paper_codes SET revoked_at = now(), revoked_by = $2, updated_at = now() "
    "WHERE paper_id = $1::uuid AND revoked_at IS NULL",
    2};

const ch_pg_stmt_t *const hc_display_stmts[] = {
    &stmt_citizen,      &stmt_dependent, &stmt_state,        &stmt_paper_match,
    &stmt_paper_insert, &stmt_paper_get, &stmt_paper_revoke, NULL,
};

/* ---- small helpers ---- */

static uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* A UUID in its 36-character text form to 16 bytes; -1 for anything else. */
static int uuid_parse(const char *s, uint8_t out[16])
{
    if (s == NULL || strlen(s) != 36)
        return -1;
    int o = 0;
    for (int i = 0; i < 36;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return -1;
            ++i;
            continue;
        }
        int hi = hexval((unsigned char)s[i]), lo = hexval((unsigned char)s[i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[o++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    return 0;
}

static void uuid_format(const uint8_t in[16], char out[37])
{
    static const char hex[] = "0123456789abcdef";
    int o = 0;
    for (int i = 0; i < 16; ++i) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[in[i] >> 4];
        out[o++] = hex[in[i] & 15];
    }
    out[o] = '\0';
}

static void uuid_random(char out[37])
{
    uint8_t b[16];
    if (RAND_bytes(b, sizeof(b)) != 1)
        abort();
    b[6] = (uint8_t)((b[6] & 0x0f) | 0x40);
    b[8] = (uint8_t)((b[8] & 0x3f) | 0x80);
    uuid_format(b, out);
}

/* A positive decimal int64 without sign, spaces or leading zeros; 0 for anything else. */
static int64_t id_parse(const char *s)
{
    if (s == NULL || s[0] < '1' || s[0] > '9' || strlen(s) > 18)
        return 0;
    int64_t v = 0;
    for (const char *p = s; *p != '\0'; ++p) {
        if (*p < '0' || *p > '9')
            return 0;
        v = v * 10 + (*p - '0');
    }
    return v;
}

static int color_parse(const char *s)
{
    if (s == NULL)
        return -1;
    for (int c = HC_GREEN; c <= HC_RED; ++c)
        if (strcmp(s, hc_color_name(c)) == 0)
            return c;
    return -1;
}

/* RFC 3339 (2026-11-28T20:00:40.123456Z, or with a +hh:mm offset) to Unix seconds and nanoseconds. */
static int rfc3339_parse(const char *s, int64_t *sec, int32_t *nanos)
{
    int y, mo, d, h, mi, se, n = 0;
    if (sscanf(s, "%4d-%2d-%2d%*1[Tt ]%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &se, &n) != 6 || n == 0)
        return -1;
    const char *p = s + n;
    int32_t ns = 0;
    if (*p == '.') {
        int digits = 0;
        for (++p; *p >= '0' && *p <= '9'; ++p)
            if (digits++ < 9)
                ns = ns * 10 + (*p - '0');
        for (; digits < 9; ++digits)
            ns *= 10;
    }
    int offset = 0;
    if (*p == 'Z' || *p == 'z') {
        ++p;
    } else if (*p == '+' || *p == '-') {
        int oh, om;
        if (sscanf(p + 1, "%2d:%2d", &oh, &om) != 2)
            return -1;
        offset = (oh * 60 + om) * 60 * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return -1;
    }
    if (*p != '\0')
        return -1;
    struct tm tm = {.tm_year = y - 1900, .tm_mon = mo - 1, .tm_mday = d, .tm_hour = h, .tm_min = mi, .tm_sec = se};
    *sec = (int64_t)timegm(&tm) - offset;
    *nanos = ns;
    return 0;
}

static Timestamp *timestamp_new(ProtobufCAllocator *a, int64_t sec, int32_t nanos)
{
    Timestamp *ts = a->alloc(a->allocator_data, sizeof(*ts));
    google__protobuf__timestamp__init(ts);
    ts->seconds = sec;
    ts->nanos = nanos;
    return ts;
}

static char *pool_strdup(ProtobufCAllocator *a, const char *s)
{
    size_t n = strlen(s);
    char *d = a->alloc(a->allocator_data, n + 1);
    memcpy(d, s, n + 1);
    return d;
}

static char *xstrndup(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d == NULL)
        abort();
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

/* A staff member acting for the citizen (delegation) or a kiosk session: their reads go to the access log. */
static int principal_acting(const ch_principal_t *p)
{
    return p != NULL && ((p->actor != NULL && p->actor[0] != '\0') || (p->device != NULL && p->device[0] != '\0'));
}

/* ---- the healthcode keyring: replaced whole when its folder changes, like gateway/auth.c's access ring ---- */

typedef struct ring_state {
    ch_keyring_t *ring;
    char *jwks; /* GET /v1/health/keys, built once per ring */
    size_t jwks_len;
} ring_state_t;

/* Readers load the pointer once and use that state throughout; a replaced state is never freed (rare, small). */
static ring_state_t *ring_current;
static char ring_dir[600];
static struct timespec ring_mtime;

static ring_state_t *ring_get(void)
{
    return __atomic_load_n(&ring_current, __ATOMIC_ACQUIRE);
}

static ring_state_t *ring_state_new(ch_keyring_t *ring)
{
    ring_state_t *st = calloc(1, sizeof(*st));
    if (st == NULL)
        abort();
    ch_buf_t b = {0};
    ch_keyring_jwks(ring, &b);
    st->ring = ring;
    st->jwks = b.base;
    st->jwks_len = b.len;
    return st;
}

/* True when every kid of `old` is still in `now` (then tokens signed so far keep verifying). */
static int ring_keeps_kids(const ring_state_t *old, const ring_state_t *now)
{
    json_t *o = json_loadb(old->jwks, old->jwks_len, 0, NULL);
    int kept = o != NULL;
    size_t i;
    json_t *k;
    json_array_foreach(json_object_get(o, "keys"), i, k)
    {
        const char *kid = json_string_value(json_object_get(k, "kid"));
        char needle[160];
        snprintf(needle, sizeof(needle), "\"kid\":\"%s\"", kid != NULL ? kid : "");
        if (kid == NULL || strstr(now->jwks, needle) == NULL)
            kept = 0;
    }
    json_decref(o);
    return kept;
}

/*
 * Process-wide flushes. A soft flush (invalidations may have been missed while the subscription was down) stops
 * entries from being served as fresh, yet while PostgreSQL cannot be reached they remain what this process holds,
 * exactly as they were during the outage. A hard flush (their signing key was removed) ends them for good.
 */
static uint64_t gen_epoch = 1, gen_epoch_hard = 1;
static void cache_flush_all(int hard)
{
    __atomic_add_fetch(&gen_epoch, 1, __ATOMIC_ACQ_REL);
    if (hard)
        __atomic_add_fetch(&gen_epoch_hard, 1, __ATOMIC_ACQ_REL);
}

static void ring_rescan(void)
{
    struct stat st;
    if (stat(ring_dir, &st) != 0)
        return;
    if (st.st_mtim.tv_sec == ring_mtime.tv_sec && st.st_mtim.tv_nsec == ring_mtime.tv_nsec)
        return;
    char err[512];
    ch_keyring_t *ring = ch_keyring_load(ring_dir, err, sizeof(err));
    if (ring == NULL) {
        ch_log(LOG_ERROR, "hc_keys", "could not reload the healthcode keyring: %s", err);
        return; /* tried again at the next re-scan */
    }
    ring_mtime = st.st_mtim;
    ring_state_t *old = ring_get(), *now = ring_state_new(ring);
    if (old != NULL && old->jwks_len == now->jwks_len && memcmp(old->jwks, now->jwks, now->jwks_len) == 0) {
        ch_keyring_free(ring);
        free(now->jwks);
        free(now);
        return;
    }
    int kept = old == NULL || ring_keeps_kids(old, now);
    __atomic_store_n(&ring_current, now, __ATOMIC_RELEASE); /* the old state is leaked: threads may hold it */
    if (!kept)
        cache_flush_all(1); /* cached tokens signed by a removed key would no longer verify */
    ch_log(LOG_INFO, "hc_keys_reloaded", "healthcode keyring reloaded from %s; signing key %s%s", ring_dir,
           ch_keyring_current_kid(ring), kept ? "" : "; a key was removed: cached codes dropped");
}

/* The kid in a token's header is still in the ring (a token from Redis may predate a key's removal). */
static int token_kid_known(const ring_state_t *rs, const char *token, size_t len)
{
    const char *dot = memchr(token, '.', len);
    if (dot == NULL || dot - token > 400)
        return 0;
    uint8_t head[320];
    long n = ch_b64url_decode(token, (size_t)(dot - token), head);
    if (n <= 0)
        return 0;
    json_t *h = json_loadb((const char *)head, (size_t)n, 0, NULL);
    const char *kid = json_string_value(json_object_get(h, "kid"));
    int known = 0;
    if (kid != NULL) {
        char needle[160];
        snprintf(needle, sizeof(needle), "\"kid\":\"%s\"", kid);
        known = strstr(rs->jwks, needle) != NULL;
    }
    json_decref(h);
    return known;
}

/* ---- process-wide invalidation: generation counters ---- */

static uint64_t gen_table[GEN_SLOTS];
static uint64_t gen_time[GEN_SLOTS]; /* when the slot was last bumped (monotonic us) */

static size_t gen_slot(int64_t resident_id)
{
    return (size_t)mix64((uint64_t)resident_id) & (GEN_SLOTS - 1);
}

typedef struct gen_stamp {
    uint64_t gen, epoch, hard;
} gen_stamp_t;

static gen_stamp_t gen_now(int64_t resident_id)
{
    gen_stamp_t s;
    s.epoch = __atomic_load_n(&gen_epoch, __ATOMIC_ACQUIRE);
    s.hard = __atomic_load_n(&gen_epoch_hard, __ATOMIC_ACQUIRE);
    s.gen = __atomic_load_n(&gen_table[gen_slot(resident_id)], __ATOMIC_ACQUIRE);
    return s;
}

/*
 * An invalidation: entries of the slot stop matching. R's recompute calls hc_cache_invalidate while its Redis DEL
 * may still be on the wire, so for FRESH_FROM_PG_US the slot's fills read PostgreSQL (committed: the new state)
 * rather than a Redis copy that may be the old one.
 */
static void gen_bump(int64_t resident_id)
{
    size_t slot = gen_slot(resident_id);
    __atomic_store_n(&gen_time[slot], ch_now_us(), __ATOMIC_RELEASE);
    __atomic_add_fetch(&gen_table[slot], 1, __ATOMIC_ACQ_REL);
}

static int gen_recent(int64_t resident_id)
{
    uint64_t t = __atomic_load_n(&gen_time[gen_slot(resident_id)], __ATOMIC_ACQUIRE);
    return t != 0 && ch_now_us() - t < FRESH_FROM_PG_US;
}

/* Fresh: neither the resident's slot nor the whole cache was invalidated since the stamp. */
static int gen_same(int64_t resident_id, gen_stamp_t s)
{
    gen_stamp_t now = gen_now(resident_id);
    return now.gen == s.gen && now.epoch == s.epoch && now.hard == s.hard;
}

/* Held: not known to be wrong (at most a soft flush since the stamp); may be served in degraded mode. */
static int gen_held(int64_t resident_id, gen_stamp_t s)
{
    gen_stamp_t now = gen_now(resident_id);
    return now.gen == s.gen && now.hard == s.hard;
}

/*
 * Delayed deletes of Redis copies. The race they close: a fill that read PostgreSQL just before a change
 * committed may SET its (old) state in Redis just after the committer's DEL. Fills write Redis only within
 * REDIS_SET_MAX_US of their start, so deleting again DEL_DELAY_US after the change catches every such write.
 * The queue also retries while Redis is down, so a DEL missed then is made when it returns.
 */
typedef struct del_item {
    int64_t resident_id;
    uint64_t due_us;
} del_item_t;

static pthread_mutex_t del_lock = PTHREAD_MUTEX_INITIALIZER;
static del_item_t *del_q;
static size_t del_head, del_len, del_cap;
static int del_overflow_logged;

static void del_push(int64_t resident_id, uint64_t due_us)
{
    pthread_mutex_lock(&del_lock);
    if (del_len == del_cap && del_cap < DEL_QUEUE_MAX) {
        size_t cap = del_cap == 0 ? 1024 : del_cap * 2;
        del_item_t *q = malloc(cap * sizeof(*q));
        if (q == NULL)
            abort();
        for (size_t i = 0; i < del_len; ++i)
            q[i] = del_q[(del_head + i) % del_cap];
        free(del_q);
        del_q = q;
        del_cap = cap;
        del_head = 0;
    }
    if (del_len < del_cap) {
        del_q[(del_head + del_len) % del_cap] = (del_item_t){resident_id, due_us};
        ++del_len;
    } else if (!del_overflow_logged) {
        del_overflow_logged = 1;
        ch_log(LOG_WARN, "hc_del_queue_full", "the queue of delayed Redis deletes is full; some are dropped");
    }
    pthread_mutex_unlock(&del_lock);
}

static int started; /* hc_init_display ran (serve): the background threads exist */

void hc_cache_invalidate(int64_t resident_id)
{
    gen_bump(resident_id);
    if (started)
        del_push(resident_id, ch_now_us() + DEL_DELAY_US);
}

/* ---- per-thread caches ---- */

/*
 * One resident's code as served: immutable once stored, except the images (rendered on first request) and
 * the refresh mark, which only the owning thread touches. Other threads read entries only under the owner's
 * lock (degraded mode) and copy what they need.
 */
typedef struct hc_entry {
    int64_t resident_id;
    gen_stamp_t stamp; /* generation when the fill started */
    int64_t version;   /* health_codes.version (0: no row yet) */
    int64_t iat, exp;  /* the token's */
    int64_t as_of;
    uint64_t refresh_us; /* a refresh is in flight since (monotonic); 0: none */
    int color;
    int rule_version;
    int owned; /* in a thread's table (else a copy in call memory) */
    char code_id[37];
    char masked[64];
    char *reasons; /* JSON array, as stored */
    char *token;
    size_t token_len;
    char *json; /* the HealthCode response, encoded once */
    size_t json_len;
    uint8_t *pb;
    size_t pb_len;
    uint8_t *png;
    size_t png_len;
    char *svg;
    size_t svg_len;
} hc_entry_t;

typedef struct citizen_slot {
    uint8_t key[16];
    int64_t resident_id; /* 0: empty */
} citizen_slot_t;

/*
 * A token whose signature and claims verified, kept so that scanning the same QR again costs a comparison and
 * not an ES256 verification. Expiry and revocation are still checked on every use.
 */
typedef struct verified {
    const void *ring; /* the ring state that verified it: a reloaded ring verifies again */
    char *token;
    size_t len;
    hc_token_t claims;
} verified_t;

typedef struct hc_thread {
    pthread_mutex_t lock; /* taken by the owner to change its tables, by other threads to read them */
    hc_entry_t **codes;   /* CODE_SETS * 2 */
    citizen_slot_t *citizens;
    verified_t *verified; /* VERIFIED_SLOTS, direct-mapped; only the owner touches it */
    uint64_t rng;
} hc_thread_t;

static __thread hc_thread_t *tls_state;
static pthread_mutex_t threads_lock = PTHREAD_MUTEX_INITIALIZER;
static hc_thread_t *all_threads[256];
static unsigned all_nthreads;

static hc_thread_t *thread_state(void)
{
    hc_thread_t *t = tls_state;
    if (t != NULL)
        return t;
    t = calloc(1, sizeof(*t));
    if (t == NULL || (t->codes = calloc(CODE_SETS * 2, sizeof(*t->codes))) == NULL ||
        (t->citizens = calloc(CITIZEN_SETS * 2, sizeof(*t->citizens))) == NULL ||
        (t->verified = calloc(VERIFIED_SLOTS, sizeof(*t->verified))) == NULL)
        abort();
    pthread_mutex_init(&t->lock, NULL);
    if (RAND_bytes((uint8_t *)&t->rng, sizeof(t->rng)) != 1 || t->rng == 0)
        t->rng = 0x9E3779B97F4A7C15ULL;
    pthread_mutex_lock(&threads_lock);
    if (all_nthreads < sizeof(all_threads) / sizeof(all_threads[0]))
        all_threads[all_nthreads++] = t;
    pthread_mutex_unlock(&threads_lock);
    tls_state = t;
    return t;
}

static void entry_free(hc_entry_t *e)
{
    if (e == NULL)
        return;
    free(e->reasons);
    free(e->token);
    free(e->json);
    free(e->pb);
    free(e->png);
    free(e->svg);
    free(e);
}

static size_t code_set(int64_t resident_id)
{
    return ((size_t)mix64((uint64_t)resident_id * 0x9E3779B97F4A7C15ULL) & (CODE_SETS - 1)) * 2;
}

static hc_entry_t *code_find(hc_thread_t *t, int64_t resident_id)
{
    size_t s = code_set(resident_id);
    for (size_t k = s; k < s + 2; ++k)
        if (t->codes[k] != NULL && t->codes[k]->resident_id == resident_id)
            return t->codes[k];
    return NULL;
}

static void code_drop(hc_thread_t *t, hc_entry_t *e)
{
    size_t s = code_set(e->resident_id);
    pthread_mutex_lock(&t->lock);
    for (size_t k = s; k < s + 2; ++k)
        if (t->codes[k] == e)
            t->codes[k] = NULL;
    pthread_mutex_unlock(&t->lock);
    entry_free(e);
}

/* Stores `e` (taking ownership) in place of the resident's entry, an empty way, or the way expiring first. */
static void code_store(hc_thread_t *t, hc_entry_t *e)
{
    size_t s = code_set(e->resident_id), k = s;
    if (t->codes[s] != NULL && t->codes[s]->resident_id != e->resident_id) {
        hc_entry_t *b = t->codes[s + 1];
        if (b == NULL || b->resident_id == e->resident_id || b->exp < t->codes[s]->exp)
            k = s + 1;
    }
    e->owned = 1;
    pthread_mutex_lock(&t->lock);
    hc_entry_t *old = t->codes[k];
    t->codes[k] = e;
    /* the other way may hold the same resident (stored before an eviction): keep one entry per resident */
    size_t other = k == s ? s + 1 : s;
    hc_entry_t *dup =
        t->codes[other] != NULL && t->codes[other]->resident_id == e->resident_id ? t->codes[other] : NULL;
    if (dup != NULL)
        t->codes[other] = NULL;
    pthread_mutex_unlock(&t->lock);
    entry_free(old);
    entry_free(dup);
}

static size_t citizen_set(const uint8_t key[16])
{
    uint64_t a, b;
    memcpy(&a, key, 8);
    memcpy(&b, key + 8, 8);
    return ((size_t)mix64(a ^ mix64(b)) & (CITIZEN_SETS - 1)) * 2;
}

static int64_t citizen_find(hc_thread_t *t, const uint8_t key[16])
{
    size_t s = citizen_set(key);
    for (size_t k = s; k < s + 2; ++k)
        if (t->citizens[k].resident_id != 0 && memcmp(t->citizens[k].key, key, 16) == 0)
            return t->citizens[k].resident_id;
    return 0;
}

/* Real-name binding never changes once made: an entry stays until evicted by another account. */
static void citizen_store(hc_thread_t *t, const uint8_t key[16], int64_t resident_id)
{
    size_t s = citizen_set(key), k = s;
    if (t->citizens[s].resident_id != 0 && memcmp(t->citizens[s].key, key, 16) != 0)
        k = t->citizens[s + 1].resident_id == 0 || memcmp(t->citizens[s + 1].key, key, 16) == 0
                ? s + 1
                : s + ((t->rng = mix64(t->rng + 1)) & 1);
    pthread_mutex_lock(&t->lock);
    memcpy(t->citizens[k].key, key, 16);
    t->citizens[k].resident_id = resident_id;
    pthread_mutex_unlock(&t->lock);
}

/* Degraded mode may serve an entry: held (see gen_held), and its token valid for `min_left` more. */
static int entry_usable(const hc_entry_t *e, int64_t now, int64_t min_left)
{
    return e->exp - now > min_left && gen_held(e->resident_id, e->stamp);
}

/* A copy of `e` in call memory (for entries read from another thread under its lock). */
static hc_entry_t *entry_copy(ch_call_t *call, const hc_entry_t *e)
{
    hc_entry_t *c = ch_call_alloc(call, sizeof(*c));
    *c = *e;
    c->owned = 0;
    c->reasons = ch_call_strdup(call, e->reasons);
    c->token = ch_call_alloc(call, e->token_len + 1);
    memcpy(c->token, e->token, e->token_len + 1);
    c->json = ch_call_alloc(call, e->json_len + 1);
    memcpy(c->json, e->json, e->json_len);
    c->pb = ch_call_alloc(call, e->pb_len + 1);
    memcpy(c->pb, e->pb, e->pb_len);
    c->png = NULL;
    c->svg = NULL;
    c->png_len = c->svg_len = 0;
    return c;
}

/* Degraded mode: another thread of this process may still hold the resident's code. */
static hc_entry_t *foreign_find(ch_call_t *call, hc_thread_t *self, int64_t resident_id, int64_t now)
{
    hc_entry_t *found = NULL;
    pthread_mutex_lock(&threads_lock);
    unsigned n = all_nthreads;
    pthread_mutex_unlock(&threads_lock);
    for (unsigned i = 0; i < n && found == NULL; ++i) {
        hc_thread_t *t = all_threads[i];
        if (t == self)
            continue;
        pthread_mutex_lock(&t->lock);
        hc_entry_t *e = code_find(t, resident_id);
        if (e != NULL && entry_usable(e, now, TOKEN_MIN_LEFT_S))
            found = entry_copy(call, e);
        pthread_mutex_unlock(&t->lock);
    }
    return found;
}

static int64_t foreign_citizen(hc_thread_t *self, const uint8_t key[16])
{
    int64_t rid = 0;
    pthread_mutex_lock(&threads_lock);
    unsigned n = all_nthreads;
    pthread_mutex_unlock(&threads_lock);
    for (unsigned i = 0; i < n && rid == 0; ++i) {
        hc_thread_t *t = all_threads[i];
        if (t == self)
            continue;
        pthread_mutex_lock(&t->lock);
        rid = citizen_find(t, key);
        pthread_mutex_unlock(&t->lock);
    }
    return rid;
}

/* ---- building an entry: state -> signed token -> encoded bodies ---- */

/* The claims of a QR token (paper_id NULL) or a paper code. Returns 0 and appends the token, or CH_EINVAL. */
static int token_sign(const ch_keyring_t *ring, const char *code_id, int color, const char *masked, int64_t iat,
                      int64_t exp, const char *paper_id, ch_buf_t *out)
{
    json_t *c = json_pack("{s:s, s:s, s:s, s:s, s:I, s:I}", "iss", "cityhall", "sub", code_id, "col",
                          hc_color_name(color), "nm", masked, "iat", (json_int_t)iat, "exp", (json_int_t)exp);
    if (c == NULL)
        return CH_EINVAL;
    if (paper_id != NULL)
        json_object_set_new(c, "paper", json_string(paper_id));
    char *s = json_dumps(c, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(c);
    if (s == NULL)
        return CH_EINVAL;
    int ret = ch_jws_sign(ring, "hc+jwt", s, strlen(s), out);
    free(s);
    return ret;
}

/* Reasons as stored (a JSON array of {code, data_source, as_of, rule_version, detail}) into messages. */
static void reasons_build(ProtobufCAllocator *a, const char *json, HealthCode *msg)
{
    json_t *arr = json_loads(json != NULL ? json : "[]", 0, NULL);
    if (!json_is_array(arr) || json_array_size(arr) == 0) {
        json_decref(arr);
        return;
    }
    size_t n = json_array_size(arr);
    msg->reasons = a->alloc(a->allocator_data, n * sizeof(*msg->reasons));
    size_t i;
    json_t *r;
    json_array_foreach(arr, i, r)
    {
        Reason *m = a->alloc(a->allocator_data, sizeof(*m));
        cityhall__healthcode__v1__reason__init(m);
        const char *s;
        if ((s = json_string_value(json_object_get(r, "code"))) != NULL)
            m->code = pool_strdup(a, s);
        if ((s = json_string_value(json_object_get(r, "data_source"))) != NULL)
            m->data_source = pool_strdup(a, s);
        if ((s = json_string_value(json_object_get(r, "detail"))) != NULL)
            m->detail = pool_strdup(a, s);
        json_t *v = json_object_get(r, "rule_version");
        if (json_is_integer(v))
            m->rule_version = (int32_t)json_integer_value(v);
        v = json_object_get(r, "as_of");
        int64_t sec;
        int32_t ns;
        if (json_is_string(v) && rfc3339_parse(json_string_value(v), &sec, &ns) == 0)
            m->as_of = timestamp_new(a, sec, ns);
        else if (json_is_integer(v))
            m->as_of = timestamp_new(a, json_integer_value(v), 0);
        msg->reasons[msg->n_reasons++] = m;
    }
    json_decref(arr);
}

/* The HealthCode message of an entry, allocated from `a`. */
static HealthCode *entry_message(const hc_entry_t *e, ProtobufCAllocator *a)
{
    HealthCode *m = a->alloc(a->allocator_data, sizeof(*m));
    cityhall__healthcode__v1__health_code__init(m);
    m->color = (char *)hc_color_name(e->color);
    reasons_build(a, e->reasons, m);
    m->as_of = timestamp_new(a, e->as_of, 0);
    m->token = pool_strdup(a, e->token);
    m->expires_at = timestamp_new(a, e->exp, 0);
    m->masked_name = pool_strdup(a, e->masked);
    m->code_id = pool_strdup(a, e->code_id);
    m->rule_version = e->rule_version;
    return m;
}

/* Encodes the response bodies once: every hit answers these bytes. */
static void entry_encode(hc_entry_t *e)
{
    ch_arena_t *arena = ch_arena_new();
    HealthCode *m = entry_message(e, ch_arena_allocator(arena));
    e->pb_len = protobuf_c_message_get_packed_size(&m->base);
    e->pb = malloc(e->pb_len + 1);
    if (e->pb == NULL)
        abort();
    protobuf_c_message_pack(&m->base, e->pb);
    ch_buf_t j = {0};
    ch_pb_to_json(&m->base, &j);
    e->json = j.base;
    e->json_len = j.len;
    ch_arena_free(arena);
}

/* Text fields of the Redis value hold no newline and no other control character. */
static void text_clean(char *s)
{
    for (; *s != '\0'; ++s)
        if ((unsigned char)*s < 0x20)
            *s = '?';
}

/*
 * The Redis copy of an entry: "hc1", version, color, rule version, as_of, iat, exp, code id, masked name,
 * token, then the reasons JSON (the rest), separated by newlines. No personal data: the name is masked.
 */
#define REDIS_FIELDS 10
static void entry_serialize(const hc_entry_t *e, ch_buf_t *out)
{
    char head[256];
    int n = snprintf(head, sizeof(head), "hc1\n%lld\n%d\n%d\n%lld\n%lld\n%lld\n%s\n", (long long)e->version, e->color,
                     e->rule_version, (long long)e->as_of, (long long)e->iat, (long long)e->exp, e->code_id);
    ch_buf_append(out, head, (size_t)n);
    ch_buf_append(out, e->masked, strlen(e->masked));
    ch_buf_append(out, "\n", 1);
    ch_buf_append(out, e->token, e->token_len);
    ch_buf_append(out, "\n", 1);
    ch_buf_append(out, e->reasons, strlen(e->reasons));
}

/* Parses a Redis copy into a new entry (bodies encoded), or NULL when it is not one of ours. */
static hc_entry_t *entry_parse(int64_t resident_id, const char *s, size_t len)
{
    const char *f[REDIS_FIELDS + 1];
    size_t flen[REDIS_FIELDS + 1];
    const char *p = s, *end = s + len;
    for (int i = 0; i < REDIS_FIELDS; ++i) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL)
            return NULL;
        f[i] = p;
        flen[i] = (size_t)(nl - p);
        p = nl + 1;
    }
    f[REDIS_FIELDS] = p;
    flen[REDIS_FIELDS] = (size_t)(end - p);
    if (flen[0] != 3 || memcmp(f[0], "hc1", 3) != 0 || flen[7] != 36 || flen[8] >= 64 || flen[9] == 0 ||
        flen[9] > TOKEN_MAX || memchr(f[REDIS_FIELDS], '\0', flen[REDIS_FIELDS]) != NULL)
        return NULL;
    hc_entry_t *e = calloc(1, sizeof(*e));
    if (e == NULL)
        abort();
    e->resident_id = resident_id;
    e->version = strtoll(f[1], NULL, 10);
    e->color = atoi(f[2]);
    e->rule_version = atoi(f[3]);
    e->as_of = strtoll(f[4], NULL, 10);
    e->iat = strtoll(f[5], NULL, 10);
    e->exp = strtoll(f[6], NULL, 10);
    memcpy(e->code_id, f[7], 36);
    memcpy(e->masked, f[8], flen[8]);
    e->token = xstrndup(f[9], flen[9]);
    e->token_len = flen[9];
    e->reasons = xstrndup(f[REDIS_FIELDS], flen[REDIS_FIELDS]);
    if (e->color < HC_GREEN || e->color > HC_RED || e->exp <= 0) {
        entry_free(e);
        return NULL;
    }
    entry_encode(e);
    return e;
}

/* No write on the display path for a resident who has no health_codes row yet (no input ever arrived). */
void hc_code_id_derive(int64_t resident_id, char out[37])
{
    char v[24];
    int n = snprintf(v, sizeof(v), "%lld", (long long)resident_id);
    uint8_t mac[32];
    ch_pii_hmac(ch_pii, "hc-code", v, (size_t)n, mac);
    mac[6] = (uint8_t)((mac[6] & 0x0f) | 0x80); /* version 8: custom */
    mac[8] = (uint8_t)((mac[8] & 0x3f) | 0x80);
    uuid_format(mac, out);
}

/* A new entry from the PostgreSQL row of stmt_state, with a freshly signed token; NULL when signing failed. */
static hc_entry_t *entry_from_row(int64_t resident_id, PGresult *res, int64_t now)
{
    ring_state_t *rs = ring_get();
    if (rs == NULL)
        return NULL;
    hc_entry_t *e = calloc(1, sizeof(*e));
    if (e == NULL)
        abort();
    e->resident_id = resident_id;
    ch_name_mask(PQgetvalue(res, 0, 0), e->masked, sizeof(e->masked));
    text_clean(e->masked);
    if (PQgetisnull(res, 0, 1)) {
        /* no input ever arrived: green, no reasons, at the active rule version */
        hc_code_id_derive(resident_id, e->code_id);
        e->color = HC_GREEN;
        e->reasons = xstrndup("[]", 2);
        e->rule_version = atoi(PQgetvalue(res, 0, 7));
        e->as_of = now;
        e->version = 0;
    } else {
        snprintf(e->code_id, sizeof(e->code_id), "%s", PQgetvalue(res, 0, 1));
        e->color = color_parse(PQgetvalue(res, 0, 2));
        const char *reasons = PQgetvalue(res, 0, 3);
        e->reasons = xstrndup(reasons, strlen(reasons));
        text_clean(e->reasons); /* jsonb's text form has no raw control characters; be sure */
        e->rule_version = atoi(PQgetvalue(res, 0, 4));
        e->as_of = strtoll(PQgetvalue(res, 0, 5), NULL, 10);
        e->version = strtoll(PQgetvalue(res, 0, 6), NULL, 10);
        if (e->color < 0) {
            entry_free(e);
            return NULL;
        }
    }
    e->iat = now;
    e->exp = now + TOKEN_TTL_S;
    ch_buf_t tok = {0};
    if (token_sign(rs->ring, e->code_id, e->color, e->masked, e->iat, e->exp, NULL, &tok) != 0) {
        ch_buf_free(&tok);
        entry_free(e);
        return NULL;
    }
    e->token = tok.base;
    e->token_len = tok.len;
    entry_encode(e);
    return e;
}

/* ---- obtaining a resident's code: thread cache -> Redis -> PostgreSQL (-> degraded) ---- */

/*
 * `e` is borrowed for the duration of the callback (NULL with err: not found or unavailable). The caller's
 * ch_call_data is restored before the callback runs: these steps borrow it meanwhile.
 */
typedef void (*obtain_cb)(ch_call_t *call, hc_entry_t *e, int err);

/*
 * An entry built from PostgreSQL and signed, while Redis is asked whether another thread or process got there
 * first. It lives in malloc'd memory: if the client goes away meanwhile (and the callbacks never run), the
 * request pool's disposal frees it.
 */
typedef struct pending {
    hc_entry_t *e;
} pending_t;

static void on_pending_dispose(void *p)
{
    pending_t *pe = p;
    entry_free(pe->e);
    pe->e = NULL;
}

typedef struct obtain {
    void *saved;
    obtain_cb cb;
    int64_t resident_id;
    gen_stamp_t stamp;
    uint64_t started_us;
    int retried;
    pending_t *pending; /* the signed entry waiting for SET NX (or NULL) */
} obtain_t;

static void obtain_pg(ch_call_t *call, obtain_t *o);

static void obtain_done(ch_call_t *call, obtain_t *o, hc_entry_t *e, int err)
{
    ch_call_set_data(call, o->saved);
    o->cb(call, e, err);
}

static void noop_redis(ch_call_t *call, redisReply *reply, int err)
{
}

/* The fetch failed: serve what this process still holds while its token is valid, else report `err`. */
static void obtain_degraded(ch_call_t *call, obtain_t *o, int err)
{
    hc_thread_t *t = thread_state();
    int64_t now = time(NULL);
    hc_entry_t *e = code_find(t, o->resident_id);
    if (e != NULL) {
        e->refresh_us = 0;
        if (entry_usable(e, now, TOKEN_MIN_LEFT_S)) {
            obtain_done(call, o, e, 0);
            return;
        }
        if (!gen_held(e->resident_id, e->stamp))
            code_drop(t, e); /* invalidated and not refreshable: dropped, never served */
    }
    if (err != CH_ENOTFOUND && (e = foreign_find(call, t, o->resident_id, now)) != NULL) {
        obtain_done(call, o, e, 0);
        return;
    }
    obtain_done(call, o, NULL, err);
}

/*
 * A fetched entry: cached, unless invalidated meanwhile: then fetched again from PostgreSQL, once. When that one is
 * invalidated too (inputs for this resident keep arriving), it answers this request and is not cached: it was read
 * during the request, so it is a state the code had while the request ran, but it may not be the newest one.
 */
static void obtain_fetched(ch_call_t *call, obtain_t *o, hc_entry_t *e)
{
    hc_thread_t *t = thread_state();
    if (!gen_same(o->resident_id, o->stamp)) {
        if (!o->retried) {
            entry_free(e);
            o->retried = 1;
            o->stamp = gen_now(o->resident_id);
            o->started_us = ch_now_us();
            obtain_pg(call, o);
            return;
        }
        h2o_req_t *req = ch_call_req(call);
        pending_t *keep = h2o_mem_alloc_shared(&req->pool, sizeof(*keep), on_pending_dispose);
        keep->e = e; /* freed with the request */
        obtain_done(call, o, e, 0);
        return;
    }
    e->stamp = o->stamp;
    code_store(t, e);
    obtain_done(call, o, e, 0);
}

/* Takes the pending entry back from the request pool's care. */
static hc_entry_t *pending_take(obtain_t *o)
{
    hc_entry_t *e = o->pending->e;
    o->pending->e = NULL;
    return e;
}

/* SETs the entry in Redis: `nx` only when no copy is there; `cb` NULL: best effort, the answer is not awaited. */
static int redis_put(ch_call_t *call, const hc_entry_t *e, int nx, ch_call_redis_cb cb)
{
    int64_t ttl = e->exp - (int64_t)time(NULL) - TOKEN_REFRESH_S;
    if (ttl <= 0)
        return CH_EINVAL;
    ch_buf_t v = {0};
    entry_serialize(e, &v);
    const char *argv[6] = {"SET",
                           ch_call_printf(call, "hc:code:%lld", (long long)e->resident_id),
                           v.base,
                           "EX",
                           ch_call_printf(call, "%lld", (long long)ttl),
                           "NX"};
    size_t argvlen[6] = {3, strlen(argv[1]), v.len, 2, strlen(argv[4]), 2};
    int ret = ch_call_redis(call, cb != NULL ? cb : noop_redis, nx ? 6 : 5, argv, argvlen);
    ch_buf_free(&v);
    return ret;
}

/*
 * The copy another thread or process stored first: adopted when it is of our row's version (so that every thread
 * shows the same token) or of a newer one (our read came just before a change, whose invalidation is on its way);
 * a copy of an older version predates a change and is replaced by ours.
 */
static void on_redis_first(ch_call_t *call, redisReply *reply, int err)
{
    obtain_t *o = ch_call_data(call);
    hc_entry_t *ours = pending_take(o);
    if (err == 0 && reply != NULL && reply->type == REDIS_REPLY_STRING) {
        hc_entry_t *theirs = entry_parse(o->resident_id, reply->str, reply->len);
        ring_state_t *rs = ring_get();
        if (theirs != NULL &&
            (theirs->version > ours->version || (theirs->version == ours->version && theirs->color == ours->color)) &&
            theirs->exp - (int64_t)time(NULL) > TOKEN_REFRESH_S && rs != NULL &&
            token_kid_known(rs, theirs->token, theirs->token_len)) {
            entry_free(ours);
            obtain_fetched(call, o, theirs);
            return;
        }
        entry_free(theirs);
        redis_put(call, ours, 0, NULL);
    }
    obtain_fetched(call, o, ours);
}

static void on_redis_set_nx(ch_call_t *call, redisReply *reply, int err)
{
    obtain_t *o = ch_call_data(call);
    if (err == 0 && reply != NULL && reply->type == REDIS_REPLY_NIL) {
        /* a copy is there already: read it */
        const char *argv[2] = {"GET", ch_call_printf(call, "hc:code:%lld", (long long)o->resident_id)};
        if (ch_call_redis(call, on_redis_first, 2, argv, NULL) == 0)
            return;
    }
    obtain_fetched(call, o, pending_take(o)); /* stored, or Redis unavailable: ours */
}

/*
 * A signed entry from PostgreSQL. It goes to Redis with SET NX, so that concurrent fills (threads, processes)
 * converge on one token; a slow fill skips Redis (see DEL_DELAY_US).
 */
static void obtain_signed(ch_call_t *call, obtain_t *o, hc_entry_t *e)
{
    if (ch_now_us() - o->started_us >= REDIS_SET_MAX_US || !gen_same(o->resident_id, o->stamp)) {
        obtain_fetched(call, o, e);
        return;
    }
    h2o_req_t *req = ch_call_req(call);
    o->pending = h2o_mem_alloc_shared(&req->pool, sizeof(*o->pending), on_pending_dispose);
    o->pending->e = e;
    if (redis_put(call, e, 1, on_redis_set_nx) != 0)
        obtain_fetched(call, o, pending_take(o)); /* Redis down: ours, from PostgreSQL */
}

static void on_state_row(ch_call_t *call, ch_pg_result_t *r)
{
    obtain_t *o = ch_call_data(call);
    if (r->err != 0) {
        if (r->err == CH_EDB)
            ch_log(LOG_ERROR, "hc_state_query", "reading a health code failed: %s %s", r->sqlstate ? r->sqlstate : "",
                   r->message ? r->message : "");
        obtain_degraded(call, o, r->err == CH_EDB ? CH_EDB : CH_EUNAVAIL);
        return;
    }
    if (PQntuples(r->res[0]) != 1) {
        obtain_done(call, o, NULL, CH_ENOTFOUND);
        return;
    }
    hc_entry_t *e = entry_from_row(o->resident_id, r->res[0], time(NULL));
    if (e == NULL) {
        ch_log(LOG_ERROR, "hc_sign", "could not sign a health code token (resident %lld)", (long long)o->resident_id);
        obtain_degraded(call, o, CH_EINVAL);
        return;
    }
    obtain_signed(call, o, e);
}

static void obtain_pg(ch_call_t *call, obtain_t *o)
{
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = ch_call_printf(call, "%lld", (long long)o->resident_id);
    ch_pg_query_t q = {&stmt_state, v, NULL};
    int ret = ch_call_pg_read(call, &q, 1, on_state_row);
    if (ret != 0)
        obtain_degraded(call, o, ret);
}

static void on_redis_code(ch_call_t *call, redisReply *reply, int err)
{
    obtain_t *o = ch_call_data(call);
    if (err == 0 && reply != NULL && reply->type == REDIS_REPLY_STRING) {
        hc_entry_t *e = entry_parse(o->resident_id, reply->str, reply->len);
        ring_state_t *rs = ring_get();
        if (e != NULL && e->exp - (int64_t)time(NULL) > TOKEN_REFRESH_S && rs != NULL &&
            token_kid_known(rs, e->token, e->token_len)) {
            obtain_fetched(call, o, e);
            return;
        }
        entry_free(e); /* not ours, too old, or signed by a removed key: PostgreSQL decides */
    }
    obtain_pg(call, o); /* a miss, or Redis down (degraded: straight to PostgreSQL) */
}

/*
 * Gets `resident_id`'s code: from this thread's cache when fresh, else Redis, else PostgreSQL. While a token
 * is in its last minute, one request refreshes it and the others are still answered with it.
 */
static void obtain(ch_call_t *call, int64_t resident_id, obtain_cb cb)
{
    hc_thread_t *t = thread_state();
    int64_t now = time(NULL);
    hc_entry_t *e = code_find(t, resident_id);
    int fresh = e != NULL && gen_same(resident_id, e->stamp);
    if (e != NULL && !fresh && !gen_held(resident_id, e->stamp)) {
        code_drop(t, e);
        e = NULL;
    }
    if (fresh) { /* a held entry that is not fresh is kept for degraded mode, but fetched again */
        if (e->exp - now > TOKEN_REFRESH_S) {
            cb(call, e, 0);
            return;
        }
        uint64_t us = ch_now_us();
        if (e->refresh_us != 0 && us - e->refresh_us < REFRESH_STUCK_US && e->exp - now > TOKEN_MIN_LEFT_S) {
            cb(call, e, 0); /* another request is refreshing it */
            return;
        }
        e->refresh_us = us != 0 ? us : 1;
    }
    obtain_t *o = ch_call_alloc(call, sizeof(*o));
    o->saved = ch_call_data(call);
    o->cb = cb;
    o->resident_id = resident_id;
    o->stamp = gen_now(resident_id);
    o->started_us = ch_now_us();
    o->retried = 0;
    ch_call_set_data(call, o);
    if (gen_recent(resident_id)) {
        obtain_pg(call, o);
        return;
    }
    const char *argv[2] = {"GET", ch_call_printf(call, "hc:code:%lld", (long long)resident_id)};
    int ret = ch_call_redis(call, on_redis_code, 2, argv, NULL);
    if (ret != 0)
        obtain_pg(call, o); /* Redis down or its queue full: PostgreSQL */
}

/* ---- who the call is about ---- */

typedef struct resolve {
    void *saved;
    hc_subject_cb cb;
    int64_t dependent; /* the resident asked about, when it is a dependent */
    uint8_t key[16];   /* the caller's citizen id, when it parsed (cache key) */
    int keyed;
} resolve_t;

static void resolve_done(ch_call_t *call, resolve_t *r, int64_t resident_id)
{
    ch_call_set_data(call, r->saved);
    r->cb(call, resident_id);
}

static void on_citizen_row(ch_call_t *call, ch_pg_result_t *res)
{
    resolve_t *r = ch_call_data(call);
    if (res->err != 0) {
        /* degraded: another thread may know the binding */
        int64_t rid = r->keyed ? foreign_citizen(thread_state(), r->key) : 0;
        if (rid > 0) {
            resolve_done(call, r, rid);
            return;
        }
        ch_call_set_data(call, r->saved);
        ch_fail_err(call, res->err == CH_EDB ? CH_EDB : CH_EUNAVAIL);
        return;
    }
    PGresult *pr = res->res[0];
    if (PQntuples(pr) != 1 || PQgetisnull(pr, 0, 0)) {
        ch_call_set_data(call, r->saved);
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, NOT_BOUND);
        return;
    }
    int64_t rid = strtoll(PQgetvalue(pr, 0, 0), NULL, 10);
    if (r->keyed)
        citizen_store(thread_state(), r->key, rid);
    resolve_done(call, r, rid);
}

static void on_dependent_row(ch_call_t *call, ch_pg_result_t *res)
{
    resolve_t *r = ch_call_data(call);
    if (res->err != 0) {
        ch_call_set_data(call, r->saved);
        ch_fail_err(call, res->err == CH_EDB ? CH_EDB : CH_EUNAVAIL);
        return;
    }
    if (PQntuples(res->res[0]) != 1) {
        ch_call_set_data(call, r->saved);
        ch_fail(call, CH_CODE_NOT_FOUND, NO_DEPENDENT);
        return;
    }
    resolve_done(call, r, r->dependent);
}

int hc_subject_resolve(ch_call_t *call, const char *dependent_id, hc_subject_cb cb)
{
    const ch_principal_t *p = ch_call_principal(call);
    if (p == NULL || p->role != CH_ROLE_CITIZEN || p->subject == NULL)
        return CH_EINVAL;
    resolve_t *r = ch_call_alloc(call, sizeof(*r));
    memset(r, 0, sizeof(*r));
    r->cb = cb;
    if (dependent_id != NULL && dependent_id[0] != '\0') {
        int64_t rid = id_parse(dependent_id);
        if (rid <= 0) {
            ch_fail(call, CH_CODE_NOT_FOUND, NO_DEPENDENT); /* the same answer as an unknown id */
            return 0;
        }
        r->dependent = rid;
        const char **v = ch_call_alloc(call, 2 * sizeof(*v));
        v[0] = p->subject;
        v[1] = ch_call_printf(call, "%lld", (long long)rid);
        ch_pg_query_t q = {&stmt_dependent, v, NULL};
        r->saved = ch_call_data(call);
        ch_call_set_data(call, r);
        int ret = ch_call_pg_read(call, &q, 1, on_dependent_row);
        if (ret != 0)
            ch_call_set_data(call, r->saved);
        return ret;
    }
    hc_thread_t *t = thread_state();
    if (uuid_parse(p->subject, r->key) == 0) {
        r->keyed = 1;
        int64_t rid = citizen_find(t, r->key);
        if (rid > 0) {
            cb(call, rid);
            return 0;
        }
    }
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = p->subject;
    ch_pg_query_t q = {&stmt_citizen, v, NULL};
    r->saved = ch_call_data(call);
    ch_call_set_data(call, r);
    int ret = ch_call_pg_read(call, &q, 1, on_citizen_row);
    if (ret != 0) {
        ch_call_set_data(call, r->saved);
        int64_t rid = r->keyed ? foreign_citizen(t, r->key) : 0;
        if (rid > 0) {
            cb(call, rid);
            return 0;
        }
    }
    return ret;
}

/* ---- hc_code_get: the code as a message, for other handlers (check-ins, declarations) ---- */

typedef struct code_get {
    void *saved;
    hc_code_cb cb;
} code_get_t;

static void on_code_get(ch_call_t *call, hc_entry_t *e, int err)
{
    code_get_t *g = ch_call_data(call);
    ch_call_set_data(call, g->saved);
    if (e == NULL) {
        g->cb(call, err == CH_ENOTFOUND ? CH_ENOTFOUND : CH_EUNAVAIL, NULL);
        return;
    }
    /* a private copy in call memory: the entry may be replaced before the caller is done with it */
    HealthCode *m = (HealthCode *)protobuf_c_message_unpack(&cityhall__healthcode__v1__health_code__descriptor,
                                                            ch_call_allocator(call), e->pb_len, e->pb);
    g->cb(call, m != NULL ? 0 : CH_EINVAL, m);
}

int hc_code_get(ch_call_t *call, int64_t resident_id, hc_code_cb cb)
{
    if (resident_id <= 0)
        return CH_EINVAL;
    code_get_t *g = ch_call_alloc(call, sizeof(*g));
    g->saved = ch_call_data(call);
    g->cb = cb;
    ch_call_set_data(call, g);
    obtain(call, resident_id, on_code_get);
    return 0;
}

/* ---- answering with a code: JSON/protobuf body, PNG or SVG ---- */

enum { AS_MESSAGE, AS_PNG, AS_SVG };

typedef struct answer {
    int kind;
    int status;
    const char *ctype; /* images */
    const void *body;  /* the image, or the JSON body */
    size_t len;
    const void *pb; /* AS_MESSAGE: the protobuf body too (the gateway picks the client's encoding) */
    size_t pb_len;
} answer_t;

static void answer_send(ch_call_t *call, const answer_t *a)
{
    if (a->kind == AS_MESSAGE)
        ch_reply_encoded(call, a->status, a->body, a->len, a->pb, a->pb_len);
    else
        ch_reply_raw(call, a->status, a->ctype, a->body, a->len);
}

static int answer_prepare(ch_call_t *call, hc_entry_t *e, int kind, answer_t *a)
{
    a->kind = kind;
    a->status = 200;
    if (kind == AS_MESSAGE) {
        a->body = e->json;
        a->len = e->json_len;
        a->pb = e->pb;
        a->pb_len = e->pb_len;
        return 0;
    }
    if (kind == AS_PNG && e->png == NULL) {
        ch_buf_t b = {0};
        if (hc_qr_png(e->token, e->token_len, HC_QR_SCALE, HC_QR_QUIET, &b) != 0) {
            ch_buf_free(&b);
            return CH_EINVAL;
        }
        if (e->owned) {
            e->png = (uint8_t *)b.base; /* only this thread touches an owned entry's images */
            e->png_len = b.len;
        } else {
            e->png = ch_call_alloc(call, b.len);
            memcpy(e->png, b.base, b.len);
            e->png_len = b.len;
            ch_buf_free(&b);
        }
    } else if (kind == AS_SVG && e->svg == NULL) {
        ch_buf_t b = {0};
        if (hc_qr_svg(e->token, e->token_len, HC_QR_QUIET, &b) != 0) {
            ch_buf_free(&b);
            return CH_EINVAL;
        }
        if (e->owned) {
            e->svg = b.base;
            e->svg_len = b.len;
        } else {
            e->svg = ch_call_alloc(call, b.len);
            memcpy(e->svg, b.base, b.len);
            e->svg_len = b.len;
            ch_buf_free(&b);
        }
    }
    a->ctype = kind == AS_PNG ? "image/png" : "image/svg+xml";
    a->body = kind == AS_PNG ? (const void *)e->png : (const void *)e->svg;
    a->len = kind == AS_PNG ? e->png_len : e->svg_len;
    return 0;
}

static void on_read_audited(ch_call_t *call, ch_pg_result_t *r)
{
    answer_t *a = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    answer_send(call, a);
}

/* Answers with the code; a staff member or kiosk reading for the citizen is written to their access log first. */
static void answer(ch_call_t *call, hc_entry_t *e, int kind)
{
    answer_t a = {0};
    if (answer_prepare(call, e, kind, &a) != 0) {
        ch_fail(call, CH_CODE_INTERNAL, "internal error");
        return;
    }
    const ch_principal_t *p = ch_call_principal(call);
    if (!principal_acting(p)) {
        answer_send(call, &a);
        return;
    }
    /* the entry may be replaced while the access-log write is in flight: keep copies */
    answer_t *saved = ch_call_alloc(call, sizeof(*saved));
    *saved = a;
    void *body = ch_call_alloc(call, a.len + 1);
    memcpy(body, a.body, a.len);
    saved->body = body;
    if (a.pb != NULL) {
        void *pb = ch_call_alloc(call, a.pb_len + 1);
        memcpy(pb, a.pb, a.pb_len);
        saved->pb = pb;
    }
    ch_call_set_data(call, saved);
    ch_pg_query_t q;
    ch_audit_query(call, p->subject, "healthcode.read", "health code shown", &q);
    int ret = ch_call_pg(call, &q, 1, on_read_audited);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void code_failed(ch_call_t *call, int err)
{
    if (err == CH_ENOTFOUND)
        ch_fail(call, CH_CODE_NOT_FOUND, "no such resident");
    else if (err == CH_EDB || err == CH_EINVAL)
        ch_fail(call, CH_CODE_INTERNAL, "internal error");
    else
        ch_fail_retry_after(call, CH_CODE_UNAVAILABLE, 2, "the health code cannot be shown right now; retry shortly");
}

static void on_code_message(ch_call_t *call, hc_entry_t *e, int err)
{
    if (e == NULL)
        code_failed(call, err);
    else
        answer(call, e, AS_MESSAGE);
}

static void on_code_png(ch_call_t *call, hc_entry_t *e, int err)
{
    if (e == NULL)
        code_failed(call, err);
    else
        answer(call, e, AS_PNG);
}

static void on_code_svg(ch_call_t *call, hc_entry_t *e, int err)
{
    if (e == NULL)
        code_failed(call, err);
    else
        answer(call, e, AS_SVG);
}

static void on_subject_message(ch_call_t *call, int64_t resident_id)
{
    obtain(call, resident_id, on_code_message);
}

static void on_subject_png(ch_call_t *call, int64_t resident_id)
{
    obtain(call, resident_id, on_code_png);
}

static void on_subject_svg(ch_call_t *call, int64_t resident_id)
{
    obtain(call, resident_id, on_code_svg);
}

/*
 * The fast path: a citizen whose binding and code this thread holds, with a token that has more than a minute
 * left, is answered from the cache without PostgreSQL, Redis, signing or encoding. Returns 1 when answered.
 */
static int answer_from_cache(ch_call_t *call, int kind)
{
    const ch_principal_t *p = ch_call_principal(call);
    uint8_t key[16];
    if (p == NULL || principal_acting(p) || uuid_parse(p->subject, key) != 0)
        return 0;
    hc_thread_t *t = thread_state();
    int64_t rid = citizen_find(t, key);
    if (rid == 0)
        return 0;
    hc_entry_t *e = code_find(t, rid);
    if (e == NULL || e->exp - (int64_t)time(NULL) <= TOKEN_REFRESH_S || !gen_same(rid, e->stamp))
        return 0;
    answer(call, e, kind);
    return 1;
}

static void code_route(ch_call_t *call, int kind, hc_subject_cb next)
{
    if (answer_from_cache(call, kind))
        return;
    int ret = hc_subject_resolve(call, "", next);
    if (ret != 0)
        code_failed(call, ret);
}

void hc_code(ch_call_t *call)
{
    code_route(call, AS_MESSAGE, on_subject_message);
}

void hc_code_png(ch_call_t *call)
{
    code_route(call, AS_PNG, on_subject_png);
}

void hc_code_svg(ch_call_t *call)
{
    code_route(call, AS_SVG, on_subject_svg);
}

void hc_dependent_code(ch_call_t *call)
{
    int ret = hc_subject_resolve(call, ch_call_param(call, "id"), on_subject_message);
    if (ret != 0)
        code_failed(call, ret);
}

void hc_keys(ch_call_t *call)
{
    ring_state_t *rs = ring_get();
    if (rs == NULL) {
        ch_fail(call, CH_CODE_UNAVAILABLE, "no signing keys loaded");
        return;
    }
    /* public and the same for everyone: offline verifiers and the edge may keep it a few minutes */
    ch_call_add_header(call, "cache-control", "public, max-age=300");
    ch_reply_raw(call, 200, "application/json", rs->jwks, rs->jwks_len);
}

/* ---- paper codes: the process-wide table of paper ids (resident, revoked), refreshed from PostgreSQL ---- */

typedef struct paper_slot {
    uint8_t id[16];
    int64_t resident_id; /* 0: not known here (a revocation heard of before the code) */
    int64_t expires_at;  /* 0: empty slot */
    int revoked;
} paper_slot_t;

static pthread_rwlock_t paper_lock = PTHREAD_RWLOCK_INITIALIZER;
static paper_slot_t *paper_tab;
static size_t paper_cap, paper_count;

static paper_slot_t *paper_find(paper_slot_t *tab, size_t cap, const uint8_t id[16])
{
    uint64_t a, b;
    memcpy(&a, id, 8);
    memcpy(&b, id + 8, 8);
    size_t i = (size_t)mix64(a ^ mix64(b)) & (cap - 1);
    for (;;) {
        paper_slot_t *s = &tab[i];
        if (s->expires_at == 0 || memcmp(s->id, id, 16) == 0)
            return s;
        i = (i + 1) & (cap - 1);
    }
}

/* With the write lock: drops expired codes and sizes the table to at most a quarter full. */
static void paper_rebuild(int64_t now)
{
    size_t live = 0;
    for (size_t i = 0; i < paper_cap; ++i)
        live += paper_tab[i].expires_at > now;
    size_t cap = 1024;
    while (cap < (live + 1) * 4)
        cap *= 2;
    paper_slot_t *tab = calloc(cap, sizeof(*tab));
    if (tab == NULL)
        abort();
    for (size_t i = 0; i < paper_cap; ++i)
        if (paper_tab[i].expires_at > now)
            *paper_find(tab, cap, paper_tab[i].id) = paper_tab[i];
    free(paper_tab);
    paper_tab = tab;
    paper_cap = cap;
    paper_count = live;
}

/* Records what is known of a paper code; a revocation is never undone. */
static void paper_put(const uint8_t id[16], int64_t resident_id, int64_t expires_at, int revoked)
{
    pthread_rwlock_wrlock(&paper_lock);
    if ((paper_count + 1) * 2 > paper_cap)
        paper_rebuild(time(NULL));
    paper_slot_t *s = paper_find(paper_tab, paper_cap, id);
    if (s->expires_at == 0) {
        memcpy(s->id, id, 16);
        ++paper_count;
    }
    if (resident_id != 0)
        s->resident_id = resident_id;
    if (expires_at > s->expires_at)
        s->expires_at = expires_at;
    s->revoked |= revoked;
    pthread_rwlock_unlock(&paper_lock);
}

/* 1 and the slot's contents when the paper id is known here, else 0. */
static int paper_get(const uint8_t id[16], paper_slot_t *out)
{
    pthread_rwlock_rdlock(&paper_lock);
    int found = 0;
    if (paper_cap != 0) {
        paper_slot_t *s = paper_find(paper_tab, paper_cap, id);
        if (s->expires_at != 0) {
            *out = *s;
            found = 1;
        }
    }
    pthread_rwlock_unlock(&paper_lock);
    return found;
}

static void paper_revoked_heard(const char *payload, size_t len)
{
    char text[37];
    uint8_t id[16];
    if (len != 36)
        return;
    memcpy(text, payload, 36);
    text[36] = '\0';
    if (uuid_parse(text, id) == 0)
        paper_put(id, 0, (int64_t)time(NULL) + PAPER_TTL_S, 1);
}

/* ---- POST /v1/health/verify ---- */

typedef struct verify {
    VerifyResponse resp;
    char *col;
    uint8_t paper[16];
    char paper_text[37];
} verify_t;

static void verify_reply_invalid(ch_call_t *call, const char *reason)
{
    VerifyResponse r = CITYHALL__HEALTHCODE__V1__VERIFY_RESPONSE__INIT;
    r.valid = 0;
    r.reason = (char *)reason;
    ch_reply(call, 200, &r.base);
}

/* A token that is not even three base64url parts with a JSON header is "malformed"; else "bad_signature". */
static const char *verify_refusal(const char *token, size_t len)
{
    const char *d1 = memchr(token, '.', len);
    const char *d2 = d1 != NULL ? memchr(d1 + 1, '.', len - (size_t)(d1 + 1 - token)) : NULL;
    if (d1 == NULL || d2 == NULL || d1 == token || d2 == d1 + 1 || d2 + 1 == token + len || d1 - token > 400)
        return "malformed";
    uint8_t head[320];
    long n = ch_b64url_decode(token, (size_t)(d1 - token), head);
    json_t *h = n > 0 ? json_loadb((const char *)head, (size_t)n, 0, NULL) : NULL;
    int object = json_is_object(h);
    json_decref(h);
    return object ? "bad_signature" : "malformed";
}

static void on_verify_current(ch_call_t *call, hc_entry_t *e, int err)
{
    verify_t *v = ch_call_data(call);
    if (e == NULL) {
        if (err == CH_ENOTFOUND)
            verify_reply_invalid(call, "revoked");
        else
            code_failed(call, err);
        return;
    }
    if (strcmp(hc_color_name(e->color), v->col) != 0) {
        /* the printed color is out of date: the scanner is told so, and the current color */
        v->resp.valid = 0;
        v->resp.reason = "color_changed";
        v->resp.color = (char *)hc_color_name(e->color);
    }
    ch_reply(call, 200, &v->resp.base);
}

static void verify_paper_known(ch_call_t *call, verify_t *v, int64_t resident_id, int revoked)
{
    if (revoked) {
        verify_reply_invalid(call, "revoked");
        return;
    }
    obtain(call, resident_id, on_verify_current);
}

static void on_verify_paper_row(ch_call_t *call, ch_pg_result_t *r)
{
    verify_t *v = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err == CH_EDB ? CH_EDB : CH_EUNAVAIL);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        verify_reply_invalid(call, "revoked"); /* signed by us, yet unknown: not honoured */
        return;
    }
    int64_t rid = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    int revoked = PQgetvalue(res, 0, 1)[0] == 't';
    paper_put(v->paper, rid, strtoll(PQgetvalue(res, 0, 2), NULL, 10), revoked);
    verify_paper_known(call, v, rid, revoked);
}

static uint64_t bytes_hash(const char *p, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ len;
    for (size_t i = 0; i < len; ++i)
        h = (h ^ (uint8_t)p[i]) * 0x100000001b3ULL;
    return mix64(h);
}

const char *hc_token_verify(const ch_keyring_t *ring, const char *token, size_t len, int64_t now, hc_token_t *out)
{
    json_t *claims = NULL;
    if (ch_jws_verify(ring, "hc+jwt", token, len, &claims) != 0)
        return verify_refusal(token, len);
    const char *why = NULL;
    if (ch_jwt_check(claims, "cityhall", NULL, now, VERIFY_LEEWAY_S, &why) != 0) {
        json_decref(claims);
        return why != NULL && strcmp(why, "expired") == 0 ? "expired" : "malformed";
    }
    const char *sub = json_string_value(json_object_get(claims, "sub"));
    const char *nm = json_string_value(json_object_get(claims, "nm"));
    int color = color_parse(json_string_value(json_object_get(claims, "col")));
    json_t *exp = json_object_get(claims, "exp"), *paper = json_object_get(claims, "paper");
    hc_token_t v = {0, color, paper != NULL, {0}, ""};
    int ok = sub != NULL && color >= 0 && nm != NULL && strlen(nm) < sizeof(v.masked) && json_is_integer(exp) &&
             (paper == NULL || uuid_parse(json_string_value(paper), v.paper_id) == 0);
    if (ok) {
        v.exp = json_integer_value(exp);
        snprintf(v.masked, sizeof(v.masked), "%s", nm);
    }
    json_decref(claims);
    if (!ok)
        return "malformed";
    *out = v;
    return NULL;
}

/*
 * hc_token_verify with `rs`'s ring, from the thread's cache when this exact token verified before with this ring.
 * Returns NULL, or the reason the token is not valid.
 */
static const char *token_check(hc_thread_t *t, const ring_state_t *rs, const char *token, size_t len, int64_t now,
                               hc_token_t *out)
{
    verified_t *slot = &t->verified[bytes_hash(token, len) & (VERIFIED_SLOTS - 1)];
    if (slot->token == NULL || slot->ring != rs || slot->len != len || memcmp(slot->token, token, len) != 0) {
        hc_token_t v;
        const char *refusal = hc_token_verify(rs->ring, token, len, now, &v);
        if (refusal != NULL)
            return refusal;
        free(slot->token);
        *slot = (verified_t){rs, xstrndup(token, len), len, v};
    }
    if (!(slot->claims.exp > now - VERIFY_LEEWAY_S))
        return "expired";
    *out = slot->claims;
    return NULL;
}

void hc_verify(ch_call_t *call)
{
    VerifyRequest *req = ch_call_body(call);
    if (req->token == NULL || req->token[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "token: required");
        return;
    }
    size_t len = strlen(req->token);
    if (len > TOKEN_MAX) {
        verify_reply_invalid(call, "malformed");
        return;
    }
    ring_state_t *rs = ring_get();
    if (rs == NULL) {
        ch_fail(call, CH_CODE_UNAVAILABLE, "no signing keys loaded");
        return;
    }
    hc_token_t c;
    const char *refusal = token_check(thread_state(), rs, req->token, len, time(NULL), &c);
    if (refusal != NULL) {
        verify_reply_invalid(call, refusal);
        return;
    }
    verify_t *v = ch_call_alloc(call, sizeof(*v));
    memset(v, 0, sizeof(*v));
    cityhall__healthcode__v1__verify_response__init(&v->resp);
    v->resp.valid = 1;
    v->col = (char *)hc_color_name(c.color);
    v->resp.color = v->col;
    v->resp.masked_name = ch_call_strdup(call, c.masked);
    v->resp.expires_at = timestamp_new(ch_call_allocator(call), c.exp, 0);
    if (!c.paper) {
        ch_reply(call, 200, &v->resp.base);
        return;
    }
    memcpy(v->paper, c.paper_id, 16);
    uuid_format(c.paper_id, v->paper_text);
    ch_call_set_data(call, v);
    paper_slot_t s;
    if (paper_get(v->paper, &s) && (s.revoked || s.resident_id != 0)) {
        verify_paper_known(call, v, s.resident_id, s.revoked);
        return;
    }
    const char **vals = ch_call_alloc(call, sizeof(*vals));
    vals[0] = v->paper_text;
    ch_pg_query_t q = {&stmt_paper_get, vals, NULL};
    int ret = ch_call_pg_read(call, &q, 1, on_verify_paper_row);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/staff/health/paper-codes ---- */

typedef struct paper_issue {
    PaperCode resp;
    int64_t resident_id;
    const char *citizen_id; /* the resident's account, or NULL: then no access-log entry can be written */
    char paper_id[37];
    int64_t iat, exp;
} paper_issue_t;

static void on_paper_committed(ch_call_t *call, ch_pg_result_t *r)
{
    paper_issue_t *pi = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    uint8_t id[16];
    if (uuid_parse(pi->paper_id, id) == 0)
        paper_put(id, pi->resident_id, pi->exp, 0);
    ch_reply(call, 201, &pi->resp.base);
}

static void on_paper_color(ch_call_t *call, hc_entry_t *e, int err)
{
    paper_issue_t *pi = ch_call_data(call);
    if (e == NULL) {
        code_failed(call, err);
        return;
    }
    ring_state_t *rs = ring_get();
    ch_buf_t tok = {0};
    uuid_random(pi->paper_id);
    pi->iat = time(NULL);
    pi->exp = pi->iat + PAPER_TTL_S;
    if (rs == NULL ||
        token_sign(rs->ring, e->code_id, e->color, e->masked, pi->iat, pi->exp, pi->paper_id, &tok) != 0) {
        ch_buf_free(&tok);
        ch_fail(call, CH_CODE_INTERNAL, "internal error");
        return;
    }
    cityhall__healthcode__v1__paper_code__init(&pi->resp);
    pi->resp.paper_id = pi->paper_id;
    pi->resp.token = ch_call_strdup(call, tok.base);
    ch_buf_free(&tok);
    pi->resp.expires_at = timestamp_new(ch_call_allocator(call), pi->exp, 0);
    pi->resp.color = (char *)hc_color_name(e->color);
    pi->resp.masked_name = ch_call_strdup(call, e->masked);

    const ch_principal_t *staff = ch_call_principal(call);
    const char **v = ch_call_alloc(call, 6 * sizeof(*v));
    v[0] = pi->paper_id;
    v[1] = ch_call_printf(call, "%lld", (long long)pi->resident_id);
    v[2] = pi->resp.color;
    v[3] = staff->subject;
    v[4] = ch_call_printf(call, "%lld", (long long)pi->iat);
    v[5] = ch_call_printf(call, "%lld", (long long)pi->exp);
    ch_pg_query_t q[2] = {{&stmt_paper_insert, v, NULL}};
    int n = 1;
    if (pi->citizen_id != NULL)
        ch_audit_query(call, pi->citizen_id, "healthcode.paper_issue", "paper health code printed at a service counter",
                       &q[n++]);
    int ret = ch_call_pg_commit(call, q, n, 201, &pi->resp.base, on_paper_committed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_paper_match(ch_call_t *call, ch_pg_result_t *r)
{
    paper_issue_t *pi = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1 || PQgetvalue(res, 0, 1)[0] != 't') {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "the ID number and name do not match the population registry");
        return;
    }
    pi->resident_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    pi->citizen_id = PQgetisnull(res, 0, 2) ? NULL : ch_call_strdup(call, PQgetvalue(res, 0, 2));
    obtain(call, pi->resident_id, on_paper_color);
}

/* Valid UTF-8 without control characters (a protobuf body is not checked for UTF-8 by the decoder). */
static int text_ok(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p != '\0') {
        unsigned c = *p, n = c < 0x80             ? 1
                             : (c & 0xe0) == 0xc0 ? 2
                             : (c & 0xf0) == 0xe0 ? 3
                             : (c & 0xf8) == 0xf0 ? 4
                                                  : 0;
        if (n == 0 || (n == 1 && (c < 0x20 || c == 0x7f)) || (n == 2 && c < 0xc2) || (n == 4 && c > 0xf4))
            return 0;
        for (unsigned k = 1; k < n; ++k)
            if ((p[k] & 0xc0) != 0x80)
                return 0;
        p += n;
    }
    return 1;
}

void hc_paper_code(ch_call_t *call)
{
    PaperCodeRequest *req = ch_call_body(call);
    const char *why = NULL;
    if (!hc_health_dept(call)) {
        ch_fail(call, CH_CODE_PERMISSION_DENIED, "only health department staff issue paper codes");
        return;
    }
    if (req->id_number == NULL || req->id_number[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "id_number: required");
        return;
    }
    char id[19];
    if (strlen(req->id_number) != 18) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "id_number: must be 18 characters");
        return;
    }
    memcpy(id, req->id_number, 19);
    if (id[17] == 'x')
        id[17] = 'X';
    if (ch_id_number_check(id, &why) != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "id_number: %s", why);
        return;
    }
    const char *name = req->name != NULL ? req->name : "";
    while (*name == ' ')
        ++name;
    size_t nlen = strlen(name);
    while (nlen > 0 && name[nlen - 1] == ' ')
        --nlen;
    if (nlen == 0 || nlen > 64) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "name: 1 to 64 bytes of text");
        return;
    }
    char *trimmed = ch_call_alloc(call, nlen + 1);
    memcpy(trimmed, name, nlen);
    trimmed[nlen] = '\0';
    if (!text_ok(trimmed)) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "name: 1 to 64 bytes of text");
        return;
    }
    paper_issue_t *pi = ch_call_alloc(call, sizeof(*pi));
    memset(pi, 0, sizeof(*pi));
    ch_call_set_data(call, pi);
    uint8_t mac[32];
    ch_pii_hmac(ch_pii, "id", id, 18, mac);
    char *hex = ch_call_alloc(call, 65);
    ch_hex(mac, sizeof(mac), hex);
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = hex;
    v[1] = trimmed;
    ch_pg_query_t q = {&stmt_paper_match, v, NULL};
    int ret = ch_call_pg_read(call, &q, 1, on_paper_match);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/staff/health/paper-codes/{id}/revocation ---- */

typedef struct paper_revoke {
    char paper_id[37];
    uint8_t id[16];
} paper_revoke_t;

static void on_paper_revoked(ch_call_t *call, ch_pg_result_t *r)
{
    paper_revoke_t *pr = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    paper_put(pr->id, 0, (int64_t)time(NULL) + PAPER_TTL_S, 1);
    /* other gateway processes hear it now; a lost message is caught by their resync from PostgreSQL */
    const char *argv[3] = {"PUBLISH", PAPER_CHANNEL, pr->paper_id};
    ch_call_redis(call, noop_redis, 3, argv, NULL);
    ch_reply(call, 204, NULL);
}

static void on_paper_to_revoke(ch_call_t *call, ch_pg_result_t *r)
{
    paper_revoke_t *pr = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such paper code");
        return;
    }
    if (PQgetvalue(res, 0, 1)[0] == 't') {
        ch_reply(call, 204, NULL); /* already revoked: the same outcome */
        return;
    }
    const ch_principal_t *staff = ch_call_principal(call);
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = pr->paper_id;
    v[1] = staff->subject;
    ch_pg_query_t q[2] = {{&stmt_paper_revoke, v, NULL}};
    int n = 1;
    if (!PQgetisnull(res, 0, 3))
        ch_audit_query(call, PQgetvalue(res, 0, 3), "healthcode.paper_revoke", "paper health code revoked", &q[n++]);
    int ret = ch_call_pg(call, q, n, on_paper_revoked);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void hc_paper_code_revoke(ch_call_t *call)
{
    const char *id = ch_call_param(call, "id");
    paper_revoke_t *pr = ch_call_alloc(call, sizeof(*pr));
    if (!hc_health_dept(call) || id == NULL || uuid_parse(id, pr->id) != 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such paper code");
        return;
    }
    uuid_format(pr->id, pr->paper_id);
    ch_call_set_data(call, pr);
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = pr->paper_id;
    ch_pg_query_t q = {&stmt_paper_get, v, NULL};
    int ret = ch_call_pg_read(call, &q, 1, on_paper_to_revoke);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- background: key re-scans and paper-code resync (PostgreSQL, blocking: off the loops) ---- */

static char maint_conninfo[1024];
static PGconn *maint_pg;
static int64_t paper_since; /* Unix seconds: rows updated after this were read (minus the overlap) */
static int paper_failing;

static const char paper_sync_sql[] =
    "SELECT paper_id::text, resident_id, extract(epoch FROM expires_at)::bigint, revoked_at IS NOT NULL, "
    "       extract(epoch FROM updated_at)::bigint "
    "FROM hc_paper_codes WHERE expires_at > now() AND updated_at >= to_timestamp($1::bigint)";

static int paper_sync(void)
{
    if (maint_pg != NULL && PQstatus(maint_pg) != CONNECTION_OK) {
        PQfinish(maint_pg);
        maint_pg = NULL;
    }
    if (maint_pg == NULL) {
        const char *keys[] = {"dbname", "connect_timeout", "tcp_user_timeout", "options", "application_name", NULL};
        const char *vals[] = {maint_conninfo, "3", "10000", "-c statement_timeout=10000", "cityhall-healthcode", NULL};
        maint_pg = PQconnectdbParams(keys, vals, 1);
        if (PQstatus(maint_pg) != CONNECTION_OK) {
            PQfinish(maint_pg);
            maint_pg = NULL;
            if (!paper_failing)
                ch_log(LOG_WARN, "hc_paper_resync", "could not connect to PostgreSQL to read paper codes; retrying");
            paper_failing = 1;
            return -1;
        }
    }
    char since[32];
    int64_t from = paper_since > PAPER_RESYNC_OVERLAP_S ? paper_since - PAPER_RESYNC_OVERLAP_S : 0;
    snprintf(since, sizeof(since), "%lld", (long long)from);
    const char *params[] = {since};
    PGresult *res = PQexecParams(maint_pg, paper_sync_sql, 1, NULL, params, NULL, NULL, 0);
    int ret = 0;
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        int64_t newest = paper_since;
        for (int i = 0; i < PQntuples(res); ++i) {
            uint8_t id[16];
            if (uuid_parse(PQgetvalue(res, i, 0), id) != 0)
                continue;
            paper_put(id, strtoll(PQgetvalue(res, i, 1), NULL, 10), strtoll(PQgetvalue(res, i, 2), NULL, 10),
                      PQgetvalue(res, i, 3)[0] == 't');
            int64_t u = strtoll(PQgetvalue(res, i, 4), NULL, 10);
            if (u > newest)
                newest = u;
        }
        paper_since = newest;
        if (paper_failing)
            ch_log(LOG_INFO, "hc_paper_resync", "paper codes read from PostgreSQL again");
        paper_failing = 0;
    } else {
        if (!paper_failing)
            ch_log(LOG_WARN, "hc_paper_resync", "could not read paper codes: %s", PQresultErrorMessage(res));
        paper_failing = 1;
        ret = -1;
    }
    PQclear(res);
    return ret;
}

static void *maint_main(void *arg)
{
    time_t next_paper = 0;
    for (;;) {
        time_t now = time(NULL);
        ring_rescan();
        if (now >= next_paper)
            next_paper = time(NULL) + (paper_sync() == 0 ? PAPER_RESYNC_S : 2);
        sleep(KEYS_RESCAN_S);
    }
    return NULL;
}

/* ---- background: the "ch:hc" subscription and the delayed deletes (hiredis, blocking with timeouts) ---- */

static char redis_host[64];
static int redis_port;

static redisContext *redis_connect(void)
{
    struct timeval tv = {1, 0};
    redisContext *c = redisConnectWithTimeout(redis_host, redis_port, tv);
    if (c == NULL)
        return NULL;
    if (c->err != 0 || redisSetTimeout(c, tv) != REDIS_OK) {
        redisFree(c);
        return NULL;
    }
    return c;
}

/* Connects and subscribes to both channels; NULL on any failure. */
static redisContext *subscriber_connect(void)
{
    redisContext *c = redis_connect();
    if (c == NULL)
        return NULL;
    redisReply *r = redisCommand(c, "SUBSCRIBE %s %s", CHANNEL, PAPER_CHANNEL);
    int ok = r != NULL && r->type == REDIS_REPLY_ARRAY;
    if (r != NULL)
        freeReplyObject(r);
    void *second = NULL;
    if (ok && redisGetReply(c, &second) != REDIS_OK)
        ok = 0;
    if (second != NULL)
        freeReplyObject(second);
    if (!ok) {
        redisFree(c);
        return NULL;
    }
    return c;
}

/* A message, or the answer to our PING in subscribed mode (["pong", ""]). Returns 1 for a pong. */
static int subscriber_handle(redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 || r->element[0]->type != REDIS_REPLY_STRING)
        return 0;
    const char *kind = r->element[0]->str;
    if (strcmp(kind, "pong") == 0)
        return 1;
    if (strcmp(kind, "message") != 0 || r->elements != 3 || r->element[2]->type != REDIS_REPLY_STRING)
        return 0;
    const char *channel = r->element[1]->str, *payload = r->element[2]->str;
    if (strcmp(channel, CHANNEL) == 0) {
        char buf[24];
        size_t n = r->element[2]->len < sizeof(buf) - 1 ? r->element[2]->len : sizeof(buf) - 1;
        memcpy(buf, payload, n);
        buf[n] = '\0';
        int64_t rid = id_parse(buf);
        if (rid > 0)
            gen_bump(rid);
    } else if (strcmp(channel, PAPER_CHANNEL) == 0) {
        paper_revoked_heard(payload, r->element[2]->len);
    }
    return 0;
}

/* Runs the deletes that are due; those that fail stay queued (Redis down: retried when it is back). */
static void deletes_run(redisContext **cmd)
{
    uint64_t now = ch_now_us();
    for (;;) {
        pthread_mutex_lock(&del_lock);
        int due = del_len > 0 && del_q[del_head].due_us <= now;
        int64_t rid = due ? del_q[del_head].resident_id : 0;
        pthread_mutex_unlock(&del_lock);
        if (!due)
            return;
        if (*cmd == NULL && (*cmd = redis_connect()) == NULL)
            return;
        redisReply *r = redisCommand(*cmd, "DEL hc:code:%lld", (long long)rid);
        if (r == NULL) {
            redisFree(*cmd);
            *cmd = NULL;
            return;
        }
        freeReplyObject(r);
        pthread_mutex_lock(&del_lock);
        if (del_len > 0 && del_q[del_head].resident_id == rid) {
            del_head = (del_head + 1) % del_cap;
            --del_len;
        }
        pthread_mutex_unlock(&del_lock);
    }
}

static void *redis_main(void *arg)
{
    redisContext *sub = NULL, *cmd = NULL;
    int ever = 0;
    unsigned backoff_ms = 50;
    uint64_t last_ping = 0, last_pong = 0;
    for (;;) {
        deletes_run(&cmd);
        if (sub == NULL) {
            sub = subscriber_connect();
            if (sub == NULL) {
                usleep(backoff_ms * 1000);
                backoff_ms = backoff_ms < 1000 ? backoff_ms * 2 : 1000;
                continue;
            }
            backoff_ms = 50;
            if (ever) {
                /* invalidations published while we were away are lost: start every cache afresh */
                cache_flush_all(0);
                ch_log(LOG_INFO, "hc_subscribed", "subscribed to %s again; cached codes dropped", CHANNEL);
            }
            ever = 1;
            last_ping = last_pong = ch_now_us();
        }
        struct pollfd pfd = {sub->fd, POLLIN, 0};
        int n = poll(&pfd, 1, 200);
        int broken = 0;
        if (n > 0) {
            if (redisBufferRead(sub) != REDIS_OK) {
                broken = 1;
            } else {
                void *reply = NULL;
                while (!broken && redisGetReplyFromReader(sub, &reply) == REDIS_OK && reply != NULL) {
                    if (subscriber_handle(reply))
                        last_pong = ch_now_us();
                    freeReplyObject(reply);
                    reply = NULL;
                }
                if (sub->err != 0)
                    broken = 1;
            }
        }
        uint64_t now = ch_now_us();
        if (!broken && now - last_ping >= REDIS_PING_US) {
            int done = 0;
            if (redisAppendCommand(sub, "PING") != REDIS_OK)
                broken = 1;
            while (!broken && !done)
                if (redisBufferWrite(sub, &done) != REDIS_OK)
                    broken = 1;
            last_ping = now;
        }
        if (broken || now - last_pong > REDIS_DEAD_US) {
            redisFree(sub);
            sub = NULL;
        }
    }
    return NULL;
}

/* ---- start-up ---- */

static int thread_start(void *(*fn)(void *))
{
    pthread_t tid;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int ret = pthread_create(&tid, &attr, fn, NULL);
    pthread_attr_destroy(&attr);
    return ret;
}

int hc_init_display(const ch_config_t *config)
{
    if (started)
        return 0;
    char err[512];
    snprintf(ring_dir, sizeof(ring_dir), "%s/keys/healthcode", config->var_dir);
    struct stat st;
    if (stat(ring_dir, &st) != 0) {
        ch_log(LOG_ERROR, "hc_keys", "no health-code signing keys in %s: run `cityhall keys init`", ring_dir);
        return -1;
    }
    ring_mtime = st.st_mtim;
    ch_keyring_t *ring = ch_keyring_load(ring_dir, err, sizeof(err));
    if (ring == NULL) {
        ch_log(LOG_ERROR, "hc_keys", "%s", err);
        return -1;
    }
    __atomic_store_n(&ring_current, ring_state_new(ring), __ATOMIC_RELEASE);
    if (ch_pii == NULL && ch_pii_init(config->var_dir, err, sizeof(err)) != 0) {
        ch_log(LOG_ERROR, "hc_keys", "%s", err);
        return -1;
    }
    pthread_rwlock_wrlock(&paper_lock);
    paper_rebuild(0);
    pthread_rwlock_unlock(&paper_lock);
    snprintf(maint_conninfo, sizeof(maint_conninfo), "%s", config->pg_conninfo);
    snprintf(redis_host, sizeof(redis_host), "%s", config->redis_host);
    redis_port = config->redis_port;
    paper_sync(); /* a failure is logged; the maintenance thread retries */
    if (thread_start(maint_main) != 0 || thread_start(redis_main) != 0) {
        ch_log(LOG_ERROR, "hc_start", "could not start the health-code background threads");
        return -1;
    }
    started = 1;
    ch_log(LOG_INFO, "hc_display_ready", "health-code tokens signed with key %s", ch_keyring_current_kid(ring));
    return 0;
}
