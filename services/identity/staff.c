/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "identity.h"

void identity_staff_login(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_delegation_open(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_client_token(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

const ch_pg_stmt_t *const identity_staff_stmts[] = {NULL};

int identity_cmd_staff_add(const ch_config_t *config, int argc, char **argv)
{
    return 1;
}

int identity_cmd_client_add(const ch_config_t *config, int argc, char **argv)
{
    return 1;
}

int identity_seed_staff(const ch_config_t *config, void *pgconn)
{
    return 0;
}
