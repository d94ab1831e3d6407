/* Worker threads for CPU-heavy steps (argon2id): a bounded queue in, h2o's multithread queue back to the loop. */
#include <pthread.h>
#include <stdlib.h>
#include <h2o/multithread.h>
#include "gateway.h"

typedef struct ch_work_item {
    h2o_multithread_message_t msg; /* first: the receiver hands back this pointer */
    struct ch_work_item *next;
    ch_thread_t *thread;
    void (*work)(void *);
    void (*done)(void *);
    void *arg;
} ch_work_item_t;

typedef struct ch_work_loop {
    h2o_multithread_receiver_t receiver;
} ch_work_loop_t;

/* One queue for the process: the workers share it; `pending` bounds it. */
static struct {
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    ch_work_item_t *head, *tail;
    unsigned pending, max;
} q = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0, 0};

static void *worker_main(void *unused)
{
    for (;;) {
        pthread_mutex_lock(&q.mutex);
        while (q.head == NULL)
            pthread_cond_wait(&q.cond, &q.mutex);
        ch_work_item_t *item = q.head;
        if ((q.head = item->next) == NULL)
            q.tail = NULL;
        pthread_mutex_unlock(&q.mutex);

        item->work(item->arg);
        ch_work_loop_t *wl = item->thread->work;
        h2o_multithread_send_message(&wl->receiver, &item->msg);
    }
    return NULL;
}

static void on_done(h2o_multithread_receiver_t *receiver, h2o_linklist_t *messages)
{
    while (!h2o_linklist_is_empty(messages)) {
        ch_work_item_t *item = H2O_STRUCT_FROM_MEMBER(ch_work_item_t, msg.link, messages->next);
        h2o_linklist_unlink(&item->msg.link);
        pthread_mutex_lock(&q.mutex);
        --q.pending;
        pthread_mutex_unlock(&q.mutex);
        item->done(item->arg);
        free(item);
    }
}

int ch_work_init(unsigned nworkers, unsigned queue_max)
{
    q.max = queue_max;
    for (unsigned i = 0; i < nworkers; ++i) {
        pthread_t tid;
        if (pthread_create(&tid, NULL, worker_main, NULL) != 0)
            return CH_EUNAVAIL;
        pthread_detach(tid);
    }
    return 0;
}

void ch_work_thread_init(ch_thread_t *thread)
{
    ch_work_loop_t *wl = calloc(1, sizeof(*wl));
    if (wl == NULL)
        abort();
    h2o_multithread_register_receiver(thread->ctx.queue, &wl->receiver, on_done);
    thread->work = wl;
}

int ch_work_submit(ch_thread_t *thread, void (*work)(void *), void (*done)(void *), void *arg)
{
    ch_work_item_t *item = calloc(1, sizeof(*item));
    if (item == NULL)
        abort();
    item->thread = thread;
    item->work = work;
    item->done = done;
    item->arg = arg;
    pthread_mutex_lock(&q.mutex);
    if (q.pending >= q.max) {
        pthread_mutex_unlock(&q.mutex);
        free(item);
        return CH_EFULL;
    }
    ++q.pending;
    if (q.tail != NULL)
        q.tail->next = item;
    else
        q.head = item;
    q.tail = item;
    pthread_cond_signal(&q.cond);
    pthread_mutex_unlock(&q.mutex);
    return 0;
}
