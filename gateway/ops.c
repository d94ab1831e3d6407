/* Operational routes owned by the gateway: liveness, readiness (PostgreSQL and Redis answer) and metrics. */
#include <string.h>
#include "gateway.h"

static const ch_pg_stmt_t stmt_ready = {"ch_ready", "SELECT 1", 0};

static void healthz(ch_call_t *call)
{
    ch_reply_raw(call, 200, "text/plain; charset=utf-8", H2O_STRLIT("ok\n"));
}

/* readyz fans out to both stores at once and answers when both have replied. */
typedef struct ch_ready {
    int pending;
    int pg_ok, redis_ok;
} ch_ready_t;

static void ready_finish(ch_call_t *call, ch_ready_t *r)
{
    if (--r->pending != 0)
        return;
    if (r->pg_ok && r->redis_ok)
        ch_reply_raw(call, 200, "text/plain; charset=utf-8", H2O_STRLIT("ready\n"));
    else
        ch_fail(call, CH_CODE_UNAVAILABLE, "not ready:%s%s", r->pg_ok ? "" : " postgresql", r->redis_ok ? "" : " redis");
}

static void on_ready_pg(ch_call_t *call, ch_pg_result_t *res)
{
    ch_ready_t *r = ch_call_data(call);
    r->pg_ok = res->err == 0;
    ready_finish(call, r);
}

static void on_ready_redis(ch_call_t *call, redisReply *reply, int err)
{
    ch_ready_t *r = ch_call_data(call);
    r->redis_ok = err == 0 && reply != NULL && reply->type == REDIS_REPLY_STATUS;
    ready_finish(call, r);
}

static void readyz(ch_call_t *call)
{
    ch_ready_t *r = ch_call_alloc(call, sizeof(*r));
    memset(r, 0, sizeof(*r));
    r->pending = 1; /* held until both are submitted, so an early reply cannot finish the call */
    ch_call_set_data(call, r);
    ch_pg_query_t q = {&stmt_ready, NULL, NULL};
    if (ch_call_pg_read(call, &q, 1, on_ready_pg) == 0)
        ++r->pending;
    const char *argv[] = {"PING"};
    if (ch_call_redis(call, on_ready_redis, 1, argv, NULL) == 0)
        ++r->pending;
    ready_finish(call, r);
}

static void metrics(ch_call_t *call)
{
    /* for the operator's scraper on the internal (cleartext, loopback by default) listener; the public TLS
       listener answers as for a path it does not have (ops/haproxy denies it at the edge) */
    if (ch_call_req(call)->scheme == &H2O_URL_SCHEME_HTTPS) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such route");
        return;
    }
    ch_metrics_t *shards[64];
    unsigned n = ch_server.nthreads < 64 ? ch_server.nthreads : 64;
    for (unsigned i = 0; i < n; ++i)
        shards[i] = ch_server.threads[i]->metrics;
    h2o_iovec_t body;
    ch_metrics_render(shards, n, ch_server.router, &ch_call_req(call)->pool, &body);
    ch_reply_raw(call, 200, "text/plain; version=0.0.4; charset=utf-8", body.base, body.len);
}

static const ch_route_t routes[] = {
    {"GET", "/healthz", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, healthz, CH_ROUTE_RAW},
    {"GET", "/readyz", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, readyz, CH_ROUTE_RAW},
    {"GET", "/metrics", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, metrics, CH_ROUTE_RAW},
};

static const ch_pg_stmt_t *const stmts[] = {&stmt_ready, NULL};

const ch_module_t ch_ops_module = {"ops", routes, sizeof(routes) / sizeof(routes[0]), stmts};
