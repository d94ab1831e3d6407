/* One-thing dispatch: the outbox workers that deliver items to departments, the deadline sweeper and SMS sender,
 * and the `dept endpoint` and `onething sweep` commands. All of it runs on its own threads with blocking libpq. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <libpq-fe.h>
#include <openssl/crypto.h>
#include "cityhall/pii.h"
#include "dispatch.h"
#include "gateway.h" /* ch_log */

/*
 * The outbox is the only queue: a submission (or a decision that unblocks items) commits outbox rows together
 * with the items, and the workers here deliver them. A worker claims due rows with FOR UPDATE SKIP LOCKED and
 * keeps its transaction open while it delivers them, then records every outcome and commits. So several gateway
 * processes share the work without a coordinator, and a worker killed mid-batch simply lets its locks go with its
 * connection: the rows are still pending and the next worker delivers them. A department may therefore receive an
 * item twice (delivered, then the process died before its commit); it deduplicates by the item's idempotency key.
 *
 * Workers wake on ot_dispatch_wake() from this process (called after a commit that created outbox rows), on
 * NOTIFY ot_outbox (for other processes, e.g. `cityhall dept endpoint` after fixing an endpoint), and every poll
 * interval (100 ms: rows committed by another gateway process); a row waiting for its retry is taken when due.
 * Why not a NOTIFY in every submission: PostgreSQL serialises the commits of notifying transactions (a global lock
 * held through the commit's WAL flush); measured here, it cut submissions from ~630 to ~170 per second.
 * A worker sends its batch's requests at once (16 in flight, at most 8 to one department, on keep-alive
 * connections), so a batch takes about one round trip, and a slow department delays only its own items of that
 * batch by at most the response timeout; several workers (4 by default) share the rows.
 */

/* ---- settings (environment, read once at start) ---- */

static struct {
    char conninfo[1024];
    char var_dir[400];
    unsigned workers;        /* CITYHALL_DISPATCH_WORKERS */
    unsigned batch;          /* CITYHALL_DISPATCH_BATCH: rows claimed at once */
    unsigned backoff_ms;     /* CITYHALL_DISPATCH_BACKOFF_MS: first retry delay, doubling */
    unsigned backoff_cap_ms; /* CITYHALL_DISPATCH_BACKOFF_CAP_MS */
    unsigned max_attempts;   /* CITYHALL_DISPATCH_MAX_ATTEMPTS: then failed_technical */
    unsigned connect_ms;     /* CITYHALL_DISPATCH_CONNECT_TIMEOUT_MS */
    unsigned response_ms;    /* CITYHALL_DISPATCH_RESPONSE_TIMEOUT_MS */
    unsigned parallel;       /* CITYHALL_DISPATCH_PARALLEL: requests in flight per worker */
    unsigned per_endpoint;   /* CITYHALL_DISPATCH_PER_ENDPOINT: of which to one department */
    unsigned poll_ms;        /* CITYHALL_DISPATCH_POLL_MS: fallback when no notification comes */
    unsigned sweep_s;        /* CITYHALL_SWEEP_INTERVAL_S */
} cfg = {"", "", 4, 64, 200, 30000, 8, 2000, 5000, 16, 8, 100, 60};

static int env_uint(const char *name, unsigned min, unsigned max, unsigned *out)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return 0;
    char *end;
    errno = 0;
    unsigned long n = strtoul(v, &end, 10);
    if (errno != 0 || *end != '\0' || n < min || n > max) {
        ch_log(CH_LOG_ERROR, "startup_failed", "%s: expected a whole number from %u to %u", name, min, max);
        return -1;
    }
    *out = (unsigned)n;
    return 0;
}

/* ---- waking the workers ---- */

static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond; /* on CLOCK_MONOTONIC, set up by ot_init_dispatch */
static int wake_ready;           /* wake_cond is set up (a wake before then has no worker to wake) */
static uint64_t wake_gen;        /* bumped by every wake; a worker sleeps only while it is unchanged */

void ot_dispatch_wake(void)
{
    if (!__atomic_load_n(&wake_ready, __ATOMIC_ACQUIRE))
        return;
    pthread_mutex_lock(&wake_lock);
    ++wake_gen;
    pthread_cond_broadcast(&wake_cond);
    pthread_mutex_unlock(&wake_lock);
}

static uint64_t wake_generation(void)
{
    pthread_mutex_lock(&wake_lock);
    uint64_t g = wake_gen;
    pthread_mutex_unlock(&wake_lock);
    return g;
}

/* Sleeps up to `ms` unless a wake comes after generation `seen`. */
static void wake_wait(uint64_t seen, unsigned ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&wake_lock);
    while (wake_gen == seen)
        if (pthread_cond_timedwait(&wake_cond, &wake_lock, &ts) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&wake_lock);
}

/* ---- PostgreSQL on the dispatch threads (blocking, with timeouts) ---- */

static void notice_drop(void *arg, const char *message)
{
}

/*
 * A connection with connect and statement timeouts, so that a stalled server never hangs a thread for long.
 * `async_commit`: the workers' commits do not wait for the WAL flush. What a worker commits can always be derived
 * again: if PostgreSQL crashed before flushing a batch's outcome, its rows are simply pending again and delivered
 * again (the department dedups by key), so waiting for every flush would only slow dispatch down.
 */
static PGconn *db_connect(const char *conninfo, const char *app, int async_commit)
{
    const char *keys[] = {"dbname", "connect_timeout", "tcp_user_timeout", "options", "application_name", NULL};
    const char *vals[] = {conninfo,
                          "3",
                          "10000",
                          async_commit ? "-c statement_timeout=15000 -c client_min_messages=warning "
                                         "-c synchronous_commit=off"
                                       : "-c statement_timeout=15000 -c client_min_messages=warning",
                          app,
                          NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(conn) != CONNECTION_OK) {
        PQfinish(conn);
        return NULL;
    }
    PQsetNoticeProcessor(conn, notice_drop, NULL);
    return conn;
}

/*
 * Logs a refused statement, at most one line every 10 s across the dispatch threads (PostgreSQL down or a schema
 * not migrated yet would otherwise log a line per retry); the lines left out are counted in the next one.
 */
static void log_db_error(PGresult *res, const char *event)
{
    static int64_t last_s;
    static unsigned suppressed;
    int64_t now = (int64_t)time(NULL), last = __atomic_load_n(&last_s, __ATOMIC_RELAXED);
    if (now - last < 10 || !__atomic_compare_exchange_n(&last_s, &last, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        __atomic_add_fetch(&suppressed, 1, __ATOMIC_RELAXED);
        return;
    }
    unsigned left_out = __atomic_exchange_n(&suppressed, 0, __ATOMIC_RELAXED);
    const char *state = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res != NULL ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    ch_log(CH_LOG_WARN, event, "%s: %s (%u similar lines left out)", state != NULL ? state : "connection problem",
           msg != NULL ? msg : "-", left_out);
}

/* Runs a command that returns no rows; 0 or -1 (logged without parameters). */
static int db_command(PGconn *conn, const char *sql, const char *event)
{
    PGresult *res = PQexec(conn, sql);
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
    if (!ok)
        log_db_error(res, event);
    PQclear(res);
    return ok ? 0 : -1;
}

static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = strlen(hex) / 2;
    if (n > cap)
        return 0;
    for (size_t i = 0; i < n; ++i) {
        int hi = hex[2 * i], lo = hex[2 * i + 1];
        hi = hi <= '9' ? hi - '0' : (hi | 0x20) - 'a' + 10;
        lo = lo <= '9' ? lo - '0' : (lo | 0x20) - 'a' + 10;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return n;
}

json_t *ot_fields_open(const char *hex)
{
    size_t cap = strlen(hex) / 2 + 1;
    uint8_t *sealed = malloc(cap);
    if (sealed == NULL)
        abort();
    size_t n = unhex(hex, sealed, cap);
    ch_buf_t plain = {0};
    json_t *obj = NULL;
    if (n > 0 && ch_pii_decrypt(ch_pii, sealed, n, &plain) == 0) {
        obj = json_loadb(plain.base, plain.len, 0, NULL);
        if (obj != NULL && !json_is_object(obj)) {
            json_decref(obj);
            obj = NULL;
        }
        memset(plain.base, 0, plain.len);
    }
    ch_buf_free(&plain);
    free(sealed);
    return obj;
}

/* ---- the catalog as a worker needs it: fields per (version, bundle, item), cached (versions never change) ---- */

typedef struct item_info {
    struct item_info *next;
    int version;
    char bundle[64], code[64];
    json_t *fields; /* [{"name","type"}] */
    char *name;
} item_info_t;

static const item_info_t *item_info_get(PGconn *conn, item_info_t **cache, int version, const char *bundle,
                                        const char *code)
{
    for (item_info_t *i = *cache; i != NULL; i = i->next)
        if (i->version == version && strcmp(i->bundle, bundle) == 0 && strcmp(i->code, code) == 0)
            return i;
    char vs[16];
    snprintf(vs, sizeof(vs), "%d", version);
    const char *v[3] = {vs, bundle, code};
    PGresult *res =
        PQexecParams(conn, "SELECT ot_item_fields($1::integer, $2, $3)::text, ot_item_name($1::integer, $3)", 3, NULL,
                     v, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        log_db_error(res, "dispatch_catalog");
        PQclear(res);
        return NULL;
    }
    item_info_t *i = calloc(1, sizeof(*i));
    if (i == NULL)
        abort();
    i->version = version;
    snprintf(i->bundle, sizeof(i->bundle), "%s", bundle);
    snprintf(i->code, sizeof(i->code), "%s", code);
    i->fields = json_loads(PQgetvalue(res, 0, 0), 0, NULL);
    if (i->fields == NULL)
        i->fields = json_array();
    i->name = strdup(PQgetvalue(res, 0, 1));
    if (i->name == NULL)
        abort();
    PQclear(res);
    i->next = *cache;
    *cache = i;
    return i;
}

/* ---- delivery ---- */

/*
 * Claims up to $1 due rows; the row locks last until this worker's transaction ends. No ORDER BY: under a backlog
 * (and with the fast-growing table's statistics behind) sorting every due row per claim costs more than it is
 * worth; the index and the heap both hand out rows roughly oldest first.
 */
static const char claim_sql[] =
    "WITH c AS (SELECT outbox_id FROM outbox WHERE state = 'pending' AND next_attempt_at <= now() "
    "           LIMIT $1 FOR UPDATE SKIP LOCKED) "
    "SELECT o.outbox_id, o.kind, o.attempts, o.dept, i.item_id, i.item_code, i.dispatch_key, i.state, a.state, "
    "       i.application_id, a.catalog_version, a.bundle_code, e.url, encode(e.secret_enc, 'hex'), "
    "       CASE WHEN e.url IS NULL THEN NULL ELSE encode(a.fields_enc, 'hex') END, "
    "       CASE WHEN e.url IS NULL THEN NULL WHEN cardinality(i.depends_on) = 0 THEN '{}' ELSE "
    "       (SELECT coalesce(jsonb_object_agg(l.type, l.data || jsonb_build_object('licence_number', l.licence_number, "
    "                        'issued_at', l.issued_at, 'valid_until', l.valid_until)), '{}') "
    "        FROM application_items x JOIN licences l ON l.licence_id = x.licence_id "
    "        WHERE x.application_id = i.application_id AND x.item_code = ANY (i.depends_on))::text END, "
    "       to_char(i.due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') "
    "FROM c JOIN outbox o USING (outbox_id) JOIN application_items i ON i.item_id = o.item_id "
    "     JOIN applications a ON a.application_id = i.application_id LEFT JOIN dept_endpoints e ON e.dept = o.dept "
    "ORDER BY o.outbox_id";

enum {
    C_ID,
    C_KIND,
    C_ATTEMPTS,
    C_DEPT,
    C_ITEM,
    C_CODE,
    C_KEY,
    C_STATE,
    C_APP_STATE,
    C_APP,
    C_VERSION,
    C_BUNDLE,
    C_URL,
    C_SECRET,
    C_FIELDS,
    C_LICENCES,
    C_DUE
};

typedef struct outcome {
    const char *what; /* delivered, queued, failed, deferred, cancelled */
    char error[160];
    unsigned delay_ms;
} outcome_t;

/* Per worker: its connection, keep-alive connections to the departments, and the catalog cache. */
typedef struct worker {
    unsigned index;
    PGconn *conn;
    item_info_t *items;
    ot_http_pool_t http;
    uint64_t rng;
} worker_t;

static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* base * 2^attempts, capped, times a jitter in [0.75, 1.25) so that retries of a burst spread out. */
static unsigned backoff(worker_t *w, int attempts)
{
    uint64_t d = cfg.backoff_ms;
    for (int i = 0; i < attempts && d < cfg.backoff_cap_ms; ++i)
        d *= 2;
    if (d > cfg.backoff_cap_ms)
        d = cfg.backoff_cap_ms;
    uint64_t j = rng_next(&w->rng) % 1000;
    return (unsigned)(d * (750 + j / 2) / 1000);
}

/* The body a department receives: the item, this item's form values only, and the licences it builds on. */
static char *payload(PGresult *res, int row, const item_info_t *info, json_t *values, const char *key)
{
    json_t *fields = json_object();
    size_t i;
    json_t *f;
    json_array_foreach(info->fields, i, f)
    {
        const char *name = json_string_value(json_object_get(f, "name"));
        json_t *v = name != NULL && values != NULL ? json_object_get(values, name) : NULL;
        if (v != NULL)
            json_object_set(fields, name, v);
    }
    json_t *licences = json_loads(PQgetvalue(res, row, C_LICENCES), 0, NULL);
    json_t *body = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:i, s:o, s:o}", "item_id", PQgetvalue(res, row, C_ITEM),
                             "item_code", PQgetvalue(res, row, C_CODE), "item_name", info->name, "application_id",
                             PQgetvalue(res, row, C_APP), "kind", PQgetvalue(res, row, C_KIND), "idempotency_key", key,
                             "attempt", atoi(PQgetvalue(res, row, C_ATTEMPTS)) + 1, "fields", fields, "licences",
                             licences != NULL ? licences : json_object());
    if (body == NULL)
        abort();
    if (!PQgetisnull(res, row, C_DUE))
        json_object_set_new(body, "due_at", json_string(PQgetvalue(res, row, C_DUE)));
    char *s = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (s == NULL)
        abort();
    return s;
}

/* One delivery being made: the request and what it needs until the answer is in. */
typedef struct delivery {
    int row;
    ot_url_t url;
    char headers[512];
    char *body;
} delivery_t;

/*
 * Prepares the POST of one row (URL, signed body, headers) into `d`; returns 0, or -1 after setting the row's
 * outcome when it cannot be sent at all.
 */
static int delivery_prepare(worker_t *w, PGresult *res, int row, delivery_t *d, outcome_t *out)
{
    const item_info_t *info = item_info_get(w->conn, &w->items, atoi(PQgetvalue(res, row, C_VERSION)),
                                            PQgetvalue(res, row, C_BUNDLE), PQgetvalue(res, row, C_CODE));
    if (info == NULL) {
        out->what = "deferred";
        out->delay_ms = cfg.backoff_ms;
        return -1;
    }
    const char *why = NULL;
    if (ot_url_parse(PQgetvalue(res, row, C_URL), &d->url, &why) != 0) {
        out->what = "failed";
        out->delay_ms = backoff(w, atoi(PQgetvalue(res, row, C_ATTEMPTS)));
        snprintf(out->error, sizeof(out->error), "bad endpoint url: %s", why);
        return -1;
    }
    uint8_t sealed[512];
    size_t sn = unhex(PQgetvalue(res, row, C_SECRET), sealed, sizeof(sealed));
    ch_buf_t secret = {0};
    if (sn == 0 || ch_pii_decrypt(ch_pii, sealed, sn, &secret) != 0) {
        ch_buf_free(&secret);
        out->what = "failed";
        out->delay_ms = backoff(w, atoi(PQgetvalue(res, row, C_ATTEMPTS)));
        snprintf(out->error, sizeof(out->error), "the endpoint secret does not open with this data key");
        return -1;
    }
    json_t *values = ot_fields_open(PQgetvalue(res, row, C_FIELDS));
    char key[200];
    if (strcmp(PQgetvalue(res, row, C_KIND), "dispatch") == 0)
        snprintf(key, sizeof(key), "%s", PQgetvalue(res, row, C_KEY));
    else /* a resubmission after a supplement is news to the department: its own key */
        snprintf(key, sizeof(key), "%s.%s.%s", PQgetvalue(res, row, C_KEY), PQgetvalue(res, row, C_KIND),
                 PQgetvalue(res, row, C_ID));
    d->row = row;
    d->body = payload(res, row, info, values, key);
    json_decref(values);
    int64_t t = (int64_t)time(NULL);
    char sig[65];
    ot_sign_body(secret.base, secret.len, t, d->body, strlen(d->body), sig);
    OPENSSL_cleanse(secret.base, secret.len);
    ch_buf_free(&secret);
    snprintf(d->headers, sizeof(d->headers), "Idempotency-Key: %s\r\nX-Cityhall-Signature: t=%lld,v1=%s\r\n", key,
             (long long)t, sig);
    return 0;
}

/* The outcome of a delivery from the department's answer. */
static void delivery_finish(worker_t *w, PGresult *res, const ot_http_req_t *r, int row, outcome_t *out)
{
    const char *dept = PQgetvalue(res, row, C_DEPT);
    if (r->status >= 200 && r->status < 300) {
        out->what = "delivered";
        return;
    }
    if (r->status == CH_ECLOSED) { /* not tried: the department was unreachable a moment ago in this batch */
        out->what = "deferred";
        out->delay_ms = backoff(w, 0);
        return;
    }
    out->what = "failed";
    if (r->status > 0)
        snprintf(out->error, sizeof(out->error), "HTTP %d from %s", r->status, dept);
    else
        snprintf(out->error, sizeof(out->error), "%s (%s)", r->why != NULL ? r->why : "delivery failed", dept);
    out->delay_ms = backoff(w, atoi(PQgetvalue(res, row, C_ATTEMPTS)));
}

/* Appends a PostgreSQL array literal element (double-quoted, escaped). */
static void array_add(ch_buf_t *b, const char *s)
{
    ch_buf_append(b, b->len == 0 ? "{" : ",", 1);
    if (s == NULL) {
        ch_buf_append(b, "NULL", 4);
        return;
    }
    ch_buf_append(b, "\"", 1);
    for (const char *p = s; *p != '\0'; ++p) {
        if (*p == '"' || *p == '\\')
            ch_buf_append(b, "\\", 1);
        ch_buf_append(b, p, 1);
    }
    ch_buf_append(b, "\"", 1);
}

static const char *array_end(ch_buf_t *b)
{
    if (b->len == 0)
        ch_buf_append(b, "{", 1);
    ch_buf_append(b, "}", 1);
    return b->base;
}

/* One batch: claim, deliver, record. Returns the rows claimed, or -1 on a database error. */
static int run_batch(worker_t *w)
{
    if (db_command(w->conn, "BEGIN", "dispatch_claim") != 0)
        return -1;
    char limit[16];
    snprintf(limit, sizeof(limit), "%u", cfg.batch);
    const char *v[1] = {limit};
    PGresult *res = PQexecParams(w->conn, claim_sql, 1, NULL, v, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_db_error(res, "dispatch_claim");
        PQclear(res);
        db_command(w->conn, "ROLLBACK", "dispatch_claim");
        return -1;
    }
    int n = PQntuples(res);
    if (n == 0) {
        PQclear(res);
        return db_command(w->conn, "COMMIT", "dispatch_claim") == 0 ? 0 : -1;
    }
    outcome_t *out = calloc((size_t)n, sizeof(*out));
    delivery_t *dl = calloc((size_t)n, sizeof(*dl));
    ot_http_req_t *reqs = calloc((size_t)n, sizeof(*reqs));
    if (out == NULL || dl == NULL || reqs == NULL)
        abort();
    size_t nreq = 0;
    for (int r = 0; r < n; ++r) {
        const char *state = PQgetvalue(res, r, C_STATE), *app_state = PQgetvalue(res, r, C_APP_STATE);
        if (strcmp(app_state, "withdrawn") == 0 || strcmp(state, "dispatched") != 0) {
            out[r].what = "cancelled";
            snprintf(out[r].error, sizeof(out[r].error), "not sent: the item is %s, the application %s", state,
                     app_state);
        } else if (PQgetisnull(res, r, C_URL)) {
            out[r].what = "queued";
        } else if (delivery_prepare(w, res, r, &dl[nreq], &out[r]) == 0) {
            reqs[nreq] =
                (ot_http_req_t){&dl[nreq].url, dl[nreq].headers, dl[nreq].body, strlen(dl[nreq].body), 0, NULL};
            ++nreq;
        }
    }
    /* every department's items at once, a few connections per department */
    ot_http_run(&w->http, reqs, nreq, cfg.parallel, cfg.per_endpoint, cfg.connect_ms, cfg.response_ms);
    for (size_t k = 0; k < nreq; ++k) {
        delivery_finish(w, res, &reqs[k], dl[k].row, &out[dl[k].row]);
        OPENSSL_cleanse(dl[k].body, strlen(dl[k].body));
        free(dl[k].body);
    }
    free(dl);
    free(reqs);
    ch_buf_t ids = {0}, whats = {0}, errors = {0}, delays = {0};
    int failed = 0, first_failed = -1;
    for (int r = 0; r < n; ++r) {
        char d[16];
        snprintf(d, sizeof(d), "%u", out[r].delay_ms);
        array_add(&ids, PQgetvalue(res, r, C_ID));
        array_add(&whats, out[r].what);
        array_add(&errors, out[r].error[0] != '\0' ? out[r].error : NULL);
        array_add(&delays, d);
        if (strcmp(out[r].what, "failed") == 0 && failed++ == 0)
            first_failed = r;
    }
    /* one line per batch, not per item: a department that is down must not flood the log */
    if (failed > 0)
        ch_log(CH_LOG_WARN, "dispatch_failed", "%d of %d deliveries failed; first: outbox %s item %s attempt %d: %s",
               failed, n, PQgetvalue(res, first_failed, C_ID), PQgetvalue(res, first_failed, C_ITEM),
               atoi(PQgetvalue(res, first_failed, C_ATTEMPTS)) + 1, out[first_failed].error);
    char maxa[16];
    snprintf(maxa, sizeof(maxa), "%u", cfg.max_attempts);
    const char *sv[5] = {array_end(&ids), array_end(&whats), array_end(&errors), array_end(&delays), maxa};
    PGresult *set = PQexecParams(w->conn,
                                 "SELECT ot_outbox_settle($1::bigint[], $2::text[], $3::text[], $4::integer[], "
                                 "$5::integer)",
                                 5, NULL, sv, NULL, NULL, 0);
    int ok = PQresultStatus(set) == PGRES_TUPLES_OK;
    if (!ok)
        log_db_error(set, "dispatch_settle");
    else if (atoi(PQgetvalue(set, 0, 0)) > 0)
        ch_log(CH_LOG_WARN, "dispatch_gave_up", "%s item(s) failed_technical after %u attempts", PQgetvalue(set, 0, 0),
               cfg.max_attempts);
    PQclear(set);
    ch_buf_free(&ids);
    ch_buf_free(&whats);
    ch_buf_free(&errors);
    ch_buf_free(&delays);
    free(out);
    PQclear(res);
    if (!ok || db_command(w->conn, "COMMIT", "dispatch_settle") != 0) {
        db_command(w->conn, "ROLLBACK", "dispatch_settle");
        return -1;
    }
    return n;
}

/* Milliseconds until the earliest pending row is due (poll_ms when none; 0 when one is due now). */
static unsigned next_due_ms(worker_t *w)
{
    PGresult *res = PQexec(w->conn, "SELECT ceil(extract(epoch FROM min(next_attempt_at) - clock_timestamp()) * 1000) "
                                    "FROM outbox WHERE state = 'pending'");
    unsigned ms = cfg.poll_ms;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        double d = strtod(PQgetvalue(res, 0, 0), NULL);
        ms = d <= 0 ? 0 : d < cfg.poll_ms ? (unsigned)d : cfg.poll_ms;
    }
    PQclear(res);
    return ms;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    char app[32];
    snprintf(app, sizeof(app), "cityhall-dispatch-%u", w->index);
    unsigned failures = 0;
    for (;;) {
        if (w->conn == NULL || PQstatus(w->conn) != CONNECTION_OK) {
            if (w->conn != NULL)
                PQfinish(w->conn);
            w->conn = db_connect(cfg.conninfo, app, 1);
            if (w->conn == NULL) {
                if (failures++ == 0)
                    ch_log(CH_LOG_WARN, "dispatch_db", "worker %u could not connect to PostgreSQL; retrying", w->index);
                sleep(1);
                continue;
            }
            if (failures > 0)
                ch_log(CH_LOG_INFO, "dispatch_db", "worker %u connected again", w->index);
            failures = 0;
        }
        uint64_t seen = wake_generation();
        int n = run_batch(w);
        if (n < 0) {
            /* a refused statement (schema not migrated yet, deadlock) or a lost connection: back off a little */
            usleep(200000 + (useconds_t)(rng_next(&w->rng) % 300000));
            continue;
        }
        if (n > 0)
            continue; /* more may have arrived meanwhile: an empty claim is one cheap query */
        unsigned ms = next_due_ms(w);
        wake_wait(seen, ms > 20 ? ms : 20); /* due rows are locked by another worker: do not spin on them */
    }
    return NULL;
}

/* LISTEN ot_outbox on its own connection and turn notifications into wakes. */
static void *listener_main(void *arg)
{
    PGconn *conn = NULL;
    for (;;) {
        if (conn == NULL || PQstatus(conn) != CONNECTION_OK) {
            if (conn != NULL)
                PQfinish(conn);
            conn = db_connect(cfg.conninfo, "cityhall-dispatch-listen", 0);
            if (conn == NULL || db_command(conn, "LISTEN ot_outbox", "dispatch_listen") != 0) {
                if (conn != NULL)
                    PQfinish(conn);
                conn = NULL;
                sleep(1);
                continue;
            }
            ot_dispatch_wake(); /* rows may have committed while nobody listened */
        }
        struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
        int r = poll(&pfd, 1, 5000);
        if (r < 0 && errno != EINTR) {
            PQfinish(conn);
            conn = NULL;
            continue;
        }
        if (r > 0 && PQconsumeInput(conn) != 1) {
            PQfinish(conn);
            conn = NULL;
            continue;
        }
        int any = 0;
        PGnotify *nt;
        while ((nt = PQnotifies(conn)) != NULL) {
            any = 1;
            PQfreemem(nt);
        }
        if (any)
            ot_dispatch_wake();
    }
    return NULL;
}

/* ---- the sweeper and the SMS sender ---- */

#define SMS_ATTEMPTS_MAX "5"

/* The development SMS provider's format (identity's login.c): one JSON line per message in <var>/sms-outbox.jsonl. */
static int sms_append(const char *phone, const char *kind, const char *text)
{
    char path[512], when[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    snprintf(path, sizeof(path), "%s/sms-outbox.jsonl", cfg.var_dir);
    json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "phone", phone, "kind", kind, "text", text, "at", when);
    char *line = o != NULL ? json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
    json_decref(o);
    if (line == NULL)
        return -1;
    size_t n = strlen(line);
    line[n] = '\n'; /* json_dumps leaves room for its NUL: replace it */
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    int ok = fd >= 0 && write(fd, line, n + 1) == (ssize_t)(n + 1);
    if (fd >= 0 && close(fd) != 0)
        ok = 0;
    free(line);
    return ok ? 0 : -1;
}

/* Sends what the queue holds (a batch per call); each message is marked sent in the transaction that claimed it. */
static void sms_drain(PGconn *conn)
{
    if (db_command(conn, "BEGIN", "sms_send") != 0)
        return;
    PGresult *res = PQexec(conn, "SELECT q.sms_id, q.kind, q.text, encode(c.phone_enc, 'hex') "
                                 "FROM sms_queue q LEFT JOIN citizens c USING (citizen_id) "
                                 "WHERE q.sent_at IS NULL AND q.attempts < " SMS_ATTEMPTS_MAX
                                 " ORDER BY q.sms_id LIMIT 100 FOR UPDATE OF q SKIP LOCKED");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_db_error(res, "sms_send");
        PQclear(res);
        db_command(conn, "ROLLBACK", "sms_send");
        return;
    }
    ch_buf_t sent = {0}, failed = {0};
    for (int r = 0; r < PQntuples(res); ++r) {
        uint8_t sealed[256];
        size_t sn = PQgetisnull(res, r, 3) ? 0 : unhex(PQgetvalue(res, r, 3), sealed, sizeof(sealed));
        ch_buf_t phone = {0};
        int ok = sn > 0 && ch_pii_decrypt(ch_pii, sealed, sn, &phone) == 0 &&
                 sms_append(phone.base, PQgetvalue(res, r, 1), PQgetvalue(res, r, 2)) == 0;
        if (phone.base != NULL)
            memset(phone.base, 0, phone.len);
        ch_buf_free(&phone);
        /* an account without a phone cannot be texted: the notification in the app stays */
        if (ok || sn == 0) {
            array_add(&sent, PQgetvalue(res, r, 0));
        } else {
            array_add(&failed, PQgetvalue(res, r, 0));
            ch_log(CH_LOG_WARN, "sms_send", "message %s could not be handed to the SMS provider",
                   PQgetvalue(res, r, 0));
        }
    }
    PQclear(res);
    /* sent, or one more failed attempt (after SMS_ATTEMPTS_MAX the in-app notification is all the citizen gets) */
    const char *v[2] = {array_end(&sent), array_end(&failed)};
    res = PQexecParams(conn,
                       "UPDATE sms_queue SET attempts = attempts + 1, "
                       "sent_at = CASE WHEN sms_id = ANY ($1::bigint[]) THEN now() END "
                       "WHERE sms_id = ANY ($1::bigint[]) OR sms_id = ANY ($2::bigint[])",
                       2, NULL, v, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        log_db_error(res, "sms_send");
    PQclear(res);
    ch_buf_free(&sent);
    ch_buf_free(&failed);
    db_command(conn, "COMMIT", "sms_send");
}

/* Appends the deliveries' access-log entries (access_log_pending, 0009) to the citizens' chains. */
static void access_log_drain(PGconn *conn)
{
    for (int round = 0; round < 100; ++round) {
        PGresult *res = PQexec(conn, "SELECT ot_access_log_drain(500)");
        int n = PQresultStatus(res) == PGRES_TUPLES_OK ? atoi(PQgetvalue(res, 0, 0)) : -1;
        if (n < 0)
            log_db_error(res, "access_log_drain");
        PQclear(res);
        if (n < 500)
            return;
    }
}

static int sweep_once(PGconn *conn, const char *at, int *raised)
{
    const char *v[1] = {at};
    PGresult *res = PQexecParams(conn, "SELECT ot_sweep(coalesce($1::timestamptz, now()))", 1, NULL, v, NULL, NULL, 0);
    int ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
    if (ok)
        *raised = atoi(PQgetvalue(res, 0, 0));
    else
        log_db_error(res, "sweep");
    PQclear(res);
    return ok ? 0 : -1;
}

static void *sweeper_main(void *arg)
{
    PGconn *conn = NULL;
    time_t next_sweep = time(NULL) + 5;
    for (;;) {
        sleep(1);
        if (conn == NULL || PQstatus(conn) != CONNECTION_OK) {
            if (conn != NULL)
                PQfinish(conn);
            if ((conn = db_connect(cfg.conninfo, "cityhall-sweeper", 0)) == NULL)
                continue;
        }
        access_log_drain(conn);
        sms_drain(conn);
        if (time(NULL) >= next_sweep) {
            int raised = 0;
            if (sweep_once(conn, NULL, &raised) == 0 && raised > 0)
                ch_log(CH_LOG_INFO, "sweep", "%d escalation(s) raised", raised);
            next_sweep = time(NULL) + cfg.sweep_s;
        }
    }
    return NULL;
}

/* ---- start-up ---- */

static int spawn(void *(*fn)(void *), void *arg)
{
    /* the gateway's main thread waits for SIGTERM/SIGINT with sigwait: keep them away from these threads */
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    pthread_t tid;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int ret = pthread_create(&tid, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ret == 0 ? 0 : -1;
}

int ot_init_dispatch(const ch_config_t *config)
{
    if (env_uint("CITYHALL_DISPATCH_WORKERS", 0, 64, &cfg.workers) != 0 ||
        env_uint("CITYHALL_DISPATCH_BATCH", 1, 1000, &cfg.batch) != 0 ||
        env_uint("CITYHALL_DISPATCH_BACKOFF_MS", 1, 600000, &cfg.backoff_ms) != 0 ||
        env_uint("CITYHALL_DISPATCH_BACKOFF_CAP_MS", 1, 3600000, &cfg.backoff_cap_ms) != 0 ||
        env_uint("CITYHALL_DISPATCH_MAX_ATTEMPTS", 1, 1000, &cfg.max_attempts) != 0 ||
        env_uint("CITYHALL_DISPATCH_CONNECT_TIMEOUT_MS", 10, 60000, &cfg.connect_ms) != 0 ||
        env_uint("CITYHALL_DISPATCH_RESPONSE_TIMEOUT_MS", 10, 300000, &cfg.response_ms) != 0 ||
        env_uint("CITYHALL_DISPATCH_PARALLEL", 1, OT_HTTP_PARALLEL_MAX, &cfg.parallel) != 0 ||
        env_uint("CITYHALL_DISPATCH_PER_ENDPOINT", 1, OT_HTTP_PARALLEL_MAX, &cfg.per_endpoint) != 0 ||
        env_uint("CITYHALL_DISPATCH_POLL_MS", 10, 60000, &cfg.poll_ms) != 0 ||
        env_uint("CITYHALL_SWEEP_INTERVAL_S", 1, 86400, &cfg.sweep_s) != 0)
        return -1;
    if (cfg.backoff_cap_ms < cfg.backoff_ms)
        cfg.backoff_cap_ms = cfg.backoff_ms;
    snprintf(cfg.conninfo, sizeof(cfg.conninfo), "%s", config->pg_conninfo);
    snprintf(cfg.var_dir, sizeof(cfg.var_dir), "%s", config->var_dir);
    char err[512];
    if (ch_pii_init(config->var_dir, err, sizeof(err)) != 0) {
        ch_log(CH_LOG_ERROR, "startup_failed", "onething dispatch: %s (run `cityhall keys init`)", err);
        return -1;
    }
    if (ot_licences_init(config) != 0)
        return -1;

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&wake_cond, &ca);
    pthread_condattr_destroy(&ca);
    __atomic_store_n(&wake_ready, 1, __ATOMIC_RELEASE);

    for (unsigned i = 0; i < cfg.workers; ++i) {
        worker_t *w = calloc(1, sizeof(*w));
        if (w == NULL)
            abort();
        w->index = i;
        ot_http_pool_init(&w->http);
        if (getrandom(&w->rng, sizeof(w->rng), 0) != sizeof(w->rng) || w->rng == 0)
            w->rng = 0x9E3779B97F4A7C15ULL + i;
        if (spawn(worker_main, w) != 0)
            return -1;
    }
    if (cfg.workers > 0 && spawn(listener_main, NULL) != 0)
        return -1;
    if (spawn(sweeper_main, NULL) != 0)
        return -1;
    ch_log(CH_LOG_INFO, "dispatch_ready",
           "%u outbox worker(s), batch %u, %u requests at once (%u per department), backoff %u ms doubling to %u ms, "
           "%u attempts, timeouts %u/%u ms",
           cfg.workers, cfg.batch, cfg.parallel, cfg.per_endpoint, cfg.backoff_ms, cfg.backoff_cap_ms, cfg.max_attempts,
           cfg.connect_ms, cfg.response_ms);
    return 0;
}

/* ---- statements of the request paths (decide.c, tasks.c, licences.c), prepared on every loop connection ---- */

const ch_pg_stmt_t *const ot_dispatch_stmts[] = {
    &ot_stmt_decide_context, &ot_stmt_callback_context, &ot_stmt_decide, &ot_stmt_tasks, &ot_stmt_licences, NULL,
};

/* ---- commands ---- */

static const char *arg_value(int argc, char **argv, const char *name)
{
    for (int i = 1; i + 1 < argc; ++i)
        if (strcmp(argv[i], name) == 0)
            return argv[i + 1];
    return NULL;
}

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

static int dept_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 64)
        return 0;
    for (size_t i = 0; i < n; ++i) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && c == '-')))
            return 0;
    }
    return 1;
}

int ot_cmd_dept_endpoint(const ch_config_t *config, int argc, char **argv)
{
    static const char cmd[] = "dept endpoint";
    static const char *const names[] = {"--dept", "--url", "--secret", NULL};
    if (!args_known(argc, argv, names, cmd))
        return 2;
    const char *dept = arg_value(argc, argv, "--dept"), *url = arg_value(argc, argv, "--url"),
               *secret = arg_value(argc, argv, "--secret");
    int remove = url != NULL && strcmp(url, "none") == 0;
    if (dept == NULL || url == NULL || (!remove && secret == NULL)) {
        fprintf(stderr, "usage: cityhall dept endpoint --dept D --url http://IP:PORT/path --secret S\n"
                        "       cityhall dept endpoint --dept D --url none   (D works cityhall's staff queue)\n");
        return 2;
    }
    if (!dept_ok(dept)) {
        fprintf(stderr, "%s: dept is 1-64 of a-z 0-9 -\n", cmd);
        return 2;
    }
    ot_url_t parsed;
    const char *why = NULL;
    if (!remove && ot_url_parse(url, &parsed, &why) != 0) {
        fprintf(stderr, "%s: bad url: %s\n", cmd, why);
        return 2;
    }
    if (!remove && (strlen(secret) < 16 || strlen(secret) > 256)) {
        fprintf(stderr, "%s: the secret must be 16 to 256 bytes\n", cmd);
        return 2;
    }
    char err[512];
    if (ch_pii == NULL && ch_pii_init(config->var_dir, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: could not load the data key (run `cityhall keys init` first): %s\n", cmd, err);
        return 1;
    }
    PGconn *conn = PQconnectdb(config->pg_conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "%s: could not connect to PostgreSQL: %s", cmd, PQerrorMessage(conn));
        PQfinish(conn);
        return 1;
    }
    PGresult *res;
    if (remove) {
        const char *v[1] = {dept};
        res = PQexecParams(conn, "DELETE FROM dept_endpoints WHERE dept = $1", 1, NULL, v, NULL, NULL, 0);
    } else {
        ch_buf_t sealed = {0};
        ch_pii_encrypt(ch_pii, secret, strlen(secret), &sealed);
        char *hex = malloc(2 * sealed.len + 1);
        if (hex == NULL)
            abort();
        ch_hex((const uint8_t *)sealed.base, sealed.len, hex);
        const char *v[3] = {dept, url, hex};
        res = PQexecParams(conn,
                           "INSERT INTO dept_endpoints (dept, url, secret_enc) VALUES ($1, $2, decode($3, 'hex')) "
                           "ON CONFLICT (dept) DO UPDATE SET url = excluded.url, secret_enc = excluded.secret_enc, "
                           "updated_at = now()",
                           3, NULL, v, NULL, NULL, 0);
        free(hex);
        ch_buf_free(&sealed);
    }
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok)
        fprintf(stderr, "%s: %s", cmd, PQerrorMessage(conn));
    PQclear(res);
    if (ok) {
        /* rows waiting for a retry go now, to the new endpoint or to the queue, in every gateway process */
        const char *v[1] = {dept};
        res = PQexecParams(conn,
                           "UPDATE outbox SET next_attempt_at = now() WHERE dept = $1 AND state = 'pending' "
                           "AND next_attempt_at > now()",
                           1, NULL, v, NULL, NULL, 0);
        PQclear(res);
        PQclear(PQexec(conn, "NOTIFY ot_outbox"));
    }
    PQfinish(conn);
    if (!ok)
        return 1;
    if (remove)
        printf("dept %s: no endpoint; its items are worked in cityhall's staff queue\n", dept);
    else
        printf("dept %s: items are delivered to %s, signed with the given secret\n", dept, url);
    return 0;
}

int ot_cmd_sweep(const ch_config_t *config, int argc, char **argv)
{
    static const char cmd[] = "onething sweep";
    static const char *const names[] = {"--now", NULL};
    if (!args_known(argc, argv, names, cmd))
        return 2;
    const char *at = arg_value(argc, argv, "--now");
    PGconn *conn = PQconnectdb(config->pg_conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "%s: could not connect to PostgreSQL: %s", cmd, PQerrorMessage(conn));
        PQfinish(conn);
        return 1;
    }
    int raised = 0;
    const char *v[1] = {at};
    PGresult *res = PQexecParams(conn, "SELECT ot_sweep(coalesce($1::timestamptz, now()))", 1, NULL, v, NULL, NULL, 0);
    int ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
    if (ok)
        raised = atoi(PQgetvalue(res, 0, 0));
    else
        fprintf(stderr, "%s: %s", cmd, PQresultErrorMessage(res));
    PQclear(res);
    PQfinish(conn);
    if (!ok)
        return at != NULL ? 2 : 1;
    printf("escalations raised: %d\n", raised);
    return 0;
}
