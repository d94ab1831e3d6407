/*
 * libFuzzer target for route matching (gateway/router.c) over the real route tables of every module: any method
 * and path bytes must give the answer of a plain linear reference matcher written here (route, parameters,
 * 404 versus 405 and the Allow list), and the Allow buffer is exactly as large as the input says, so ASan sees
 * any write past it.
 *
 * Input: the method up to the first space, then one byte for the Allow buffer's size, then the path.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gateway.h"
#include "fuzz_util.h"

static ch_router_t *router;
static const ch_route_t **routes; /* in registration order, as gateway/server.c adds them */
static size_t nroutes;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char err[512];
    router = ch_router_new();
    for (size_t m = 0; m < ch_nmodules; ++m)
        for (size_t i = 0; i < ch_modules[m]->nroutes; ++i) {
            if (ch_router_add(router, &ch_modules[m]->routes[i], err, sizeof(err)) != 0)
                fz_fail(err, NULL, 0);
            routes = realloc(routes, (nroutes + 1) * sizeof(*routes));
            routes[nroutes++] = &ch_modules[m]->routes[i];
        }
    return 0;
}

/* One '/'-separated segment of a path or pattern. */
typedef struct seg {
    const char *p;
    size_t len;
} seg_t;

/* Splits after the leading '/'; returns the count, or -1 when a segment is empty (so "//", a trailing '/'). */
static int split(const char *s, size_t len, seg_t *out, int cap)
{
    if (len == 0 || s[0] != '/')
        return -1;
    if (len == 1)
        return 0;
    int n = 0;
    size_t start = 1;
    for (size_t i = 1; i <= len; ++i) {
        if (i < len && s[i] != '/')
            continue;
        if (i == start || n == cap)
            return -1;
        out[n++] = (seg_t){s + start, i - start};
        start = i + 1;
    }
    return n;
}

static int is_param(seg_t s)
{
    return s.len >= 2 && s.p[0] == '{';
}

/*
 * Whether pattern `r` matches the path segments, and its rank: one bit per segment, from the first, set where the
 * pattern has a parameter. A literal segment wins over a parameter at the first place they differ, so among the
 * patterns that match, the one with the smallest rank is the answer (same rank: same pattern shape).
 */
static int pattern_match(const ch_route_t *r, const seg_t *path, int n, uint64_t *rank)
{
    seg_t pat[64];
    int pn = split(r->path, strlen(r->path), pat, 64);
    if (pn != n)
        return 0;
    *rank = 0;
    for (int i = 0; i < n; ++i) {
        *rank <<= 1;
        if (is_param(pat[i]))
            *rank |= 1;
        else if (pat[i].len != path[i].len || memcmp(pat[i].p, path[i].p, path[i].len) != 0)
            return 0;
    }
    return 1;
}

static int method_match(const ch_route_t *r, const char *m, size_t len)
{
    return (strlen(r->method) == len && memcmp(r->method, m, len) == 0) ||
           (len == 4 && memcmp(m, "HEAD", 4) == 0 && strcmp(r->method, "GET") == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_input_t in = {data, size};
    const uint8_t *method, *path;
    size_t mlen, plen;
    fz_part(&in, ' ', &method, &mlen);
    size_t allow_len = fz_byte(&in);
    fz_part(&in, 0xff, &path, &plen); /* the rest (0xff never appears in a UTF-8 path) */
    char *allow = malloc(allow_len ? allow_len : 1);
    ch_match_t m;
    memset(&m, 0, sizeof(m));
    int got = ch_router_match(router, (const char *)method, mlen, (const char *)path, plen, &m, allow, allow_len);

    seg_t segs[64];
    int n = split((const char *)path, plen, segs, 64);
    const ch_route_t *want = NULL, *shape = NULL;
    uint64_t want_rank = UINT64_MAX, shape_rank = UINT64_MAX, rank;
    for (size_t i = 0; n >= 0 && i < nroutes; ++i) {
        if (!pattern_match(routes[i], segs, n, &rank))
            continue;
        if (rank < shape_rank || shape == NULL)
            shape = routes[i], shape_rank = rank;
        if (method_match(routes[i], (const char *)method, mlen) && (want == NULL || rank < want_rank))
            want = routes[i], want_rank = rank;
    }
    if (want != NULL) {
        if (got != CH_MATCH_FOUND || m.route != want)
            fz_fail("the router chose another route than the reference", path, plen);
        seg_t pat[64];
        int pn = split(want->path, strlen(want->path), pat, 64);
        size_t k = 0;
        for (int i = 0; i < pn; ++i) {
            if (!is_param(pat[i]))
                continue;
            if (k >= m.nparams || strlen(m.param_names[k]) != pat[i].len - 2 ||
                memcmp(m.param_names[k], pat[i].p + 1, pat[i].len - 2) != 0 || m.param_values[k].base != segs[i].p ||
                m.param_values[k].len != segs[i].len)
                fz_fail("a path parameter is not the segment it names", path, plen);
            ++k;
        }
        if (k != m.nparams)
            fz_fail("the match has more parameters than its pattern", path, plen);
    } else if (shape != NULL) {
        if (got != CH_MATCH_NO_METHOD)
            fz_fail("a known path with another method is not 405", path, plen);
        /* Allow: every method registered on the best-ranked shape, in registration order, cut to the buffer */
        char expect[512] = "";
        size_t off = 0;
        for (size_t i = 0; i < nroutes; ++i)
            if (pattern_match(routes[i], segs, n, &rank) && rank == shape_rank)
                off += (size_t)snprintf(expect + off, sizeof(expect) - off, "%s%s", off ? ", " : "", routes[i]->method);
        if (allow_len != 0 && (strlen(allow) >= allow_len || strncmp(allow, expect, allow_len - 1) != 0))
            fz_fail("the Allow list is not the path's methods", path, plen);
    } else if (got != CH_MATCH_NO_PATH) {
        fz_fail("an unknown path is not 404", path, plen);
    }
    free(allow);
    return 0;
}
