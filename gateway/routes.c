/* The `routes` command: every route of every module as JSON lines, for the authorization matrix and for people. */
#include <stdio.h>
#include <stdlib.h>
#include <jansson.h>
#include "gateway.h"
#include "cityhall/auth.h"

/*
 * One line per route, in table order: {"module","method","path","roles":[names],"public","policy","request",
 * "response","flags":[names],"max_body"}. It prints what the tables declare, undeclared policies included, so
 * that a test (tests/integration/test_authz_matrix.py) can refuse them; `serve` refuses them at start-up.
 */
static int cmd_routes(const ch_config_t *config, int argc, char **argv)
{
    (void)config;
    (void)argv;
    if (argc != 1) {
        fprintf(stderr, "usage: cityhall routes\n");
        return 2;
    }
    static const unsigned roles[] = {CH_ROLE_CITIZEN, CH_ROLE_STAFF, CH_ROLE_KIOSK, CH_ROLE_DEPT, CH_ROLE_ADMIN};
    for (size_t m = 0; m < ch_nmodules; ++m) {
        const ch_module_t *mod = ch_modules[m];
        for (size_t i = 0; i < mod->nroutes; ++i) {
            const ch_route_t *r = &mod->routes[i];
            json_t *names = json_array(), *flags = json_array();
            for (size_t k = 0; k < sizeof(roles) / sizeof(roles[0]); ++k)
                if (r->roles & roles[k])
                    json_array_append_new(names, json_string(ch_role_name(roles[k])));
            if (r->flags & CH_ROUTE_IDEMPOTENT)
                json_array_append_new(flags, json_string("idempotent"));
            if (r->flags & CH_ROUTE_RAW)
                json_array_append_new(flags, json_string("raw"));
            json_t *line = json_pack(
                "{s:s, s:s, s:s, s:o, s:b, s:s, s:s?, s:s?, s:o, s:I}", "module", mod->name, "method", r->method,
                "path", r->path, "roles", names, "public", r->roles == CH_PUBLIC, "policy", ch_own_name(r->own),
                "request", r->request != NULL ? r->request->name : NULL, "response",
                r->response != NULL ? r->response->name : NULL, "flags", flags, "max_body", (json_int_t)r->max_body);
            char *text = line != NULL ? json_dumps(line, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
            if (text == NULL)
                abort();
            puts(text);
            free(text);
            json_decref(line);
        }
    }
    return fflush(stdout) == 0 ? 0 : 1;
}

static const ch_command_t commands[] = {
    {"routes", "print every route as a JSON line: method, path, roles, ownership policy, messages, flags", cmd_routes},
    {NULL, NULL, NULL},
};

const ch_module_t ch_routes_module = {"routes", NULL, 0, NULL, commands};
