/* The gateway's settings, as modules and their commands see them (read-only after start-up). */
#ifndef CITYHALL_CONFIG_H
#define CITYHALL_CONFIG_H

#include <stddef.h>

typedef struct ch_config {
    unsigned threads;
    char listen[64];          /* address of the TLS listener */
    char http_listen[64];     /* address of the cleartext listener: internal traffic, loopback unless set */
    int https_port;           /* 0: no TLS listener */
    int http_port;            /* 0: no cleartext listener (h2c prior knowledge + HTTP/1.1) */
    char tls_cert[512];
    char tls_key[512];
    char var_dir[400];        /* data folder: keys/, sms-outbox.jsonl, ... */
    char pg_conninfo[1024];
    unsigned pg_conns;        /* per thread */
    unsigned pg_queue_max;    /* per thread */
    unsigned pg_timeout_ms;
    char redis_host[64];
    int redis_port;
    unsigned redis_timeout_ms;
    unsigned redis_queue_max;
    size_t max_body_bytes;
    unsigned shutdown_timeout_ms;
    unsigned http2_max_concurrent; /* streams handled at once per connection */
    unsigned idle_timeout_ms;
    unsigned workers;         /* threads for CPU-heavy work (password hashing) */

    /* connection limits (conns.c); idle_timeout_ms also ends connections on which no byte moves */
    unsigned request_timeout_ms;          /* to receive a whole request; HTTP/1 keep-alive idle time */
    unsigned max_connections;             /* open per thread; newer ones are closed at accept */
    unsigned max_connections_per_ip;      /* open per client address over all threads; 0: no cap */
    unsigned max_requests_per_connection; /* HTTP/2 streams before GOAWAY; 0: no budget */

    /* comma-separated addresses of the edge (ops/haproxy): a request from one of them is attributed to the client
       address the edge appended to X-Forwarded-For (per-address limits); empty: nobody is trusted */
    char trusted_proxies[256];
} ch_config_t;

/** The running server's configuration (valid in handlers and module init). */
const ch_config_t *ch_config(void);

#endif
