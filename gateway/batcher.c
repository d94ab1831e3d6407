/* Group commit on a loop thread (see cityhall/batcher.h): the queue, the two timers and the in-flight bounds. */
#include <stdlib.h>
#include "cityhall/batcher.h"

struct ch_batcher {
    h2o_loop_t *loop;
    const ch_batcher_ops_t *ops;
    unsigned batch_max, queue_max;
    void **queue; /* ring of queue_max */
    unsigned head, len;
    unsigned inflight;
    unsigned soft, hard;
    h2o_timeout_t defer_timeout, window_timeout;
    h2o_timeout_entry_t defer_entry, window_entry;
};

int ch_batcher_send(ch_batcher_t *b, void **entries, unsigned n)
{
    int ret = b->ops->send(b, entries, n);
    if (ret != 0) {
        for (unsigned i = 0; i < n; ++i)
            b->ops->fail(entries[i], ret);
        return ret;
    }
    ++b->inflight;
    return 0;
}

/* Takes one batch of what waits and sends it; returns 1 when nothing was left to send. */
static int send_one(ch_batcher_t *b)
{
    void *batch[CH_BATCHER_BATCH_LIMIT], *later[CH_BATCHER_BATCH_LIMIT];
    unsigned n = 0, nlater = 0;
    while (b->len != 0 && n < b->batch_max) {
        void *e = b->queue[b->head];
        b->head = (b->head + 1) % b->queue_max;
        --b->len;
        if (ch_call_gone(b->ops->call(e))) {
            b->ops->drop(e);
            continue;
        }
        int conflict = 0;
        for (unsigned j = 0; b->ops->conflicts != NULL && j < n && !conflict; ++j)
            conflict = b->ops->conflicts(e, batch[j]);
        if (conflict && nlater < CH_BATCHER_BATCH_LIMIT) {
            later[nlater++] = e;
            continue;
        }
        if (conflict) {
            b->ops->fail(e, CH_EFULL);
            continue;
        }
        batch[n++] = e;
    }
    for (unsigned k = nlater; k-- > 0;) { /* back to the front, in their order */
        b->head = (b->head + b->queue_max - 1) % b->queue_max;
        b->queue[b->head] = later[k];
        ++b->len;
    }
    if (n == 0)
        return 1;
    ch_batcher_send(b, batch, n);
    return 0;
}

/* Sends batches while entries wait and fewer than max_inflight batches are in flight. */
static void flush(ch_batcher_t *b, unsigned max_inflight)
{
    while (b->len != 0 && b->inflight < max_inflight)
        if (send_one(b) != 0)
            break;
    if (b->len == 0)
        h2o_timeout_unlink(&b->window_entry);
}

void ch_batcher_done(ch_batcher_t *b)
{
    --b->inflight;
    if (b->len != 0)
        flush(b, b->soft);
}

static void on_defer(h2o_timeout_entry_t *entry)
{
    ch_batcher_t *b = H2O_STRUCT_FROM_MEMBER(ch_batcher_t, defer_entry, entry);
    flush(b, b->soft);
}

static void on_window(h2o_timeout_entry_t *entry)
{
    ch_batcher_t *b = H2O_STRUCT_FROM_MEMBER(ch_batcher_t, window_entry, entry);
    flush(b, b->hard);
    if (b->len != 0) /* still held back by the hard bound: look again after another window */
        h2o_timeout_link(b->loop, &b->window_timeout, &b->window_entry);
}

ch_batcher_t *ch_batcher_thread(ch_call_t *call, ch_batcher_t **slot, const ch_batcher_config_t *config,
                                const ch_batcher_ops_t *ops)
{
    if (*slot != NULL)
        return *slot;
    ch_batcher_t *b = calloc(1, sizeof(*b));
    void **queue = calloc(config->queue_max, sizeof(*queue));
    if (b == NULL || queue == NULL || config->batch_max == 0 || config->batch_max > CH_BATCHER_BATCH_LIMIT)
        abort();
    unsigned conns = ch_config()->pg_conns > 0 ? (unsigned)ch_config()->pg_conns : 1;
    b->loop = ch_call_req(call)->conn->ctx->loop;
    b->ops = ops;
    b->batch_max = config->batch_max;
    b->queue_max = config->queue_max;
    b->queue = queue;
    b->soft = config->soft != 0 ? config->soft : conns;
    b->hard = conns * config->inflight_per_conn;
    if (b->hard < b->soft)
        b->hard = b->soft;
    h2o_timeout_init(b->loop, &b->defer_timeout, 0);
    h2o_timeout_init(b->loop, &b->window_timeout, config->window_ms);
    b->defer_entry.cb = on_defer;
    b->window_entry.cb = on_window;
    *slot = b;
    return b;
}

int ch_batcher_push(ch_batcher_t *b, ch_call_t *call, void *entry)
{
    if (b->len == b->queue_max)
        return CH_EFULL;
    ch_call_hold(call);
    b->queue[(b->head + b->len) % b->queue_max] = entry;
    ++b->len;
    if (b->len >= b->batch_max) {
        flush(b, b->hard);
        return 0;
    }
    if (b->inflight < b->soft && !h2o_timeout_is_linked(&b->defer_entry))
        h2o_timeout_link(b->loop, &b->defer_timeout, &b->defer_entry); /* at the end of this loop iteration */
    if (!h2o_timeout_is_linked(&b->window_entry))
        h2o_timeout_link(b->loop, &b->window_timeout, &b->window_entry);
    return 0;
}
