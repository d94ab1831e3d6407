/* Gateway configuration: defaults, a `key = value` file, then CITYHALL_* environment overrides. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gateway.h"

typedef enum { T_UINT, T_PORT, T_SIZE, T_STR } ch_config_type_t;

typedef struct ch_config_key {
    const char *name;
    ch_config_type_t type;
    size_t offset;
    size_t size;        /* buffer size for T_STR */
    unsigned long long min, max;
} ch_config_key_t;

#define KEY_UINT(n, lo, hi) {#n, T_UINT, offsetof(ch_config_t, n), 0, lo, hi}
#define KEY_PORT(n) {#n, T_PORT, offsetof(ch_config_t, n), 0, 0, 65535}
#define KEY_SIZE(n, lo, hi) {#n, T_SIZE, offsetof(ch_config_t, n), 0, lo, hi}
#define KEY_STR(n) {#n, T_STR, offsetof(ch_config_t, n), sizeof(((ch_config_t *)0)->n), 0, 0}

/* Every key the gateway understands; the environment name is CITYHALL_ + the upper-case key. */
static const ch_config_key_t keys[] = {
    KEY_UINT(threads, 1, 64),
    KEY_STR(listen),
    KEY_STR(http_listen),
    KEY_PORT(https_port),
    KEY_PORT(http_port),
    KEY_STR(tls_cert),
    KEY_STR(tls_key),
    KEY_STR(var_dir),
    KEY_STR(pg_conninfo),
    KEY_UINT(pg_conns, 1, 64),
    KEY_UINT(pg_queue_max, 1, 1000000),
    KEY_UINT(pg_timeout_ms, 10, 600000),
    KEY_STR(redis_host),
    KEY_PORT(redis_port),
    KEY_UINT(redis_timeout_ms, 10, 600000),
    KEY_UINT(redis_queue_max, 1, 1000000),
    KEY_SIZE(max_body_bytes, 1024, 64u << 20),
    KEY_UINT(shutdown_timeout_ms, 0, 600000),
    KEY_UINT(http2_max_concurrent, 1, 256),
    KEY_UINT(idle_timeout_ms, 100, 3600000),
    KEY_UINT(request_timeout_ms, 1000, 3600000),
    KEY_UINT(max_connections, 1, 1000000),
    KEY_UINT(max_connections_per_ip, 0, 1000000),
    KEY_UINT(max_requests_per_connection, 0, 1000000000),
    KEY_UINT(workers, 1, 64),
    KEY_STR(trusted_proxies),
};

void ch_config_defaults(ch_config_t *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->threads = 2;
    strcpy(cfg->listen, "127.0.0.1");
    strcpy(cfg->http_listen, "127.0.0.1");
    cfg->https_port = 8443;
    cfg->http_port = 8080;
    strcpy(cfg->var_dir, "var");
    strcpy(cfg->pg_conninfo, "host=127.0.0.1 port=5544 dbname=cityhall user=postgres");
    cfg->pg_conns = 2;
    cfg->pg_queue_max = 4096;
    cfg->pg_timeout_ms = 3000;
    strcpy(cfg->redis_host, "127.0.0.1");
    cfg->redis_port = 6544;
    cfg->redis_timeout_ms = 1000;
    cfg->redis_queue_max = 8192;
    cfg->max_body_bytes = 1 << 20;
    cfg->shutdown_timeout_ms = 10000;
    cfg->http2_max_concurrent = 100;
    cfg->idle_timeout_ms = 60000;
    cfg->request_timeout_ms = 10000;
    cfg->max_connections = 8192;
    cfg->max_connections_per_ip = 512;
    cfg->max_requests_per_connection = 100000;
    cfg->workers = 2;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int parse_number(const char *value, unsigned long long *out)
{
    char *end;
    if (!isdigit((unsigned char)value[0]))
        return -1;
    errno = 0;
    *out = strtoull(value, &end, 10);
    if (errno != 0 || *end != '\0')
        return -1;
    return 0;
}

int ch_config_set(ch_config_t *cfg, const char *key, const char *value, char *err, size_t errlen)
{
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); ++i) {
        const ch_config_key_t *k = &keys[i];
        if (strcmp(k->name, key) != 0)
            continue;
        char *field = (char *)cfg + k->offset;
        if (k->type == T_STR) {
            if (strlen(value) >= k->size) {
                set_err(err, errlen, "%s: value too long (at most %zu bytes)", key, k->size - 1);
                return CH_EINVAL;
            }
            strcpy(field, value);
            return 0;
        }
        unsigned long long n;
        if (parse_number(value, &n) != 0 || n < k->min || n > k->max) {
            set_err(err, errlen, "%s: expected a whole number from %llu to %llu, got \"%s\"", key, k->min, k->max, value);
            return CH_EINVAL;
        }
        switch (k->type) {
        case T_UINT:
            *(unsigned *)field = (unsigned)n;
            break;
        case T_PORT:
            *(int *)field = (int)n;
            break;
        case T_SIZE:
            *(size_t *)field = (size_t)n;
            break;
        default:
            break;
        }
        return 0;
    }
    set_err(err, errlen, "unknown setting \"%s\"", key);
    return CH_EINVAL;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        ++s;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

static int load_file(ch_config_t *cfg, const char *path, char *err, size_t errlen)
{
    FILE *fp = fopen(path, "r");
    if (fp == NULL) {
        set_err(err, errlen, "could not open config file %s: %s", path, strerror(errno));
        return CH_EINVAL;
    }
    char line[2048], sub[256];
    int lineno = 0, ret = 0;
    while (fgets(line, sizeof(line), fp) != NULL) {
        ++lineno;
        char *s = trim(line);
        if (*s == '\0' || *s == '#')
            continue;
        char *eq = strchr(s, '=');
        if (eq == NULL) {
            set_err(err, errlen, "%s:%d: expected \"key = value\"", path, lineno);
            ret = CH_EINVAL;
            break;
        }
        *eq = '\0';
        if (ch_config_set(cfg, trim(s), trim(eq + 1), sub, sizeof(sub)) != 0) {
            set_err(err, errlen, "%s:%d: %s", path, lineno, sub);
            ret = CH_EINVAL;
            break;
        }
    }
    fclose(fp);
    return ret;
}

/* trusted_proxies: IPv4 or IPv6 addresses, comma-separated (no ranges: the edge's own addresses). */
static int trusted_proxies_check(const char *list, char *err, size_t errlen)
{
    const char *p = list;
    while (*p != '\0') {
        size_t n = strcspn(p, ",");
        char addr[INET6_ADDRSTRLEN];
        unsigned char bin[sizeof(struct in6_addr)];
        if (n == 0 || n >= sizeof(addr) || (p[n] == ',' && p[n + 1] == '\0')) {
            set_err(err, errlen, "trusted_proxies: expected comma-separated IP addresses");
            return CH_EINVAL;
        }
        memcpy(addr, p, n);
        addr[n] = '\0';
        if (inet_pton(AF_INET, addr, bin) != 1 && inet_pton(AF_INET6, addr, bin) != 1) {
            set_err(err, errlen, "trusted_proxies: %s is not an IP address", addr);
            return CH_EINVAL;
        }
        p += n + (p[n] == ',');
    }
    return 0;
}

int ch_config_load(ch_config_t *cfg, const char *path, char *err, size_t errlen)
{
    if (path != NULL && load_file(cfg, path, err, errlen) != 0)
        return CH_EINVAL;
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); ++i) {
        char env[64] = "CITYHALL_", sub[256];
        size_t n = strlen(env);
        for (const char *p = keys[i].name; *p != '\0' && n + 1 < sizeof(env); ++p)
            env[n++] = (char)toupper((unsigned char)*p);
        env[n] = '\0';
        const char *value = getenv(env);
        /* CITYHALL_VAR is the data folder's documented name. */
        if (value == NULL && strcmp(keys[i].name, "var_dir") == 0)
            value = getenv("CITYHALL_VAR");
        if (value != NULL && ch_config_set(cfg, keys[i].name, value, sub, sizeof(sub)) != 0) {
            set_err(err, errlen, "environment %s: %s", env, sub);
            return CH_EINVAL;
        }
    }
    if (cfg->tls_cert[0] == '\0')
        snprintf(cfg->tls_cert, sizeof(cfg->tls_cert), "%s/tls/cert.pem", cfg->var_dir);
    if (cfg->tls_key[0] == '\0')
        snprintf(cfg->tls_key, sizeof(cfg->tls_key), "%s/tls/key.pem", cfg->var_dir);
    if (cfg->https_port == 0 && cfg->http_port == 0) {
        set_err(err, errlen, "no listener: https_port and http_port are both 0");
        return CH_EINVAL;
    }
    return trusted_proxies_check(cfg->trusted_proxies, err, errlen);
}
