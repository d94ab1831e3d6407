/* The health-code module's route table: every health-code route of the product is in this one table. */
#include <string.h>
#include "healthcode.h"

#define D(name) &cityhall__healthcode__v1__##name##__descriptor
#define STAFF (CH_ROLE_STAFF | CH_ROLE_ADMIN)

static const ch_route_t routes[] = {
    /* the citizen's code: shown at every door, the hottest path of the platform */
    {"GET", "/v1/health/code", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(health_code), hc_code, 0},
    {"GET", "/v1/health/code.png", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, NULL, hc_code_png, CH_ROUTE_RAW},
    {"GET", "/v1/health/code.svg", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, NULL, hc_code_svg, CH_ROUTE_RAW},
    {"GET", "/v1/me/dependents/{id}/health-code", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, NULL, D(health_code),
     hc_dependent_code, 0},
    {"GET", "/v1/health/keys", CH_PUBLIC, CH_OWN_NONE, NULL, NULL, hc_keys, CH_ROUTE_RAW},
    {"POST", "/v1/health/verify", CH_PUBLIC, CH_OWN_NONE, D(verify_request), D(verify_response), hc_verify, 0},

    /* inputs, each recomputing the codes it touches at once */
    {"POST", "/v1/health/declarations", CH_ROLE_CITIZEN, CH_OWN_SELF, D(declaration_request), D(health_code),
     hc_declare, CH_ROUTE_IDEMPOTENT},
    {"POST", "/v1/health/test-results", CH_ROLE_DEPT, CH_OWN_DEPARTMENT, D(test_result_batch), D(batch_response),
     hc_test_results, CH_ROUTE_IDEMPOTENT, 8u << 20 /* 10 000 rows in JSON are about 1.1 MB */},
    {"POST", "/v1/health/risk-areas", CH_ROLE_DEPT, CH_OWN_DEPARTMENT, D(risk_area_batch), D(batch_response),
     hc_risk_areas, CH_ROUTE_IDEMPOTENT},
    {"POST", "/v1/health/quarantine-orders", CH_ROLE_DEPT, CH_OWN_DEPARTMENT, D(quarantine_request),
     D(quarantine_response), hc_quarantine, CH_ROUTE_IDEMPOTENT},
    {"POST", "/v1/health/confirmed-cases", CH_ROLE_DEPT, CH_OWN_DEPARTMENT, D(confirmed_case),
     D(confirmed_case_response), hc_confirmed_case, CH_ROUTE_IDEMPOTENT},
    {"GET", "/v1/health/notices", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(notice_list), hc_notices, 0},

    /* venues (场所码) and the scans at their doors */
    {"POST", "/v1/venues", STAFF, CH_OWN_NONE, D(create_venue_request), D(venue), hc_venue_create, CH_ROUTE_IDEMPOTENT},
    {"POST", "/v1/venues/{id}/checkins", CH_ROLE_CITIZEN, CH_OWN_NONE, D(checkin_request), D(checkin_response),
     hc_checkin, CH_ROUTE_IDEMPOTENT},

    /* appeals: a citizen asks, one staff member proposes, a second one decides (four-eyes) */
    {"POST", "/v1/health/appeals", CH_ROLE_CITIZEN, CH_OWN_SELF, D(appeal_request), D(appeal), hc_appeal_create,
     CH_ROUTE_IDEMPOTENT},
    {"GET", "/v1/health/appeals", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(appeal_list), hc_appeals_mine, 0},
    {"GET", "/v1/health/appeals/{id}", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, NULL, D(appeal), hc_appeal_get, 0},
    {"GET", "/v1/staff/health/appeals", STAFF, CH_OWN_DEPARTMENT, NULL, D(appeal_list), hc_appeals_queue, 0},
    {"POST", "/v1/staff/health/appeals/{id}/proposal", STAFF, CH_OWN_DEPARTMENT, D(appeal_proposal), D(appeal),
     hc_appeal_propose, 0},
    {"POST", "/v1/staff/health/appeals/{id}/approval", STAFF, CH_OWN_DEPARTMENT, D(appeal_approval), D(appeal),
     hc_appeal_approve, 0},

    /* paper codes for people without phones: long-lived, revocable */
    {"POST", "/v1/staff/health/paper-codes", STAFF, CH_OWN_DEPARTMENT, D(paper_code_request), D(paper_code), hc_paper_code,
     CH_ROUTE_IDEMPOTENT},
    {"POST", "/v1/staff/health/paper-codes/{id}/revocation", STAFF, CH_OWN_DEPARTMENT, NULL, NULL, hc_paper_code_revoke, 0},
};

static const ch_command_t commands[] = {
    {"rules load", "FILE.json: install a new health-code rule set (a new version; codes recompute as inputs change)",
     hc_cmd_rules_load},
    {NULL, NULL, NULL},
};

static const ch_pg_stmt_t *stmts[128];

static int healthcode_init(const ch_config_t *config)
{
    const ch_pg_stmt_t *const *const lists[] = {hc_inputs_stmts, hc_display_stmts, hc_venues_stmts, hc_appeals_stmts};
    if (ch_stmts_concat(stmts, sizeof(stmts) / sizeof(stmts[0]), lists, sizeof(lists) / sizeof(lists[0])) != 0)
        return -1;
    if (hc_init_inputs(config) != 0 || hc_init_display(config) != 0 || hc_init_venues(config) != 0)
        return -1;
    return 0;
}

/* The department code the health authority's clients hold (`cityhall client add --dept health`). */
#define AUTHORITY_DEPT "health"

int hc_health_dept(ch_call_t *call)
{
    const char *dept = ch_call_principal(call)->dept;
    return dept != NULL && strcmp(dept, AUTHORITY_DEPT) == 0;
}

int hc_authority_or_respond(ch_call_t *call)
{
    if (hc_health_dept(call))
        return 0;
    ch_fail(call, CH_CODE_PERMISSION_DENIED, "only the health authority sends health inputs");
    return -1;
}

const char *hc_color_name(int color)
{
    static const char *const names[] = {"green", "yellow", "red"};
    return color >= 0 && color <= 2 ? names[color] : "unknown";
}

const ch_module_t healthcode_module = {
    "healthcode", routes, sizeof(routes) / sizeof(routes[0]), stmts, commands, healthcode_init, hc_seed,
};
