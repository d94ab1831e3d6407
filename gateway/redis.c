/* Asynchronous Redis on an h2o event loop: hiredis adapter, per-command timeouts, bounded queue, reconnects. */

/*
 * How it fits together
 *
 * Each ch_redis_t owns up to two connections ("conn"): one for commands and, from the first
 * ch_redis_subscribe on, one in subscribed mode. A conn is IDLE (no hiredis context; maybe a
 * reconnect is scheduled), CONNECTING (a context exists; the hello — AUTH, PING, SUBSCRIBE — is in
 * flight) or READY (the PING of the hello was answered). Commands are accepted only while READY,
 * so callers fail fast with CH_EUNAVAIL instead of queueing into a dead server.
 *
 * hiredis does all socket I/O; h2o only polls a dup() of the context's fd (h2o closes what it
 * polls, hiredis closes its own fd, hence the dup).
 *
 * Every command (user or internal) is a ch_redis_req_t, kept oldest first in its conn's in-flight
 * list and linked to one h2o timeout of `timeout_ms`. hiredis 0.14 has no timeouts of its own; when
 * the oldest command expires the whole connection is declared broken: Redis answers in order, so
 * nothing behind it can complete either.
 *
 * Exactly-once callbacks. hiredis calls our on_reply exactly once per command, with a reply or with
 * NULL when the context is freed; that call releases the req. Whether and how the *user* is told is
 * decided separately: the first of {reply, timeout, connection loss, ch_redis_free} wins and clears
 * req->conn, so later events for the same req only free it. Failures are never reported from
 * inside hiredis or from inside an h2o timeout callback: they are queued in r->done and delivered
 * when control is back in one of our socket callbacks (or the eventfd "waker" that timeouts poke).
 * That keeps two invariants:
 *   - redisAsyncFree is never called while hiredis is on the stack (a conn sets `drop` instead and
 *     the socket callback frees the context after hiredis returned);
 *   - no user code runs inside our h2o timeout callbacks, so a user calling ch_redis_free can never
 *     dispose an h2o_timeout_t while h2o is iterating it (h2o 2.2.5 would crash).
 * ch_redis_free called from any callback of its own ch_redis_t is deferred to the end of the
 * outermost callback (r->depth).
 */

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <h2o.h>
#include <hiredis/async.h>
#include "cityhall/ch.h"
#include "cityhall/redis.h"

#define BACKOFF_MIN_MS     50
#define BACKOFF_MAX_MS     2000
#define HEARTBEAT_MS       1000
#define DEFAULT_TIMEOUT_MS 1000
#define DEFAULT_QUEUE_MAX  65536

enum { CONN_IDLE, CONN_CONNECTING, CONN_READY };

/* What a req is for; only REQ_USER reqs have a user callback. */
enum { REQ_USER, REQ_AUTH, REQ_HELLO_PING, REQ_HEARTBEAT };

typedef struct ch_redis_conn {
    ch_redis_t *r;
    const char *name; /* "cmd" or "sub", for logs */
    int is_sub;
    int state;
    redisAsyncContext *ac; /* NULL while IDLE */
    h2o_socket_t *sock;    /* polls a dup() of ac->c.fd; NULL while IDLE */
    int drop;              /* free the context as soon as hiredis is off the stack */
    int broken;            /* hiredis is tearing the context down: accept nothing more */
    char why[128];         /* the server's refusal of the hello (AUTH, PING), for the log */
    int fail_err;          /* what unanswered commands get when the context goes away */
    unsigned attempt;      /* consecutive failed attempts, drives the backoff */
    int ever_ready;
    int started;
    h2o_linklist_t inflight; /* ch_redis_req_t.link, oldest first */
    unsigned ninflight;
    /* h2o 2.2.5 timeouts have one fixed duration per h2o_timeout_t and fire in link order; a list
       that only ever holds this one entry can carry any deadline in registered_at. */
    h2o_timeout_t retry_timeout;
    h2o_timeout_entry_t retry;
} ch_redis_conn_t;

typedef struct ch_redis_req {
    ch_redis_conn_t *conn; /* NULL once the outcome was decided (the user was or will be told) */
    int kind;
    ch_redis_cb cb;
    void *arg;
    h2o_linklist_t link;
    h2o_timeout_entry_t deadline;
} ch_redis_req_t;

typedef struct ch_redis_done {
    ch_redis_cb cb;
    void *arg;
    int err;
} ch_redis_done_t;

typedef struct ch_redis_sub {
    char *channel;
    size_t len;
    ch_redis_message_cb cb;
    void *arg;
} ch_redis_sub_t;

struct ch_redis {
    h2o_loop_t *loop;
    char *host, *unix_path, *password;
    int port;
    uint64_t timeout_ms;
    unsigned queue_max;

    ch_redis_conn_t cmd, sub;

    h2o_timeout_t deadline_timeout; /* timeout_ms; one entry per in-flight req of either conn */
    h2o_timeout_t heartbeat_timeout;
    h2o_timeout_entry_t heartbeat;
    int sent_since_heartbeat;

    /* failures decided outside a socket callback are delivered from the waker's read callback */
    int wake_fd;
    h2o_socket_t *waker;
    int wake_pending;
    ch_redis_done_t *done;
    size_t done_head, done_len, done_cap;

    ch_redis_sub_t *subs;
    size_t nsubs, subs_cap;

    unsigned depth; /* nesting of our socket callbacks; >0 defers ch_redis_free */
    int closing;
    uint64_t rng;
    uint64_t timeouts, failures, reconnects;
};

static void start_connect(ch_redis_conn_t *conn);
static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);
static void on_message(redisAsyncContext *ac, void *reply, void *privdata);

/* Whether user commands may be sent on `conn` now. */
static int conn_usable(const ch_redis_conn_t *conn)
{
    return conn->state == CONN_READY && !conn->drop && !conn->broken;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (p == NULL)
        abort();
    return p;
}

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n, sz);
    if (p == NULL)
        abort();
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    if ((p = realloc(p, n)) == NULL)
        abort();
    return p;
}

static char *xstrdup(const char *s)
{
    if (s == NULL)
        return NULL;
    char *d = strdup(s);
    if (d == NULL)
        abort();
    return d;
}

/* One JSON line per connection state change; errstr comes from hiredis or the OS, never from data. */
static void log_event(const char *level, const ch_redis_conn_t *conn, const char *event, const char *detail)
{
    char esc[256];
    size_t o = 0;
    for (const char *s = detail != NULL ? detail : ""; *s != '\0' && o + 7 < sizeof(esc); ++s) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            esc[o++] = '\\';
            esc[o++] = (char)c;
        } else if (c < 0x20) {
            o += (size_t)snprintf(esc + o, sizeof(esc) - o, "\\u%04x", c);
        } else {
            esc[o++] = (char)c;
        }
    }
    esc[o] = '\0';
    const ch_redis_t *r = conn->r;
    char server[160];
    if (r->unix_path != NULL)
        snprintf(server, sizeof(server), "%s", r->unix_path);
    else
        snprintf(server, sizeof(server), "%s:%d", r->host, r->port);
    fprintf(stderr,
            "{\"level\":\"%s\",\"component\":\"redis\",\"conn\":\"%s\",\"server\":\"%s\",\"event\":\"%s\"%s%s%s}\n",
            level, conn->name, server, event, o != 0 ? ",\"detail\":\"" : "", esc, o != 0 ? "\"" : "");
}

/* ---- deferred completions ---- */

static void push_done(ch_redis_t *r, ch_redis_cb cb, void *arg, int err)
{
    if (cb == NULL)
        return;
    if (r->done_len == r->done_cap) {
        r->done_cap = r->done_cap == 0 ? 64 : r->done_cap * 2;
        r->done = xrealloc(r->done, r->done_cap * sizeof(*r->done));
    }
    r->done[r->done_len++] = (ch_redis_done_t){cb, arg, err};
}

/* Calls the queued failure callbacks in the order they were decided; they may queue more. */
static void deliver_done(ch_redis_t *r)
{
    while (r->done_head < r->done_len) {
        ch_redis_done_t d = r->done[r->done_head++];
        d.cb(d.arg, NULL, d.err);
    }
    r->done_head = r->done_len = 0;
}

/* Makes the waker's read callback run on the next loop iteration (used from timeout callbacks). */
static void wake(ch_redis_t *r)
{
    if (r->wake_pending)
        return;
    uint64_t one = 1;
    ssize_t n;
    while ((n = write(r->wake_fd, &one, sizeof(one))) == -1 && errno == EINTR)
        ;
    /* EAGAIN means the counter is already non-zero, i.e. a wake-up is pending anyway */
    r->wake_pending = 1;
}

/* ---- in-flight requests ---- */

static void req_unlink(ch_redis_req_t *req)
{
    ch_redis_conn_t *conn = req->conn;
    h2o_linklist_unlink(&req->link);
    h2o_timeout_unlink(&req->deadline);
    --conn->ninflight;
    req->conn = NULL;
}

/* Decides the outcome `err` for every command in flight on `conn`; hiredis still owns the reqs. */
static void fail_inflight(ch_redis_conn_t *conn, int err)
{
    ch_redis_t *r = conn->r;
    while (!h2o_linklist_is_empty(&conn->inflight)) {
        ch_redis_req_t *req = H2O_STRUCT_FROM_MEMBER(ch_redis_req_t, link, conn->inflight.next);
        req_unlink(req);
        if (req->kind == REQ_USER) {
            if (err == CH_ETIMEDOUT)
                ++r->timeouts;
            push_done(r, req->cb, req->arg, err);
        }
    }
}

static void on_deadline(h2o_timeout_entry_t *entry);

/* Hands a formatted command to hiredis; returns 0 or CH_EUNAVAIL when the context refuses it. */
static int send_formatted(ch_redis_conn_t *conn, int kind, ch_redis_cb cb, void *arg, const char *cmd, size_t len)
{
    ch_redis_t *r = conn->r;
    ch_redis_req_t *req = xmalloc(sizeof(*req));
    *req = (ch_redis_req_t){.conn = conn, .kind = kind, .cb = cb, .arg = arg};
    req->deadline.cb = on_deadline;
    /* hiredis only queues the command here and asks for a write event: it never calls back
       synchronously, which is what lets ch_redis_command promise "never before returning". */
    if (redisAsyncFormattedCommand(conn->ac, on_reply, req, cmd, len) != REDIS_OK) {
        free(req);
        return CH_EUNAVAIL;
    }
    h2o_linklist_insert(&conn->inflight, &req->link);
    h2o_timeout_link(r->loop, &r->deadline_timeout, &req->deadline);
    ++conn->ninflight;
    r->sent_since_heartbeat = 1;
    return 0;
}

static int send_internal(ch_redis_conn_t *conn, int kind, const char *fmt, ...)
{
    char *cmd;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    if (len < 0)
        abort(); /* our own formats are valid: only allocation fails here */
    int ret = send_formatted(conn, kind, NULL, NULL, cmd, (size_t)len);
    free(cmd);
    return ret;
}

/* ---- connection life cycle ---- */

static uint64_t next_random(ch_redis_t *r)
{
    /* xorshift64*: jitter only needs to decorrelate gateways reconnecting at once */
    r->rng ^= r->rng >> 12;
    r->rng ^= r->rng << 25;
    r->rng ^= r->rng >> 27;
    return r->rng * 2685821657736338717ull;
}

static void schedule_reconnect(ch_redis_conn_t *conn)
{
    ch_redis_t *r = conn->r;
    uint64_t cap = BACKOFF_MIN_MS;
    for (unsigned i = 0; i < conn->attempt && cap < BACKOFF_MAX_MS; ++i)
        cap *= 2;
    if (cap > BACKOFF_MAX_MS)
        cap = BACKOFF_MAX_MS;
    ++conn->attempt;
    /* "equal jitter": at least half the step so a dead server is not hammered, at most the step */
    uint64_t delay = cap / 2 + next_random(r) % (cap / 2 + 1);
    h2o_timeout_unlink(&conn->retry);
    h2o_timeout_link(r->loop, &conn->retry_timeout, &conn->retry);
    conn->retry.registered_at += delay;
}

static void on_retry(h2o_timeout_entry_t *entry)
{
    ch_redis_conn_t *conn = H2O_STRUCT_FROM_MEMBER(ch_redis_conn_t, retry, entry);
    start_connect(conn);
}

/* The context is being freed (by hiredis after an error, or by us); called once per context. */
static void ev_cleanup(void *privdata)
{
    ch_redis_conn_t *conn = privdata;
    ch_redis_t *r = conn->r;

    /* hiredis ran every pending callback (with NULL) before calling us */
    assert(h2o_linklist_is_empty(&conn->inflight));
    if (conn->sock != NULL) {
        h2o_socket_close(conn->sock);
        conn->sock = NULL;
    }
    int was_ready = conn->state == CONN_READY;
    const char *why = conn->fail_err == CH_ETIMEDOUT ? "command timed out" : conn->ac->c.errstr;
    if (conn->why[0] != '\0')
        why = conn->why;
    conn->ac = NULL;
    conn->state = CONN_IDLE;
    conn->drop = 0;
    conn->broken = 0;
    if (r->closing)
        return;
    ++r->failures;
    if (was_ready)
        log_event("warn", conn, "connection lost", why);
    else if (conn->attempt == 0)
        log_event("warn", conn, "could not connect", why);
    schedule_reconnect(conn);
}

static void on_sock_read(h2o_socket_t *sock, const char *err);
static void on_sock_write(h2o_socket_t *sock, const char *err);
static void enter(ch_redis_t *r);
static void leave(ch_redis_t *r);

static void ev_add_read(void *privdata)
{
    ch_redis_conn_t *conn = privdata;
    if (conn->sock != NULL && !h2o_socket_is_reading(conn->sock))
        h2o_socket_read_start(conn->sock, on_sock_read);
}

static void ev_del_read(void *privdata)
{
    ch_redis_conn_t *conn = privdata;
    if (conn->sock != NULL && h2o_socket_is_reading(conn->sock))
        h2o_socket_read_stop(conn->sock);
}

static void ev_add_write(void *privdata)
{
    ch_redis_conn_t *conn = privdata;
    /* h2o's write notification is one-shot and asserts if armed twice */
    if (conn->sock != NULL && !h2o_socket_is_writing(conn->sock))
        h2o_socket_notify_write(conn->sock, on_sock_write);
}

static void ev_del_write(void *privdata)
{
    /* h2o cannot disarm a notification; a spurious one only makes hiredis write nothing */
}

static void on_sock_read(h2o_socket_t *sock, const char *err)
{
    ch_redis_conn_t *conn = sock->data;
    ch_redis_t *r = conn->r;
    enter(r);
    if (conn->ac != NULL && !conn->drop)
        redisAsyncHandleRead(conn->ac);
    leave(r);
}

static void on_sock_write(h2o_socket_t *sock, const char *err)
{
    ch_redis_conn_t *conn = sock->data;
    ch_redis_t *r = conn->r;
    enter(r);
    if (conn->ac != NULL && !conn->drop)
        redisAsyncHandleWrite(conn->ac);
    leave(r);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    ch_redis_conn_t *conn = ac->data;
    /* on failure hiredis frees the context right after this; ev_cleanup does the rest */
    if (status != REDIS_OK)
        conn->fail_err = CH_EUNAVAIL;
}

/* Sends SUBSCRIBE for every distinct channel; the replies and messages go to on_message. */
static void subscribe_all(ch_redis_conn_t *conn)
{
    ch_redis_t *r = conn->r;
    for (size_t i = 0; i < r->nsubs; ++i) {
        int seen = 0;
        for (size_t j = 0; j < i && !seen; ++j)
            seen =
                r->subs[j].len == r->subs[i].len && memcmp(r->subs[j].channel, r->subs[i].channel, r->subs[i].len) == 0;
        if (!seen)
            redisAsyncCommand(conn->ac, on_message, conn, "SUBSCRIBE %b", r->subs[i].channel, r->subs[i].len);
    }
}

static void start_connect(ch_redis_conn_t *conn)
{
    ch_redis_t *r = conn->r;
    assert(conn->ac == NULL && !r->closing);
    conn->started = 1;
    conn->fail_err = CH_EUNAVAIL;
    conn->drop = 0;
    conn->broken = 0;
    conn->why[0] = '\0';

    /* both connect without name resolution: host was checked to be an IP literal */
    redisAsyncContext *ac =
        r->unix_path != NULL ? redisAsyncConnectUnix(r->unix_path) : redisAsyncConnect(r->host, r->port);
    if (ac == NULL)
        abort();
    int fd = -1;
    if (ac->err != 0 || (fd = fcntl(ac->c.fd, F_DUPFD_CLOEXEC, 0)) == -1) {
        ++r->failures;
        if (conn->attempt == 0)
            log_event("warn", conn, "could not connect", ac->err != 0 ? ac->errstr : strerror(errno));
        redisAsyncFree(ac); /* no adapter and no callbacks yet: nothing runs */
        schedule_reconnect(conn);
        return;
    }

    /* hiredis 0.14 opens its socket without close-on-exec */
    fcntl(ac->c.fd, F_SETFD, FD_CLOEXEC);
    if (r->unix_path == NULL) {
        /* a vanished host sends no RST; keepalive notices within ~30 s even on the subscriber connection,
           which carries no commands that could time out (hiredis' own helper poisons the context on error) */
        int on = 1, idle = 15, intvl = 5, cnt = 3;
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
    }

    conn->ac = ac;
    ac->data = conn;
    conn->sock = h2o_evloop_socket_create(r->loop, fd, H2O_SOCKET_FLAG_DONT_READ);
    conn->sock->data = conn;
    ac->ev.data = conn;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    redisAsyncSetConnectCallback(ac, on_connect); /* arms the write notification that completes connect() */
    ev_add_read(conn);
    conn->state = CONN_CONNECTING;

    /* pipelined behind the connect; the PING reply marks the conn READY, so a server that accepts
       TCP but does not answer (SIGSTOP, still loading) never takes user commands */
    if (r->password != NULL)
        send_internal(conn, REQ_AUTH, "AUTH %s", r->password);
    send_internal(conn, REQ_HELLO_PING, "PING");
    if (conn->is_sub)
        subscribe_all(conn);
}

/* Declares `conn` broken from a timeout callback: hiredis is not on the stack, so free it now. */
static void conn_fail(ch_redis_conn_t *conn, int err)
{
    ch_redis_t *r = conn->r;
    fail_inflight(conn, err);
    conn->fail_err = err;
    if (conn->ac != NULL)
        redisAsyncFree(conn->ac); /* on_reply(NULL) frees the reqs, ev_cleanup schedules the reconnect */
    wake(r);
}

static void on_deadline(h2o_timeout_entry_t *entry)
{
    ch_redis_req_t *req = H2O_STRUCT_FROM_MEMBER(ch_redis_req_t, deadline, entry);
    ch_redis_conn_t *conn = req->conn;
    ch_redis_t *r = conn->r;
    conn_fail(conn, CH_ETIMEDOUT);
    /* One server: if it stopped answering commands, the subscriber connection (which has no
       traffic of its own to time out) is as stale; reconnecting it re-subscribes once it is back. */
    if (conn == &r->cmd && r->sub.ac != NULL)
        conn_fail(&r->sub, CH_EUNAVAIL);
}

static void on_heartbeat(h2o_timeout_entry_t *entry)
{
    ch_redis_t *r = H2O_STRUCT_FROM_MEMBER(ch_redis_t, heartbeat, entry);
    h2o_timeout_link(r->loop, &r->heartbeat_timeout, &r->heartbeat);
    /* an idle connection is probed so that a hung server is noticed (and `connected` stays truthful)
       without waiting for the next user command to time out */
    if (conn_usable(&r->cmd) && r->cmd.ninflight == 0 && !r->sent_since_heartbeat)
        send_internal(&r->cmd, REQ_HEARTBEAT, "PING");
    r->sent_since_heartbeat = 0;
}

static void conn_ready(ch_redis_conn_t *conn)
{
    ch_redis_t *r = conn->r;
    conn->state = CONN_READY;
    if (conn->ever_ready) {
        ++r->reconnects;
        log_event("info", conn, "reconnected", NULL);
    }
    conn->ever_ready = 1;
    conn->attempt = 0;
}

static void on_reply(redisAsyncContext *ac, void *_reply, void *privdata)
{
    redisReply *reply = _reply;
    ch_redis_req_t *req = privdata;
    ch_redis_conn_t *conn = req->conn;

    if (conn == NULL) {
        /* the outcome was already decided (timeout, ch_redis_free); this is hiredis letting go */
        free(req);
        return;
    }
    ch_redis_t *r = conn->r;
    req_unlink(req);
    int kind = req->kind;
    ch_redis_cb cb = req->cb;
    void *arg = req->arg;
    free(req);

    if (reply == NULL) {
        /* the context is going away (EOF, reset, refused) with this command unanswered; stop
           accepting commands from here on, before any callback can try to send one */
        conn->broken = 1;
        if (kind == REQ_USER)
            push_done(r, cb, arg, conn->fail_err);
        return;
    }

    switch (kind) {
    case REQ_USER:
        if (cb != NULL)
            cb(arg, reply, 0);
        break;
    case REQ_AUTH:
    case REQ_HELLO_PING:
        if (reply->type == REDIS_REPLY_ERROR) {
            /* wrong password, NOAUTH, LOADING: retry with backoff; after a failed AUTH the PING fails
               too, the first refusal is the one worth logging (ev_cleanup does, once per outage) */
            if (!conn->drop)
                snprintf(conn->why, sizeof(conn->why), "%s", reply->str);
            conn->drop = 1;
        } else if (kind == REQ_HELLO_PING && !conn->drop && !conn->broken && !r->closing) {
            conn_ready(conn);
        }
        break;
    case REQ_HEARTBEAT:
        break;
    }
}

static void on_message(redisAsyncContext *ac, void *_reply, void *privdata)
{
    redisReply *reply = _reply;
    ch_redis_conn_t *conn = privdata;
    ch_redis_t *r = conn->r;

    /* NULL when the context is freed; subscribe confirmations are not messages */
    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
        return;
    redisReply *kind = reply->element[0], *channel = reply->element[1], *payload = reply->element[2];
    if (kind->type != REDIS_REPLY_STRING || strcasecmp(kind->str, "message") != 0 ||
        channel->type != REDIS_REPLY_STRING || payload->type != REDIS_REPLY_STRING)
        return;
    /* index loop: a callback may subscribe (realloc) or free the ch_redis_t (closing) */
    for (size_t i = 0; i < r->nsubs && !r->closing; ++i) {
        ch_redis_sub_t *s = &r->subs[i];
        if (s->len == channel->len && memcmp(s->channel, channel->str, s->len) == 0)
            s->cb(s->arg, channel->str, payload->str, payload->len);
    }
}

/* ---- entry points from the loop ---- */

static void destroy(ch_redis_t *r);

static void enter(ch_redis_t *r)
{
    ++r->depth;
}

/* Leaves a socket callback: frees dropped contexts, tells users about failures, finishes a free. */
static void leave(ch_redis_t *r)
{
    if (r->depth == 1) {
        for (;;) {
            ch_redis_conn_t *conns[] = {&r->cmd, &r->sub};
            for (size_t i = 0; i < 2; ++i) {
                ch_redis_conn_t *conn = conns[i];
                if (conn->drop && conn->ac != NULL) {
                    conn->drop = 0;
                    redisAsyncFree(conn->ac);
                }
            }
            if (r->done_head == r->done_len)
                break;
            deliver_done(r);
        }
    }
    if (--r->depth == 0 && r->closing)
        destroy(r);
}

static void on_wake(h2o_socket_t *sock, const char *err)
{
    ch_redis_t *r = sock->data;
    uint64_t n;
    while (read(r->wake_fd, &n, sizeof(n)) == -1 && errno == EINTR)
        ;
    r->wake_pending = 0;
    enter(r);
    leave(r);
}

/* ---- public API ---- */

static int is_ip_literal(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return host != NULL && (inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1);
}

static void conn_init(ch_redis_t *r, ch_redis_conn_t *conn, const char *name, int is_sub)
{
    conn->r = r;
    conn->name = name;
    conn->is_sub = is_sub;
    conn->state = CONN_IDLE;
    conn->fail_err = CH_EUNAVAIL;
    h2o_linklist_init_anchor(&conn->inflight);
    h2o_timeout_init(r->loop, &conn->retry_timeout, 0);
    conn->retry.cb = on_retry;
}

ch_redis_t *ch_redis_new(h2o_loop_t *loop, const ch_redis_config_t *config)
{
    if (config == NULL)
        return NULL;
    if (config->unix_path == NULL && (!is_ip_literal(config->host) || config->port <= 0 || config->port > 65535))
        return NULL;

    int wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd == -1)
        return NULL;

    ch_redis_t *r = xcalloc(1, sizeof(*r));
    r->loop = loop;
    r->host = xstrdup(config->host);
    r->unix_path = xstrdup(config->unix_path);
    r->password = config->password != NULL && config->password[0] != '\0' ? xstrdup(config->password) : NULL;
    r->port = config->port;
    r->timeout_ms = config->timeout_ms != 0 ? config->timeout_ms : DEFAULT_TIMEOUT_MS;
    r->queue_max = config->queue_max != 0 ? config->queue_max : DEFAULT_QUEUE_MAX;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    r->rng = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)r ^ ((uint64_t)getpid() << 40);
    if (r->rng == 0)
        r->rng = 88172645463325252ull;

    h2o_timeout_init(loop, &r->deadline_timeout, r->timeout_ms);
    h2o_timeout_init(loop, &r->heartbeat_timeout, HEARTBEAT_MS);
    r->heartbeat.cb = on_heartbeat;
    conn_init(r, &r->cmd, "cmd", 0);
    conn_init(r, &r->sub, "sub", 1);

    r->wake_fd = wake_fd;
    r->waker = h2o_evloop_socket_create(loop, wake_fd, H2O_SOCKET_FLAG_DONT_READ);
    r->waker->data = r;
    h2o_socket_read_start(r->waker, on_wake);

    start_connect(&r->cmd);
    h2o_timeout_link(loop, &r->heartbeat_timeout, &r->heartbeat);
    return r;
}

static void destroy(ch_redis_t *r)
{
    /* the waker's socket owns wake_fd and closes it */
    h2o_socket_close(r->waker);
    assert(r->cmd.ac == NULL && r->sub.ac == NULL);
    h2o_timeout_dispose(r->loop, &r->deadline_timeout);
    h2o_timeout_dispose(r->loop, &r->heartbeat_timeout);
    h2o_timeout_dispose(r->loop, &r->cmd.retry_timeout);
    h2o_timeout_dispose(r->loop, &r->sub.retry_timeout);
    for (size_t i = 0; i < r->nsubs; ++i)
        free(r->subs[i].channel);
    free(r->subs);
    free(r->done);
    free(r->host);
    free(r->unix_path);
    free(r->password);
    free(r);
}

void ch_redis_free(ch_redis_t *r)
{
    if (r == NULL || r->closing)
        return;
    r->closing = 1;
    ch_redis_conn_t *conns[] = {&r->cmd, &r->sub};
    for (size_t i = 0; i < 2; ++i) {
        ch_redis_conn_t *conn = conns[i];
        fail_inflight(conn, CH_ECLOSED);
        conn->fail_err = CH_ECLOSED;
        conn->state = CONN_IDLE;
        h2o_timeout_unlink(&conn->retry);
        if (conn->ac != NULL)
            conn->drop = 1;
    }
    h2o_timeout_unlink(&r->heartbeat);
    if (r->depth == 0) {
        /* not called from one of our callbacks: neither hiredis nor h2o is iterating our state */
        enter(r);
        leave(r);
    }
    /* otherwise the outermost callback of ours that is on the stack finishes in leave() */
}

/* Refuses what would desynchronise hiredis' reply matching on the command connection. */
static int check_command(const char *cmd, size_t len)
{
    /* a formatted command is "*<argc>\r\n$<len>\r\n<name>\r\n..." */
    if (len < 4 || cmd[0] != '*' || atoi(cmd + 1) < 1)
        return CH_EINVAL;
    const char *p = memchr(cmd, '$', len);
    if (p == NULL)
        return CH_EINVAL;
    long n = strtol(p + 1, NULL, 10);
    const char *name = strchr(p, '\n');
    if (name == NULL || n <= 0 || (size_t)(++name - cmd) + (size_t)n > len)
        return CH_EINVAL;
    char first = (char)(name[0] | 0x20);
    if (first != 's' && first != 'p' && first != 'u' && first != 'm')
        return 0;
    static const char *const forbidden[] = {"subscribe",    "psubscribe",   "ssubscribe", "unsubscribe",
                                            "punsubscribe", "sunsubscribe", "monitor"};
    for (size_t i = 0; i < sizeof(forbidden) / sizeof(forbidden[0]); ++i)
        if (strlen(forbidden[i]) == (size_t)n && strncasecmp(name, forbidden[i], (size_t)n) == 0)
            return CH_EINVAL;
    return 0;
}

static int command_admissible(ch_redis_t *r)
{
    if (r->closing)
        return CH_ECLOSED;
    if (!conn_usable(&r->cmd))
        return CH_EUNAVAIL;
    if (r->cmd.ninflight >= r->queue_max)
        return CH_EFULL;
    return 0;
}

static int send_user(ch_redis_t *r, ch_redis_cb cb, void *arg, char *cmd, int len)
{
    if (len < 0) {
        if (len == -1)
            abort(); /* hiredis reports allocation failure as -1, a bad format as -2 */
        return CH_EINVAL;
    }
    int ret = check_command(cmd, (size_t)len);
    if (ret == 0)
        ret = send_formatted(&r->cmd, REQ_USER, cb, arg, cmd, (size_t)len);
    free(cmd);
    return ret;
}

int ch_redis_command(ch_redis_t *r, ch_redis_cb cb, void *arg, const char *fmt, ...)
{
    int ret = command_admissible(r);
    if (ret != 0)
        return ret;
    char *cmd = NULL;
    va_list ap;
    va_start(ap, fmt);
    int len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    return send_user(r, cb, arg, cmd, len);
}

int ch_redis_commandargv(ch_redis_t *r, ch_redis_cb cb, void *arg, int argc, const char **argv, const size_t *argvlen)
{
    int ret = command_admissible(r);
    if (ret != 0)
        return ret;
    if (argc < 1 || argv == NULL)
        return CH_EINVAL;
    char *cmd = NULL;
    int len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
    return send_user(r, cb, arg, cmd, len);
}

int ch_redis_subscribe(ch_redis_t *r, const char *channel, ch_redis_message_cb cb, void *arg)
{
    if (r->closing)
        return CH_ECLOSED;
    if (channel == NULL || channel[0] == '\0' || cb == NULL)
        return CH_EINVAL;
    size_t len = strlen(channel);
    int known = 0;
    for (size_t i = 0; i < r->nsubs && !known; ++i)
        known = r->subs[i].len == len && memcmp(r->subs[i].channel, channel, len) == 0;
    if (r->nsubs == r->subs_cap) {
        r->subs_cap = r->subs_cap == 0 ? 4 : r->subs_cap * 2;
        r->subs = xrealloc(r->subs, r->subs_cap * sizeof(*r->subs));
    }
    r->subs[r->nsubs++] = (ch_redis_sub_t){xstrdup(channel), len, cb, arg};

    ch_redis_conn_t *conn = &r->sub;
    if (!conn->started) {
        start_connect(conn); /* subscribes to everything in r->subs */
    } else if (!known && conn->ac != NULL && !conn->drop && !conn->broken) {
        /* while IDLE, the next connect subscribes; a refusal here means that connect is coming */
        redisAsyncCommand(conn->ac, on_message, conn, "SUBSCRIBE %b", channel, len);
    }
    return 0;
}

void ch_redis_stats(ch_redis_t *r, ch_redis_stats_t *stats)
{
    stats->connected = !r->closing && conn_usable(&r->cmd);
    stats->inflight = r->cmd.ninflight;
    stats->timeouts = r->timeouts;
    stats->failures = r->failures;
    stats->reconnects = r->reconnects;
}
