/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "identity.h"

void identity_me(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_real_name(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_dependent_add(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_dependents_list(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_access_log(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

const ch_pg_stmt_t *const identity_realname_stmts[] = {NULL};

int identity_cmd_audit_verify(const ch_config_t *config, int argc, char **argv)
{
    return 1;
}
