/* Prometheus metrics: each thread counts into its own shard; /metrics sums the shards when scraped. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gateway.h"

/* Upper bounds of the latency histogram, in microseconds (rendered in seconds). */
static const uint64_t bucket_us[] = {500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000};
#define NBUCKETS (sizeof(bucket_us) / sizeof(bucket_us[0]))
#define NSTATUS 600

typedef struct ch_route_metrics {
    uint64_t by_status[NSTATUS];
    uint64_t buckets[NBUCKETS + 1]; /* last: +Inf */
    uint64_t sum_us;
    uint64_t count;
} ch_route_metrics_t;

/*
 * Only the owning thread writes a shard; the scraping thread reads with relaxed atomic loads, so a
 * scrape may see one counter a request ahead of another, never a torn value.
 */
struct ch_metrics {
    unsigned nroutes; /* the router's routes, plus one slot for requests that matched no route */
    ch_route_metrics_t *routes;
    ch_pg_stats_t pg;
    ch_redis_stats_t redis;
    unsigned active_calls;
};

#define STORE(dst, v) __atomic_store_n(&(dst), (v), __ATOMIC_RELAXED)
#define LOAD(src) __atomic_load_n(&(src), __ATOMIC_RELAXED)

ch_metrics_t *ch_metrics_new(unsigned nroutes)
{
    ch_metrics_t *m = calloc(1, sizeof(*m));
    if (m == NULL || (m->routes = calloc(nroutes + 1, sizeof(*m->routes))) == NULL)
        abort();
    m->nroutes = nroutes + 1;
    return m;
}

void ch_metrics_observe(ch_metrics_t *m, unsigned route_index, int status, uint64_t duration_us)
{
    if (route_index >= m->nroutes)
        route_index = m->nroutes - 1;
    ch_route_metrics_t *r = &m->routes[route_index];
    if (status < 0 || status >= NSTATUS)
        status = 0;
    STORE(r->by_status[status], r->by_status[status] + 1);
    size_t b = 0;
    while (b < NBUCKETS && duration_us > bucket_us[b])
        ++b;
    STORE(r->buckets[b], r->buckets[b] + 1);
    STORE(r->sum_us, r->sum_us + duration_us);
    STORE(r->count, r->count + 1);
}

void ch_metrics_gauges(ch_metrics_t *m, const ch_pg_stats_t *pg, const ch_redis_stats_t *redis, unsigned active_calls)
{
    STORE(m->pg.conns_up, pg->conns_up);
    STORE(m->pg.queued, pg->queued);
    STORE(m->pg.inflight, pg->inflight);
    STORE(m->pg.timeouts, pg->timeouts);
    STORE(m->pg.failures, pg->failures);
    STORE(m->pg.reconnects, pg->reconnects);
    STORE(m->redis.connected, redis->connected);
    STORE(m->redis.inflight, redis->inflight);
    STORE(m->redis.timeouts, redis->timeouts);
    STORE(m->redis.failures, redis->failures);
    STORE(m->redis.reconnects, redis->reconnects);
    STORE(m->active_calls, active_calls);
}

typedef struct ch_text {
    char *base;
    size_t len, cap;
} ch_text_t;

static void text_printf(ch_text_t *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void text_printf(ch_text_t *t, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->base + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        t->cap = t->cap * 2 + (size_t)(n > 0 ? n : 0) + 1024;
        if ((t->base = realloc(t->base, t->cap)) == NULL)
            abort();
    }
}

static const char *route_label(const ch_router_t *router, unsigned i, char *buf, size_t len)
{
    const ch_route_t *r = ch_router_route(router, i);
    if (r == NULL)
        return "unmatched";
    snprintf(buf, len, "%s %s", r->method, r->path);
    return buf;
}

void ch_metrics_render(ch_metrics_t *const *threads, unsigned nthreads, const ch_router_t *router, h2o_mem_pool_t *pool,
                       h2o_iovec_t *out)
{
    ch_text_t t = {malloc(16384), 0, 16384};
    if (t.base == NULL)
        abort();
    unsigned nroutes = threads[0]->nroutes;
    char label[300];

    text_printf(&t, "# HELP cityhall_requests_total Requests answered, by route and status.\n"
                    "# TYPE cityhall_requests_total counter\n");
    for (unsigned i = 0; i < nroutes; ++i) {
        for (int s = 0; s < NSTATUS; ++s) {
            uint64_t n = 0;
            for (unsigned th = 0; th < nthreads; ++th)
                n += LOAD(threads[th]->routes[i].by_status[s]);
            if (n != 0)
                text_printf(&t, "cityhall_requests_total{route=\"%s\",status=\"%d\"} %llu\n",
                            route_label(router, i, label, sizeof(label)), s, (unsigned long long)n);
        }
    }
    text_printf(&t, "# HELP cityhall_request_duration_seconds Time from request to response, by route.\n"
                    "# TYPE cityhall_request_duration_seconds histogram\n");
    for (unsigned i = 0; i < nroutes; ++i) {
        uint64_t count = 0, sum = 0, cum = 0;
        for (unsigned th = 0; th < nthreads; ++th) {
            count += LOAD(threads[th]->routes[i].count);
            sum += LOAD(threads[th]->routes[i].sum_us);
        }
        if (count == 0)
            continue;
        const char *rl = route_label(router, i, label, sizeof(label));
        for (size_t b = 0; b <= NBUCKETS; ++b) {
            for (unsigned th = 0; th < nthreads; ++th)
                cum += LOAD(threads[th]->routes[i].buckets[b]);
            if (b < NBUCKETS)
                text_printf(&t, "cityhall_request_duration_seconds_bucket{route=\"%s\",le=\"%g\"} %llu\n", rl,
                            bucket_us[b] / 1e6, (unsigned long long)cum);
            else
                text_printf(&t, "cityhall_request_duration_seconds_bucket{route=\"%s\",le=\"+Inf\"} %llu\n", rl,
                            (unsigned long long)cum);
        }
        text_printf(&t, "cityhall_request_duration_seconds_sum{route=\"%s\"} %.6f\n", rl, sum / 1e6);
        text_printf(&t, "cityhall_request_duration_seconds_count{route=\"%s\"} %llu\n", rl, (unsigned long long)count);
    }

#define GAUGE(name, help, type, field)                                                                                 \
    text_printf(&t, "# HELP " name " " help "\n# TYPE " name " " type "\n");                                           \
    for (unsigned th = 0; th < nthreads; ++th)                                                                         \
        text_printf(&t, name "{thread=\"%u\"} %llu\n", th, (unsigned long long)LOAD(threads[th]->field));
    GAUGE("cityhall_active_calls", "Requests being handled.", "gauge", active_calls)
    GAUGE("cityhall_pg_connections_up", "PostgreSQL connections ready.", "gauge", pg.conns_up)
    GAUGE("cityhall_pg_queued", "Submissions waiting for a PostgreSQL connection.", "gauge", pg.queued)
    GAUGE("cityhall_pg_inflight", "Submissions sent to PostgreSQL, awaiting results.", "gauge", pg.inflight)
    GAUGE("cityhall_pg_timeouts_total", "PostgreSQL submissions that timed out.", "counter", pg.timeouts)
    GAUGE("cityhall_pg_failures_total", "PostgreSQL connection failures.", "counter", pg.failures)
    GAUGE("cityhall_pg_reconnects_total", "PostgreSQL reconnections.", "counter", pg.reconnects)
    GAUGE("cityhall_redis_connected", "Redis connection ready (1) or not (0).", "gauge", redis.connected)
    GAUGE("cityhall_redis_inflight", "Redis commands awaiting replies.", "gauge", redis.inflight)
    GAUGE("cityhall_redis_timeouts_total", "Redis commands that timed out.", "counter", redis.timeouts)
    GAUGE("cityhall_redis_failures_total", "Redis connection failures.", "counter", redis.failures)
    GAUGE("cityhall_redis_reconnects_total", "Redis reconnections.", "counter", redis.reconnects)
#undef GAUGE

    out->base = h2o_mem_alloc_pool(pool, t.len);
    memcpy(out->base, t.base, t.len);
    out->len = t.len;
    free(t.base);
}
