/* The system module: the deployment smoke test (database, Redis and write path) and the gateway's no-I/O route. */
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/time.h>
#include "ch_version.h"
#include "cityhall/module.h"
#include "system/v1/system.pb-c.h"
#include "system_store.h"

typedef Cityhall__System__V1__InfoResponse InfoResponse;
typedef Cityhall__System__V1__EchoRequest EchoRequest;
typedef Cityhall__System__V1__EchoResponse EchoResponse;
typedef Cityhall__System__V1__PingResponse PingResponse;
typedef Cityhall__System__V1__CreateProbeRequest CreateProbeRequest;
typedef Cityhall__System__V1__Probe Probe;

/* ---- GET /v1/system/info: one pipelined query and one Redis round trip, issued together ---- */

typedef struct info_state {
    InfoResponse resp;
    Google__Protobuf__Timestamp db_time;
    uint64_t started_us;
    int pending;
    int failed; /* the first CH_E* seen, answered once both replies are in */
} info_state_t;

static void info_finish(ch_call_t *call, info_state_t *st)
{
    if (--st->pending != 0)
        return;
    if (st->failed != 0)
        ch_fail_err(call, st->failed);
    else
        ch_reply(call, 200, &st->resp.base);
}

static void on_info_db(ch_call_t *call, ch_pg_result_t *r)
{
    info_state_t *st = ch_call_data(call);
    if (r->err != 0 || PQntuples(r->res[0]) != 1) {
        st->failed = r->err != 0 ? r->err : CH_EDB;
    } else {
        double t = strtod(PQgetvalue(r->res[0], 0, 0), NULL);
        st->db_time.seconds = (int64_t)t;
        st->db_time.nanos = (int32_t)((t - (double)(int64_t)t) * 1e6 + 0.5) * 1000;
        st->resp.db_time = &st->db_time;
        st->resp.db_rtt_us = (int64_t)(ch_now_us() - st->started_us);
    }
    info_finish(call, st);
}

static void on_info_redis(ch_call_t *call, redisReply *reply, int err)
{
    info_state_t *st = ch_call_data(call);
    if (err != 0 || reply->type != REDIS_REPLY_STATUS) {
        if (st->failed == 0)
            st->failed = err != 0 ? err : CH_EUNAVAIL;
    } else {
        st->resp.redis_pong = ch_call_strdup(call, reply->str);
        st->resp.redis_rtt_us = (int64_t)(ch_now_us() - st->started_us);
    }
    info_finish(call, st);
}

static void system_info(ch_call_t *call)
{
    info_state_t *st = ch_call_alloc(call, sizeof(*st));
    cityhall__system__v1__info_response__init(&st->resp);
    google__protobuf__timestamp__init(&st->db_time);
    st->resp.version = (char *)CH_VERSION;
    st->resp.thread = ch_call_thread(call);
    st->started_us = ch_now_us();
    st->pending = 1;
    st->failed = 0;
    ch_call_set_data(call, st);

    ch_pg_query_t q = {&system_stmt_now, NULL, NULL};
    int ret = ch_call_pg_read(call, &q, 1, on_info_db);
    if (ret == 0)
        ++st->pending;
    else
        st->failed = ret;
    static const char *ping[] = {"PING"};
    ret = ch_call_redis(call, on_info_redis, 1, ping, NULL);
    if (ret == 0)
        ++st->pending;
    else if (st->failed == 0)
        st->failed = ret;
    info_finish(call, st);
}

/* ---- GET /v1/system/ping: no I/O at all ---- */

static void system_ping(ch_call_t *call)
{
    static PingResponse resp = {PROTOBUF_C_MESSAGE_INIT(&cityhall__system__v1__ping_response__descriptor), "ok"};
    ch_reply(call, 200, &resp.base);
}

/* ---- POST /v1/system/echo: decoding, validation and encoding without storage ---- */

static void system_echo(ch_call_t *call)
{
    EchoRequest *req = ch_call_body(call);
    if (strlen(req->text) > 1000) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "text: at most 1000 bytes");
        return;
    }
    EchoResponse *resp = ch_call_alloc(call, sizeof(*resp));
    cityhall__system__v1__echo_response__init(resp);
    resp->text = req->text;
    resp->number = req->number;
    resp->n_tags = req->n_tags;
    resp->tags = req->tags;
    const char *key = ch_call_header(call, "idempotency-key");
    resp->idempotency_key = (char *)(key != NULL ? key : "");
    ch_reply(call, 200, &resp->base);
}

/* ---- POST /v1/system/probes: a durable write, acknowledged after commit, replayed on retry ---- */

static void on_probe_committed(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ch_reply(call, 201, ch_call_data(call));
}

static void system_probe_create(ch_call_t *call)
{
    CreateProbeRequest *req = ch_call_body(call);
    if (strlen(req->note) > 200) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "note: at most 200 bytes");
        return;
    }
    unsigned char u[16];
    if (getrandom(u, sizeof(u), GRND_NONBLOCK) != sizeof(u)) {
        ch_fail(call, CH_CODE_UNAVAILABLE, "entropy not available yet");
        return;
    }
    u[6] = (u[6] & 0x0f) | 0x40; /* version 4 */
    u[8] = (u[8] & 0x3f) | 0x80;
    struct timeval tv;
    gettimeofday(&tv, NULL);

    Probe *p = ch_call_alloc(call, sizeof(*p));
    Google__Protobuf__Timestamp *ts = ch_call_alloc(call, sizeof(*ts));
    cityhall__system__v1__probe__init(p);
    google__protobuf__timestamp__init(ts);
    p->probe_id = ch_call_printf(call, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
                                 u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
    p->note = req->note;
    ts->seconds = tv.tv_sec;
    ts->nanos = (int32_t)tv.tv_usec * 1000;
    p->created_at = ts;
    ch_call_set_data(call, p);

    const char *v[4] = {p->probe_id, p->note, ch_call_printf(call, "%lld.%06ld", (long long)tv.tv_sec, (long)tv.tv_usec),
                        ch_call_printf(call, "%u", ch_call_thread(call))};
    ch_pg_query_t q = {&system_stmt_probe_insert, v, NULL};
    int ret = ch_call_pg_commit(call, &q, 1, 201, &p->base, on_probe_committed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static const ch_route_t routes[] = {
    {"GET", "/v1/system/info", CH_PUBLIC, CH_OWN_NONE, NULL, &cityhall__system__v1__info_response__descriptor,
     system_info, 0},
    {"GET", "/v1/system/ping", CH_PUBLIC, CH_OWN_NONE, NULL, &cityhall__system__v1__ping_response__descriptor,
     system_ping, 0},
    {"POST", "/v1/system/echo", CH_PUBLIC, CH_OWN_NONE, &cityhall__system__v1__echo_request__descriptor,
     &cityhall__system__v1__echo_response__descriptor, system_echo, 0},
    /* probes write rows: operators only */
    {"POST", "/v1/system/probes", CH_ROLE_ADMIN, CH_OWN_NONE, &cityhall__system__v1__create_probe_request__descriptor,
     &cityhall__system__v1__probe__descriptor, system_probe_create, CH_ROUTE_IDEMPOTENT},
};

const ch_module_t system_module = {"system", routes, sizeof(routes) / sizeof(routes[0]), system_stmts};
