/* Connection limits h2o 2.2.5 lacks: open connections per thread and per client address, requests per HTTP/2
 * connection, HTTP/2 requests that never finish arriving, and connections that stop making progress. */
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include "gateway.h"
#include <h2o/http2.h>
#include <h2o/http2_internal.h>

/* One accepted connection, from accept until h2o closes its socket (the socket's on_close hook frees it). */
typedef struct ch_conn {
    h2o_linklist_t link; /* in ch_conns_t.open */
    ch_conns_t *owner;
    h2o_socket_t *sock;
    uint32_t ip; /* IPv4, network order; 0: not counted per address */
    size_t seen_read, seen_written;
    uint64_t progress_us;     /* when bytes last moved either way */
    unsigned goaway_sent : 1; /* the request budget's first GOAWAY went out */
    unsigned shut : 1;        /* shutdown(2) issued; h2o closes it on its next event */
} ch_conn_t;

struct ch_conns {
    h2o_linklist_t open;
    unsigned count;
    unsigned refused, stalled, expired; /* since the last summary log line */
    uint64_t swept_us;
};

/*
 * Open connections per client address, shared by the threads (SO_REUSEPORT spreads one client's connections
 * over all of them). Open addressing with linear probing; capacity is a power of two at least twice the most
 * connections the process can hold, so it never fills. Touched once per accept and once per close.
 */
static struct {
    pthread_mutex_t lock;
    uint32_t *ip, *count;
    size_t mask;
} per_ip = {PTHREAD_MUTEX_INITIALIZER, NULL, NULL, 0};

void ch_conns_init(const ch_config_t *cfg)
{
    if (cfg->max_connections_per_ip == 0)
        return;
    size_t most = (size_t)cfg->threads * cfg->max_connections;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < most)
        most = rl.rlim_cur;
    size_t cap = 64;
    while (cap < 2 * most)
        cap *= 2;
    per_ip.ip = calloc(cap, sizeof(*per_ip.ip));
    per_ip.count = calloc(cap, sizeof(*per_ip.count));
    if (per_ip.ip == NULL || per_ip.count == NULL)
        abort();
    per_ip.mask = cap - 1;
}

static size_t ip_slot(uint32_t ip)
{
    size_t i = (ip * 2654435761u) & per_ip.mask;
    while (per_ip.ip[i] != 0 && per_ip.ip[i] != ip)
        i = (i + 1) & per_ip.mask;
    return i;
}

/* Counts one more connection from `ip` unless it already has `cap`; returns 0 when counted. */
static int ip_acquire(uint32_t ip, unsigned cap)
{
    int ret = -1;
    pthread_mutex_lock(&per_ip.lock);
    size_t i = ip_slot(ip);
    if (per_ip.count[i] < cap) {
        per_ip.ip[i] = ip;
        ++per_ip.count[i];
        ret = 0;
    }
    pthread_mutex_unlock(&per_ip.lock);
    return ret;
}

static void ip_release(uint32_t ip)
{
    pthread_mutex_lock(&per_ip.lock);
    size_t i = ip_slot(ip);
    if (--per_ip.count[i] == 0) {
        /* backward-shift deletion keeps every later entry of the probe chain reachable without tombstones */
        per_ip.ip[i] = 0;
        for (size_t j = (i + 1) & per_ip.mask; per_ip.ip[j] != 0; j = (j + 1) & per_ip.mask) {
            size_t home = (per_ip.ip[j] * 2654435761u) & per_ip.mask;
            if (((j - home) & per_ip.mask) >= ((j - i) & per_ip.mask)) {
                per_ip.ip[i] = per_ip.ip[j];
                per_ip.count[i] = per_ip.count[j];
                per_ip.ip[j] = 0;
                per_ip.count[j] = 0;
                i = j;
            }
        }
    }
    pthread_mutex_unlock(&per_ip.lock);
}

ch_conns_t *ch_conns_new(void)
{
    ch_conns_t *conns = calloc(1, sizeof(*conns));
    if (conns == NULL)
        abort();
    h2o_linklist_init_anchor(&conns->open);
    return conns;
}

static void on_conn_close(void *data)
{
    ch_conn_t *c = data;
    if (c->ip != 0)
        ip_release(c->ip);
    --c->owner->count;
    h2o_linklist_unlink(&c->link);
    free(c);
}

int ch_conns_admit(ch_thread_t *thread, h2o_socket_t *sock)
{
    const ch_config_t *cfg = ch_config();
    ch_conns_t *conns = thread->conns;
    uint32_t ip = 0;
    if (conns->count >= cfg->max_connections)
        goto Refuse;
    if (cfg->max_connections_per_ip != 0) {
        struct sockaddr_storage ss;
        if (h2o_socket_getpeername(sock, (struct sockaddr *)&ss) != 0 && ss.ss_family == AF_INET)
            ip = ((struct sockaddr_in *)&ss)->sin_addr.s_addr;
        if (ip != 0 && ip_acquire(ip, cfg->max_connections_per_ip) != 0)
            goto Refuse;
    }
    ch_conn_t *c = calloc(1, sizeof(*c));
    if (c == NULL)
        abort();
    c->owner = conns;
    c->sock = sock;
    c->ip = ip;
    c->progress_us = ch_now_us();
    h2o_linklist_insert(&conns->open, &c->link);
    ++conns->count;
    sock->on_close.cb = on_conn_close;
    sock->on_close.data = c;
    return 0;
Refuse:
    ++conns->refused;
    return -1;
}

/*
 * Ends a connection h2o would keep: after shutdown(2) the kernel reports the socket readable (EOF) and
 * writable (EPIPE) at once, so h2o's own error path closes it, whether it was waiting to read or to write.
 */
static void conn_shut(ch_conn_t *c)
{
    if (!c->shut) {
        c->shut = 1;
        shutdown(h2o_socket_get_fd(c->sock), SHUT_RDWR);
    }
}

/* The request budget and the HTTP/2 deadlines reach into h2o 2.2.5's connection state (http2_internal.h). */
static ch_conn_t *h2_conn_record(h2o_http2_conn_t *conn)
{
    return conn->sock != NULL && conn->sock->on_close.cb == on_conn_close ? conn->sock->on_close.data : NULL;
}

static void h2_goaway(h2o_http2_conn_t *conn, uint32_t last_stream_id, const char *why)
{
    h2o_http2_encode_goaway_frame(&conn->_write.buf, last_stream_id, H2O_HTTP2_ERROR_NONE,
                                  h2o_iovec_init(why, strlen(why)));
    h2o_http2_conn_request_write(conn);
}

int ch_conns_on_req(h2o_handler_t *self, h2o_req_t *req)
{
    unsigned budget = ch_config()->max_requests_per_connection;
    if (req->version >= 0x200 && budget != 0) {
        h2o_http2_conn_t *conn = (h2o_http2_conn_t *)req->conn;
        uint32_t n = (H2O_STRUCT_FROM_MEMBER(h2o_http2_stream_t, req, req)->stream_id + 1) / 2;
        ch_conn_t *c = h2_conn_record(conn);
        if (n >= budget && c != NULL && conn->state == H2O_HTTP2_CONN_STATE_OPEN) {
            /*
             * Graceful first (RFC 9113 6.8): a GOAWAY naming the largest stream id tells the client to open no
             * more streams here, and those already on the wire are still served. A client still opening streams
             * after more than the concurrency h2o advertises got that GOAWAY and ignores it (Rapid Reset does):
             * the second GOAWAY names the last stream seen, and h2o ignores later frames and closes the
             * connection once the streams it runs are answered.
             */
            if (!c->goaway_sent) {
                c->goaway_sent = 1;
                h2_goaway(conn, INT32_MAX, "request budget spent");
            } else if (n > budget + H2O_HTTP2_SETTINGS_HOST.max_concurrent_streams) {
                h2_goaway(conn, conn->pull_stream_ids.max_open, "request budget spent");
                conn->state = H2O_HTTP2_CONN_STATE_HALF_CLOSED;
            }
        }
    }
    return ch_call_on_req(self, req);
}

/*
 * h2o 2.2.5 bounds the time to read an HTTP/1 request (http1.req_timeout) but not an HTTP/2 one: a stream whose
 * headers or body trickle in keeps its connection alive forever. Reset such streams: a stream reset in the middle
 * of its header block makes the next CONTINUATION a connection error, so that connection closes too.
 * h2o 2.2.5 leaves request_begin_at unset on HTTP/2 streams; the first sweep that sees a stream stamps it.
 */
static void h2_expire_requests(ch_thread_t *thread, const struct timeval *now, uint64_t timeout_ms)
{
    uint64_t now_ms = (uint64_t)now->tv_sec * 1000 + (uint64_t)now->tv_usec / 1000;
    for (h2o_linklist_t *node = thread->ctx.http2._conns.next; node != &thread->ctx.http2._conns; node = node->next) {
        h2o_http2_conn_t *conn = H2O_STRUCT_FROM_MEMBER(h2o_http2_conn_t, _conns, node);
        if (conn->state != H2O_HTTP2_CONN_STATE_OPEN || conn->num_streams.pull.open == 0)
            continue;
        h2o_http2_stream_t *stream, *late[16];
        size_t nlate = 0;
        kh_foreach_value(conn->streams, stream, {
            struct timeval *begin = &stream->req.timestamps.request_begin_at;
            if (stream->state != H2O_HTTP2_STREAM_STATE_RECV_HEADERS &&
                stream->state != H2O_HTTP2_STREAM_STATE_RECV_BODY)
                continue;
            if (begin->tv_sec == 0)
                *begin = *now;
            else if ((uint64_t)begin->tv_sec * 1000 + (uint64_t)begin->tv_usec / 1000 + timeout_ms <= now_ms &&
                     nlate < sizeof(late) / sizeof(late[0]))
                late[nlate++] = stream;
        });
        for (size_t i = 0; i < nlate; ++i) {
            h2o_http2_encode_rst_stream_frame(&conn->_write.buf, late[i]->stream_id, -H2O_HTTP2_ERROR_CANCEL);
            h2o_http2_stream_reset(conn, late[i]);
        }
        if (nlate != 0) {
            h2o_http2_conn_request_write(conn);
            ((ch_conns_t *)thread->conns)->expired += (unsigned)nlate;
        }
    }
}

void ch_conns_sweep(ch_thread_t *thread, uint64_t now_us)
{
    ch_conns_t *conns = thread->conns;
    if (now_us - conns->swept_us < 1000000)
        return;
    conns->swept_us = now_us;
    const ch_config_t *cfg = ch_config();
    /* a connection with streams or a response in flight escapes h2o's idle timeouts; no byte moving either way
     * for idle_timeout_ms means a peer that stopped reading (or never reads) while we wait to write */
    uint64_t stall_us = (uint64_t)cfg->idle_timeout_ms * 1000;
    for (h2o_linklist_t *node = conns->open.next; node != &conns->open; node = node->next) {
        ch_conn_t *c = H2O_STRUCT_FROM_MEMBER(ch_conn_t, link, node);
        if (c->sock->bytes_read != c->seen_read || c->sock->bytes_written != c->seen_written) {
            c->seen_read = c->sock->bytes_read;
            c->seen_written = c->sock->bytes_written;
            c->progress_us = now_us;
        } else if (now_us - c->progress_us >= stall_us && !c->shut) {
            conn_shut(c);
            ++conns->stalled;
        }
    }
    struct timeval now;
    gettimeofday(&now, NULL);
    h2_expire_requests(thread, &now, cfg->request_timeout_ms);
    if (conns->refused + conns->stalled + conns->expired != 0) {
        ch_log(CH_LOG_WARN, "conn_limits",
               "thread %u: %u connections refused (open %u, cap %u per thread, %u per address), %u stalled shut, "
               "%u slow HTTP/2 requests reset",
               thread->index, conns->refused, conns->count, cfg->max_connections, cfg->max_connections_per_ip,
               conns->stalled, conns->expired);
        conns->refused = conns->stalled = conns->expired = 0;
    }
}
