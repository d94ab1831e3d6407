/* The module contract: what a service declares (routes, statements) and what a handler may call. */
#ifndef CITYHALL_MODULE_H
#define CITYHALL_MODULE_H

#include <stddef.h>
#include <h2o.h>
#include <protobuf-c/protobuf-c.h>
#include "cityhall/ch.h"
#include "cityhall/config.h"
#include "cityhall/pg.h"
#include "cityhall/redis.h"
#include "google/protobuf/timestamp.pb-c.h"

typedef struct ch_call ch_call_t;
typedef void (*ch_handler_fn)(ch_call_t *call);

enum {
    /** Creates something: honours Idempotency-Key (replay of the first result, 422 on another body). */
    CH_ROUTE_IDEMPOTENT = 1u << 0,
    /** The handler answers with ch_reply_raw (images, text); `response` is then NULL. */
    CH_ROUTE_RAW = 1u << 1,
};

/**
 * Whose data a route acts on, declared by every route next to its roles: the authorization matrix
 * (tests/integration/test_authz_matrix.py) calls each route as each kind of caller and checks the answers
 * against it. 0 is "undeclared": the gateway refuses to start with such a route.
 */
typedef enum ch_own {
    CH_OWN_UNDECLARED = 0,
    /** No per-resource check: the route is public, or holding one of its roles is enough. */
    CH_OWN_NONE,
    /** The caller's own data, with no resource id in the path (/v1/me/..., the caller's session). */
    CH_OWN_SELF,
    /** A path parameter names one citizen's resource: anyone else gets the same 404 as for an unknown id. */
    CH_OWN_CITIZEN,
    /**
     * Resources of one department (the token's `dept`): another department's caller gets 404 for a resource,
     * sees none of them in a list, and 403 for a write that only the owning department makes.
     */
    CH_OWN_DEPARTMENT,
} ch_own_t;

/** "none", "self", "citizen", "department", or "undeclared". */
const char *ch_own_name(ch_own_t own);

/**
 * One row of a service's route table. `path` is matched segment by segment; a segment written
 * `{name}` captures one segment (read it with ch_call_param). A literal segment may end in a
 * literal suffix after a parameter, e.g. "/v1/health/code.png" is simply literal.
 */
typedef struct ch_route {
    const char *method;
    const char *path;
    unsigned roles;                                /* CH_PUBLIC or a mask of CH_ROLE_* */
    ch_own_t own;                                  /* whose data it acts on; never CH_OWN_UNDECLARED */
    const ProtobufCMessageDescriptor *request;     /* NULL: the route takes no body */
    const ProtobufCMessageDescriptor *response;    /* NULL with status 204, or CH_ROUTE_RAW */
    ch_handler_fn handler;
    unsigned flags;
    size_t max_body; /* bytes; 0: the gateway's max_body_bytes (bulk uploads set more) */
} ch_route_t;

/**
 * A subcommand of the `cityhall` binary (`cityhall staff add ...`). It runs off any event loop, so
 * blocking libpq (PQconnectdb, PQexec) is fine there. `argv[0]` is the command name; returns the exit status.
 */
typedef struct ch_command {
    const char *name;   /* e.g. "staff add", "keys rotate" (the words after `cityhall`) */
    const char *usage;  /* one line: arguments and what it does */
    int (*run)(const ch_config_t *config, int argc, char **argv);
} ch_command_t;

/** What a service module declares, once. The gateway lists the modules in gateway/modules.c. */
typedef struct ch_module {
    const char *name;
    const ch_route_t *routes;
    size_t nroutes;
    const ch_pg_stmt_t *const *stmts; /* NULL-terminated; prepared on every PostgreSQL connection */
    const ch_command_t *commands;     /* NULL or NULL-name-terminated */
    /** Called once by `cityhall serve` before threads start (load keys...); non-zero aborts start-up. */
    int (*init)(const ch_config_t *config);
    /** Called by `cityhall seed` (off the loop); prints what a newcomer needs to stdout. */
    int (*seed)(const ch_config_t *config, int argc, char **argv);
} ch_module_t;

/**
 * Concatenates NULL-terminated statement lists (a module's files each keep their own) into `out`, NULL-
 * terminated, for ch_module_t.stmts. Returns 0, or -1 (logged) when `cap` is too small.
 */
int ch_stmts_concat(const ch_pg_stmt_t **out, size_t cap, const ch_pg_stmt_t *const *const *lists, size_t nlists);

/** Who is calling, as established by the gateway from the bearer token. */
typedef struct ch_principal {
    unsigned role;          /* exactly one CH_ROLE_* */
    const char *subject;    /* account id (citizen id, staff id, kiosk device id, client id) */
    const char *session_id;
    const char *dept;       /* department code (staff, dept), or NULL */
    const char *hall;       /* service hall (staff, kiosk), or NULL */
    const char *actor;      /* the staff member acting for a citizen (`act` claim), or NULL */
    const char *device;     /* the kiosk a citizen session is bound to, or NULL */
    int64_t expires_at;     /* the token's exp (Unix seconds) */
} ch_principal_t;

/* ---- reading the call ---- */

/** The decoded request body (a message of route->request), or NULL for routes without a body. */
void *ch_call_body(ch_call_t *call);
/** A path parameter captured by `{name}`, NUL-terminated; NULL if the route has no such name. */
const char *ch_call_param(ch_call_t *call, const char *name);
/** A query-string parameter, percent-decoded and NUL-terminated; NULL if absent. */
const char *ch_call_query(ch_call_t *call, const char *name);
/** The authenticated principal, or NULL on public routes. */
const ch_principal_t *ch_call_principal(ch_call_t *call);
const char *ch_call_request_id(ch_call_t *call);
/** The Idempotency-Key header of an idempotent route, or NULL. */
const char *ch_call_idempotency_key(ch_call_t *call);
/** A request header's value (NUL-terminated), or NULL; `name` in lower case. */
const char *ch_call_header(ch_call_t *call, const char *name);
/** The event loop (thread) index serving the call. */
unsigned ch_call_thread(ch_call_t *call);
/** The underlying h2o request, for raw routes; NULL once the client has gone. */
h2o_req_t *ch_call_req(ch_call_t *call);

/* ---- memory that lives as long as the call ---- */

void *ch_call_alloc(ch_call_t *call, size_t size);
char *ch_call_strdup(ch_call_t *call, const char *s);
char *ch_call_printf(ch_call_t *call, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/**
 * A Timestamp (in the call's memory) from PostgreSQL's epoch seconds as text, e.g.
 * `extract(epoch FROM t)::numeric(20,6)` → "1795894410.618068", read exactly; NULL for NULL or "".
 */
Google__Protobuf__Timestamp *ch_call_timestamp(ch_call_t *call, const char *epoch_text);
/** A protobuf-c allocator for building response messages (freed with the call). */
ProtobufCAllocator *ch_call_allocator(ch_call_t *call);

/* ---- answering (exactly once per call) ---- */

/** Answers `status` with `msg` (a message of route->response) in the client's encoding; NULL for 204. */
void ch_reply(ch_call_t *call, int status, const ProtobufCMessage *msg);
/** Answers the error shape; the message is for people and never carries personal data. */
void ch_fail(ch_call_t *call, ch_code_t code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/** Like ch_fail, listing every field that was refused in the error body's `details` (field, description). */
void ch_fail_fields(ch_call_t *call, ch_code_t code, const char *const *fields, const char *const *descriptions,
                    size_t n, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/** Like ch_fail, with an explicit Retry-After (seconds) for 429 and 503 (ch_fail sends 1). */
void ch_fail_retry_after(ch_call_t *call, ch_code_t code, int retry_after_s, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/** Answers a CH_E* return code: 503 + Retry-After for CH_EFULL/CH_EUNAVAIL/CH_ETIMEDOUT, 500 otherwise. */
void ch_fail_err(ch_call_t *call, int err);
/**
 * Answers with a response message encoded earlier (a cache of route->response in both encodings): the
 * one the client asked for is copied and sent. Lets a hot path skip encoding on a cache hit.
 */
void ch_reply_encoded(ch_call_t *call, int status, const void *json, size_t json_len, const void *pb, size_t pb_len);
/** Adds a response header (lower-case name). A Cache-Control set here replaces the default no-store. */
void ch_call_add_header(ch_call_t *call, const char *name, const char *value);
/** Answers a raw body (CH_ROUTE_RAW routes); `body` is copied. */
void ch_reply_raw(ch_call_t *call, int status, const char *content_type, const void *body, size_t len);

/* ---- asynchronous work tied to the call ---- */

/**
 * The callbacks below are invoked only while the client is still waiting: if the request died
 * (client reset, timeout) the result is dropped and the callback never runs.
 */
typedef void (*ch_call_pg_cb)(ch_call_t *call, ch_pg_result_t *result);
typedef void (*ch_call_redis_cb)(ch_call_t *call, redisReply *reply, int err);

/** Runs statements as one transaction on this thread's pool. On error returns CH_E* and never calls cb. */
int ch_call_pg(ch_call_t *call, const ch_pg_query_t *queries, int n, ch_call_pg_cb cb);
/**
 * Like ch_call_pg for statements that change nothing (no writes, nextval(), FOR UPDATE, SET): reads of one
 * loop iteration share one pipeline sync and one send (ch_pg_submit_read). Use it on hot read paths.
 */
int ch_call_pg_read(ch_call_t *call, const ch_pg_query_t *queries, int n, ch_call_pg_cb cb);
/**
 * Runs the statements that create something, as one transaction. On an idempotent route called with an
 * Idempotency-Key, the key is claimed in that same transaction together with the answer the handler will
 * give (`status`, `response`), so a retry replays that answer exactly once the write committed, even if
 * the gateway died before answering. The handler then answers with ch_reply(call, status, response).
 */
int ch_call_pg_commit(ch_call_t *call, const ch_pg_query_t *queries, int n, int status, const ProtobufCMessage *response,
                      ch_call_pg_cb cb);
/**
 * For writes batched across calls (group commit): fills `values` with the six parameters of the gateway's
 * claim statement (scope, key, route, request hash hex, status, response hex — the order of
 * `INSERT INTO idempotency_keys (scope, key, route, request_hash, status, response)` with the hashes
 * through decode(.., 'hex')), to insert in the batch's own transaction. Returns CH_ENOTFOUND (nothing
 * filled) when the call carries no Idempotency-Key.
 */
int ch_call_idempotency_claim(ch_call_t *call, int status, const ProtobufCMessage *response, const char *values[6]);
/** Answers a call whose key turned out to be claimed already: replays the stored answer, or 422 for another body. */
void ch_call_idempotency_replay(ch_call_t *call);
/** Sends one Redis command on this thread's connection. On error returns CH_E* and never calls cb. */
int ch_call_redis(ch_call_t *call, ch_call_redis_cb cb, int argc, const char **argv, const size_t *argvlen);

/**
 * Runs `work` on a worker thread (for CPU-heavy steps such as argon2id), then `done` back on the call's
 * loop. `arg` (`size` bytes) is copied into memory owned by the gateway: `work` may write to it, `done`
 * reads it; it is freed after `done`, or without `done` when the client has gone. Returns CH_EFULL
 * when the worker queue is full, and then never calls either function.
 */
typedef void (*ch_work_fn)(void *arg);
typedef void (*ch_call_work_cb)(ch_call_t *call, void *arg);
int ch_call_work(ch_call_t *call, ch_work_fn work, ch_call_work_cb done, const void *arg, size_t size);

/**
 * Work shared by several calls (group commit). ch_call_hold keeps the call object (not the request) valid
 * until ch_call_unhold; ch_call_gone tells whether it may still be answered. ch_call_pg_detached runs
 * statements on the call's thread pool and calls cb(arg, result) exactly once whatever becomes of the call.
 */
void ch_call_hold(ch_call_t *call);
void ch_call_unhold(ch_call_t *call);
int ch_call_gone(const ch_call_t *call);
int ch_call_pg_detached(ch_call_t *call, const ch_pg_query_t *queries, int n, ch_pg_cb cb, void *arg);

/** The client's IP address as text (for per-IP limits; never logged with personal data). */
const char *ch_call_peer(ch_call_t *call);

/** Per-call scratch pointer for the handler's own state across callbacks. */
void ch_call_set_data(ch_call_t *call, void *data);
void *ch_call_data(ch_call_t *call);

#endif
