/* Asynchronous Redis on the h2o event loop: hiredis async with timeouts and reconnection. */
#ifndef CITYHALL_REDIS_H
#define CITYHALL_REDIS_H

#include <stdint.h>
#include <stddef.h>
#include <hiredis/hiredis.h>
#include <h2o.h>

typedef struct ch_redis_config {
    const char *host;         /* an IP address (no DNS on the loop) */
    int port;
    const char *unix_path;    /* used instead of host/port when set */
    const char *password;     /* AUTH on connect when set */
    uint64_t timeout_ms;      /* per command */
    unsigned queue_max;       /* commands in flight per connection before CH_EFULL */
} ch_redis_config_t;

typedef struct ch_redis ch_redis_t;

/**
 * Called once per command. `reply` is borrowed (valid during the call) and NULL when `err` is
 * CH_ETIMEDOUT, CH_EUNAVAIL or CH_ECLOSED. A Redis error reply arrives as reply->type REDIS_REPLY_ERROR.
 */
typedef void (*ch_redis_cb)(void *arg, redisReply *reply, int err);

/** Creates a connection on `loop`; it connects asynchronously and reconnects with backoff. */
ch_redis_t *ch_redis_new(h2o_loop_t *loop, const ch_redis_config_t *config);
/** Disconnects; pending callbacks are called with CH_ECLOSED. */
void ch_redis_free(ch_redis_t *r);

/**
 * Sends a command (hiredis format string). Returns 0 and later calls `cb` exactly once (never
 * before returning), or returns CH_EUNAVAIL / CH_EFULL and never calls `cb`. `cb` may be NULL.
 */
int ch_redis_command(ch_redis_t *r, ch_redis_cb cb, void *arg, const char *fmt, ...);
int ch_redis_commandargv(ch_redis_t *r, ch_redis_cb cb, void *arg, int argc, const char **argv,
                         const size_t *argvlen);

/** Subscribes (on a dedicated connection, re-subscribed after reconnects) to `channel`; `cb` gets each message payload. */
typedef void (*ch_redis_message_cb)(void *arg, const char *channel, const char *payload, size_t len);
int ch_redis_subscribe(ch_redis_t *r, const char *channel, ch_redis_message_cb cb, void *arg);

typedef struct ch_redis_stats {
    int connected;
    unsigned inflight;
    uint64_t timeouts, failures, reconnects;
} ch_redis_stats_t;
void ch_redis_stats(ch_redis_t *r, ch_redis_stats_t *stats);

#endif
