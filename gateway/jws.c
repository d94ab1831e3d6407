/* ES256 compact JWS (RFC 7515/7518) and keyrings of P-256 keys, with OpenSSL 3 and our own header checks. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include "cityhall/ch.h"
#include "cityhall/jws.h"

#define KID_MAX        64   /* kids are [A-Za-z0-9_-]{1,63} */
#define TOKEN_MAX      8192 /* longer compact tokens are refused before any decoding */
#define HEADER_B64_MAX 512  /* our headers are ~80 characters */
#define SIG_B64_LEN    86   /* 64 bytes */

typedef struct ch_key {
    char kid[KID_MAX];
    EVP_PKEY *pkey;
    uint8_t x[32], y[32];
} ch_key_t;

struct ch_keyring {
    size_t n;
    ch_key_t *keys; /* sorted by kid; the last one signs */
};

/* SHA-256 fetched once: an implicit fetch (EVP_sha256()) per signature costs a provider look-up each time. */
static EVP_MD *sha256_md;
static pthread_once_t md_once = PTHREAD_ONCE_INIT;

static void md_init(void)
{
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (sha256_md == NULL)
        abort();
}

static const EVP_MD *md_sha256(void)
{
    pthread_once(&md_once, md_init);
    return sha256_md;
}

/* ---- base64url ---- */

static const char b64url_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

void ch_b64url_encode(const uint8_t *in, size_t len, ch_buf_t *out)
{
    ch_buf_reserve(out, (len + 2) / 3 * 4 + 1);
    char *o = out->base + out->len;
    size_t i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *o++ = b64url_alphabet[v >> 18];
        *o++ = b64url_alphabet[(v >> 12) & 63];
        *o++ = b64url_alphabet[(v >> 6) & 63];
        *o++ = b64url_alphabet[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        *o++ = b64url_alphabet[v >> 18];
        *o++ = b64url_alphabet[(v >> 12) & 63];
    } else if (len - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *o++ = b64url_alphabet[v >> 18];
        *o++ = b64url_alphabet[(v >> 12) & 63];
        *o++ = b64url_alphabet[(v >> 6) & 63];
    }
    out->len = (size_t)(o - out->base);
    out->base[out->len] = '\0';
}

static int8_t b64url_table_[256];
static pthread_once_t b64url_once = PTHREAD_ONCE_INIT;

static void b64url_table_init(void)
{
    memset(b64url_table_, -1, sizeof(b64url_table_));
    for (int i = 0; i < 64; ++i)
        b64url_table_[(unsigned char)b64url_alphabet[i]] = (int8_t)i;
}

static const int8_t *b64url_table(void)
{
    pthread_once(&b64url_once, b64url_table_init);
    return b64url_table_;
}

/*
 * Strict: no padding, no other alphabet, no length that leaves 6 stray bits, and the unused low bits of the
 * last character must be zero, so that every byte string has exactly one accepted encoding.
 */
long ch_b64url_decode(const char *in, size_t len, uint8_t *out)
{
    const int8_t *t = b64url_table();
    if (len % 4 == 1)
        return -1;
    size_t o = 0, i = 0;
    for (; i + 4 <= len; i += 4) {
        int a = t[(unsigned char)in[i]], b = t[(unsigned char)in[i + 1]], c = t[(unsigned char)in[i + 2]],
            d = t[(unsigned char)in[i + 3]];
        if ((a | b | c | d) < 0)
            return -1;
        uint32_t v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6 | (uint32_t)d;
        out[o++] = (uint8_t)(v >> 16);
        out[o++] = (uint8_t)(v >> 8);
        out[o++] = (uint8_t)v;
    }
    size_t rest = len - i;
    if (rest == 2) {
        int a = t[(unsigned char)in[i]], b = t[(unsigned char)in[i + 1]];
        if ((a | b) < 0 || (b & 15) != 0)
            return -1;
        out[o++] = (uint8_t)(a << 2 | b >> 4);
    } else if (rest == 3) {
        int a = t[(unsigned char)in[i]], b = t[(unsigned char)in[i + 1]], c = t[(unsigned char)in[i + 2]];
        if ((a | b | c) < 0 || (c & 3) != 0)
            return -1;
        uint32_t v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6;
        out[o++] = (uint8_t)(v >> 16);
        out[o++] = (uint8_t)(v >> 8);
    }
    return (long)o;
}

/* ---- keys ---- */

static int kid_valid(const char *kid, size_t len)
{
    if (len == 0 || len >= KID_MAX)
        return 0;
    for (size_t i = 0; i < len; ++i) {
        char c = kid[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
            return 0;
    }
    return 1;
}

/* Fills x and y (32 bytes each) of a P-256 key; returns 0, or -1 if the key is not an EC key on P-256. */
static int key_coordinates(EVP_PKEY *pkey, uint8_t x[32], uint8_t y[32])
{
    char group[64];
    size_t glen = 0;
    if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_EC ||
        EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group), &glen) != 1 ||
        strcmp(group, "prime256v1") != 0)
        return -1;
    BIGNUM *bx = NULL, *by = NULL;
    int ok = EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_EC_PUB_X, &bx) == 1 &&
             EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_EC_PUB_Y, &by) == 1 && BN_bn2binpad(bx, x, 32) == 32 &&
             BN_bn2binpad(by, y, 32) == 32;
    BN_free(bx);
    BN_free(by);
    return ok ? 0 : -1;
}

/* Opens and parses one private key file, refusing anything but a private regular file holding a P-256 key. */
static EVP_PKEY *key_file_load(const char *path, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        snprintf(err, errlen, "could not open key file %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "key file %s is not a regular file", path);
        close(fd);
        return NULL;
    }
    if ((st.st_mode & 077) != 0) {
        snprintf(err, errlen, "key file %s is readable by group or others (mode %03o): chmod 600 it", path,
                 (unsigned)(st.st_mode & 0777));
        close(fd);
        return NULL;
    }
    FILE *fp = fdopen(fd, "r");
    if (fp == NULL) {
        close(fd);
        snprintf(err, errlen, "could not read key file %s", path);
        return NULL;
    }
    EVP_PKEY *pkey = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
    fclose(fp);
    ERR_clear_error();
    if (pkey == NULL) {
        snprintf(err, errlen, "key file %s does not hold a PEM private key", path);
        return NULL;
    }
    return pkey;
}

static int key_cmp(const void *a, const void *b)
{
    return strcmp(((const ch_key_t *)a)->kid, ((const ch_key_t *)b)->kid);
}

ch_keyring_t *ch_keyring_load(const char *dir, char *err, size_t errlen)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        snprintf(err, errlen, "could not open key folder %s: %s", dir, strerror(errno));
        return NULL;
    }
    ch_keyring_t *ring = calloc(1, sizeof(*ring));
    size_t cap = 0;
    struct dirent *de;
    int failed = 0;
    while (!failed && (de = readdir(d)) != NULL) {
        size_t nl = strlen(de->d_name);
        if (de->d_name[0] == '.' || nl <= 4 || strcmp(de->d_name + nl - 4, ".pem") != 0)
            continue;
        if (!kid_valid(de->d_name, nl - 4)) {
            snprintf(err, errlen, "key file name %s/%s is not <kid>.pem with a kid of [A-Za-z0-9_-]", dir, de->d_name);
            failed = 1;
            break;
        }
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        EVP_PKEY *pkey = key_file_load(path, err, errlen);
        if (pkey == NULL) {
            failed = 1;
            break;
        }
        if (ring->n == cap) {
            cap = cap ? cap * 2 : 4;
            ring->keys = realloc(ring->keys, cap * sizeof(*ring->keys));
            if (ring->keys == NULL)
                abort();
        }
        ch_key_t *k = &ring->keys[ring->n];
        memset(k, 0, sizeof(*k));
        memcpy(k->kid, de->d_name, nl - 4);
        k->pkey = pkey;
        ++ring->n;
        if (key_coordinates(pkey, k->x, k->y) != 0) {
            snprintf(err, errlen, "key file %s is not a P-256 (prime256v1) EC key", path);
            failed = 1;
        }
    }
    closedir(d);
    if (!failed && ring->n == 0) {
        snprintf(err, errlen, "key folder %s holds no <kid>.pem key", dir);
        failed = 1;
    }
    if (failed) {
        ch_keyring_free(ring);
        return NULL;
    }
    qsort(ring->keys, ring->n, sizeof(*ring->keys), key_cmp);
    return ring;
}

void ch_keyring_free(ch_keyring_t *ring)
{
    if (ring == NULL)
        return;
    for (size_t i = 0; i < ring->n; ++i)
        EVP_PKEY_free(ring->keys[i].pkey);
    free(ring->keys);
    free(ring);
}

const char *ch_keyring_current_kid(const ch_keyring_t *ring)
{
    return ring->keys[ring->n - 1].kid;
}

static const ch_key_t *keyring_find(const ch_keyring_t *ring, const char *kid, size_t len)
{
    for (size_t i = ring->n; i-- > 0;) /* newest first: the usual case */
        if (strncmp(ring->keys[i].kid, kid, len) == 0 && ring->keys[i].kid[len] == '\0')
            return &ring->keys[i];
    return NULL;
}

/* mkdir -p with mode 0700 for the folders it creates. */
static int mkdir_p(const char *dir, char *err, size_t errlen)
{
    char path[4096];
    size_t len = strlen(dir);
    if (len == 0 || len >= sizeof(path)) {
        snprintf(err, errlen, "bad folder name");
        return -1;
    }
    memcpy(path, dir, len + 1);
    for (size_t i = 1; i <= len; ++i) {
        if (path[i] != '/' && path[i] != '\0')
            continue;
        char saved = path[i];
        path[i] = '\0';
        if (mkdir(path, 0700) != 0 && errno != EEXIST) {
            snprintf(err, errlen, "could not create folder %s: %s", path, strerror(errno));
            return -1;
        }
        path[i] = saved;
    }
    return 0;
}

/* The greatest kid among the folder's <kid>.pem files ("" if none). */
static void greatest_kid(const char *dir, char *out)
{
    out[0] = '\0';
    DIR *d = opendir(dir);
    if (d == NULL)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t nl = strlen(de->d_name);
        if (de->d_name[0] == '.' || nl <= 4 || strcmp(de->d_name + nl - 4, ".pem") != 0 ||
            !kid_valid(de->d_name, nl - 4))
            continue;
        char kid[KID_MAX];
        memcpy(kid, de->d_name, nl - 4);
        kid[nl - 4] = '\0';
        if (strcmp(kid, out) > 0)
            strcpy(out, kid);
    }
    closedir(d);
}

int ch_keyring_rotate(const char *dir, char *kid, size_t kidlen, char *err, size_t errlen)
{
    if (mkdir_p(dir, err, errlen) != 0)
        return CH_EINVAL;

    /* kid: "k" + UTC yyyymmddHHMMSS + 4 random hex digits, so names sort by creation time */
    char newest[KID_MAX], made[KID_MAX];
    greatest_kid(dir, newest);
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    uint8_t rnd[2];
    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        snprintf(err, errlen, "no randomness");
        return CH_EINVAL;
    }
    snprintf(made, sizeof(made), "k%04d%02d%02d%02d%02d%02d%02x%02x", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec, rnd[0], rnd[1]);
    if (strcmp(made, newest) <= 0) {
        /* same second (or a clock behind the newest key): extend the newest kid, which sorts right after it */
        if (strlen(newest) + 5 >= KID_MAX) {
            snprintf(err, errlen, "the newest key %s sorts after the clock's time and is too long to extend", newest);
            return CH_EINVAL;
        }
        snprintf(made, sizeof(made), "%s%02x%02x", newest, rnd[0], rnd[1]);
    }

    EVP_PKEY *pkey = EVP_EC_gen("P-256");
    if (pkey == NULL) {
        snprintf(err, errlen, "could not generate a P-256 key");
        return CH_EINVAL;
    }
    char tmp[4096], path[4096];
    snprintf(tmp, sizeof(tmp), "%s/.%s.pem.tmp", dir, made);
    snprintf(path, sizeof(path), "%s/%s.pem", dir, made);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "could not create %s: %s", tmp, strerror(errno));
        EVP_PKEY_free(pkey);
        return CH_EINVAL;
    }
    int ok = fchmod(fd, 0600) == 0;
    FILE *fp = ok ? fdopen(fd, "w") : NULL;
    ok = fp != NULL && PEM_write_PrivateKey(fp, pkey, NULL, NULL, 0, NULL, NULL) == 1 && fflush(fp) == 0 &&
         fsync(fileno(fp)) == 0;
    if (fp != NULL)
        ok = fclose(fp) == 0 && ok;
    else
        close(fd);
    EVP_PKEY_free(pkey);
    /* link(2) publishes the complete file under its final name, and refuses to replace an existing key */
    if (!ok || link(tmp, path) != 0) {
        snprintf(err, errlen, "could not write key %s: %s", path, strerror(errno));
        unlink(tmp);
        return CH_EINVAL;
    }
    unlink(tmp);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    if (kid != NULL)
        snprintf(kid, kidlen, "%s", made);
    return 0;
}

void ch_keyring_jwks(const ch_keyring_t *ring, ch_buf_t *out)
{
    ch_buf_append(out, "{\"keys\":[", 9);
    for (size_t i = ring->n; i-- > 0;) { /* current key first */
        const ch_key_t *k = &ring->keys[i];
        ch_buf_append(out, "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"", 31);
        ch_b64url_encode(k->x, 32, out);
        ch_buf_append(out, "\",\"y\":\"", 7);
        ch_b64url_encode(k->y, 32, out);
        ch_buf_append(out, "\",\"kid\":\"", 9);
        ch_buf_append(out, k->kid, strlen(k->kid));
        ch_buf_append(out, "\",\"use\":\"sig\",\"alg\":\"ES256\"}", 28);
        if (i != 0)
            ch_buf_append(out, ",", 1);
    }
    ch_buf_append(out, "]}", 2);
}

/* ---- signing and verifying ---- */

int ch_jws_sign(const ch_keyring_t *ring, const char *typ, const char *claims_json, size_t len, ch_buf_t *out)
{
    if (ring == NULL || ring->n == 0 || typ == NULL)
        return CH_EINVAL;
    size_t tlen = strlen(typ);
    if (tlen == 0 || tlen > 64)
        return CH_EINVAL;
    for (size_t i = 0; i < tlen; ++i)
        if (typ[i] <= 0x20 || typ[i] == '"' || typ[i] == '\\' || (unsigned char)typ[i] >= 0x7f)
            return CH_EINVAL;
    const ch_key_t *key = &ring->keys[ring->n - 1];
    char header[160];
    int hlen = snprintf(header, sizeof(header), "{\"alg\":\"ES256\",\"typ\":\"%s\",\"kid\":\"%s\"}", typ, key->kid);

    size_t start = out->len;
    ch_b64url_encode((const uint8_t *)header, (size_t)hlen, out);
    ch_buf_append(out, ".", 1);
    ch_b64url_encode((const uint8_t *)claims_json, len, out);

    uint8_t der[80], raw[64];
    size_t derlen = sizeof(der);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx != NULL && EVP_DigestSignInit(ctx, NULL, md_sha256(), NULL, key->pkey) == 1 &&
             EVP_DigestSign(ctx, der, &derlen, (const uint8_t *)out->base + start, out->len - start) == 1;
    EVP_MD_CTX_free(ctx);
    ECDSA_SIG *sig = NULL;
    if (ok) {
        const uint8_t *p = der;
        sig = d2i_ECDSA_SIG(NULL, &p, (long)derlen);
        const BIGNUM *r, *s;
        ok = sig != NULL;
        if (ok) {
            ECDSA_SIG_get0(sig, &r, &s);
            ok = BN_bn2binpad(r, raw, 32) == 32 && BN_bn2binpad(s, raw + 32, 32) == 32;
        }
    }
    ECDSA_SIG_free(sig);
    if (!ok) {
        ERR_clear_error();
        out->len = start;
        if (out->base != NULL)
            out->base[start] = '\0';
        return CH_EINVAL;
    }
    ch_buf_append(out, ".", 1);
    ch_b64url_encode(raw, 64, out);
    return 0;
}

/* raw r||s (64 bytes) to DER; returns the DER length or 0. */
static size_t sig_raw_to_der(const uint8_t raw[64], uint8_t *der, size_t cap)
{
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, 32, NULL), *s = BN_bin2bn(raw + 32, 32, NULL);
    if (sig == NULL || r == NULL || s == NULL || ECDSA_SIG_set0(sig, r, s) != 1) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(sig);
        return 0;
    }
    int n = i2d_ECDSA_SIG(sig, NULL);
    size_t len = 0;
    if (n > 0 && (size_t)n <= cap) {
        uint8_t *p = der;
        len = (size_t)i2d_ECDSA_SIG(sig, &p);
    }
    ECDSA_SIG_free(sig);
    return len;
}

/* The header must be exactly {"alg":"ES256","typ":<typ>,"kid":<a kid of the ring>} (members in any order). */
static const ch_key_t *header_check(const ch_keyring_t *ring, const char *typ, const uint8_t *json, size_t len)
{
    json_t *h = json_loadb((const char *)json, len, JSON_REJECT_DUPLICATES, NULL);
    const ch_key_t *key = NULL;
    if (h == NULL || !json_is_object(h) || json_object_size(h) != 3)
        goto out;
    json_t *alg = json_object_get(h, "alg"), *t = json_object_get(h, "typ"), *kid = json_object_get(h, "kid");
    if (!json_is_string(alg) || !json_is_string(t) || !json_is_string(kid))
        goto out;
    if (json_string_length(alg) != 5 || memcmp(json_string_value(alg), "ES256", 5) != 0)
        goto out;
    if (json_string_length(t) != strlen(typ) || memcmp(json_string_value(t), typ, strlen(typ)) != 0)
        goto out;
    size_t klen = json_string_length(kid);
    if (!kid_valid(json_string_value(kid), klen))
        goto out;
    key = keyring_find(ring, json_string_value(kid), klen);
out:
    json_decref(h);
    return key;
}

int ch_jws_verify(const ch_keyring_t *ring, const char *typ, const char *token, size_t len, json_t **claims)
{
    *claims = NULL;
    if (ring == NULL || typ == NULL || token == NULL || len == 0 || len > TOKEN_MAX)
        return CH_EINVAL;
    const char *dot1 = memchr(token, '.', len);
    if (dot1 == NULL)
        return CH_EINVAL;
    const char *dot2 = memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token));
    if (dot2 == NULL || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - token)) != NULL)
        return CH_EINVAL;
    size_t hlen = (size_t)(dot1 - token), plen = (size_t)(dot2 - dot1 - 1), slen = len - (size_t)(dot2 + 1 - token);
    if (hlen == 0 || hlen > HEADER_B64_MAX || plen == 0 || slen != SIG_B64_LEN)
        return CH_EINVAL;

    uint8_t hbuf[HEADER_B64_MAX], raw[66];
    long n = ch_b64url_decode(token, hlen, hbuf);
    if (n <= 0)
        return CH_EINVAL;
    const ch_key_t *key = header_check(ring, typ, hbuf, (size_t)n);
    if (key == NULL)
        return CH_EINVAL;
    if (ch_b64url_decode(dot2 + 1, slen, raw) != 64)
        return CH_EINVAL;

    uint8_t der[80];
    size_t derlen = sig_raw_to_der(raw, der, sizeof(der));
    if (derlen == 0)
        return CH_EINVAL;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx != NULL && EVP_DigestVerifyInit(ctx, NULL, md_sha256(), NULL, key->pkey) == 1 &&
             EVP_DigestVerify(ctx, der, derlen, (const uint8_t *)token, (size_t)(dot2 - token)) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) {
        ERR_clear_error();
        return CH_EINVAL;
    }

    uint8_t *pbuf = malloc(plen * 3 / 4 + 3);
    if (pbuf == NULL)
        abort();
    n = ch_b64url_decode(dot1 + 1, plen, pbuf);
    json_t *c = n > 0 ? json_loadb((const char *)pbuf, (size_t)n, JSON_REJECT_DUPLICATES, NULL) : NULL;
    free(pbuf);
    if (c == NULL || !json_is_object(c)) {
        json_decref(c);
        return CH_EINVAL;
    }
    *claims = c;
    return 0;
}

static int json_number(json_t *v, double *out)
{
    if (json_is_integer(v))
        *out = (double)json_integer_value(v);
    else if (json_is_real(v))
        *out = json_real_value(v);
    else
        return 0;
    return 1;
}

int ch_jwt_check(json_t *claims, const char *iss, const char *aud, int64_t now, int64_t leeway, const char **why)
{
    const char *dummy;
    if (why == NULL)
        why = &dummy;
    *why = NULL;
    if (!json_is_object(claims)) {
        *why = "claims are not an object";
        return CH_EINVAL;
    }
    json_t *v = json_object_get(claims, "iss");
    if (iss != NULL &&
        (!json_is_string(v) || strcmp(json_string_value(v), iss) != 0 || json_string_length(v) != strlen(iss))) {
        *why = "wrong issuer";
        return CH_EINVAL;
    }
    if (aud != NULL) {
        v = json_object_get(claims, "aud");
        int found = 0;
        if (json_is_string(v)) {
            found = json_string_length(v) == strlen(aud) && strcmp(json_string_value(v), aud) == 0;
        } else if (json_is_array(v)) {
            size_t i;
            json_t *e;
            json_array_foreach(v, i, e)
            {
                if (json_is_string(e) && json_string_length(e) == strlen(aud) && strcmp(json_string_value(e), aud) == 0)
                    found = 1;
            }
        }
        if (!found) {
            *why = "wrong audience";
            return CH_EINVAL;
        }
    }
    double t;
    if (!json_number(json_object_get(claims, "exp"), &t)) {
        *why = "no expiry";
        return CH_EINVAL;
    }
    if (!(t > (double)(now - leeway))) {
        *why = "expired";
        return CH_EINVAL;
    }
    v = json_object_get(claims, "nbf");
    if (v != NULL && (!json_number(v, &t) || !(t <= (double)(now + leeway)))) {
        *why = "not valid yet";
        return CH_EINVAL;
    }
    v = json_object_get(claims, "iat");
    if (v != NULL && (!json_number(v, &t) || !(t <= (double)(now + leeway)))) {
        *why = "issued in the future";
        return CH_EINVAL;
    }
    return 0;
}
