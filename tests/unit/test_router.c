/* Unit tests of route matching: literals, parameters, backtracking, 404 versus 405, duplicate routes. */
#include <string.h>
#include "gateway.h"
#include "tap.h"

static void h(ch_call_t *call) {}

static const ch_route_t routes[] = {
    {"GET", "/v1/me", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, NULL, h, 0},
    {"GET", "/v1/me/sessions", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, NULL, h, 0},
    {"DELETE", "/v1/me/sessions/{id}", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, NULL, NULL, h, 0},
    {"GET", "/v1/onething/bundles/{code}/form", CH_ROLE_CITIZEN, CH_OWN_NONE, NULL, NULL, h, 0},
    {"POST", "/v1/departments/{dept}/callbacks", CH_ROLE_DEPT, CH_OWN_NONE, NULL, NULL, h, 0},
    {"GET", "/v1/health/code.png", CH_ROLE_CITIZEN, CH_OWN_NONE, NULL, NULL, h, 0},
    {"GET", "/v1/health/code", CH_ROLE_CITIZEN, CH_OWN_NONE, NULL, NULL, h, 0},
    {"POST", "/v1/venues/{id}/checkins", CH_ROLE_CITIZEN, CH_OWN_NONE, NULL, NULL, h, 0},
    {"GET", "/v1/venues/special/checkins", CH_ROLE_CITIZEN, CH_OWN_NONE, NULL, NULL, h, 0},
    {"GET", "/v1/a/{x}/b/{y}", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, h, 0},
    {"GET", "/", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, h, 0},
};

static int match(ch_router_t *r, const char *method, const char *path, ch_match_t *m, char *allow, size_t allow_len)
{
    return ch_router_match(r, method, strlen(method), path, strlen(path), m, allow, allow_len);
}

static const char *param(const ch_match_t *m, const char *name, char *buf)
{
    for (size_t i = 0; i < m->nparams; ++i)
        if (strcmp(m->param_names[i], name) == 0) {
            memcpy(buf, m->param_values[i].base, m->param_values[i].len);
            buf[m->param_values[i].len] = '\0';
            return buf;
        }
    return NULL;
}

int main(void)
{
    char err[256], allow[128], buf[128];
    ch_router_t *r = ch_router_new();
    int all_ok = 1;
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); ++i)
        all_ok &= ch_router_add(r, &routes[i], err, sizeof(err)) == 0;
    tap_ok(all_ok, "every route of a valid table is accepted");
    tap_ok(ch_router_count(r) == sizeof(routes) / sizeof(routes[0]), "the router counts its routes");

    ch_match_t m;
    tap_ok(match(r, "GET", "/v1/me", &m, NULL, 0) == CH_MATCH_FOUND && m.route == &routes[0], "a literal path matches");
    tap_ok(match(r, "DELETE", "/v1/me/sessions/abc123", &m, NULL, 0) == CH_MATCH_FOUND && m.route == &routes[2],
           "a parameter segment matches");
    tap_is_str(param(&m, "id", buf), "abc123", "the parameter value is captured by name");
    tap_ok(match(r, "GET", "/v1/onething/bundles/birth/form", &m, NULL, 0) == CH_MATCH_FOUND && m.route == &routes[3],
           "a parameter in the middle of a path matches");
    tap_is_str(param(&m, "code", buf), "birth", "the middle parameter is captured");
    tap_ok(match(r, "GET", "/v1/health/code.png", &m, NULL, 0) == CH_MATCH_FOUND && m.route == &routes[5],
           "a literal with a dot is distinct from its stem");
    tap_ok(match(r, "GET", "/v1/health/code", &m, NULL, 0) == CH_MATCH_FOUND && m.route == &routes[6],
           "the stem matches its own route");
    tap_ok(match(r, "GET", "/v1/venues/special/checkins", &m, NULL, 0) == CH_MATCH_FOUND && m.route == &routes[8],
           "a literal segment wins over a parameter");
    tap_ok(match(r, "POST", "/v1/venues/special/checkins", &m, allow, sizeof(allow)) == CH_MATCH_FOUND &&
               m.route == &routes[7],
           "the parameter route is found by backtracking when the literal route lacks the method");
    tap_ok(match(r, "GET", "/v1/a/1/b/2", &m, NULL, 0) == CH_MATCH_FOUND && m.nparams == 2, "two parameters match");
    tap_is_str(param(&m, "y", buf), "2", "the second parameter is captured");
    tap_ok(match(r, "GET", "/", &m, NULL, 0) == CH_MATCH_FOUND && m.route == &routes[10], "the root path matches");

    tap_ok(match(r, "GET", "/v1/nothing", &m, NULL, 0) == CH_MATCH_NO_PATH, "an unknown path is not found (404)");
    tap_ok(match(r, "GET", "/v1/me/", &m, NULL, 0) == CH_MATCH_NO_PATH, "a trailing slash is not the same path");
    tap_ok(match(r, "GET", "/v1//me", &m, NULL, 0) == CH_MATCH_NO_PATH, "an empty segment never matches");
    tap_ok(match(r, "GET", "/v1/me/sessions/a/b", &m, NULL, 0) == CH_MATCH_NO_PATH, "extra segments do not match");
    tap_ok(match(r, "GET", "", &m, NULL, 0) == CH_MATCH_NO_PATH, "an empty path is not found");
    tap_ok(match(r, "POST", "/v1/me", &m, allow, sizeof(allow)) == CH_MATCH_NO_METHOD,
           "a known path with another method is 405");
    tap_is_str(allow, "GET", "405 lists the allowed methods");
    tap_ok(match(r, "HEAD", "/v1/me", &m, NULL, 0) == CH_MATCH_FOUND && m.route == &routes[0],
           "HEAD is served by the GET route");

    ch_route_t dup = {"GET", "/v1/me", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &dup, err, sizeof(err)) != 0 && strstr(err, "duplicate") != NULL,
           "a duplicate route is refused with a message naming it");
    ch_route_t dup_param = {"DELETE", "/v1/me/sessions/{session}", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &dup_param, err, sizeof(err)) != 0,
           "a route differing only in its parameter name is a duplicate");
    ch_route_t bad1 = {"GET", "/v1/x/{a", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &bad1, err, sizeof(err)) != 0, "an unclosed parameter is refused");
    ch_route_t bad2 = {"GET", "v1/x", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &bad2, err, sizeof(err)) != 0, "a path without a leading slash is refused");
    ch_route_t bad3 = {"GET", "/v1/x/", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &bad3, err, sizeof(err)) != 0, "a trailing slash in a pattern is refused");
    ch_route_t bad4 = {"GET", "/v1/x{a}", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &bad4, err, sizeof(err)) != 0, "a parameter inside a literal segment is refused");
    ch_route_t nohandler = {"GET", "/v1/y", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, NULL, 0};
    tap_ok(ch_router_add(r, &nohandler, err, sizeof(err)) != 0, "a route without a handler is refused");
    ch_route_t undeclared = {"GET", "/v1/z", CH_ROLE_CITIZEN, CH_OWN_UNDECLARED, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &undeclared, err, sizeof(err)) != 0 && strstr(err, "ownership policy") != NULL,
           "a route without an ownership policy is refused with a message naming it");
    ch_route_t public_self = {"GET", "/v1/z", CH_PUBLIC, CH_OWN_SELF, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &public_self, err, sizeof(err)) != 0, "a public route owning the caller's data is refused");
    ch_route_t citizen_noparam = {"GET", "/v1/z", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, NULL, NULL, h, 0};
    tap_ok(ch_router_add(r, &citizen_noparam, err, sizeof(err)) != 0,
           "a citizen-owned resource route without a path parameter is refused");
    tap_ok(ch_router_count(r) == sizeof(routes) / sizeof(routes[0]), "refused routes are not counted");
    ch_router_free(r);
    return tap_done();
}
