/* What several fuzz targets share: a test keyring of their own and an ES256 check independent of gateway/jws.c. */
#ifndef CITYHALL_FUZZ_UTIL_H
#define CITYHALL_FUZZ_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "cityhall/jws.h"

/** Prints `what` and the bytes concerned, then aborts: libFuzzer records the input as a crash. */
void fz_fail(const char *what, const void *data, size_t len) __attribute__((noreturn));

/** The kid of the test key. */
#define FZ_KID "fuzz"

/**
 * Creates a fresh temporary folder holding `sub` (e.g. "keys/access") with one new P-256 key FZ_KID in it, returns
 * the folder's path (static storage) and loads the key folder into `*ring`. The private key never leaves the
 * fuzzer.
 */
const char *fz_keyring_make(const char *sub, ch_keyring_t **ring);
/** rm -r: the key folder goes once the gateway code under test has loaded what it needs. */
void fz_tree_remove(const char *root);

/**
 * The oracle of the token targets, written without gateway/jws.c: `token` is three base64url parts, its header is
 * exactly {"alg":"ES256","typ":typ,"kid":<a kid of ring>} and its signature is a valid ECDSA P-256/SHA-256
 * signature by that key. Returns the claims (caller json_decref's) or NULL.
 */
json_t *fz_es256_check(const ch_keyring_t *ring, const char *typ, const char *token, size_t len);

/** Signs `header`.`claims` with the test key (fz_keyring_make) as any ES256 signer would (raw r||s). */
void fz_es256_sign(const char *header, size_t hlen, const char *claims, size_t clen, ch_buf_t *out);

/** Input bytes consumed front to back: the structure-aware targets split their input with it. */
typedef struct fz_input {
    const uint8_t *p;
    size_t n;
} fz_input_t;

unsigned fz_byte(fz_input_t *in);
/** One edit of `b` by `op` (mod 3: overwrite, insert, delete) at `pos` (mod the length); keeps a NUL at the end. */
void fz_edit(ch_buf_t *b, unsigned op, unsigned pos, unsigned byte);
/** Applies the input's edits (4 bytes each) to a copy of `genuine`: `verify` must accept it exactly when unchanged. */
void fz_check_edits(fz_input_t *in, const ch_buf_t *genuine, int (*verify)(const char *token, size_t len));
/** Up to the next `sep` byte (dropped) or the end. */
void fz_part(fz_input_t *in, uint8_t sep, const uint8_t **part, size_t *len);

#endif
