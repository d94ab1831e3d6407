/* A minimal TAP producer for unit tests: `ok N - name` lines, a plan at the end, exit 1 on failure. */
#ifndef CH_TAP_H
#define CH_TAP_H

#include <stdio.h>
#include <string.h>

static int tap_count, tap_failed;

/** Records one check; `name` states the behaviour it protects. */
#define tap_ok(cond, ...)                                                                          \
    do {                                                                                           \
        int tap_c_ = !!(cond);                                                                     \
        ++tap_count;                                                                               \
        printf("%sok %d - ", tap_c_ ? "" : "not ", tap_count);                                     \
        printf(__VA_ARGS__);                                                                       \
        printf("\n");                                                                              \
        if (!tap_c_) {                                                                             \
            ++tap_failed;                                                                          \
            printf("#   failed at %s:%d: %s\n", __FILE__, __LINE__, #cond);                        \
        }                                                                                          \
    } while (0)

#define tap_is_str(got, want, ...)                                                                 \
    do {                                                                                           \
        const char *tap_g_ = (got), *tap_w_ = (want);                                              \
        int tap_eq_ = tap_g_ != NULL && tap_w_ != NULL && strcmp(tap_g_, tap_w_) == 0;             \
        tap_ok(tap_eq_, __VA_ARGS__);                                                              \
        if (!tap_eq_)                                                                              \
            printf("#   got:  %s\n#   want: %s\n", tap_g_ ? tap_g_ : "(null)", tap_w_ ? tap_w_ : "(null)"); \
    } while (0)

static inline int tap_done(void)
{
    printf("1..%d\n", tap_count);
    return tap_failed ? 1 : 0;
}

#endif
