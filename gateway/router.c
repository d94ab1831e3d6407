/* Route matching: a segment trie built once from the modules' route tables, read-only afterwards. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gateway.h"

#define MAX_METHODS 8

typedef struct ch_rnode ch_rnode_t;

struct ch_rnode {
    char *literal;            /* NULL for the parameter node */
    ch_rnode_t **children;    /* literal children */
    size_t nchildren;
    ch_rnode_t *param;        /* the `{name}` child, shared by routes whatever they call it */
    struct {
        const ch_route_t *route;
        unsigned index;
        const char *names[CH_MAX_PARAMS]; /* this route's parameter names, in order */
        size_t nnames;
    } methods[MAX_METHODS];
    size_t nmethods;
};

struct ch_router {
    ch_rnode_t root;
    const ch_route_t **routes;
    unsigned nroutes;
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

ch_router_t *ch_router_new(void)
{
    ch_router_t *r = calloc(1, sizeof(*r));
    if (r == NULL)
        abort();
    return r;
}

static void node_free(ch_rnode_t *n)
{
    for (size_t i = 0; i < n->nchildren; ++i) {
        node_free(n->children[i]);
        free(n->children[i]);
    }
    free(n->children);
    if (n->param != NULL) {
        node_free(n->param);
        free(n->param);
    }
    free(n->literal);
}

void ch_router_free(ch_router_t *router)
{
    node_free(&router->root);
    free(router->routes);
    free(router);
}

static ch_rnode_t *node_new(const char *literal, size_t len)
{
    ch_rnode_t *n = calloc(1, sizeof(*n));
    if (n == NULL)
        abort();
    if (literal != NULL && (n->literal = strndup(literal, len)) == NULL)
        abort();
    return n;
}

static ch_rnode_t *literal_child(const ch_rnode_t *n, const char *seg, size_t len)
{
    for (size_t i = 0; i < n->nchildren; ++i)
        if (strlen(n->children[i]->literal) == len && memcmp(n->children[i]->literal, seg, len) == 0)
            return n->children[i];
    return NULL;
}

const char *ch_own_name(ch_own_t own)
{
    static const char *const names[] = {"undeclared", "none", "self", "citizen", "department"};
    return (unsigned)own < sizeof(names) / sizeof(names[0]) ? names[own] : "undeclared";
}

/* The ownership policy is what the authorization matrix checks a route against: it must be there and make sense. */
static int policy_ok(const ch_route_t *route, char *err, size_t errlen)
{
    if (route->own == CH_OWN_UNDECLARED || route->own > CH_OWN_DEPARTMENT) {
        set_err(err, errlen, "route %s %s: declares no ownership policy (.own, CH_OWN_* in module.h)", route->method,
                route->path);
        return 0;
    }
    if (route->roles == CH_PUBLIC && route->own != CH_OWN_NONE) {
        set_err(err, errlen, "route %s %s: a public route has no caller to own anything: use CH_OWN_NONE",
                route->method, route->path);
        return 0;
    }
    if (route->own == CH_OWN_CITIZEN && strchr(route->path, '{') == NULL) {
        set_err(err, errlen, "route %s %s: CH_OWN_CITIZEN needs a path parameter naming the resource", route->method,
                route->path);
        return 0;
    }
    return 1;
}

int ch_router_add(ch_router_t *router, const ch_route_t *route, char *err, size_t errlen)
{
    const char *path = route->path;
    if (route->method == NULL || route->handler == NULL || path == NULL || path[0] != '/') {
        set_err(err, errlen, "route %s %s: needs a method, a handler and a path starting with /",
                route->method ? route->method : "?", path ? path : "?");
        return CH_EINVAL;
    }
    if (!policy_ok(route, err, errlen))
        return CH_EINVAL;
    ch_rnode_t *n = &router->root;
    const char *names[CH_MAX_PARAMS];
    size_t nnames = 0;
    const char *p = path + 1;
    while (*p != '\0' || p == path + 1) {
        const char *end = strchr(p, '/');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == 0 && !(end == NULL && p == path + 1)) {
            set_err(err, errlen, "route %s %s: empty path segment", route->method, path);
            return CH_EINVAL;
        }
        if (len == 0)
            break; /* the root path "/" */
        if (p[0] == '{') {
            if (len < 3 || p[len - 1] != '}' || memchr(p + 1, '{', len - 2) || memchr(p + 1, '}', len - 2)) {
                set_err(err, errlen, "route %s %s: a parameter segment must be exactly {name}", route->method, path);
                return CH_EINVAL;
            }
            if (nnames == CH_MAX_PARAMS) {
                set_err(err, errlen, "route %s %s: more than %d parameters", route->method, path, CH_MAX_PARAMS);
                return CH_EINVAL;
            }
            char *name = strndup(p + 1, len - 2);
            if (name == NULL)
                abort();
            names[nnames++] = name; /* lives as long as the process: routes are never removed */
            if (n->param == NULL)
                n->param = node_new(NULL, 0);
            n = n->param;
        } else {
            if (memchr(p, '{', len) || memchr(p, '}', len)) {
                set_err(err, errlen, "route %s %s: braces are allowed only around a whole segment", route->method, path);
                return CH_EINVAL;
            }
            ch_rnode_t *c = literal_child(n, p, len);
            if (c == NULL) {
                c = node_new(p, len);
                n->children = realloc(n->children, (n->nchildren + 1) * sizeof(*n->children));
                if (n->children == NULL)
                    abort();
                n->children[n->nchildren++] = c;
            }
            n = c;
        }
        if (end == NULL)
            break;
        p = end + 1;
        if (*p == '\0') {
            set_err(err, errlen, "route %s %s: trailing slash", route->method, path);
            return CH_EINVAL;
        }
    }
    for (size_t i = 0; i < n->nmethods; ++i) {
        if (strcmp(n->methods[i].route->method, route->method) == 0) {
            set_err(err, errlen, "duplicate route: %s %s conflicts with %s %s", route->method, path,
                    n->methods[i].route->method, n->methods[i].route->path);
            return CH_EINVAL;
        }
    }
    if (n->nmethods == MAX_METHODS) {
        set_err(err, errlen, "route %s %s: too many methods on one path", route->method, path);
        return CH_EINVAL;
    }
    n->methods[n->nmethods].route = route;
    n->methods[n->nmethods].index = router->nroutes;
    memcpy(n->methods[n->nmethods].names, names, nnames * sizeof(names[0]));
    n->methods[n->nmethods].nnames = nnames;
    ++n->nmethods;
    router->routes = realloc(router->routes, (router->nroutes + 1) * sizeof(*router->routes));
    if (router->routes == NULL)
        abort();
    router->routes[router->nroutes++] = route;
    return 0;
}

static int has_method(const ch_rnode_t *n, const char *method, size_t len)
{
    for (size_t i = 0; i < n->nmethods; ++i) {
        const char *m = n->methods[i].route->method;
        if (strlen(m) == len && memcmp(m, method, len) == 0)
            return 1;
        /* HEAD is answered by the GET route, as HTTP requires. */
        if (len == 4 && memcmp(method, "HEAD", 4) == 0 && strcmp(m, "GET") == 0)
            return 1;
    }
    return 0;
}

/*
 * Depth-first: a literal segment wins over a parameter; backtrack when the literal branch dead-ends or
 * lacks the method. `*path_only` receives the first node whose path matched whatever its methods (for 405).
 */
static const ch_rnode_t *match_node(const ch_rnode_t *n, const char *method, size_t method_len, const char *p,
                                    const char *end, h2o_iovec_t *values, size_t *nvalues, const ch_rnode_t **path_only)
{
    if (p == end) {
        if (n->nmethods == 0)
            return NULL;
        if (has_method(n, method, method_len))
            return n;
        if (*path_only == NULL)
            *path_only = n;
        return NULL;
    }
    const char *slash = memchr(p, '/', end - p);
    const char *seg_end = slash ? slash : end;
    size_t len = seg_end - p;
    if (len == 0)
        return NULL;
    const char *next = slash ? slash + 1 : end;
    if (slash != NULL && next == end)
        return NULL; /* trailing slash */
    const ch_rnode_t *c = literal_child(n, p, len), *found;
    if (c != NULL && (found = match_node(c, method, method_len, next, end, values, nvalues, path_only)) != NULL)
        return found;
    if (n->param != NULL && *nvalues < CH_MAX_PARAMS) {
        values[(*nvalues)++] = h2o_iovec_init(p, len);
        if ((found = match_node(n->param, method, method_len, next, end, values, nvalues, path_only)) != NULL)
            return found;
        --*nvalues;
    }
    return NULL;
}

int ch_router_match(const ch_router_t *router, const char *method, size_t method_len, const char *path, size_t path_len,
                    ch_match_t *match, char *allow, size_t allow_len)
{
    if (path_len == 0 || path[0] != '/')
        return CH_MATCH_NO_PATH;
    h2o_iovec_t values[CH_MAX_PARAMS];
    size_t nvalues = 0;
    const ch_rnode_t *path_only = NULL;
    const ch_rnode_t *n =
        match_node(&router->root, method, method_len, path + 1, path + path_len, values, &nvalues, &path_only);
    if (n != NULL) {
        for (size_t i = 0; i < n->nmethods; ++i) {
            const ch_route_t *r = n->methods[i].route;
            if ((strlen(r->method) == method_len && memcmp(r->method, method, method_len) == 0) ||
                (method_len == 4 && memcmp(method, "HEAD", 4) == 0 && strcmp(r->method, "GET") == 0)) {
                match->route = r;
                match->route_index = n->methods[i].index;
                match->nparams = n->methods[i].nnames;
                for (size_t j = 0; j < match->nparams; ++j) {
                    match->param_names[j] = n->methods[i].names[j];
                    match->param_values[j] = values[j];
                }
                return CH_MATCH_FOUND;
            }
        }
    }
    if (path_only == NULL)
        return CH_MATCH_NO_PATH;
    if (allow != NULL && allow_len != 0) {
        size_t off = 0;
        allow[0] = '\0';
        for (size_t i = 0; i < path_only->nmethods && off < allow_len; ++i)
            off += snprintf(allow + off, allow_len - off, "%s%s", i ? ", " : "", path_only->methods[i].route->method);
    }
    return CH_MATCH_NO_METHOD;
}

unsigned ch_router_count(const ch_router_t *router)
{
    return router->nroutes;
}

const ch_route_t *ch_router_route(const ch_router_t *router, unsigned index)
{
    return index < router->nroutes ? router->routes[index] : NULL;
}
