/* The citizen-visible access log: every read of a citizen's data by staff, kiosk or department. */
#ifndef CITYHALL_AUDIT_H
#define CITYHALL_AUDIT_H

#include "cityhall/module.h"

/**
 * Fills `q` with a statement that appends one entry to `citizen_id`'s hash-chained access log, for the
 * caller to run in the same transaction as the read or write it records. The actor (role, account,
 * department, and the staff member behind a delegation) comes from the call's principal; `action` is a
 * short dotted name ("registry.read", "delegation.open"), `purpose` why (shown to the citizen).
 * Strings are copied into the call's memory.
 */
void ch_audit_query(ch_call_t *call, const char *citizen_id, const char *action, const char *purpose, ch_pg_query_t *q);

/**
 * The same with an explicit principal, for routes that establish one themselves (a kiosk session opened
 * on a public route is recorded as the kiosk acting for the citizen it has just authenticated).
 */
void ch_audit_query_as(ch_call_t *call, const ch_principal_t *principal, const char *citizen_id, const char *action,
                       const char *purpose, ch_pg_query_t *q);

/** The statement behind ch_audit_query (registered by the gateway on every connection). */
extern const ch_pg_stmt_t ch_audit_stmt_append;

#endif
