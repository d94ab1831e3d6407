/* The gateway's internal interfaces: configuration, router, threads, logging and metrics. */
#ifndef CITYHALL_GATEWAY_H
#define CITYHALL_GATEWAY_H

#include <stddef.h>
#include <stdint.h>
#include <h2o.h>
#include "cityhall/module.h"
#include "cityhall/config.h"

/* ---- configuration (config.c): ch_config_t itself is in cityhall/config.h ---- */

void ch_config_defaults(ch_config_t *cfg);
/** Sets one key ("http_port", ...); fills `err` and returns CH_EINVAL for an unknown key or bad value. */
int ch_config_set(ch_config_t *cfg, const char *key, const char *value, char *err, size_t errlen);
/** Reads `key = value` lines from `path` (NULL: none), then CITYHALL_<KEY> environment overrides. */
int ch_config_load(ch_config_t *cfg, const char *path, char *err, size_t errlen);

/* ---- router (router.c) ---- */

#define CH_MAX_PARAMS 8

typedef struct ch_match {
    const ch_route_t *route;
    unsigned route_index;      /* dense index over every registered route, for metrics */
    size_t nparams;
    const char *param_names[CH_MAX_PARAMS];
    h2o_iovec_t param_values[CH_MAX_PARAMS];
} ch_match_t;

enum { CH_MATCH_FOUND = 0, CH_MATCH_NO_PATH = 1, CH_MATCH_NO_METHOD = 2 };

typedef struct ch_router ch_router_t;
ch_router_t *ch_router_new(void);
void ch_router_free(ch_router_t *router);
/** Adds a route; a malformed pattern or a second route with the same method and shape is refused. */
int ch_router_add(ch_router_t *router, const ch_route_t *route, char *err, size_t errlen);
/**
 * Matches `path` (without query string). On CH_MATCH_NO_METHOD, `allow` receives the methods the path
 * does accept, comma-separated.
 */
int ch_router_match(const ch_router_t *router, const char *method, size_t method_len, const char *path, size_t path_len,
                    ch_match_t *match, char *allow, size_t allow_len);
unsigned ch_router_count(const ch_router_t *router);
const ch_route_t *ch_router_route(const ch_router_t *router, unsigned index);

/* ---- logging (log.c): JSON lines on stderr, never personal data ---- */

/** Appends `s` JSON-escaped (without quotes) to `dst`; returns the bytes written (truncates at cap). */
size_t ch_json_escape(char *dst, size_t cap, const char *s, size_t len);

/* ---- metrics (metrics.c): per-thread counters summed at scrape time ---- */

typedef struct ch_metrics ch_metrics_t;
ch_metrics_t *ch_metrics_new(unsigned nroutes);
void ch_metrics_observe(ch_metrics_t *m, unsigned route_index, int status, uint64_t duration_us);
void ch_metrics_gauges(ch_metrics_t *m, const ch_pg_stats_t *pg, const ch_redis_stats_t *redis, unsigned active_calls);
/** Renders the Prometheus text of every thread's metrics. */
void ch_metrics_render(ch_metrics_t *const *threads, unsigned nthreads, const ch_router_t *router, h2o_mem_pool_t *pool,
                       h2o_iovec_t *out);

/* ---- threads and the server (server.c) ---- */

typedef struct ch_thread {
    h2o_context_t ctx; /* first: the request's conn->ctx leads back here */
    unsigned index;
    h2o_evloop_t *loop;
    ch_pg_pool_t *pg;
    ch_redis_t *redis;
    ch_metrics_t *metrics;
    unsigned active_calls;
    uint64_t rng;
    char *logbuf;
    size_t loglen;
    void *auth;         /* auth.c's per-thread state (verified-token cache) */
    void *work;         /* work.c's per-thread completion queue */
    void *conns;        /* conns.c's per-thread connection table */
} ch_thread_t;

typedef struct ch_server {
    ch_config_t config;
    ch_router_t *router;
    unsigned nthreads;
    ch_thread_t **threads;
} ch_server_t;

extern ch_server_t ch_server;

/** Appends a complete log line to the thread's buffer (flushed by size and every 100 ms). */
void ch_server_log_append(ch_thread_t *thread, const char *line, size_t len);

/** Runs the server until SIGTERM/SIGINT; returns the process exit status. */
int ch_server_run(const ch_config_t *config);

/* ---- connection limits (conns.c) ---- */

typedef struct ch_conns ch_conns_t;
/** Sizes the per-address table (before threads start). */
void ch_conns_init(const ch_config_t *config);
ch_conns_t *ch_conns_new(void);
/** Tracks an accepted socket; -1 when a connection cap refuses it (the caller closes it). */
int ch_conns_admit(ch_thread_t *thread, h2o_socket_t *sock);
/** The h2o handler entry: spends the HTTP/2 request budget, then ch_call_on_req. */
int ch_conns_on_req(h2o_handler_t *self, h2o_req_t *req);
/** Once a second: shuts stalled connections, resets slow HTTP/2 requests, logs what the caps refused. */
void ch_conns_sweep(ch_thread_t *thread, uint64_t now_us);

/* ---- authentication (auth.c) ---- */

/** Loads the data keys and the access-token keyring, and the revoked sessions (blocking: before threads). */
int ch_auth_init(const ch_config_t *config, char *err, size_t errlen);
/** Per-thread state and the Redis subscription to revocations; called on the thread's loop before serving. */
void ch_auth_thread_init(ch_thread_t *thread);
/** Verifies a bearer token; fills `principal` (strings from `pool`). Returns 0, or CH_EINVAL for any refusal. */
int ch_auth_verify(ch_thread_t *thread, const char *token, size_t len, h2o_mem_pool_t *pool, ch_principal_t *principal);

/* ---- worker threads for CPU-heavy steps (work.c) ---- */

int ch_work_init(unsigned nworkers, unsigned queue_max);
void ch_work_thread_init(ch_thread_t *thread);
/** Queues `work(arg)` on a worker, then `done(arg)` on `thread`'s loop. CH_EFULL when the queue is full. */
int ch_work_submit(ch_thread_t *thread, void (*work)(void *), void (*done)(void *), void *arg);

/* ---- the request pipeline (call.c) ---- */

/** The h2o handler entry: routes, authenticates, decodes, calls the module handler. */
int ch_call_on_req(h2o_handler_t *self, h2o_req_t *req);

/**
 * The name of the first message type in `msg` (nested messages included) that carries fields the contract does
 * not know, or NULL: such protobuf bodies are refused, as the JSON path refuses unknown keys.
 */
const char *ch_pb_unknown_field(const ProtobufCMessage *msg);

/** Statements the pipeline itself prepares (idempotency keys). */
extern const ch_pg_stmt_t *const ch_call_stmts[];

/* ---- modules (modules.c) ---- */

extern const ch_module_t *const ch_modules[];
extern const size_t ch_nmodules;

/* ---- migrations (migrate.c): off the loop, blocking libpq is fine there ---- */

int ch_migrate(const ch_config_t *config, const char *dir);

#endif
