/*
 * libFuzzer target for access-token verification (gateway/auth.c over gateway/jws.c): whatever the bytes, a token
 * that ch_auth_verify accepts must be an ES256 token of the test key (checked again without gateway/jws.c) whose
 * claims satisfy the policy as written here, and a genuine token changed in any way must be refused.
 *
 * The first byte picks how the rest is used: 0 the token itself; 1 claims that the fuzzer signs as a real
 * at+jwt; 2 a header and claims (split at a NUL byte) that it signs with the test key whatever they say; 3 edits
 * (op, position, byte) applied to a freshly issued token; 4 a fresh token's claims under a header naming another
 * algorithm (none, HS256 keyed with the public key, ...), which must never pass.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/hmac.h>
#include "gateway.h"
#include "cityhall/auth.h"
#include "fuzz_util.h"

static ch_keyring_t *ring;
static ch_thread_t thread;

static const ch_principal_t citizen = {CH_ROLE_CITIZEN, "0d6c3f8e-5b7a-4f43-9d3e-2a1b0c9d8e7f",
                                       "5f1e2d3c-4b5a-4968-8776-655443322110"};

static void issue(ch_buf_t *out)
{
    int64_t exp;
    if (ch_auth_issue(&citizen, CH_ACCESS_TTL_S, out, &exp) != 0)
        fz_fail("ch_auth_issue refused a valid principal", NULL, 0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *root = fz_keyring_make("keys/access", &ring);
    snprintf(ch_server.config.var_dir, sizeof(ch_server.config.var_dir), "%s", root);
    ch_auth_thread_init(&thread); /* no Redis, no loop: the verified-token cache and the revocation set only */
    ch_buf_t t = {0};
    issue(&t); /* auth.c loads the access ring from var_dir on its first use; the folder is not needed after */
    ch_buf_free(&t);
    fz_tree_remove(root);
    return 0;
}

/* A string claim as verify_full promises it to handlers: absent, or 1..max bytes without NUL. */
static int str_claim(json_t *claims, const char *name, int required, size_t max, const char *got)
{
    json_t *v = json_object_get(claims, name);
    if (v == NULL)
        return !required && got == NULL;
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    if (s == NULL || n == 0 || n > max || strlen(s) != n)
        return 0;
    return name[0] == 'j' || name[0] == 'r' || (got != NULL && strcmp(got, s) == 0); /* jti, role: not handed on */
}

static int time_claim(json_t *claims, const char *name, int64_t latest)
{
    json_t *v = json_object_get(claims, name);
    return v == NULL || (json_is_number(v) && json_number_value(v) <= (double)latest);
}

/* The access-token policy of DESIGN.md, checked on the claims the independent ES256 check returned. */
static const char *policy_violation(json_t *claims, const ch_principal_t *p, int64_t before, int64_t after)
{
    json_t *iss = json_object_get(claims, "iss"), *aud = json_object_get(claims, "aud"),
           *exp = json_object_get(claims, "exp");
    if (!json_is_object(claims))
        return "claims are not an object";
    if (json_string_length(iss) != strlen(CH_TOKEN_ISS) || strcmp(json_string_value(iss), CH_TOKEN_ISS) != 0)
        return "wrong issuer";
    int aud_ok = json_is_string(aud) && json_string_length(aud) == strlen(CH_TOKEN_AUD) &&
                 strcmp(json_string_value(aud), CH_TOKEN_AUD) == 0;
    size_t i;
    json_t *a;
    json_array_foreach(aud, i, a) aud_ok |= json_string_length(a) == strlen(CH_TOKEN_AUD) &&
                                            json_string_value(a) != NULL &&
                                            strcmp(json_string_value(a), CH_TOKEN_AUD) == 0;
    if (!aud_ok)
        return "wrong audience";
    if (!json_is_integer(exp) || json_integer_value(exp) <= before - CH_TOKEN_LEEWAY_S ||
        p->expires_at != json_integer_value(exp))
        return "expired, or exp not handed on";
    if (!time_claim(claims, "nbf", after + CH_TOKEN_LEEWAY_S) || !time_claim(claims, "iat", after + CH_TOKEN_LEEWAY_S))
        return "not valid yet";
    const char *role = json_string_value(json_object_get(claims, "role"));
    if (role == NULL || ch_role_parse(role) == 0 || ch_role_parse(role) != p->role)
        return "unknown role, or not the one handed on";
    if (!str_claim(claims, "sub", 1, 255, p->subject) || !str_claim(claims, "sid", 1, 64, p->session_id) ||
        !str_claim(claims, "jti", 1, 255, "") || !str_claim(claims, "role", 1, 16, "") ||
        !str_claim(claims, "dept", 0, 255, p->dept) || !str_claim(claims, "hall", 0, 255, p->hall) ||
        !str_claim(claims, "act", 0, 255, p->actor) || !str_claim(claims, "kiosk", 0, 255, p->device))
        return "a string claim is malformed or not handed on as it is";
    return NULL;
}

/* ch_auth_verify, then the oracle on what it accepted. Returns 1 when the token was accepted. */
static int verify(const char *token, size_t len)
{
    h2o_mem_pool_t pool;
    h2o_mem_init_pool(&pool);
    ch_principal_t p;
    memset(&p, 0, sizeof(p));
    int64_t before = time(NULL);
    int ok = ch_auth_verify(&thread, token, len, &pool, &p) == 0;
    int64_t after = time(NULL);
    if (ok) {
        json_t *claims = fz_es256_check(ring, CH_TOKEN_TYP_ACCESS, token, len);
        if (claims == NULL)
            fz_fail("accepted a token that is not ES256-signed by the test key", token, len);
        const char *why = policy_violation(claims, &p, before, after);
        json_decref(claims);
        if (why != NULL)
            fz_fail(why, token, len);
    }
    h2o_mem_clear_pool(&pool);
    return ok;
}

/* Mode 3: edits of a genuine token; only the unchanged token may pass. */
static void edited(fz_input_t *in)
{
    ch_buf_t t = {0};
    issue(&t);
    fz_check_edits(in, &t, verify);
    ch_buf_free(&t);
}

/* Mode 4: a genuine token's claims under another algorithm. */
static void confused(fz_input_t *in)
{
    static const char *const algs[] = {"none",  "HS256", "HS384", "HS512",  "RS256", "PS256",       "ES384",
                                       "ES512", "EdDSA", "es256", "ES256K", "",      "ES256\\u0000"};
    ch_buf_t t = {0}, tok = {0}, jwks = {0};
    issue(&t);
    const char *d1 = memchr(t.base, '.', t.len), *d2 = memchr(d1 + 1, '.', t.len - (size_t)(d1 + 1 - t.base));
    char header[256];
    const uint8_t *alg;
    size_t alen;
    unsigned pick = fz_byte(in), how = fz_byte(in);
    fz_part(in, 0, &alg, &alen);
    int hl =
        pick < sizeof(algs) / sizeof(algs[0])
            ? snprintf(header, sizeof(header), "{\"alg\":\"%s\",\"typ\":\"at+jwt\",\"kid\":\"" FZ_KID "\"}", algs[pick])
            : snprintf(header, sizeof(header), "{\"alg\":\"%.*s\",\"typ\":\"at+jwt\",\"kid\":\"" FZ_KID "\"}",
                       (int)(alen > 64 ? 64 : alen), (const char *)alg);
    /* the header as a signer would encode it, then the genuine payload part */
    fz_es256_sign(header, (size_t)hl, "", 0, &tok);
    tok.len = (size_t)(memchr(tok.base, '.', tok.len) - (void *)tok.base);
    ch_buf_append(&tok, d1, (size_t)(d2 - d1));
    ch_buf_append(&tok, ".", 1);
    if (how % 3 == 1) { /* HS256 keyed with the published key, the classic confusion */
        uint8_t mac[32];
        unsigned ml = 0;
        ch_keyring_jwks(ring, &jwks);
        HMAC(EVP_sha256(), jwks.base, (int)jwks.len, (const uint8_t *)tok.base, tok.len - 1, mac, &ml);
        ch_b64url_encode(mac, ml, &tok);
    } else if (how % 3 == 2) { /* the genuine signature, which signed another header */
        ch_buf_append(&tok, d2 + 1, t.len - (size_t)(d2 + 1 - t.base));
    } /* else: no signature at all, as alg none has it */
    /* an input may spell out the genuine header ("ES256"): then it is the genuine token, which must pass */
    int genuine = tok.len == t.len && memcmp(tok.base, t.base, t.len) == 0;
    if (verify(tok.base, tok.len) != genuine)
        fz_fail(genuine ? "a genuine token was refused" : "a token with another algorithm was accepted", tok.base,
                tok.len);
    ch_buf_free(&t);
    ch_buf_free(&tok);
    ch_buf_free(&jwks);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_input_t in = {data, size};
    unsigned mode = fz_byte(&in) % 5;
    ch_buf_t tok = {0};
    const uint8_t *a, *b;
    size_t alen, blen;
    switch (mode) {
    case 0:
        verify((const char *)in.p, in.n);
        break;
    case 1:
        if (ch_jws_sign(ring, CH_TOKEN_TYP_ACCESS, (const char *)in.p, in.n, &tok) == 0)
            verify(tok.base, tok.len);
        break;
    case 2:
        fz_part(&in, 0, &a, &alen);
        fz_part(&in, 0, &b, &blen);
        fz_es256_sign((const char *)a, alen, (const char *)b, blen, &tok);
        verify(tok.base, tok.len);
        break;
    case 3:
        edited(&in);
        break;
    default:
        confused(&in);
        break;
    }
    ch_buf_free(&tok);
    return 0;
}
