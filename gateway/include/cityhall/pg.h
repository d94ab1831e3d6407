/* Asynchronous PostgreSQL on the h2o event loop: libpq non-blocking + pipeline mode, per-thread pool. */
#ifndef CITYHALL_PG_H
#define CITYHALL_PG_H

#include <stdint.h>
#include <libpq-fe.h>
#include <h2o.h>

/** A prepared statement, declared once by a module's store and prepared on every connection. */
typedef struct ch_pg_stmt {
    const char *name;
    const char *sql;
    int nparams;
} ch_pg_stmt_t;

/** One statement execution: text-format parameters (NULL = SQL NULL), lengths NULL for C strings. */
typedef struct ch_pg_query {
    const ch_pg_stmt_t *stmt;
    const char *const *values;
    const int *lengths;
} ch_pg_query_t;

/**
 * What a submission produced. `err` is 0 when every statement succeeded; otherwise CH_EDB (the server
 * refused a statement: `sqlstate` and `message` say why, nothing was committed), CH_ETIMEDOUT or
 * CH_EUNAVAIL (the outcome of a write is then unknown), or CH_ECLOSED (the pool is being freed).
 * `res[i]` is the result of query i (NULL when err != 0; `nres` is always the submission's n).
 * `message` is also set, to a short fixed text, for the non-CH_EDB errors; `sqlstate` only for CH_EDB.
 * Everything is borrowed: valid only during the callback (the results are PQclear-ed after it).
 */
typedef struct ch_pg_result {
    int err;
    int nres;
    PGresult **res;
    const char *sqlstate;
    const char *message;
} ch_pg_result_t;

typedef void (*ch_pg_cb)(void *arg, ch_pg_result_t *result);

typedef struct ch_pg_config {
    const char *conninfo;
    unsigned conns;           /* connections per thread */
    unsigned queue_max;       /* submissions waiting or in flight per thread before CH_EFULL */
    uint64_t timeout_ms;      /* per submission, from enqueue to result */
    uint64_t connect_timeout_ms;
} ch_pg_config_t;

typedef struct ch_pg_pool ch_pg_pool_t;

/**
 * Registers a statement for every pool created afterwards (call before threads start). `stmt` must stay
 * valid for the life of the process (a static); names must be unique. Statements are prepared on each
 * connection after it connects. One that fails to prepare (say, its table is not migrated yet) is logged,
 * and prepared again in front of its next use on that connection: it heals once the schema is there,
 * and until then a submission using it fails alone with CH_EDB and the server's reason (e.g. 42P01).
 */
void ch_pg_register(const ch_pg_stmt_t *stmt);

/**
 * Creates a pool on `loop` and starts connecting (asynchronously, with backoff on failure). Give the
 * server as an IP address or a unix socket path (a host name would be resolved on the loop). Zero config
 * fields take defaults: 1 connection, queue_max 1024, timeout 5000 ms, connect timeout 2000 ms.
 * Returns NULL when conninfo does not parse.
 */
ch_pg_pool_t *ch_pg_pool_new(h2o_loop_t *loop, const ch_pg_config_t *config);
/**
 * Closes every connection; pending callbacks are called with CH_ECLOSED before it returns. Call it from
 * the loop's thread but not from inside a ch_pg callback.
 */
void ch_pg_pool_free(ch_pg_pool_t *pool);

/**
 * Runs `n` statements as one transaction (one pipeline sync: statements before a sync form one
 * implicit transaction, so either all commit or none). Parameters are copied. Returns 0 and later
 * calls `cb` exactly once, never before returning; or returns CH_EFULL / CH_EUNAVAIL / CH_ECLOSED
 * and never calls `cb`. CH_EINVAL: n outside 1..256, no `cb`, or a statement not registered before
 * the pool was created. `cb` may submit again (chaining is supported).
 */
int ch_pg_submit(ch_pg_pool_t *pool, const ch_pg_query_t *queries, int n, ch_pg_cb cb, void *arg);

/**
 * Runs `n` read-only statements, with the contract of ch_pg_submit (same returns, same callback guarantees,
 * results in statement order), but cheaper under load: the reads submitted to a connection during one iteration
 * of the event loop go out back to back and share one pipeline sync (up to 128 reads per sync), hence one send()
 * and one flush of the server's output, at the end of the iteration. When a statement fails, the server skips the
 * rest of the batch without running it: the submission whose statement failed gets CH_EDB; the ones it skipped are
 * sent again, transparently (alone after a second such skip), and never fail because of another caller's error.
 * Reads of a batch share one implicit transaction (never with a write: ch_pg_submit ends an open batch first), and
 * a failure later in the batch rolls it back after earlier reads have reported success. So use it only for
 * statements that change nothing: no INSERT/UPDATE/DELETE, no nextval() or other side effects, no SELECT ... FOR
 * UPDATE (its lock would last until the batch's sync), no SET. With n > 1 the statements run in order on one
 * connection, and, as with ch_pg_submit under READ COMMITTED, each sees its own snapshot.
 */
int ch_pg_submit_read(ch_pg_pool_t *pool, const ch_pg_query_t *queries, int n, ch_pg_cb cb, void *arg);

/** Counts for /readyz and /metrics. */
typedef struct ch_pg_stats {
    unsigned conns_up;
    unsigned queued;     /* waiting for a connection */
    unsigned inflight;   /* sent, waiting for results */
    uint64_t timeouts;   /* submissions failed with CH_ETIMEDOUT */
    uint64_t failures;   /* connections lost or written off, and failed connection attempts */
    uint64_t reconnects; /* connections re-established after having been up once */
    uint64_t syncs;      /* pipeline syncs sent: one per ch_pg_submit, one per batch of ch_pg_submit_read */
    uint64_t resent;     /* reads sent again because a batch-mate's failure made the server skip them */
} ch_pg_stats_t;
void ch_pg_pool_stats(ch_pg_pool_t *pool, ch_pg_stats_t *stats);

#endif
