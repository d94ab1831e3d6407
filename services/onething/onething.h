/* The one-thing module's internal interface: route handlers and what its files share. */
#ifndef ONETHING_H
#define ONETHING_H

#include "cityhall/module.h"
#include "onething/v1/onething.pb-c.h"

/* ---- applications.c: catalog, form and prefill, submission, the citizen's views (applications engineer) ---- */
void ot_bundles(ch_call_t *call);
void ot_form(ch_call_t *call);
void ot_submit(ch_call_t *call);
void ot_applications(ch_call_t *call);
void ot_application(ch_call_t *call);
void ot_supplement(ch_call_t *call);
void ot_withdraw(ch_call_t *call);
void ot_rate(ch_call_t *call);
void ot_notifications(ch_call_t *call);

/* ---- dispatch.c and tasks.c: outbox delivery, department callbacks, staff queues, deadlines, licences
 * (dispatch engineer) ---- */
void ot_callback(ch_call_t *call);
void ot_tasks(ch_call_t *call);
void ot_decide(ch_call_t *call);
void ot_licences(ch_call_t *call);

/* statements, commands, start-up and seed of each file */
extern const ch_pg_stmt_t *const ot_applications_stmts[];
extern const ch_pg_stmt_t *const ot_dispatch_stmts[];
int ot_init_applications(const ch_config_t *config);
/** Starts the outbox workers and the deadline sweeper (their own threads and loops). */
int ot_init_dispatch(const ch_config_t *config);
/**
 * Wakes this process's outbox workers at once: call it after a commit that created outbox rows (a submission, a
 * supplement's resubmission). Cheap and safe from any thread; without it the workers find the rows within their
 * poll interval (100 ms). (dispatch.c)
 */
void ot_dispatch_wake(void);
/** Demo catalog data sets (birth records, marriages, social insurance, businesses) and departments. */
int ot_seed(const ch_config_t *config, int argc, char **argv);
int ot_cmd_catalog_load(const ch_config_t *config, int argc, char **argv);   /* catalog.c */
int ot_cmd_import_dataset(const ch_config_t *config, int argc, char **argv); /* datasets.c */
int ot_cmd_dept_endpoint(const ch_config_t *config, int argc, char **argv);  /* dispatch.c */
int ot_cmd_sweep(const ch_config_t *config, int argc, char **argv);          /* dispatch.c */

#endif
