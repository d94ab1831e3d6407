/* The health-code module's internal interface: route handlers and what its files share. */
#ifndef HEALTHCODE_H
#define HEALTHCODE_H

#include <stdint.h>
#include "cityhall/jws.h"
#include "cityhall/module.h"
#include "healthcode/v1/healthcode.pb-c.h"

typedef Cityhall__Healthcode__V1__HealthCode HealthCode;
typedef Cityhall__Healthcode__V1__Reason Reason;

enum { HC_GREEN = 0, HC_YELLOW = 1, HC_RED = 2 };
const char *hc_color_name(int color);

/* ---- rules.c: the rule engine (pure C, no I/O; tested against a fixed clock) ---- */
/* (its types and entry points are declared in rules.h, owned by the rules engineer) */

/* ---- recompute.c: one resident's code from its inputs (rules engineer) ---- */

/** A resident's current code as stored in health_codes (strings owned by the call). */
typedef struct hc_state {
    int64_t resident_id;
    const char *code_id;      /* pseudonymous uuid: the token's sub */
    int color;                /* HC_* */
    const char *reasons_json; /* JSON array of {code, data_source, as_of, rule_version, detail} */
    int rule_version;
    int64_t as_of;            /* Unix seconds */
    int64_t version;          /* increases with every change: cache entries compare it */
} hc_state_t;

typedef void (*hc_state_cb)(ch_call_t *call, int err, const hc_state_t *state);

/**
 * Recomputes `resident_id`'s code now (inputs from PostgreSQL, rules in C), writes it if it changed,
 * invalidates every cache of it (Redis DEL + PUBLISH on "ch:hc"), then calls `cb` with the new state.
 * Returns CH_E* (cb never called) when it cannot start.
 */
int hc_recompute(ch_call_t *call, int64_t resident_id, hc_state_cb cb);

/** Queues a recompute in the caller's transaction, for events touching many residents: $1 resident_id. */
extern const ch_pg_stmt_t hc_stmt_enqueue_recompute;

/* ---- display.c: the code as shown and signed; caches (display engineer) ---- */

typedef void (*hc_code_cb)(ch_call_t *call, int err, HealthCode *code);

/**
 * The resident's current code as a HealthCode message with a fresh-enough signed token (from the
 * thread's cache, Redis, or PostgreSQL, in that order). cb gets err CH_EUNAVAIL when it cannot be had
 * without risking a wrong color. Returns CH_E* (cb never called) when it cannot start.
 * On a cache hit cb runs before hc_code_get returns; whenever cb runs, ch_call_data is the caller's again. The
 * message is a copy in call memory.
 */
int hc_code_get(ch_call_t *call, int64_t resident_id, hc_code_cb cb);

/** Drops `resident_id` from this process's caches at once (all threads); recompute calls it. */
void hc_cache_invalidate(int64_t resident_id);

/**
 * The pseudonymous code id (the token's sub) of a resident who has no stored code yet: a keyed hash of the resident
 * id, shaped as a UUID. The first stored code takes the same id, so that a resident's sub does not change.
 */
void hc_code_id_derive(int64_t resident_id, char out[37]);

typedef void (*hc_subject_cb)(ch_call_t *call, int64_t resident_id);
/**
 * The registry resident a citizen call is about: the caller's own (422 when the account is not real-name
 * bound) or, with `dependent_id` set (not ""), a registered dependent of the caller (404 otherwise). Calls
 * `cb` only on success; on refusal or failure it has answered the client itself. Returns CH_E* (nothing
 * answered, cb never called) when it cannot start. With the binding cached, cb runs before hc_subject_resolve
 * returns; whenever cb runs, ch_call_data is the caller's again.
 */
int hc_subject_resolve(ch_call_t *call, const char *dependent_id, hc_subject_cb cb);

/**
 * Inputs that change other people's codes (test results, risk areas, quarantine orders, confirmed cases) come from
 * the health authority only: a client of another department answers 403. Returns 0 to go on, -1 after answering.
 */
int hc_authority_or_respond(ch_call_t *call);

/**
 * The caller belongs to the health department (its staff or its clients). Appeals are decided and paper codes
 * issued by health staff only: another department's staff see an empty queue and get the 404 of an unknown appeal
 * or paper code (the route policy "department"), or 403 where nothing is named (issuing a paper code).
 */
int hc_health_dept(ch_call_t *call);

/** What a verified QR or paper token says (display.c). */
typedef struct hc_token {
    int64_t exp; /* Unix seconds */
    int color;   /* HC_* */
    int paper;   /* a paper code: `paper_id` holds its id */
    uint8_t paper_id[16];
    char masked[64];
} hc_token_t;

/**
 * The checks of POST /v1/health/verify on one token, without its cache: an ES256 JWS of `ring` with typ hc+jwt,
 * iss "cityhall", exp (and nbf, iat when present) within VERIFY_LEEWAY_S of `now`, a string sub, col a color, nm
 * a string shorter than `masked`, and paper absent or a UUID. Returns NULL and fills `out`, or the refusal the
 * scanner is told: "malformed", "bad_signature" or "expired".
 */
const char *hc_token_verify(const ch_keyring_t *ring, const char *token, size_t len, int64_t now, hc_token_t *out);

/* ---- handlers, by file ---- */

/* inputs.c (rules engineer) */
void hc_declare(ch_call_t *call);
void hc_test_results(ch_call_t *call);
void hc_risk_areas(ch_call_t *call);
void hc_quarantine(ch_call_t *call);
void hc_notices(ch_call_t *call);

/* display.c (display engineer) */
void hc_code(ch_call_t *call);
void hc_code_png(ch_call_t *call);
void hc_code_svg(ch_call_t *call);
void hc_dependent_code(ch_call_t *call);
void hc_keys(ch_call_t *call);
void hc_verify(ch_call_t *call);
void hc_paper_code(ch_call_t *call);
void hc_paper_code_revoke(ch_call_t *call);

/* venues.c and appeals.c (venues engineer) */
void hc_venue_create(ch_call_t *call);
void hc_checkin(ch_call_t *call);
void hc_confirmed_case(ch_call_t *call);
void hc_appeal_create(ch_call_t *call);
void hc_appeals_mine(ch_call_t *call);
void hc_appeals_queue(ch_call_t *call);
void hc_appeal_propose(ch_call_t *call);
void hc_appeal_approve(ch_call_t *call);
void hc_appeal_get(ch_call_t *call); /* GET /v1/health/appeals/{id}: one of the citizen's appeals */

/* statements and commands of each file (NULL-terminated lists) */
extern const ch_pg_stmt_t *const hc_inputs_stmts[];
extern const ch_pg_stmt_t *const hc_display_stmts[];
extern const ch_pg_stmt_t *const hc_venues_stmts[];
extern const ch_pg_stmt_t *const hc_appeals_stmts[];
int hc_cmd_rules_load(const ch_config_t *config, int argc, char **argv); /* inputs.c: cityhall rules load FILE */
/** Module start-up (before threads): load the signing ring, rule set, start background workers. */
int hc_init_inputs(const ch_config_t *config);  /* inputs.c / recompute.c */
int hc_init_display(const ch_config_t *config); /* display.c */
int hc_init_venues(const ch_config_t *config);  /* venues.c */
/** Demo data for `cityhall seed` (venues, a few codes of each color), printed for a newcomer. */
int hc_seed(const ch_config_t *config, int argc, char **argv); /* venues.c */

#endif
