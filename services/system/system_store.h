/* SQL and Redis of the system module. */
#ifndef SYSTEM_STORE_H
#define SYSTEM_STORE_H

#include "cityhall/module.h"

extern const ch_pg_stmt_t *const system_stmts[];

/** SELECT the database clock as epoch seconds with microseconds (text). */
extern const ch_pg_stmt_t system_stmt_now;
/** INSERT a probe: $1 id, $2 note, $3 created_at (epoch seconds), $4 thread. */
extern const ch_pg_stmt_t system_stmt_probe_insert;

#endif
