/* Access tokens: issuing (ES256), verifying with a per-thread cache, and the process-wide revocation set. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <libpq-fe.h>
#include <openssl/rand.h>
#include "gateway.h"
#include "cityhall/auth.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"

#define REVOKED_CHANNEL "ch:revoked"
#define SID_MAX         64    /* longer session ids are refused (ours are UUIDs) */
#define CLAIM_MAX       255   /* sub, dept, hall, act, kiosk */
#define CACHE_SLOTS     65536 /* per thread, 2-way set associative; a power of two */
/* A revoked id is kept this long: every token of the session issued before the revocation is expired by then. */
#define REVOKE_HOLD_S    (CH_TOKEN_MAX_TTL_S + CH_TOKEN_LEEWAY_S + 60)
#define KEYS_RESCAN_S    2 /* a stat(2) of the folder; the keys are parsed only when it changed */
#define REVOKED_RESYNC_S 30

/* ---- roles ---- */

static const struct {
    unsigned role;
    const char *name;
} role_names[] = {
    {CH_ROLE_CITIZEN, "citizen"}, {CH_ROLE_STAFF, "staff"}, {CH_ROLE_KIOSK, "kiosk"},
    {CH_ROLE_DEPT, "dept"},       {CH_ROLE_ADMIN, "admin"},
};

const char *ch_role_name(unsigned role)
{
    for (size_t i = 0; i < sizeof(role_names) / sizeof(role_names[0]); ++i)
        if (role_names[i].role == role)
            return role_names[i].name;
    return NULL;
}

unsigned ch_role_parse(const char *name)
{
    if (name == NULL)
        return 0;
    for (size_t i = 0; i < sizeof(role_names) / sizeof(role_names[0]); ++i)
        if (strcmp(role_names[i].name, name) == 0)
            return role_names[i].role;
    return 0;
}

/* ---- the access keyring, replaced whole when the key folder changes ---- */

/*
 * Readers load the pointer once per verification and use that ring throughout; a replaced ring is never
 * freed, because a thread may still be verifying with it (rings are small and rotations rare).
 */
static ch_keyring_t *access_ring;
static char access_dir[600];
static pthread_mutex_t ring_lazy_lock = PTHREAD_MUTEX_INITIALIZER;

static ch_keyring_t *ring_get(void)
{
    return __atomic_load_n(&access_ring, __ATOMIC_ACQUIRE);
}

static void ring_publish(ch_keyring_t *ring)
{
    __atomic_store_n(&access_ring, ring, __ATOMIC_RELEASE);
}

/* Outside `serve` (commands, tests), the first ch_auth_issue loads the ring from the configured data folder. */
static ch_keyring_t *ring_get_or_load(void)
{
    ch_keyring_t *ring = ring_get();
    if (ring != NULL)
        return ring;
    pthread_mutex_lock(&ring_lazy_lock);
    ring = ring_get();
    if (ring == NULL) {
        char dir[600], err[512];
        snprintf(dir, sizeof(dir), "%s/keys/access", ch_config()->var_dir);
        ring = ch_keyring_load(dir, err, sizeof(err));
        if (ring == NULL)
            ch_log(CH_LOG_ERROR, "auth_keys", "%s (run `cityhall keys init`)", err);
        else
            ring_publish(ring);
    }
    pthread_mutex_unlock(&ring_lazy_lock);
    return ring;
}

/* ---- the revocation set ---- */

/*
 * Open addressing over fixed-size slots, rebuilt (expired entries dropped) when half full. The rwlock protects
 * the table; rev_gen counts insertions of new ids so that a cached verification made at generation g needs no
 * look-up while the generation is still g (it is bumped before the inserting call returns).
 */
typedef struct revoked {
    int64_t until; /* Unix seconds; 0 = empty slot */
    uint8_t len;
    char sid[SID_MAX];
} revoked_t;

static pthread_rwlock_t rev_lock = PTHREAD_RWLOCK_INITIALIZER;
static revoked_t *rev_table;
static size_t rev_cap, rev_count;
static uint64_t rev_gen = 1;
static uint64_t hash_seed = 0x243F6A8885A308D3ULL;

static uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/*
 * A fast keyed hash (one multiply per 8 bytes); the key (hash_seed) is random per process so that slots cannot be
 * aimed at from outside. Not collision-resistant, and it need not be: a cache hit also compares the signature,
 * so a colliding token carries a signature its sender already had.
 */
static uint64_t hash_bytes(const void *data, size_t len)
{
    const uint8_t *p = data;
    uint64_t h = hash_seed ^ (len * 0x9E3779B97F4A7C15ULL);
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
        p += 8;
        len -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, len);
    h = (h ^ w ^ (uint64_t)len << 56) * 0xc4ceb9fe1a85ec53ULL;
    return mix64(h);
}

static revoked_t *rev_find(revoked_t *table, size_t cap, const char *sid, size_t len)
{
    size_t i = hash_bytes(sid, len) & (cap - 1);
    for (;;) {
        revoked_t *r = &table[i];
        if (r->until == 0 || (r->len == len && memcmp(r->sid, sid, len) == 0))
            return r;
        i = (i + 1) & (cap - 1);
    }
}

/* With the write lock held: drops expired entries and grows the table so that it is at most a quarter full. */
static void rev_rebuild(int64_t now)
{
    size_t live = 0;
    for (size_t i = 0; i < rev_cap; ++i)
        live += rev_table[i].until > now;
    size_t cap = 1024;
    while (cap < (live + 1) * 4)
        cap *= 2;
    revoked_t *table = calloc(cap, sizeof(*table));
    if (table == NULL)
        abort();
    for (size_t i = 0; i < rev_cap; ++i)
        if (rev_table[i].until > now)
            *rev_find(table, cap, rev_table[i].sid, rev_table[i].len) = rev_table[i];
    free(rev_table);
    rev_table = table;
    rev_cap = cap;
    rev_count = live;
}

/* Records `sid` as revoked until `until` (Unix seconds). Returns 1 if it was not known yet. */
static int rev_insert(const char *sid, size_t len, int64_t until)
{
    if (len == 0 || len > SID_MAX)
        return 0;
    int64_t now = time(NULL);
    int added = 0;
    pthread_rwlock_wrlock(&rev_lock);
    if ((rev_count + 1) * 2 > rev_cap)
        rev_rebuild(now);
    revoked_t *r = rev_find(rev_table, rev_cap, sid, len);
    if (r->until == 0) {
        r->len = (uint8_t)len;
        memcpy(r->sid, sid, len);
        r->until = until;
        ++rev_count;
        added = 1;
        __atomic_add_fetch(&rev_gen, 1, __ATOMIC_RELEASE);
    } else if (r->until < until) {
        r->until = until;
    }
    pthread_rwlock_unlock(&rev_lock);
    return added;
}

static int rev_contains(const char *sid, size_t len)
{
    pthread_rwlock_rdlock(&rev_lock);
    int found = rev_cap != 0 && rev_find(rev_table, rev_cap, sid, len)->until != 0;
    pthread_rwlock_unlock(&rev_lock);
    return found;
}

static void rev_init(void)
{
    pthread_rwlock_wrlock(&rev_lock);
    if (rev_table == NULL)
        rev_rebuild(0);
    pthread_rwlock_unlock(&rev_lock);
}

/* ---- maintenance thread: key folder re-scan and revocation resync from PostgreSQL (blocking is fine here) ---- */

static pthread_mutex_t maint_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t maint_cond = PTHREAD_COND_INITIALIZER;
static int maint_resync_requested;
static char maint_conninfo[1024];
static PGconn *maint_pg;
static struct timespec keys_dir_mtime;
static int maint_failing; /* the last resync failed (logged once per failing stretch) */

/*
 * Revoked sessions whose tokens may still be alive: the hold is counted from the revocation, and never beyond the
 * session's absolute expiry (no token outlives it). The table comes with identity's migration; until it exists
 * the answer is "none".
 */
static const char revoked_sql[] =
    "SELECT session_id::text, extract(epoch FROM least(expires_at, revoked_at + make_interval(secs => $1)))::bigint "
    "FROM sessions WHERE revoked_at IS NOT NULL AND expires_at > now() AND revoked_at > now() - make_interval(secs => "
    "$1)";

/* Returns 0 when the set now holds every revoked session of PostgreSQL, -1 when it could not be read. */
static int revoked_load(void)
{
    if (maint_pg != NULL && PQstatus(maint_pg) != CONNECTION_OK) {
        PQfinish(maint_pg);
        maint_pg = NULL;
    }
    if (maint_pg == NULL) {
        /* the configured conninfo, with timeouts so that a stalled server cannot hang this thread for long */
        const char *keys[] = {"dbname", "connect_timeout", "tcp_user_timeout", "options", "application_name", NULL};
        const char *vals[] = {maint_conninfo, "3", "10000", "-c statement_timeout=10000", "cityhall-auth", NULL};
        maint_pg = PQconnectdbParams(keys, vals, 1);
        if (PQstatus(maint_pg) != CONNECTION_OK) {
            PQfinish(maint_pg);
            maint_pg = NULL;
            if (!maint_failing)
                ch_log(CH_LOG_WARN, "auth_revoked_resync",
                       "could not connect to PostgreSQL to read revoked sessions; "
                       "retrying");
            maint_failing = 1;
            return -1;
        }
    }
    char hold[32];
    snprintf(hold, sizeof(hold), "%d", REVOKE_HOLD_S);
    const char *params[] = {hold};
    PGresult *res = PQexecParams(maint_pg, revoked_sql, 1, NULL, params, NULL, NULL, 0);
    int ret = 0;
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        int64_t margin = CH_TOKEN_LEEWAY_S + 60; /* clock skew between PostgreSQL and this host */
        for (int i = 0; i < PQntuples(res); ++i) {
            const char *sid = PQgetvalue(res, i, 0);
            int64_t until = strtoll(PQgetvalue(res, i, 1), NULL, 10) + margin;
            rev_insert(sid, strlen(sid), until);
        }
    } else {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (state != NULL && strcmp(state, "42P01") == 0) {
            ret = 0; /* no sessions table yet: nothing can have been revoked */
        } else {
            ret = -1;
        }
    }
    if (ret != 0 && !maint_failing)
        ch_log(CH_LOG_WARN, "auth_revoked_resync", "could not read revoked sessions from PostgreSQL (%s); retrying",
               PQresultErrorField(res, PG_DIAG_SQLSTATE) != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE)
                                                                 : "connection problem");
    else if (ret == 0 && maint_failing)
        ch_log(CH_LOG_INFO, "auth_revoked_resync", "revoked sessions read from PostgreSQL again");
    maint_failing = ret != 0;
    PQclear(res);
    return ret;
}

/* Reloads the access keyring when its folder changed (a key added or removed); keeps the old one on error. */
static void keys_rescan(void)
{
    struct stat st;
    if (stat(access_dir, &st) != 0)
        return;
    if (st.st_mtim.tv_sec == keys_dir_mtime.tv_sec && st.st_mtim.tv_nsec == keys_dir_mtime.tv_nsec)
        return;
    char err[512];
    ch_keyring_t *ring = ch_keyring_load(access_dir, err, sizeof(err));
    if (ring == NULL) {
        ch_log(CH_LOG_ERROR, "auth_keys_reload", "keeping the current keys: %s", err);
        return; /* retried at the next re-scan */
    }
    keys_dir_mtime = st.st_mtim;
    ch_keyring_t *old = ring_get();
    if (old != NULL && strcmp(ch_keyring_current_kid(old), ch_keyring_current_kid(ring)) == 0) {
        ch_buf_t a = {0}, b = {0};
        ch_keyring_jwks(old, &a);
        ch_keyring_jwks(ring, &b);
        int same = a.len == b.len && memcmp(a.base, b.base, a.len) == 0;
        ch_buf_free(&a);
        ch_buf_free(&b);
        if (same) {
            ch_keyring_free(ring);
            return;
        }
    }
    ring_publish(ring); /* the old ring is leaked on purpose: threads may hold it */
    ch_log(CH_LOG_INFO, "auth_keys_reloaded", "access keyring reloaded from %s; signing key %s", access_dir,
           ch_keyring_current_kid(ring));
}

static void *maint_main(void *arg)
{
    int loaded = *(int *)arg;
    free(arg);
    time_t next_keys = time(NULL) + KEYS_RESCAN_S;
    time_t next_resync = time(NULL) + (loaded ? REVOKED_RESYNC_S : 1);
    for (;;) {
        pthread_mutex_lock(&maint_lock);
        time_t due = next_keys < next_resync ? next_keys : next_resync;
        struct timespec ts = {due, 0};
        while (!maint_resync_requested && time(NULL) < due)
            if (pthread_cond_timedwait(&maint_cond, &maint_lock, &ts) == ETIMEDOUT)
                break;
        int requested = maint_resync_requested;
        maint_resync_requested = 0;
        pthread_mutex_unlock(&maint_lock);

        time_t now = time(NULL);
        if (now >= next_keys) {
            keys_rescan();
            next_keys = now + KEYS_RESCAN_S;
        }
        if (requested || now >= next_resync) {
            int ok = revoked_load() == 0;
            /* until the first full read succeeds, retry every second */
            next_resync = time(NULL) + (ok ? REVOKED_RESYNC_S : (loaded ? 5 : 1));
            loaded |= ok;
        }
    }
    return NULL;
}

static void maint_request_resync(void)
{
    pthread_mutex_lock(&maint_lock);
    maint_resync_requested = 1;
    pthread_cond_signal(&maint_cond);
    pthread_mutex_unlock(&maint_lock);
}

/* ---- start-up ---- */

static int auth_started;

int ch_auth_init(const ch_config_t *config, char *err, size_t errlen)
{
    if (auth_started)
        return 0;
    if (ch_pii_init(config->var_dir, err, errlen) != 0)
        return -1;
    snprintf(access_dir, sizeof(access_dir), "%s/keys/access", config->var_dir);
    struct stat st;
    if (stat(access_dir, &st) != 0) {
        snprintf(err, errlen, "no access-token keys in %s: run `cityhall keys init`", access_dir);
        return -1;
    }
    keys_dir_mtime = st.st_mtim;
    ch_keyring_t *ring = ch_keyring_load(access_dir, err, errlen);
    if (ring == NULL)
        return -1;
    ring_publish(ring);

    uint64_t seed;
    if (getrandom(&seed, sizeof(seed), 0) == sizeof(seed))
        hash_seed = seed;
    rev_init();

    snprintf(maint_conninfo, sizeof(maint_conninfo), "%s", config->pg_conninfo);
    int *loaded = malloc(sizeof(*loaded));
    if (loaded == NULL)
        abort();
    *loaded = revoked_load() == 0; /* a failure is logged; the maintenance thread retries every second */
    pthread_t tid;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&tid, &attr, maint_main, loaded) != 0) {
        snprintf(err, errlen, "could not start the auth maintenance thread");
        return -1;
    }
    pthread_attr_destroy(&attr);
    auth_started = 1;
    ch_log(CH_LOG_INFO, "auth_ready", "access tokens signed with key %s", ch_keyring_current_kid(ring));
    return 0;
}

/* ---- per-thread verified-token cache ---- */

enum { S_SUBJECT, S_SID, S_DEPT, S_HALL, S_ACTOR, S_DEVICE, S__COUNT };

typedef struct cache_entry {
    uint64_t hash;            /* hash_bytes of the whole token */
    const ch_keyring_t *ring; /* the ring that verified it: another ring (rotation) means verify again */
    uint64_t rev_gen;         /* revocation generation at which the session was last seen not revoked */
    int64_t exp;
    unsigned role;
    uint8_t siglen;
    char sig[88];          /* the signature part, compared on every hit */
    int16_t off[S__COUNT]; /* offsets into strs, -1 for absent */
    uint16_t strs_len;
    char strs[];
} cache_entry_t;

typedef struct auth_thread {
    ch_thread_t *thread;
    cache_entry_t **slots;
    uint64_t rng;
    uint64_t redis_reconnects;
    h2o_timeout_t watch_timeout;
    h2o_timeout_entry_t watch;
} auth_thread_t;

static void on_revoked_message(void *arg, const char *channel, const char *payload, size_t len)
{
    rev_insert(payload, len, (int64_t)time(NULL) + REVOKE_HOLD_S);
}

/* Once a second: a Redis reconnect (of either connection) may have lost revocations; read them from PostgreSQL. */
static void on_watch(h2o_timeout_entry_t *entry)
{
    auth_thread_t *a = H2O_STRUCT_FROM_MEMBER(auth_thread_t, watch, entry);
    ch_redis_stats_t stats;
    ch_redis_stats(a->thread->redis, &stats);
    if (stats.reconnects != a->redis_reconnects) {
        a->redis_reconnects = stats.reconnects;
        maint_request_resync();
    }
    h2o_timeout_link(a->thread->loop, &a->watch_timeout, &a->watch);
}

void ch_auth_thread_init(ch_thread_t *thread)
{
    auth_thread_t *a = calloc(1, sizeof(*a));
    if (a == NULL || (a->slots = calloc(CACHE_SLOTS, sizeof(*a->slots))) == NULL)
        abort();
    a->thread = thread;
    a->rng = thread->rng ^ 0x5851F42D4C957F2DULL;
    if (a->rng == 0)
        a->rng = 1;
    thread->auth = a;
    rev_init();
    if (thread->redis != NULL) {
        if (ch_redis_subscribe(thread->redis, REVOKED_CHANNEL, on_revoked_message, NULL) != 0)
            ch_log(CH_LOG_ERROR, "auth_subscribe", "thread %u could not subscribe to %s", thread->index,
                   REVOKED_CHANNEL);
        if (thread->loop != NULL) {
            h2o_timeout_init(thread->loop, &a->watch_timeout, 1000);
            a->watch.cb = on_watch;
            h2o_timeout_link(thread->loop, &a->watch_timeout, &a->watch);
        }
    }
}

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Copies the entry's principal into the request pool. */
static void principal_fill(const cache_entry_t *e, h2o_mem_pool_t *pool, ch_principal_t *p)
{
    char *strs = h2o_mem_alloc_pool(pool, e->strs_len);
    memcpy(strs, e->strs, e->strs_len);
    const char **dst[S__COUNT] = {&p->subject, &p->session_id, &p->dept, &p->hall, &p->actor, &p->device};
    for (int i = 0; i < S__COUNT; ++i)
        *dst[i] = e->off[i] >= 0 ? strs + e->off[i] : NULL;
    p->role = e->role;
    p->expires_at = e->exp;
}

/* An optional string claim: absent (NULL), or a non-empty string without NUL of at most `max` bytes. */
static int claim_str(json_t *claims, const char *name, int required, size_t max, const char **out, size_t *len)
{
    json_t *v = json_object_get(claims, name);
    *out = NULL;
    *len = 0;
    if (v == NULL)
        return required ? -1 : 0;
    if (!json_is_string(v))
        return -1;
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    if (n == 0 || n > max || strlen(s) != n)
        return -1;
    *out = s;
    *len = n;
    return 0;
}

/* Verifies signature and claims; returns a new cache entry or NULL. */
static cache_entry_t *verify_full(const ch_keyring_t *ring, const char *token, size_t len, int64_t now)
{
    json_t *claims = NULL;
    if (ch_jws_verify(ring, CH_TOKEN_TYP_ACCESS, token, len, &claims) != 0)
        return NULL;
    cache_entry_t *e = NULL;
    const char *why = NULL;
    if (ch_jwt_check(claims, CH_TOKEN_ISS, CH_TOKEN_AUD, now, CH_TOKEN_LEEWAY_S, &why) != 0)
        goto out;
    const char *s[S__COUNT], *role, *jti;
    size_t l[S__COUNT], rlen, jlen;
    static const char *const names[S__COUNT] = {"sub", "sid", "dept", "hall", "act", "kiosk"};
    for (int i = 0; i < S__COUNT; ++i)
        if (claim_str(claims, names[i], i <= S_SID, i == S_SID ? SID_MAX : CLAIM_MAX, &s[i], &l[i]) != 0)
            goto out;
    if (claim_str(claims, "role", 1, 16, &role, &rlen) != 0 || claim_str(claims, "jti", 1, CLAIM_MAX, &jti, &jlen) != 0)
        goto out;
    unsigned r = ch_role_parse(role);
    json_t *exp = json_object_get(claims, "exp");
    if (r == 0 || !json_is_integer(exp))
        goto out;
    size_t total = 0;
    for (int i = 0; i < S__COUNT; ++i)
        total += s[i] != NULL ? l[i] + 1 : 0;
    e = calloc(1, sizeof(*e) + total);
    if (e == NULL)
        abort();
    size_t o = 0;
    for (int i = 0; i < S__COUNT; ++i) {
        if (s[i] == NULL) {
            e->off[i] = -1;
            continue;
        }
        e->off[i] = (int16_t)o;
        memcpy(e->strs + o, s[i], l[i] + 1);
        o += l[i] + 1;
    }
    e->strs_len = (uint16_t)total;
    e->role = r;
    e->exp = json_integer_value(exp);
    e->ring = ring;
out:
    json_decref(claims);
    return e;
}

int ch_auth_verify(ch_thread_t *thread, const char *token, size_t len, h2o_mem_pool_t *pool, ch_principal_t *principal)
{
    auth_thread_t *a = thread->auth;
    const ch_keyring_t *ring = ring_get();
    if (a == NULL || ring == NULL || len < 16 || len > 8192)
        return CH_EINVAL;
    const char *dot = memrchr(token, '.', len);
    if (dot == NULL)
        return CH_EINVAL;
    size_t siglen = len - (size_t)(dot + 1 - token);
    if (siglen == 0 || siglen > sizeof(((cache_entry_t *)0)->sig))
        return CH_EINVAL;
    int64_t now = time(NULL);
    uint64_t h = hash_bytes(token, len);
    size_t base = (size_t)h & (CACHE_SLOTS - 1) & ~(size_t)1;

    for (size_t k = base; k < base + 2; ++k) {
        cache_entry_t *e = a->slots[k];
        if (e == NULL || e->hash != h || e->siglen != siglen || memcmp(e->sig, dot + 1, siglen) != 0)
            continue;
        int valid = e->ring == ring && e->exp > now - CH_TOKEN_LEEWAY_S;
        if (valid) {
            uint64_t gen = __atomic_load_n(&rev_gen, __ATOMIC_ACQUIRE);
            if (gen != e->rev_gen) {
                if (rev_contains(e->strs + e->off[S_SID], strlen(e->strs + e->off[S_SID])))
                    valid = 0;
                else
                    e->rev_gen = gen;
            }
        }
        if (!valid) {
            /* expired, revoked, or verified with a ring since replaced: drop it (a re-verification decides) */
            int again = e->ring != ring && e->exp > now - CH_TOKEN_LEEWAY_S;
            a->slots[k] = NULL;
            free(e);
            if (again)
                break;
            return CH_EINVAL;
        }
        principal_fill(e, pool, principal);
        return 0;
    }

    cache_entry_t *e = verify_full(ring, token, len, now);
    if (e == NULL)
        return CH_EINVAL;
    uint64_t gen = __atomic_load_n(&rev_gen, __ATOMIC_ACQUIRE);
    const char *sid = e->strs + e->off[S_SID];
    if (rev_contains(sid, strlen(sid))) {
        free(e);
        return CH_EINVAL;
    }
    e->rev_gen = gen;
    e->hash = h;
    e->siglen = (uint8_t)siglen;
    memcpy(e->sig, dot + 1, siglen);
    size_t k = a->slots[base] == NULL ? base : a->slots[base + 1] == NULL ? base + 1 : base + (rng_next(&a->rng) & 1);
    free(a->slots[k]);
    a->slots[k] = e;
    principal_fill(e, pool, principal);
    return 0;
}

/* ---- issuing and revoking ---- */

static void append_json_str(ch_buf_t *b, const char *name, const char *value)
{
    char esc[6 * 256 + 8];
    size_t vlen = strlen(value);
    ch_buf_append(b, ",\"", 2);
    ch_buf_append(b, name, strlen(name));
    ch_buf_append(b, "\":\"", 3);
    while (vlen > 0) {
        size_t chunk = vlen > 256 ? 256 : vlen;
        /* never split a UTF-8 sequence across chunks: back up to a lead byte */
        while (chunk < vlen && chunk > 1 && ((unsigned char)value[chunk] & 0xC0) == 0x80)
            --chunk;
        ch_buf_append(b, esc, ch_json_escape(esc, sizeof(esc), value, chunk));
        value += chunk;
        vlen -= chunk;
    }
    ch_buf_append(b, "\"", 1);
}

static int claim_ok(const char *s, size_t max)
{
    return s == NULL || (s[0] != '\0' && strlen(s) <= max);
}

int ch_auth_issue(const ch_principal_t *p, int64_t ttl_s, ch_buf_t *out, int64_t *exp)
{
    const char *role = ch_role_name(p->role);
    if (role == NULL || p->subject == NULL || p->session_id == NULL || !claim_ok(p->subject, CLAIM_MAX) ||
        !claim_ok(p->session_id, SID_MAX) || !claim_ok(p->dept, CLAIM_MAX) || !claim_ok(p->hall, CLAIM_MAX) ||
        !claim_ok(p->actor, CLAIM_MAX) || !claim_ok(p->device, CLAIM_MAX) || ttl_s <= 0 || ttl_s > CH_TOKEN_MAX_TTL_S)
        return CH_EINVAL;
    ch_keyring_t *ring = ring_get_or_load();
    if (ring == NULL)
        return CH_EINVAL;
    int64_t now = time(NULL), e = now + ttl_s;
    if (p->expires_at > 0 && e > p->expires_at)
        e = p->expires_at;
    if (e <= now)
        return CH_EINVAL;

    uint8_t rnd[16];
    if (RAND_bytes(rnd, sizeof(rnd)) != 1)
        return CH_EINVAL;
    ch_buf_t jti = {0}, c = {0};
    ch_b64url_encode(rnd, sizeof(rnd), &jti);

    char head[128];
    int n = snprintf(head, sizeof(head),
                     "{\"iss\":\"" CH_TOKEN_ISS "\",\"aud\":\"" CH_TOKEN_AUD "\",\"iat\":%lld,\"exp\":%lld",
                     (long long)now, (long long)e);
    ch_buf_append(&c, head, (size_t)n);
    append_json_str(&c, "sub", p->subject);
    append_json_str(&c, "sid", p->session_id);
    append_json_str(&c, "role", role);
    append_json_str(&c, "jti", jti.base);
    if (p->dept != NULL)
        append_json_str(&c, "dept", p->dept);
    if (p->hall != NULL)
        append_json_str(&c, "hall", p->hall);
    if (p->actor != NULL)
        append_json_str(&c, "act", p->actor);
    if (p->device != NULL)
        append_json_str(&c, "kiosk", p->device);
    ch_buf_append(&c, "}", 1);
    int ret = ch_jws_sign(ring, CH_TOKEN_TYP_ACCESS, c.base, c.len, out);
    ch_buf_free(&c);
    ch_buf_free(&jti);
    if (ret == 0 && exp != NULL)
        *exp = e;
    return ret;
}

void ch_auth_revoke(ch_call_t *call, const char *sid)
{
    if (sid == NULL)
        return;
    size_t len = strlen(sid);
    rev_init();
    rev_insert(sid, len, (int64_t)time(NULL) + REVOKE_HOLD_S);
    /* other gateway processes learn it through Redis; a lost message is caught by their PostgreSQL resync */
    unsigned index = ch_call_thread(call);
    if (index >= ch_server.nthreads || ch_server.threads[index]->redis == NULL)
        return;
    const char *argv[] = {"PUBLISH", REVOKED_CHANNEL, sid};
    size_t argvlen[] = {7, sizeof(REVOKED_CHANNEL) - 1, len};
    int ret = ch_redis_commandargv(ch_server.threads[index]->redis, NULL, NULL, 3, argv, argvlen);
    if (ret != 0)
        ch_log(CH_LOG_WARN, "auth_revoke_publish",
               "could not publish a revocation (%d); other processes resync from "
               "PostgreSQL within %d s",
               ret, REVOKED_RESYNC_S);
}
