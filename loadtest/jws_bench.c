/*
 * Measures the token path on one core: ES256 signs and verifies per second (jws.c), token issue (auth.c),
 * a full ch_auth_verify (cache miss) and a cached one. Not part of the build; from the repository:
 *
 *   B=/tmp/build-x   # a meson build folder of this tree (libchcore.a and friends)
 *   cc -O2 -D_GNU_SOURCE -DH2O_USE_LIBUV=0 -Igateway/include -Igateway -I$B -I$B/proto loadtest/jws_bench.c \
 *      $B/libchcore.a $B/libchtranscode.a $B/libchproto.a \
 *      $(pkg-config --libs libh2o-evloop libssl libcrypto zlib hiredis libpq jansson libsodium liboath libqrencode \
 *        libprotobuf-c) -lpthread -lm -o /tmp/jws_bench && /tmp/jws_bench [seconds per figure, default 2]
 *
 * Prints one line per figure; pin it to one core (taskset -c 0) for per-core numbers. These machines are noisy, so
 * the signing and verifying figures are also given as a ratio to OpenSSL's own best case measured in the same run
 * (EVP_PKEY_sign / EVP_PKEY_verify of a SHA-256 digest with a context prepared once, as `openssl speed` does).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include "gateway.h"
#include "cityhall/auth.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* OpenSSL's best case on the same key: ops/s of sign (verify = 0) or verify (verify = 1) for `span` seconds. */
static double openssl_reference(EVP_PKEY *key, int verify, double span)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);
    EVP_PKEY_CTX *sctx = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);
    if (ctx == NULL || sctx == NULL || EVP_PKEY_sign_init(sctx) != 1 ||
        (verify ? EVP_PKEY_verify_init(ctx) : EVP_PKEY_sign_init(ctx)) != 1)
        abort();
    uint8_t msg[400], dg[32], sig[80];
    memset(msg, 'a', sizeof(msg));
    SHA256(msg, sizeof(msg), dg);
    size_t sl = sizeof(sig);
    EVP_PKEY_sign(sctx, sig, &sl, dg, 32);
    long n = 0;
    double t0 = now_s(), t;
    do {
        for (int i = 0; i < 50; ++i) {
            SHA256(msg, sizeof(msg), dg);
            uint8_t out[80];
            size_t ol = sizeof(out);
            if ((verify ? EVP_PKEY_verify(ctx, sig, sl, dg, 32) : EVP_PKEY_sign(ctx, out, &ol, dg, 32)) != 1)
                abort();
        }
        n += 50;
    } while ((t = now_s()) - t0 < span);
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_CTX_free(sctx);
    return n / (t - t0);
}

int main(int argc, char **argv)
{
    double span = argc > 1 ? atof(argv[1]) : 2.0;
    char base[] = "/tmp/ch_jws_bench_XXXXXX", dir[200], err[512], kid[64];
    if (mkdtemp(base) == NULL)
        return 1;
    snprintf(dir, sizeof(dir), "%s/keys/access", base);
    if (ch_keyring_rotate(dir, kid, sizeof(kid), err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    ch_keyring_t *ring = ch_keyring_load(dir, err, sizeof(err));
    char pem[300];
    snprintf(pem, sizeof(pem), "%s/%s.pem", dir, kid);
    FILE *fp = fopen(pem, "r");
    EVP_PKEY *key = fp != NULL ? PEM_read_PrivateKey(fp, NULL, NULL, NULL) : NULL;
    if (fp != NULL)
        fclose(fp);
    if (key == NULL)
        return 1;
    double ref_sign = openssl_reference(key, 0, span / 2);
    const char *claims =
        "{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"iat\":1700000000,\"exp\":4000000000,"
        "\"sub\":\"3f9c1a52-8d0e-4c55-9b6e-2f1d7a9c0b11\",\"sid\":\"0b7e3c9a-1111-4d2e-9c41-3f2a1b0c9d8e\","
        "\"role\":\"citizen\",\"jti\":\"q1w2e3r4t5y6u7i8o9p0aa\"}";
    size_t clen = strlen(claims);

    /* signs */
    ch_buf_t tok = {0};
    long n = 0;
    double t0 = now_s(), t;
    do {
        for (int i = 0; i < 100; ++i) {
            tok.len = 0;
            ch_jws_sign(ring, "at+jwt", claims, clen, &tok);
        }
        n += 100;
    } while ((t = now_s()) - t0 < span);
    ref_sign = (ref_sign + openssl_reference(key, 0, span / 2)) / 2;
    printf("openssl reference sign:               %8.0f /s\n", ref_sign);
    printf("ch_jws_sign (ES256):                  %8.0f /s  (%.1f us each, %.2f x the reference)\n", n / (t - t0),
           (t - t0) / n * 1e6, n / (t - t0) / ref_sign);
    double ref_verify = openssl_reference(key, 1, span / 2);

    /* verifies (signature + header + claims parse) and the registered-claim checks */
    n = 0;
    t0 = now_s();
    do {
        for (int i = 0; i < 100; ++i) {
            json_t *c = NULL;
            if (ch_jws_verify(ring, "at+jwt", tok.base, tok.len, &c) != 0 ||
                ch_jwt_check(c, "cityhall", "cityhall-api", time(NULL), 30, NULL) != 0)
                abort();
            json_decref(c);
        }
        n += 100;
    } while ((t = now_s()) - t0 < span);
    ref_verify = (ref_verify + openssl_reference(key, 1, span / 2)) / 2;
    printf("openssl reference verify:             %8.0f /s\n", ref_verify);
    printf("ch_jws_verify + ch_jwt_check:         %8.0f /s  (%.1f us each, %.2f x the reference)\n", n / (t - t0),
           (t - t0) / n * 1e6, n / (t - t0) / ref_verify);

    /* the gateway's own issue and verify */
    snprintf(ch_server.config.var_dir, sizeof(ch_server.config.var_dir), "%s", base);
    snprintf(ch_server.config.pg_conninfo, sizeof(ch_server.config.pg_conninfo), "host=/nonexistent");
    char keyfile[300];
    ch_pii_keys_path(base, keyfile, sizeof(keyfile));
    ch_pii_keys_create(keyfile, err, sizeof(err));
    ch_principal_t p = {CH_ROLE_CITIZEN,
                        "3f9c1a52-8d0e-4c55-9b6e-2f1d7a9c0b11",
                        "0b7e3c9a-1111-4d2e-9c41-3f2a1b0c9d8e",
                        NULL,
                        NULL,
                        NULL,
                        NULL,
                        0};
    enum { NTOK = 4096 };
    ch_buf_t *toks = calloc(NTOK, sizeof(*toks));
    int64_t exp;
    n = 0;
    t0 = now_s();
    for (int i = 0; i < NTOK; ++i, ++n)
        ch_auth_issue(&p, CH_ACCESS_TTL_S, &toks[i], &exp);
    t = now_s();
    printf("ch_auth_issue:                        %8.0f /s  (%.1f us each)\n", n / (t - t0), (t - t0) / n * 1e6);

    if (ch_auth_init(&ch_server.config, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    ch_thread_t th;
    memset(&th, 0, sizeof(th));
    th.rng = 7;
    ch_auth_thread_init(&th);
    h2o_mem_pool_t pool;
    h2o_mem_init_pool(&pool);
    ch_principal_t got;
    t0 = now_s();
    for (int i = 0; i < NTOK; ++i)
        if (ch_auth_verify(&th, toks[i].base, toks[i].len, &pool, &got) != 0)
            abort();
    t = now_s();
    printf("ch_auth_verify, not cached:           %8.0f /s  (%.1f us each)\n", NTOK / (t - t0), (t - t0) / NTOK * 1e6);
    h2o_mem_clear_pool(&pool);

    n = 0;
    t0 = now_s();
    do {
        for (int i = 0; i < NTOK; ++i)
            if (ch_auth_verify(&th, toks[i].base, toks[i].len, &pool, &got) != 0)
                abort();
        n += NTOK;
        h2o_mem_clear_pool(&pool);
    } while ((t = now_s()) - t0 < span);
    printf("ch_auth_verify, cached (4096 tokens): %8.0f /s  (%.0f ns each)\n", n / (t - t0), (t - t0) / n * 1e9);

    n = 0;
    t0 = now_s();
    do {
        for (int i = 0; i < 1000; ++i)
            if (ch_auth_verify(&th, toks[0].base, toks[0].len, &pool, &got) != 0)
                abort();
        n += 1000;
        h2o_mem_clear_pool(&pool);
    } while ((t = now_s()) - t0 < span);
    printf("ch_auth_verify, cached (one token):   %8.0f /s  (%.0f ns each)\n", n / (t - t0), (t - t0) / n * 1e9);
    EVP_PKEY_free(key);

    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", base);
    if (system(cmd) != 0)
        return 1;
    return 0;
}
