/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "onething.h"

void ot_bundles(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_form(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_submit(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_applications(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_application(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_supplement(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_withdraw(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_rate(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void ot_notifications(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

const ch_pg_stmt_t *const ot_applications_stmts[] = {NULL};

int ot_seed(const ch_config_t *config, int argc, char **argv)
{
    return 0;
}

int ot_cmd_catalog_load(const ch_config_t *config, int argc, char **argv)
{
    return 0;
}

int ot_init_applications(const ch_config_t *config)
{
    return 0;
}
