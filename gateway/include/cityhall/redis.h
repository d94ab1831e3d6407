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
    uint64_t timeout_ms;      /* per command (0: 1000); the oldest one expiring breaks the connection */
    unsigned queue_max;       /* commands in flight per connection before CH_EFULL (0: 65536) */
} ch_redis_config_t;

typedef struct ch_redis ch_redis_t;

/**
 * Called once per command. `reply` is borrowed (valid during the call) and NULL when `err` is
 * CH_ETIMEDOUT, CH_EUNAVAIL or CH_ECLOSED. A Redis error reply arrives as reply->type REDIS_REPLY_ERROR.
 */
typedef void (*ch_redis_cb)(void *arg, redisReply *reply, int err);

/**
 * Creates a connection on `loop`; it connects asynchronously and reconnects with backoff (50 ms doubling
 * to 2 s, jittered). Commands are refused with CH_EUNAVAIL until the server answered a PING (and AUTH).
 * Returns NULL if `host` is not an IP literal (no DNS on the loop) and no `unix_path` is given, or if no
 * file descriptor is left. Use a ch_redis_t only on the thread that runs `loop`.
 */
ch_redis_t *ch_redis_new(h2o_loop_t *loop, const ch_redis_config_t *config);
/**
 * Disconnects; pending callbacks are called with CH_ECLOSED, exactly once. May be called from any callback
 * of this ch_redis_t (the memory is released when that callback returns); later calls are no-ops until
 * then. Dispose of every ch_redis_t before h2o_evloop_destroy (it owns h2o timeouts).
 */
void ch_redis_free(ch_redis_t *r);

/**
 * Sends a command (hiredis format string). Returns 0 and later calls `cb` exactly once (never
 * before returning), or returns CH_EUNAVAIL / CH_EFULL and never calls `cb`. `cb` may be NULL.
 * Also returns CH_ECLOSED once ch_redis_free was called, and CH_EINVAL for a malformed command or
 * for (P|S)SUBSCRIBE, (P|S)UNSUBSCRIBE and MONITOR (use ch_redis_subscribe).
 * A command in flight when the connection breaks gets CH_ETIMEDOUT (the oldest command exceeded
 * timeout_ms; everything behind it fails too) or CH_EUNAVAIL (connection lost): it may or may not
 * have been executed by the server.
 */
int ch_redis_command(ch_redis_t *r, ch_redis_cb cb, void *arg, const char *fmt, ...);
int ch_redis_commandargv(ch_redis_t *r, ch_redis_cb cb, void *arg, int argc, const char **argv,
                         const size_t *argvlen);

/**
 * Subscribes (on a dedicated connection, re-subscribed after reconnects) to `channel`; `cb` gets each message
 * payload (borrowed). Returns 0 (also while disconnected: the subscription is recorded and made on the next
 * connect), CH_EINVAL or CH_ECLOSED. Messages published while the subscriber connection was down are lost.
 */
typedef void (*ch_redis_message_cb)(void *arg, const char *channel, const char *payload, size_t len);
int ch_redis_subscribe(ch_redis_t *r, const char *channel, ch_redis_message_cb cb, void *arg);

typedef struct ch_redis_stats {
    int connected;       /* the command connection accepts commands */
    unsigned inflight;   /* commands in flight on it (including internal PINGs) */
    uint64_t timeouts;   /* commands that completed with CH_ETIMEDOUT */
    uint64_t failures;   /* connections or connection attempts that ended in an error (both connections) */
    uint64_t reconnects; /* connections re-established after a failure (both connections) */
} ch_redis_stats_t;
void ch_redis_stats(ch_redis_t *r, ch_redis_stats_t *stats);

#endif
