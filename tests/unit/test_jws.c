/* Unit tests of ES256 JWS and keyrings: round trips, the JWKS shape, and every token attack refused. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include "gateway.h"
#include "cityhall/auth.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"
#include "tap.h"

static char ring_dir[200], other_dir[200];

/* ---- helpers that build tokens independently of jws.c's signing path ---- */

static void b64(ch_buf_t *out, const void *data, size_t len)
{
    ch_b64url_encode(data, len, out);
}

static EVP_PKEY *load_key(const char *dir, const char *kid)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s.pem", dir, kid);
    FILE *fp = fopen(path, "r");
    if (fp == NULL)
        abort();
    EVP_PKEY *k = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
    fclose(fp);
    if (k == NULL)
        abort();
    return k;
}

/* header.claims.signature with an ES256 signature by `key` (raw r||s), whatever the header says. */
static char *forge_es256(EVP_PKEY *key, const char *header, const char *claims)
{
    ch_buf_t t = {0};
    b64(&t, header, strlen(header));
    ch_buf_append(&t, ".", 1);
    b64(&t, claims, strlen(claims));
    uint8_t der[80], raw[64];
    size_t derlen = sizeof(der);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, key) != 1 ||
        EVP_DigestSign(ctx, der, &derlen, (uint8_t *)t.base, t.len) != 1)
        abort();
    EVP_MD_CTX_free(ctx);
    const uint8_t *p = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)derlen);
    const BIGNUM *r, *s;
    ECDSA_SIG_get0(sig, &r, &s);
    BN_bn2binpad(r, raw, 32);
    BN_bn2binpad(s, raw + 32, 32);
    ECDSA_SIG_free(sig);
    ch_buf_append(&t, ".", 1);
    b64(&t, raw, 64);
    return t.base;
}

/* The token signed HS256 with `secret` (the public key PEM in the classic confusion attack). */
static char *forge_hs256(const char *header, const char *claims, const void *secret, size_t slen)
{
    ch_buf_t t = {0};
    b64(&t, header, strlen(header));
    ch_buf_append(&t, ".", 1);
    b64(&t, claims, strlen(claims));
    uint8_t mac[32];
    unsigned maclen = 0;
    HMAC(EVP_sha256(), secret, (int)slen, (uint8_t *)t.base, t.len, mac, &maclen);
    ch_buf_append(&t, ".", 1);
    b64(&t, mac, maclen);
    return t.base;
}

static int verify(const ch_keyring_t *ring, const char *typ, const char *token)
{
    json_t *claims = NULL;
    int r = ch_jws_verify(ring, typ, token, strlen(token), &claims);
    if (r == 0 && claims == NULL)
        return -99;
    if (r != 0 && claims != NULL)
        return -98;
    json_decref(claims);
    return r;
}

static char *claims_now(void)
{
    static char buf[256];
    long long now = time(NULL);
    snprintf(buf, sizeof(buf),
             "{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u1\",\"sid\":\"s1\",\"role\":\"citizen\","
             "\"iat\":%lld,\"exp\":%lld,\"jti\":\"j\"}",
             now, now + 600);
    return buf;
}

/* ---- tests ---- */

static void test_base64url(void)
{
    uint8_t in[256], out[400];
    for (int i = 0; i < 256; ++i)
        in[i] = (uint8_t)(i * 7 + 3);
    int all = 1;
    for (size_t len = 0; len < 70; ++len) {
        ch_buf_t b = {0};
        ch_b64url_encode(in, len, &b);
        long n = ch_b64url_decode(b.base != NULL ? b.base : "", b.len, out);
        all &= n == (long)len && memcmp(in, out, len) == 0 && (b.base == NULL || strpbrk(b.base, "+/=") == NULL);
        ch_buf_free(&b);
    }
    tap_ok(all, "base64url round-trips every length without padding or + and /");
    tap_ok(ch_b64url_decode("YQ==", 4, out) < 0, "base64url refuses padding");
    tap_ok(ch_b64url_decode("a+b/", 4, out) < 0, "base64url refuses the standard alphabet's + and /");
    tap_ok(ch_b64url_decode("YWJjZ", 5, out) < 0, "base64url refuses a length that leaves a stray character");
    tap_ok(ch_b64url_decode("YR", 2, out) < 0 && ch_b64url_decode("YQ", 2, out) == 1,
           "base64url refuses non-zero unused bits (one encoding per byte string)");
}

static void test_keyring(void)
{
    char err[512], kid1[64], kid2[64];
    tap_ok(ch_keyring_load(ring_dir, err, sizeof(err)) == NULL, "a missing key folder does not load");
    tap_ok(ch_keyring_rotate(ring_dir, kid1, sizeof(kid1), err, sizeof(err)) == 0,
           "rotate creates the folder and a key");
    struct stat st;
    char path[512];
    snprintf(path, sizeof(path), "%s/%s.pem", ring_dir, kid1);
    tap_ok(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600, "a new key file is mode 0600");
    tap_ok(stat(ring_dir, &st) == 0 && (st.st_mode & 0777) == 0700, "a new key folder is mode 0700");
    tap_ok(kid1[0] == 'k' && strlen(kid1) == 19, "a kid is k + UTC yyyymmddHHMMSS + 4 hex digits (%s)", kid1);
    tap_ok(ch_keyring_rotate(ring_dir, kid2, sizeof(kid2), err, sizeof(err)) == 0 && strcmp(kid2, kid1) > 0,
           "a second key made in the same second still sorts after the first (%s > %s)", kid2, kid1);
    ch_keyring_t *ring = ch_keyring_load(ring_dir, err, sizeof(err));
    tap_ok(ring != NULL, "a folder of two keys loads");
    tap_is_str(ring ? ch_keyring_current_kid(ring) : NULL, kid2, "the greatest kid signs");
    ch_keyring_free(ring);

    chmod(path, 0640);
    ring = ch_keyring_load(ring_dir, err, sizeof(err));
    tap_ok(ring == NULL && strstr(err, "readable by group or others") != NULL,
           "a group-readable key file stops the keyring from loading");
    chmod(path, 0604);
    tap_ok(ch_keyring_load(ring_dir, err, sizeof(err)) == NULL,
           "a world-readable key file stops the keyring from loading");
    chmod(path, 0600);

    /* a P-384 key is not an ES256 key */
    char bad[300];
    snprintf(bad, sizeof(bad), "%s/p384", other_dir);
    mkdir(other_dir, 0700);
    mkdir(bad, 0700);
    EVP_PKEY *k384 = EVP_EC_gen("P-384");
    snprintf(path, sizeof(path), "%s/k1.pem", bad);
    FILE *fp = fopen(path, "w");
    PEM_write_PrivateKey(fp, k384, NULL, NULL, 0, NULL, NULL);
    fclose(fp);
    chmod(path, 0600);
    EVP_PKEY_free(k384);
    ring = ch_keyring_load(bad, err, sizeof(err));
    tap_ok(ring == NULL && strstr(err, "P-256") != NULL, "a key on another curve is refused by name");

    /* an SEC1 ("EC PRIVATE KEY") file loads as well as PKCS#8 */
    char sec1[300];
    snprintf(sec1, sizeof(sec1), "%s/sec1", other_dir);
    mkdir(sec1, 0700);
    snprintf(path, sizeof(path), "%s/legacy.pem", sec1);
    char cmd[1400];
    snprintf(cmd, sizeof(cmd), "openssl ecparam -name prime256v1 -genkey -noout -out %s 2>/dev/null && chmod 600 %s",
             path, path);
    int sys = system(cmd);
    ring = sys == 0 ? ch_keyring_load(sec1, err, sizeof(err)) : NULL;
    tap_ok(ring != NULL && strcmp(ch_keyring_current_kid(ring), "legacy") == 0, "an SEC1 EC key file loads too");
    ch_keyring_free(ring);
}

static void test_jwks(void)
{
    char err[512];
    ch_keyring_t *ring = ch_keyring_load(ring_dir, err, sizeof(err));
    ch_buf_t out = {0};
    ch_keyring_jwks(ring, &out);
    json_t *doc = json_loadb(out.base, out.len, 0, NULL);
    json_t *keys = json_object_get(doc, "keys");
    tap_ok(json_is_array(keys) && json_array_size(keys) == 2, "the JWKS lists every key of the ring");
    int shape = 1, coords = 1;
    size_t i;
    json_t *k;
    json_array_foreach(keys, i, k)
    {
        const char *kty = json_string_value(json_object_get(k, "kty")),
                   *crv = json_string_value(json_object_get(k, "crv")),
                   *use = json_string_value(json_object_get(k, "use")),
                   *alg = json_string_value(json_object_get(k, "alg")),
                   *kid = json_string_value(json_object_get(k, "kid")), *x = json_string_value(json_object_get(k, "x")),
                   *y = json_string_value(json_object_get(k, "y"));
        shape &= kty && crv && use && alg && kid && x && y && !strcmp(kty, "EC") && !strcmp(crv, "P-256") &&
                 !strcmp(use, "sig") && !strcmp(alg, "ES256") && json_object_size(k) == 7 && !json_object_get(k, "d");
        if (!shape)
            break;
        /* x and y must be the key's coordinates, as OpenSSL reads them from the PEM */
        uint8_t xb[40], yb[40], want[65];
        EVP_PKEY *pk = load_key(ring_dir, kid);
        size_t plen = 0;
        EVP_PKEY_get_octet_string_param(pk, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, want, sizeof(want), &plen);
        EVP_PKEY_free(pk);
        coords &= ch_b64url_decode(x, strlen(x), xb) == 32 && ch_b64url_decode(y, strlen(y), yb) == 32 && plen == 65 &&
                  want[0] == 4 && memcmp(xb, want + 1, 32) == 0 && memcmp(yb, want + 33, 32) == 0;
    }
    tap_ok(shape, "each JWK is exactly {kty EC, crv P-256, x, y, kid, use sig, alg ES256} without the private part");
    tap_ok(coords, "x and y are the base64url of the key's 32-byte coordinates");
    tap_is_str(json_string_value(json_object_get(json_array_get(keys, 0), "kid")), ch_keyring_current_kid(ring),
               "the current key comes first");
    json_decref(doc);
    ch_buf_free(&out);
    ch_keyring_free(ring);
}

static void test_sign_verify(void)
{
    char err[512];
    ch_keyring_t *ring = ch_keyring_load(ring_dir, err, sizeof(err));
    const char *kid = ch_keyring_current_kid(ring);
    const char *claims = claims_now();
    ch_buf_t tok = {0};
    tap_ok(ch_jws_sign(ring, "at+jwt", claims, strlen(claims), &tok) == 0, "signing succeeds");
    json_t *got = NULL;
    tap_ok(ch_jws_verify(ring, "at+jwt", tok.base, tok.len, &got) == 0 && json_is_object(got),
           "a token verifies with the ring that signed it");
    tap_is_str(json_string_value(json_object_get(got, "sub")), "u1", "verification returns the signed claims");
    json_decref(got);

    /* the header is exactly what the contract says */
    const char *dot = strchr(tok.base, '.');
    uint8_t hdr[256];
    long hl = ch_b64url_decode(tok.base, (size_t)(dot - tok.base), hdr);
    char want[160];
    snprintf(want, sizeof(want), "{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}", kid);
    tap_ok(hl == (long)strlen(want) && memcmp(hdr, want, (size_t)hl) == 0, "the header is {alg ES256, typ, kid}");
    const char *sig = strrchr(tok.base, '.') + 1;
    tap_ok(strlen(sig) == 86, "the signature is raw r||s: 64 bytes, 86 base64url characters");

    /* an independent signer (OpenSSL directly, DER converted here) produces tokens jws.c accepts */
    EVP_PKEY *key = load_key(ring_dir, kid);
    char h[160];
    snprintf(h, sizeof(h), "{\"kid\":\"%s\",\"typ\":\"at+jwt\",\"alg\":\"ES256\"}", kid);
    char *forged = forge_es256(key, h, claims);
    tap_ok(verify(ring, "at+jwt", forged) == 0,
           "a token signed independently with the key verifies (member order free)");
    free(forged);

    /* an older key of the ring still verifies */
    ch_keyring_t *older = NULL;
    {
        char dir1[512];
        snprintf(dir1, sizeof(dir1), "%s/older", other_dir);
        char kidx[64];
        ch_keyring_rotate(dir1, kidx, sizeof(kidx), err, sizeof(err));
        older = ch_keyring_load(dir1, err, sizeof(err));
        ch_buf_t t2 = {0};
        ch_jws_sign(older, "at+jwt", claims, strlen(claims), &t2);
        char cmd[1200];
        snprintf(cmd, sizeof(cmd), "cp -p %s/%s.pem %s/", dir1, kidx, ring_dir);
        int rc = system(cmd);
        ch_keyring_t *merged = rc == 0 ? ch_keyring_load(ring_dir, err, sizeof(err)) : NULL;
        tap_ok(merged != NULL && verify(merged, "at+jwt", t2.base) == 0,
               "a token of a key that is not the newest verifies while its file is in the folder");
        tap_ok(verify(ring, "at+jwt", t2.base) == CH_EINVAL, "a token whose kid the ring does not hold is refused");
        ch_keyring_free(merged);
        snprintf(cmd, sizeof(cmd), "%s/%s.pem", ring_dir, kidx);
        unlink(cmd);
        ch_buf_free(&t2);
    }

    /* ---- attacks ---- */
    char *pub_pem;
    {
        BIO *bio = BIO_new(BIO_s_mem());
        PEM_write_bio_PUBKEY(bio, key);
        char *data;
        long n = BIO_get_mem_data(bio, &data);
        pub_pem = strndup(data, (size_t)n);
        BIO_free(bio);
    }
    snprintf(h, sizeof(h), "{\"alg\":\"HS256\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}", kid);
    char *t = forge_hs256(h, claims, pub_pem, strlen(pub_pem));
    tap_ok(verify(ring, "at+jwt", t) == CH_EINVAL, "HS256 signed with the public key PEM as the secret is refused");
    free(t);
    snprintf(h, sizeof(h), "{\"alg\":\"HS256\",\"typ\":\"at+jwt\"}");
    t = forge_hs256(h, claims, pub_pem, strlen(pub_pem));
    tap_ok(verify(ring, "at+jwt", t) == CH_EINVAL, "HS256 without a kid is refused");
    free(t);

    ch_buf_t none = {0};
    snprintf(h, sizeof(h), "{\"alg\":\"none\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}", kid);
    b64(&none, h, strlen(h));
    ch_buf_append(&none, ".", 1);
    b64(&none, claims, strlen(claims));
    ch_buf_append(&none, ".", 1);
    tap_ok(verify(ring, "at+jwt", none.base) == CH_EINVAL, "alg none with an empty signature is refused");
    none.len -= 1;
    none.base[none.len] = '\0';
    tap_ok(verify(ring, "at+jwt", none.base) == CH_EINVAL, "alg none without a signature part is refused");
    ch_buf_append(&none, ".", 1);
    b64(&none, (const uint8_t *)strrchr(tok.base, '.'), 64); /* any 64 bytes */
    tap_ok(verify(ring, "at+jwt", none.base) == CH_EINVAL, "alg none with a 64-byte signature is refused");
    ch_buf_free(&none);

    const char *variants[][2] = {
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"nope\"}", "an unknown kid is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\"}", "a header without kid is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"hc+jwt\",\"kid\":\"%s\"}", "another token kind (typ hc+jwt) is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"JWT\",\"kid\":\"%s\"}", "typ JWT is refused where at+jwt is expected"},
        {"{\"alg\":\"ES256\",\"kid\":\"%s\"}", "a header without typ is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\",\"crit\":[\"exp\"]}", "a crit header is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\",\"jku\":\"https://evil/jwks\"}",
         "a jku header is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\",\"jwk\":{\"kty\":\"EC\"}}", "a jwk header is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\",\"x5u\":\"https://evil/\"}", "an x5u header is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\",\"x5c\":[\"AA\"]}", "an x5c header is refused"},
        {"{\"alg\":\"es256\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}", "alg is compared exactly (es256 is refused)"},
        {"{\"alg\":\"ES384\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}", "alg ES384 is refused"},
        {"{\"alg\":[\"ES256\"],\"typ\":\"at+jwt\",\"kid\":\"%s\"}", "alg that is not a string is refused"},
        {"{\"alg\":\"none\",\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}",
         "a duplicated header member is refused"},
        {"[\"ES256\",\"at+jwt\",\"%s\"]", "a header that is not an object is refused"},
        {"\"%s\"", "a header that is a string is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\"", "a truncated header is refused"},
        {"{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"../%s\"}", "a kid that is a path is refused"},
    };
    for (size_t i = 0; i < sizeof(variants) / sizeof(variants[0]); ++i) {
        char hb[300];
        snprintf(hb, sizeof(hb), variants[i][0], kid);
        char *tk = forge_es256(key, hb, claims);
        tap_ok(verify(ring, "at+jwt", tk) == CH_EINVAL, "%s", variants[i][1]);
        free(tk);
    }
    {
        char hb[300];
        snprintf(hb, sizeof(hb), "{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}x", kid);
        char *tk = forge_es256(key, hb, claims);
        tap_ok(verify(ring, "at+jwt", tk) == CH_EINVAL, "bytes after the header object are refused");
        free(tk);
        snprintf(hb, sizeof(hb), "{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}", kid);
        tk = forge_es256(key, hb, "[1,2]");
        tap_ok(verify(ring, "at+jwt", tk) == CH_EINVAL, "claims that are not an object are refused even when signed");
        free(tk);
        tk = forge_es256(key, hb, "{\"a\":1,\"a\":2}");
        tap_ok(verify(ring, "at+jwt", tk) == CH_EINVAL, "claims with a duplicated member are refused");
        free(tk);
        /* a key of another ring claiming our kid */
        char dir2[512], kid2[64];
        snprintf(dir2, sizeof(dir2), "%s/stranger", other_dir);
        ch_keyring_rotate(dir2, kid2, sizeof(kid2), err, sizeof(err));
        EVP_PKEY *stranger = load_key(dir2, kid2);
        tk = forge_es256(stranger, hb, claims);
        tap_ok(verify(ring, "at+jwt", tk) == CH_EINVAL, "a token signed by another key under our kid is refused");
        free(tk);
        EVP_PKEY_free(stranger);
    }

    /* the signature: every flipped bit, truncation, DER instead of raw, zero */
    {
        size_t n = tok.len;
        char *copy = malloc(n + 1);
        const char *sigpart = strrchr(tok.base, '.') + 1;
        size_t head = (size_t)(sigpart - tok.base);
        uint8_t raw[66];
        ch_b64url_decode(sigpart, 86, raw);
        int all = 1;
        for (int bit = 0; bit < 512; bit += 7) {
            uint8_t flipped[64];
            memcpy(flipped, raw, 64);
            flipped[bit / 8] ^= (uint8_t)(1u << (bit % 8));
            ch_buf_t b = {0};
            ch_buf_append(&b, tok.base, head);
            b64(&b, flipped, 64);
            all &= verify(ring, "at+jwt", b.base) == CH_EINVAL;
            ch_buf_free(&b);
        }
        tap_ok(all, "a signature with any flipped bit is refused (74 positions)");
        memcpy(copy, tok.base, n + 1);
        copy[n - 1] = '\0';
        tap_ok(verify(ring, "at+jwt", copy) == CH_EINVAL, "a truncated signature is refused");
        memcpy(copy, tok.base, n + 1);
        copy[n - 3] = '\0'; /* 83 characters: 62 bytes */
        tap_ok(verify(ring, "at+jwt", copy) == CH_EINVAL, "a signature two bytes short is refused");
        memcpy(copy, tok.base, n + 1);
        char *p = strchr(copy, '.') + 3;
        *p = *p == 'A' ? 'B' : 'A';
        tap_ok(verify(ring, "at+jwt", copy) == CH_EINVAL, "a changed claims byte is refused");
        free(copy);

        /* DER encoding of the same signature */
        ECDSA_SIG *es = ECDSA_SIG_new();
        ECDSA_SIG_set0(es, BN_bin2bn(raw, 32, NULL), BN_bin2bn(raw + 32, 32, NULL));
        uint8_t der[80], *dp = der;
        int dl = i2d_ECDSA_SIG(es, &dp);
        ECDSA_SIG_free(es);
        ch_buf_t b = {0};
        ch_buf_append(&b, tok.base, head);
        b64(&b, der, (size_t)dl);
        tap_ok(verify(ring, "at+jwt", b.base) == CH_EINVAL, "a DER-encoded signature is refused (raw r||s only)");
        ch_buf_free(&b);
        uint8_t zero[64] = {0};
        ch_buf_append(&b, tok.base, head);
        b64(&b, zero, 64);
        tap_ok(verify(ring, "at+jwt", b.base) == CH_EINVAL, "an all-zero signature is refused");
        ch_buf_free(&b);
        ch_buf_append(&b, tok.base, tok.len);
        ch_buf_append(&b, ".", 1);
        tap_ok(verify(ring, "at+jwt", b.base) == CH_EINVAL, "a fourth part is refused");
        ch_buf_free(&b);
        tap_ok(verify(ring, "at+jwt", "a.b") == CH_EINVAL && verify(ring, "at+jwt", "") == CH_EINVAL &&
                   verify(ring, "at+jwt", "..") == CH_EINVAL,
               "two parts, nothing, or empty parts are refused");
        /* a refresh token is an opaque secret */
        tap_ok(verify(ring, "at+jwt", "Vx3m1c2y0sE4b7y3n0xQ2VnHk6F4V7mYwqQ1c9s8bZk") == CH_EINVAL,
               "an opaque refresh token is refused");
    }

    EVP_PKEY_free(key);
    free(pub_pem);
    ch_buf_free(&tok);
    ch_keyring_free(older);
    ch_keyring_free(ring);
}

static json_t *claims_with(long long exp, const char *extra)
{
    char buf[512];
    snprintf(buf, sizeof(buf), "{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"exp\":%lld%s}", exp, extra);
    return json_loads(buf, 0, NULL);
}

static void test_jwt_check(void)
{
    int64_t now = time(NULL);
    const char *why = NULL;
    json_t *c = claims_with(now + 600, "");
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == 0, "valid claims pass");
    tap_ok(ch_jwt_check(c, "other", "cityhall-api", now, 30, &why) == CH_EINVAL && strcmp(why, "wrong issuer") == 0,
           "a wrong issuer is refused");
    tap_ok(ch_jwt_check(c, "cityhall", "other-api", now, 30, &why) == CH_EINVAL && strcmp(why, "wrong audience") == 0,
           "a wrong audience is refused");
    tap_ok(ch_jwt_check(c, "cityhall", NULL, now, 30, &why) == 0, "no audience asked: none checked");
    json_decref(c);

    c = claims_with(now - 31, "");
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == CH_EINVAL && strcmp(why, "expired") == 0,
           "a token expired beyond the leeway is refused");
    json_decref(c);
    c = claims_with(now - 10, "");
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == 0, "a token expired within the leeway passes");
    json_decref(c);

    char extra[128];
    snprintf(extra, sizeof(extra), ",\"nbf\":%lld", (long long)now + 31);
    c = claims_with(now + 600, extra);
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == CH_EINVAL, "nbf in the future is refused");
    json_decref(c);
    snprintf(extra, sizeof(extra), ",\"nbf\":%lld", (long long)now + 5);
    c = claims_with(now + 600, extra);
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == 0, "nbf within the leeway passes");
    json_decref(c);
    snprintf(extra, sizeof(extra), ",\"iat\":%lld", (long long)now + 3600);
    c = claims_with(now + 7200, extra);
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == CH_EINVAL, "iat in the future is refused");
    json_decref(c);
    c = claims_with(now + 600, ",\"nbf\":\"0\"");
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == CH_EINVAL,
           "nbf that is not a number is refused");
    json_decref(c);

    c = json_loads("{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\"}", 0, NULL);
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == CH_EINVAL, "a token without exp is refused");
    json_decref(c);
    char buf[256];
    snprintf(buf, sizeof(buf), "{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"exp\":\"%lld\"}",
             (long long)now + 600);
    c = json_loads(buf, 0, NULL);
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == CH_EINVAL, "exp as a string is refused");
    json_decref(c);
    snprintf(buf, sizeof(buf), "{\"iss\":\"cityhall\",\"aud\":[\"x\",\"cityhall-api\"],\"exp\":%lld}",
             (long long)now + 600);
    c = json_loads(buf, 0, NULL);
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == 0, "an audience array containing ours passes");
    json_decref(c);
    snprintf(buf, sizeof(buf), "{\"iss\":\"cityhall\",\"aud\":[\"x\",\"y\"],\"exp\":%lld}", (long long)now + 600);
    c = json_loads(buf, 0, NULL);
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == CH_EINVAL,
           "an audience array without ours is refused");
    json_decref(c);
    snprintf(buf, sizeof(buf), "{\"aud\":\"cityhall-api\",\"exp\":%lld}", (long long)now + 600);
    c = json_loads(buf, 0, NULL);
    tap_ok(ch_jwt_check(c, "cityhall", "cityhall-api", now, 30, &why) == CH_EINVAL, "a token without iss is refused");
    json_decref(c);
}

/* ch_auth_issue and ch_auth_verify (auth.c): the gateway's own tokens, outside a running server. */
static void test_auth_issue_verify(const char *var)
{
    snprintf(ch_server.config.var_dir, sizeof(ch_server.config.var_dir), "%s", var);
    char dir[512], err[512], kid[64];
    snprintf(dir, sizeof(dir), "%s/keys/access", var);
    ch_keyring_rotate(dir, kid, sizeof(kid), err, sizeof(err));

    ch_principal_t p = {CH_ROLE_STAFF, "staff-1", "0b7e3c9a-1111-4d2e-9c41-3f2a1b0c9d8e", "gd-health", "hall-7", NULL,
                        NULL,          0};
    ch_buf_t tok = {0};
    int64_t exp = 0;
    int64_t now = time(NULL);
    tap_ok(ch_auth_issue(&p, CH_ACCESS_TTL_S, &tok, &exp) == 0, "ch_auth_issue signs a staff token");
    tap_ok(exp >= now + CH_ACCESS_TTL_S && exp <= now + CH_ACCESS_TTL_S + 2, "exp is now + ttl");
    ch_keyring_t *ring = ch_keyring_load(dir, err, sizeof(err));
    json_t *c = NULL;
    tap_ok(ch_jws_verify(ring, "at+jwt", tok.base, tok.len, &c) == 0, "an issued token verifies as at+jwt");
    const char *why = NULL;
    tap_ok(ch_jwt_check(c, CH_TOKEN_ISS, CH_TOKEN_AUD, now, 30, &why) == 0, "an issued token has our iss and aud");
    tap_is_str(json_string_value(json_object_get(c, "role")), "staff", "the role claim is the role's name");
    tap_is_str(json_string_value(json_object_get(c, "dept")), "gd-health", "dept is set when the principal has one");
    tap_ok(json_object_get(c, "act") == NULL && json_object_get(c, "kiosk") == NULL,
           "unset optional claims are absent");
    const char *jti = json_string_value(json_object_get(c, "jti"));
    uint8_t jb[32];
    tap_ok(jti != NULL && ch_b64url_decode(jti, strlen(jti), jb) == 16, "jti is 16 random bytes in base64url");
    tap_ok(json_is_integer(json_object_get(c, "iat")) && json_is_integer(json_object_get(c, "exp")),
           "iat and exp are integers");
    json_decref(c);

    p.expires_at = now + 60;
    ch_buf_t t2 = {0};
    tap_ok(ch_auth_issue(&p, CH_ACCESS_TTL_S, &t2, &exp) == 0 && exp == now + 60,
           "exp is capped by the session's absolute expiry");
    p.expires_at = now - 1;
    tap_ok(ch_auth_issue(&p, CH_ACCESS_TTL_S, &t2, &exp) == CH_EINVAL, "a session past its expiry gets no token");
    p.expires_at = 0;
    tap_ok(ch_auth_issue(&p, CH_TOKEN_MAX_TTL_S + 1, &t2, &exp) == CH_EINVAL, "a ttl over the maximum is refused");
    p.role = CH_ROLE_STAFF | CH_ROLE_ADMIN;
    tap_ok(ch_auth_issue(&p, 60, &t2, &exp) == CH_EINVAL, "a principal with two roles gets no token");
    p.role = CH_ROLE_CITIZEN;
    p.subject = "quote\"back\\slash\x01";
    p.actor = "staff-9";
    p.device = "kiosk-3";
    ch_buf_free(&t2);
    tap_ok(ch_auth_issue(&p, 60, &t2, &exp) == 0 && ch_jws_verify(ring, "at+jwt", t2.base, t2.len, &c) == 0,
           "claims with quotes, backslashes and control characters are escaped");
    tap_is_str(json_string_value(json_object_get(c, "sub")), "quote\"back\\slash\x01",
               "escaped claims read back exactly");
    tap_is_str(json_string_value(json_object_get(c, "act")), "staff-9", "act carries the delegating staff member");
    tap_is_str(json_string_value(json_object_get(c, "kiosk")), "kiosk-3", "kiosk carries the device");
    json_decref(c);

    tap_ok(ch_role_parse("citizen") == CH_ROLE_CITIZEN && ch_role_parse("admin") == CH_ROLE_ADMIN &&
               ch_role_parse("root") == 0 && ch_role_parse(NULL) == 0,
           "role names parse, unknown ones are 0");
    tap_is_str(ch_role_name(CH_ROLE_KIOSK), "kiosk", "role names print");

    /* ch_auth_verify on a thread without Redis or a loop: the cache and the claim checks */
    char cmsg[512];
    snprintf(cmsg, sizeof(cmsg), "%s/keys/data.key", var);
    ch_pii_keys_create(cmsg, err, sizeof(err));
    snprintf(ch_server.config.pg_conninfo, sizeof(ch_server.config.pg_conninfo), "host=/nonexistent-socket-dir");
    err[0] = '\0';
    int init = ch_auth_init(&ch_server.config, err, sizeof(err));
    tap_ok(init == 0, "ch_auth_init starts without PostgreSQL");
    if (init != 0)
        printf("#   %s\n", err);
    ch_thread_t th;
    memset(&th, 0, sizeof(th));
    th.rng = 42;
    ch_auth_thread_init(&th);
    h2o_mem_pool_t pool;
    h2o_mem_init_pool(&pool);
    ch_principal_t got;
    memset(&got, 0, sizeof(got));
    tap_ok(ch_auth_verify(&th, tok.base, tok.len, &pool, &got) == 0, "ch_auth_verify accepts an issued token");
    tap_ok(got.role == CH_ROLE_STAFF && got.subject && !strcmp(got.subject, "staff-1") && got.dept &&
               !strcmp(got.dept, "gd-health") && got.hall && !strcmp(got.hall, "hall-7") && got.actor == NULL &&
               got.device == NULL && got.session_id && !strcmp(got.session_id, "0b7e3c9a-1111-4d2e-9c41-3f2a1b0c9d8e"),
           "the principal carries the token's claims");
    memset(&got, 0, sizeof(got));
    tap_ok(ch_auth_verify(&th, tok.base, tok.len, &pool, &got) == 0 && got.subject && !strcmp(got.subject, "staff-1"),
           "a second verification (cached) gives the same principal");
    /* same signature, different claims: not a cache hit */
    char *mod = strdup(tok.base);
    char *p2 = strchr(mod, '.') + 5;
    *p2 = *p2 == 'A' ? 'B' : 'A';
    tap_ok(ch_auth_verify(&th, mod, strlen(mod), &pool, &got) == CH_EINVAL,
           "a cached token's signature on changed claims is refused");
    free(mod);

    /* tokens that verify as JWS but miss a required claim or carry a wrong type */
    EVP_PKEY *key = load_key(dir, ch_keyring_current_kid(ring));
    char h[160], body[512];
    snprintf(h, sizeof(h), "{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"%s\"}", ch_keyring_current_kid(ring));
    const char *bodies[][2] = {
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sid\":\"s\",\"role\":\"citizen\",\"exp\":%lld,\"jti\":"
         "\"j\"}",
         "a token without sub is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"role\":\"citizen\",\"exp\":%lld,\"jti\":"
         "\"j\"}",
         "a token without sid is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"sid\":\"s\",\"exp\":%lld,\"jti\":\"j\"}",
         "a token without role is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"sid\":\"s\",\"role\":\"root\",\"exp\":%lld,"
         "\"jti\":\"j\"}",
         "a token with an unknown role is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"sid\":\"s\",\"role\":\"citizen\",\"exp\":%"
         "lld}",
         "a token without jti is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":7,\"sid\":\"s\",\"role\":\"citizen\",\"exp\":%lld,"
         "\"jti\":\"j\"}",
         "a token whose sub is a number is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"sid\":\"s\",\"role\":\"citizen\",\"exp\":%lld."
         "5,\"jti\":\"j\"}",
         "a token whose exp is not an integer is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"sid\":\"s\",\"role\":\"citizen\",\"exp\":%lld,"
         "\"jti\":\"j\",\"dept\":1}",
         "a token whose dept is not a string is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"other\",\"sub\":\"u\",\"sid\":\"s\",\"role\":\"citizen\",\"exp\":%lld,"
         "\"jti\":\"j\"}",
         "a token for another audience is refused"},
        {"{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"sid\":\"s\",\"role\":\"citizen\",\"exp\":%lld,"
         "\"jti\":\"j\",\"nbf\":9999999999}",
         "a token not valid yet is refused"},
    };
    for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); ++i) {
        snprintf(body, sizeof(body), bodies[i][0], (long long)now + 600);
        char *tk = forge_es256(key, h, body);
        tap_ok(ch_auth_verify(&th, tk, strlen(tk), &pool, &got) == CH_EINVAL, "%s", bodies[i][1]);
        free(tk);
    }
    snprintf(body, sizeof(body),
             "{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"sid\":\"s\",\"role\":"
             "\"citizen\",\"exp\":%lld,\"jti\":\"j\"}",
             (long long)now - 40);
    char *tk = forge_es256(key, h, body);
    tap_ok(ch_auth_verify(&th, tk, strlen(tk), &pool, &got) == CH_EINVAL, "an expired token is refused");
    free(tk);
    snprintf(body, sizeof(body),
             "{\"iss\":\"cityhall\",\"aud\":\"cityhall-api\",\"sub\":\"u\",\"sid\":\"s\",\"role\":"
             "\"citizen\",\"exp\":%lld,\"jti\":\"j\"}",
             (long long)now + 600);
    tk = forge_es256(key, h, body);
    tap_ok(ch_auth_verify(&th, tk, strlen(tk), &pool, &got) == 0 && got.role == CH_ROLE_CITIZEN,
           "a token minted outside ch_auth_issue with the same claims is accepted");
    free(tk);

    EVP_PKEY_free(key);
    h2o_mem_clear_pool(&pool);
    ch_buf_free(&tok);
    ch_buf_free(&t2);
    ch_keyring_free(ring);
}

int main(void)
{
    char base[] = "/tmp/ch_jws_XXXXXX";
    if (mkdtemp(base) == NULL)
        abort();
    snprintf(ring_dir, sizeof(ring_dir), "%s/keys/access", base);
    snprintf(other_dir, sizeof(other_dir), "%s/other", base);

    test_base64url();
    test_keyring();
    test_jwks();
    test_sign_verify();
    test_jwt_check();
    char var[300];
    snprintf(var, sizeof(var), "%s/var", base);
    test_auth_issue_verify(var);

    char cmd[400];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", base);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", base);
    return tap_done();
}
