/*
 * libFuzzer target for the ID-number validator (gateway/pii.c, GB 11643-1999): ch_id_number_check must agree with
 * the second implementation below, written from the standard and not from pii.c, on every input (verdict and
 * reason), and the check character and the mask must agree too.
 *
 * The first byte picks how the rest is used: even, as the number itself (up to a NUL); odd, as 17 characters to
 * which the right check character is appended, so that region and date rules are reached with valid checksums.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "cityhall/ch.h"
#include "cityhall/pii.h"
#include "fuzz_util.h"

/* ISO 7064 MOD 11-2 as the standard states it: the check value makes sum(a_i * 2^(i-1)) == 1 (mod 11). */
static char ref_check_char(const char *first17)
{
    int sum = 0;
    for (int i = 0; i < 17; ++i) {
        int weight = 1;
        for (int k = 0; k < 17 - i; ++k) /* 2^(18 - position) mod 11, position counted from 1 */
            weight = weight * 2 % 11;
        sum = (sum + (first17[i] - '0') * weight) % 11;
    }
    int check = (12 - sum) % 11; /* the value of a_1: sum + a_1 == 1 (mod 11) */
    return check == 10 ? 'X' : (char)('0' + check);
}

static long ref_today(void)
{
    time_t now = time(NULL) + 8 * 3600; /* China Standard Time */
    struct tm tm;
    gmtime_r(&now, &tm);
    return (tm.tm_year + 1900L) * 10000 + (tm.tm_mon + 1) * 100 + tm.tm_mday;
}

/* A real calendar date, through the C library's normalisation rather than a table of month lengths. */
static int ref_date_exists(int y, int m, int d)
{
    struct tm tm = {.tm_year = y - 1900, .tm_mon = m - 1, .tm_mday = d, .tm_hour = 12};
    if (m < 1 || m > 12 || d < 1 || d > 31)
        return 0;
    time_t t = timegm(&tm);
    struct tm back;
    gmtime_r(&t, &back);
    return back.tm_year == y - 1900 && back.tm_mon == m - 1 && back.tm_mday == d;
}

/* The verdict and the first rule broken, in the order pii.h documents them. */
static const char *ref_check(const char *id, long today)
{
    if (strlen(id) != 18)
        return "must be 18 characters";
    if (strspn(id, "0123456789") < 17 || strchr("0123456789X", id[17]) == NULL || id[17] == '\0')
        return "must be 17 digits followed by a digit or X";
    if (id[0] == '0' || id[0] == '9')
        return "invalid region code";
    int y = atoi((char[]){id[6], id[7], id[8], id[9], 0}), m = atoi((char[]){id[10], id[11], 0}),
        d = atoi((char[]){id[12], id[13], 0});
    if (y < 1900 || !ref_date_exists(y, m, d))
        return "invalid birth date";
    if (y * 10000L + m * 100 + d > today)
        return "birth date is in the future";
    if (ref_check_char(id) != id[17])
        return "wrong check character";
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    char id[64];
    size_t n = strnlen((const char *)data + 1, size - 1);
    if (n > sizeof(id) - 2)
        n = sizeof(id) - 2;
    memcpy(id, data + 1, n);
    id[n] = '\0';
    if ((data[0] & 1) && n >= 17 && strspn(id, "0123456789") >= 17) {
        id[17] = ref_check_char(id);
        id[18] = '\0';
    }
    long before = ref_today();
    const char *why = NULL;
    int ret = ch_id_number_check(id, &why);
    const char *want = ref_check(id, before);
    if (ref_today() != before)
        return 0; /* midnight passed during the call: "today" is not the same day for both */
    if ((ret == 0) != (want == NULL) || (ret == 0 ? why != NULL : (why == NULL || strcmp(why, want) != 0)))
        fz_fail(want == NULL ? "refused, but valid by the reference" : want, id, strlen(id));
    if (strlen(id) >= 17 && strspn(id, "0123456789") >= 17 && ch_id_number_check_char(id) != ref_check_char(id))
        fz_fail("check character differs from the reference", id, 17);
    char mask[19];
    ch_id_number_mask(id, mask);
    for (int i = 0; i < 18; ++i)
        if (mask[i] != (strlen(id) == 18 && (i < 4 || i >= 14) ? id[i] : '*'))
            fz_fail("mask shows more or less than the first and last four", id, strlen(id));
    return 0;
}
