/* A small blocking HTTP/1.1 client for the dispatch threads: POST with connect and response timeouts, keep-alive. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include "cityhall/pii.h"
#include "dispatch.h"

/*
 * Departments are reached by IP literal only: a host name would need a resolver with a timeout, and the
 * dispatch threads keep every outbound wait bounded. Sockets are non-blocking and every wait is a poll() with
 * what is left of the deadline, so a department that accepts and never answers costs at most response_ms.
 */

#define HEAD_MAX 16384 /* status line and headers */
#define BODY_MAX 65536 /* an acknowledgement is small: a longer answer counts as not HTTP */

int ot_url_parse(const char *url, ot_url_t *out, const char **why)
{
    memset(out, 0, sizeof(*out));
    if (strncmp(url, "http://", 7) != 0) {
        *why = "only http://IP:PORT/path URLs are supported";
        return CH_EINVAL;
    }
    const char *p = url + 7, *host_end;
    if (*p == '[') {
        host_end = strchr(p, ']');
        if (host_end == NULL) {
            *why = "unterminated IPv6 literal";
            return CH_EINVAL;
        }
        ++p;
        out->family = AF_INET6;
    } else {
        host_end = p + strcspn(p, ":/");
        out->family = AF_INET;
    }
    size_t hl = (size_t)(host_end - p);
    if (hl == 0 || hl >= sizeof(out->host)) {
        *why = "missing or overlong host";
        return CH_EINVAL;
    }
    memcpy(out->host, p, hl);
    unsigned char addr[16];
    if (inet_pton(out->family, out->host, addr) != 1) {
        *why = "the host must be an IP address (no DNS on the dispatch path)";
        return CH_EINVAL;
    }
    p = host_end + (out->family == AF_INET6 ? 1 : 0);
    out->port = 80;
    if (*p == ':') {
        char *end;
        long port = strtol(p + 1, &end, 10);
        if (end == p + 1 || port < 1 || port > 65535) {
            *why = "bad port";
            return CH_EINVAL;
        }
        out->port = (int)port;
        p = end;
    }
    if (*p == '\0')
        p = "/";
    if (*p != '/' || strlen(p) >= sizeof(out->path)) {
        *why = "bad path";
        return CH_EINVAL;
    }
    for (const char *q = p; *q != '\0'; ++q)
        if ((unsigned char)*q <= 0x20 || (unsigned char)*q >= 0x7f) {
            *why = "the path has spaces or control characters";
            return CH_EINVAL;
        }
    strcpy(out->path, p);
    return 0;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---- keep-alive connections kept between runs ---- */

void ot_http_pool_init(ot_http_pool_t *pool)
{
    for (size_t i = 0; i < OT_HTTP_POOL_MAX; ++i)
        pool->idle[i].fd = -1;
}

void ot_http_pool_clear(ot_http_pool_t *pool)
{
    for (size_t i = 0; i < OT_HTTP_POOL_MAX; ++i)
        if (pool->idle[i].fd >= 0) {
            close(pool->idle[i].fd);
            pool->idle[i].fd = -1;
        }
}

/* An idle connection to host:port, taken out of the pool, or -1. */
static int pool_take(ot_http_pool_t *pool, const ot_url_t *url)
{
    for (size_t i = 0; i < OT_HTTP_POOL_MAX; ++i) {
        ot_http_idle_t *c = &pool->idle[i];
        if (c->fd >= 0 && c->port == url->port && strcmp(c->host, url->host) == 0) {
            int fd = c->fd;
            c->fd = -1;
            return fd;
        }
    }
    return -1;
}

static void pool_put(ot_http_pool_t *pool, int fd, const ot_url_t *url)
{
    for (size_t i = 0; i < OT_HTTP_POOL_MAX; ++i) {
        ot_http_idle_t *c = &pool->idle[i];
        if (c->fd < 0) {
            c->fd = fd;
            snprintf(c->host, sizeof(c->host), "%s", url->host);
            c->port = url->port;
            return;
        }
    }
    close(fd); /* the pool is full */
}

/* ---- one answer, parsed from what has arrived so far ---- */

enum { PARSE_MORE = 0, PARSE_DONE = 1, PARSE_BAD = -1 };

/*
 * Parses the response at buf[0..len): PARSE_DONE with the status, whether the connection can be reused, and the
 * bytes it used; PARSE_MORE when it is not complete yet (`eof`: the peer closed, so a body delimited by the close
 * is complete); PARSE_BAD when it is not HTTP/1.x or is too large to keep reading.
 */
static int parse_response(const char *buf, size_t len, int eof, int *status, int *keep, size_t *used)
{
    size_t pos = 0;
    for (;;) { /* 1xx answers precede the real one */
        const char *end = memmem(buf + pos, len - pos, "\r\n\r\n", 4);
        if (end == NULL)
            return len - pos >= HEAD_MAX ? PARSE_BAD : PARSE_MORE;
        size_t head_end = (size_t)(end - buf) + 4;
        int minor = 0;
        if (sscanf(buf + pos, "HTTP/1.%d %3d", &minor, status) != 2 || *status < 100 || *status > 599)
            return PARSE_BAD;
        *keep = minor >= 1;
        long long clen = -1;
        int chunked = 0;
        const char *line = memchr(buf + pos, '\n', head_end - pos);
        while (line != NULL && (size_t)(line + 1 - buf) < head_end - 2) {
            line += 1;
            const char *eol = memchr(line, '\n', (size_t)(buf + head_end - line));
            size_t ll = eol != NULL ? (size_t)(eol - line) : 0;
            char h[512];
            if (ll > 0 && ll < sizeof(h)) {
                memcpy(h, line, ll);
                h[ll] = '\0';
                if (h[ll - 1] == '\r')
                    h[ll - 1] = '\0';
                char *colon = strchr(h, ':');
                if (colon != NULL) {
                    *colon = '\0';
                    char *v = colon + 1;
                    while (*v == ' ' || *v == '\t')
                        ++v;
                    if (strcasecmp(h, "content-length") == 0)
                        clen = strtoll(v, NULL, 10);
                    else if (strcasecmp(h, "transfer-encoding") == 0 && strcasestr(v, "chunked") != NULL)
                        chunked = 1;
                    else if (strcasecmp(h, "connection") == 0)
                        *keep = strcasestr(v, "close") == NULL && (minor >= 1 || strcasestr(v, "keep-alive") != NULL);
                }
            }
            line = eol;
        }
        if (*status < 200) {
            pos = head_end;
            continue;
        }
        if (*status == 204 || *status == 304) {
            *used = head_end;
            return PARSE_DONE;
        }
        if (chunked) {
            size_t p = head_end;
            for (;;) {
                const char *nl = memmem(buf + p, len - p, "\r\n", 2);
                if (nl == NULL)
                    return len - head_end >= BODY_MAX ? PARSE_BAD : PARSE_MORE;
                unsigned long n = strtoul(buf + p, NULL, 16);
                p = (size_t)(nl - buf) + 2;
                if (n == 0) { /* trailers, then an empty line */
                    for (;;) {
                        const char *tl = memmem(buf + p, len - p, "\r\n", 2);
                        if (tl == NULL)
                            return PARSE_MORE;
                        int empty = tl == buf + p;
                        p = (size_t)(tl - buf) + 2;
                        if (empty) {
                            *used = p;
                            return PARSE_DONE;
                        }
                    }
                }
                if (n > BODY_MAX || p + n + 2 > head_end + BODY_MAX)
                    return PARSE_BAD;
                if (p + n + 2 > len)
                    return PARSE_MORE;
                p += n + 2;
            }
        }
        if (clen >= 0) {
            if (clen > BODY_MAX)
                return PARSE_BAD;
            if (head_end + (size_t)clen > len)
                return PARSE_MORE;
            *used = head_end + (size_t)clen;
            return PARSE_DONE;
        }
        /* delimited by the close */
        *keep = 0;
        if (eof) {
            *used = len;
            return PARSE_DONE;
        }
        return len - head_end >= BODY_MAX ? PARSE_BAD : PARSE_MORE;
    }
}

/* ---- the run: several requests at once, each on its own connection ---- */

enum { S_FREE, S_CONNECTING, S_SENDING, S_RECEIVING };

typedef struct slot {
    int phase;
    int fd;
    size_t req; /* index into the run's requests */
    int reused; /* the connection came from the pool: a first failure may be a stale connection */
    char *out;  /* the request bytes */
    size_t out_len, out_off;
    char *in; /* the answer so far */
    size_t in_len;
    uint64_t deadline;
} slot_t;

static void slot_close(slot_t *s)
{
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    free(s->out);
    free(s->in);
    s->out = s->in = NULL;
    s->phase = S_FREE;
}

/* Starts request `i` in slot `s`: an idle connection, or a new non-blocking connect. 0, or CH_E* with why. */
static int slot_start(slot_t *s, ot_http_pool_t *pool, ot_http_req_t *r, size_t i, unsigned connect_ms,
                      unsigned response_ms, int fresh)
{
    memset(s, 0, sizeof(*s));
    s->fd = -1;
    s->req = i;
    char head[1024];
    int hl = snprintf(head, sizeof(head),
                      "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                      "User-Agent: cityhall-dispatch\r\n%s\r\n",
                      r->url->path, r->url->host, r->url->port, r->len, r->headers);
    if (hl < 0 || (size_t)hl >= sizeof(head)) {
        r->why = "request headers too long";
        return CH_EINVAL;
    }
    s->out_len = (size_t)hl + r->len;
    s->out = malloc(s->out_len);
    if (s->out == NULL)
        abort();
    memcpy(s->out, head, (size_t)hl);
    memcpy(s->out + hl, r->body, r->len);
    int fd = fresh ? -1 : pool_take(pool, r->url);
    if (fd >= 0) {
        s->fd = fd;
        s->reused = 1;
        s->phase = S_SENDING;
        s->deadline = now_ms() + response_ms;
        return 0;
    }
    struct sockaddr_storage ss;
    socklen_t sl;
    memset(&ss, 0, sizeof(ss));
    if (r->url->family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)r->url->port);
        inet_pton(AF_INET6, r->url->host, &a->sin6_addr);
        sl = sizeof(*a);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)r->url->port);
        inet_pton(AF_INET, r->url->host, &a->sin_addr);
        sl = sizeof(*a);
    }
    fd = socket(r->url->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        free(s->out);
        s->out = NULL;
        r->why = "no socket available";
        return CH_EUNAVAIL;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    s->fd = fd;
    if (connect(fd, (struct sockaddr *)&ss, sl) == 0) {
        s->phase = S_SENDING;
        s->deadline = now_ms() + response_ms;
    } else if (errno == EINPROGRESS) {
        s->phase = S_CONNECTING;
        s->deadline = now_ms() + connect_ms;
    } else {
        slot_close(s);
        r->why = "connection refused";
        return CH_EUNAVAIL;
    }
    return 0;
}

/* A connection failure or a timeout says the endpoint is unreachable: its requests not started yet are skipped. */
static int endpoint_down(const ot_url_t *down[], size_t ndown, const ot_url_t *u)
{
    for (size_t i = 0; i < ndown; ++i)
        if (down[i]->port == u->port && strcmp(down[i]->host, u->host) == 0)
            return 1;
    return 0;
}

void ot_http_run(ot_http_pool_t *pool, ot_http_req_t *reqs, size_t n, unsigned parallel, unsigned per_endpoint,
                 unsigned connect_ms, unsigned response_ms)
{
    if (parallel < 1)
        parallel = 1;
    if (parallel > OT_HTTP_PARALLEL_MAX)
        parallel = OT_HTTP_PARALLEL_MAX;
    slot_t slots[OT_HTTP_PARALLEL_MAX];
    struct pollfd pfds[OT_HTTP_PARALLEL_MAX];
    int slot_of[OT_HTTP_PARALLEL_MAX];
    const ot_url_t **down = calloc(n > 0 ? n : 1, sizeof(*down));
    char *retried = calloc(n > 0 ? n : 1, 1);
    if (down == NULL || retried == NULL)
        abort();
    size_t ndown = 0, next = 0, done = 0;
    for (unsigned k = 0; k < parallel; ++k) {
        slots[k].phase = S_FREE;
        slots[k].fd = -1;
        slots[k].out = slots[k].in = NULL;
    }
    for (size_t i = 0; i < n; ++i) {
        reqs[i].status = 0;
        reqs[i].why = NULL;
    }

    /* finishes the slot's request with an HTTP status or a CH_E* (and then its endpoint counts as unreachable) */
#define FINISH(s, code, reason)                                                                                        \
    do {                                                                                                               \
        ot_http_req_t *r_ = &reqs[(s)->req];                                                                           \
        r_->status = (code);                                                                                           \
        if ((reason) != NULL)                                                                                          \
            r_->why = (reason);                                                                                        \
        if ((code) == CH_EUNAVAIL || (code) == CH_ETIMEDOUT)                                                           \
            down[ndown++] = r_->url;                                                                                   \
        slot_close(s);                                                                                                 \
        ++done;                                                                                                        \
    } while (0)

    /* the same request again, in the same slot, on a new connection (the department dedups by its key) */
#define RETRY(s)                                                                                                       \
    do {                                                                                                               \
        size_t i_ = (s)->req;                                                                                          \
        retried[i_] = 1;                                                                                               \
        slot_close(s);                                                                                                 \
        if (slot_start((s), pool, &reqs[i_], i_, connect_ms, response_ms, 1) != 0) {                                   \
            reqs[i_].status = CH_EUNAVAIL;                                                                             \
            down[ndown++] = reqs[i_].url;                                                                              \
            ++done;                                                                                                    \
        }                                                                                                              \
    } while (0)

    while (done < n) {
        /* start what fits: the next requests in order, skipping endpoints already at their share */
        for (unsigned k = 0; k < parallel && next < n; ++k) {
            if (slots[k].phase != S_FREE)
                continue;
            size_t pick = n;
            for (size_t i = next; i < n && pick == n; ++i) {
                if (reqs[i].status != 0 || reqs[i].why != NULL)
                    continue;
                unsigned busy = 0;
                for (unsigned j = 0; j < parallel; ++j)
                    busy += slots[j].phase != S_FREE && reqs[slots[j].req].url->port == reqs[i].url->port &&
                            strcmp(reqs[slots[j].req].url->host, reqs[i].url->host) == 0;
                int started = 0;
                for (unsigned j = 0; j < parallel; ++j)
                    started |= slots[j].phase != S_FREE && slots[j].req == i;
                if (!started && busy < per_endpoint)
                    pick = i;
            }
            if (pick == n)
                break;
            ot_http_req_t *r = &reqs[pick];
            if (endpoint_down(down, ndown, r->url)) {
                r->status = CH_ECLOSED;
                r->why = "not tried: the endpoint was unreachable a moment ago";
                ++done;
            } else if (slot_start(&slots[k], pool, r, pick, connect_ms, response_ms, retried[pick]) != 0) {
                r->status = CH_EUNAVAIL;
                down[ndown++] = r->url;
                ++done;
            }
            while (next < n && (reqs[next].status != 0 || reqs[next].why != NULL))
                ++next;
        }
        /* wait for the next event */
        nfds_t np = 0;
        uint64_t now = now_ms(), wake = now + 1000;
        for (unsigned k = 0; k < parallel; ++k) {
            slot_t *s = &slots[k];
            if (s->phase == S_FREE)
                continue;
            if (s->deadline <= now) {
                const char *why = s->phase == S_CONNECTING ? "connect timed out"
                                  : s->phase == S_SENDING  ? "the request could not be written in time"
                                                           : "no answer within the response timeout";
                FINISH(s, CH_ETIMEDOUT, why);
                continue;
            }
            if (s->deadline < wake)
                wake = s->deadline;
            pfds[np].fd = s->fd;
            pfds[np].events = s->phase == S_RECEIVING ? POLLIN : POLLOUT;
            pfds[np].revents = 0;
            slot_of[np++] = (int)k;
        }
        if (np == 0)
            continue;
        int pr = poll(pfds, np, (int)(wake - now));
        if (pr < 0 && errno != EINTR)
            break;
        for (nfds_t x = 0; pr > 0 && x < np; ++x) {
            if (pfds[x].revents == 0)
                continue;
            slot_t *s = &slots[slot_of[x]];
            ot_http_req_t *r = &reqs[s->req];
            if (s->phase == S_CONNECTING) {
                int soerr = 0;
                socklen_t el = sizeof(soerr);
                if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &soerr, &el) != 0 || soerr != 0) {
                    FINISH(s, CH_EUNAVAIL, "connection refused");
                    continue;
                }
                s->phase = S_SENDING;
                s->deadline = now_ms() + response_ms;
            }
            if (s->phase == S_SENDING) {
                ssize_t w = send(s->fd, s->out + s->out_off, s->out_len - s->out_off, MSG_NOSIGNAL);
                if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                    continue;
                if (w < 0) {
                    if (s->reused && !retried[s->req]) /* the pooled connection had been closed: once more */
                        RETRY(s);
                    else
                        FINISH(s, CH_EUNAVAIL, "the connection broke");
                    continue;
                }
                s->out_off += (size_t)w;
                if (s->out_off == s->out_len)
                    s->phase = S_RECEIVING;
                continue;
            }
            /* receiving */
            char buf[16384];
            ssize_t got = recv(s->fd, buf, sizeof(buf), 0);
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                continue;
            int eof = got <= 0;
            if (got > 0) {
                char *in = realloc(s->in, s->in_len + (size_t)got);
                if (in == NULL)
                    abort();
                s->in = in;
                memcpy(s->in + s->in_len, buf, (size_t)got);
                s->in_len += (size_t)got;
            }
            int status = 0, keep = 0;
            size_t used = 0;
            int pr2 = s->in_len > 0 ? parse_response(s->in, s->in_len, eof, &status, &keep, &used) : PARSE_MORE;
            if (pr2 == PARSE_DONE) {
                if (keep && !eof && used == s->in_len) {
                    pool_put(pool, s->fd, r->url);
                    s->fd = -1;
                }
                FINISH(s, status, NULL);
            } else if (pr2 == PARSE_BAD) {
                FINISH(s, CH_EINVAL, "not an HTTP/1.x answer, or too large");
            } else if (eof) {
                if (s->in_len == 0 && s->reused && !retried[s->req])
                    RETRY(s); /* closed by the peer while it was idle: once more on a fresh connection */
                else
                    FINISH(s, CH_EUNAVAIL, "the connection broke");
            }
        }
    }
#undef FINISH
#undef RETRY
    for (unsigned k = 0; k < parallel; ++k)
        if (slots[k].phase != S_FREE)
            slot_close(&slots[k]);
    free(down);
    free(retried);
}

static EVP_MAC *hmac_alg;
static pthread_once_t hmac_once = PTHREAD_ONCE_INIT;

static void hmac_fetch(void)
{
    if ((hmac_alg = EVP_MAC_fetch(NULL, "HMAC", NULL)) == NULL)
        abort();
}

void ot_sign_body(const char *secret, size_t secret_len, int64_t t, const void *body, size_t len, char out[65])
{
    pthread_once(&hmac_once, hmac_fetch);
    char prefix[32];
    int pl = snprintf(prefix, sizeof(prefix), "%lld.", (long long)t);
    unsigned char mac[32];
    size_t ml = 0;
    /* HMAC over "<t>." || body, without copying the body */
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(hmac_alg);
    OSSL_PARAM params[2] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
                            OSSL_PARAM_construct_end()};
    if (ctx == NULL || EVP_MAC_init(ctx, (const unsigned char *)secret, secret_len, params) != 1 ||
        EVP_MAC_update(ctx, (const unsigned char *)prefix, (size_t)pl) != 1 || EVP_MAC_update(ctx, body, len) != 1 ||
        EVP_MAC_final(ctx, mac, &ml, sizeof(mac)) != 1 || ml != 32)
        abort();
    EVP_MAC_CTX_free(ctx);
    ch_hex(mac, ml, out);
}

int ot_signature_check(const char *secret, size_t secret_len, long long t, const char v1[65], const void *body,
                       size_t len)
{
    char mac[65];
    ot_sign_body(secret, secret_len, t, body, len, mac);
    return CRYPTO_memcmp(mac, v1, 64) == 0 ? 0 : -1;
}
