/* The one-thing module's route table: every one-thing route of the product is in this one table. */
#include "onething.h"

#define D(name) &cityhall__onething__v1__##name##__descriptor
#define STAFF (CH_ROLE_STAFF | CH_ROLE_ADMIN)

static const ch_route_t routes[] = {
    /* the catalog and the one form, prefilled from what departments already hold */
    {"GET", "/v1/onething/bundles", CH_ROLE_CITIZEN | STAFF, CH_OWN_NONE, NULL, D(bundle_list), ot_bundles, 0},
    {"GET", "/v1/onething/bundles/{code}/form", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(form), ot_form, 0},

    /* one submission, many departments */
    {"POST", "/v1/onething/applications", CH_ROLE_CITIZEN, CH_OWN_SELF, D(submit_application_request), D(application),
     ot_submit, CH_ROUTE_IDEMPOTENT},
    {"GET", "/v1/onething/applications", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(application_list), ot_applications, 0},
    {"GET", "/v1/onething/applications/{id}", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, NULL, D(application), ot_application, 0},
    {"POST", "/v1/onething/applications/{id}/supplements", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, D(supplement_request),
     D(application), ot_supplement, CH_ROUTE_IDEMPOTENT},
    {"POST", "/v1/onething/applications/{id}/withdrawal", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, NULL, D(application),
     ot_withdraw, 0},
    {"POST", "/v1/onething/applications/{id}/rating", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, D(rate_request), D(application),
     ot_rate, 0},
    {"GET", "/v1/me/notifications", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(notification_list), ot_notifications, 0},
    {"GET", "/v1/me/licences", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(licence_list), ot_licences, 0},

    /* departments answer through signed callbacks, or their staff work cityhall's queue */
    {"POST", "/v1/departments/{dept}/callbacks", CH_PUBLIC, CH_OWN_NONE, D(department_callback), D(callback_ack),
     ot_callback, 0},
    {"GET", "/v1/staff/tasks", STAFF, CH_OWN_DEPARTMENT, NULL, D(task_list), ot_tasks, 0},
    {"POST", "/v1/staff/tasks/{id}/decision", STAFF, CH_OWN_DEPARTMENT, D(decision), D(task), ot_decide, 0},
};

static const ch_command_t commands[] = {
    {"catalog load", "FILE.json: install a new catalog version (items, bundles, forms); applications keep theirs",
     ot_cmd_catalog_load},
    {"import dataset", "NAME FILE.csv: load a department dataset (birth_records, marriages, social_insurance, "
                       "businesses) from CSV, all rows or none", ot_cmd_import_dataset},
    {"dept endpoint", "--dept D --url http://IP:PORT/path --secret S: deliver D's items to its own system "
                      "(no url: D works cityhall's staff queue)", ot_cmd_dept_endpoint},
    {"onething sweep", "mark items past their promised deadline and raise escalations now (the server does it "
                       "every minute)", ot_cmd_sweep},
    {NULL, NULL, NULL},
};

static const ch_pg_stmt_t *stmts[128];

static int onething_init(const ch_config_t *config)
{
    const ch_pg_stmt_t *const *const lists[] = {ot_applications_stmts, ot_dispatch_stmts};
    if (ch_stmts_concat(stmts, sizeof(stmts) / sizeof(stmts[0]), lists, sizeof(lists) / sizeof(lists[0])) != 0)
        return -1;
    if (ot_init_applications(config) != 0 || ot_init_dispatch(config) != 0)
        return -1;
    return 0;
}

const ch_module_t onething_module = {
    "onething", routes, sizeof(routes) / sizeof(routes[0]), stmts, commands, onething_init, ot_seed,
};
