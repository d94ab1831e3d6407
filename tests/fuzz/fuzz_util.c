/* What several fuzz targets share: a test keyring of their own and an ES256 check independent of gateway/jws.c. */
#include "fuzz_util.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/core_names.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/sha.h>

void fz_fail(const char *what, const void *data, size_t len)
{
    fprintf(stderr, "FUZZ FINDING: %s\n", what);
    if (data != NULL)
        fprintf(stderr, "%.*s\n", (int)(len > 4096 ? 4096 : len), (const char *)data);
    abort();
}

static EVP_PKEY *signer; /* the fuzzer's own copy of the test key */

const char *fz_keyring_make(const char *sub, ch_keyring_t **ring)
{
    static char root[256];
    char dir[512], kid[64], err[512];
    snprintf(root, sizeof(root), "/tmp/cityhall-fuzz-XXXXXX");
    if (mkdtemp(root) == NULL)
        fz_fail("mkdtemp", NULL, 0);
    snprintf(dir, sizeof(dir), "%s/%s", root, sub);
    char made[600], path[600];
    if (ch_keyring_rotate(dir, kid, sizeof(kid), err, sizeof(err)) != 0)
        fz_fail(err, NULL, 0);
    /* a fixed kid, so that checked-in seeds can name the key */
    snprintf(made, sizeof(made), "%s/%s.pem", dir, kid);
    snprintf(path, sizeof(path), "%s/" FZ_KID ".pem", dir);
    if (rename(made, path) != 0 || (*ring = ch_keyring_load(dir, err, sizeof(err))) == NULL)
        fz_fail(err, NULL, 0);
    FILE *fp = fopen(path, "r");
    if (fp == NULL || (signer = PEM_read_PrivateKey(fp, NULL, NULL, NULL)) == NULL)
        fz_fail("could not read the test key back", NULL, 0);
    fclose(fp);
    return root;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

void fz_tree_remove(const char *root)
{
    nftw(root, remove_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* base64url without padding, decoded the slow and obvious way (-1: not that). */
static long b64url(const char *in, size_t len, uint8_t *out)
{
    uint32_t acc = 0;
    int bits = 0;
    long o = 0;
    for (size_t i = 0; i < len; ++i) {
        const char *pos = memchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", in[i], 64);
        if (pos == NULL || in[i] == '\0')
            return -1;
        acc = acc << 6 | (uint32_t)(pos - "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_");
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    /* 6 stray bits (len % 4 == 1) or non-zero padding bits: not the canonical encoding of any bytes */
    if (bits >= 6 || (acc & ((1u << bits) - 1)) != 0)
        return -1;
    return o;
}

static void b64url_put(const uint8_t *in, size_t len, ch_buf_t *out)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; ++i) {
        acc = acc << 8 | in[i];
        bits += 8;
        while (bits >= 6) {
            bits -= 6;
            ch_buf_append(out, &a[(acc >> bits) & 63], 1);
        }
    }
    if (bits > 0)
        ch_buf_append(out, &a[(acc << (6 - bits)) & 63], 1);
}

/* The public key of `kid` from the ring's JWKS (the published form), or NULL. */
static EVP_PKEY *jwks_key(const ch_keyring_t *ring, const char *kid)
{
    ch_buf_t jwks = {0};
    ch_keyring_jwks(ring, &jwks);
    json_t *doc = json_loadb(jwks.base, jwks.len, 0, NULL);
    ch_buf_free(&jwks);
    EVP_PKEY *pkey = NULL;
    size_t i;
    json_t *k;
    json_array_foreach(json_object_get(doc, "keys"), i, k)
    {
        if (strcmp(json_string_value(json_object_get(k, "kid")), kid) != 0)
            continue;
        const char *x = json_string_value(json_object_get(k, "x")), *y = json_string_value(json_object_get(k, "y"));
        uint8_t pub[65 + 3];
        pub[0] = 4; /* uncompressed point */
        if (b64url(x, strlen(x), pub + 1) != 32 || b64url(y, strlen(y), pub + 33) != 32)
            fz_fail("the ring's JWKS does not decode", NULL, 0);
        OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
        OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0);
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pub, 65);
        OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
        EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
        if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) != 1 ||
            EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) != 1)
            fz_fail("the ring's JWKS key does not load", NULL, 0);
        EVP_PKEY_CTX_free(ctx);
        OSSL_PARAM_free(params);
        OSSL_PARAM_BLD_free(bld);
    }
    json_decref(doc);
    return pkey;
}

/* DER INTEGER of a 32-byte big-endian unsigned number: leading zeros dropped, a 0x00 added before a high bit. */
static size_t der_int(const uint8_t v[32], uint8_t *out)
{
    size_t skip = 0;
    while (skip < 31 && v[skip] == 0)
        ++skip;
    size_t n = 32 - skip, pad = v[skip] & 0x80 ? 1 : 0;
    out[0] = 0x02;
    out[1] = (uint8_t)(n + pad);
    out[2] = 0;
    memcpy(out + 2 + pad, v + skip, n);
    return 2 + pad + n;
}

json_t *fz_es256_check(const ch_keyring_t *ring, const char *typ, const char *token, size_t len)
{
    const char *d1 = memchr(token, '.', len);
    const char *d2 = d1 != NULL ? memchr(d1 + 1, '.', len - (size_t)(d1 + 1 - token)) : NULL;
    if (d2 == NULL || memchr(d2 + 1, '.', len - (size_t)(d2 + 1 - token)) != NULL)
        return NULL;
    uint8_t *buf = malloc(len + 4);
    json_t *header = NULL, *claims = NULL;
    EVP_PKEY *pkey = NULL;
    long n = b64url(token, (size_t)(d1 - token), buf);
    if (n <= 0 || (header = json_loadb((const char *)buf, (size_t)n, JSON_REJECT_DUPLICATES, NULL)) == NULL)
        goto out;
    const char *alg = json_string_value(json_object_get(header, "alg")),
               *t = json_string_value(json_object_get(header, "typ")),
               *kid = json_string_value(json_object_get(header, "kid"));
    if (!json_is_object(header) || json_object_size(header) != 3 || alg == NULL || strcmp(alg, "ES256") != 0 ||
        json_string_length(json_object_get(header, "alg")) != 5 || t == NULL || strcmp(t, typ) != 0 ||
        json_string_length(json_object_get(header, "typ")) != strlen(typ) || kid == NULL ||
        json_string_length(json_object_get(header, "kid")) != strlen(kid) || (pkey = jwks_key(ring, kid)) == NULL)
        goto out;
    uint8_t raw[64 + 3], der[80], digest[32];
    if (b64url(d2 + 1, len - (size_t)(d2 + 1 - token), raw) != 64)
        goto out;
    size_t rl = der_int(raw, der + 2), sl = der_int(raw + 32, der + 2 + rl);
    der[0] = 0x30;
    der[1] = (uint8_t)(rl + sl);
    SHA256((const uint8_t *)token, (size_t)(d2 - token), digest);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
    int ok = ctx != NULL && EVP_PKEY_verify_init(ctx) == 1 &&
             EVP_PKEY_verify(ctx, der, 2 + rl + sl, digest, sizeof(digest)) == 1;
    EVP_PKEY_CTX_free(ctx);
    if (!ok)
        goto out;
    n = b64url(d1 + 1, (size_t)(d2 - d1 - 1), buf);
    if (n > 0)
        claims = json_loadb((const char *)buf, (size_t)n, JSON_REJECT_DUPLICATES, NULL);
out:
    EVP_PKEY_free(pkey);
    json_decref(header);
    free(buf);
    return claims;
}

void fz_es256_sign(const char *header, size_t hlen, const char *claims, size_t clen, ch_buf_t *out)
{
    size_t start = out->len;
    b64url_put((const uint8_t *)header, hlen, out);
    ch_buf_append(out, ".", 1);
    b64url_put((const uint8_t *)claims, clen, out);
    uint8_t digest[32], der[80], raw[64];
    size_t derlen = sizeof(der);
    SHA256((const uint8_t *)out->base + start, out->len - start, digest);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(signer, NULL);
    if (ctx == NULL || EVP_PKEY_sign_init(ctx) != 1 || EVP_PKEY_sign(ctx, der, &derlen, digest, sizeof(digest)) != 1)
        fz_fail("could not sign", NULL, 0);
    EVP_PKEY_CTX_free(ctx);
    const uint8_t *p = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)derlen);
    const BIGNUM *r, *s;
    ECDSA_SIG_get0(sig, &r, &s);
    BN_bn2binpad(r, raw, 32);
    BN_bn2binpad(s, raw + 32, 32);
    ECDSA_SIG_free(sig);
    ch_buf_append(out, ".", 1);
    b64url_put(raw, 64, out);
}

unsigned fz_byte(fz_input_t *in)
{
    if (in->n == 0)
        return 0;
    --in->n;
    return *in->p++;
}

void fz_edit(ch_buf_t *b, unsigned op, unsigned pos, unsigned byte)
{
    pos = b->len != 0 ? pos % (b->len + (op % 3 == 1)) : 0;
    if (op % 3 == 0 && pos < b->len) {
        b->base[pos] = (char)byte;
    } else if (op % 3 == 1) {
        ch_buf_append(b, "", 1);
        memmove(b->base + pos + 1, b->base + pos, b->len - 1 - pos);
        b->base[pos] = (char)byte;
    } else if (pos < b->len) {
        memmove(b->base + pos, b->base + pos + 1, b->len - pos - 1);
        b->base[--b->len] = '\0';
    }
}

void fz_check_edits(fz_input_t *in, const ch_buf_t *genuine, int (*verify)(const char *token, size_t len))
{
    ch_buf_t m = {0};
    ch_buf_append(&m, genuine->base, genuine->len);
    while (in->n >= 4) {
        unsigned op = fz_byte(in), pos = fz_byte(in) | fz_byte(in) << 8, b = fz_byte(in);
        fz_edit(&m, op, pos, b);
    }
    int same = m.len == genuine->len && memcmp(m.base, genuine->base, m.len) == 0;
    if (verify(m.base, m.len) != same)
        fz_fail(same ? "a genuine token was refused" : "an edited token was accepted", m.base, m.len);
    ch_buf_free(&m);
}

void fz_part(fz_input_t *in, uint8_t sep, const uint8_t **part, size_t *len)
{
    const uint8_t *end = memchr(in->p, sep, in->n);
    *part = in->p;
    *len = end != NULL ? (size_t)(end - in->p) : in->n;
    size_t used = end != NULL ? *len + 1 : *len;
    in->p += used;
    in->n -= used;
}
