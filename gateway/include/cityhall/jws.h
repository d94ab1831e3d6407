/* ES256 compact JWS with our own checks (never libjwt's alg handling), and keyrings of P-256 keys. */
#ifndef CITYHALL_JWS_H
#define CITYHALL_JWS_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "cityhall/transcode.h" /* ch_buf_t */

/**
 * An immutable set of P-256 signing keys loaded from one folder (`<kid>.pem`, PKCS#8 or SEC1 private
 * keys, mode 0600). The key with the greatest kid signs; every key verifies. Parsed EVP_PKEYs are kept,
 * so signing and verifying never parse PEM. Safe to use from every thread at once.
 */
typedef struct ch_keyring ch_keyring_t;

/** Loads every key in `dir`; refuses an empty folder, a key that is not P-256, or a group/world-readable file. */
ch_keyring_t *ch_keyring_load(const char *dir, char *err, size_t errlen);
void ch_keyring_free(ch_keyring_t *ring);
/** Creates `dir` (0700) if needed and a new key `<kid>.pem` (0600) whose kid sorts after every existing one. */
int ch_keyring_rotate(const char *dir, char *kid, size_t kidlen, char *err, size_t errlen);
const char *ch_keyring_current_kid(const ch_keyring_t *ring);
/** Appends {"keys":[{kty,crv,x,y,kid,use:"sig",alg:"ES256"}, ...]} with every public key. */
void ch_keyring_jwks(const ch_keyring_t *ring, ch_buf_t *out);

/**
 * Appends the compact JWS of `claims_json` (a JSON object, serialized by the caller) signed with the
 * current key: header {"alg":"ES256","typ":<typ>,"kid":<kid>}, signature as raw r||s (64 bytes), all
 * base64url without padding. Returns 0 or CH_EINVAL.
 */
int ch_jws_sign(const ch_keyring_t *ring, const char *typ, const char *claims_json, size_t len, ch_buf_t *out);

/**
 * Verifies a compact JWS and returns its claims (caller json_decref's). Refused (CH_EINVAL), whatever
 * the claims say: not three base64url parts; a header that is not exactly an object with alg "ES256",
 * typ equal to `typ`, and a kid present in the ring, and no other member (so no "jku", "jwk", "x5u", "x5c",
 * "crit"); a signature that
 * is not 64 bytes or does not verify. Expiry and audience are the caller's to check (ch_jwt_check).
 */
int ch_jws_verify(const ch_keyring_t *ring, const char *typ, const char *token, size_t len, json_t **claims);

/**
 * Checks registered claims: `iss` equals iss, `aud` equals (or, as an array, contains) aud when aud is
 * not NULL, `exp` is a number > now - leeway, `nbf` (if present) <= now + leeway, `iat` (if present)
 * <= now + leeway. Returns 0 or CH_EINVAL with a reason in `why`.
 */
int ch_jwt_check(json_t *claims, const char *iss, const char *aud, int64_t now, int64_t leeway, const char **why);

/** base64url without padding. */
void ch_b64url_encode(const uint8_t *in, size_t len, ch_buf_t *out);
/** Returns the decoded length, or -1 for characters outside the alphabet or padding. `out` needs len*3/4+3 bytes. */
long ch_b64url_decode(const char *in, size_t len, uint8_t *out);

#endif
