/* What recompute.c shares with inputs.c: the active rule set, the drainer's wake-up, the module's statements. */
#ifndef HC_RECOMPUTE_H
#define HC_RECOMPUTE_H

#include "healthcode.h"
#include "rules.h"

/** The active rule set, or NULL until one was loaded. Immutable; never freed while the process runs. Any thread. */
const hc_rules_t *hc_rules_active(void);

/**
 * Loads the active rule set once (blocking, with timeouts; a failure is logged and retried in the background) and
 * starts the background threads: rule-set reloads (LISTEN hc_rules, and a poll), the drain of hc_recompute_queue,
 * and the invalidations published again when Redis did not take them at once. Called once by `serve`.
 */
int hc_recompute_start(const ch_config_t *config);

/** Wakes this process's drainer: recomputes were queued (a bulk upload committed). Any thread; never blocks. */
void hc_recompute_kick(void);

/** The statements of recompute.c (listed in hc_inputs_stmts, which healthcode.c registers). */
extern const ch_pg_stmt_t hc_rc_stmt_state, hc_rc_stmt_events, hc_rc_stmt_tests, hc_rc_stmt_decls, hc_rc_stmt_areas,
    hc_rc_stmt_write;

/** gateway/log.c's JSON-line logger (not in the module contract yet); levels: 1 info, 2 warn, 3 error. */
void ch_log(int level, const char *event, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
enum { HC_LOG_INFO = 1, HC_LOG_WARN = 2, HC_LOG_ERROR = 3 };

#endif
