/* The request pipeline: route, authenticate, decode, call the module handler, encode, log, count. */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <openssl/evp.h>
#include "gateway.h"
#include "cityhall/transcode.h"
#include "cityhall/audit.h"
#include "common/v1/common.pb-c.h"

struct ch_call {
    h2o_req_t *req;   /* NULL once h2o disposed the request (client gone); then nothing may touch it */
    unsigned refs;    /* the request's guard + one per pending DB/Redis operation */
    ch_thread_t *thread;
    ch_match_t match;
    uint64_t start_us;
    void *body;
    h2o_iovec_t raw_body;
    ch_principal_t *principal;
    char request_id[65];
    char *idem_key;
    unsigned char idem_hash[32]; /* SHA-256 */
    int respond_pb;   /* answer in binary protobuf */
    int answered;
    void *data;
    ch_call_pg_cb commit_cb; /* the handler's callback behind ch_call_pg_commit */
    ProtobufCAllocator alloc;
};

static const h2o_iovec_t ct_json = {H2O_STRLIT("application/json; charset=utf-8")};
static const h2o_iovec_t ct_pb = {H2O_STRLIT("application/x-protobuf")};

/* ---- status mapping ---- */

static const struct {
    int status;
    const char *name;
} codes[CH_CODE__COUNT] = {
    [CH_CODE_INVALID_ARGUMENT] = {400, "INVALID_ARGUMENT"},
    [CH_CODE_UNAUTHENTICATED] = {401, "UNAUTHENTICATED"},
    [CH_CODE_PERMISSION_DENIED] = {403, "PERMISSION_DENIED"},
    [CH_CODE_NOT_FOUND] = {404, "NOT_FOUND"},
    [CH_CODE_METHOD_NOT_ALLOWED] = {405, "METHOD_NOT_ALLOWED"},
    [CH_CODE_ALREADY_EXISTS] = {409, "ALREADY_EXISTS"},
    [CH_CODE_ABORTED] = {409, "ABORTED"},
    [CH_CODE_PAYLOAD_TOO_LARGE] = {413, "PAYLOAD_TOO_LARGE"},
    [CH_CODE_UNSUPPORTED_MEDIA] = {415, "UNSUPPORTED_MEDIA_TYPE"},
    [CH_CODE_FAILED_PRECONDITION] = {422, "FAILED_PRECONDITION"},
    [CH_CODE_RESOURCE_EXHAUSTED] = {429, "RESOURCE_EXHAUSTED"},
    [CH_CODE_INTERNAL] = {500, "INTERNAL"},
    [CH_CODE_UNAVAILABLE] = {503, "UNAVAILABLE"},
    [CH_CODE_DEADLINE_EXCEEDED] = {504, "DEADLINE_EXCEEDED"},
};

int ch_code_status(ch_code_t code)
{
    return code < CH_CODE__COUNT ? codes[code].status : 500;
}

const char *ch_code_name(ch_code_t code)
{
    return code < CH_CODE__COUNT ? codes[code].name : "INTERNAL";
}

static const char *reason_phrase(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 400 ? "OK" : "Error";
    }
}

/* ---- lifetime ---- */

static void call_release(ch_call_t *call)
{
    if (--call->refs == 0)
        free(call);
}

/* h2o disposes the request pool when the stream ends, answered or not: from then on the call is orphaned. */
static void on_guard_dispose(void *p)
{
    ch_call_t *call = *(ch_call_t **)p;
    call->req = NULL;
    --call->thread->active_calls;
    call_release(call);
}

static void *pool_alloc(void *data, size_t size)
{
    return h2o_mem_alloc_pool(data, size);
}

static void pool_free(void *data, void *p)
{
    /* freed with the request pool */
}

/* ---- accessors ---- */

void *ch_call_body(ch_call_t *call)
{
    return call->body;
}

const char *ch_call_param(ch_call_t *call, const char *name)
{
    for (size_t i = 0; i < call->match.nparams; ++i)
        if (strcmp(call->match.param_names[i], name) == 0)
            return h2o_strdup(&call->req->pool, call->match.param_values[i].base, call->match.param_values[i].len).base;
    return NULL;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

const char *ch_call_query(ch_call_t *call, const char *name)
{
    h2o_req_t *req = call->req;
    if (req->query_at == SIZE_MAX)
        return NULL;
    const char *p = req->path.base + req->query_at + 1, *end = req->path.base + req->path.len;
    size_t nlen = strlen(name);
    while (p < end) {
        const char *amp = memchr(p, '&', end - p), *pe = amp ? amp : end;
        const char *eq = memchr(p, '=', pe - p);
        const char *ke = eq ? eq : pe;
        if ((size_t)(ke - p) == nlen && memcmp(p, name, nlen) == 0) {
            const char *v = eq ? eq + 1 : pe;
            char *out = h2o_mem_alloc_pool(&req->pool, pe - v + 1), *o = out;
            for (; v < pe; ++v) {
                if (*v == '+') {
                    *o++ = ' ';
                } else if (*v == '%' && pe - v >= 3 && hexval(v[1]) >= 0 && hexval(v[2]) >= 0) {
                    *o++ = (char)(hexval(v[1]) * 16 + hexval(v[2]));
                    v += 2;
                } else {
                    *o++ = *v;
                }
            }
            *o = '\0';
            return out;
        }
        p = pe + 1;
    }
    return NULL;
}

const ch_principal_t *ch_call_principal(ch_call_t *call)
{
    return call->principal;
}

const char *ch_call_request_id(ch_call_t *call)
{
    return call->request_id;
}

const char *ch_call_idempotency_key(ch_call_t *call)
{
    return call->idem_key;
}

const char *ch_call_header(ch_call_t *call, const char *name)
{
    ssize_t i = h2o_find_header_by_str(&call->req->headers, name, strlen(name), -1);
    if (i < 0)
        return NULL;
    h2o_iovec_t v = call->req->headers.entries[i].value;
    return h2o_strdup(&call->req->pool, v.base, v.len).base;
}

unsigned ch_call_thread(ch_call_t *call)
{
    return call->thread->index;
}

h2o_req_t *ch_call_req(ch_call_t *call)
{
    return call->req;
}

void *ch_call_alloc(ch_call_t *call, size_t size)
{
    return h2o_mem_alloc_pool(&call->req->pool, size);
}

char *ch_call_strdup(ch_call_t *call, const char *s)
{
    return h2o_strdup(&call->req->pool, s, SIZE_MAX).base;
}

char *ch_call_printf(ch_call_t *call, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *s = h2o_mem_alloc_pool(&call->req->pool, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

Google__Protobuf__Timestamp *ch_call_timestamp(ch_call_t *call, const char *s)
{
    if (s == NULL || s[0] == '\0')
        return NULL;
    Google__Protobuf__Timestamp *ts = ch_call_alloc(call, sizeof(*ts));
    google__protobuf__timestamp__init(ts);
    char *end;
    ts->seconds = strtoll(s, &end, 10);
    if (*end == '.') {
        int32_t nanos = 0;
        int digits = 0;
        for (const char *p = end + 1; *p >= '0' && *p <= '9' && digits < 9; ++p, ++digits)
            nanos = nanos * 10 + (*p - '0');
        for (; digits < 9; ++digits)
            nanos *= 10;
        /* "-1.25" is 1.25 s before the epoch: seconds -2, nanos 750000000 */
        if (s[0] == '-' && nanos != 0) {
            ts->seconds -= 1;
            nanos = 1000000000 - nanos;
        }
        ts->nanos = nanos;
    }
    return ts;
}

ProtobufCAllocator *ch_call_allocator(ch_call_t *call)
{
    return &call->alloc;
}

void ch_call_set_data(ch_call_t *call, void *data)
{
    call->data = data;
}

void *ch_call_data(ch_call_t *call)
{
    return call->data;
}

/* ---- answering ---- */

/* A tiny appender for hand-formatted log lines: snprintf dominated the hot path's profile. */
typedef struct ch_line {
    char *p, *end;
} ch_line_t;

static void line_mem(ch_line_t *l, const char *s, size_t n)
{
    if (n > (size_t)(l->end - l->p))
        n = (size_t)(l->end - l->p);
    memcpy(l->p, s, n);
    l->p += n;
}

static void line_str(ch_line_t *l, const char *s)
{
    line_mem(l, s, strlen(s));
}

static void line_u64(ch_line_t *l, uint64_t v)
{
    char tmp[24], *t = tmp + sizeof(tmp);
    do
        *--t = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    line_mem(l, t, (size_t)(tmp + sizeof(tmp) - t));
}

/* The wall-clock prefix changes once per millisecond at most; each thread keeps its own. */
static const char *time_text(ch_thread_t *thread)
{
    static __thread char text[64];
    static __thread uint64_t text_ms;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    uint64_t ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    if (ms != text_ms) {
        struct tm tm;
        time_t sec = ts.tv_sec;
        gmtime_r(&sec, &tm);
        snprintf(text, sizeof(text), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
        text_ms = ms;
    }
    return text;
}

/* Access log lines are buffered per thread and flushed by size or by the thread's timer (server.c). */
static void access_log(ch_call_t *call, int status, size_t bytes, uint64_t duration_us)
{
    h2o_req_t *req = call->req;
    const ch_route_t *route = call->match.route;
    char buf[512];
    ch_line_t l = {buf, buf + sizeof(buf) - 2};
    line_str(&l, "{\"type\":\"access\",\"time\":\"");
    line_str(&l, time_text(call->thread));
    line_str(&l, "\",\"request_id\":\"");
    line_str(&l, call->request_id);
    line_str(&l, "\",\"method\":\"");
    /* the method is client input: keep only token characters */
    for (size_t i = 0; i < req->method.len && i < 16; ++i) {
        char c = req->method.base[i];
        if (c >= 'A' && c <= 'Z')
            line_mem(&l, &c, 1);
    }
    line_str(&l, "\",\"route\":\"");
    line_str(&l, route != NULL ? route->path : "(none)");
    line_str(&l, "\",\"status\":");
    line_u64(&l, (uint64_t)status);
    line_str(&l, ",\"duration_us\":");
    line_u64(&l, duration_us);
    line_str(&l, ",\"bytes\":");
    line_u64(&l, bytes);
    line_str(&l, req->version >= 0x200 ? ",\"protocol\":\"h2\",\"thread\":" : ",\"protocol\":\"http/1.1\",\"thread\":");
    line_u64(&l, call->thread->index);
    if (call->principal != NULL && call->principal->actor != NULL) {
        /* acting for a citizen: the staff account id (never the citizen's personal data) */
        line_str(&l, ",\"actor\":\"");
        line_str(&l, call->principal->actor);
        line_str(&l, "\"");
    }
    l.end += 2;
    line_mem(&l, "}\n", 2);
    ch_server_log_append(call->thread, buf, (size_t)(l.p - buf));
}

static void send_response(ch_call_t *call, int status, h2o_iovec_t content_type, const void *body, size_t len,
                          int retry_after)
{
    h2o_req_t *req = call->req;
    if (call->answered) {
        ch_log(CH_LOG_ERROR, "double_answer", "route %s answered twice (request %s)",
               call->match.route ? call->match.route->path : "-", call->request_id);
        return;
    }
    call->answered = 1;
    req->res.status = status;
    req->res.reason = reason_phrase(status);
    if (content_type.len != 0)
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, content_type.base, content_type.len);
    h2o_add_header_by_str(&req->pool, &req->res.headers, H2O_STRLIT("x-request-id"), 0, NULL, call->request_id,
                          strlen(call->request_id));
    /* personal data must not sit in shared caches: no-store unless the handler chose a policy */
    if (h2o_find_header(&req->res.headers, H2O_TOKEN_CACHE_CONTROL, -1) < 0)
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL, NULL, H2O_STRLIT("no-store"));
    if (retry_after > 0) {
        char *v = h2o_mem_alloc_pool(&req->pool, 16);
        int n = snprintf(v, 16, "%d", retry_after);
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_RETRY_AFTER, NULL, v, (size_t)n);
    }
    uint64_t duration = ch_now_us() - call->start_us;
    ch_metrics_observe(call->thread->metrics, call->match.route ? call->match.route_index : UINT32_MAX, status, duration);
    access_log(call, status, len, duration);
    /* `body` lives in the request pool (or is static): hand it to h2o without another copy */
    static h2o_generator_t generator = {NULL, NULL};
    h2o_iovec_t buf = h2o_iovec_init(body, len);
    req->res.content_length = len;
    h2o_start_response(req, &generator);
    h2o_send(req, &buf, 1, H2O_SEND_STATE_FINAL);
}

void ch_reply_raw(ch_call_t *call, int status, const char *content_type, const void *body, size_t len)
{
    /* the caller's buffer may not outlive this call: copy it into the request pool */
    h2o_iovec_t copy = h2o_strdup(&call->req->pool, body, len);
    h2o_iovec_t ctype = h2o_strdup(&call->req->pool, content_type, SIZE_MAX);
    send_response(call, status, ctype, copy.base, copy.len, 0);
}

void ch_reply_encoded(ch_call_t *call, int status, const void *json, size_t json_len, const void *pb, size_t pb_len)
{
    h2o_iovec_t body = call->respond_pb ? h2o_strdup(&call->req->pool, pb, pb_len)
                                        : h2o_strdup(&call->req->pool, json, json_len);
    send_response(call, status, call->respond_pb ? ct_pb : ct_json, body.base, body.len, 0);
}

void ch_call_add_header(ch_call_t *call, const char *name, const char *value)
{
    h2o_req_t *req = call->req;
    h2o_iovec_t n = h2o_strdup(&req->pool, name, SIZE_MAX), v = h2o_strdup(&req->pool, value, SIZE_MAX);
    h2o_add_header_by_str(&req->pool, &req->res.headers, n.base, n.len, 1, NULL, v.base, v.len);
}

/* Encodes `msg` in the encoding the client asked for, into the request pool. */
static h2o_iovec_t encode_message(ch_call_t *call, const ProtobufCMessage *msg)
{
    h2o_iovec_t out;
    if (call->respond_pb) {
        out.len = protobuf_c_message_get_packed_size(msg);
        out.base = h2o_mem_alloc_pool(&call->req->pool, out.len + 1);
        protobuf_c_message_pack(msg, (uint8_t *)out.base);
    } else {
        ch_buf_t buf = {0};
        ch_pb_to_json(msg, &buf);
        out.base = h2o_mem_alloc_pool(&call->req->pool, buf.len + 1);
        memcpy(out.base, buf.base, buf.len);
        out.len = buf.len;
        ch_buf_free(&buf);
    }
    return out;
}

void ch_reply(ch_call_t *call, int status, const ProtobufCMessage *msg)
{
    if (msg == NULL) {
        send_response(call, status == 200 ? 204 : status, h2o_iovec_init(NULL, 0), "", 0, 0);
        return;
    }
    h2o_iovec_t body = encode_message(call, msg);
    send_response(call, status, call->respond_pb ? ct_pb : ct_json, body.base, body.len, 0);
}

static void vfail(ch_call_t *call, ch_code_t code, const char *field, int retry_after, const char *fmt, va_list ap)
{
    char message[512];
    vsnprintf(message, sizeof(message), fmt, ap);
    Cityhall__Common__V1__Error err = CITYHALL__COMMON__V1__ERROR__INIT;
    Cityhall__Common__V1__ErrorResponse resp = CITYHALL__COMMON__V1__ERROR_RESPONSE__INIT;
    Cityhall__Common__V1__FieldViolation fv = CITYHALL__COMMON__V1__FIELD_VIOLATION__INIT;
    Cityhall__Common__V1__FieldViolation *fvs[1] = {&fv};
    err.code = (char *)ch_code_name(code);
    err.message = message;
    err.request_id = call->request_id;
    if (field != NULL) {
        fv.field = (char *)field;
        fv.description = message;
        err.details = fvs;
        err.n_details = 1;
    }
    resp.error = &err;
    h2o_iovec_t body = encode_message(call, &resp.base);
    int status = ch_code_status(code);
    if (retry_after <= 0 && (status == 503 || status == 429))
        retry_after = 1;
    send_response(call, status, call->respond_pb ? ct_pb : ct_json, body.base, body.len, retry_after);
}

void ch_fail(ch_call_t *call, ch_code_t code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(call, code, NULL, 0, fmt, ap);
    va_end(ap);
}

void ch_fail_fields(ch_call_t *call, ch_code_t code, const char *const *fields, const char *const *descriptions,
                    size_t n, const char *fmt, ...)
{
    char message[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    Cityhall__Common__V1__Error err = CITYHALL__COMMON__V1__ERROR__INIT;
    Cityhall__Common__V1__ErrorResponse resp = CITYHALL__COMMON__V1__ERROR_RESPONSE__INIT;
    Cityhall__Common__V1__FieldViolation *fv = h2o_mem_alloc_pool(&call->req->pool, n * sizeof(*fv) + 1);
    Cityhall__Common__V1__FieldViolation **fvs = h2o_mem_alloc_pool(&call->req->pool, n * sizeof(*fvs) + 1);
    for (size_t i = 0; i < n; ++i) {
        cityhall__common__v1__field_violation__init(&fv[i]);
        fv[i].field = (char *)fields[i];
        fv[i].description = (char *)descriptions[i];
        fvs[i] = &fv[i];
    }
    err.code = (char *)ch_code_name(code);
    err.message = message;
    err.request_id = call->request_id;
    err.details = fvs;
    err.n_details = n;
    resp.error = &err;
    h2o_iovec_t body = encode_message(call, &resp.base);
    int status = ch_code_status(code);
    send_response(call, status, call->respond_pb ? ct_pb : ct_json, body.base, body.len,
                  status == 503 || status == 429 ? 1 : 0);
}

void ch_fail_retry_after(ch_call_t *call, ch_code_t code, int retry_after_s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(call, code, NULL, retry_after_s, fmt, ap);
    va_end(ap);
}

static void fail_field(ch_call_t *call, ch_code_t code, const char *field, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(call, code, field, 0, fmt, ap);
    va_end(ap);
}

void ch_fail_err(ch_call_t *call, int err)
{
    switch (err) {
    case CH_EFULL:
        ch_fail(call, CH_CODE_UNAVAILABLE, "the service is busy; retry shortly");
        break;
    case CH_EUNAVAIL:
    case CH_ETIMEDOUT:
    case CH_ECLOSED:
        ch_fail(call, CH_CODE_UNAVAILABLE, "a backing service is unavailable; retry shortly");
        break;
    default:
        ch_log(CH_LOG_ERROR, "internal_error", "request %s: error %d", call->request_id, err);
        ch_fail(call, CH_CODE_INTERNAL, "internal error");
        break;
    }
}

/* ---- asynchronous operations tied to the call ---- */

typedef struct ch_call_op {
    ch_call_t *call;
    union {
        ch_call_pg_cb pg;
        ch_call_redis_cb redis;
    } cb;
} ch_call_op_t;

static ch_call_op_t *op_new(ch_call_t *call)
{
    ch_call_op_t *op = malloc(sizeof(*op));
    if (op == NULL)
        abort();
    op->call = call;
    ++call->refs;
    return op;
}

static void on_pg_result(void *arg, ch_pg_result_t *result)
{
    ch_call_op_t *op = arg;
    ch_call_t *call = op->call;
    if (call->req != NULL && !call->answered)
        op->cb.pg(call, result);
    call_release(call);
    free(op);
}

void ch_call_hold(ch_call_t *call)
{
    ++call->refs;
}

void ch_call_unhold(ch_call_t *call)
{
    call_release(call);
}

int ch_call_gone(const ch_call_t *call)
{
    return call->req == NULL || call->answered;
}

int ch_call_pg_detached(ch_call_t *call, const ch_pg_query_t *queries, int n, ch_pg_cb cb, void *arg)
{
    return ch_pg_submit(call->thread->pg, queries, n, cb, arg);
}

int ch_call_pg(ch_call_t *call, const ch_pg_query_t *queries, int n, ch_call_pg_cb cb)
{
    ch_call_op_t *op = op_new(call);
    op->cb.pg = cb;
    int ret = ch_pg_submit(call->thread->pg, queries, n, on_pg_result, op);
    if (ret != 0) {
        --call->refs;
        free(op);
    }
    return ret;
}

int ch_call_pg_read(ch_call_t *call, const ch_pg_query_t *queries, int n, ch_call_pg_cb cb)
{
    ch_call_op_t *op = op_new(call);
    op->cb.pg = cb;
    int ret = ch_pg_submit_read(call->thread->pg, queries, n, on_pg_result, op);
    if (ret != 0) {
        --call->refs;
        free(op);
    }
    return ret;
}

static void on_redis_reply(void *arg, redisReply *reply, int err)
{
    ch_call_op_t *op = arg;
    ch_call_t *call = op->call;
    if (call->req != NULL && !call->answered)
        op->cb.redis(call, reply, err);
    call_release(call);
    free(op);
}

int ch_call_redis(ch_call_t *call, ch_call_redis_cb cb, int argc, const char **argv, const size_t *argvlen)
{
    ch_call_op_t *op = op_new(call);
    op->cb.redis = cb;
    int ret = ch_redis_commandargv(call->thread->redis, on_redis_reply, op, argc, argv, argvlen);
    if (ret != 0) {
        --call->refs;
        free(op);
    }
    return ret;
}

typedef struct ch_call_work_op {
    ch_call_t *call;
    ch_work_fn work;
    ch_call_work_cb done;
    size_t size;
    _Alignas(16) unsigned char arg[];
} ch_call_work_op_t;

static void on_work(void *p)
{
    ch_call_work_op_t *op = p;
    op->work(op->arg);
}

static void on_work_done(void *p)
{
    ch_call_work_op_t *op = p;
    ch_call_t *call = op->call;
    if (call->req != NULL && !call->answered)
        op->done(call, op->arg);
    call_release(call);
    free(op);
}

int ch_call_work(ch_call_t *call, ch_work_fn work, ch_call_work_cb done, const void *arg, size_t size)
{
    ch_call_work_op_t *op = malloc(sizeof(*op) + size);
    if (op == NULL)
        abort();
    op->call = call;
    op->work = work;
    op->done = done;
    op->size = size;
    memcpy(op->arg, arg, size);
    ++call->refs;
    int ret = ch_work_submit(call->thread, on_work, on_work_done, op);
    if (ret != 0) {
        --call->refs;
        free(op);
    }
    return ret;
}

/* Parses an IPv4 or IPv6 address (text of `n` bytes) into `bin` (16 bytes, family-tagged). Returns 0 if it is one. */
static int addr_parse(const char *text, size_t n, unsigned char bin[17])
{
    char buf[INET6_ADDRSTRLEN];
    if (n == 0 || n >= sizeof(buf))
        return -1;
    memcpy(buf, text, n);
    buf[n] = '\0';
    memset(bin, 0, 17);
    if (inet_pton(AF_INET, buf, bin + 1) == 1) {
        bin[0] = 4;
        return 0;
    }
    if (inet_pton(AF_INET6, buf, bin + 1) == 1) {
        bin[0] = 6;
        return 0;
    }
    return -1;
}

/* The address is one of trusted_proxies (config.c checked that every entry parses). */
static int proxy_trusted(const unsigned char bin[17])
{
    const char *p = ch_config()->trusted_proxies;
    while (*p != '\0') {
        size_t n = strcspn(p, ",");
        unsigned char t[17];
        if (addr_parse(p, n, t) == 0 && memcmp(t, bin, 17) == 0)
            return 1;
        p += n + (p[n] == ',');
    }
    return 0;
}

/*
 * The client's address: the TCP peer, or, when the peer is a trusted proxy (the edge), the address the edge
 * appended to the last X-Forwarded-For header, read from the right past any further trusted proxies. What a client
 * wrote into the header itself is never believed: it is to the left of what the edge appended.
 */
const char *ch_call_peer(ch_call_t *call)
{
    struct sockaddr_storage ss;
    socklen_t len = call->req->conn->callbacks->get_peername(call->req->conn, (struct sockaddr *)&ss);
    char *out = h2o_mem_alloc_pool(&call->req->pool, INET6_ADDRSTRLEN);
    out[0] = '\0';
    if (len != 0) {
        if (ss.ss_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, out, INET6_ADDRSTRLEN);
        else if (ss.ss_family == AF_INET6)
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, out, INET6_ADDRSTRLEN);
    }
    unsigned char bin[17];
    if (ch_config()->trusted_proxies[0] == '\0' || addr_parse(out, strlen(out), bin) != 0 || !proxy_trusted(bin))
        return out;
    ssize_t i = -1, last = -1;
    while ((i = h2o_find_header(&call->req->headers, H2O_TOKEN_X_FORWARDED_FOR, i)) != -1)
        last = i;
    if (last == -1)
        return out;
    const h2o_iovec_t *v = &call->req->headers.entries[last].value;
    size_t end = v->len;
    while (end > 0) {
        size_t start = end;
        while (start > 0 && v->base[start - 1] != ',')
            --start;
        size_t a = start, b = end;
        while (a < b && (v->base[a] == ' ' || v->base[a] == '\t'))
            ++a;
        while (b > a && (v->base[b - 1] == ' ' || v->base[b - 1] == '\t'))
            --b;
        if (addr_parse(v->base + a, b - a, bin) != 0)
            return out; /* not an address: keep the proxy's own */
        if (!proxy_trusted(bin)) {
            memcpy(out, v->base + a, b - a);
            out[b - a] = '\0';
            return out;
        }
        end = start > 0 ? start - 1 : 0;
    }
    return out;
}

/* ---- idempotency: the key is claimed in the same transaction as the write it protects ---- */

static const ch_pg_stmt_t stmt_idem_get = {
    "ch_idem_get", "SELECT encode(request_hash, 'hex'), status, encode(response, 'hex') FROM idempotency_keys "
                   "WHERE scope = $1 AND key = $2", 2};
static const ch_pg_stmt_t stmt_idem_claim = {
    "ch_idem_claim", "INSERT INTO idempotency_keys (scope, key, route, request_hash, status, response) "
                     "VALUES ($1, $2, $3, decode($4, 'hex'), $5::int, decode($6, 'hex'))", 6};
const ch_pg_stmt_t *const ch_call_stmts[] = {&stmt_idem_get, &stmt_idem_claim, &ch_audit_stmt_append, NULL};

static const char *idem_scope(ch_call_t *call)
{
    return call->principal != NULL ? call->principal->subject : "public";
}

static char *hex_encode(h2o_mem_pool_t *pool, const unsigned char *p, size_t len)
{
    static const char digits[] = "0123456789abcdef";
    char *s = h2o_mem_alloc_pool(pool, len * 2 + 1);
    for (size_t i = 0; i < len; ++i) {
        s[i * 2] = digits[p[i] >> 4];
        s[i * 2 + 1] = digits[p[i] & 15];
    }
    s[len * 2] = '\0';
    return s;
}

static void run_handler(ch_call_t *call);

/* Answers from a stored first result: same request replays it, another request under the same key is refused. */
static int idem_replay_or_refuse(ch_call_t *call, PGresult *res)
{
    if (PQntuples(res) == 0)
        return 0;
    char *hash = hex_encode(&call->req->pool, call->idem_hash, sizeof(call->idem_hash));
    if (strcmp(PQgetvalue(res, 0, 0), hash) != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "Idempotency-Key was already used with a different request");
        return 1;
    }
    int status = atoi(PQgetvalue(res, 0, 1));
    const char *hex = PQgetvalue(res, 0, 2);
    size_t len = strlen(hex) / 2;
    uint8_t *bytes = h2o_mem_alloc_pool(&call->req->pool, len + 1);
    for (size_t i = 0; i < len; ++i)
        bytes[i] = (uint8_t)(hexval(hex[2 * i]) * 16 + hexval(hex[2 * i + 1]));
    ProtobufCMessage *msg = protobuf_c_message_unpack(call->match.route->response, &call->alloc, len, bytes);
    if (msg == NULL) {
        ch_fail(call, CH_CODE_INTERNAL, "internal error");
        return 1;
    }
    h2o_add_header_by_str(&call->req->pool, &call->req->res.headers, H2O_STRLIT("idempotent-replayed"), 0, NULL,
                          H2O_STRLIT("true"));
    ch_reply(call, status, msg);
    return 1;
}

static void on_idem_lookup(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    if (!idem_replay_or_refuse(call, r->res[0]))
        run_handler(call);
}

static void on_commit(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err == CH_EDB && r->sqlstate != NULL && strcmp(r->sqlstate, "23505") == 0 && r->message != NULL &&
        strstr(r->message, "idempotency_keys") != NULL) {
        /* A concurrent request with the same key committed first: answer with its result. */
        ch_call_idempotency_replay(call);
        return;
    }
    call->commit_cb(call, r);
}

int ch_call_idempotency_claim(ch_call_t *call, int status, const ProtobufCMessage *response, const char *values[6])
{
    if (call->idem_key == NULL)
        return CH_ENOTFOUND;
    h2o_mem_pool_t *pool = &call->req->pool;
    size_t len = protobuf_c_message_get_packed_size(response);
    uint8_t *packed = h2o_mem_alloc_pool(pool, len + 1);
    protobuf_c_message_pack(response, packed);
    values[0] = idem_scope(call);
    values[1] = call->idem_key;
    values[2] = call->match.route->path;
    values[3] = hex_encode(pool, call->idem_hash, sizeof(call->idem_hash));
    values[4] = ch_call_printf(call, "%d", status);
    values[5] = hex_encode(pool, packed, len);
    return 0;
}

void ch_call_idempotency_replay(ch_call_t *call)
{
    const char *v[2] = {idem_scope(call), call->idem_key};
    ch_pg_query_t q = {&stmt_idem_get, v, NULL};
    int ret = ch_call_pg_read(call, &q, 1, on_idem_lookup);
    if (ret != 0)
        ch_fail_err(call, ret);
}

int ch_call_pg_commit(ch_call_t *call, const ch_pg_query_t *queries, int n, int status, const ProtobufCMessage *response,
                      ch_call_pg_cb cb)
{
    const char **v = h2o_mem_alloc_pool(&call->req->pool, 6 * sizeof(*v));
    if (ch_call_idempotency_claim(call, status, response, v) != 0)
        return ch_call_pg(call, queries, n, cb);
    ch_pg_query_t *all = h2o_mem_alloc_pool(&call->req->pool, (n + 1) * sizeof(*all));
    memcpy(all, queries, n * sizeof(*all));
    all[n] = (ch_pg_query_t){&stmt_idem_claim, v, NULL};
    call->commit_cb = cb;
    return ch_call_pg(call, all, n + 1, on_commit);
}

/* ---- the pipeline ---- */

static void run_handler(ch_call_t *call)
{
    call->match.route->handler(call);
}

static int is_token_char(int c)
{
    return isalnum(c) || c == '-' || c == '_' || c == '.' || c == ':';
}

static void set_request_id(ch_call_t *call)
{
    h2o_req_t *req = call->req;
    ssize_t i = h2o_find_header_by_str(&req->headers, H2O_STRLIT("x-request-id"), -1);
    if (i >= 0) {
        h2o_iovec_t v = req->headers.entries[i].value;
        int ok = v.len > 0 && v.len < sizeof(call->request_id);
        for (size_t j = 0; ok && j < v.len; ++j)
            ok = is_token_char((unsigned char)v.base[j]);
        if (ok) {
            memcpy(call->request_id, v.base, v.len);
            call->request_id[v.len] = '\0';
            return;
        }
    }
    /* xorshift64*: request ids need to be unique, not secret; 16 hex digits + the thread's 2 */
    uint64_t x = call->thread->rng;
    x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
    call->thread->rng = x;
    x *= 0x2545F4914F6CDD1DULL;
    static const char hex[] = "0123456789abcdef";
    for (int i = 15; i >= 0; --i, x >>= 4)
        call->request_id[i] = hex[x & 15];
    call->request_id[16] = hex[(call->thread->index >> 4) & 15];
    call->request_id[17] = hex[call->thread->index & 15];
    call->request_id[18] = '\0';
}

static int header_has(h2o_req_t *req, const h2o_token_t *token, const char *needle)
{
    ssize_t i = h2o_find_header(&req->headers, token, -1);
    if (i < 0)
        return 0;
    h2o_iovec_t v = req->headers.entries[i].value;
    size_t n = strlen(needle);
    for (size_t j = 0; j + n <= v.len; ++j)
        if (strncasecmp(v.base + j, needle, n) == 0)
            return 1;
    return 0;
}

/* Rejects protobuf bodies carrying fields this contract does not know, as the JSON path does. */
const char *ch_pb_unknown_field(const ProtobufCMessage *msg)
{
    if (msg->n_unknown_fields != 0)
        return msg->descriptor->name;
    for (unsigned i = 0; i < msg->descriptor->n_fields; ++i) {
        const ProtobufCFieldDescriptor *f = &msg->descriptor->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        const char *member = (const char *)msg + f->offset;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)((const char *)msg + f->quantifier_offset);
            ProtobufCMessage *const *items = *(ProtobufCMessage *const *const *)member;
            for (size_t j = 0; j < n; ++j) {
                const char *u = ch_pb_unknown_field(items[j]);
                if (u != NULL)
                    return u;
            }
        } else {
            const ProtobufCMessage *sub = *(ProtobufCMessage *const *)member;
            if (sub != NULL) {
                const char *u = ch_pb_unknown_field(sub);
                if (u != NULL)
                    return u;
            }
        }
    }
    return NULL;
}

/* Both encodings meet the same limits: protobuf-c checks neither UTF-8 nor sizes, and handlers rely on both. */
static int limits_or_respond(ch_call_t *call)
{
    ch_transcode_error_t err;
    if (ch_pb_check_limits(call->body, &err) == 0)
        return 0;
    fail_field(call, CH_CODE_INVALID_ARGUMENT, err.field, "%s: %s", err.field, err.message);
    return -1;
}

static int decode_body_or_respond(ch_call_t *call)
{
    h2o_req_t *req = call->req;
    const ch_route_t *route = call->match.route;
    if (route->request == NULL) {
        if (req->entity.base != NULL && req->entity.len != 0) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "this route takes no request body");
            return -1;
        }
        return 0;
    }
    h2o_iovec_t body = req->entity.base != NULL ? req->entity : h2o_iovec_init("", 0);
    ssize_t ct = h2o_find_header(&req->headers, H2O_TOKEN_CONTENT_TYPE, -1);
    h2o_iovec_t ctype = ct >= 0 ? req->headers.entries[ct].value : h2o_iovec_init(NULL, 0);
    if (ctype.len >= 22 && strncasecmp(ctype.base, "application/x-protobuf", 22) == 0) {
        call->body = protobuf_c_message_unpack(route->request, &call->alloc, body.len, (const uint8_t *)body.base);
        if (call->body == NULL) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "the body is not a valid %s protobuf message", route->request->name);
            return -1;
        }
        const char *u = ch_pb_unknown_field(call->body);
        if (u != NULL) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "unknown field in %s", u);
            return -1;
        }
        return limits_or_respond(call);
    }
    if (ctype.len != 0 && !(ctype.len >= 16 && strncasecmp(ctype.base, "application/json", 16) == 0)) {
        ch_fail(call, CH_CODE_UNSUPPORTED_MEDIA, "send application/json or application/x-protobuf");
        return -1;
    }
    ch_transcode_error_t err;
    call->body = ch_json_to_pb(route->request, body.base, body.len, &call->alloc, &err);
    if (call->body == NULL) {
        if (err.field[0] != '\0')
            fail_field(call, CH_CODE_INVALID_ARGUMENT, err.field, "%s: %s", err.field, err.message);
        else
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "%s", err.message);
        return -1;
    }
    return limits_or_respond(call);
}

static int authenticate_or_respond(ch_call_t *call)
{
    if (call->match.route->roles == CH_PUBLIC)
        return 0;
    h2o_req_t *req = call->req;
    ssize_t i = h2o_find_header(&req->headers, H2O_TOKEN_AUTHORIZATION, -1);
    if (i < 0) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "this route needs a bearer token");
        return -1;
    }
    h2o_iovec_t v = req->headers.entries[i].value;
    if (v.len <= 7 || strncasecmp(v.base, "Bearer ", 7) != 0) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "the Authorization header must be \"Bearer <token>\"");
        return -1;
    }
    ch_principal_t *p = h2o_mem_alloc_pool(&req->pool, sizeof(*p));
    memset(p, 0, sizeof(*p));
    if (ch_auth_verify(call->thread, v.base + 7, v.len - 7, &req->pool, p) != 0) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "the token is not valid");
        return -1;
    }
    if ((call->match.route->roles & p->role) == 0) {
        ch_fail(call, CH_CODE_PERMISSION_DENIED, "this route is not open to your role");
        return -1;
    }
    call->principal = p;
    return 0;
}

static int idempotency_or_respond(ch_call_t *call)
{
    h2o_req_t *req = call->req;
    if ((call->match.route->flags & CH_ROUTE_IDEMPOTENT) == 0)
        return 0;
    ssize_t i = h2o_find_header_by_str(&req->headers, H2O_STRLIT("idempotency-key"), -1);
    if (i < 0)
        return 0;
    h2o_iovec_t v = req->headers.entries[i].value;
    int ok = v.len >= 1 && v.len <= 128;
    for (size_t j = 0; ok && j < v.len; ++j)
        ok = v.base[j] > 0x20 && v.base[j] < 0x7f;
    if (!ok) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "Idempotency-Key must be 1 to 128 visible ASCII characters");
        return -1;
    }
    call->idem_key = h2o_strdup(&req->pool, v.base, v.len).base;
    /* The hash binds the key to this exact request: route and body (the principal is the scope). */
    EVP_MD_CTX *sha = EVP_MD_CTX_new();
    if (sha == NULL || EVP_DigestInit_ex(sha, EVP_sha256(), NULL) != 1)
        abort();
    EVP_DigestUpdate(sha, call->match.route->path, strlen(call->match.route->path));
    EVP_DigestUpdate(sha, "\n", 1);
    for (size_t j = 0; j < call->match.nparams; ++j) {
        EVP_DigestUpdate(sha, call->match.param_values[j].base, call->match.param_values[j].len);
        EVP_DigestUpdate(sha, "\n", 1);
    }
    /* hash the decoded message, so the same request in JSON or protobuf counts as the same */
    size_t len = protobuf_c_message_get_packed_size(call->body);
    uint8_t *packed = h2o_mem_alloc_pool(&req->pool, len + 1);
    protobuf_c_message_pack(call->body, packed);
    EVP_DigestUpdate(sha, packed, len);
    EVP_DigestFinal_ex(sha, call->idem_hash, NULL);
    EVP_MD_CTX_free(sha);
    const char *values[2] = {idem_scope(call), call->idem_key};
    ch_pg_query_t q = {&stmt_idem_get, values, NULL};
    int ret = ch_call_pg_read(call, &q, 1, on_idem_lookup);
    if (ret != 0)
        ch_fail_err(call, ret);
    return 1; /* continues in on_idem_lookup */
}

int ch_call_on_req(h2o_handler_t *self, h2o_req_t *req)
{
    ch_thread_t *thread = (ch_thread_t *)req->conn->ctx;
    ch_call_t *call = calloc(1, sizeof(*call));
    if (call == NULL)
        abort();
    call->req = req;
    call->refs = 1;
    call->thread = thread;
    call->start_us = ch_now_us();
    call->alloc = (ProtobufCAllocator){pool_alloc, pool_free, &req->pool};
    ++thread->active_calls;
    ch_call_t **guard = h2o_mem_alloc_shared(&req->pool, sizeof(*guard), on_guard_dispose);
    *guard = call;
    set_request_id(call);
    call->respond_pb = header_has(req, H2O_TOKEN_ACCEPT, "application/x-protobuf") ||
                       (h2o_find_header(&req->headers, H2O_TOKEN_ACCEPT, -1) < 0 &&
                        header_has(req, H2O_TOKEN_CONTENT_TYPE, "application/x-protobuf"));

    char allow[128];
    switch (ch_router_match(ch_server.router, req->method.base, req->method.len, req->path_normalized.base,
                            req->path_normalized.len, &call->match, allow, sizeof(allow))) {
    case CH_MATCH_FOUND:
        break;
    case CH_MATCH_NO_METHOD:
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_ALLOW, NULL, h2o_strdup(&req->pool, allow, SIZE_MAX).base,
                       strlen(allow));
        ch_fail(call, CH_CODE_METHOD_NOT_ALLOWED, "this path does not accept %.*s", (int)req->method.len,
                req->method.base);
        return 0;
    default:
        ch_fail(call, CH_CODE_NOT_FOUND, "no such route");
        return 0;
    }
    size_t max_body = call->match.route->max_body != 0 ? call->match.route->max_body : ch_server.config.max_body_bytes;
    if (req->entity.base != NULL && req->entity.len > max_body) {
        ch_fail(call, CH_CODE_PAYLOAD_TOO_LARGE, "the body is larger than %zu bytes", max_body);
        return 0;
    }
    if (authenticate_or_respond(call) != 0 || decode_body_or_respond(call) != 0 || idempotency_or_respond(call) != 0)
        return 0;
    run_handler(call);
    return 0;
}
