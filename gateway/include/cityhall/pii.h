/* Personal data: national ID numbers (GB 11643) and phones — validation, masking, encryption, keyed hashes. */
#ifndef CITYHALL_PII_H
#define CITYHALL_PII_H

#include <stddef.h>
#include <stdint.h>
#include "cityhall/transcode.h" /* ch_buf_t */

/**
 * Validates an 18-character resident ID number (GB 11643-1999): 6-digit region code (first digit 1-8),
 * a real birth date YYYYMMDD not in the future and not before 1900, a 3-digit sequence, and the ISO 7064
 * MOD 11-2 check character (0-9 or X; a lower-case x is refused: callers upper-case first if they wish).
 * Returns 0, or CH_EINVAL with a short reason ("must be 18 characters", "invalid birth date",
 * "wrong check character", ...) in `why` — never echoing the number.
 */
int ch_id_number_check(const char *id, const char **why);
/** The check character of the first 17 digits. */
char ch_id_number_check_char(const char *first17);
/** 4401**********123X: the first 4 and last 4 characters. `out` has room for 19 bytes. */
void ch_id_number_mask(const char *id, char *out);
/** 138****5678 for an 11-digit mainland mobile number. `out` has room for 12 bytes. */
void ch_phone_mask(const char *phone, char *out);
/** A mainland mobile number: 11 digits starting with 1[3-9]. Returns 0 or CH_EINVAL. */
int ch_phone_check(const char *phone);
/** 张*, 欧阳** : the first character (UTF-8 aware), the rest starred. `out` has room for 64 bytes. */
void ch_name_mask(const char *name, char *out, size_t outlen);

/**
 * The data key file (outside the database): 64 random bytes — an AES-256-GCM key, then an HMAC-SHA-256
 * key — hex-encoded on one line, mode 0600. The process loads it once at start.
 */
typedef struct ch_pii_keys ch_pii_keys_t;
ch_pii_keys_t *ch_pii_keys_load(const char *path, char *err, size_t errlen);
/** Creates the key file if it does not exist (0600, folder 0700). Returns 0 if it exists or was created. */
int ch_pii_keys_create(const char *path, char *err, size_t errlen);
/** The key file of the data folder: <var_dir>/keys/data.key. */
void ch_pii_keys_path(const char *var_dir, char *out, size_t outlen);
/** The process-wide keys, loaded by ch_pii_init (called by serve and by commands that need them). */
extern ch_pii_keys_t *ch_pii;
int ch_pii_init(const char *var_dir, char *err, size_t errlen);

/** AES-256-GCM with a random 12-byte nonce: appends nonce || ciphertext || 16-byte tag. */
void ch_pii_encrypt(const ch_pii_keys_t *keys, const void *plain, size_t len, ch_buf_t *out);
/** Appends the plaintext; returns CH_EINVAL (appending nothing) when the tag does not verify. */
int ch_pii_decrypt(const ch_pii_keys_t *keys, const void *sealed, size_t len, ch_buf_t *out);
/**
 * HMAC-SHA-256 over `domain` || 0x00 || value, so an ID number and a phone number never share a hash.
 * Domains in use: "id", "phone", "otp". The look-up key of a person in the database and in Redis.
 */
void ch_pii_hmac(const ch_pii_keys_t *keys, const char *domain, const void *value, size_t len, uint8_t out[32]);
/** Lower-case hex of `len` bytes into `out` (2*len + 1 bytes). */
void ch_hex(const uint8_t *in, size_t len, char *out);

#endif
