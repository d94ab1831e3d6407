/* Drives gateway/pg.c against a real PostgreSQL given by conninfo: TAP checks of its contract, or an outage monitor. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <h2o.h>

#include "cityhall/ch.h"
#include "cityhall/pg.h"
#include "../unit/tap.h"

/* The gateway defines this elsewhere; the test links pg.c alone. */
uint64_t ch_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static h2o_loop_t *loop;

static const ch_pg_stmt_t st_create = {
    "t_create", "CREATE TABLE IF NOT EXISTS ch_pg_loop_test (id bigint PRIMARY KEY, note text NOT NULL)", 0};
static const ch_pg_stmt_t st_clear = {"t_clear", "DELETE FROM ch_pg_loop_test", 0};
static const ch_pg_stmt_t st_add1 = {"t_add1", "SELECT $1::int + 1", 1};
static const ch_pg_stmt_t st_insert = {"t_insert", "INSERT INTO ch_pg_loop_test (id, note) VALUES ($1, $2)", 2};
static const ch_pg_stmt_t st_broken = {"t_broken", "SELECT * FROM ch_pg_no_such_table", 0};
static const ch_pg_stmt_t st_count = {"t_count", "SELECT count(*) FROM ch_pg_loop_test WHERE id = ANY($1::bigint[])",
                                      1};
static const ch_pg_stmt_t st_sleep = {"t_sleep", "SELECT pg_sleep($1::float8)", 1};
static const ch_pg_stmt_t st_drop_late = {"t_drop_late", "DROP TABLE IF EXISTS ch_pg_loop_late", 0};
static const ch_pg_stmt_t st_create_late = {"t_create_late", "CREATE TABLE ch_pg_loop_late (id int)", 0};
static const ch_pg_stmt_t st_late = {"t_late", "SELECT count(*) FROM ch_pg_loop_late", 0};
static const ch_pg_stmt_t st_drop_late2 = {"t_drop_late2", "DROP TABLE IF EXISTS ch_pg_loop_late2", 0};
static const ch_pg_stmt_t st_create_late2 = {"t_create_late2", "CREATE TABLE ch_pg_loop_late2 (id int)", 0};
static const ch_pg_stmt_t st_late2 = {"t_late2", "SELECT count(*) FROM ch_pg_loop_late2", 0};
static const ch_pg_stmt_t st_div = {"t_div", "SELECT 100 / $1::int", 1};
static const ch_pg_stmt_t st_pid = {"t_pid", "SELECT pg_backend_pid()", 0};
static const ch_pg_stmt_t st_terminate = {"t_terminate", "SELECT pg_terminate_backend($1::int)", 1};

/* Set around every ch_pg_submit: a callback that sees it was called before submit returned. */
static int in_submit, early_callbacks;

static int submit(ch_pg_pool_t *pool, const ch_pg_query_t *q, int n, ch_pg_cb cb, void *arg)
{
    in_submit = 1;
    int r = ch_pg_submit(pool, q, n, cb, arg);
    in_submit = 0;
    return r;
}

static int submit_read(ch_pg_pool_t *pool, const ch_pg_query_t *q, int n, ch_pg_cb cb, void *arg)
{
    in_submit = 1;
    int r = ch_pg_submit_read(pool, q, n, cb, arg);
    in_submit = 0;
    return r;
}

/* A one-shot capture of a submission's outcome; values copied out because results are borrowed. */
typedef struct capture {
    int done, err, nres;
    int calls, seq; /* how many times the callback ran; when it last ran, in completion order */
    char sqlstate[8];
    char values[8][32];
} capture_t;

static void on_capture(void *arg, ch_pg_result_t *r)
{
    static int seq;
    capture_t *c = arg;
    early_callbacks += in_submit;
    ++c->calls;
    c->seq = ++seq;
    c->done = 1;
    c->err = r->err;
    c->nres = r->nres;
    snprintf(c->sqlstate, sizeof(c->sqlstate), "%s", r->sqlstate != NULL ? r->sqlstate : "");
    for (int i = 0; i < r->nres && i < 8; ++i) {
        c->values[i][0] = '\0';
        if (r->err == 0 && r->res[i] != NULL && PQntuples(r->res[i]) > 0)
            snprintf(c->values[i], sizeof(c->values[i]), "%s", PQgetvalue(r->res[i], 0, 0));
    }
}

static int run_until(const int *flag, uint64_t max_ms)
{
    uint64_t end = ch_now_us() + max_ms * 1000;
    while (!*flag && ch_now_us() < end)
        h2o_evloop_run(loop, 10);
    return *flag;
}

static void run_for(uint64_t ms)
{
    uint64_t end = ch_now_us() + ms * 1000;
    while (ch_now_us() < end)
        h2o_evloop_run(loop, 10);
}

static int wait_up(ch_pg_pool_t *pool, unsigned want, uint64_t max_ms)
{
    uint64_t end = ch_now_us() + max_ms * 1000;
    ch_pg_stats_t s;
    for (;;) {
        ch_pg_pool_stats(pool, &s);
        if (s.conns_up >= want || ch_now_us() >= end)
            return s.conns_up >= want;
        h2o_evloop_run(loop, 10);
    }
}

/* Runs the loop until every capture is done. */
static int run_all(capture_t *cs, int n, uint64_t max_ms)
{
    uint64_t end = ch_now_us() + max_ms * 1000;
    for (int i = 0; i != n; ++i)
        while (!cs[i].done && ch_now_us() < end)
            h2o_evloop_run(loop, 10);
    for (int i = 0; i != n; ++i)
        if (!cs[i].done)
            return 0;
    return 1;
}

static int all_called_once(const capture_t *cs, int n)
{
    for (int i = 0; i != n; ++i)
        if (cs[i].calls != 1)
            return 0;
    return 1;
}

static capture_t run_one(ch_pg_pool_t *pool, const ch_pg_query_t *q, int n, int *submit_ret)
{
    capture_t c = {0};
    *submit_ret = submit(pool, q, n, on_capture, &c);
    if (*submit_ret == 0)
        run_until(&c.done, 10000);
    return c;
}

/* --- many submissions at once --- */

typedef struct batch {
    int total, done, ok, wrong, order_errors, last_seen;
} batch_t;

typedef struct batch_item {
    batch_t *batch;
    int i;
} batch_item_t;

static void on_batch(void *arg, ch_pg_result_t *r)
{
    batch_item_t *it = arg;
    batch_t *b = it->batch;
    early_callbacks += in_submit;
    ++b->done;
    if (r->err == 0 && r->nres == 1 && atoi(PQgetvalue(r->res[0], 0, 0)) == it->i + 1)
        ++b->ok;
    else
        ++b->wrong;
    if (it->i != b->last_seen + 1)
        ++b->order_errors;
    b->last_seen = it->i;
}

/* Submits `count` SELECT $1 + 1 at once; returns how many were accepted. */
static int submit_batch(ch_pg_pool_t *pool, batch_t *b, batch_item_t *items, char (*bufs)[16], int count,
                        int *first_err, int read)
{
    int accepted = 0;
    *first_err = 0;
    b->last_seen = -1;
    for (int i = 0; i != count; ++i) {
        items[i].batch = b;
        items[i].i = i;
        snprintf(bufs[i], sizeof(bufs[i]), "%d", i);
        const char *v[1] = {bufs[i]};
        ch_pg_query_t q = {&st_add1, v, NULL};
        int r = read ? submit_read(pool, &q, 1, on_batch, &items[i]) : submit(pool, &q, 1, on_batch, &items[i]);
        if (r != 0) {
            *first_err = r;
            break;
        }
        ++accepted;
    }
    b->total = accepted;
    return accepted;
}

static int batch_finished(batch_t *b)
{
    return b->done == b->total;
}

static void run_batch(batch_t *b, uint64_t max_ms)
{
    uint64_t end = ch_now_us() + max_ms * 1000;
    while (!batch_finished(b) && ch_now_us() < end)
        h2o_evloop_run(loop, 10);
}

/* --- chained submissions from callbacks --- */

typedef struct chain {
    ch_pg_pool_t *pool;
    int step, target, failed;
    char buf[16];
    int mode; /* 0: every step a ch_pg_submit, 1: every step a read, 2: reads and writes by turns */
} chain_t;

static void on_chain(void *arg, ch_pg_result_t *r)
{
    chain_t *c = arg;
    early_callbacks += in_submit;
    if (r->err != 0 || atoi(PQgetvalue(r->res[0], 0, 0)) != c->step + 1) {
        c->failed = 1;
        return;
    }
    if (++c->step == c->target)
        return;
    snprintf(c->buf, sizeof(c->buf), "%d", c->step);
    const char *v[1] = {c->buf};
    ch_pg_query_t q = {&st_add1, v, NULL};
    int read = c->mode == 1 || (c->mode == 2 && c->step % 2 == 1);
    if ((read ? submit_read(c->pool, &q, 1, on_chain, c) : submit(c->pool, &q, 1, on_chain, c)) != 0)
        c->failed = 1;
}

static int chain_over(chain_t *c)
{
    return c->failed || c->step == c->target;
}

/* --- throughput with a window of outstanding submissions --- */

typedef struct window {
    ch_pg_pool_t *pool;
    int outstanding, window, remaining, done, errors;
    int read;
} window_t;

static void window_fill(window_t *w);

static void on_window(void *arg, ch_pg_result_t *r)
{
    window_t *w = arg;
    --w->outstanding;
    ++w->done;
    w->errors += r->err != 0;
    window_fill(w);
}

static void window_fill(window_t *w)
{
    static const char *v[1] = {"41"};
    ch_pg_query_t q = {&st_add1, v, NULL};
    while (w->outstanding < w->window && w->remaining > 0) {
        if ((w->read ? ch_pg_submit_read(w->pool, &q, 1, on_window, w) : ch_pg_submit(w->pool, &q, 1, on_window, w)) !=
            0) {
            ++w->errors;
            --w->remaining;
            continue;
        }
        ++w->outstanding;
        --w->remaining;
    }
}

/* --- a random mix of reads and writes, some failing, through a window: every outcome checked --- */

typedef struct mix {
    ch_pg_pool_t *pool;
    int outstanding, window, remaining, wrong, refused;
    unsigned long done;
    uint64_t rng;
} mix_t;

typedef struct mix_op {
    mix_t *m;
    int fails, value, calls;
    char buf[16];
} mix_op_t;

static void mix_fill(mix_t *m);

static void on_mix(void *arg, ch_pg_result_t *r)
{
    mix_op_t *op = arg;
    mix_t *m = op->m;
    early_callbacks += in_submit;
    if (op->fails)
        m->wrong += r->err != CH_EDB || r->sqlstate == NULL || strcmp(r->sqlstate, "22012") != 0;
    else
        m->wrong += r->err != 0 || atoi(PQgetvalue(r->res[0], 0, 0)) != op->value + 1;
    free(op);
    --m->outstanding;
    ++m->done;
    mix_fill(m);
}

static void mix_fill(mix_t *m)
{
    while (m->outstanding < m->window && m->remaining > 0) {
        m->rng = m->rng * 6364136223846793005ULL + 1442695040888963407ULL;
        unsigned x = (unsigned)(m->rng >> 33);
        mix_op_t *op = calloc(1, sizeof(*op));
        op->m = m;
        op->fails = x % 23 == 0; /* about 4 % of the operations divide by zero */
        op->value = (int)(x % 1000);
        snprintf(op->buf, sizeof(op->buf), "%d", op->fails ? 0 : op->value);
        const char *v[1] = {op->buf};
        ch_pg_query_t q = {op->fails ? &st_div : &st_add1, v, NULL};
        int read = (x >> 8) % 4 != 0; /* three reads for one write */
        int r = read ? submit_read(m->pool, &q, 1, on_mix, op) : submit(m->pool, &q, 1, on_mix, op);
        --m->remaining;
        if (r != 0) {
            ++m->refused;
            free(op);
            continue;
        }
        ++m->outstanding;
    }
}

/* A TCP port with nothing listening, and a listener that never accepts (the kernel completes the handshake). */
static int closed_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    getsockname(fd, (struct sockaddr *)&sa, &len);
    close(fd);
    return ntohs(sa.sin_port);
}

static int silent_listener(int *port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    listen(fd, 16);
    getsockname(fd, (struct sockaddr *)&sa, &len);
    *port = ntohs(sa.sin_port);
    return fd;
}

static int run_tests(const char *conninfo)
{
    int r;
    capture_t c;
    ch_pg_stats_t st;

    /* Phase 1: the table must exist before an INSERT into it can be prepared, so a first pool creates it. */
    ch_pg_register(&st_create);
    ch_pg_register(&st_drop_late);
    ch_pg_register(&st_drop_late2);
    ch_pg_config_t setup_cfg = {conninfo, 1, 16, 5000, 2000};
    ch_pg_pool_t *setup = ch_pg_pool_new(loop, &setup_cfg);
    tap_ok(setup != NULL, "a pool is created from a valid conninfo");
    ch_pg_query_t create[3] = {{&st_create, NULL, NULL}, {&st_drop_late, NULL, NULL}, {&st_drop_late2, NULL, NULL}};
    c = run_one(setup, create, 3, &r);
    tap_ok(r == 0 && c.done && c.err == 0,
           "a submission queued while connecting runs once the connection is up "
           "(err=%d submit=%d)",
           c.err, r);
    ch_pg_pool_free(setup);

    /* Phase 2: statements registered now are prepared by pools created from now on. */
    ch_pg_register(&st_clear);
    ch_pg_register(&st_add1);
    ch_pg_register(&st_broken); /* fails to prepare; must not take the statements after it down */
    ch_pg_register(&st_insert);
    ch_pg_register(&st_count);
    ch_pg_register(&st_sleep);
    ch_pg_register(&st_create_late);
    ch_pg_register(&st_late); /* its table does not exist yet, as when `serve` starts before `migrate` */
    ch_pg_register(&st_div);
    ch_pg_register(&st_create_late2);
    ch_pg_register(&st_late2); /* its table is created once a pool is up, as st_late's */
    ch_pg_register(&st_pid);
    ch_pg_register(&st_terminate);
    ch_pg_config_t cfg = {conninfo, 2, 20000, 5000, 2000};
    ch_pg_pool_t *pool = ch_pg_pool_new(loop, &cfg);
    tap_ok(wait_up(pool, 2, 5000), "both connections come up and prepare their statements");
    {
        ch_pg_query_t q = {&st_clear, NULL, NULL};
        c = run_one(pool, &q, 1, &r);
        tap_ok(c.err == 0, "a statement registered after the first pool was created is prepared by the next one");
    }

    {
        const char *v[5][1] = {{"10"}, {"11"}, {"12"}, {"13"}, {"14"}};
        ch_pg_query_t q[5];
        for (int i = 0; i != 5; ++i)
            q[i] = (ch_pg_query_t){&st_add1, v[i], NULL};
        c = run_one(pool, q, 5, &r);
        int inorder = c.done && c.err == 0 && c.nres == 5;
        for (int i = 0; inorder && i != 5; ++i) {
            char want[16];
            snprintf(want, sizeof(want), "%d", 11 + i);
            inorder = strcmp(c.values[i], want) == 0;
        }
        tap_ok(inorder, "the results of a 5-statement submission come back in statement order");
    }

    {
        /* a value given with a length need not be NUL-terminated */
        const char raw[3] = {'4', '1', 'x'};
        const char *v[1] = {raw};
        int len[1] = {2};
        ch_pg_query_t q = {&st_add1, v, len};
        c = run_one(pool, &q, 1, &r);
        tap_is_str(c.values[0], "42", "a parameter passed with an explicit length is sent as exactly those bytes");
    }

    {
        /* the caller's parameter buffers may be reused as soon as ch_pg_submit returns */
        char buf[16] = "99";
        const char *v[1] = {buf};
        ch_pg_query_t q = {&st_add1, v, NULL};
        capture_t cc = {0};
        r = submit(pool, &q, 1, on_capture, &cc);
        strcpy(buf, "1");
        run_until(&cc.done, 5000);
        tap_is_str(cc.values[0], "100", "parameters are copied at submission");
    }

    {
        const int n = 1000;
        batch_t b = {0};
        batch_item_t *items = calloc(n, sizeof(*items));
        char(*bufs)[16] = calloc(n, sizeof(*bufs));
        ch_pg_config_t one_cfg = {conninfo, 1, 2000, 5000, 2000};
        ch_pg_pool_t *one = ch_pg_pool_new(loop, &one_cfg);
        wait_up(one, 1, 5000);
        int first_err;
        submit_batch(one, &b, items, bufs, n, &first_err, 0);
        run_batch(&b, 10000);
        tap_ok(b.done == n && b.ok == n && b.order_errors == 0,
               "on one connection, %d pipelined submissions complete in submission order, each with its own result "
               "(ok=%d order_errors=%d)",
               n, b.ok, b.order_errors);
        ch_pg_pool_free(one);
        free(items);
        free(bufs);
    }

    {
        const int n = 10000;
        batch_t b = {0};
        batch_item_t *items = calloc(n, sizeof(*items));
        char(*bufs)[16] = calloc(n, sizeof(*bufs));
        int first_err;
        uint64_t t0 = ch_now_us();
        int accepted = submit_batch(pool, &b, items, bufs, n, &first_err, 0);
        run_batch(&b, 30000);
        uint64_t us = ch_now_us() - t0;
        tap_ok(accepted == n && b.done == n && b.ok == n,
               "%d pipelined submissions on 2 connections all complete "
               "(accepted=%d ok=%d)",
               n, accepted, b.ok);
        printf("# %d submissions submitted at once: %.1f ms, %.0f/s\n", n, us / 1000.0, n * 1e6 / (double)us);
        free(items);
        free(bufs);
    }

    {
        window_t w = {pool, 0, 512, 200000, 0, 0, 0};
        uint64_t t0 = ch_now_us();
        window_fill(&w);
        while (w.outstanding > 0)
            h2o_evloop_run(loop, 10);
        uint64_t us = ch_now_us() - t0;
        tap_ok(w.done == 200000 && w.errors == 0, "200000 submissions through a window of 512 complete without errors");
        printf("# throughput, pipelined prepared SELECT, 2 connections, one loop, window 512: %.0f submissions/s\n",
               w.done * 1e6 / (double)us);
    }

    {
        window_t w = {pool, 0, 512, 200000, 0, 0, 1};
        uint64_t t0 = ch_now_us();
        window_fill(&w);
        while (w.outstanding > 0)
            h2o_evloop_run(loop, 10);
        uint64_t us = ch_now_us() - t0;
        tap_ok(w.done == 200000 && w.errors == 0, "200000 reads through a window of 512 complete without errors");
        printf("# throughput, the same with ch_pg_submit_read: %.0f submissions/s\n", w.done * 1e6 / (double)us);
    }

    {
        const char *a[2] = {"1001", "a"}, *b2[2] = {"1002", "b"}, *dup[2] = {"1001", "dup"};
        ch_pg_query_t q[3] = {{&st_insert, a, NULL}, {&st_insert, b2, NULL}, {&st_insert, dup, NULL}};
        c = run_one(pool, q, 3, &r);
        tap_ok(c.done && c.err == CH_EDB,
               "a unique violation in the third statement fails the submission with CH_EDB "
               "(err=%d)",
               c.err);
        tap_is_str(c.sqlstate, "23505", "the failure carries sqlstate 23505");
        const char *ids[1] = {"{1001,1002}"};
        ch_pg_query_t cq = {&st_count, ids, NULL};
        c = run_one(pool, &cq, 1, &r);
        tap_is_str(c.values[0], "0", "the two statements before the failure were rolled back");
    }

    {
        /* three submissions back to back on the same pipeline: the failure in the middle must not spill over */
        const char *a[2] = {"2001", "a"}, *dup[2] = {"2001", "dup"}, *b2[2] = {"2002", "b"};
        ch_pg_query_t q1 = {&st_insert, a, NULL}, q2[2] = {{&st_insert, b2, NULL}, {&st_insert, dup, NULL}};
        const char *c3[2] = {"2003", "c"};
        ch_pg_query_t q3 = {&st_insert, c3, NULL};
        capture_t c1 = {0}, c2 = {0}, cc3 = {0};
        ch_pg_config_t one_cfg = {conninfo, 1, 100, 5000, 2000};
        ch_pg_pool_t *one = ch_pg_pool_new(loop, &one_cfg);
        wait_up(one, 1, 5000);
        submit(one, &q1, 1, on_capture, &c1);
        submit(one, q2, 2, on_capture, &c2);
        submit(one, &q3, 1, on_capture, &cc3);
        run_until(&cc3.done, 5000);
        tap_ok(c1.err == 0 && c2.err == CH_EDB && cc3.err == 0,
               "a failed submission between two others on one pipeline affects only itself (%d %d %d)", c1.err, c2.err,
               cc3.err);
        const char *ids[1] = {"{2001,2002,2003}"};
        ch_pg_query_t cq = {&st_count, ids, NULL};
        c = run_one(one, &cq, 1, &r);
        tap_is_str(c.values[0], "2", "the submissions around the failed one committed, the failed one did not");
        ch_pg_pool_free(one);
    }

    {
        ch_pg_query_t q = {&st_broken, NULL, NULL};
        c = run_one(pool, &q, 1, &r);
        tap_ok(c.err == CH_EDB && strcmp(c.sqlstate, "42P01") == 0,
               "a statement that cannot be prepared fails alone with CH_EDB and the server's reason (sqlstate %s)",
               c.sqlstate);
        const char *v[1] = {"1"};
        ch_pg_query_t q2 = {&st_add1, v, NULL};
        c = run_one(pool, &q2, 1, &r);
        tap_is_str(c.values[0], "2", "the statements registered around it work");
    }

    {
        /* a read whose statement must be prepared again goes out in a segment of its own: its 42P01 is its own */
        const char *v[2][1] = {{"1"}, {"2"}};
        ch_pg_query_t q[3] = {{&st_add1, v[0], NULL}, {&st_late, NULL, NULL}, {&st_add1, v[1], NULL}};
        capture_t cs[3] = {{0}};
        for (int i = 0; i != 3; ++i)
            submit_read(pool, &q[i], 1, on_capture, &cs[i]);
        run_all(cs, 3, 5000);
        tap_ok(all_called_once(cs, 3) && cs[1].err == CH_EDB && strcmp(cs[1].sqlstate, "42P01") == 0 &&
                   cs[0].err == 0 && strcmp(cs[0].values[0], "2") == 0 && cs[2].err == 0 &&
                   strcmp(cs[2].values[0], "3") == 0,
               "among reads, one whose table is missing fails alone with 42P01 (%d %s), the others succeed (%d %d)",
               cs[1].err, cs[1].sqlstate, cs[0].err, cs[2].err);
    }

    {
        ch_pg_query_t q = {&st_late, NULL, NULL};
        c = run_one(pool, &q, 1, &r);
        tap_ok(c.err == CH_EDB && strcmp(c.sqlstate, "42P01") == 0,
               "a statement whose table is missing fails with the server's reason, 42P01 (got %s)", c.sqlstate);
        ch_pg_query_t cq = {&st_create_late, NULL, NULL};
        c = run_one(pool, &cq, 1, &r);
        tap_ok(c.err == 0, "its table is created");
        /* four at once: both connections, and a second use pipelined behind the first one's prepare */
        capture_t cs[4] = {{0}};
        for (int i = 0; i != 4; ++i)
            submit(pool, &q, 1, on_capture, &cs[i]);
        run_until(&cs[3].done, 5000);
        run_until(&cs[2].done, 5000);
        int allok = 1;
        for (int i = 0; i != 4; ++i)
            allok &= cs[i].done && cs[i].err == 0 && strcmp(cs[i].values[0], "0") == 0;
        tap_ok(allok, "then it works on every connection without a reconnect (%d %d %d %d)", cs[0].err, cs[1].err,
               cs[2].err, cs[3].err);
    }

    {
        static const ch_pg_stmt_t unregistered = {"t_unregistered", "SELECT 1", 0};
        ch_pg_query_t q = {&unregistered, NULL, NULL};
        capture_t cc = {0};
        tap_ok(submit(pool, &q, 1, on_capture, &cc) == CH_EINVAL,
               "an unregistered statement is refused with CH_EINVAL");
    }

    {
        chain_t ch = {pool, 0, 100, 0, "", 0};
        const char *v[1] = {"0"};
        ch_pg_query_t q = {&st_add1, v, NULL};
        submit(pool, &q, 1, on_chain, &ch);
        uint64_t end = ch_now_us() + 10000000;
        while (!chain_over(&ch) && ch_now_us() < end)
            h2o_evloop_run(loop, 10);
        tap_ok(ch.step == 100 && !ch.failed, "100 submissions chained from callbacks complete (step=%d)", ch.step);
    }

    /* --- ch_pg_submit_read: reads share syncs; a failure aborts only its own submission --- */
    {
        ch_pg_config_t rcfg = {conninfo, 1, 2000, 5000, 2000};
        ch_pg_pool_t *rp = ch_pg_pool_new(loop, &rcfg);
        ch_pg_stats_t s0, s1;
        wait_up(rp, 1, 5000);

        {
            enum { N = 100 };
            capture_t cs[N] = {{0}};
            char bufs[N][16];
            ch_pg_pool_stats(rp, &s0);
            for (int i = 0; i != N; ++i) {
                snprintf(bufs[i], sizeof(bufs[i]), "%d", i);
                const char *v[1] = {bufs[i]};
                ch_pg_query_t q = {&st_add1, v, NULL};
                submit_read(rp, &q, 1, on_capture, &cs[i]);
            }
            run_all(cs, N, 5000);
            ch_pg_pool_stats(rp, &s1);
            int good = all_called_once(cs, N);
            for (int i = 0; good && i != N; ++i)
                good = cs[i].err == 0 && atoi(cs[i].values[0]) == i + 1 && (i == 0 || cs[i].seq > cs[i - 1].seq);
            tap_ok(good, "100 reads submitted together complete once each, in order, each with its own result");
            tap_ok(s1.syncs - s0.syncs == 1, "and share one sync (%llu)", (unsigned long long)(s1.syncs - s0.syncs));
        }

        {
            /* ten reads in one batch, the fifth divides by zero: the server skips the five behind it */
            enum { N = 10 };
            capture_t cs[N] = {{0}};
            char bufs[N][16];
            ch_pg_pool_stats(rp, &s0);
            for (int i = 0; i != N; ++i) {
                snprintf(bufs[i], sizeof(bufs[i]), "%d", i == 4 ? 0 : i + 1);
                const char *v[1] = {bufs[i]};
                ch_pg_query_t q = {&st_div, v, NULL};
                submit_read(rp, &q, 1, on_capture, &cs[i]);
            }
            run_all(cs, N, 5000);
            ch_pg_pool_stats(rp, &s1);
            int others = 1;
            for (int i = 0; i != N; ++i)
                if (i != 4)
                    others &= cs[i].err == 0 && atoi(cs[i].values[0]) == 100 / (i + 1);
            tap_ok(all_called_once(cs, N) && cs[4].err == CH_EDB && strcmp(cs[4].sqlstate, "22012") == 0,
                   "in a batch of reads, the one dividing by zero fails with CH_EDB 22012 (%d %s)", cs[4].err,
                   cs[4].sqlstate);
            tap_ok(others, "the nine others succeed with their own results, though the server skipped five of them");
            tap_ok(s1.resent - s0.resent == 5 && s1.syncs - s0.syncs == 2,
                   "the five it skipped were sent again, in one more batch (resent %llu, syncs %llu)",
                   (unsigned long long)(s1.resent - s0.resent), (unsigned long long)(s1.syncs - s0.syncs));
        }

        {
            /* three failing reads ahead of a good one: the good one is skipped twice, then goes out alone */
            const char *zero[1] = {"0"}, *two[1] = {"2"};
            ch_pg_query_t f = {&st_div, zero, NULL}, g = {&st_div, two, NULL};
            capture_t cs[4] = {{0}};
            ch_pg_pool_stats(rp, &s0);
            for (int i = 0; i != 3; ++i)
                submit_read(rp, &f, 1, on_capture, &cs[i]);
            submit_read(rp, &g, 1, on_capture, &cs[3]);
            run_all(cs, 4, 5000);
            ch_pg_pool_stats(rp, &s1);
            tap_ok(all_called_once(cs, 4) && cs[0].err == CH_EDB && cs[1].err == CH_EDB && cs[2].err == CH_EDB &&
                       cs[3].err == 0 && strcmp(cs[3].values[0], "50") == 0,
                   "a read behind three failing ones still succeeds (%d %d %d %d; resent %llu)", cs[0].err, cs[1].err,
                   cs[2].err, cs[3].err, (unsigned long long)(s1.resent - s0.resent));
        }

        {
            /* a read of three statements failing in its second, between two single reads */
            const char *one[1] = {"1"}, *zero[1] = {"0"}, *five[1] = {"5"};
            ch_pg_query_t before = {&st_add1, one, NULL}, after = {&st_add1, five, NULL};
            ch_pg_query_t multi[3] = {{&st_add1, one, NULL}, {&st_div, zero, NULL}, {&st_add1, five, NULL}};
            capture_t cb = {0}, cm = {0}, ca = {0};
            submit_read(rp, &before, 1, on_capture, &cb);
            submit_read(rp, multi, 3, on_capture, &cm);
            submit_read(rp, &after, 1, on_capture, &ca);
            capture_t all[3];
            run_until(&ca.done, 5000);
            run_until(&cm.done, 5000);
            all[0] = cb, all[1] = cm, all[2] = ca;
            tap_ok(all_called_once(all, 3) && cm.err == CH_EDB && cm.nres == 3 && strcmp(cm.sqlstate, "22012") == 0 &&
                       cb.err == 0 && strcmp(cb.values[0], "2") == 0 && ca.err == 0 && strcmp(ca.values[0], "6") == 0,
                   "a 3-statement read failing in its second statement fails whole; the reads around it do not "
                   "(%d %d %d)",
                   cb.err, cm.err, ca.err);
        }

        {
            /* R R W R R(fails) W(fails) R W R, all at once on one connection */
            const char *one[1] = {"1"}, *zero[1] = {"0"}, *five[1] = {"5"}, *ids[1] = {"{3001,3002}"};
            const char *w1[2] = {"3001", "w1"}, *wdup[2] = {"3001", "dup"}, *w2[2] = {"3002", "w2"};
            ch_pg_query_t add = {&st_add1, one, NULL}, cnt = {&st_count, ids, NULL}, div0 = {&st_div, zero, NULL},
                          add5 = {&st_add1, five, NULL};
            ch_pg_query_t ins1 = {&st_insert, w1, NULL}, insdup = {&st_insert, wdup, NULL},
                          ins2 = {&st_insert, w2, NULL};
            capture_t cs[9] = {{0}};
            ch_pg_pool_stats(rp, &s0);
            submit_read(rp, &add, 1, on_capture, &cs[0]);
            submit_read(rp, &cnt, 1, on_capture, &cs[1]);
            submit(rp, &ins1, 1, on_capture, &cs[2]);
            submit_read(rp, &cnt, 1, on_capture, &cs[3]);
            submit_read(rp, &div0, 1, on_capture, &cs[4]);
            submit(rp, &insdup, 1, on_capture, &cs[5]);
            submit_read(rp, &add5, 1, on_capture, &cs[6]);
            submit(rp, &ins2, 1, on_capture, &cs[7]);
            submit_read(rp, &cnt, 1, on_capture, &cs[8]);
            run_all(cs, 9, 5000);
            ch_pg_pool_stats(rp, &s1);
            tap_ok(all_called_once(cs, 9) && cs[0].err == 0 && strcmp(cs[0].values[0], "2") == 0 && cs[1].err == 0 &&
                       strcmp(cs[1].values[0], "0") == 0 && cs[3].err == 0 && strcmp(cs[3].values[0], "1") == 0 &&
                       cs[6].err == 0 && strcmp(cs[6].values[0], "6") == 0 && cs[8].err == 0 &&
                       strcmp(cs[8].values[0], "2") == 0,
                   "reads interleaved with writes on one connection see the writes before them (%s %s %s)",
                   cs[1].values[0], cs[3].values[0], cs[8].values[0]);
            tap_ok(cs[2].err == 0 && cs[4].err == CH_EDB && cs[5].err == CH_EDB &&
                       strcmp(cs[5].sqlstate, "23505") == 0 && cs[7].err == 0,
                   "the failing read and the failing write fail alone; the writes around them commit (%d %d %d %d)",
                   cs[2].err, cs[4].err, cs[5].err, cs[7].err);
            tap_ok(s1.syncs - s0.syncs == 7 && s1.resent == s0.resent,
                   "every write has a sync of its own: 3 writes and 4 batches of reads took 7 syncs (%llu)",
                   (unsigned long long)(s1.syncs - s0.syncs));
        }

        {
            /* A write re-preparing two statements fails to prepare the first; the server skips the second's prepare.
             * A read queued behind that prepare finds its statement missing (26000): not its fault, so it is
             * prepared again and succeeds. */
            ch_pg_config_t qcfg = {conninfo, 1, 100, 5000, 2000};
            ch_pg_pool_t *qp = ch_pg_pool_new(loop, &qcfg);
            wait_up(qp, 1, 5000);
            ch_pg_query_t cq = {&st_create_late2, NULL, NULL};
            capture_t cc = run_one(qp, &cq, 1, &r);
            ch_pg_query_t two[2] = {{&st_broken, NULL, NULL}, {&st_late2, NULL, NULL}}, one = {&st_late2, NULL, NULL};
            capture_t cw = {0}, cr = {0};
            submit(qp, two, 2, on_capture, &cw);
            submit_read(qp, &one, 1, on_capture, &cr);
            run_until(&cr.done, 5000);
            run_until(&cw.done, 5000);
            tap_ok(cc.err == 0 && cw.calls == 1 && cw.err == CH_EDB && strcmp(cw.sqlstate, "42P01") == 0 &&
                       cr.calls == 1 && cr.err == 0 && strcmp(cr.values[0], "0") == 0,
                   "a read behind a prepare that another submission's failure skipped is prepared again and "
                   "succeeds (write %d %s, read %d %s)",
                   cw.err, cw.sqlstate, cr.err, cr.sqlstate);
            ch_pg_pool_free(qp);
        }

        {
            /* 300 reads at once, the 11th failing: batches of at most 128, so the server skips only 117 */
            enum { N = 300 };
            capture_t *cs = calloc(N, sizeof(*cs));
            char(*bufs)[16] = calloc(N, sizeof(*bufs));
            ch_pg_pool_stats(rp, &s0);
            for (int i = 0; i != N; ++i) {
                snprintf(bufs[i], sizeof(bufs[i]), "%d", i == 10 ? 0 : 1);
                const char *v[1] = {bufs[i]};
                ch_pg_query_t q = {&st_div, v, NULL};
                submit_read(rp, &q, 1, on_capture, &cs[i]);
            }
            run_all(cs, N, 5000);
            ch_pg_pool_stats(rp, &s1);
            int good = all_called_once(cs, N) && cs[10].err == CH_EDB;
            for (int i = 0; good && i != N; ++i)
                good = i == 10 || (cs[i].err == 0 && strcmp(cs[i].values[0], "100") == 0);
            tap_ok(good && s1.resent - s0.resent == 117 && s1.syncs - s0.syncs == 4,
                   "300 reads with one failure: batches of 128 at most, 117 sent again (resent %llu, syncs %llu)",
                   (unsigned long long)(s1.resent - s0.resent), (unsigned long long)(s1.syncs - s0.syncs));
            free(cs);
            free(bufs);
        }

        {
            chain_t ch = {rp, 0, 100, 0, "", 1};
            const char *v[1] = {"0"};
            ch_pg_query_t q = {&st_add1, v, NULL};
            submit_read(rp, &q, 1, on_chain, &ch);
            uint64_t end = ch_now_us() + 10000000;
            while (!chain_over(&ch) && ch_now_us() < end)
                h2o_evloop_run(loop, 10);
            tap_ok(ch.step == 100 && !ch.failed, "100 reads chained from callbacks complete (step=%d)", ch.step);
            chain_t mix = {rp, 0, 100, 0, "", 2};
            submit(rp, &q, 1, on_chain, &mix);
            end = ch_now_us() + 10000000;
            while (!chain_over(&mix) && ch_now_us() < end)
                h2o_evloop_run(loop, 10);
            tap_ok(mix.step == 100 && !mix.failed,
                   "100 reads and writes chained by turns from callbacks complete (step=%d)", mix.step);
        }

        {
            const int n = 1000;
            batch_t b = {0};
            batch_item_t *items = calloc(n, sizeof(*items));
            char(*bufs)[16] = calloc(n, sizeof(*bufs));
            int first_err;
            submit_batch(rp, &b, items, bufs, n, &first_err, 1);
            run_batch(&b, 10000);
            tap_ok(b.done == n && b.ok == n && b.order_errors == 0,
                   "on one connection, %d reads complete in submission order, each with its own result "
                   "(ok=%d order_errors=%d)",
                   n, b.ok, b.order_errors);
            free(items);
            free(bufs);
        }

        {
            /* an outage mid-batch: the server ends our connection while the batch waits behind a sleep */
            capture_t cp = {0};
            ch_pg_query_t pq = {&st_pid, NULL, NULL};
            submit_read(rp, &pq, 1, on_capture, &cp);
            run_until(&cp.done, 5000);
            enum { N = 20 };
            capture_t cs[N] = {{0}};
            const char *sv[1] = {"2"}, *one[1] = {"1"}, *pid[1] = {cp.values[0]};
            ch_pg_query_t sq = {&st_sleep, sv, NULL}, aq = {&st_add1, one, NULL}, kq = {&st_terminate, pid, NULL};
            ch_pg_pool_stats(rp, &s0);
            submit_read(rp, &sq, 1, on_capture, &cs[0]);
            for (int i = 1; i != N; ++i)
                submit_read(rp, &aq, 1, on_capture, &cs[i]);
            capture_t ck = {0};
            run_for(50);
            submit(pool, &kq, 1, on_capture, &ck);
            run_all(cs, N, 5000);
            int lost = cs[0].err == CH_EDB || cs[0].err == CH_EUNAVAIL;
            for (int i = 1; i != N; ++i)
                lost &= cs[i].err == CH_EUNAVAIL;
            tap_ok(cp.err == 0 && ck.err == 0 && all_called_once(cs, N) && lost,
                   "a batch of reads on a connection the server ends fails once each, with CH_EUNAVAIL (%d %d)",
                   cs[0].err, cs[1].err);
            /* submitted while the pool reconnects: they wait for the connection and go out as one batch */
            capture_t cr[N] = {{0}};
            for (int i = 0; i != N; ++i)
                submit_read(rp, &aq, 1, on_capture, &cr[i]);
            run_all(cr, N, 5000);
            ch_pg_pool_stats(rp, &s1);
            int back = all_called_once(cr, N);
            for (int i = 0; i != N; ++i)
                back &= cr[i].err == 0 && strcmp(cr[i].values[0], "2") == 0;
            tap_ok(back && s1.reconnects == s0.reconnects + 1,
                   "reads submitted during the outage complete after the pool reconnects (reconnects %llu)",
                   (unsigned long long)(s1.reconnects - s0.reconnects));
        }

        {
            /* freeing the pool with a batch not yet synced */
            capture_t cs[5] = {{0}};
            const char *one[1] = {"1"};
            ch_pg_query_t aq = {&st_add1, one, NULL};
            for (int i = 0; i != 5; ++i)
                submit_read(rp, &aq, 1, on_capture, &cs[i]);
            ch_pg_pool_free(rp);
            int closed = all_called_once(cs, 5);
            for (int i = 0; i != 5; ++i)
                closed &= cs[i].err == CH_ECLOSED;
            tap_ok(closed, "freeing the pool with a batch of reads not yet synced fails each once with CH_ECLOSED");
        }
    }

    {
        mix_t m = {pool, 0, 256, 50000, 0, 0, 0, 12345};
        ch_pg_stats_t s0, s1;
        ch_pg_pool_stats(pool, &s0);
        mix_fill(&m);
        uint64_t end = ch_now_us() + 30000000;
        while (m.outstanding > 0 && ch_now_us() < end)
            h2o_evloop_run(loop, 10);
        ch_pg_pool_stats(pool, &s1);
        tap_ok(m.done == 50000 && m.wrong == 0 && m.refused == 0 && s1.inflight == 0,
               "50000 reads and writes at random, 4%% failing, through a window of 256 on 2 connections: each gets "
               "its own outcome (done=%lu wrong=%d refused=%d resent=%llu)",
               m.done, m.wrong, m.refused, (unsigned long long)(s1.resent - s0.resent));
    }

    {
        /* reads behind a stalled statement: written off with the connection at the oldest one's deadline */
        ch_pg_config_t fast_cfg = {conninfo, 1, 100, 300, 2000};
        ch_pg_pool_t *fast = ch_pg_pool_new(loop, &fast_cfg);
        wait_up(fast, 1, 5000);
        enum { N = 5 };
        const char *sv[1] = {"2"}, *av[1] = {"5"};
        ch_pg_query_t sq = {&st_sleep, sv, NULL}, aq = {&st_add1, av, NULL};
        capture_t cs[N + 1] = {{0}};
        uint64_t t0 = ch_now_us();
        submit_read(fast, &sq, 1, on_capture, &cs[0]);
        for (int i = 1; i <= N; ++i)
            submit_read(fast, &aq, 1, on_capture, &cs[i]);
        run_all(cs, N + 1, 5000);
        uint64_t ms = (ch_now_us() - t0) / 1000;
        int timedout = all_called_once(cs, N + 1);
        for (int i = 0; i <= N; ++i)
            timedout &= cs[i].err == CH_ETIMEDOUT;
        tap_ok(timedout && ms < 800, "a batch of reads behind a 2 s statement times out at 300 ms, once each (%llu ms)",
               (unsigned long long)ms);
        tap_ok(wait_up(fast, 1, 3000), "the pool reconnects");
        capture_t c2 = {0};
        submit_read(fast, &aq, 1, on_capture, &c2);
        run_until(&c2.done, 5000);
        tap_ok(c2.err == 0 && strcmp(c2.values[0], "6") == 0, "and serves reads again");
        ch_pg_pool_free(fast);
    }

    {
        /* the queue bound counts reads like any submission */
        ch_pg_config_t small_cfg = {conninfo, 2, 300, 5000, 2000};
        ch_pg_pool_t *small = ch_pg_pool_new(loop, &small_cfg);
        wait_up(small, 2, 5000);
        const int n = 301;
        batch_t b = {0};
        batch_item_t *items = calloc(n, sizeof(*items));
        char(*bufs)[16] = calloc(n, sizeof(*bufs));
        int first_err;
        int accepted = submit_batch(small, &b, items, bufs, n, &first_err, 1);
        run_batch(&b, 10000);
        tap_ok(accepted == 300 && first_err == CH_EFULL && b.done == 300 && b.ok == 300,
               "the read beyond queue_max=300 is refused with CH_EFULL, the 300 accepted complete (accepted=%d ok=%d)",
               accepted, b.ok);
        ch_pg_pool_free(small);
        free(items);
        free(bufs);
    }

    {
        /* a small pool to see the bound exactly */
        ch_pg_config_t small_cfg = {conninfo, 2, 300, 5000, 2000};
        ch_pg_pool_t *small = ch_pg_pool_new(loop, &small_cfg);
        wait_up(small, 2, 5000);
        const int n = 301;
        batch_t b = {0};
        batch_item_t *items = calloc(n, sizeof(*items));
        char(*bufs)[16] = calloc(n, sizeof(*bufs));
        int first_err;
        int accepted = submit_batch(small, &b, items, bufs, n, &first_err, 0);
        tap_ok(accepted == 300 && first_err == CH_EFULL,
               "the submission beyond queue_max=300 is refused with "
               "CH_EFULL (accepted=%d err=%d)",
               accepted, first_err);
        run_batch(&b, 10000);
        tap_ok(b.done == 300 && b.ok == 300, "the 300 accepted submissions all complete");
        const char *v[1] = {"1"};
        ch_pg_query_t q = {&st_add1, v, NULL};
        c = run_one(small, &q, 1, &r);
        tap_ok(r == 0 && c.err == 0, "once drained, the pool accepts again");
        ch_pg_pool_free(small);
        free(items);
        free(bufs);
    }

    {
        /* a statement outliving its deadline: the connection is written off, the pool reconnects by itself */
        ch_pg_config_t fast_cfg = {conninfo, 1, 100, 300, 2000};
        ch_pg_pool_t *fast = ch_pg_pool_new(loop, &fast_cfg);
        wait_up(fast, 1, 5000);
        const char *sv[1] = {"2"}, *av[1] = {"5"};
        ch_pg_query_t sq = {&st_sleep, sv, NULL}, aq = {&st_add1, av, NULL};
        capture_t cs = {0}, ca = {0};
        uint64_t t0 = ch_now_us();
        submit(fast, &sq, 1, on_capture, &cs);
        submit(fast, &aq, 1, on_capture, &ca);
        run_until(&ca.done, 5000);
        uint64_t ms = (ch_now_us() - t0) / 1000;
        tap_ok(cs.err == CH_ETIMEDOUT && ms < 800,
               "a 2 s statement with a 300 ms deadline fails with CH_ETIMEDOUT "
               "after %llu ms",
               (unsigned long long)ms);
        tap_ok(ca.err == CH_ETIMEDOUT, "the submission pipelined behind it on the written-off connection fails too");
        tap_ok(wait_up(fast, 1, 3000), "the pool reconnects without any request needing it");
        capture_t c2 = {0};
        submit(fast, &aq, 1, on_capture, &c2);
        run_until(&c2.done, 5000);
        tap_ok(c2.err == 0 && strcmp(c2.values[0], "6") == 0, "and serves again");
        ch_pg_pool_stats(fast, &st);
        tap_ok(st.timeouts == 2 && st.reconnects == 1, "stats count 2 timeouts and 1 reconnect (%llu, %llu)",
               (unsigned long long)st.timeouts, (unsigned long long)st.reconnects);
        ch_pg_pool_free(fast);
    }

    {
        /* a server that accepts TCP but never answers: queued submissions time out, then the pool says unavailable */
        int port, lfd = silent_listener(&port);
        char ci[128];
        snprintf(ci, sizeof(ci), "host=127.0.0.1 port=%d dbname=x user=x", port);
        ch_pg_config_t hang_cfg = {ci, 1, 100, 200, 600};
        ch_pg_pool_t *hang = ch_pg_pool_new(loop, &hang_cfg);
        const char *v[1] = {"1"};
        ch_pg_query_t q = {&st_add1, v, NULL};
        capture_t cq = {0};
        r = submit(hang, &q, 1, on_capture, &cq);
        uint64_t t0 = ch_now_us();
        run_until(&cq.done, 3000);
        uint64_t ms = (ch_now_us() - t0) / 1000;
        tap_ok(r == 0 && cq.err == CH_ETIMEDOUT && ms >= 150 && ms < 500,
               "a submission queued behind a connect attempt that hangs times out with CH_ETIMEDOUT (%llu ms)",
               (unsigned long long)ms);
        run_for(700); /* past connect_timeout_ms */
        capture_t cu = {0};
        tap_ok(submit(hang, &q, 1, on_capture, &cu) == CH_EUNAVAIL,
               "once the attempt timed out, submissions are refused at once with CH_EUNAVAIL");
        ch_pg_pool_free(hang);
        close(lfd);
    }

    {
        char ci[128];
        snprintf(ci, sizeof(ci), "hostaddr=127.0.0.1 port=%d dbname=x user=x", closed_port());
        ch_pg_config_t dead_cfg = {ci, 2, 100, 1000, 1000};
        ch_pg_pool_t *dead = ch_pg_pool_new(loop, &dead_cfg);
        const char *v[1] = {"1"};
        ch_pg_query_t q = {&st_add1, v, NULL};
        capture_t cq = {0};
        r = submit(dead, &q, 1, on_capture, &cq);
        if (r == 0)
            run_until(&cq.done, 3000);
        tap_ok(r == CH_EUNAVAIL || cq.err == CH_EUNAVAIL,
               "a submission to a refused server fails with CH_EUNAVAIL (submit=%d cb=%d)", r, cq.err);
        run_for(50);
        capture_t cu = {0};
        tap_ok(submit(dead, &q, 1, on_capture, &cu) == CH_EUNAVAIL, "and later ones are refused synchronously");
        tap_ok(submit_read(dead, &q, 1, on_capture, &cu) == CH_EUNAVAIL, "reads too");
        ch_pg_pool_free(dead);
    }

    {
        const char *sv[1] = {"0.5"};
        ch_pg_query_t sq = {&st_sleep, sv, NULL};
        capture_t cs = {0};
        submit(pool, &sq, 1, on_capture, &cs);
        ch_pg_pool_stats(pool, &st);
        tap_ok(st.inflight == 1 && st.queued == 0 && st.conns_up == 2, "stats show 1 in flight on 2 connections");
        ch_pg_pool_free(pool);
        tap_ok(cs.done && cs.err == CH_ECLOSED, "freeing the pool calls the pending callback with CH_ECLOSED");
    }

    tap_ok(early_callbacks == 0, "no callback ran before its ch_pg_submit returned (%d did)", early_callbacks);
    return tap_done();
}

/* --- outage mode: a steady stream, per-second counts on stdout --- */

typedef struct stream {
    ch_pg_pool_t *pool;
    int outstanding, window, read;
    unsigned long ok, unavail, timedout, full, db, closed, other;
    h2o_timeout_t tick;
    h2o_timeout_entry_t tick_entry;
    uint64_t started, next_report;
    int second, seconds, stop;
} stream_t;

static void stream_fill(stream_t *s);

static void on_stream(void *arg, ch_pg_result_t *r)
{
    stream_t *s = arg;
    --s->outstanding;
    switch (r->err) {
    case 0:
        ++s->ok;
        break;
    case CH_EUNAVAIL:
        ++s->unavail;
        break;
    case CH_ETIMEDOUT:
        ++s->timedout;
        break;
    case CH_EDB:
        ++s->db;
        break;
    case CH_ECLOSED:
        ++s->closed;
        break;
    default:
        ++s->other;
    }
    if (r->err == 0 && !s->stop)
        stream_fill(s);
}

static void stream_fill(stream_t *s)
{
    static const char *v[1] = {"1"};
    ch_pg_query_t q = {&st_add1, v, NULL};
    while (s->outstanding < s->window) {
        int r = s->read ? ch_pg_submit_read(s->pool, &q, 1, on_stream, s) : ch_pg_submit(s->pool, &q, 1, on_stream, s);
        if (r == CH_EUNAVAIL) {
            ++s->unavail;
            return; /* try again at the next tick, as a client would after Retry-After */
        } else if (r == CH_EFULL) {
            ++s->full;
            return;
        } else if (r != 0) {
            ++s->other;
            return;
        }
        ++s->outstanding;
    }
}

static void on_stream_tick(h2o_timeout_entry_t *entry)
{
    stream_t *s = H2O_STRUCT_FROM_MEMBER(stream_t, tick_entry, entry);
    uint64_t now = ch_now_us();

    if (now >= s->next_report) {
        ch_pg_stats_t st;
        ch_pg_pool_stats(s->pool, &st);
        ++s->second;
        printf("t=%d ok=%lu unavail=%lu timedout=%lu full=%lu db=%lu other=%lu conns_up=%u queued=%u inflight=%u "
               "reconnects=%llu failures=%llu\n",
               s->second, s->ok, s->unavail, s->timedout, s->full, s->db, s->other, st.conns_up, st.queued, st.inflight,
               (unsigned long long)st.reconnects, (unsigned long long)st.failures);
        fflush(stdout);
        s->ok = s->unavail = s->timedout = s->full = s->db = s->other = 0;
        s->next_report += 1000000;
        if (s->second >= s->seconds) {
            s->stop = 1;
            return;
        }
    }
    stream_fill(s);
    h2o_timeout_link(loop, &s->tick, &s->tick_entry);
}

static int run_outage(const char *conninfo, int seconds, int read)
{
    ch_pg_register(&st_add1);
    ch_pg_config_t cfg = {conninfo, 2, 256, 1000, 1000};
    stream_t s = {0};
    s.pool = ch_pg_pool_new(loop, &cfg);
    if (s.pool == NULL)
        return 2;
    s.window = 64;
    s.read = read;
    s.seconds = seconds;
    s.started = ch_now_us();
    s.next_report = s.started + 1000000;
    h2o_timeout_init(loop, &s.tick, 5);
    s.tick_entry.cb = on_stream_tick;
    h2o_timeout_link(loop, &s.tick, &s.tick_entry);
    while (!s.stop)
        h2o_evloop_run(loop, 10);
    /* let what is in flight finish (bounded by the submission timeout), then close the rest */
    uint64_t end = ch_now_us() + 3000000;
    while (s.outstanding > 0 && ch_now_us() < end)
        h2o_evloop_run(loop, 10);
    int left = s.outstanding;
    ch_pg_pool_free(s.pool);
    h2o_timeout_unlink(&s.tick_entry);
    h2o_timeout_dispose(loop, &s.tick);
    printf("# done: %d were still outstanding after 3 s, %lu closed at free, %d never called back\n", left, s.closed,
           s.outstanding);
    return s.outstanding == 0 ? 0 : 1;
}

/* --- bench mode: ch_pg_submit against ch_pg_submit_read in one run, with client and server CPU per submission --- */

static const ch_pg_stmt_t st_now = {"t_now", "SELECT extract(epoch FROM clock_timestamp())::numeric(20,6)::text", 0};
static const ch_pg_stmt_t st_bench_pids = {
    "t_bench_pids", "SELECT pid FROM pg_stat_activity WHERE application_name = 'ch_pg_loop_bench' ORDER BY pid", 0};

typedef struct bench {
    ch_pg_pool_t *pool;
    int read, window, outstanding, stop;
    unsigned long done, errors;
} bench_t;

static void bench_fill(bench_t *b);

static void on_bench(void *arg, ch_pg_result_t *r)
{
    bench_t *b = arg;
    --b->outstanding;
    ++b->done;
    b->errors += r->err != 0;
    if (!b->stop)
        bench_fill(b);
}

static void bench_fill(bench_t *b)
{
    ch_pg_query_t q = {&st_now, NULL, NULL};
    while (b->outstanding < b->window) {
        int r = b->read ? ch_pg_submit_read(b->pool, &q, 1, on_bench, b) : ch_pg_submit(b->pool, &q, 1, on_bench, b);
        if (r != 0) {
            ++b->errors;
            return;
        }
        ++b->outstanding;
    }
}

/* CPU time of a process in µs, from /proc (the server's backends run on this machine) */
static uint64_t proc_cpu_us(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    unsigned long long ut = 0, st = 0;
    /* after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (p == NULL || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return 0;
    return (ut + st) * 1000000ULL / (uint64_t)sysconf(_SC_CLK_TCK);
}

static uint64_t self_cpu_us(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
}

typedef struct bench_row {
    double rate, wall_us, client_us, server_us, syncs_per_sub;
} bench_row_t;

static bench_row_t bench_run(ch_pg_pool_t *pool, const int *pids, int npids, int read, int window, int ms)
{
    bench_t b = {pool, read, window, 0, 0, 0, 0};
    bench_row_t row;
    ch_pg_stats_t s0, s1;
    uint64_t srv0 = 0, srv1 = 0;

    for (int i = 0; i != npids; ++i)
        srv0 += proc_cpu_us(pids[i]);
    ch_pg_pool_stats(pool, &s0);
    uint64_t cli0 = self_cpu_us(), t0 = ch_now_us(), end = t0 + (uint64_t)ms * 1000;
    bench_fill(&b);
    while (ch_now_us() < end)
        h2o_evloop_run(loop, 10);
    uint64_t t1 = ch_now_us(), cli1 = self_cpu_us();
    unsigned long counted = b.done;
    for (int i = 0; i != npids; ++i)
        srv1 += proc_cpu_us(pids[i]);
    ch_pg_pool_stats(pool, &s1);
    b.stop = 1;
    while (b.outstanding > 0)
        h2o_evloop_run(loop, 10);
    row.rate = counted * 1e6 / (double)(t1 - t0);
    row.wall_us = (double)(t1 - t0) / counted;
    row.client_us = (double)(cli1 - cli0) / counted;
    row.server_us = (double)(srv1 - srv0) / counted;
    row.syncs_per_sub = (double)(s1.syncs - s0.syncs) / counted;
    if (b.errors != 0)
        printf("# %lu errors\n", b.errors);
    return row;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct bench_pids {
    int pids[8], n, done;
} bench_pids_t;

static void on_bench_pids(void *arg, ch_pg_result_t *r)
{
    bench_pids_t *bp = arg;
    if (r->err == 0)
        for (int i = 0; i < PQntuples(r->res[0]) && bp->n < 8; ++i)
            bp->pids[bp->n++] = atoi(PQgetvalue(r->res[0], i, 0));
    bp->done = 1;
}

static int run_bench(const char *conninfo, int ms, int rounds)
{
    char ci[1024];
    snprintf(ci, sizeof(ci), "%s application_name=ch_pg_loop_bench", conninfo);
    ch_pg_register(&st_now);
    ch_pg_register(&st_bench_pids);
    ch_pg_config_t cfg = {ci, 2, 4096, 10000, 2000};
    ch_pg_pool_t *pool = ch_pg_pool_new(loop, &cfg);
    if (pool == NULL || !wait_up(pool, 2, 5000))
        return 2;
    ch_pg_query_t pq = {&st_bench_pids, NULL, NULL};
    bench_pids_t bp = {{0}, 0, 0};
    ch_pg_submit(pool, &pq, 1, on_bench_pids, &bp);
    run_until(&bp.done, 5000);
    int *pids = bp.pids, npids = bp.n;
    printf("# server backends:");
    for (int i = 0; i != npids; ++i)
        printf(" %d", pids[i]);
    printf("\n");

    static const struct {
        int read, window;
        const char *name;
    } cases[] = {{0, 512, "ch_pg_submit      window 512"}, {1, 512, "ch_pg_submit_read window 512"},
                 {0, 16, "ch_pg_submit      window 16 "},  {1, 16, "ch_pg_submit_read window 16 "},
                 {0, 2, "ch_pg_submit      window 2  "},   {1, 2, "ch_pg_submit_read window 2  "}};
    enum { NC = sizeof(cases) / sizeof(cases[0]) };
    bench_row_t *rows = calloc((size_t)rounds * NC, sizeof(*rows));
    bench_run(pool, pids, npids, 1, 512, 300); /* warm-up */
    for (int r = 0; r != rounds; ++r) {
        for (int c = 0; c != NC; ++c) {
            bench_row_t *row = &rows[r * NC + c];
            *row = bench_run(pool, pids, npids, cases[c].read, cases[c].window, ms);
            printf("# round %d %s: %8.0f/s  wall %6.2f us/sub  client cpu %5.2f us/sub  server cpu %5.2f us/sub  "
                   "syncs/sub %.3f\n",
                   r + 1, cases[c].name, row->rate, row->wall_us, row->client_us, row->server_us, row->syncs_per_sub);
        }
    }
    printf("# median of %d rounds of %d ms, 2 connections, one loop thread, query: %s\n", rounds, ms, st_now.sql);
    printf("# %-28s %10s %10s %12s %12s %10s\n", "case", "subs/s", "wall us", "client us", "server us", "syncs/sub");
    for (int c = 0; c != NC; ++c) {
        double v[5][64];
        for (int r = 0; r != rounds && r < 64; ++r) {
            v[0][r] = rows[r * NC + c].rate;
            v[1][r] = rows[r * NC + c].wall_us;
            v[2][r] = rows[r * NC + c].client_us;
            v[3][r] = rows[r * NC + c].server_us;
            v[4][r] = rows[r * NC + c].syncs_per_sub;
        }
        int n = rounds < 64 ? rounds : 64;
        for (int k = 0; k != 5; ++k)
            qsort(v[k], (size_t)n, sizeof(double), cmp_double);
        printf("# %-28s %10.0f %10.2f %12.2f %12.2f %10.3f\n", cases[c].name, v[0][n / 2], v[1][n / 2], v[2][n / 2],
               v[3][n / 2], v[4][n / 2]);
    }
    free(rows);
    ch_pg_pool_free(pool);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s CONNINFO [outage [SECONDS [read]] | bench [MS [ROUNDS]]]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    loop = h2o_evloop_create();
    int rc;
    if (argc >= 3 && strcmp(argv[2], "outage") == 0)
        rc = run_outage(argv[1], argc >= 4 ? atoi(argv[3]) : 10, argc >= 5 && strcmp(argv[4], "read") == 0);
    else if (argc >= 3 && strcmp(argv[2], "bench") == 0)
        rc = run_bench(argv[1], argc >= 4 ? atoi(argv[3]) : 2000, argc >= 5 ? atoi(argv[4]) : 3);
    else
        rc = run_tests(argv[1]);
    /* let h2o free the sockets it closed */
    h2o_evloop_run(loop, 0);
    h2o_evloop_destroy(loop);
    return rc;
}
