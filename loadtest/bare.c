/* The load-test reference server: a bare libh2o handler, one event loop per thread, that the
 * gateway's throughput is measured against (see loadtest/README.md). */

#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "h2o.h"
#include "h2o/http1.h"
#include "h2o/http2.h"

#define BARE_MAX_THREADS 64

/* How long a loop sleeps at most before it looks at the stop flag again (ms). */
#define BARE_POLL_MS 100

/* At most this many connections are accepted per readiness event, so that a burst of connects
 * does not starve the requests already in flight on this loop. */
#define BARE_ACCEPT_BATCH 32

static const char bare_body[] = "{\"status\":\"ok\"}";

/* One per thread: the loop, its h2o context and its own SO_REUSEPORT listeners. */
struct bare_thread {
    pthread_t tid;
    h2o_context_t ctx;
    h2o_accept_ctx_t plain_accept; /* ssl_ctx NULL: HTTP/1.1 and h2c prior knowledge */
    h2o_accept_ctx_t tls_accept;   /* ALPN h2 and http/1.1 */
    int plain_fd;
    int tls_fd;
};

static h2o_globalconf_t bare_config;
static struct bare_thread bare_threads[BARE_MAX_THREADS];

/* Set once by the main thread on SIGTERM/SIGINT; each loop reads it between iterations. */
static atomic_int bare_stopping;

static int on_req(h2o_handler_t *self, h2o_req_t *req)
{
    req->res.status = 200;
    req->res.reason = "OK";
    h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, H2O_STRLIT("application/json"));
    req->res.content_length = sizeof(bare_body) - 1;
    h2o_send_inline(req, bare_body, sizeof(bare_body) - 1);
    return 0;
}

static void on_accept(h2o_socket_t *listener, const char *err)
{
    h2o_accept_ctx_t *accept_ctx = listener->data;
    h2o_socket_t *sock;
    int i;

    if (err != NULL)
        return;
    for (i = 0; i != BARE_ACCEPT_BATCH; ++i) {
        if ((sock = h2o_evloop_socket_accept(listener)) == NULL)
            break;
        h2o_accept(accept_ctx, sock);
    }
}

/* Opens a listening socket on 127.0.0.1:port that shares the port with the other threads'
 * sockets; the kernel spreads new connections over them. Returns the fd or -1 (errno set). */
static int listener_open(uint16_t port)
{
    struct sockaddr_in addr;
    int fd, on = 1;

    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);

    if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) == -1)
        return -1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof(on)) != 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on)) != 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(fd, SOMAXCONN) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

static void listener_start(h2o_loop_t *loop, int fd, h2o_accept_ctx_t *accept_ctx)
{
    h2o_socket_t *sock = h2o_evloop_socket_create(loop, fd, H2O_SOCKET_FLAG_DONT_READ);

    sock->data = accept_ctx;
    h2o_socket_read_start(sock, on_accept);
}

static void *thread_main(void *arg)
{
    struct bare_thread *t = arg;

    h2o_context_init(&t->ctx, h2o_evloop_create(), &bare_config);
    t->plain_accept.ctx = &t->ctx;
    t->plain_accept.hosts = bare_config.hosts;
    listener_start(t->ctx.loop, t->plain_fd, &t->plain_accept);
    if (t->tls_fd != -1) {
        t->tls_accept.ctx = &t->ctx;
        t->tls_accept.hosts = bare_config.hosts;
        listener_start(t->ctx.loop, t->tls_fd, &t->tls_accept);
    }

    while (!atomic_load_explicit(&bare_stopping, memory_order_relaxed))
        h2o_evloop_run(t->ctx.loop, BARE_POLL_MS);

    /* The context is deliberately not disposed: h2o 2.2.5 asserts when a context is disposed
     * with connections still open, and the process exits right after the threads are joined. */
    return NULL;
}

static SSL_CTX *tls_create(const char *cert_file, const char *key_file)
{
    SSL_CTX *ssl_ctx = SSL_CTX_new(TLS_server_method());

    SSL_CTX_set_min_proto_version(ssl_ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ssl_ctx, SSL_OP_NO_COMPRESSION);
    if (SSL_CTX_use_certificate_chain_file(ssl_ctx, cert_file) != 1) {
        fprintf(stderr, "bare: could not load certificate %s\n", cert_file);
        goto Error;
    }
    if (SSL_CTX_use_PrivateKey_file(ssl_ctx, key_file, SSL_FILETYPE_PEM) != 1) {
        fprintf(stderr, "bare: could not load private key %s\n", key_file);
        goto Error;
    }
    h2o_ssl_register_alpn_protocols(ssl_ctx, h2o_http2_alpn_protocols);
    return ssl_ctx;

Error:
    ERR_print_errors_fp(stderr);
    SSL_CTX_free(ssl_ctx);
    return NULL;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: bare -p PORT [-t THREADS] [-s TLS_PORT -c CERT_FILE -k KEY_FILE]\n"
                 "  Answers 200 {\"status\":\"ok\"} (application/json) to every request on 127.0.0.1.\n"
                 "  -p PORT      cleartext listener: HTTP/1.1 and h2c with prior knowledge\n"
                 "  -t THREADS   event loops, each with its own SO_REUSEPORT listener (default 2)\n"
                 "  -s TLS_PORT  TLS listener (ALPN h2, http/1.1); needs -c and -k\n"
                 "Prints \"ready\" on stdout once listening; stops on SIGTERM or SIGINT.\n");
}

static int port_parse(const char *s, uint16_t *port)
{
    char *end;
    long v = strtol(s, &end, 10);

    if (*s == '\0' || *end != '\0' || v < 1 || v > 65535)
        return -1;
    *port = (uint16_t)v;
    return 0;
}

int main(int argc, char **argv)
{
    uint16_t port = 0, tls_port = 0;
    long nthreads = 2;
    const char *cert_file = NULL, *key_file = NULL;
    SSL_CTX *ssl_ctx = NULL;
    h2o_hostconf_t *hostconf;
    h2o_pathconf_t *pathconf;
    h2o_handler_t *handler;
    sigset_t stop_signals;
    int opt, sig;
    long i;

    while ((opt = getopt(argc, argv, "p:t:s:c:k:h")) != -1) {
        switch (opt) {
        case 'p':
            if (port_parse(optarg, &port) != 0)
                goto Usage;
            break;
        case 't':
            nthreads = strtol(optarg, NULL, 10);
            if (nthreads < 1 || nthreads > BARE_MAX_THREADS)
                goto Usage;
            break;
        case 's':
            if (port_parse(optarg, &tls_port) != 0)
                goto Usage;
            break;
        case 'c':
            cert_file = optarg;
            break;
        case 'k':
            key_file = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            goto Usage;
        }
    }
    if (optind != argc || port == 0 || (tls_port != 0) != (cert_file != NULL && key_file != NULL))
        goto Usage;

    signal(SIGPIPE, SIG_IGN);
    /* Block the stop signals before any thread starts so that only sigwait() below sees them. */
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    if (tls_port != 0 && (ssl_ctx = tls_create(cert_file, key_file)) == NULL)
        return 1;

    h2o_config_init(&bare_config);
    hostconf = h2o_config_register_host(&bare_config, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    pathconf = h2o_config_register_path(hostconf, "/", 0);
    handler = h2o_create_handler(pathconf, sizeof(*handler));
    handler->on_req = on_req;

    /* Bind every listener before starting any thread so that a taken port fails fast and
     * "ready" means that all loops accept. */
    for (i = 0; i != nthreads; ++i) {
        struct bare_thread *t = bare_threads + i;
        t->tls_fd = -1;
        if ((t->plain_fd = listener_open(port)) == -1) {
            fprintf(stderr, "bare: could not listen on 127.0.0.1:%u: %s\n", port, strerror(errno));
            return 1;
        }
        if (tls_port != 0) {
            if ((t->tls_fd = listener_open(tls_port)) == -1) {
                fprintf(stderr, "bare: could not listen on 127.0.0.1:%u: %s\n", tls_port, strerror(errno));
                return 1;
            }
            t->tls_accept.ssl_ctx = ssl_ctx;
        }
    }
    for (i = 0; i != nthreads; ++i) {
        int err = pthread_create(&bare_threads[i].tid, NULL, thread_main, bare_threads + i);
        if (err != 0) {
            fprintf(stderr, "bare: could not start thread: %s\n", strerror(err));
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);

    sigwait(&stop_signals, &sig);
    atomic_store(&bare_stopping, 1);
    for (i = 0; i != nthreads; ++i)
        pthread_join(bare_threads[i].tid, NULL);
    return 0;

Usage:
    usage(stderr);
    return 2;
}
