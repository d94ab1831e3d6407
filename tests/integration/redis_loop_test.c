/* Drives gateway/redis.c against a real redis-server at host:port: TAP checks of its contract, or an outage monitor. */

/*
 *   redis_loop_test HOST PORT                      TAP checks (needs a disposable Redis: it kills its own clients)
 *   redis_loop_test HOST PORT outage [SECONDS]     a steady stream of INCRs for SECONDS (10), one line per second;
 *                                                  kill, restart, SIGSTOP/SIGCONT the server meanwhile
 */

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <h2o.h>

#include "cityhall/ch.h"
#include "cityhall/redis.h"
#include "../unit/tap.h"

/* The gateway defines this elsewhere; weak so that the test can also be linked with it. */
__attribute__((weak)) uint64_t ch_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static uint64_t now_ms(void)
{
    return ch_now_us() / 1000;
}

static uint64_t wall_ms(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

static h2o_loop_t *loop;
static const char *host;
static int port;
static const char *password; /* $CH_REDIS_PASSWORD, for a server started with --requirepass */
static char prefix[64];      /* keys and channels of this run: "chtest:<pid>" */

/* Set around every ch_redis_command: a callback that sees it was called before the command returned. */
static int in_submit, early_callbacks;

#define SUBMIT(ret, ...)                                                                                               \
    do {                                                                                                               \
        in_submit = 1;                                                                                                 \
        (ret) = ch_redis_command(__VA_ARGS__);                                                                         \
        in_submit = 0;                                                                                                 \
    } while (0)

static void run_for(uint64_t ms)
{
    uint64_t end = now_ms() + ms;
    while (now_ms() < end)
        h2o_evloop_run(loop, 10);
}

static int run_until(const int *flag, uint64_t max_ms)
{
    uint64_t end = now_ms() + max_ms;
    while (!*flag && now_ms() < end)
        h2o_evloop_run(loop, 10);
    return *flag;
}

static int wait_connected(ch_redis_t *r, uint64_t max_ms)
{
    uint64_t end = now_ms() + max_ms;
    ch_redis_stats_t s;
    for (;;) {
        ch_redis_stats(r, &s);
        if (s.connected || now_ms() >= end)
            return s.connected;
        h2o_evloop_run(loop, 10);
    }
}

static ch_redis_t *make(uint64_t timeout_ms, unsigned queue_max)
{
    ch_redis_config_t c = {
        .host = host, .port = port, .password = password, .timeout_ms = timeout_ms, .queue_max = queue_max};
    if (host[0] == '/') {
        c.host = NULL;
        c.unix_path = host;
    }
    return ch_redis_new(loop, &c);
}

/* ---- a one-shot capture of one command's outcome (replies are borrowed, so values are copied) ---- */

typedef struct capture {
    int calls, err, type;
    long long integer;
    size_t len;
    char str[128];
    ch_redis_t *free_me; /* ch_redis_free this from inside the callback */
    ch_redis_t *probe;   /* send a command from inside the callback and record what it returned */
    int probe_ret;
} capture_t;

static void on_capture(void *arg, redisReply *reply, int err)
{
    capture_t *c = arg;
    early_callbacks += in_submit;
    ++c->calls;
    c->err = err;
    c->type = reply != NULL ? reply->type : 0;
    if (reply != NULL) {
        c->integer = reply->integer;
        c->len = reply->len;
        if (reply->str != NULL) {
            size_t n = reply->len < sizeof(c->str) - 1 ? reply->len : sizeof(c->str) - 1;
            memcpy(c->str, reply->str, n);
            c->str[n] = '\0';
        }
    }
    if (c->probe != NULL) {
        c->probe_ret = ch_redis_command(c->probe, NULL, NULL, "PING");
        c->probe = NULL;
    }
    if (c->free_me != NULL) {
        ch_redis_t *r = c->free_me;
        c->free_me = NULL;
        ch_redis_free(r);
    }
}

static int all_called(const capture_t *c, int n)
{
    for (int i = 0; i < n; ++i)
        if (c[i].calls == 0)
            return 0;
    return 1;
}

static int run_until_all(const capture_t *c, int n, uint64_t max_ms)
{
    uint64_t end = now_ms() + max_ms;
    while (!all_called(c, n) && now_ms() < end)
        h2o_evloop_run(loop, 10);
    return all_called(c, n);
}

static int count_calls(const capture_t *c, int n, int want_calls, int want_err)
{
    int k = 0;
    for (int i = 0; i < n; ++i)
        k += c[i].calls == want_calls && c[i].err == want_err;
    return k;
}

/* ---- pipelined INCRs ---- */

static struct {
    long long last;
    int done, out_of_order, errors;
} incr;

static void on_incr(void *arg, redisReply *reply, int err)
{
    early_callbacks += in_submit;
    ++incr.done;
    if (err != 0 || reply == NULL || reply->type != REDIS_REPLY_INTEGER) {
        ++incr.errors;
        return;
    }
    if (reply->integer != incr.last + 1)
        ++incr.out_of_order;
    incr.last = reply->integer;
}

/* ---- throughput with a fixed window of commands in flight ---- */

static struct {
    ch_redis_t *r;
    int window, inflight, stop;
    uint64_t completed, errors;
} tp;

static void tp_refill(void);

static void on_tp(void *arg, redisReply *reply, int err)
{
    early_callbacks += in_submit;
    --tp.inflight;
    if (err != 0 || reply == NULL || reply->type == REDIS_REPLY_ERROR)
        ++tp.errors;
    else
        ++tp.completed;
    tp_refill();
}

static void tp_refill(void)
{
    while (!tp.stop && tp.inflight < tp.window) {
        int ret;
        SUBMIT(ret, tp.r, on_tp, NULL, "GET %s:k", prefix);
        if (ret != 0)
            break;
        ++tp.inflight;
    }
}

static double measure(ch_redis_t *r, int window, uint64_t ms)
{
    memset(&tp, 0, sizeof(tp));
    tp.r = r;
    tp.window = window;
    uint64_t start = ch_now_us();
    tp_refill();
    run_for(ms);
    tp.stop = 1;
    uint64_t elapsed = ch_now_us() - start;
    double rate = tp.completed * 1e6 / (double)elapsed;
    while (tp.inflight > 0 && ch_now_us() - start < (ms + 5000) * 1000)
        h2o_evloop_run(loop, 10);
    return rate;
}

/* ---- pub/sub ---- */

static struct {
    int received;
    char channel[128];
    char payload[128];
} msg;

static void on_msg(void *arg, const char *channel, const char *payload, size_t len)
{
    if (arg != NULL)
        ch_redis_free(arg); /* the test of ch_redis_free inside a message callback */
    ++msg.received;
    snprintf(msg.channel, sizeof(msg.channel), "%s", channel);
    size_t n = len < sizeof(msg.payload) - 1 ? len : sizeof(msg.payload) - 1;
    memcpy(msg.payload, payload, n);
    msg.payload[n] = '\0';
}

/* Publishes every 50 ms through `r` until a message arrives; returns ms waited or -1. */
static long publish_until_received(ch_redis_t *r, const char *channel, const char *payload, uint64_t max_ms)
{
    uint64_t start = now_ms();
    msg.received = 0;
    while (!msg.received && now_ms() - start < max_ms) {
        ch_redis_command(r, NULL, NULL, "PUBLISH %s %s", channel, payload);
        uint64_t slice = now_ms() + 50;
        while (!msg.received && now_ms() < slice)
            h2o_evloop_run(loop, 10);
    }
    return msg.received ? (long)(now_ms() - start) : -1;
}

static int closed_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    getsockname(fd, (struct sockaddr *)&sa, &len);
    close(fd);
    return ntohs(sa.sin_port);
}

static int checks(void)
{
    ch_redis_stats_t st;
    int ret;

    /* ---- configuration ---- */
    {
        ch_redis_config_t c = {.host = "localhost", .port = port};
        tap_ok(ch_redis_new(loop, &c) == NULL, "a host name is refused (no DNS on the loop)");
    }

    /* generous timeout: the tail of the 100 000-command burst waits behind the rest (slow under sanitizers) */
    ch_redis_t *r = make(20000, 200000);
    tap_ok(r != NULL, "ch_redis_new accepts an IP address");
    ch_redis_stats(r, &st);
    SUBMIT(ret, r, on_capture, NULL, "PING");
    tap_ok(!st.connected && ret == CH_EUNAVAIL,
           "before the first PONG: not connected, commands refused with CH_EUNAVAIL");
    tap_ok(wait_connected(r, 5000), "connects within 5 s");

    /* ---- round trips ---- */
    {
        capture_t set = {0}, get = {0};
        SUBMIT(ret, r, on_capture, &set, "SET %s:k %s", prefix, "hello world");
        tap_ok(ret == 0, "SET is accepted");
        SUBMIT(ret, r, on_capture, &get, "GET %s:k", prefix);
        tap_ok(set.calls == 0 && get.calls == 0, "no callback runs before ch_redis_command returns");
        run_until(&get.calls, 2000);
        tap_ok(set.calls == 1 && set.err == 0 && set.type == REDIS_REPLY_STATUS && strcmp(set.str, "OK") == 0,
               "SET answers +OK");
        tap_ok(get.calls == 1 && get.err == 0 && get.type == REDIS_REPLY_STRING && strcmp(get.str, "hello world") == 0,
               "GET returns what SET stored");
    }
    {
        char key[96];
        snprintf(key, sizeof(key), "%s:bin", prefix);
        const char *sargv[] = {"SET", key, "a\0b"}, *gargv[] = {"GET", key};
        const size_t sargvlen[] = {3, strlen(key), 3}, gargvlen[] = {3, strlen(key)};
        capture_t set = {0}, get = {0};
        in_submit = 1;
        int r1 = ch_redis_commandargv(r, on_capture, &set, 3, sargv, sargvlen);
        int r2 = ch_redis_commandargv(r, on_capture, &get, 2, gargv, gargvlen);
        in_submit = 0;
        run_until(&get.calls, 2000);
        tap_ok(r1 == 0 && r2 == 0 && get.calls == 1 && get.len == 3 && memcmp(get.str, "a\0b", 3) == 0,
               "ch_redis_commandargv is binary safe");
    }

    /* ---- error replies ---- */
    {
        capture_t e1 = {0}, e2 = {0}, after = {0};
        SUBMIT(ret, r, on_capture, &e1, "INCR %s:k", prefix);
        SUBMIT(ret, r, on_capture, &e2, "NOSUCHCOMMAND %s", "x");
        SUBMIT(ret, r, on_capture, &after, "PING");
        run_until(&after.calls, 2000);
        tap_ok(e1.calls == 1 && e1.err == 0 && e1.type == REDIS_REPLY_ERROR && strstr(e1.str, "not an integer") != NULL,
               "INCR of a string arrives as REDIS_REPLY_ERROR with err 0 (%s)", e1.str);
        tap_ok(e2.calls == 1 && e2.err == 0 && e2.type == REDIS_REPLY_ERROR,
               "an unknown command arrives as REDIS_REPLY_ERROR");
        tap_ok(after.calls == 1 && after.err == 0 && strcmp(after.str, "PONG") == 0,
               "the connection stays usable after error replies");
    }
    {
        SUBMIT(ret, r, on_capture, NULL, "SUBSCRIBE %s:x", prefix);
        int r2 = ch_redis_commandargv(r, on_capture, NULL, 0, NULL, NULL);
        int r3;
        SUBMIT(r3, r, on_capture, NULL, "monitor");
        tap_ok(ret == CH_EINVAL && r2 == CH_EINVAL && r3 == CH_EINVAL,
               "SUBSCRIBE/MONITOR and empty commands are refused with CH_EINVAL");
    }

    /* ---- 100 000 pipelined INCRs ---- */
    {
        capture_t del = {0};
        SUBMIT(ret, r, on_capture, &del, "DEL %s:n", prefix);
        run_until(&del.calls, 2000);
        memset(&incr, 0, sizeof(incr));
        int refused = 0;
        enum { N = 100000 };
        uint64_t start = ch_now_us();
        for (int i = 0; i < N; ++i) {
            SUBMIT(ret, r, on_incr, NULL, "INCR %s:n", prefix);
            refused += ret != 0;
        }
        ch_redis_stats(r, &st);
        uint64_t end_ms = now_ms() + 30000;
        while (incr.done < N - refused && now_ms() < end_ms)
            h2o_evloop_run(loop, 10);
        uint64_t elapsed = ch_now_us() - start;
        tap_ok(refused == 0 && st.inflight >= N, "100000 INCRs are accepted in flight at once (queue_max 200000)");
        tap_ok(incr.done == N && incr.errors == 0 && incr.out_of_order == 0,
               "100000 pipelined INCRs complete, each answered in order (done %d, errors %d, out of order %d)",
               incr.done, incr.errors, incr.out_of_order);
        capture_t get = {0};
        SUBMIT(ret, r, on_capture, &get, "GET %s:n", prefix);
        run_until(&get.calls, 2000);
        tap_ok(incr.last == N && strcmp(get.str, "100000") == 0, "the final value is 100000 (%s)", get.str);
        printf("# 100000 pipelined INCRs in %.1f ms: %.0f round trips/s\n", elapsed / 1000.0, N * 1e6 / elapsed);
    }

    /* ---- throughput ---- */
    {
        int windows[] = {1, 16, 256, 4096};
        for (size_t i = 0; i < sizeof(windows) / sizeof(windows[0]); ++i) {
            double rate = measure(r, windows[i], 1500);
            printf("# GET with %4d in flight: %8.0f round trips/s (errors %llu)\n", windows[i], rate,
                   (unsigned long long)tp.errors);
        }
        tap_ok(tp.errors == 0 && tp.inflight == 0, "throughput runs complete without errors");
    }

    /* ---- bounded queue ---- */
    {
        ch_redis_t *q = make(1000, 8);
        wait_connected(q, 5000);
        capture_t c[9] = {{0}};
        int accepted = 0;
        for (int i = 0; i < 8; ++i) {
            SUBMIT(ret, q, on_capture, &c[i], "PING");
            accepted += ret == 0;
        }
        SUBMIT(ret, q, on_capture, &c[8], "PING");
        tap_ok(accepted == 8 && ret == CH_EFULL,
               "with queue_max 8, the 9th command in flight gets CH_EFULL synchronously");
        run_until_all(c, 8, 2000);
        run_for(50);
        tap_ok(count_calls(c, 8, 1, 0) == 8 && c[8].calls == 0,
               "the 8 accepted commands are answered once each; the refused one never is");
        SUBMIT(ret, q, on_capture, &c[8], "PING");
        tap_ok(ret == 0, "once drained, commands are accepted again");
        run_until(&c[8].calls, 2000);
        ch_redis_free(q);
    }

    /* ---- pub/sub ---- */
    char channel[96];
    snprintf(channel, sizeof(channel), "%s:chan", prefix);
    {
        tap_ok(ch_redis_subscribe(r, channel, on_msg, NULL) == 0, "ch_redis_subscribe accepts a channel");
        long waited = publish_until_received(r, channel, "hello subscribers", 5000);
        tap_ok(waited >= 0 && strcmp(msg.channel, channel) == 0 && strcmp(msg.payload, "hello subscribers") == 0,
               "a PUBLISH through the command connection reaches the subscriber (%ld ms)", waited);
    }
    {
        ch_redis_stats(r, &st);
        uint64_t reconnects = st.reconnects;
        capture_t kill = {0};
        SUBMIT(ret, r, on_capture, &kill, "CLIENT KILL TYPE pubsub");
        run_until(&kill.calls, 2000);
        long waited = publish_until_received(r, channel, "after the kill", 5000);
        ch_redis_stats(r, &st);
        tap_ok(kill.integer >= 1 && waited >= 0 && strcmp(msg.payload, "after the kill") == 0 &&
                   st.reconnects > reconnects,
               "the subscription survives a killed subscriber connection (back after %ld ms)", waited);
    }

    /* ---- connection loss ---- */
    {
        capture_t id = {0};
        SUBMIT(ret, r, on_capture, &id, "CLIENT ID");
        run_until(&id.calls, 2000);
        enum { N = 10 };
        capture_t kill = {0}, pings[N] = {{0}};
        SUBMIT(ret, r, on_capture, &kill, "CLIENT KILL ID %lld SKIPME no", id.integer);
        for (int i = 0; i < N; ++i)
            SUBMIT(ret, r, on_capture, &pings[i], "PING");
        pings[0].probe = r;
        run_until_all(pings, N, 3000);
        uint64_t lost_at = now_ms();
        run_for(20);
        tap_ok(kill.calls == 1 && count_calls(pings, N, 1, CH_EUNAVAIL) == N,
               "commands in flight when the server closes the connection get CH_EUNAVAIL exactly once");
        tap_ok(pings[0].probe_ret == CH_EUNAVAIL, "a command sent from that callback is refused with CH_EUNAVAIL");
        ch_redis_stats(r, &st);
        tap_ok(!st.connected && st.failures >= 1, "stats: not connected, failure counted");
        tap_ok(wait_connected(r, 3000), "reconnects (after %llu ms)", (unsigned long long)(now_ms() - lost_at));
        long waited = publish_until_received(r, channel, "after reconnect", 3000);
        tap_ok(waited >= 0, "commands and subscription work after the reconnect");
    }

    /* ---- timeouts ---- */
    {
        ch_redis_t *t = make(300, 100);
        wait_connected(t, 5000);
        enum { N = 6 };
        capture_t c[N] = {{0}};
        SUBMIT(ret, t, on_capture, &c[0], "BLPOP %s:nolist 0", prefix); /* never answers */
        for (int i = 1; i < N; ++i)
            SUBMIT(ret, t, on_capture, &c[i], "PING");
        c[0].probe = t;
        uint64_t start = now_ms();
        run_until_all(c, N, 3000);
        uint64_t took = now_ms() - start;
        run_for(20);
        ch_redis_stats(t, &st);
        tap_ok(count_calls(c, N, 1, CH_ETIMEDOUT) == N && st.timeouts == N,
               "a command unanswered after timeout_ms fails with CH_ETIMEDOUT, with everything behind it, once each");
        tap_ok(took >= 280 && took < 1000, "the timeout fires after timeout_ms (300 ms: %llu ms)",
               (unsigned long long)took);
        tap_ok(c[0].probe_ret == CH_EUNAVAIL, "the broken connection refuses new commands at once");
        tap_ok(wait_connected(t, 3000), "reconnects after a timeout");
        capture_t p = {0};
        SUBMIT(ret, t, on_capture, &p, "PING");
        run_until(&p.calls, 2000);
        tap_ok(p.calls == 1 && p.err == 0 && strcmp(p.str, "PONG") == 0, "and answers again");
        ch_redis_free(t);
    }

    /* ---- authentication ---- */
    if (password != NULL) {
        const char *good = password;
        password = "wrong-password";
        ch_redis_t *w = make(300, 100);
        password = good;
        run_for(500);
        ch_redis_stats(w, &st);
        SUBMIT(ret, w, on_capture, NULL, "PING");
        tap_ok(!st.connected && st.failures >= 2 && ret == CH_EUNAVAIL,
               "a wrong password: never connected, retried, commands refused with CH_EUNAVAIL");
        ch_redis_free(w);
    }

    /* ---- unreachable server ---- */
    {
        ch_redis_config_t c = {.host = "127.0.0.1", .port = closed_port(), .timeout_ms = 300};
        ch_redis_t *u = ch_redis_new(loop, &c);
        run_for(400);
        ch_redis_stats(u, &st);
        capture_t x = {0};
        SUBMIT(ret, u, on_capture, &x, "PING");
        tap_ok(ret == CH_EUNAVAIL && !st.connected && st.failures >= 2 && st.failures <= 8,
               "a refused server: CH_EUNAVAIL at once, retried with backoff (%llu attempts in 400 ms)",
               (unsigned long long)st.failures);
        ch_redis_free(u);
        run_for(20);
        tap_ok(x.calls == 0, "a refused command is never called back");

        ch_redis_t *v = make(1000, 100);
        ch_redis_free(v);
        run_for(20);
        tap_ok(1, "ch_redis_free while connecting is safe");
    }

    /* ---- ch_redis_free ---- */
    {
        ch_redis_t *f = make(1000, 1000);
        wait_connected(f, 5000);
        enum { N = 100 };
        capture_t c[N] = {{0}};
        for (int i = 0; i < N; ++i)
            SUBMIT(ret, f, on_capture, &c[i], "PING");
        ch_redis_free(f);
        int at_free = count_calls(c, N, 1, CH_ECLOSED);
        run_for(50);
        tap_ok(at_free == N && count_calls(c, N, 1, CH_ECLOSED) == N,
               "ch_redis_free calls every pending callback with CH_ECLOSED, once");
    }
    {
        ch_redis_t *f = make(1000, 1000);
        wait_connected(f, 5000);
        enum { N = 10 };
        capture_t c[N] = {{0}};
        for (int i = 0; i < N; ++i)
            SUBMIT(ret, f, on_capture, &c[i], "PING");
        c[0].free_me = f;
        c[1].probe = f;
        run_until_all(c, N, 2000);
        run_for(50);
        tap_ok(c[0].calls == 1 && c[0].err == 0 && count_calls(c + 1, N - 1, 1, CH_ECLOSED) == N - 1,
               "ch_redis_free inside a reply callback: the rest get CH_ECLOSED once");
        tap_ok(c[1].probe_ret == CH_ECLOSED, "commands sent after ch_redis_free get CH_ECLOSED");
    }
    {
        ch_redis_t *f = make(200, 1000);
        wait_connected(f, 5000);
        enum { N = 5 };
        capture_t c[N] = {{0}};
        SUBMIT(ret, f, on_capture, &c[0], "BLPOP %s:nolist 0", prefix);
        for (int i = 1; i < N; ++i)
            SUBMIT(ret, f, on_capture, &c[i], "PING");
        c[0].free_me = f;
        run_until_all(c, N, 2000);
        run_for(50);
        tap_ok(count_calls(c, N, 1, CH_ETIMEDOUT) == N,
               "ch_redis_free inside a timeout callback: every callback still once");
    }
    {
        ch_redis_t *f = make(1000, 1000);
        wait_connected(f, 5000);
        capture_t c = {0};
        SUBMIT(ret, f, on_capture, &c, "PING");
        ch_redis_subscribe(f, channel, on_msg, NULL);
        run_until(&c.calls, 2000);
        run_for(100);
        ch_redis_free(f);
        run_for(20);
        tap_ok(c.calls == 1, "ch_redis_free with a subscriber connection");
    }
    {
        ch_redis_t *f = make(1000, 1000);
        wait_connected(f, 5000);
        char ch2[112];
        snprintf(ch2, sizeof(ch2), "%s:free", channel);
        ch_redis_subscribe(f, ch2, on_msg, f);
        capture_t c = {0};
        SUBMIT(ret, f, on_capture, &c, "BLPOP %s:nolist 0", prefix); /* pending when the message frees f */
        long waited = publish_until_received(r, ch2, "free me", 5000);
        run_for(50);
        tap_ok(waited >= 0 && c.calls == 1 && c.err == CH_ECLOSED,
               "ch_redis_free inside a message callback: pending commands get CH_ECLOSED once");
    }

    /* ---- clean up ---- */
    {
        capture_t del = {0};
        SUBMIT(ret, r, on_capture, &del, "DEL %s:k %s:n %s:bin", prefix, prefix, prefix);
        run_until(&del.calls, 2000);
        tap_ok(del.calls == 1 && del.err == 0, "test keys deleted");
    }
    ch_redis_free(r);
    run_for(20);
    tap_ok(early_callbacks == 0, "no callback ever ran before its ch_redis_command returned (%d)", early_callbacks);
    return 0;
}

/* ---- outage mode ---- */

enum { O_OK, O_ERRREPLY, O_UNAVAIL_SYNC, O_FULL_SYNC, O_UNAVAIL, O_TIMEDOUT, O_CLOSED, O_MSG, O__COUNT };
static const char *const o_names[] = {"ok",      "err_reply", "unavail_sync", "full_sync",
                                      "unavail", "timedout",  "closed",       "msgs"};

static struct {
    ch_redis_t *r;
    uint64_t sec[O__COUNT], total[O__COUNT];
    unsigned char *calls; /* per accepted command: how many times its callback ran */
    size_t ncalls, cap;
    uint64_t accepted, completed, duplicates;
    int stop;
    uint64_t start, last_ok, outage_from; /* monotonic ms; outage_from 0 while healthy */
    uint64_t longest_outage;
    int outages;
    h2o_timeout_t tick_timeout, second_timeout;
    h2o_timeout_entry_t tick, second;
    char channel[96];
    unsigned seconds, per_tick;
} o;

static void o_note_ok(void)
{
    uint64_t t = now_ms();
    if (o.outage_from != 0) {
        uint64_t len = t - o.outage_from;
        printf("# outage %d: from +%.3f s to +%.3f s: %llu ms without a successful command (recovered at wall %llu)\n",
               ++o.outages, (o.outage_from - o.start) / 1000.0, (t - o.start) / 1000.0, (unsigned long long)len,
               (unsigned long long)wall_ms());
        fflush(stdout);
        if (len > o.longest_outage)
            o.longest_outage = len;
        o.outage_from = 0;
    }
    o.last_ok = t;
}

static void o_note_failure(void)
{
    if (o.outage_from == 0) {
        o.outage_from = o.last_ok != 0 ? o.last_ok : now_ms();
        printf("# outage begins at +%.3f s (wall %llu)\n", (now_ms() - o.start) / 1000.0,
               (unsigned long long)wall_ms());
        fflush(stdout);
    }
}

static void on_o_reply(void *arg, redisReply *reply, int err)
{
    size_t id = (size_t)(uintptr_t)arg;
    early_callbacks += in_submit;
    if (o.calls[id]++ != 0)
        ++o.duplicates;
    ++o.completed;
    int k = err == 0              ? (reply->type == REDIS_REPLY_ERROR ? O_ERRREPLY : O_OK)
            : err == CH_EUNAVAIL  ? O_UNAVAIL
            : err == CH_ETIMEDOUT ? O_TIMEDOUT
                                  : O_CLOSED;
    ++o.sec[k];
    if (k == O_OK)
        o_note_ok();
    else
        o_note_failure();
}

static void on_o_msg(void *arg, const char *channel, const char *payload, size_t len)
{
    ++o.sec[O_MSG];
}

static void on_o_tick(h2o_timeout_entry_t *entry)
{
    if (o.stop)
        return;
    h2o_timeout_link(loop, &o.tick_timeout, &o.tick);
    for (unsigned i = 0; i < o.per_tick; ++i) {
        if (o.ncalls == o.cap) {
            o.cap = o.cap ? o.cap * 2 : 1 << 16;
            o.calls = realloc(o.calls, o.cap);
            if (o.calls == NULL)
                abort();
        }
        size_t id = o.ncalls;
        int ret;
        SUBMIT(ret, o.r, on_o_reply, (void *)(uintptr_t)id, "INCR %s:outage", prefix);
        if (ret == 0) {
            o.calls[o.ncalls++] = 0;
            ++o.accepted;
        } else {
            ++o.sec[ret == CH_EFULL ? O_FULL_SYNC : O_UNAVAIL_SYNC];
            o_note_failure();
        }
    }
}

static void on_o_second(h2o_timeout_entry_t *entry)
{
    static unsigned n;
    ch_redis_stats_t st;
    ch_redis_stats(o.r, &st);
    ch_redis_command(o.r, NULL, NULL, "PUBLISH %s %s", o.channel, "tick");
    printf("# t=%2u", ++n);
    for (int k = 0; k < O__COUNT; ++k) {
        printf(" %s=%llu", o_names[k], (unsigned long long)o.sec[k]);
        o.total[k] += o.sec[k];
        o.sec[k] = 0;
    }
    printf(" connected=%d inflight=%u timeouts=%llu failures=%llu reconnects=%llu\n", st.connected, st.inflight,
           (unsigned long long)st.timeouts, (unsigned long long)st.failures, (unsigned long long)st.reconnects);
    fflush(stdout);
    if (n < o.seconds)
        h2o_timeout_link(loop, &o.second_timeout, &o.second);
    else
        o.stop = 1;
}

static int outage(unsigned seconds)
{
    o.seconds = seconds;
    o.per_tick = 10; /* every ms: ~10 k commands/s */
    ch_redis_t *r = o.r = make(500, 50000);
    tap_ok(r != NULL && wait_connected(r, 5000), "connected");
    snprintf(o.channel, sizeof(o.channel), "%s:outage", prefix);
    ch_redis_subscribe(r, o.channel, on_o_msg, NULL);
    h2o_timeout_init(loop, &o.tick_timeout, 1);
    h2o_timeout_init(loop, &o.second_timeout, 1000);
    o.tick.cb = on_o_tick;
    o.second.cb = on_o_second;
    o.start = now_ms();
    printf("# outage mode: %u s from wall %llu\n", seconds, (unsigned long long)wall_ms());
    fflush(stdout);
    h2o_timeout_link(loop, &o.tick_timeout, &o.tick);
    h2o_timeout_link(loop, &o.second_timeout, &o.second);
    while (!o.stop)
        h2o_evloop_run(loop, 10);
    h2o_timeout_unlink(&o.tick);

    /* drain: everything accepted must be answered within the command timeout */
    uint64_t end = now_ms() + 3000;
    while (o.completed < o.accepted && now_ms() < end)
        h2o_evloop_run(loop, 10);
    for (int k = 0; k < O__COUNT; ++k)
        o.total[k] += o.sec[k];
    printf("# totals:");
    for (int k = 0; k < O__COUNT; ++k)
        printf(" %s=%llu", o_names[k], (unsigned long long)o.total[k]);
    printf(" accepted=%llu outages=%d longest=%llu ms\n", (unsigned long long)o.accepted, o.outages,
           (unsigned long long)o.longest_outage);

    size_t never = 0;
    for (size_t i = 0; i < o.ncalls; ++i)
        never += o.calls[i] == 0;
    tap_ok(o.completed == o.accepted && never == 0 && o.duplicates == 0,
           "every accepted command was called back exactly once (accepted %llu, completed %llu, never %zu, twice %llu)",
           (unsigned long long)o.accepted, (unsigned long long)o.completed, never, (unsigned long long)o.duplicates);
    tap_ok(early_callbacks == 0, "no callback before its command returned");
    tap_ok(o.outage_from == 0 && wait_connected(r, 100), "healthy at the end (the last command succeeded)");
    ch_redis_free(r);
    h2o_timeout_dispose(loop, &o.tick_timeout);
    h2o_timeout_dispose(loop, &o.second_timeout);
    free(o.calls);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOST PORT [outage [SECONDS]]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    host = argv[1];
    port = atoi(argv[2]);
    password = getenv("CH_REDIS_PASSWORD");
    snprintf(prefix, sizeof(prefix), "chtest:%d", (int)getpid());
    loop = h2o_evloop_create();

    if (argc >= 4 && strcmp(argv[3], "outage") == 0)
        outage(argc >= 5 ? (unsigned)atoi(argv[4]) : 10);
    else
        checks();

    run_for(20);
    /* asserts that every h2o timeout was disposed, i.e. that ch_redis_free released everything */
    h2o_evloop_destroy(loop);
    printf("# %d passed, %d failed\n", tap_count - tap_failed, tap_failed);
    return tap_done();
}
