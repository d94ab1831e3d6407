/* What venues.c shares with appeals.c: identifiers, clocks and text checks. */
#ifndef HEALTHCODE_VENUES_H
#define HEALTHCODE_VENUES_H

#include <stdint.h>
#include "healthcode.h"

/** A random UUID (version 4) as text (37 bytes with the NUL). */
void hc_uuid_v4(char out[37]);
/** The canonical lower-case text of 16 bytes. */
void hc_uuid_format(const uint8_t b[16], char out[37]);
/** Parses the 8-4-4-4-12 form (either case); returns 0, or -1 for anything else (NULL included). */
int hc_uuid_parse(const char *s, uint8_t out[16]);
/** Wall-clock time in Unix microseconds. */
int64_t hc_unix_now_us(void);
/** A Timestamp of Unix microseconds, in the call's memory. */
Google__Protobuf__Timestamp *hc_timestamp_us(ch_call_t *call, int64_t us);
/**
 * The number of characters of a UTF-8 string, or -1 when it is not valid UTF-8 or holds a control character
 * (tab and line breaks are allowed when `newlines`).
 */
long hc_text_chars(const char *s, int newlines);

#endif
