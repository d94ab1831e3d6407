/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "healthcode.h"

void hc_declare(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_test_results(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_risk_areas(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_quarantine(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_notices(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

const ch_pg_stmt_t *const hc_inputs_stmts[] = {NULL};

int hc_cmd_rules_load(const ch_config_t *config, int argc, char **argv)
{
    return 0;
}

int hc_init_inputs(const ch_config_t *config)
{
    return 0;
}
