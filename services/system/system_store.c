/* SQL of the system module: the database clock and the deployment probes. */
#include "system_store.h"

const ch_pg_stmt_t system_stmt_now = {"system_now", "SELECT extract(epoch FROM clock_timestamp())::numeric(20,6)::text",
                                      0};

const ch_pg_stmt_t system_stmt_probe_insert = {
    "system_probe_insert",
    "INSERT INTO system_probes (probe_id, note, created_at, thread) VALUES ($1::uuid, $2, to_timestamp($3::float8), $4::int)",
    4};

const ch_pg_stmt_t *const system_stmts[] = {&system_stmt_now, &system_stmt_probe_insert, NULL};
