/* Asynchronous PostgreSQL on an h2o event loop: per-thread pools of pipelined libpq connections with deadlines. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <h2o.h>
#include <libpq-fe.h>

#include "cityhall/ch.h"
#include "cityhall/pg.h"

/* A submission may not carry more statements than this; it keeps one allocation small and bounded. */
#define CH_PG_MAX_QUERIES 256
#define CH_PG_MAX_CONNS   64
/* Granularity of reconnect backoff and connect deadlines; only armed while some connection is not up. */
#define CH_PG_TICK_MS        10
#define CH_PG_BACKOFF_MIN_MS 50
#define CH_PG_BACKOFF_MAX_MS 2000
/* A connection that breaks sooner than this after coming up keeps growing its backoff, so a server that accepts
 * and immediately drops us is not hammered with reconnects. */
#define CH_PG_STABLE_MS 1000
/* A read aborted by batch-mates' failures more than this many times is sent alone, where nobody else can abort it. */
#define CH_PG_READ_REBATCH 1
/* A read is sent again at most this many times in all (see conn_process on 26000). */
#define CH_PG_READ_RESENDS 3
/* Reads per sync at most: bounds what one failing read makes the server skip (and us send again), and how long the
 * first read of a batch waits for the server to flush its result. One sync per 128 reads costs next to nothing. */
#define CH_PG_BATCH_MAX 128

enum conn_state {
    CONN_BACKOFF,    /* closed, waiting until due_at to try again */
    CONN_CONNECTING, /* PQconnectPoll in progress; due_at is the attempt's deadline */
    CONN_PREPARING,  /* connected, statements being prepared; due_at is still the attempt's deadline */
    CONN_UP,         /* takes submissions */
};

typedef struct ch_pg_conn ch_pg_conn_t;

enum { STMT_PREPARED, STMT_UNPREPARED, STMT_PREPARING };

/* One query of a submission, pointing into the submission's own copy of its parameters. */
typedef struct ch_pg_subq {
    const ch_pg_stmt_t *stmt;
    size_t idx; /* in pool->stmts */
    const char **values;
} ch_pg_subq_t;

/* One ch_pg_submit call; a single allocation holds the struct, the queries, the result slots and the parameters. */
typedef struct ch_pg_sub {
    h2o_linklist_t link; /* in pool->queue while conn == NULL, else in conn->inflight or conn->retry */
    h2o_timeout_entry_t deadline;
    ch_pg_pool_t *pool;
    ch_pg_conn_t *conn;
    ch_pg_cb cb;
    void *arg;
    int n;
    int ngot;          /* results received so far, aborted ones included */
    int err;           /* CH_EDB once a statement failed */
    PGresult *err_res; /* the first failure, source of sqlstate and message */
    PGresult **res;
    ch_pg_subq_t *q;
    size_t *prep; /* statements re-prepared in front of the queries (indexes in pool->stmts), up to n */
    int nprep;
    int pgot;     /* results of those prepares received so far */
    int read;     /* from ch_pg_submit_read: may share a sync with other reads, and may be sent again */
    int own_sync; /* this dispatch ended with its own sync; otherwise it is in a batch of reads */
    int victim;   /* a read that failed in this dispatch through another submission's failure: sent again */
    int aborts;   /* how many times that happened */
} ch_pg_sub_t;

struct ch_pg_conn {
    ch_pg_pool_t *pool;
    unsigned idx;
    enum conn_state state;
    PGconn *pq;
    h2o_socket_t *sock; /* wraps a dup() of PQsocket(); libpq owns the original */
    dev_t sock_dev;     /* identity of the wrapped socket: fd numbers are reused when libpq swaps sockets */
    ino_t sock_ino;
    h2o_linklist_t inflight; /* in send order, which is the order results come back */
    unsigned ninflight;      /* submissions in inflight and in retry */
    /* Reads aborted by a batch-mate, sent again once their batch's sync has come back (before it, the server would
     * skip them again). Still counted in flight: they hold their deadline and fail with this connection. */
    h2o_linklist_t retry;
    unsigned batch_open;  /* reads sent since the last sync; the end of the loop iteration sends their sync */
    unsigned loose_syncs; /* syncs closing a batch of reads whose PGRES_PIPELINE_SYNC has not come back yet */
    unsigned prepared;    /* statements whose prepare has completed (sync received) */
    /* Per statement: 0 prepared, STMT_UNPREPARED when preparing it failed (its table may not exist yet: `serve`
     * started before `migrate`), STMT_PREPARING while a retry is in the pipeline. */
    unsigned char *stmt_state;
    int broken; /* CH_E* to tear down with at the next safe point; set where callbacks must not run */
    int poke;   /* results may sit in libpq's buffer without the socket being readable */
    int ever_up;
    /* libpq 15 flushes at every sync (PQsendPipelineSync is 17+), so each write is a send() of its own. Over TCP, the
     * second flushing send in a loop iteration corks the socket and on_defer uncorks it: the writes of an iteration
     * leave as one segment, and the server wakes up once for them. Each still has its own sync. */
    int can_cork;
    int corked;
    unsigned flushes;  /* flushing sends in this loop iteration */
    unsigned attempts; /* consecutive failed attempts, the backoff exponent */
    uint64_t due_at;   /* ms on the loop clock */
    uint64_t up_since;
};

struct ch_pg_pool {
    h2o_loop_t *loop;
    char *conninfo;
    unsigned nconns;
    unsigned queue_max;
    uint64_t connect_timeout_ms;
    const ch_pg_stmt_t **stmts; /* snapshot of the registry when the pool was created */
    size_t nstmts;
    unsigned char *stmt_states; /* nconns x nstmts, see ch_pg_conn.stmt_state */
    h2o_linklist_t queue;
    unsigned nqueued, ninflight;
    /* False after a connection attempt failed and until one succeeds: with no connection up, submissions are
     * refused at once instead of waiting out their deadline behind a dead server. */
    int reachable;
    int closing;
    uint64_t rng;
    uint64_t timeouts, failures, reconnects, syncs, resent;
    h2o_timeout_t deadline_timeout; /* timeout_ms, one entry per submission */
    h2o_timeout_t tick_timeout;     /* CH_PG_TICK_MS, drives backoff and connect deadlines */
    h2o_timeout_entry_t tick_entry;
    h2o_timeout_t defer_timeout; /* 0 ms: runs at the end of this loop iteration, outside any caller's stack */
    h2o_timeout_entry_t defer_entry;
    ch_pg_conn_t conns[];
};

static struct {
    const ch_pg_stmt_t **list;
    size_t n, cap;
} registry;

static void on_connect_readable(h2o_socket_t *sock, const char *err);
static void on_connect_writable(h2o_socket_t *sock, const char *err);
static void on_readable(h2o_socket_t *sock, const char *err);
static void on_writable(h2o_socket_t *sock, const char *err);

/* --- logging: JSON lines on stderr; only libpq's connection and prepare errors, never parameters --- */

static void log_event(const char *level, const char *event, int conn, const char *detail)
{
    char buf[1024];
    size_t o = 0;

    if (detail != NULL) {
        for (const char *p = detail; *p != '\0' && o < sizeof(buf) - 8; ++p) {
            unsigned char c = (unsigned char)*p;
            if (c == '"' || c == '\\') {
                buf[o++] = '\\';
                buf[o++] = (char)c;
            } else if (c < 0x20) {
                /* libpq messages end in a newline and may hold several lines; keep them on one log line */
                if (o > 0 && buf[o - 1] != ' ')
                    buf[o++] = ' ';
            } else {
                buf[o++] = (char)c;
            }
        }
        while (o > 0 && buf[o - 1] == ' ')
            --o;
    }
    buf[o] = '\0';

    struct timespec ts;
    struct tm tm;
    char when[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr,
            "{\"ts\":\"%s.%03dZ\",\"level\":\"%s\",\"component\":\"pg\",\"event\":\"%s\",\"conn\":%d,"
            "\"detail\":\"%s\"}\n",
            when, (int)(ts.tv_nsec / 1000000), level, event, conn, buf);
}

/* --- registry --- */

void ch_pg_register(const ch_pg_stmt_t *stmt)
{
    for (size_t i = 0; i != registry.n; ++i) {
        if (registry.list[i] == stmt)
            return;
        if (strcmp(registry.list[i]->name, stmt->name) == 0) {
            /* two modules claiming one name would silently run each other's SQL */
            fprintf(stderr, "ch_pg_register: statement name %s registered twice\n", stmt->name);
            abort();
        }
    }
    if (stmt->nparams < 0 || stmt->nparams > 65535) {
        fprintf(stderr, "ch_pg_register: statement %s has an invalid parameter count\n", stmt->name);
        abort();
    }
    if (registry.n == registry.cap) {
        registry.cap = registry.cap == 0 ? 32 : registry.cap * 2;
        registry.list = h2o_mem_realloc(registry.list, registry.cap * sizeof(*registry.list));
    }
    registry.list[registry.n++] = stmt;
}

/* --- small helpers --- */

static uint64_t rng_next(ch_pg_pool_t *pool)
{
    /* xorshift64*: jitter only, per pool so loop threads never share state */
    pool->rng ^= pool->rng >> 12;
    pool->rng ^= pool->rng << 25;
    pool->rng ^= pool->rng >> 27;
    return pool->rng * 0x2545F4914F6CDD1DULL;
}

static uint64_t backoff_ms(ch_pg_pool_t *pool, unsigned attempts)
{
    if (attempts == 0)
        return 0;
    uint64_t full = CH_PG_BACKOFF_MIN_MS;
    for (unsigned i = 1; i < attempts && full < CH_PG_BACKOFF_MAX_MS; ++i)
        full *= 2;
    if (full > CH_PG_BACKOFF_MAX_MS)
        full = CH_PG_BACKOFF_MAX_MS;
    /* half fixed, half random: spreads the threads' reconnects without ever retrying instantly */
    return full / 2 + rng_next(pool) % (full / 2 + 1);
}

static void tick_arm(ch_pg_pool_t *pool)
{
    if (!h2o_timeout_is_linked(&pool->tick_entry))
        h2o_timeout_link(pool->loop, &pool->tick_timeout, &pool->tick_entry);
}

static void defer_arm(ch_pg_pool_t *pool)
{
    if (!h2o_timeout_is_linked(&pool->defer_entry))
        h2o_timeout_link(pool->loop, &pool->defer_timeout, &pool->defer_entry);
}

static void conn_mark_broken(ch_pg_conn_t *conn, int err)
{
    if (conn->broken == 0)
        conn->broken = err;
    defer_arm(conn->pool);
}

static unsigned pool_conns_up(ch_pg_pool_t *pool)
{
    unsigned up = 0;
    for (unsigned i = 0; i != pool->nconns; ++i)
        up += pool->conns[i].state == CONN_UP && pool->conns[i].broken == 0;
    return up;
}

/* The healthy connection with the fewest submissions in flight, or NULL. */
static ch_pg_conn_t *pool_pick_conn(ch_pg_pool_t *pool)
{
    ch_pg_conn_t *best = NULL;
    for (unsigned i = 0; i != pool->nconns; ++i) {
        ch_pg_conn_t *c = &pool->conns[i];
        if (c->state == CONN_UP && c->broken == 0 && (best == NULL || c->ninflight < best->ninflight))
            best = c;
    }
    return best;
}

/* The statement's index in the pool's snapshot of the registry, or -1 when it was not registered in time. */
static long pool_stmt_index(ch_pg_pool_t *pool, const ch_pg_stmt_t *stmt)
{
    for (size_t i = 0; i != pool->nstmts; ++i)
        if (pool->stmts[i] == stmt)
            return (long)i;
    return -1;
}

/* --- completing submissions --- */

/* Calls the callback of a submission already detached from every list and timeout, then frees it. */
static void sub_complete(ch_pg_sub_t *sub, int err, const char *message)
{
    ch_pg_result_t r;

    if (err == 0 && sub->err != 0)
        err = sub->err;
    if (err != 0) {
        /* nothing of a failed submission was committed, so partial results would only mislead */
        for (int i = 0; i != sub->n; ++i) {
            PQclear(sub->res[i]);
            sub->res[i] = NULL;
        }
    }
    r.err = err;
    r.nres = sub->n;
    r.res = sub->res;
    r.sqlstate = NULL;
    r.message = message;
    if (err == CH_EDB) {
        if (sub->err_res != NULL) {
            r.sqlstate = PQresultErrorField(sub->err_res, PG_DIAG_SQLSTATE);
            r.message = PQresultErrorField(sub->err_res, PG_DIAG_MESSAGE_PRIMARY);
        }
        if (r.message == NULL)
            r.message = "statement failed";
    }
    sub->cb(sub->arg, &r);

    for (int i = 0; i != sub->n; ++i)
        PQclear(sub->res[i]);
    PQclear(sub->err_res);
    free(sub);
}

/* Fails every submission of `list` (already detached from its owner), tolerating callbacks that submit more. */
static void fail_list(ch_pg_pool_t *pool, h2o_linklist_t *list, int err, const char *message)
{
    while (!h2o_linklist_is_empty(list)) {
        ch_pg_sub_t *sub = H2O_STRUCT_FROM_MEMBER(ch_pg_sub_t, link, list->next);
        h2o_linklist_unlink(&sub->link);
        h2o_timeout_unlink(&sub->deadline);
        sub->conn = NULL;
        if (err == CH_ETIMEDOUT)
            ++pool->timeouts;
        sub_complete(sub, err, message);
    }
}

static void pool_fail_queue(ch_pg_pool_t *pool, int err, const char *message)
{
    h2o_linklist_t list;
    h2o_linklist_init_anchor(&list);
    h2o_linklist_insert_list(&list, &pool->queue);
    pool->nqueued = 0;
    fail_list(pool, &list, err, message);
}

/* --- sending --- */

static void conn_flush(ch_pg_conn_t *conn)
{
    int r = PQflush(conn->pq);
    if (r < 0) {
        conn_mark_broken(conn, CH_EUNAVAIL);
    } else if (r > 0 && !h2o_socket_is_writing(conn->sock)) {
        h2o_socket_notify_write(conn->sock, on_writable);
    }
}

/* Called before each send that flushes (a sync): from the second in a loop iteration on, hold TCP segments back. */
static void conn_cork(ch_pg_conn_t *conn)
{
    int one = 1;

    if (conn->flushes++ == 0 || conn->corked || !conn->can_cork)
        return;
    if (setsockopt(PQsocket(conn->pq), IPPROTO_TCP, TCP_CORK, &one, sizeof(one)) == 0)
        conn->corked = 1;
    else
        conn->can_cork = 0;
    defer_arm(conn->pool);
}

/* End of the loop iteration: let everything out. Even if this failed, the kernel sends corked data within 200 ms. */
static void conn_uncork(ch_pg_conn_t *conn)
{
    int zero = 0;

    conn->flushes = 0;
    if (!conn->corked)
        return;
    conn->corked = 0;
    if (conn->pq != NULL && setsockopt(PQsocket(conn->pq), IPPROTO_TCP, TCP_CORK, &zero, sizeof(zero)) != 0)
        conn->can_cork = 0;
}

/* Ends the open batch of reads with one sync, which also flushes everything since the last one: one send() for the
 * batch, and one flush of the server's output for all of it. Never calls a callback. */
static void conn_sync_batch(ch_pg_conn_t *conn)
{
    conn->batch_open = 0;
    conn_cork(conn);
    if (!PQpipelineSync(conn->pq)) {
        conn_mark_broken(conn, CH_EUNAVAIL);
        return;
    }
    ++conn->loose_syncs;
    ++conn->pool->syncs;
    conn_flush(conn);
    /* libpq reads while its output is stuck, possibly taking the socket's data into its own buffer */
    conn->poke = 1;
    defer_arm(conn->pool);
}

/* Sends a submission. A write (and a read that needs a statement prepared, or that batch-mates keep aborting) is one
 * pipeline segment of its own: it starts right after a sync, so nothing sent before it can abort it, and it ends
 * with its own sync, so nothing sent after it shares its transaction. Other reads join the connection's open batch,
 * without a sync or a flush; on_defer ends the batch once the loop iteration's callbacks have had their say.
 * Runs inside ch_pg_submit, so it never calls a callback: a failure only marks the connection, which is torn down
 * (failing this submission too) at the end of the loop iteration. */
static void conn_dispatch(ch_pg_conn_t *conn, ch_pg_sub_t *sub)
{
    ch_pg_pool_t *pool = conn->pool;
    int batched;

    sub->conn = conn;
    h2o_linklist_insert(&conn->inflight, &sub->link);
    ++conn->ninflight;
    ++pool->ninflight;

    sub->nprep = sub->pgot = 0;
    sub->victim = 0;
    batched = sub->read && sub->aborts <= CH_PG_READ_REBATCH;
    for (int i = 0; batched && i != sub->n; ++i)
        batched = conn->stmt_state[sub->q[i].idx] != STMT_UNPREPARED;
    sub->own_sync = !batched;
    /* a segment of its own starts after a sync: what the open batch aborts must not reach into it */
    if (!batched && conn->batch_open != 0) {
        conn_sync_batch(conn);
        if (conn->broken)
            return;
    }

    /* A statement that failed to prepare on this connection is prepared again in front of the queries, inside the
     * same sync: it heals once its table exists, and while it does not, the caller sees the real error (42P01)
     * rather than 26000. The prepare is not rolled back with the transaction if a later statement fails. Only
     * segments of their own carry prepares, so another caller's failure never aborts one. */
    for (int i = 0; i != sub->n; ++i) {
        size_t idx = sub->q[i].idx;
        if (conn->stmt_state[idx] != STMT_UNPREPARED)
            continue;
        const ch_pg_stmt_t *stmt = sub->q[i].stmt;
        if (!PQsendPrepare(conn->pq, stmt->name, stmt->sql, stmt->nparams, NULL)) {
            conn_mark_broken(conn, CH_EUNAVAIL);
            return;
        }
        /* later submissions are queued behind this prepare, so they must not send it again (42P05) */
        conn->stmt_state[idx] = STMT_PREPARING;
        sub->prep[sub->nprep++] = idx;
    }
    for (int i = 0; i != sub->n; ++i) {
        const ch_pg_stmt_t *stmt = sub->q[i].stmt;
        if (!PQsendQueryPrepared(conn->pq, stmt->name, stmt->nparams, sub->q[i].values, NULL, NULL, 0)) {
            conn_mark_broken(conn, CH_EUNAVAIL);
            return;
        }
    }
    if (batched) {
        if (++conn->batch_open == CH_PG_BATCH_MAX)
            conn_sync_batch(conn);
        else if (conn->batch_open == 1)
            defer_arm(pool);
        return;
    }
    /* the sync closes the implicit transaction: all n statements commit, or none */
    conn_cork(conn);
    if (!PQpipelineSync(conn->pq)) {
        conn_mark_broken(conn, CH_EUNAVAIL);
        return;
    }
    ++pool->syncs;
    conn_flush(conn);
    conn->poke = 1;
    defer_arm(pool);
}

/* --- connection lifecycle --- */

static void conn_close(ch_pg_conn_t *conn)
{
    if (conn->sock != NULL) {
        h2o_socket_close(conn->sock);
        conn->sock = NULL;
    }
    if (conn->pq != NULL) {
        PQfinish(conn->pq);
        conn->pq = NULL;
    }
    conn->state = CONN_BACKOFF;
    conn->broken = 0;
    conn->poke = 0;
    conn->prepared = 0;
    conn->batch_open = 0;
    conn->loose_syncs = 0;
    conn->corked = 0;
    conn->flushes = 0;
}

static void conn_schedule_retry(ch_pg_conn_t *conn)
{
    conn->due_at = h2o_now(conn->pool->loop) + backoff_ms(conn->pool, conn->attempts);
    tick_arm(conn->pool);
}

/* A connection attempt (connect, handshake or preparation) failed or ran out of time. Top level only. */
static void conn_attempt_failed(ch_pg_conn_t *conn, const char *why)
{
    ch_pg_pool_t *pool = conn->pool;

    if (conn->attempts == 0)
        log_event("warn", "connect_failed", (int)conn->idx, why);
    conn_close(conn);
    ++conn->attempts;
    ++pool->failures;
    pool->reachable = 0;
    conn_schedule_retry(conn);
    if (pool_conns_up(pool) == 0)
        pool_fail_queue(pool, CH_EUNAVAIL, "database unavailable");
}

/* An established connection is lost or declared stuck: fail what it carries and reconnect. Top level only. */
static void conn_down(ch_pg_conn_t *conn, int err, const char *why)
{
    ch_pg_pool_t *pool = conn->pool;
    h2o_linklist_t list;
    uint64_t now = h2o_now(pool->loop);

    if (why == NULL)
        why = conn->pq != NULL ? PQerrorMessage(conn->pq) : "connection lost";
    log_event("warn", err == CH_ETIMEDOUT ? "connection_stuck" : "connection_lost", (int)conn->idx, why);

    h2o_linklist_init_anchor(&list);
    h2o_linklist_insert_list(&list, &conn->inflight);
    h2o_linklist_insert_list(&list, &conn->retry);
    pool->ninflight -= conn->ninflight;
    conn->ninflight = 0;

    conn_close(conn);
    ++pool->failures;
    if (now - conn->up_since >= CH_PG_STABLE_MS)
        conn->attempts = 0; /* a healthy connection that broke retries at once */
    else
        ++conn->attempts;
    conn_schedule_retry(conn);

    fail_list(pool, &list, err, err == CH_ETIMEDOUT ? "database timed out" : "database connection lost");
}

static void conn_up(ch_pg_conn_t *conn)
{
    ch_pg_pool_t *pool = conn->pool;

    conn->state = CONN_UP;
    conn->up_since = h2o_now(pool->loop);
    if (conn->ever_up)
        ++pool->reconnects;
    if (conn->attempts != 0)
        log_event("info", "connected", (int)conn->idx, NULL);
    conn->ever_up = 1;
    conn->attempts = 0;
    pool->reachable = 1;
    /* the server is evidently back: the others need not sit out their backoff (up to 2 s) to find out */
    for (unsigned i = 0; i != pool->nconns; ++i) {
        ch_pg_conn_t *other = &pool->conns[i];
        if (other->state == CONN_BACKOFF && other->due_at > conn->up_since)
            other->due_at = conn->up_since;
    }

    /* the queue only fills while no connection is up, so it all goes out now; dispatch never calls back */
    while (!h2o_linklist_is_empty(&pool->queue)) {
        ch_pg_sub_t *sub = H2O_STRUCT_FROM_MEMBER(ch_pg_sub_t, link, pool->queue.next);
        ch_pg_conn_t *target = pool_pick_conn(pool);
        if (target == NULL)
            break;
        h2o_linklist_unlink(&sub->link);
        --pool->nqueued;
        conn_dispatch(target, sub);
    }
}

/* Wraps libpq's current socket for h2o, replacing the wrapper when libpq moved to another socket. */
static int conn_wrap_socket(ch_pg_conn_t *conn)
{
    int fd = PQsocket(conn->pq), dupfd;
    struct stat st;

    if (fd < 0 || fstat(fd, &st) != 0)
        return -1;
    if (conn->sock != NULL && st.st_dev == conn->sock_dev && st.st_ino == conn->sock_ino)
        return 0;
    if (conn->sock != NULL) {
        h2o_socket_close(conn->sock);
        conn->sock = NULL;
    }
    /* a dup so that h2o closing its wrapper and libpq closing its socket never close each other's fd */
    if ((dupfd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0)
        return -1;
    conn->sock = h2o_evloop_socket_create(conn->pool->loop, dupfd, H2O_SOCKET_FLAG_DONT_READ);
    conn->sock->data = conn;
    conn->sock_dev = st.st_dev;
    conn->sock_ino = st.st_ino;
    return 0;
}

static void on_notice(void *arg, const char *message)
{
    /* notices ("relation already exists, skipping") are not errors; libpq would print them on stderr */
}

static void conn_connected(ch_pg_conn_t *conn)
{
    ch_pg_pool_t *pool = conn->pool;

    /* non-blocking before anything is sent: libpq's flushes (PQfinish's goodbye too) must never wait on the socket */
    if (PQsetnonblocking(conn->pq, 1) != 0 || !PQenterPipelineMode(conn->pq)) {
        conn_attempt_failed(conn, PQerrorMessage(conn->pq));
        return;
    }
    PQsetNoticeProcessor(conn->pq, on_notice, NULL);
    {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        conn->can_cork = getsockname(PQsocket(conn->pq), (struct sockaddr *)&ss, &len) == 0 &&
                         (ss.ss_family == AF_INET || ss.ss_family == AF_INET6);
    }
    memset(conn->stmt_state, STMT_PREPARED, pool->nstmts);
    /* a sync after each prepare isolates a statement that fails to prepare (say, a missing migration) instead
     * of aborting every statement after it; it costs no round trip, the whole batch is still one flight */
    for (size_t i = 0; i != pool->nstmts; ++i) {
        const ch_pg_stmt_t *s = pool->stmts[i];
        if (!PQsendPrepare(conn->pq, s->name, s->sql, s->nparams, NULL) || !PQpipelineSync(conn->pq)) {
            conn_attempt_failed(conn, PQerrorMessage(conn->pq));
            return;
        }
    }
    conn->state = CONN_PREPARING;
    conn->prepared = 0;
    h2o_socket_read_start(conn->sock, on_readable);
    if (pool->nstmts == 0) {
        conn_up(conn);
        return;
    }
    conn_flush(conn);
    if (conn->broken)
        conn_attempt_failed(conn, PQerrorMessage(conn->pq));
}

/* Advances PQconnectPoll and waits for what it asks for; read and write interest are never armed together, so a
 * stale readiness event cannot drive libpq through a step it is not in. */
static void conn_connect_step(ch_pg_conn_t *conn)
{
    PostgresPollingStatusType st = PQconnectPoll(conn->pq);

    if (st == PGRES_POLLING_FAILED) {
        conn_attempt_failed(conn, PQerrorMessage(conn->pq));
        return;
    }
    if (conn_wrap_socket(conn) != 0) {
        conn_attempt_failed(conn, "could not watch the connection socket");
        return;
    }
    switch (st) {
    case PGRES_POLLING_OK:
        conn_connected(conn);
        break;
    case PGRES_POLLING_READING:
        h2o_socket_read_start(conn->sock, on_connect_readable);
        break;
    default:
        h2o_socket_read_stop(conn->sock);
        if (!h2o_socket_is_writing(conn->sock))
            h2o_socket_notify_write(conn->sock, on_connect_writable);
        break;
    }
}

static void conn_connect(ch_pg_conn_t *conn)
{
    ch_pg_pool_t *pool = conn->pool;

    conn->state = CONN_CONNECTING;
    conn->due_at = h2o_now(pool->loop) + pool->connect_timeout_ms;
    tick_arm(pool);
    if ((conn->pq = PQconnectStart(pool->conninfo)) == NULL)
        h2o_fatal("no memory");
    if (PQstatus(conn->pq) == CONNECTION_BAD) {
        conn_attempt_failed(conn, PQerrorMessage(conn->pq));
        return;
    }
    /* PQconnectPoll never waits; PQsetnonblocking comes once connected (here it would wipe the error message's
     * "connection to server at ..." prefix) */
    if (conn_wrap_socket(conn) != 0) {
        conn_attempt_failed(conn, "could not watch the connection socket");
        return;
    }
    /* libpq's protocol: right after PQconnectStart, behave as if PQconnectPoll asked for write readiness */
    h2o_socket_notify_write(conn->sock, on_connect_writable);
}

static void on_connect_readable(h2o_socket_t *sock, const char *err)
{
    ch_pg_conn_t *conn = sock->data;
    if (conn->state == CONN_CONNECTING)
        conn_connect_step(conn);
}

static void on_connect_writable(h2o_socket_t *sock, const char *err)
{
    ch_pg_conn_t *conn = sock->data;
    if (conn->state == CONN_CONNECTING)
        conn_connect_step(conn);
}

/* --- results --- */

static void on_prepare_result(ch_pg_conn_t *conn, PGresult *res)
{
    ch_pg_pool_t *pool = conn->pool;
    ExecStatusType st = PQresultStatus(res);

    if (st == PGRES_PIPELINE_SYNC) {
        PQclear(res);
        if (++conn->prepared == pool->nstmts)
            conn_up(conn);
        return;
    }
    if (st == PGRES_FATAL_ERROR && conn->prepared < pool->nstmts) {
        char detail[512];
        const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        snprintf(detail, sizeof(detail), "%s: %s", pool->stmts[conn->prepared]->name, msg != NULL ? msg : "?");
        log_event("error", "prepare_failed", (int)conn->idx, detail);
        conn->stmt_state[conn->prepared] = STMT_UNPREPARED;
    }
    PQclear(res);
}

/* Clears what a read got before it was aborted, so that it can be sent again. */
static void sub_reset_for_resend(ch_pg_sub_t *sub)
{
    for (int i = 0; i != sub->n; ++i) {
        PQclear(sub->res[i]);
        sub->res[i] = NULL;
    }
    sub->ngot = 0;
    ++sub->aborts;
    ++sub->pool->resent;
}

/* The head submission's own sync arrived: it is complete, or, a read that found its statement unprepared because
 * of another submission's failure, sent again (the server is past its sync). */
static void conn_finish_head(ch_pg_conn_t *conn)
{
    ch_pg_pool_t *pool = conn->pool;
    ch_pg_sub_t *sub = H2O_STRUCT_FROM_MEMBER(ch_pg_sub_t, link, conn->inflight.next);

    h2o_linklist_unlink(&sub->link);
    if (sub->victim) {
        --conn->ninflight;
        --pool->ninflight;
        sub_reset_for_resend(sub);
        conn_dispatch(conn, sub);
        return;
    }
    h2o_timeout_unlink(&sub->deadline);
    --conn->ninflight;
    --pool->ninflight;
    sub->conn = NULL;
    if (sub->err == 0 && sub->ngot != sub->n)
        sub->err = CH_EDB; /* cannot happen with prepared statements; never pretend success */
    sub_complete(sub, 0, NULL);
}

/* The head submission is a batched read and has all its results. Its outcome does not depend on the batch's sync: a
 * failure after it in the batch cannot change what it read. One aborted by a batch-mate waits in conn->retry. */
static void conn_finish_batched(ch_pg_conn_t *conn, ch_pg_sub_t *sub)
{
    ch_pg_pool_t *pool = conn->pool;

    h2o_linklist_unlink(&sub->link);
    if (sub->victim) {
        sub_reset_for_resend(sub);
        h2o_linklist_insert(&conn->retry, &sub->link);
        return;
    }
    h2o_timeout_unlink(&sub->deadline);
    --conn->ninflight;
    --pool->ninflight;
    sub->conn = NULL;
    sub_complete(sub, 0, NULL);
}

/* A PGRES_PIPELINE_SYNC arrived: the head submission's own, or the one that closed a batch of reads. Batched reads
 * complete on their last result, so when a batch's sync arrives the head is whatever was sent after it, and has no
 * results yet; a write is never sent inside a batch, so its own sync is the first one after its last result. */
static void conn_on_sync(ch_pg_conn_t *conn)
{
    if (!h2o_linklist_is_empty(&conn->inflight)) {
        ch_pg_sub_t *head = H2O_STRUCT_FROM_MEMBER(ch_pg_sub_t, link, conn->inflight.next);
        if (head->own_sync && ((head->pgot == head->nprep && head->ngot == head->n) || conn->loose_syncs == 0)) {
            conn_finish_head(conn);
            return;
        }
    }
    if (conn->loose_syncs == 0) {
        conn_mark_broken(conn, CH_EUNAVAIL); /* out of step with the server: start over */
        return;
    }
    --conn->loose_syncs;
    /* the server is past the failure that aborted these: they go out again, after everything sent so far */
    while (!h2o_linklist_is_empty(&conn->retry) && conn->broken == 0) {
        ch_pg_sub_t *sub = H2O_STRUCT_FROM_MEMBER(ch_pg_sub_t, link, conn->retry.next);
        h2o_linklist_unlink(&sub->link);
        --conn->ninflight;
        --conn->pool->ninflight;
        conn_dispatch(conn, sub);
    }
}

/* 26000, invalid_sql_statement_name: a prepared statement that does not exist on this connection. */
static int is_unprepared_error(const PGresult *res)
{
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    return state != NULL && strcmp(state, "26000") == 0;
}

/* Takes every result libpq can hand out without blocking. Top level only: it calls callbacks, which may submit
 * (dispatching to this very connection) but cannot tear a connection down, only mark it broken. */
static void conn_process(ch_pg_conn_t *conn)
{
    int nulls = 0;

    while (conn->broken == 0 && conn->pq != NULL) {
        if (conn->state == CONN_UP && h2o_linklist_is_empty(&conn->inflight) && conn->loose_syncs == 0)
            break;
        if (PQisBusy(conn->pq))
            break;
        PGresult *res = PQgetResult(conn->pq);
        if (res == NULL) {
            if (PQstatus(conn->pq) == CONNECTION_BAD) {
                conn_mark_broken(conn, CH_EUNAVAIL);
                break;
            }
            /* one NULL ends each statement's results; a second in a row means nothing more is ready */
            if (++nulls == 2)
                break;
            continue;
        }
        nulls = 0;
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_FATAL_ERROR && PQstatus(conn->pq) == CONNECTION_BAD) {
            PQclear(res);
            conn_mark_broken(conn, CH_EUNAVAIL);
            break;
        }
        if (conn->state == CONN_PREPARING) {
            on_prepare_result(conn, res);
            continue;
        }
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(res);
            conn_on_sync(conn);
            continue;
        }
        if (h2o_linklist_is_empty(&conn->inflight)) {
            PQclear(res);
            conn_mark_broken(conn, CH_EUNAVAIL); /* out of step with the server: start over */
            break;
        }
        ch_pg_sub_t *sub = H2O_STRUCT_FROM_MEMBER(ch_pg_sub_t, link, conn->inflight.next);
        switch (st) {
        case PGRES_FATAL_ERROR:
            if (sub->pgot == sub->nprep && sub->read && sub->err == 0 && sub->aborts < CH_PG_READ_RESENDS &&
                is_unprepared_error(res)) {
                /* The statement was sent behind a prepare the server then skipped, because of another submission's
                 * failure (a multi-statement submission whose first prepare failed). Not this read's fault: it is
                 * sent again, after its sync, and prepares the statement itself. */
                size_t idx = sub->q[sub->ngot].idx;
                if (conn->stmt_state[idx] == STMT_PREPARED)
                    conn->stmt_state[idx] = STMT_UNPREPARED;
                sub->victim = 1;
                ++sub->ngot;
                PQclear(res);
                break;
            }
            if (sub->err_res == NULL)
                sub->err_res = res;
            else
                PQclear(res);
            sub->err = CH_EDB;
            if (sub->pgot < sub->nprep)
                conn->stmt_state[sub->prep[sub->pgot++]] = STMT_UNPREPARED;
            else
                ++sub->ngot;
            break;
        case PGRES_PIPELINE_ABORTED:
            PQclear(res);
            /* in a batch, an abort this submission did not cause itself comes from a batch-mate's failure */
            if (sub->err == 0 && !sub->own_sync)
                sub->victim = 1;
            if (sub->pgot < sub->nprep)
                conn->stmt_state[sub->prep[sub->pgot++]] = STMT_UNPREPARED;
            else
                ++sub->ngot;
            break;
        case PGRES_COPY_IN:
        case PGRES_COPY_OUT:
        case PGRES_COPY_BOTH:
            PQclear(res);
            conn_mark_broken(conn, CH_EUNAVAIL); /* COPY cannot be driven through this API */
            continue;
        default:
            if (sub->pgot < sub->nprep) {
                conn->stmt_state[sub->prep[sub->pgot++]] = STMT_PREPARED;
                PQclear(res);
            } else if (sub->ngot < sub->n) {
                sub->res[sub->ngot++] = res;
            } else {
                PQclear(res);
            }
            break;
        }
        if (!sub->own_sync && sub->pgot == sub->nprep && sub->ngot == sub->n)
            conn_finish_batched(conn, sub);
    }
}

static void conn_after_io(ch_pg_conn_t *conn)
{
    if (conn->broken != 0) {
        if (conn->state == CONN_PREPARING)
            conn_attempt_failed(conn, PQerrorMessage(conn->pq));
        else
            conn_down(conn, conn->broken, NULL);
    }
}

static void on_readable(h2o_socket_t *sock, const char *err)
{
    ch_pg_conn_t *conn = sock->data;

    if (err != NULL || !PQconsumeInput(conn->pq)) {
        conn_mark_broken(conn, CH_EUNAVAIL);
    } else {
        conn_process(conn);
        /* a callback may have closed nothing but may have sent more; keep the output moving, except an open batch's:
         * on_defer sends it with its sync, in one send(), and the server wakes up once for both */
        if (conn->broken == 0 && conn->batch_open == 0)
            conn_flush(conn);
    }
    conn_after_io(conn);
}

static void on_writable(h2o_socket_t *sock, const char *err)
{
    ch_pg_conn_t *conn = sock->data;

    if (err != NULL) {
        conn_mark_broken(conn, CH_EUNAVAIL);
    } else {
        conn_flush(conn);
        /* flushing may have read results into libpq's buffer while the socket was full */
        conn_process(conn);
    }
    conn_after_io(conn);
}

/* --- timers --- */

static void on_deadline(h2o_timeout_entry_t *entry)
{
    ch_pg_sub_t *sub = H2O_STRUCT_FROM_MEMBER(ch_pg_sub_t, deadline, entry);
    ch_pg_pool_t *pool = sub->pool;

    if (sub->conn == NULL) {
        h2o_linklist_unlink(&sub->link);
        --pool->nqueued;
        ++pool->timeouts;
        sub_complete(sub, CH_ETIMEDOUT, "database timed out");
        return;
    }
    /* A pipelined statement cannot be taken back. Submissions go out in deadline order (a read sent again after a
     * batch-mate's failure was first sent before those behind it), so this one is the oldest on its connection: the
     * server has stalled (stopped, swapping, locked) and the connection is written off. */
    conn_down(sub->conn, CH_ETIMEDOUT, "oldest submission passed its deadline");
}

static void on_tick(h2o_timeout_entry_t *entry)
{
    ch_pg_pool_t *pool = H2O_STRUCT_FROM_MEMBER(ch_pg_pool_t, tick_entry, entry);
    int pending = 0;

    for (unsigned i = 0; i != pool->nconns; ++i) {
        ch_pg_conn_t *conn = &pool->conns[i];
        uint64_t now = h2o_now(pool->loop);
        if (conn->state == CONN_BACKOFF && now >= conn->due_at) {
            conn_connect(conn);
        } else if ((conn->state == CONN_CONNECTING || conn->state == CONN_PREPARING) && now >= conn->due_at) {
            conn_attempt_failed(conn, "connect timed out");
        }
    }
    for (unsigned i = 0; i != pool->nconns; ++i)
        pending |= pool->conns[i].state != CONN_UP;
    if (pending)
        tick_arm(pool);
}

/* End of the loop iteration: send the syncs of the reads batched during it, tear down what ch_pg_submit found
 * broken, read what libpq buffered meanwhile. Callbacks run here may batch more reads; they re-arm the entry, and h2o
 * runs an entry linked during its own callback again in the same pass. */
static void on_defer(h2o_timeout_entry_t *entry)
{
    ch_pg_pool_t *pool = H2O_STRUCT_FROM_MEMBER(ch_pg_pool_t, defer_entry, entry);

    for (unsigned i = 0; i != pool->nconns; ++i) {
        ch_pg_conn_t *conn = &pool->conns[i];
        if (conn->broken == 0 && conn->batch_open != 0 && conn->state == CONN_UP)
            conn_sync_batch(conn);
        conn_uncork(conn);
        if (conn->broken == 0 && conn->poke && (conn->state == CONN_UP || conn->state == CONN_PREPARING)) {
            conn->poke = 0;
            conn_process(conn);
        }
        conn_after_io(conn);
    }
}

/* --- public API --- */

/* Resolving a host name would block the loop inside PQconnectPoll; say so once, at start-up. */
static int check_conninfo(const char *conninfo)
{
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &errmsg);
    const char *host = NULL, *hostaddr = NULL;

    if (opts == NULL) {
        log_event("error", "bad_conninfo", -1, errmsg != NULL ? errmsg : "out of memory");
        PQfreemem(errmsg);
        return -1;
    }
    for (PQconninfoOption *o = opts; o->keyword != NULL; ++o) {
        if (strcmp(o->keyword, "host") == 0)
            host = o->val;
        else if (strcmp(o->keyword, "hostaddr") == 0)
            hostaddr = o->val;
    }
    if ((hostaddr == NULL || hostaddr[0] == '\0') && host != NULL) {
        char name[256];
        for (const char *p = host; *p != '\0';) {
            size_t len = strcspn(p, ",");
            unsigned char addr[16];
            snprintf(name, sizeof(name), "%.*s", (int)len, p);
            if (name[0] != '\0' && name[0] != '/' && name[0] != '@' && inet_pton(AF_INET, name, addr) != 1 &&
                inet_pton(AF_INET6, name, addr) != 1)
                log_event("warn", "host_is_a_name", -1, "conninfo host is a name: resolving it blocks the loop");
            p += len;
            if (*p == ',')
                ++p;
        }
    }
    PQconninfoFree(opts);
    return 0;
}

ch_pg_pool_t *ch_pg_pool_new(h2o_loop_t *loop, const ch_pg_config_t *config)
{
    ch_pg_pool_t *pool;
    unsigned nconns = config->conns == 0 ? 1 : config->conns;
    struct timespec ts;

    if (config->conninfo == NULL || check_conninfo(config->conninfo) != 0)
        return NULL;
    if (nconns > CH_PG_MAX_CONNS)
        nconns = CH_PG_MAX_CONNS;

    pool = h2o_mem_alloc(sizeof(*pool) + nconns * sizeof(pool->conns[0]));
    memset(pool, 0, sizeof(*pool) + nconns * sizeof(pool->conns[0]));
    pool->loop = loop;
    pool->conninfo = h2o_strdup(NULL, config->conninfo, SIZE_MAX).base;
    pool->nconns = nconns;
    pool->queue_max = config->queue_max == 0 ? 1024 : config->queue_max;
    pool->connect_timeout_ms = config->connect_timeout_ms == 0 ? 2000 : config->connect_timeout_ms;
    pool->nstmts = registry.n;
    pool->stmts = h2o_mem_alloc((registry.n + 1) * sizeof(*pool->stmts));
    if (registry.n != 0)
        memcpy(pool->stmts, registry.list, registry.n * sizeof(*pool->stmts));
    h2o_linklist_init_anchor(&pool->queue);
    pool->reachable = 1; /* until the first attempt says otherwise, early submissions wait for it */
    clock_gettime(CLOCK_REALTIME, &ts);
    pool->rng = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)pool;
    if (pool->rng == 0)
        pool->rng = 0x9E3779B97F4A7C15ULL;

    h2o_timeout_init(loop, &pool->deadline_timeout, config->timeout_ms == 0 ? 5000 : config->timeout_ms);
    h2o_timeout_init(loop, &pool->tick_timeout, CH_PG_TICK_MS);
    h2o_timeout_init(loop, &pool->defer_timeout, 0);
    pool->tick_entry.cb = on_tick;
    pool->defer_entry.cb = on_defer;

    pool->stmt_states = h2o_mem_alloc(nconns * pool->nstmts + 1);
    for (unsigned i = 0; i != nconns; ++i) {
        ch_pg_conn_t *conn = &pool->conns[i];
        conn->pool = pool;
        conn->idx = i;
        conn->stmt_state = pool->stmt_states + i * pool->nstmts;
        h2o_linklist_init_anchor(&conn->inflight);
        h2o_linklist_init_anchor(&conn->retry);
        conn_close(conn);
    }
    /* nothing is queued yet, so a synchronous connect failure has no callback to run */
    for (unsigned i = 0; i != nconns; ++i)
        conn_connect(&pool->conns[i]);
    return pool;
}

void ch_pg_pool_free(ch_pg_pool_t *pool)
{
    h2o_linklist_t list;

    pool->closing = 1;
    h2o_linklist_init_anchor(&list);
    for (unsigned i = 0; i != pool->nconns; ++i) {
        ch_pg_conn_t *conn = &pool->conns[i];
        conn_close(conn);
        h2o_linklist_insert_list(&list, &conn->inflight);
        h2o_linklist_insert_list(&list, &conn->retry);
        conn->ninflight = 0;
    }
    h2o_linklist_insert_list(&list, &pool->queue);
    pool->nqueued = pool->ninflight = 0;

    /* every deadline entry must be off the timeout before it is disposed */
    for (h2o_linklist_t *n = list.next; n != &list; n = n->next)
        h2o_timeout_unlink(&H2O_STRUCT_FROM_MEMBER(ch_pg_sub_t, link, n)->deadline);
    h2o_timeout_unlink(&pool->tick_entry);
    h2o_timeout_unlink(&pool->defer_entry);
    h2o_timeout_dispose(pool->loop, &pool->deadline_timeout);
    h2o_timeout_dispose(pool->loop, &pool->tick_timeout);
    h2o_timeout_dispose(pool->loop, &pool->defer_timeout);

    /* callbacks that submit again get CH_ECLOSED, so the list cannot grow */
    fail_list(pool, &list, CH_ECLOSED, "shutting down");

    free(pool->stmts);
    free(pool->stmt_states);
    free(pool->conninfo);
    free(pool);
}

static int pool_submit(ch_pg_pool_t *pool, const ch_pg_query_t *queries, int n, ch_pg_cb cb, void *arg, int read)
{
    size_t nvalues = 0, nbytes = 0, size;
    ch_pg_conn_t *conn;
    ch_pg_sub_t *sub;

    if (pool->closing)
        return CH_ECLOSED;
    if (queries == NULL || n <= 0 || n > CH_PG_MAX_QUERIES || cb == NULL)
        return CH_EINVAL;
    for (int i = 0; i != n; ++i) {
        const ch_pg_stmt_t *stmt = queries[i].stmt;
        if (stmt == NULL || pool_stmt_index(pool, stmt) < 0)
            return CH_EINVAL;
        if (stmt->nparams != 0 && queries[i].values == NULL)
            return CH_EINVAL;
        for (int j = 0; j != stmt->nparams; ++j) {
            const char *v = queries[i].values[j];
            if (v == NULL)
                continue;
            if (queries[i].lengths != NULL && queries[i].lengths[j] < 0)
                return CH_EINVAL;
            nbytes += (queries[i].lengths != NULL ? (size_t)queries[i].lengths[j] : strlen(v)) + 1;
        }
        nvalues += (size_t)stmt->nparams;
    }
    if (pool->nqueued + pool->ninflight >= pool->queue_max)
        return CH_EFULL;
    conn = pool_pick_conn(pool);
    if (conn == NULL && !pool->reachable)
        return CH_EUNAVAIL;

    /* one allocation: the submission, its queries, result slots, parameter pointers, then parameter bytes */
    size = sizeof(*sub) + (size_t)n * (sizeof(ch_pg_subq_t) + sizeof(PGresult *) + sizeof(size_t)) +
           nvalues * sizeof(char *) + nbytes;
    sub = h2o_mem_alloc(size);
    memset(sub, 0, sizeof(*sub));
    sub->pool = pool;
    sub->cb = cb;
    sub->arg = arg;
    sub->n = n;
    sub->read = read;
    sub->q = (ch_pg_subq_t *)(sub + 1);
    sub->res = (PGresult **)(sub->q + n);
    sub->prep = (size_t *)(sub->res + n);
    const char **vp = (const char **)(sub->prep + n);
    char *bytes = (char *)(vp + nvalues);
    for (int i = 0; i != n; ++i) {
        const ch_pg_stmt_t *stmt = queries[i].stmt;
        sub->res[i] = NULL;
        sub->q[i].stmt = stmt;
        sub->q[i].idx = (size_t)pool_stmt_index(pool, stmt);
        sub->q[i].values = vp;
        for (int j = 0; j != stmt->nparams; ++j) {
            const char *v = queries[i].values[j];
            if (v == NULL) {
                *vp++ = NULL;
                continue;
            }
            /* text format needs a terminating NUL, which a value given with a length may lack */
            size_t len = queries[i].lengths != NULL ? (size_t)queries[i].lengths[j] : strlen(v);
            memcpy(bytes, v, len);
            bytes[len] = '\0';
            *vp++ = bytes;
            bytes += len + 1;
        }
    }
    sub->deadline.cb = on_deadline;
    h2o_timeout_link(pool->loop, &pool->deadline_timeout, &sub->deadline);

    if (conn != NULL) {
        conn_dispatch(conn, sub);
    } else {
        h2o_linklist_insert(&pool->queue, &sub->link);
        ++pool->nqueued;
    }
    return 0;
}

int ch_pg_submit(ch_pg_pool_t *pool, const ch_pg_query_t *queries, int n, ch_pg_cb cb, void *arg)
{
    return pool_submit(pool, queries, n, cb, arg, 0);
}

int ch_pg_submit_read(ch_pg_pool_t *pool, const ch_pg_query_t *queries, int n, ch_pg_cb cb, void *arg)
{
    return pool_submit(pool, queries, n, cb, arg, 1);
}

void ch_pg_pool_stats(ch_pg_pool_t *pool, ch_pg_stats_t *stats)
{
    stats->conns_up = pool_conns_up(pool);
    stats->queued = pool->nqueued;
    stats->inflight = pool->ninflight;
    stats->timeouts = pool->timeouts;
    stats->failures = pool->failures;
    stats->reconnects = pool->reconnects;
    stats->syncs = pool->syncs;
    stats->resent = pool->resent;
}
