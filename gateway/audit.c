/* The citizen-visible access log: the statement that appends to a citizen's hash chain, in the caller's transaction. */
#include <string.h>
#include "cityhall/audit.h"
#include "cityhall/auth.h"

/*
 * access_log_append (sql/migrations/0003_identity_registry.sql) takes the citizen's advisory lock, reads the
 * previous hash after the lock is granted and inserts the entry with hash = sha256(prev_hash || canonical text),
 * all in SQL, so that two gateways appending for one citizen at once cannot fork the chain. It runs in the
 * transaction of the read it records: if that transaction rolls back, so does the entry.
 */
const ch_pg_stmt_t ch_audit_stmt_append = {"ch_audit_append",
                                           "SELECT access_log_append($1::uuid, $2, $3, $4, $5, $6, $7)", 7};

static const char *dup_or_null(ch_call_t *call, const char *s)
{
    return s != NULL && s[0] != '\0' ? ch_call_strdup(call, s) : NULL;
}

/*
 * Who the citizen sees in the log. A delegated citizen session (`act` claim) is the staff member named by
 * `act`, acting on behalf of the citizen; a citizen session bound to a kiosk is that kiosk, on behalf of the
 * citizen; any other principal (staff, kiosk device, department client, admin) is itself, with its
 * department.
 */
void ch_audit_query(ch_call_t *call, const char *citizen_id, const char *action, const char *purpose, ch_pg_query_t *q)
{
    ch_audit_query_as(call, ch_call_principal(call), citizen_id, action, purpose, q);
}

void ch_audit_query_as(ch_call_t *call, const ch_principal_t *p, const char *citizen_id, const char *action,
                       const char *purpose, ch_pg_query_t *q)
{
    const char *role, *actor, *dept = NULL, *behalf = NULL;
    if (p == NULL) {
        role = "system";
        actor = "cityhall";
    } else if (p->actor != NULL && p->actor[0] != '\0') {
        role = "staff";
        actor = p->actor;
        dept = p->dept;
        behalf = p->subject;
    } else if (p->role == CH_ROLE_CITIZEN && p->device != NULL && p->device[0] != '\0') {
        role = "kiosk";
        actor = p->device;
        behalf = p->subject;
    } else {
        role = ch_role_name(p->role);
        if (role == NULL)
            role = "unknown";
        actor = p->subject != NULL ? p->subject : "";
        dept = p->dept;
    }
    const char **v = ch_call_alloc(call, 7 * sizeof(*v));
    v[0] = ch_call_strdup(call, citizen_id);
    v[1] = ch_call_strdup(call, role);
    v[2] = ch_call_strdup(call, actor);
    v[3] = dup_or_null(call, dept);
    v[4] = dup_or_null(call, behalf);
    v[5] = ch_call_strdup(call, action);
    v[6] = ch_call_strdup(call, purpose != NULL ? purpose : "");
    q->stmt = &ch_audit_stmt_append;
    q->values = v;
    q->lengths = NULL;
}
