/* Unit tests of configuration: defaults, the key = value file, environment overrides, clear refusals. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "gateway.h"
#include "tap.h"

static const char *write_tmp(const char *text)
{
    static char path[64];
    strcpy(path, "/tmp/ch_config_XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        abort();
    close(fd);
    return path;
}

int main(void)
{
    ch_config_t cfg;
    char err[512];
    /* the test controls its environment */
    static const char *vars[] = {"CITYHALL_THREADS", "CITYHALL_HTTP_PORT", "CITYHALL_HTTPS_PORT", "CITYHALL_VAR",
                                 "CITYHALL_VAR_DIR", "CITYHALL_PG_CONNINFO", "CITYHALL_MAX_BODY_BYTES",
                                 "CITYHALL_TLS_CERT", "CITYHALL_TLS_KEY"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); ++i)
        unsetenv(vars[i]);

    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, NULL, err, sizeof(err)) == 0, "defaults alone are a valid configuration");
    tap_ok(cfg.https_port == 8443 && cfg.http_port == 8080, "default ports are 8443 (TLS) and 8080 (cleartext)");
    tap_is_str(cfg.listen, "127.0.0.1", "the default listen address is loopback");
    tap_is_str(cfg.tls_cert, "var/tls/cert.pem", "the certificate defaults to the data folder");
    tap_ok(cfg.max_body_bytes == 1048576, "the default body limit is 1 MiB");

    const char *path = write_tmp("# comment\n\nthreads = 4\nhttp_port=9090\n  pg_conninfo = host=127.0.0.1 port=1 \n");
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) == 0, "a file with comments, blank lines and spaces loads");
    tap_ok(cfg.threads == 4 && cfg.http_port == 9090, "file values are applied");
    tap_is_str(cfg.pg_conninfo, "host=127.0.0.1 port=1", "values keep inner spaces and lose outer ones");
    unlink(path);

    path = write_tmp("threads = 4\n");
    setenv("CITYHALL_THREADS", "3", 1);
    setenv("CITYHALL_VAR", "/srv/ch", 1);
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) == 0 && cfg.threads == 3, "the environment wins over the file");
    tap_is_str(cfg.var_dir, "/srv/ch", "CITYHALL_VAR sets the data folder");
    tap_is_str(cfg.tls_key, "/srv/ch/tls/key.pem", "the TLS key follows the data folder");
    unsetenv("CITYHALL_THREADS");
    unsetenv("CITYHALL_VAR");
    unlink(path);

    path = write_tmp("thread = 4\n");
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) != 0 && strstr(err, "unknown setting \"thread\"") && strstr(err, ":1:"),
           "an unknown key is refused with its line number");
    unlink(path);

    path = write_tmp("http_port = 70000\n");
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) != 0 && strstr(err, "http_port"), "an out-of-range port is refused");
    unlink(path);

    path = write_tmp("threads = two\n");
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) != 0 && strstr(err, "threads"), "a non-number is refused");
    unlink(path);

    path = write_tmp("threads\n");
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) != 0 && strstr(err, "key = value"), "a line without = is refused");
    unlink(path);

    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, "/nonexistent/cityhall.conf", err, sizeof(err)) != 0 && strstr(err, "could not open"),
           "a missing file is refused");

    setenv("CITYHALL_MAX_BODY_BYTES", "-5", 1);
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, NULL, err, sizeof(err)) != 0 && strstr(err, "CITYHALL_MAX_BODY_BYTES"),
           "a bad environment value is refused naming the variable");
    unsetenv("CITYHALL_MAX_BODY_BYTES");

    setenv("CITYHALL_HTTP_PORT", "0", 1);
    setenv("CITYHALL_HTTPS_PORT", "0", 1);
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, NULL, err, sizeof(err)) != 0 && strstr(err, "no listener"),
           "disabling both listeners is refused");
    unsetenv("CITYHALL_HTTP_PORT");
    unsetenv("CITYHALL_HTTPS_PORT");

    path = write_tmp("trusted_proxies = 127.0.0.1,::1,10.0.0.7\n");
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) == 0, "trusted_proxies takes IPv4 and IPv6 addresses");
    unlink(path);

    path = write_tmp("trusted_proxies = 127.0.0.1,10.0.0.0/8\n");
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) != 0 && strstr(err, "10.0.0.0/8 is not an IP address"),
           "trusted_proxies refuses what is not an address (ranges included)");
    unlink(path);

    path = write_tmp("trusted_proxies = 127.0.0.1,\n");
    ch_config_defaults(&cfg);
    tap_ok(ch_config_load(&cfg, path, err, sizeof(err)) != 0 && strstr(err, "trusted_proxies"),
           "trusted_proxies refuses an empty entry");
    unlink(path);
    return tap_done();
}
