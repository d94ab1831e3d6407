/* PLACEHOLDER until the access-log work lands. */
#include "cityhall/audit.h"

const ch_pg_stmt_t ch_audit_stmt_append = {"ch_audit_append", "SELECT 1", 0};

void ch_audit_query(ch_call_t *call, const char *citizen_id, const char *action, const char *purpose, ch_pg_query_t *q)
{
    q->stmt = &ch_audit_stmt_append;
    q->values = NULL;
    q->lengths = NULL;
}
