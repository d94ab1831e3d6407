/* Group commit on a loop thread: writes queued by many requests leave for PostgreSQL as batches. */
#ifndef CITYHALL_BATCHER_H
#define CITYHALL_BATCHER_H

#include "cityhall/module.h"

/*
 * A request queues its write once its answer is ready (ch_batcher_push); what a loop thread has queued is sent as
 * one transaction (one WAL flush for all its rows):
 *  - at the end of the loop iteration in which it arrived, when fewer than `soft` batches are in flight;
 *  - else as soon as a batch in flight finishes (ch_batcher_done): what arrived meanwhile is the next batch, so that
 *    batches grow by themselves under load and stay at one entry at low load;
 *  - else `window_ms` after the first waiting entry, up to `hard` batches in flight: the bound on how long an entry
 *    waits for a free connection;
 *  - at once when `batch_max` entries wait.
 * Each request is answered by the service only after the batch holding its write committed. A batcher belongs to
 * one loop thread and is only touched there.
 */

#define CH_BATCHER_BATCH_LIMIT 256

typedef struct ch_batcher ch_batcher_t;

typedef struct ch_batcher_ops {
    /* The call that queued `entry` (held by ch_batcher_push; the service lets go of it, ch_call_unhold). */
    ch_call_t *(*call)(void *entry);
    /* Sends entries[0..n) as one write; the array is the batcher's, valid during the call only. 0: sent, and the
     * service answers each entry and calls ch_batcher_done once when the write finished. Else an error: nothing
     * was kept, and the batcher fails every entry with it. */
    int (*send)(ch_batcher_t *b, void **entries, unsigned n);
    /* Answers `entry` with `err` (if its call is not gone) and lets go of it. */
    void (*fail)(void *entry, int err);
    /* Lets go of an entry whose call went away before it was sent: nothing to write or answer. */
    void (*drop)(void *entry);
    /* Optional: nonzero when `entry` must not share a batch with `other` (e.g. the same Idempotency-Key): it waits
     * for the next batch. */
    int (*conflicts)(const void *entry, const void *other);
} ch_batcher_ops_t;

typedef struct ch_batcher_config {
    unsigned batch_max;         /* entries per batch, at most CH_BATCHER_BATCH_LIMIT */
    unsigned queue_max;         /* entries waiting per thread; beyond it ch_batcher_push refuses (503) */
    unsigned window_ms;         /* the longest an entry waits while `soft` batches are in flight */
    unsigned soft;              /* batches in flight that an arrival or a finished batch may start; 0: one per pool
                                   connection */
    unsigned inflight_per_conn; /* hard bound: this many batches per pool connection */
} ch_batcher_config_t;

/* The calling thread's batcher kept in `*slot` (a __thread pointer of the service), made on first use. */
ch_batcher_t *ch_batcher_thread(ch_call_t *call, ch_batcher_t **slot, const ch_batcher_config_t *config,
                                const ch_batcher_ops_t *ops);

/* Queues `entry` for `call` and holds the call. CH_EFULL when the queue is full: nothing was taken or held. */
int ch_batcher_push(ch_batcher_t *b, ch_call_t *call, void *entry);

/* Sends entries[0..n) now as one batch, whatever is in flight (e.g. a refused batch again, one entry at a time).
 * On an error the entries are failed with it and the error is returned. */
int ch_batcher_send(ch_batcher_t *b, void **entries, unsigned n);

/* A batch sent through ops->send has finished and its entries are answered: the next one may go. */
void ch_batcher_done(ch_batcher_t *b);

#endif
