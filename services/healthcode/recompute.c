/* Recomputing health codes: one resident on the event loop (hc_recompute), many off it (the drainer threads). */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include "recompute.h"

/*
 * How a code is recomputed, by whichever path:
 *
 *   1. read, in this order: the resident's queue row (its seq), the stored code, then every input;
 *   2. evaluate with rules.c (pure C; `now` is the database's clock, read with the inputs);
 *   3. write, in one statement: the queue row is deleted (or rescheduled for the next time-driven change) only if it
 *      still has the seq read in 1, and the code is upserted only then, and only if color, reasons or rule version
 *      differ (version + 1);
 *   4. after the commit, for a code that changed: this process's caches (hc_cache_invalidate), Redis
 *      DEL hc:code:<id> and PUBLISH ch:hc <id> for every other process.
 *
 * Every input commits together with a bump of its resident's queue row (triggers of migration 0005), so a result
 * computed from inputs that went stale before it was written fails the seq check in 3 and is not stored: it is
 * computed again (the request retries, the drainer takes the row at its next pass). Two paths computing from the
 * same seq compute the same result. An input is never left behind: its queue row stays until a recompute that saw
 * it commits.
 *
 * Paths: hc_recompute, on the loop, for one resident (the request that brought a declaration or a quarantine
 * order answers with the new code); the drainers, background threads with their own blocking connections, for bulk
 * events (test-result batches, risk-area uploads, contact marks) and for time-driven changes (a look-back ending).
 * Each drainer takes its share of the queue (resident_id modulo their number); in a deployment of several gateways
 * one of them drains each share at a time (PostgreSQL advisory locks), the others stand by.
 *
 * A lost invalidation: step 4 is best effort. When Redis does not take it (down, a timeout) or it never runs (the
 * client went away after the commit: the write's callback is detached from the request, so this process's caches
 * are still cleared), the resident is queued in memory and worker 0 publishes it again until Redis takes it. What
 * remains: a gateway that dies between a commit and its publish leaves other processes' cached copies until they
 * expire (display.c: at most the token's refresh period, 4 minutes), or until their subscriber reconnects to Redis
 * (display.c then drops every cached code).
 */

#define BATCH_MAX      5000       /* residents per drainer pass */
#define GUARD_RETRIES  32         /* re-reads when inputs keep arriving between read and write (each failure = one) */
#define RULES_POLL_S   5          /* the active rule set is also polled (NOTIFY hc_rules is the fast path) */
#define LOCK_RETRY_S   5          /* a standby drainer tries the lock this often */
#define IDLE_POLL_MS   250        /* the drainer looks at the queue this often when nothing wakes it */
#define LATER_MAX      (1u << 20) /* invalidations waiting to be published again (beyond: dropped, logged) */
#define DRAIN_LOCK_KEY "7243010"  /* + worker index */

/* ---- statements (the loop's pool and the drainers' connections prepare the same text) ---- */

/* the SQL is laid out by hand: clang-format would re-wrap it around the macros */
/* clang-format off */
#define US(x)    "(extract(epoch FROM " x ") * 1000000)::bigint"
#define SINCE(p) "now() - make_interval(secs => " p "::double precision)"
#define AT_US(x) "timestamptz 'epoch' + " x " * interval '1 microsecond'"

/*
 * $1 resident ids (bigint[]). One row per resident in the registry: 0 id, 1 home region, 2 queue seq (0: none),
 * 3-8 the stored code (code_id, color, reasons, rule_version, as_of s, version; NULL: none), 9 now (µs).
 * Every statement of step 1 reads a whole batch with = ANY ($1), one index scan per table: correlated subqueries
 * per resident cost twice as much.
 */
const ch_pg_stmt_t hc_rc_stmt_state = {
    "hc_rc_state",
    "SELECT r.id, coalesce(rr.region::text, ''), coalesce(q.seq, 0), "
    "       h.code_id::text, h.color, h.reasons::text, h.rule_version, extract(epoch FROM h.as_of)::bigint, h.version, "
    "       " US("now()") " "
    "FROM unnest($1::bigint[]) AS r(id) "
    "JOIN registry_residents rr ON rr.resident_id = r.id "
    "LEFT JOIN hc_recompute_queue q ON q.resident_id = r.id "
    "LEFT JOIN health_codes h ON h.resident_id = r.id",
    1};

/*
 * $1 ids, $2 look-back (s). The events that count whatever their age (only the latest of each kind matters) and the
 * contacts at one remove within the look-back: 0 resident, 1 kind, 2 time (µs), 3-4 texts, 5 a second time (µs).
 * Kinds: o latest order, r latest release, p latest positive test (3 lab), c latest declared contact, m latest
 * close-contact mark, s a contact at one remove, v the override in force (3 color, 4 appeal, 2 decided, 5 expires).
 */
const ch_pg_stmt_t hc_rc_stmt_events = {
    "hc_rc_events",
    "SELECT resident_id, 'o', " US("max(at)") ", NULL::text, NULL::text, 0::bigint FROM quarantine_orders "
    " WHERE resident_id = ANY ($1::bigint[]) AND kind = 'order' GROUP BY resident_id "
    "UNION ALL SELECT resident_id, 'r', " US("max(at)") ", NULL, NULL, 0 FROM quarantine_orders "
    " WHERE resident_id = ANY ($1::bigint[]) AND kind = 'release' GROUP BY resident_id "
    "UNION ALL (SELECT DISTINCT ON (resident_id) resident_id, 'p', " US("sample_time") ", lab, NULL, 0 "
    " FROM test_results WHERE resident_id = ANY ($1::bigint[]) AND result = 'positive' "
    " ORDER BY resident_id, sample_time DESC) "
    "UNION ALL SELECT resident_id, 'c', " US("max(declared_at)") ", NULL, NULL, 0 FROM declarations "
    " WHERE resident_id = ANY ($1::bigint[]) AND contact_with_confirmed GROUP BY resident_id "
    "UNION ALL SELECT resident_id, 'm', " US("max(marked_at)") ", NULL, NULL, 0 FROM contact_marks "
    " WHERE resident_id = ANY ($1::bigint[]) AND kind = 'close' GROUP BY resident_id "
    "UNION ALL SELECT resident_id, 's', " US("marked_at") ", NULL, NULL, 0 FROM contact_marks "
    " WHERE resident_id = ANY ($1::bigint[]) AND kind = 'secondary' AND marked_at > " SINCE("$2") " "
    "UNION ALL (SELECT DISTINCT ON (resident_id) resident_id, 'v', " US("decided_at") ", color, appeal_id, "
    US("expires_at") " FROM health_overrides WHERE resident_id = ANY ($1::bigint[]) AND expires_at > now() "
    " ORDER BY resident_id, decided_at DESC, override_id DESC)",
    2};

/* $1 ids, $2 look-back (s). Tests sampled within the look-back. */
const ch_pg_stmt_t hc_rc_stmt_tests = {
    "hc_rc_tests",
    "SELECT resident_id, " US("sample_time") ", result = 'positive', lab FROM test_results "
    "WHERE resident_id = ANY ($1::bigint[]) AND sample_time > " SINCE("$2"),
    2};

/* $1 ids, $2 look-back (s). Declarations within the look-back; regions concatenated. */
const ch_pg_stmt_t hc_rc_stmt_decls = {
    "hc_rc_decls",
    "SELECT resident_id, " US("declared_at") ", cardinality(symptoms) > 0, coalesce(temperature_c, 0), "
    "       array_to_string(visited_regions, '') FROM declarations "
    "WHERE resident_id = ANY ($1::bigint[]) AND declared_at > " SINCE("$2"),
    2};

/*
 * $1 ids, $2 look-back (s), $3 look-back + visit window (s). The risk records of the residents' home regions and
 * of the regions they declared within the look-back, that may still matter: columns id, region, level, from,
 * until, uploaded (µs). Shared by the whole batch: the engine picks each resident's regions.
 */
const ch_pg_stmt_t hc_rc_stmt_areas = {
    "hc_rc_areas",
    "WITH g AS (SELECT rr.region::text AS region FROM registry_residents rr "
    "           WHERE rr.resident_id = ANY ($1::bigint[]) AND rr.region IS NOT NULL "
    "           UNION SELECT unnest(d.visited_regions) FROM declarations d "
    "           WHERE d.resident_id = ANY ($1::bigint[]) AND d.declared_at > " SINCE("$2") ") "
    "SELECT a.area_id, a.region, a.level, " US("a.valid_from") ", " US("a.valid_until") ", " US("a.uploaded_at")
    " FROM risk_areas a WHERE a.region IN (SELECT region FROM g) AND a.valid_until > " SINCE("$3"),
    3};

/*
 * $1 a JSON array of results [{r: resident, s: seq read (0: none), c: color, j: reasons, v: rule version,
 * a: as_of µs, n: next evaluation µs (0: none), k: the code id for a first code (absent: one is stored)}]. Step 3 of the comment at the top. One row per result: resident,
 * guarded (the result could be stored), then the code as stored now when it changed (NULL when it did not).
 * Lock order, everywhere: queue rows in resident order (lk here, hc_enqueue's ORDER BY), then codes in resident
 * order: a drainer's batch and a bulk upload touching the same residents wait for each other, never deadlock.
 */
const ch_pg_stmt_t hc_rc_stmt_write = {
    "hc_rc_write",
    "WITH inp AS (SELECT x.r AS resident_id, x.s AS seq, x.c AS color, x.j AS reasons, x.v AS rule_version, "
    "                    " AT_US("x.a") " AS as_of, CASE WHEN x.n > 0 THEN " AT_US("x.n") " END AS next_at, "
    "                    x.k AS code_id "
    "             FROM jsonb_to_recordset($1::jsonb) AS x(r bigint, s bigint, c text, j jsonb, v integer, a bigint, "
    "                                                     n bigint, k uuid)), "
    "lk AS (SELECT q.resident_id, inp.next_at FROM hc_recompute_queue q "
    "       JOIN inp ON q.resident_id = inp.resident_id AND q.seq = inp.seq ORDER BY q.resident_id FOR UPDATE OF q), "
    "done AS (DELETE FROM hc_recompute_queue q USING lk WHERE q.resident_id = lk.resident_id AND lk.next_at IS NULL "
    "         RETURNING q.resident_id), "
    "later AS (UPDATE hc_recompute_queue q SET due_at = lk.next_at FROM lk "
    "          WHERE q.resident_id = lk.resident_id AND lk.next_at IS NOT NULL RETURNING q.resident_id), "
    "fresh AS (INSERT INTO hc_recompute_queue (resident_id, seq, due_at) "
    "          SELECT resident_id, nextval('hc_recompute_seq'), next_at FROM inp WHERE seq = 0 AND next_at IS NOT NULL "
    "          ORDER BY resident_id ON CONFLICT (resident_id) DO NOTHING RETURNING resident_id), "
    "ok AS (SELECT resident_id FROM done UNION ALL SELECT resident_id FROM later UNION ALL SELECT resident_id FROM fresh "
    "       UNION ALL SELECT i.resident_id FROM inp i WHERE i.seq = 0 AND i.next_at IS NULL "
    "       AND NOT EXISTS (SELECT 1 FROM hc_recompute_queue q WHERE q.resident_id = i.resident_id)), "
    "w AS (INSERT INTO health_codes AS h (resident_id, code_id, color, reasons, rule_version, as_of) "
    "      SELECT i.resident_id, coalesce(i.code_id, gen_random_uuid()), i.color, i.reasons, i.rule_version, i.as_of "
    "      FROM inp i "
    "      JOIN ok ON ok.resident_id = i.resident_id ORDER BY i.resident_id "
    "      ON CONFLICT (resident_id) DO UPDATE SET color = EXCLUDED.color, reasons = EXCLUDED.reasons, "
    "         rule_version = EXCLUDED.rule_version, as_of = EXCLUDED.as_of, version = h.version + 1, updated_at = now() "
    "      WHERE (h.color, h.reasons, h.rule_version) IS DISTINCT FROM "
    "            (EXCLUDED.color, EXCLUDED.reasons, EXCLUDED.rule_version) "
    "      RETURNING h.resident_id, h.code_id::text AS code_id, h.color, h.reasons::text AS reasons, h.rule_version, "
    "                extract(epoch FROM h.as_of)::bigint AS as_of, h.version) "
    "SELECT i.resident_id, ok.resident_id IS NOT NULL, w.code_id, w.color, w.reasons, w.rule_version, w.as_of, "
    "       w.version "
    "FROM inp i LEFT JOIN ok ON ok.resident_id = i.resident_id LEFT JOIN w ON w.resident_id = i.resident_id",
    1};
/* clang-format on */

const ch_pg_stmt_t hc_stmt_enqueue_recompute = {"hc_enqueue_recompute", "SELECT hc_enqueue(ARRAY[$1::bigint])", 1};

/* ---- the active rule set ---- */

static hc_rules_t *rules_current; /* replaced by worker 0; old ones are leaked: other threads may hold them */

const hc_rules_t *hc_rules_active(void)
{
    return __atomic_load_n(&rules_current, __ATOMIC_ACQUIRE);
}

/* ---- a batch: one or many residents' inputs, read from the five results of step 1 ---- */

typedef struct subject {
    int64_t resident_id;
    int64_t seq;
    hc_inputs_t in;
    const char *code_id, *color, *reasons; /* the stored code; code_id NULL: none */
    int rule_version;
    int64_t as_of, version;
} subject_t;

typedef struct batch {
    size_t n;
    subject_t *s; /* sorted by resident id */
    hc_test_t *tests;
    hc_declaration_t *decls;
    hc_area_t *areas;
    int64_t *secondary;
    int64_t now;
} batch_t;

static int64_t num(PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? 0 : strtoll(PQgetvalue(res, row, col), NULL, 10);
}

static const char *str_or_null(PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int color_parse(const char *s)
{
    if (s == NULL)
        return HC_GREEN;
    return strcmp(s, "red") == 0 ? HC_RED : strcmp(s, "yellow") == 0 ? HC_YELLOW : HC_GREEN;
}

static int cmp_subject(const void *a, const void *b)
{
    int64_t x = ((const subject_t *)a)->resident_id, y = ((const subject_t *)b)->resident_id;
    return x < y ? -1 : x > y;
}

static long subject_find(const batch_t *b, int64_t id)
{
    size_t lo = 0, hi = b->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (b->s[mid].resident_id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < b->n && b->s[lo].resident_id == id ? (long)lo : -1;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n == 0 ? 1 : n, size);
    if (p == NULL)
        abort();
    return p;
}

/*
 * Groups the rows of `res` (resident id in column 0) by subject: the rows of subject k are order[off[k]] ..
 * order[off[k + 1] - 1]. Rows of residents not in the batch are left out. The caller frees both.
 */
static void group_rows(const batch_t *b, PGresult *res, size_t **off_out, int **order_out)
{
    int nrows = PQntuples(res);
    size_t *off = xcalloc(b->n + 1, sizeof(*off));
    long *subj = xcalloc((size_t)nrows, sizeof(*subj));
    int *order = xcalloc((size_t)nrows, sizeof(*order));
    for (int r = 0; r < nrows; ++r) {
        subj[r] = subject_find(b, num(res, r, 0));
        if (subj[r] >= 0)
            ++off[subj[r] + 1];
    }
    for (size_t k = 0; k < b->n; ++k)
        off[k + 1] += off[k];
    size_t *pos = xcalloc(b->n + 1, sizeof(*pos));
    memcpy(pos, off, (b->n + 1) * sizeof(*pos));
    for (int r = 0; r < nrows; ++r)
        if (subj[r] >= 0)
            order[pos[subj[r]]++] = r;
    free(pos);
    free(subj);
    *off_out = off;
    *order_out = order;
}

static void batch_free(batch_t *b)
{
    free(b->s);
    free(b->tests);
    free(b->decls);
    free(b->areas);
    free(b->secondary);
    memset(b, 0, sizeof(*b));
}

/* Builds the inputs from res[0..4] (state, events, tests, declarations, areas). Strings point into the results. */
static void batch_build(batch_t *b, PGresult *const res[5])
{
    memset(b, 0, sizeof(*b));
    PGresult *st = res[0];
    b->n = (size_t)PQntuples(st);
    b->s = xcalloc(b->n, sizeof(*b->s));
    for (size_t i = 0; i < b->n; ++i) {
        int row = (int)i;
        subject_t *s = &b->s[i];
        s->resident_id = num(st, row, 0);
        const char *region = PQgetvalue(st, row, 1);
        if (strlen(region) == 6)
            memcpy(s->in.home_region, region, 7);
        s->seq = num(st, row, 2);
        s->code_id = str_or_null(st, row, 3);
        s->color = str_or_null(st, row, 4);
        s->reasons = str_or_null(st, row, 5);
        s->rule_version = (int)num(st, row, 6);
        s->as_of = num(st, row, 7);
        s->version = num(st, row, 8);
        b->now = num(st, row, 9);
        s->in.latest_positive.positive = 1;
    }
    qsort(b->s, b->n, sizeof(*b->s), cmp_subject);

    size_t *off;
    int *order;
    PGresult *ev = res[1];
    group_rows(b, ev, &off, &order);
    b->secondary = xcalloc(off[b->n], sizeof(*b->secondary));
    for (size_t k = 0; k < b->n; ++k) {
        subject_t *s = &b->s[k];
        s->in.secondary_at = b->secondary + off[k];
        for (size_t j = off[k]; j < off[k + 1]; ++j) {
            int row = order[j];
            int64_t at = num(ev, row, 2);
            switch (PQgetvalue(ev, row, 1)[0]) {
            case 'o':
                s->in.quarantine_order_at = at;
                break;
            case 'r':
                s->in.release_at = at;
                break;
            case 'p':
                s->in.latest_positive.at = at;
                s->in.latest_positive.lab = str_or_null(ev, row, 3);
                break;
            case 'c':
                s->in.contact_declared_at = at;
                break;
            case 'm':
                s->in.close_contact_at = at;
                break;
            case 's':
                b->secondary[off[k] + s->in.nsecondary++] = at;
                break;
            case 'v':
                s->in.override.present = 1;
                s->in.override.color = color_parse(PQgetvalue(ev, row, 3));
                s->in.override.appeal_id = PQgetvalue(ev, row, 4);
                s->in.override.decided_at = at;
                s->in.override.expires_at = num(ev, row, 5);
                break;
            }
        }
    }
    free(off);
    free(order);

    group_rows(b, res[2], &off, &order);
    b->tests = xcalloc(off[b->n], sizeof(*b->tests));
    for (size_t j = 0; j < off[b->n]; ++j)
        b->tests[j] = (hc_test_t){num(res[2], order[j], 1), PQgetvalue(res[2], order[j], 2)[0] == 't',
                                  PQgetvalue(res[2], order[j], 3)};
    for (size_t k = 0; k < b->n; ++k) {
        b->s[k].in.tests = b->tests + off[k];
        b->s[k].in.ntests = off[k + 1] - off[k];
    }
    free(off);
    free(order);

    group_rows(b, res[3], &off, &order);
    b->decls = xcalloc(off[b->n], sizeof(*b->decls));
    for (size_t j = 0; j < off[b->n]; ++j) {
        const char *regions = PQgetvalue(res[3], order[j], 4);
        b->decls[j] = (hc_declaration_t){num(res[3], order[j], 1), PQgetvalue(res[3], order[j], 2)[0] == 't',
                                         strtod(PQgetvalue(res[3], order[j], 3), NULL), regions, strlen(regions) / 6};
    }
    for (size_t k = 0; k < b->n; ++k) {
        b->s[k].in.decls = b->decls + off[k];
        b->s[k].in.ndecls = off[k + 1] - off[k];
    }
    free(off);
    free(order);

    int nareas = PQntuples(res[4]);
    b->areas = xcalloc((size_t)nareas, sizeof(*b->areas));
    for (int j = 0; j < nareas; ++j) {
        hc_area_t *a = &b->areas[j];
        a->id = num(res[4], j, 0);
        snprintf(a->region, sizeof(a->region), "%s", PQgetvalue(res[4], j, 1));
        const char *level = PQgetvalue(res[4], j, 2);
        a->level = strcmp(level, "high") == 0     ? HC_AREA_HIGH
                   : strcmp(level, "medium") == 0 ? HC_AREA_MEDIUM
                                                  : HC_AREA_LOW;
        a->from = num(res[4], j, 3);
        a->until = num(res[4], j, 4);
        a->uploaded = num(res[4], j, 5);
    }
    for (size_t k = 0; k < b->n; ++k) {
        b->s[k].in.areas = b->areas;
        b->s[k].in.nareas = (size_t)nareas;
    }
}

/* Step 2: evaluates every subject and appends the write statement's JSON argument. */
static void batch_eval(const batch_t *b, const hc_rules_t *rules, ch_buf_t *json)
{
    hc_result_t r;
    char head[256];
    ch_buf_append(json, "[", 1);
    for (size_t i = 0; i < b->n; ++i) {
        const subject_t *s = &b->s[i];
        hc_rules_eval(rules, &s->in, b->now, &r);
        int n =
            snprintf(head, sizeof(head),
                     "%s{\"r\":%lld,\"s\":%lld,\"c\":\"%s\",\"v\":%d,\"a\":%lld,\"n\":%lld,\"j\":", i > 0 ? "," : "",
                     (long long)s->resident_id, (long long)s->seq, hc_color_name(r.color), r.rule_version,
                     (long long)b->now, (long long)r.next_eval_at);
        ch_buf_append(json, head, (size_t)n);
        hc_result_reasons_json(&r, json);
        if (s->code_id == NULL) { /* a first code: it keeps the id its display had */
            char id[37];
            hc_code_id_derive(s->resident_id, id);
            ch_buf_append(json, ",\"k\":\"", 6);
            ch_buf_append(json, id, 36);
            ch_buf_append(json, "\"", 1);
        }
        ch_buf_append(json, "}", 1);
    }
    ch_buf_append(json, "]", 1);
}

static void lookback_params(const hc_rules_t *rules, char lb[32], char lbv[32])
{
    snprintf(lb, 32, "%lld", (long long)(rules->lookback / HC_US_PER_S));
    snprintf(lbv, 32, "%lld", (long long)((rules->lookback + rules->visit_window) / HC_US_PER_S));
}

/* ---- invalidations that could not be published at once: worker 0 publishes them again ---- */

static pthread_mutex_t later_lock = PTHREAD_MUTEX_INITIALIZER;
static int64_t *later_ids;
static size_t later_len, later_cap;
static int later_overflow_logged;

/*
 * Queues invalidations for worker 0 to publish (Redis DEL + PUBLISH ch:hc) at its next pass, again and again until
 * Redis takes them: for a change whose publish failed (Redis unreachable for a moment) or never ran (the request
 * died between its commit and its publish). Any thread.
 */
static void publish_later(const int64_t *ids, size_t n)
{
    pthread_mutex_lock(&later_lock);
    if (later_len + n > later_cap && later_cap < LATER_MAX) {
        size_t cap = later_cap == 0 ? 1024 : later_cap;
        while (cap < later_len + n && cap < LATER_MAX)
            cap *= 2;
        int64_t *p = realloc(later_ids, cap * sizeof(*p));
        if (p == NULL)
            abort();
        later_ids = p;
        later_cap = cap;
    }
    size_t room = later_cap - later_len, take = n < room ? n : room;
    memcpy(later_ids + later_len, ids, take * sizeof(*ids));
    later_len += take;
    if (take < n && !later_overflow_logged) {
        later_overflow_logged = 1;
        ch_log(HC_LOG_WARN, "hc_invalidate",
               "too many invalidations waiting for Redis: some are dropped (caches "
               "drop everything when they resubscribe to ch:hc; Redis copies expire)");
    }
    pthread_mutex_unlock(&later_lock);
}

/* ---- one resident, on the loop ---- */

typedef struct rc_op {
    int64_t resident_id;
    hc_state_cb cb;
    void *saved; /* the caller's ch_call_data, given back before cb */
    int attempts;
    int pending; /* Redis replies still awaited */
    int failed;  /* one of them failed */
    hc_state_t state;
} rc_op_t;

static int rc_read(ch_call_t *call, rc_op_t *op);

static void rc_finish(ch_call_t *call, rc_op_t *op, int err)
{
    ch_call_set_data(call, op->saved);
    op->cb(call, err, err == 0 ? &op->state : NULL);
}

static void state_from_stored(ch_call_t *call, rc_op_t *op, const subject_t *s)
{
    op->state.resident_id = s->resident_id;
    op->state.code_id = s->code_id != NULL ? ch_call_strdup(call, s->code_id) : NULL;
    op->state.color = color_parse(s->color);
    op->state.reasons_json = ch_call_strdup(call, s->reasons != NULL ? s->reasons : "[]");
    op->state.rule_version = s->rule_version;
    op->state.as_of = s->as_of;
    op->state.version = s->version;
}

static void on_rc_redis(ch_call_t *call, redisReply *reply, int err)
{
    rc_op_t *op = ch_call_data(call);
    if (err != 0 || reply == NULL || reply->type == REDIS_REPLY_ERROR)
        op->failed = 1;
    if (--op->pending == 0) {
        if (op->failed)
            publish_later(&op->resident_id, 1);
        rc_finish(call, op, 0);
    }
}

/* Step 4 (this process was done in on_rc_written_detached): Redis (the copy) and every other process (the channel). */
static void rc_publish(ch_call_t *call, rc_op_t *op)
{
    const char *key = ch_call_printf(call, "hc:code:%lld", (long long)op->resident_id);
    const char *id = ch_call_printf(call, "%lld", (long long)op->resident_id);
    const char *del[2] = {"DEL", key}, *pub[3] = {"PUBLISH", "ch:hc", id};
    op->pending = 2;
    if (ch_call_redis(call, on_rc_redis, 2, del, NULL) != 0)
        --op->pending;
    if (ch_call_redis(call, on_rc_redis, 3, pub, NULL) != 0)
        --op->pending;
    if (op->pending == 0) {
        publish_later(&op->resident_id, 1);
        rc_finish(call, op, 0);
    } else if (op->pending == 1) {
        op->failed = 1; /* one of the two could not be sent: the pair is published again later */
    }
}

static void on_rc_written(ch_call_t *call, ch_pg_result_t *r)
{
    rc_op_t *op = ch_call_data(call);
    if (r->err != 0) {
        if (r->err == CH_EDB)
            ch_log(HC_LOG_ERROR, "hc_recompute", "writing a code failed: %s %s", r->sqlstate ? r->sqlstate : "",
                   r->message ? r->message : "");
        hc_recompute_kick(); /* the queue row is still there: the drainer will do it */
        rc_finish(call, op, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1 || PQgetvalue(res, 0, 1)[0] != 't') {
        /* an input arrived between our read and our write: read again */
        if (++op->attempts < GUARD_RETRIES) {
            int ret = rc_read(call, op);
            if (ret == 0)
                return;
            rc_finish(call, op, ret);
            return;
        }
        hc_recompute_kick();
        rc_finish(call, op, CH_EUNAVAIL);
        return;
    }
    if (PQgetisnull(res, 0, 7)) {
        rc_finish(call, op, 0); /* unchanged: the stored state read in step 1 stands */
        return;
    }
    op->state.code_id = ch_call_strdup(call, PQgetvalue(res, 0, 2));
    op->state.color = color_parse(PQgetvalue(res, 0, 3));
    op->state.reasons_json = ch_call_strdup(call, PQgetvalue(res, 0, 4));
    op->state.rule_version = (int)num(res, 0, 5);
    op->state.as_of = num(res, 0, 6);
    op->state.version = num(res, 0, 7);
    rc_publish(call, op);
}

/*
 * The write's result arrives here whatever became of the request (ch_call_pg_detached): a code that changed is
 * dropped from this process's caches even when the client has gone, and then published to the other processes by
 * worker 0. With the client still there, on_rc_written goes on (and publishes at once).
 */
typedef struct rc_write {
    ch_call_t *call;
    int64_t resident_id;
} rc_write_t;

static void on_rc_written_detached(void *arg, ch_pg_result_t *r)
{
    rc_write_t *w = arg;
    int changed = r->err == 0 && PQntuples(r->res[0]) == 1 && !PQgetisnull(r->res[0], 0, 7);
    if (changed)
        hc_cache_invalidate(w->resident_id);
    if (!ch_call_gone(w->call))
        on_rc_written(w->call, r);
    else if (changed)
        publish_later(&w->resident_id, 1);
    ch_call_unhold(w->call);
    free(w);
}

static void on_rc_read(ch_call_t *call, ch_pg_result_t *r)
{
    rc_op_t *op = ch_call_data(call);
    const hc_rules_t *rules = hc_rules_active();
    if (r->err != 0) {
        if (r->err == CH_EDB)
            ch_log(HC_LOG_ERROR, "hc_recompute", "reading the inputs failed: %s %s", r->sqlstate ? r->sqlstate : "",
                   r->message ? r->message : "");
        rc_finish(call, op, r->err);
        return;
    }
    batch_t b;
    batch_build(&b, r->res);
    if (b.n != 1) {
        batch_free(&b);
        rc_finish(call, op, CH_ENOTFOUND);
        return;
    }
    state_from_stored(call, op, &b.s[0]);
    ch_buf_t json = {0};
    batch_eval(&b, rules, &json);
    batch_free(&b);
    const char *v[1] = {json.base};
    ch_pg_query_t q = {&hc_rc_stmt_write, v, NULL};
    rc_write_t *w = malloc(sizeof(*w));
    if (w == NULL)
        abort();
    w->call = call;
    w->resident_id = op->resident_id;
    ch_call_hold(call);
    int ret = ch_call_pg_detached(call, &q, 1, on_rc_written_detached, w); /* parameters are copied */
    ch_buf_free(&json);
    if (ret != 0) {
        ch_call_unhold(call);
        free(w);
        rc_finish(call, op, ret);
    }
}

/* Step 1: one submission, one pipeline sync; the queue row (statement 1) is read before the inputs. */
static int rc_read(ch_call_t *call, rc_op_t *op)
{
    const hc_rules_t *rules = hc_rules_active();
    if (rules == NULL)
        return CH_EUNAVAIL;
    char *lb = ch_call_alloc(call, 32), *lbv = ch_call_alloc(call, 32);
    lookback_params(rules, lb, lbv);
    const char *ids = ch_call_printf(call, "{%lld}", (long long)op->resident_id);
    const char **v1 = ch_call_alloc(call, 3 * sizeof(*v1));
    v1[0] = ids;
    v1[1] = lb;
    v1[2] = lbv;
    ch_pg_query_t q[5] = {
        {&hc_rc_stmt_state, v1, NULL}, {&hc_rc_stmt_events, v1, NULL}, {&hc_rc_stmt_tests, v1, NULL},
        {&hc_rc_stmt_decls, v1, NULL}, {&hc_rc_stmt_areas, v1, NULL},
    };
    return ch_call_pg(call, q, 5, on_rc_read);
}

int hc_recompute(ch_call_t *call, int64_t resident_id, hc_state_cb cb)
{
    if (resident_id <= 0)
        return CH_EINVAL;
    rc_op_t *op = ch_call_alloc(call, sizeof(*op));
    memset(op, 0, sizeof(*op));
    op->resident_id = resident_id;
    op->cb = cb;
    op->saved = ch_call_data(call);
    ch_call_set_data(call, op);
    int ret = rc_read(call, op);
    if (ret != 0)
        ch_call_set_data(call, op->saved);
    return ret;
}

/* ---- the background threads: rule sets, the drainers, invalidations published again ---- */

/*
 * DRAIN_WORKERS threads, each with its own blocking connections (PostgreSQL with timeouts, Redis with timeouts), each
 * draining its share of the queue (resident_id % DRAIN_WORKERS), so that a bulk event keeps both PostgreSQL cores
 * busy. Worker k drains only while it holds advisory lock DRAIN_LOCK_KEY + k: one gateway of a deployment drains each
 * share, the others stand by. Worker 0 also follows the active rule set and publishes the invalidations that wait.
 */
#define DRAIN_WORKERS 2

typedef struct worker {
    int index;
    int efd; /* eventfd: hc_recompute_kick */
    PGconn *pg;
    redisContext *redis;
    int drainer; /* holds its share's lock */
    time_t next_lock;
    int pg_failing, redis_failing;
} worker_t;

static struct {
    char conninfo[1024];
    char redis_host[64];
    int redis_port;
    worker_t workers[DRAIN_WORKERS];
    int rules_notified;
    time_t next_rules;
    int rules_bad_version;
} bg;

void hc_recompute_kick(void)
{
    uint64_t one = 1;
    for (int i = 0; i < DRAIN_WORKERS; ++i) {
        if (bg.workers[i].efd > 0) {
            ssize_t w = write(bg.workers[i].efd, &one, sizeof(one));
            (void)w; /* EAGAIN: a wake-up is already pending */
        }
    }
}

static void w_disconnect(worker_t *w)
{
    if (w->pg != NULL)
        PQfinish(w->pg);
    w->pg = NULL;
    w->drainer = 0;
}

/* Runs a prepared statement (name given) or a plain one (sql); NULL on failure (logged; the transaction rolled back).
 */
static PGresult *w_exec(worker_t *w, const char *name, const char *sql, int n, const char *const *values)
{
    PGresult *res = name != NULL ? PQexecPrepared(w->pg, name, n, values, NULL, NULL, 0)
                                 : PQexecParams(w->pg, sql, n, NULL, values, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        ch_log(HC_LOG_ERROR, "hc_drainer", "statement failed: %s %s", state != NULL ? state : "",
               PQresultErrorMessage(res));
        PQclear(res);
        if (PQstatus(w->pg) != CONNECTION_OK)
            w_disconnect(w);
        else
            PQclear(PQexec(w->pg, "ROLLBACK")); /* harmless outside a transaction */
        return NULL;
    }
    return res;
}

/* Server notices (a ROLLBACK outside a transaction after an error) are not worth a line on stderr. */
static void on_notice(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

/* The drainer's statements, prepared once per connection: a batch then costs no planning. */
#define CLAIM_SQL                                                                                                      \
    "SELECT coalesce(array_agg(resident_id)::text, ''), count(*) FROM "                                                \
    "(SELECT resident_id FROM hc_recompute_queue WHERE due_at <= now() AND resident_id % $2::int = $3::int "           \
    " ORDER BY due_at LIMIT $1::int) s"

static int w_prepare(worker_t *w)
{
    const struct {
        const char *name, *sql;
        int n;
    } p[] = {
        {"hc_dr_claim", CLAIM_SQL, 3},
        {"hc_dr_state", hc_rc_stmt_state.sql, 1},
        {"hc_dr_events", hc_rc_stmt_events.sql, 2},
        {"hc_dr_tests", hc_rc_stmt_tests.sql, 2},
        {"hc_dr_decls", hc_rc_stmt_decls.sql, 2},
        {"hc_dr_areas", hc_rc_stmt_areas.sql, 3},
        {"hc_dr_write", hc_rc_stmt_write.sql, 1},
    };
    for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); ++i) {
        PGresult *res = PQprepare(w->pg, p[i].name, p[i].sql, p[i].n, NULL);
        int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok && !w->pg_failing) /* e.g. the migration is not applied yet */
            ch_log(HC_LOG_WARN, "hc_drainer", "could not prepare %s: %s", p[i].name, PQresultErrorMessage(res));
        PQclear(res);
        if (!ok)
            return -1;
    }
    return 0;
}

static int w_connect(worker_t *w)
{
    if (w->pg != NULL && PQstatus(w->pg) == CONNECTION_OK)
        return 0;
    w_disconnect(w);
    /*
     * The configured conninfo, with timeouts: a stalled server must not hang this thread for long. jit off: batch
     * statements cost enough to set off JIT compilation, which takes longer than running them. The planner's
     * defaults price a random page read at 4 sequential ones: planned for 5 000 residents among 160 000,
     * hc_dr_state then merges whole indexes instead of probing them (58 ms against 25 ms, measured with psql), and
     * parallel workers would take the other core from the loop. These connections read data that is in memory:
     * price it so.
     */
    const char *keys[] = {"dbname", "connect_timeout", "tcp_user_timeout", "options", "application_name", NULL};
    const char *vals[] = {bg.conninfo,
                          "3",
                          "10000",
                          "-c statement_timeout=30000 -c jit=off -c random_page_cost=1.1 "
                          "-c max_parallel_workers_per_gather=0",
                          "cityhall-healthcode",
                          NULL};
    w->pg = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(w->pg) != CONNECTION_OK || w_prepare(w) != 0) {
        if (!w->pg_failing)
            ch_log(HC_LOG_WARN, "hc_drainer", "worker %d: PostgreSQL is not ready (%s); retrying", w->index,
                   PQstatus(w->pg) != CONNECTION_OK ? "could not connect" : "statements do not prepare");
        w->pg_failing = 1;
        w_disconnect(w);
        return -1;
    }
    PQsetNoticeProcessor(w->pg, on_notice, NULL);
    if (w->pg_failing)
        ch_log(HC_LOG_INFO, "hc_drainer", "worker %d: connected to PostgreSQL again", w->index);
    w->pg_failing = 0;
    if (w->index == 0) {
        PQclear(PQexec(w->pg, "LISTEN hc_rules"));
        bg.next_rules = 0;
    }
    w->next_lock = 0;
    return 0;
}

/* Loads the active rule set when its version changed (worker 0). Returns 0 when the current one is the active one. */
static int rules_refresh(worker_t *w)
{
    PGresult *res = w_exec(w, NULL, "SELECT version, rules::text FROM rule_sets WHERE active", 0, NULL);
    if (res == NULL)
        return -1;
    int ret = -1;
    if (PQntuples(res) == 1) {
        int version = atoi(PQgetvalue(res, 0, 0));
        const hc_rules_t *cur = hc_rules_active();
        if (cur != NULL && cur->version == version) {
            ret = 0;
        } else {
            hc_rules_t *r = malloc(sizeof(*r));
            char err[256];
            if (r == NULL)
                abort();
            if (hc_rules_parse(PQgetvalue(res, 0, 1), (size_t)PQgetlength(res, 0, 1), version, r, err, sizeof(err)) ==
                0) {
                __atomic_store_n(&rules_current, r, __ATOMIC_RELEASE); /* the old one is leaked: threads hold it */
                ch_log(HC_LOG_INFO, "hc_rules", "rule set %d is active", version);
                ret = 0;
            } else {
                free(r);
                if (bg.rules_bad_version != version)
                    ch_log(HC_LOG_ERROR, "hc_rules", "rule set %d does not pass this engine's schema (%s); keeping %d",
                           version, err, cur != NULL ? cur->version : 0);
                bg.rules_bad_version = version;
            }
        }
    }
    PQclear(res);
    return ret;
}

/* A pipelined DEL + PUBLISH per changed resident on a blocking connection with timeouts. 0, or -1 on a failure. */
static int redis_publish(worker_t *w, const int64_t *ids, size_t n)
{
    if (n == 0)
        return 0;
    if (w->redis == NULL) {
        struct timeval tv = {1, 0};
        w->redis = redisConnectWithTimeout(bg.redis_host, bg.redis_port, tv);
        if (w->redis == NULL || w->redis->err != 0 || redisSetTimeout(w->redis, tv) != REDIS_OK) {
            if (w->redis != NULL)
                redisFree(w->redis);
            w->redis = NULL;
            if (!w->redis_failing)
                ch_log(HC_LOG_WARN, "hc_drainer",
                       "could not connect to Redis: invalidations wait (caches "
                       "resubscribing to ch:hc drop everything meanwhile; Redis copies expire)");
            w->redis_failing = 1;
            return -1;
        }
        if (w->redis_failing)
            ch_log(HC_LOG_INFO, "hc_drainer", "worker %d: connected to Redis again", w->index);
        w->redis_failing = 0;
    }
    for (size_t i = 0; i < n; ++i) {
        redisAppendCommand(w->redis, "DEL hc:code:%lld", (long long)ids[i]);
        redisAppendCommand(w->redis, "PUBLISH ch:hc %lld", (long long)ids[i]);
    }
    for (size_t i = 0; i < 2 * n; ++i) {
        void *reply = NULL;
        if (redisGetReply(w->redis, &reply) != REDIS_OK) {
            ch_log(HC_LOG_WARN, "hc_drainer", "Redis failed while publishing invalidations: they wait");
            redisFree(w->redis);
            w->redis = NULL;
            w->redis_failing = 1;
            return -1;
        }
        freeReplyObject(reply);
    }
    return 0;
}

/* Step 4 for the drainers: this process, then Redis and the other processes (again later if Redis fails). */
static void publish_changes(worker_t *w, const int64_t *ids, size_t n)
{
    for (size_t i = 0; i < n; ++i)
        hc_cache_invalidate(ids[i]);
    if (redis_publish(w, ids, n) != 0)
        publish_later(ids, n);
}

/* Worker 0: the invalidations that wait, all at once; back in the queue if Redis fails again. */
static void publish_retry(worker_t *w)
{
    pthread_mutex_lock(&later_lock);
    int64_t *ids = later_ids;
    size_t n = later_len;
    later_ids = NULL;
    later_len = later_cap = 0;
    pthread_mutex_unlock(&later_lock);
    if (n > 0 && redis_publish(w, ids, n) != 0)
        publish_later(ids, n);
    free(ids);
}

/* One pass over at most BATCH_MAX due queue rows of this worker's share. Returns how many, or -1 on an error. */
static int drain_once(worker_t *w)
{
    const hc_rules_t *rules = hc_rules_active();
    if (rules == NULL)
        return 0;
    char lb[32], lbv[32], limit[16], mod[16], share[16];
    lookback_params(rules, lb, lbv);
    snprintf(limit, sizeof(limit), "%d", BATCH_MAX);
    snprintf(mod, sizeof(mod), "%d", DRAIN_WORKERS);
    snprintf(share, sizeof(share), "%d", w->index);
    /* step 1 in one snapshot: the seqs and the inputs agree with each other */
    PGresult *res = w_exec(w, NULL, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL);
    if (res == NULL)
        return -1;
    PQclear(res);
    const char *cv[3] = {limit, mod, share};
    if ((res = w_exec(w, "hc_dr_claim", NULL, 3, cv)) == NULL)
        return -1;
    char *ids = strdup(PQgetvalue(res, 0, 0));
    int claimed = atoi(PQgetvalue(res, 0, 1));
    PQclear(res);
    if (ids == NULL)
        abort();
    if (claimed == 0) {
        free(ids);
        PQclear(w_exec(w, NULL, "COMMIT", 0, NULL));
        return 0;
    }
    static const char *const reads[5] = {"hc_dr_state", "hc_dr_events", "hc_dr_tests", "hc_dr_decls", "hc_dr_areas"};
    static const int nparams[5] = {1, 2, 2, 2, 3};
    PGresult *rs[5] = {NULL};
    const char *v[3] = {ids, lb, lbv};
    int ok = 1;
    for (int i = 0; i < 5 && ok; ++i)
        ok = (rs[i] = w_exec(w, reads[i], NULL, nparams[i], v)) != NULL;
    if (ok)
        PQclear(w_exec(w, NULL, "COMMIT", 0, NULL));
    int ret = -1;
    if (ok) {
        batch_t b;
        batch_build(&b, rs);
        if ((int)b.n < claimed) {
            /* queued residents that are not in the registry: nothing to compute, drop their rows */
            const char *dv[1] = {ids};
            PQclear(w_exec(w, NULL,
                           "DELETE FROM hc_recompute_queue q WHERE q.resident_id = ANY ($1::bigint[]) AND NOT EXISTS "
                           "(SELECT 1 FROM registry_residents r WHERE r.resident_id = q.resident_id)",
                           1, dv));
        }
        ch_buf_t json = {0};
        batch_eval(&b, rules, &json);
        batch_free(&b);
        const char *wv[1] = {json.base};
        PGresult *wr = w_exec(w, "hc_dr_write", NULL, 1, wv);
        ch_buf_free(&json);
        if (wr != NULL) {
            int n = PQntuples(wr);
            int64_t *changed = xcalloc((size_t)n, sizeof(*changed));
            size_t nchanged = 0;
            for (int i = 0; i < n; ++i)
                if (!PQgetisnull(wr, i, 7))
                    changed[nchanged++] = num(wr, i, 0);
            PQclear(wr);
            publish_changes(w, changed, nchanged);
            free(changed);
            ret = claimed;
        }
    }
    for (int i = 0; i < 5; ++i)
        PQclear(rs[i]);
    free(ids);
    return ret;
}

static void w_wait(worker_t *w, int timeout_ms)
{
    struct pollfd pfd[2] = {{w->efd, POLLIN, 0}, {w->pg != NULL ? PQsocket(w->pg) : -1, POLLIN, 0}};
    if (poll(pfd, 2, timeout_ms) <= 0)
        return;
    if (pfd[0].revents & POLLIN) {
        uint64_t v;
        ssize_t r = read(w->efd, &v, sizeof(v));
        (void)r;
    }
    if (w->pg != NULL && (pfd[1].revents & (POLLIN | POLLERR | POLLHUP))) {
        if (!PQconsumeInput(w->pg)) {
            w_disconnect(w);
            return;
        }
        PGnotify *nt;
        while ((nt = PQnotifies(w->pg)) != NULL) {
            if (strcmp(nt->relname, "hc_rules") == 0)
                bg.rules_notified = 1;
            PQfreemem(nt);
        }
    }
}

static void *w_main(void *arg)
{
    worker_t *w = arg;
    for (;;) {
        if (w_connect(w) != 0) {
            sleep(1);
            continue;
        }
        time_t now = time(NULL);
        if (w->index == 0 && (bg.rules_notified || now >= bg.next_rules || hc_rules_active() == NULL)) {
            bg.rules_notified = 0;
            rules_refresh(w);
            bg.next_rules = now + RULES_POLL_S;
        }
        if (w->pg != NULL && !w->drainer && now >= w->next_lock) {
            w->next_lock = now + LOCK_RETRY_S;
            char sql[96];
            snprintf(sql, sizeof(sql), "SELECT pg_try_advisory_lock(%s + %d)", DRAIN_LOCK_KEY, w->index);
            PGresult *res = w_exec(w, NULL, sql, 0, NULL);
            if (res != NULL) {
                w->drainer = PQgetvalue(res, 0, 0)[0] == 't';
                if (w->drainer)
                    ch_log(HC_LOG_INFO, "hc_drainer", "this gateway drains share %d of %d of the recompute queue",
                           w->index, DRAIN_WORKERS);
                PQclear(res);
            }
        }
        if (w->pg != NULL && w->drainer) {
            int n;
            while ((n = drain_once(w)) >= BATCH_MAX && w->pg != NULL)
                ;
            if (n < 0)
                sleep(1); /* an error was logged: do not spin on it */
        }
        if (w->index == 0)
            publish_retry(w);
        w_wait(w, w->drainer ? IDLE_POLL_MS : 1000);
    }
    return NULL;
}

int hc_recompute_start(const ch_config_t *config)
{
    snprintf(bg.conninfo, sizeof(bg.conninfo), "%s", config->pg_conninfo);
    snprintf(bg.redis_host, sizeof(bg.redis_host), "%s", config->redis_host);
    bg.redis_port = config->redis_port;
    for (int i = 0; i < DRAIN_WORKERS; ++i) {
        worker_t *w = &bg.workers[i];
        w->index = i;
        w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (w->efd < 0) {
            ch_log(HC_LOG_ERROR, "hc_start", "could not create an eventfd: %s", strerror(errno));
            return -1;
        }
    }
    /* the first rule set now, so that the first requests can be served; a failure is retried by worker 0 */
    if (w_connect(&bg.workers[0]) == 0)
        rules_refresh(&bg.workers[0]);
    for (int i = 0; i < DRAIN_WORKERS; ++i) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int ret = pthread_create(&tid, &attr, w_main, &bg.workers[i]);
        pthread_attr_destroy(&attr);
        if (ret != 0) {
            ch_log(HC_LOG_ERROR, "hc_start", "could not start the health-code recompute threads");
            return -1;
        }
    }
    const hc_rules_t *r = hc_rules_active();
    ch_log(HC_LOG_INFO, "hc_recompute_ready", "rule set %d; the recompute queue is drained in the background",
           r != NULL ? r->version : 0);
    return 0;
}
