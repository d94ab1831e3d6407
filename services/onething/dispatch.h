/* What the dispatch engineer's files share: the outbound HTTP client, decisions, licences and the item catalog
 * look-ups. */
#ifndef ONETHING_DISPATCH_H
#define ONETHING_DISPATCH_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "onething.h"
#include "cityhall/transcode.h"

/* ---- http_client.c: blocking HTTP/1.1 POSTs for the dispatch threads (never a loop thread) ---- */

/** A parsed department URL: http://IPv4:port/path or http://[IPv6]:port/path (no DNS, no TLS). */
typedef struct ot_url {
    char host[64]; /* the IP literal, without brackets */
    int port;
    char path[512];
    int family; /* AF_INET or AF_INET6 */
} ot_url_t;

/** Parses `url`; returns 0 or CH_EINVAL with a reason in `why`. */
int ot_url_parse(const char *url, ot_url_t *out, const char **why);

#define OT_HTTP_POOL_MAX     32 /* idle keep-alive connections kept per thread */
#define OT_HTTP_PARALLEL_MAX 64 /* requests in flight at once in one run */

typedef struct ot_http_idle {
    int fd; /* -1: free */
    char host[64];
    int port;
} ot_http_idle_t;

/** The keep-alive connections one thread keeps between runs. */
typedef struct ot_http_pool {
    ot_http_idle_t idle[OT_HTTP_POOL_MAX];
} ot_http_pool_t;

void ot_http_pool_init(ot_http_pool_t *pool);
void ot_http_pool_clear(ot_http_pool_t *pool);

/** One POST of a run: the caller fills url, headers ("name: value\r\n" each), body, len. */
typedef struct ot_http_req {
    const ot_url_t *url;
    const char *headers;
    const char *body;
    size_t len;
    int status;      /* out: the HTTP status (100..599), or CH_EUNAVAIL (could not connect, the connection broke),
                        CH_ETIMEDOUT, CH_EINVAL (not an HTTP answer), CH_ECLOSED (not tried: its endpoint was
                        unreachable earlier in this run) */
    const char *why; /* out: a short reason when status < 0 (static text, never a body) */
} ot_http_req_t;

/**
 * POSTs every request (application/json), up to `parallel` at once and at most `per_endpoint` at once to one
 * host:port, each on its own connection: an idle one from `pool` or a new non-blocking connect. Every wait is
 * bounded: connect_ms to connect, then response_ms for the request to be written and the whole answer read.
 * Answers are read and dropped; connections that may be reused go back to `pool`. A pooled connection the peer
 * had closed is retried once on a new one. Blocking: for the dispatch threads, never a loop thread.
 */
void ot_http_run(ot_http_pool_t *pool, ot_http_req_t *reqs, size_t n, unsigned parallel, unsigned per_endpoint,
                 unsigned connect_ms, unsigned response_ms);

/* ---- signatures shared by dispatch (outbound) and callbacks (inbound) ---- */

/** Lower-case hex HMAC-SHA-256 over "<t>.<body>" with `secret` into out (65 bytes). */
void ot_sign_body(const char *secret, size_t secret_len, int64_t t, const void *body, size_t len, char out[65]);
/** Parses x-cityhall-signature (t=<unix seconds>,v1=<64 hex>) into `t` and `v1` (lower case); 0 or -1. */
int ot_signature_parse(const char *header, long long *t, char v1[65]);
/** 0 when `v1` is the signature of "<t>.<body>" with `secret` (compared in constant time), else -1. */
int ot_signature_check(const char *secret, size_t secret_len, long long t, const char v1[65], const void *body,
                       size_t len);

/* ---- licences.c ---- */

/** The licence ring (<var>/keys/licence), created when missing; NULL before ot_licences_init. */
int ot_licences_init(const ch_config_t *config);

/** What an approval needs to issue a licence, gathered before the deciding transaction. */
typedef struct ot_licence {
    char licence_id[37];
    char number[80];
    char *signature; /* call memory */
    char *data_json; /* call memory: licences.data */
    int64_t issued_at, valid_until;
} ot_licence_t;

/**
 * Issues (numbers, dates, signs) the licence of an approved item: `type` the item code, `name` the item's
 * name, `issuer` the department, `holder_name` the holder's name (masked inside), `seq` a fresh number of
 * licence_seq, `dept_number` the department's own number ("" for none), `fields` the item's form values
 * (non-sensitive ones are copied into the licence's data). Returns 0 or CH_EINVAL (no signing key).
 */
int ot_licence_issue(ch_call_t *call, const char *type, const char *name, const char *issuer, const char *holder_name,
                     long long seq, const char *dept_number, json_t *fields, ot_licence_t *out);

/* ---- decide.c: the one path every decision takes (department callbacks and staff) ---- */

/** Decrypts an application's sealed form values (hex of fields_enc) into a JSON object; NULL if it does not open. */
json_t *ot_fields_open(const char *hex);

/** Statements of the request paths, listed in ot_dispatch_stmts (dispatch.c). */
extern const ch_pg_stmt_t ot_stmt_decide_context;   /* decide.c */
extern const ch_pg_stmt_t ot_stmt_callback_context; /* decide.c */
extern const ch_pg_stmt_t ot_stmt_decide;           /* decide.c */
extern const ch_pg_stmt_t ot_stmt_tasks;            /* tasks.c */
extern const ch_pg_stmt_t ot_stmt_licences;         /* licences.c */

#endif
