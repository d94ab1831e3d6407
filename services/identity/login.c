/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "identity.h"

void identity_sms_code(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_login(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_refresh(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_logout(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_sessions_list(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

void identity_session_delete(ch_call_t *call)
{
    ch_fail(call, CH_CODE_INTERNAL, "not built yet");
}

const ch_pg_stmt_t *const identity_login_stmts[] = {NULL};

const ch_pg_stmt_t identity_stmt_session_insert = {"x1", "SELECT 1", 0};
const ch_pg_stmt_t identity_stmt_refresh_insert = {"x2", "SELECT 1", 0};
void identity_uuid(char *out) { out[0] = 0; }
void identity_secret(char *out) { out[0] = 0; }
void identity_secret_hash(const char *secret, char *out) { out[0] = 0; }
int identity_token_response(ch_call_t *call, const ch_principal_t *p, const char *refresh_token, TokenResponse *out) { return -1; }
