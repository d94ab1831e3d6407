/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "onething.h"

void ot_callback(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_tasks(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_decide(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_licences(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

const ch_pg_stmt_t *const ot_dispatch_stmts[] = {NULL};

int ot_cmd_dept_endpoint(const ch_config_t *config, int argc, char **argv)
{
    return 0;
}

int ot_cmd_sweep(const ch_config_t *config, int argc, char **argv)
{
    return 0;
}

int ot_init_dispatch(const ch_config_t *config)
{
    return 0;
}
