/*
 * libFuzzer target for health-code QR and paper tokens (hc_token_verify, the checks of POST /v1/health/verify in
 * services/healthcode/display.c): a token it accepts must be an ES256 hc+jwt of the test key (checked again
 * without gateway/jws.c) whose claims say what hc_token_verify reports, and a genuine token changed in any way
 * must be refused. Refusals must be one of the three reasons a scanner is told.
 *
 * The first byte picks how the rest is used: 0 the token itself; 1 claims the fuzzer signs as a real hc+jwt;
 * 2 a header and claims (split at a NUL byte) it signs with the test key whatever they say; 3 edits (op,
 * position, byte) of a fresh genuine token, signed as display.c signs them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include "healthcode.h"
#include "fuzz_util.h"

#define LEEWAY_S 30 /* display.c's VERIFY_LEEWAY_S */

static ch_keyring_t *ring;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fz_tree_remove(fz_keyring_make("keys/healthcode", &ring));
    return 0;
}

static int uuid_text(const char *s, const uint8_t id[16])
{
    char want[37];
    static const char hex[] = "0123456789abcdef";
    for (int i = 0, o = 0; i < 16; ++i) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            want[o++] = '-';
        want[o++] = hex[id[i] >> 4];
        want[o++] = hex[id[i] & 15];
        want[o] = '\0';
    }
    return s != NULL && strcasecmp(s, want) == 0;
}

static int time_ok(json_t *claims, const char *name, int64_t latest)
{
    json_t *v = json_object_get(claims, name);
    return v == NULL || (json_is_number(v) && json_number_value(v) <= (double)latest);
}

/* What an accepted token's claims must be, and that hc_token_verify reported them as they are. */
static const char *claims_violation(json_t *c, const hc_token_t *t, int64_t before, int64_t after)
{
    static const char *const colors[] = {"green", "yellow", "red"};
    json_t *iss = json_object_get(c, "iss"), *exp = json_object_get(c, "exp"), *nm = json_object_get(c, "nm"),
           *paper = json_object_get(c, "paper");
    const char *col = json_string_value(json_object_get(c, "col"));
    if (json_string_length(iss) != 8 || strcmp(json_string_value(iss), "cityhall") != 0)
        return "wrong issuer";
    if (!json_is_integer(exp) || json_integer_value(exp) <= before - LEEWAY_S || json_integer_value(exp) != t->exp)
        return "expired, or exp not reported as it is";
    if (!time_ok(c, "nbf", after + LEEWAY_S) || !time_ok(c, "iat", after + LEEWAY_S))
        return "not valid yet";
    if (!json_is_string(json_object_get(c, "sub")))
        return "no subject";
    if (t->color < 0 || t->color > 2 || col == NULL || strcmp(col, colors[t->color]) != 0 ||
        json_string_length(json_object_get(c, "col")) != strlen(col))
        return "color not reported as it is";
    if (!json_is_string(nm) || json_string_length(nm) >= sizeof(t->masked) ||
        strcmp(json_string_value(nm), t->masked) != 0)
        return "name not reported as it is";
    if ((paper != NULL) != (t->paper != 0) || (paper != NULL && !uuid_text(json_string_value(paper), t->paper_id)))
        return "paper id not reported as it is";
    return NULL;
}

static int verify(const char *token, size_t len)
{
    hc_token_t t;
    int64_t before = time(NULL);
    const char *refusal = hc_token_verify(ring, token, len, before, &t);
    int64_t after = time(NULL);
    if (refusal != NULL) {
        if (strcmp(refusal, "malformed") != 0 && strcmp(refusal, "bad_signature") != 0 &&
            strcmp(refusal, "expired") != 0)
            fz_fail("a refusal the scanner is not told", refusal, strlen(refusal));
        return 0;
    }
    json_t *claims = fz_es256_check(ring, "hc+jwt", token, len);
    if (claims == NULL)
        fz_fail("accepted a token that is not ES256-signed by the test key", token, len);
    const char *why = claims_violation(claims, &t, before, after);
    json_decref(claims);
    if (why != NULL)
        fz_fail(why, token, len);
    return 1;
}

/* Mode 3: a genuine token as display.c's token_sign makes it, then edits; only the unchanged token may pass. */
static void edited(fz_input_t *in)
{
    char claims[256];
    int64_t now = time(NULL);
    unsigned paper = fz_byte(in) & 1;
    int n = snprintf(claims, sizeof(claims),
                     "{\"iss\":\"cityhall\",\"sub\":\"0b9f6a52-2d55-4a7e-9a51-3c2f1e0d4b6a\",\"col\":\"yellow\","
                     "\"nm\":\"\\u5f20*\",\"iat\":%lld,\"exp\":%lld%s}",
                     (long long)now, (long long)now + 300,
                     paper ? ",\"paper\":\"7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f\"" : "");
    ch_buf_t t = {0};
    if (ch_jws_sign(ring, "hc+jwt", claims, (size_t)n, &t) != 0)
        fz_fail("could not sign a genuine token", claims, (size_t)n);
    fz_check_edits(in, &t, verify);
    ch_buf_free(&t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_input_t in = {data, size};
    unsigned mode = fz_byte(&in) % 4;
    ch_buf_t tok = {0};
    const uint8_t *a, *b;
    size_t alen, blen;
    switch (mode) {
    case 0:
        verify((const char *)in.p, in.n);
        break;
    case 1:
        if (ch_jws_sign(ring, "hc+jwt", (const char *)in.p, in.n, &tok) == 0)
            verify(tok.base, tok.len);
        break;
    case 2:
        fz_part(&in, 0, &a, &alen);
        fz_part(&in, 0, &b, &blen);
        fz_es256_sign((const char *)a, alen, (const char *)b, blen, &tok);
        verify(tok.base, tok.len);
        break;
    default:
        edited(&in);
        break;
    }
    ch_buf_free(&tok);
    return 0;
}
