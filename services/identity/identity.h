/* The identity module's internal interface: handlers of the route table and what its files share. */
#ifndef IDENTITY_H
#define IDENTITY_H

#include "cityhall/module.h"
#include "cityhall/auth.h"
#include "identity/v1/identity.pb-c.h"

typedef Cityhall__Identity__V1__TokenResponse TokenResponse;

/* ---- login.c: SMS codes, citizen login, refresh, logout, sessions ---- */
void identity_sms_code(ch_call_t *call);
void identity_login(ch_call_t *call);
void identity_refresh(ch_call_t *call);
void identity_logout(ch_call_t *call);
void identity_sessions_list(ch_call_t *call);
void identity_session_delete(ch_call_t *call);

/**
 * Session plumbing shared with staff and kiosk logins (login.c). A new session is written with
 * identity_stmt_session_insert: $1 session_id (uuid), $2 role name, $3 subject, $4 absolute expiry
 * (Unix seconds), $5 client, $6 device or NULL, $7 actor or NULL, $8 dept or NULL, $9 hall or NULL;
 * its first refresh token with identity_stmt_refresh_insert: $1 token hash (hex SHA-256 of the token),
 * $2 session_id. Both go in the caller's login transaction.
 */
extern const ch_pg_stmt_t identity_stmt_session_insert;
extern const ch_pg_stmt_t identity_stmt_refresh_insert;
/** A random UUIDv4 as text (37 bytes). */
void identity_uuid(char *out);
/** A random opaque secret (refresh tokens, client secrets): 32 bytes base64url (44 bytes with NUL). */
void identity_secret(char *out);
/** Hex SHA-256 of a secret (65 bytes), as stored in PostgreSQL. */
void identity_secret_hash(const char *secret, char *out);
/**
 * Fills a TokenResponse for principal `p` after its session committed: signs the access token
 * (ch_auth_issue) and copies `refresh_token` (NULL: not refreshable). Returns 0 or CH_EINVAL.
 */
int identity_token_response(ch_call_t *call, const ch_principal_t *p, const char *refresh_token, TokenResponse *out);

/**
 * Answers 200 with the TokenResponse of `p` (identity_token_response), real_name_verified set as given;
 * 500 if the token cannot be signed.
 */
void identity_reply_tokens(ch_call_t *call, const ch_principal_t *p, const char *refresh_token, int real_name_verified);

/* ---- realname.c: the registry, real-name binding, /v1/me, dependents, the access log ---- */
void identity_me(ch_call_t *call);
void identity_real_name(ch_call_t *call);
void identity_dependent_add(ch_call_t *call);
void identity_dependents_list(ch_call_t *call);
void identity_access_log(ch_call_t *call);

/* ---- staff.c: counter staff, delegations, department clients ---- */
void identity_staff_login(ch_call_t *call);
void identity_delegation_open(ch_call_t *call);
void identity_client_token(ch_call_t *call);

/* ---- staff.c, shared with kiosk.c: the citizen present at a counter or kiosk, identifier checks ---- */
/** $1 id hash (hex), $2 name: the registry resident's bound citizen account, if any. */
extern const ch_pg_stmt_t identity_stmt_present_citizen;
void identity_present_citizen_query(ch_call_t *call, const char *id_number, const char *name, ch_pg_query_t *q);
/** The citizen id from a result of identity_stmt_present_citizen, or NULL after answering 422. */
const char *identity_present_citizen_or_respond(ch_call_t *call, PGresult *res);
int identity_ident_ok(const char *s, size_t max, int upper_ok, int dot_ok);
/** Upper-cases a final x and checks GB 11643; 0 or CH_EINVAL with `why`. */
int identity_id_normalize(const char *in, char out[19], const char **why);
char *identity_name_trim(ch_call_t *call, const char *in);

/* ---- kiosk.c ---- */
void identity_kiosk_session(ch_call_t *call);

/* ---- statements and commands of each file (NULL-terminated lists, gathered in identity.c) ---- */
extern const ch_pg_stmt_t *const identity_login_stmts[];
extern const ch_pg_stmt_t *const identity_realname_stmts[];
extern const ch_pg_stmt_t *const identity_staff_stmts[];
extern const ch_pg_stmt_t *const identity_kiosk_stmts[];

int identity_cmd_seed(const ch_config_t *config, int argc, char **argv);          /* seed.c */
int identity_cmd_import_registry(const ch_config_t *config, int argc, char **argv); /* seed.c */
int identity_cmd_audit_verify(const ch_config_t *config, int argc, char **argv);    /* realname.c */
int identity_cmd_staff_add(const ch_config_t *config, int argc, char **argv);       /* staff.c */
int identity_cmd_client_add(const ch_config_t *config, int argc, char **argv);      /* staff.c */
int identity_cmd_kiosk_add(const ch_config_t *config, int argc, char **argv);       /* kiosk.c */
/** Demo staff, kiosk and department client for `cityhall seed`, printed for a newcomer (staff.c, kiosk.c). */
int identity_seed_staff(const ch_config_t *config, void *pgconn);
int identity_seed_kiosk(const ch_config_t *config, void *pgconn);

#endif
