/* Access tokens: issuing them (identity) and verifying them (the gateway, on every non-public route). */
#ifndef CITYHALL_AUTH_H
#define CITYHALL_AUTH_H

#include <stdint.h>
#include "cityhall/module.h"
#include "cityhall/transcode.h"

#define CH_TOKEN_ISS "cityhall"
#define CH_TOKEN_AUD "cityhall-api"
#define CH_TOKEN_TYP_ACCESS "at+jwt"
#define CH_ACCESS_TTL_S 600 /* 10 minutes */
/**
 * The longest lifetime ch_auth_issue grants (a larger ttl_s is refused with CH_EINVAL). Revoked session ids are
 * held in memory this long (plus the leeway) after their revocation, since no token issued before the
 * revocation outlives it.
 */
#define CH_TOKEN_MAX_TTL_S 3600
/** Clock skew tolerated on exp, nbf and iat. */
#define CH_TOKEN_LEEWAY_S 30

/** "citizen", "staff", "kiosk", "dept", "admin" (NULL for anything else). */
const char *ch_role_name(unsigned role);
/** The CH_ROLE_* of a name, or 0. */
unsigned ch_role_parse(const char *name);

/**
 * Signs an access token for `p`: claims iss, aud, sub, sid, role, iat, exp, jti, and dept, hall, act,
 * kiosk when set. exp = now + ttl_s, but never after p->expires_at when that is set (a session's absolute
 * limit). Appends the token to `out`; `*exp` receives exp. Returns 0 or CH_EINVAL (no role or subject or
 * session id, ttl_s outside 1..CH_TOKEN_MAX_TTL_S, a session already past its expiry, no access keyring).
 * Usable on any thread; outside `serve` the keyring is loaded from <var_dir>/keys/access on first use.
 */
int ch_auth_issue(const ch_principal_t *p, int64_t ttl_s, ch_buf_t *out, int64_t *exp);

/**
 * Makes every token of session `sid` fail at once: in this process on every thread before returning,
 * and in other gateway processes through Redis (PUBLISH on the call's thread). The caller has already
 * committed the revocation to PostgreSQL (sessions.revoked_at), which is what survives restarts.
 */
void ch_auth_revoke(ch_call_t *call, const char *sid);

#endif
