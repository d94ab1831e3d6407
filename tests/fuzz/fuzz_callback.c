/*
 * libFuzzer target for department callback signatures (services/onething: ot_signature_parse and
 * ot_signature_check, as POST /v1/departments/{dept}/callbacks applies them with the 5-minute window): a callback
 * that passes must carry the HMAC-SHA-256 of "<t>.<body>" under the department's secret (recomputed here with
 * OpenSSL's one-shot HMAC, not ot_sign_body), and a genuinely signed callback must pass exactly while its t is
 * inside the window; edited, only the unchanged callback may pass.
 *
 * The first byte picks how the rest is used: even, a secret, a header and a body (split at NUL bytes; a secret
 * outside the 16-256 bytes `cityhall dept endpoint` allows is replaced by a fixed one); odd, a signed byte moving
 * t around the window, a body the fuzzer signs canonically, then edits (op, position, byte, target) of the header
 * or the body.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include "dispatch.h"
#include "fuzz_util.h"

#define WINDOW_S 300 /* decide.c's SIGNATURE_WINDOW_S */

static const char default_secret[] = "fuzz-department-secret-0123456789";

/* The verdict of the callback route on (header, body) at `now`; `t` and `v1` receive what the header said. */
static int accepted(const char *secret, size_t slen, const char *header, const void *body, size_t blen, long long now,
                    long long *t, char v1[65])
{
    return ot_signature_parse(header, t, v1) == 0 && *t >= now - WINDOW_S && *t <= now + WINDOW_S &&
           ot_signature_check(secret, slen, *t, v1, body, blen) == 0;
}

static void reference_mac(const char *secret, size_t slen, long long t, const void *body, size_t blen, char out[65])
{
    char prefix[32];
    int pl = snprintf(prefix, sizeof(prefix), "%lld.", t);
    uint8_t *msg = malloc((size_t)pl + blen + 1), mac[32];
    memcpy(msg, prefix, (size_t)pl);
    memcpy(msg + pl, body, blen);
    unsigned ml = 0;
    HMAC(EVP_sha256(), secret, (int)slen, msg, (size_t)pl + blen, mac, &ml);
    free(msg);
    for (unsigned i = 0; i < 32; ++i)
        snprintf(out + 2 * i, 3, "%02x", mac[i]);
}

/* The oracle on an accepted callback: the header's v1 is the MAC of its t and this body. */
static void check_accepted(const char *secret, size_t slen, const char *header, const void *body, size_t blen,
                           long long t, const char v1[65])
{
    char want[65];
    reference_mac(secret, slen, t, body, blen, want);
    if (strcmp(want, v1) != 0)
        fz_fail("accepted a callback whose v1 is not the MAC of t and the body", header, strlen(header));
}

static void raw(fz_input_t *in, long long now)
{
    const uint8_t *s, *h;
    size_t slen, hlen;
    fz_part(in, 0, &s, &slen);
    fz_part(in, 0, &h, &hlen);
    if (slen < 16 || slen > 256)
        s = (const uint8_t *)default_secret, slen = sizeof(default_secret) - 1;
    char *header = strndup((const char *)h, hlen);
    long long t;
    char v1[65];
    if (accepted((const char *)s, slen, header, in->p, in->n, now, &t, v1))
        check_accepted((const char *)s, slen, header, in->p, in->n, t, v1);
    free(header);
}

static void signed_then_edited(fz_input_t *in, long long now)
{
    long long t0 = now + (long long)(int8_t)fz_byte(in) * 3; /* -384 .. +381 s: both edges of the window */
    const uint8_t *bp;
    size_t blen;
    fz_part(in, 0, &bp, &blen);
    char mac[65], hdr[128];
    reference_mac(default_secret, sizeof(default_secret) - 1, t0, bp, blen, mac);
    snprintf(hdr, sizeof(hdr), "t=%lld,v1=%s", t0, mac);

    long long t;
    char v1[65];
    /* unedited: the reference form parses to what was signed, and passes exactly inside the window */
    int in_window = t0 >= now - WINDOW_S && t0 <= now + WINDOW_S;
    if (accepted(default_secret, sizeof(default_secret) - 1, hdr, bp, blen, now, &t, v1) != in_window)
        fz_fail(in_window ? "a genuine callback was refused" : "a stale callback was accepted", hdr, strlen(hdr));
    if (ot_signature_parse(hdr, &t, v1) != 0 || t != t0 || strcmp(v1, mac) != 0)
        fz_fail("the canonical header does not parse to its t and v1", hdr, strlen(hdr));

    ch_buf_t h = {0}, b = {0};
    ch_buf_append(&h, hdr, strlen(hdr));
    ch_buf_reserve(&b, blen + 1); /* never a NULL body, even an empty one */
    ch_buf_append(&b, bp, blen);
    while (in->n >= 5) {
        unsigned op = fz_byte(in), pos = fz_byte(in) | fz_byte(in) << 8, byte = fz_byte(in);
        fz_edit(fz_byte(in) & 1 ? &b : &h, op, pos, byte);
    }
    char *header = strndup(h.base, h.len); /* a header value ends at its first NUL for the gateway too */
    if (accepted(default_secret, sizeof(default_secret) - 1, header, b.base, b.len, now, &t, v1)) {
        check_accepted(default_secret, sizeof(default_secret) - 1, header, b.base, b.len, t, v1);
        if (b.len != blen || memcmp(b.base, bp, blen) != 0 || t != t0)
            fz_fail("an edited callback was accepted", header, strlen(header));
    }
    free(header);
    ch_buf_free(&h);
    ch_buf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_input_t in = {data, size};
    long long now = (long long)time(NULL);
    if (fz_byte(&in) & 1)
        signed_then_edited(&in, now);
    else
        raw(&in, now);
    return 0;
}
