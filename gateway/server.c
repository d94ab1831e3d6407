/* The server: one h2o event loop per thread, each with its own SO_REUSEPORT listeners and data connections. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include "gateway.h"

ch_server_t ch_server;

const ch_config_t *ch_config(void)
{
    return &ch_server.config;
}

static h2o_globalconf_t globalconf;
/*
 * The TLS context new connections get. SIGHUP replaces it (tls_reload) under tls_lock and bumps tls_generation;
 * each loop then moves its TLS listeners to the new one (tls_adopt). A replaced context is never freed: h2o 2.2.5
 * keeps a bare pointer to it in each accepted connection and calls SSL_new only when the client's first bytes
 * arrive, which may be any time later. Reloads are rare and a context without a session cache is small.
 */
static SSL_CTX *ssl_ctx;
static pthread_mutex_t tls_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_uint tls_generation;
static volatile sig_atomic_t shutdown_requested;

#define LOGBUF_CAP 65536

typedef struct ch_listener {
    int fd;
    h2o_accept_ctx_t accept_ctx;
    h2o_socket_t *sock;
} ch_listener_t;

typedef struct ch_thread_start {
    ch_thread_t *thread;
    ch_listener_t listeners[2];
    size_t nlisteners;
    pthread_t tid;
} ch_thread_start_t;

uint64_t ch_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void log_flush(ch_thread_t *thread)
{
    size_t off = 0;
    while (off < thread->loglen) {
        ssize_t w = write(2, thread->logbuf + off, thread->loglen - off);
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            break; /* a log sink that fails must not stop the service */
        }
        off += (size_t)w;
    }
    thread->loglen = 0;
}

void ch_server_log_append(ch_thread_t *thread, const char *line, size_t len)
{
    if (thread->loglen + len > LOGBUF_CAP)
        log_flush(thread);
    memcpy(thread->logbuf + thread->loglen, line, len);
    thread->loglen += len;
}

static int listener_open(const char *addr, int port, char *err, size_t errlen)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &sin.sin_addr) != 1) {
        snprintf(err, errlen, "listen address %s is not an IPv4 address", addr);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), on = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof(on)) != 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on)) != 0 ||
        bind(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0 || listen(fd, 4096) != 0) {
        snprintf(err, errlen, "could not listen on %s:%d: %s", addr, port, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

static void on_accept(h2o_socket_t *listener, const char *err)
{
    if (err != NULL)
        return;
    ch_listener_t *l = listener->data;
    /* accept a bounded batch so one busy listener cannot starve the loop */
    for (int i = 0; i < 32; ++i) {
        h2o_socket_t *sock = h2o_evloop_socket_accept(listener);
        if (sock == NULL)
            break;
        if (ch_conns_admit((ch_thread_t *)l->accept_ctx.ctx, sock) != 0) {
            h2o_socket_close(sock);
            continue;
        }
        h2o_accept(&l->accept_ctx, sock);
    }
}

static void refresh_gauges(ch_thread_t *thread)
{
    ch_pg_stats_t pg;
    ch_redis_stats_t redis;
    ch_pg_pool_stats(thread->pg, &pg);
    ch_redis_stats(thread->redis, &redis);
    ch_metrics_gauges(thread->metrics, &pg, &redis, thread->active_calls);
}

/* Moves this loop's TLS listeners to the context SIGHUP loaded; connections already open keep theirs. */
static void tls_adopt(ch_thread_start_t *start, unsigned *seen)
{
    pthread_mutex_lock(&tls_lock);
    *seen = atomic_load(&tls_generation);
    for (size_t i = 0; i < start->nlisteners; ++i) {
        h2o_accept_ctx_t *a = &start->listeners[i].accept_ctx;
        if (a->ssl_ctx != NULL)
            a->ssl_ctx = ssl_ctx;
    }
    pthread_mutex_unlock(&tls_lock);
}

static void *thread_main(void *arg)
{
    ch_thread_start_t *start = arg;
    ch_thread_t *thread = start->thread;
    const ch_config_t *cfg = &ch_server.config;

    ch_work_thread_init(thread);
    ch_auth_thread_init(thread);
    for (size_t i = 0; i < start->nlisteners; ++i) {
        ch_listener_t *l = &start->listeners[i];
        l->accept_ctx.ctx = &thread->ctx;
        l->accept_ctx.hosts = globalconf.hosts;
        l->sock = h2o_evloop_socket_create(thread->loop, l->fd, H2O_SOCKET_FLAG_DONT_READ);
        l->sock->data = l;
        h2o_socket_read_start(l->sock, on_accept);
    }

    uint64_t last_tick = 0, shutdown_at = 0;
    unsigned tls_seen = atomic_load(&tls_generation);
    for (;;) {
        h2o_evloop_run(thread->loop, 100);
        uint64_t now = ch_now_us();
        if (now - last_tick >= 100000) {
            last_tick = now;
            log_flush(thread);
            refresh_gauges(thread);
            if (atomic_load(&tls_generation) != tls_seen)
                tls_adopt(start, &tls_seen);
        }
        ch_conns_sweep(thread, now);
        if (shutdown_requested && shutdown_at == 0) {
            /* stop accepting, tell HTTP/2 clients (GOAWAY), let in-flight requests finish */
            shutdown_at = now;
            for (size_t i = 0; i < start->nlisteners; ++i)
                h2o_socket_close(start->listeners[i].sock);
            h2o_context_request_shutdown(&thread->ctx);
        }
        if (shutdown_at != 0) {
            int drained = thread->active_calls == 0 && h2o_linklist_is_empty(&thread->ctx.http2._conns);
            if (drained || now - shutdown_at >= (uint64_t)cfg->shutdown_timeout_ms * 1000) {
                if (!drained)
                    ch_log(CH_LOG_WARN, "shutdown_timeout", "thread %u: %u requests still in flight at the deadline",
                           thread->index, thread->active_calls);
                break;
            }
        }
    }
    log_flush(thread);
    /*
     * The context is not disposed: h2o 2.2.5 asserts when a context is disposed soon after a shutdown
     * request, and the process exits right after the threads return.
     */
    return NULL;
}

/*
 * Reads the TLS private key from the file it checked, refusing one that group or others may access, as the signing
 * keys are refused (a symbolic link is followed: certificate tools keep keys behind them). An encrypted key is
 * refused rather than prompting for a passphrase.
 */
static EVP_PKEY *tls_key_load(const char *path, char *err, size_t errlen)
{
    FILE *fp = fopen(path, "re");
    if (fp == NULL) {
        snprintf(err, errlen, "could not open TLS key %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    EVP_PKEY *key = NULL;
    if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode))
        snprintf(err, errlen, "TLS key %s is not a regular file", path);
    else if ((st.st_mode & 077) != 0)
        snprintf(err, errlen, "TLS key file %s is readable by group or others (mode %03o): chmod 600 it", path,
                 (unsigned)(st.st_mode & 0777));
    else if ((key = PEM_read_PrivateKey(fp, NULL, NULL, (void *)"")) == NULL)
        snprintf(err, errlen, "could not read TLS key %s", path);
    fclose(fp);
    return key;
}

static SSL_CTX *tls_context_new(const ch_config_t *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20");
    /* resumption by tickets only, so that a context replaced on SIGHUP holds no sessions while it is kept */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert) != 1) {
        snprintf(err, errlen, "could not load TLS certificate %s", cfg->tls_cert);
        SSL_CTX_free(ctx);
        return NULL;
    }
    EVP_PKEY *key = tls_key_load(cfg->tls_key, err, errlen);
    int key_ok = key != NULL && SSL_CTX_use_PrivateKey(ctx, key) == 1 && SSL_CTX_check_private_key(ctx) == 1;
    if (key != NULL && !key_ok)
        snprintf(err, errlen, "TLS key %s does not match the certificate %s", cfg->tls_key, cfg->tls_cert);
    EVP_PKEY_free(key);
    if (!key_ok) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    h2o_ssl_register_alpn_protocols(ctx, h2o_http2_alpn_protocols);
    return ctx;
}

int ch_stmts_concat(const ch_pg_stmt_t **out, size_t cap, const ch_pg_stmt_t *const *const *lists, size_t nlists)
{
    size_t n = 0;
    for (size_t i = 0; i < nlists; ++i) {
        for (const ch_pg_stmt_t *const *s = lists[i]; *s != NULL; ++s) {
            if (n + 1 >= cap) {
                ch_log(CH_LOG_ERROR, "startup_failed", "more than %zu prepared statements in one module", cap - 1);
                return -1;
            }
            out[n++] = *s;
        }
    }
    out[n] = NULL;
    return 0;
}

static int routes_register(char *err, size_t errlen)
{
    for (size_t m = 0; m < ch_nmodules; ++m) {
        if (ch_modules[m]->init != NULL && ch_modules[m]->init(&ch_server.config) != 0) {
            snprintf(err, errlen, "module %s failed to start", ch_modules[m]->name);
            return -1;
        }
    }
    ch_server.router = ch_router_new();
    for (const ch_pg_stmt_t *const *s = ch_call_stmts; *s != NULL; ++s)
        ch_pg_register(*s);
    for (size_t m = 0; m < ch_nmodules; ++m) {
        const ch_module_t *mod = ch_modules[m];
        for (size_t i = 0; i < mod->nroutes; ++i)
            if (ch_router_add(ch_server.router, &mod->routes[i], err, errlen) != 0)
                return -1;
        for (const ch_pg_stmt_t *const *s = mod->stmts; s != NULL && *s != NULL; ++s)
            ch_pg_register(*s);
    }
    return 0;
}

/*
 * SIGHUP: loads the certificate and key files again. The loops move their listeners to the new context within
 * ~100 ms; connections already open and their requests are not touched. A file that does not load is logged and
 * the running context stays.
 */
static void tls_reload(const ch_config_t *cfg)
{
    char err[1100];
    if (ssl_ctx == NULL) {
        ch_log(CH_LOG_INFO, "tls_reload", "no TLS listener: nothing to reload");
        return;
    }
    SSL_CTX *ctx = tls_context_new(cfg, err, sizeof(err));
    if (ctx == NULL) {
        ch_log(CH_LOG_ERROR, "tls_reload_failed", "%s; the previous certificate stays in use", err);
        ERR_clear_error();
        return;
    }
    pthread_mutex_lock(&tls_lock);
    ssl_ctx = ctx;
    atomic_fetch_add(&tls_generation, 1);
    pthread_mutex_unlock(&tls_lock);
    ch_log(CH_LOG_INFO, "tls_reload", "loaded %s and %s", cfg->tls_cert, cfg->tls_key);
}

/*
 * Start-up failed after background threads (auth resync, module workers) may have started: leave at once
 * with status 2, without exit()'s destructors racing those threads inside libpq.
 */
static _Noreturn void startup_failed(const char *why)
{
    ch_log(CH_LOG_ERROR, "startup_failed", "%s", why);
    _exit(2);
}

int ch_server_run(const ch_config_t *config)
{
    char err[1100];
    ch_server.config = *config;
    /*
     * Signals go to the main thread only, blocked before any thread exists (module and auth start-up start
     * threads of their own), so that every thread inherits the mask; the loops poll the flag every 100 ms.
     */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    const ch_config_t *cfg = &ch_server.config;

    /* keys first: a bad key file is refused before any module starts a thread of its own */
    if (ch_auth_init(cfg, err, sizeof(err)) != 0 || ch_work_init(cfg->workers, 1024) != 0)
        startup_failed(err);
    if (routes_register(err, sizeof(err)) != 0)
        startup_failed(err);
    if (cfg->https_port != 0 && (ssl_ctx = tls_context_new(cfg, err, sizeof(err))) == NULL) {
        startup_failed(err);
    }

    h2o_config_init(&globalconf);
    globalconf.server_name = h2o_iovec_init(H2O_STRLIT("cityhall"));
    /*
     * h2o 2.2.5 buffers whole bodies and answers HTTP/2 bodies over its own limit with REFUSED_STREAM,
     * which clients retry. Keep its limit far above ours so clients see our 413; only bodies over this
     * ceiling (16 MiB or 8 x ours) still meet h2o's reset, and the edge (HAProxy) caps bodies before that.
     */
    globalconf.max_request_entity_size = cfg->max_body_bytes * 8 > (16u << 20) ? cfg->max_body_bytes * 8 : (16u << 20);
    globalconf.http2.idle_timeout = cfg->idle_timeout_ms;
    globalconf.http2.max_concurrent_requests_per_connection = cfg->http2_max_concurrent;
    globalconf.http1.req_timeout = cfg->request_timeout_ms;
    h2o_hostconf_t *host = h2o_config_register_host(&globalconf, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    h2o_pathconf_t *path = h2o_config_register_path(host, "/", 0);
    h2o_handler_t *handler = h2o_create_handler(path, sizeof(*handler));
    handler->on_req = ch_conns_on_req;

    /* Open every listener before any thread starts, so a taken port fails start-up with a clear message. */
    ch_server.nthreads = cfg->threads;
    ch_conns_init(cfg);
    ch_server.threads = calloc(cfg->threads, sizeof(*ch_server.threads));
    ch_thread_start_t *starts = calloc(cfg->threads, sizeof(*starts));
    if (ch_server.threads == NULL || starts == NULL)
        abort();
    for (unsigned i = 0; i < cfg->threads; ++i) {
        int ports[2] = {cfg->https_port, cfg->http_port};
        for (int k = 0; k < 2; ++k) {
            if (ports[k] == 0)
                continue;
            int fd = listener_open(k == 0 ? cfg->listen : cfg->http_listen, ports[k], err, sizeof(err));
            if (fd < 0) {
                startup_failed(err);
            }
            ch_listener_t *l = &starts[i].listeners[starts[i].nlisteners++];
            l->fd = fd;
            l->accept_ctx.ssl_ctx = k == 0 ? ssl_ctx : NULL;
        }
    }

    ch_pg_config_t pgcfg = {cfg->pg_conninfo, cfg->pg_conns, cfg->pg_queue_max, cfg->pg_timeout_ms,
                            cfg->pg_timeout_ms < 5000 ? cfg->pg_timeout_ms : 5000};
    ch_redis_config_t rcfg = {cfg->redis_host, cfg->redis_port, NULL, NULL, cfg->redis_timeout_ms, cfg->redis_queue_max};
    for (unsigned i = 0; i < cfg->threads; ++i) {
        ch_thread_t *t = calloc(1, sizeof(*t));
        if (t == NULL || (t->logbuf = malloc(LOGBUF_CAP)) == NULL)
            abort();
        t->index = i;
        t->loop = h2o_evloop_create();
        h2o_context_init(&t->ctx, t->loop, &globalconf);
        t->pg = ch_pg_pool_new(t->loop, &pgcfg);
        t->redis = ch_redis_new(t->loop, &rcfg);
        if (t->pg == NULL || t->redis == NULL) {
            startup_failed(t->pg == NULL ? "pg_conninfo does not parse" : "redis_host must be an IP address");
        }
        t->metrics = ch_metrics_new(ch_router_count(ch_server.router));
        t->conns = ch_conns_new();
        if (getrandom(&t->rng, sizeof(t->rng), 0) != sizeof(t->rng) || t->rng == 0)
            t->rng = 0x9E3779B97F4A7C15ULL + i;
        ch_server.threads[i] = t;
        starts[i].thread = t;
    }


    for (unsigned i = 0; i < cfg->threads; ++i)
        if (pthread_create(&starts[i].tid, NULL, thread_main, &starts[i]) != 0)
            abort();
    ch_log(CH_LOG_INFO, "listening", "https://%s:%d http://%s:%d threads=%u", cfg->listen, cfg->https_port,
           cfg->http_listen, cfg->http_port, cfg->threads);

    int sig = 0;
    while (sigwait(&set, &sig) == 0 && sig == SIGHUP)
        tls_reload(cfg);
    ch_log(CH_LOG_INFO, "shutdown", "signal %d: finishing in-flight requests (at most %u ms)", sig,
           cfg->shutdown_timeout_ms);
    shutdown_requested = 1;
    for (unsigned i = 0; i < cfg->threads; ++i)
        pthread_join(starts[i].tid, NULL);
    ch_log(CH_LOG_INFO, "stopped", "all threads finished");
    return 0;
}
