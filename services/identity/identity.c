/* The identity module's route table: every identity route of the product is in this one table. */
#include "identity.h"

#define D(name) &cityhall__identity__v1__##name##__descriptor
#define ANY_ROLE (CH_ROLE_CITIZEN | CH_ROLE_STAFF | CH_ROLE_KIOSK | CH_ROLE_DEPT | CH_ROLE_ADMIN)

static const ch_route_t routes[] = {
    /* citizens: login by SMS code, tokens, sessions */
    {"POST", "/v1/auth/sms-code", CH_PUBLIC, CH_OWN_NONE, D(send_sms_code_request), D(send_sms_code_response),
     identity_sms_code, 0},
    {"POST", "/v1/auth/login", CH_PUBLIC, CH_OWN_NONE, D(login_request), D(token_response), identity_login, 0},
    {"POST", "/v1/auth/refresh", CH_PUBLIC, CH_OWN_NONE, D(refresh_request), D(token_response), identity_refresh, 0},
    {"POST", "/v1/auth/logout", ANY_ROLE, CH_OWN_SELF, NULL, NULL, identity_logout, 0},
    {"GET", "/v1/me/sessions", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(session_list), identity_sessions_list, 0},
    {"DELETE", "/v1/me/sessions/{id}", CH_ROLE_CITIZEN, CH_OWN_CITIZEN, NULL, NULL, identity_session_delete, 0},

    /* the citizen's account, real name, dependents, who read my data */
    {"GET", "/v1/me", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(me), identity_me, 0},
    {"POST", "/v1/me/real-name", CH_ROLE_CITIZEN, CH_OWN_SELF, D(real_name_request), D(real_name_response),
     identity_real_name, 0},
    {"POST", "/v1/me/dependents", CH_ROLE_CITIZEN, CH_OWN_SELF, D(add_dependent_request), D(dependent),
     identity_dependent_add, CH_ROUTE_IDEMPOTENT},
    {"GET", "/v1/me/dependents", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(dependent_list), identity_dependents_list, 0},
    {"GET", "/v1/me/access-log", CH_ROLE_CITIZEN, CH_OWN_SELF, NULL, D(access_log_page), identity_access_log, 0},

    /* counter staff, acting for a present citizen, department clients */
    {"POST", "/v1/staff/login", CH_PUBLIC, CH_OWN_NONE, D(staff_login_request), D(token_response), identity_staff_login,
     0},
    {"POST", "/v1/staff/delegations", CH_ROLE_STAFF, CH_OWN_NONE, D(delegation_request), D(delegation_response),
     identity_delegation_open, 0},
    {"POST", "/v1/auth/client-token", CH_PUBLIC, CH_OWN_NONE, D(client_token_request), D(token_response),
     identity_client_token, 0},

    /* self-service kiosks: the device signs the ID-card read and face match */
    {"POST", "/v1/kiosk/sessions", CH_PUBLIC, CH_OWN_NONE, D(kiosk_session_request), D(token_response),
     identity_kiosk_session, 0},
};

static const ch_command_t commands[] = {
    {"import registry", "FILE.csv: load population-registry residents (id_number,name,sex,birth_date,region,address,"
                        "household_id,phone)", identity_cmd_import_registry},
    {"audit verify", "check the hash chain of the access log; exit 1 naming the first broken row",
     identity_cmd_audit_verify},
    {"staff add", "--username U --dept D --hall H [--roles staff,admin]: create a counter staff account "
                  "(prints the password and TOTP secret once)", identity_cmd_staff_add},
    {"client add", "--client-id C --dept D: register a department system or the health authority "
                   "(prints the secret once)", identity_cmd_client_add},
    {"kiosk add", "--device-id K --hall H --public-key FILE.pem: register a self-service kiosk",
     identity_cmd_kiosk_add},
    {NULL, NULL, NULL},
};

/* The statements of every identity file, prepared on each connection. */
static const ch_pg_stmt_t *stmts[128];

static int identity_init(const ch_config_t *config)
{
    const ch_pg_stmt_t *const *const lists[] = {identity_login_stmts, identity_realname_stmts, identity_staff_stmts,
                                          identity_kiosk_stmts};
    if (ch_stmts_concat(stmts, sizeof(stmts) / sizeof(stmts[0]), lists, sizeof(lists) / sizeof(lists[0])) != 0)
        return -1;
    return 0;
}

const ch_module_t identity_module = {
    "identity", routes, sizeof(routes) / sizeof(routes[0]), stmts, commands, identity_init, identity_cmd_seed,
};
