/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "identity.h"

void identity_kiosk_session(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

const ch_pg_stmt_t *const identity_kiosk_stmts[] = {NULL};

int identity_cmd_kiosk_add(const ch_config_t *config, int argc, char **argv)
{
    return 1;
}

int identity_seed_kiosk(const ch_config_t *config, void *pgconn)
{
    return 0;
}
