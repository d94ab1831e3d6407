/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "healthcode.h"

void hc_venue_create(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_checkin(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_confirmed_case(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_appeal_create(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_appeals_mine(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_appeals_queue(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_appeal_propose(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void hc_appeal_approve(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

const ch_pg_stmt_t *const hc_venues_stmts[] = {NULL};

int hc_seed(const ch_config_t *config, int argc, char **argv)
{
    return 0;
}

int hc_init_venues(const ch_config_t *config)
{
    return 0;
}
