/* The part of klib's khash.h that h2o 2.2.5's <h2o/http2_internal.h> needs, which Debian's libh2o-evloop-dev does not
 * ship: the table layout h2o was built with (klib as vendored in h2o 2.2.5), look-up and iteration; no insertion. */
#ifndef __AC_KHASH_H
#define __AC_KHASH_H

#include <stdint.h>

typedef uint32_t khint32_t;
typedef uint64_t khint64_t;
typedef khint32_t khint_t;
typedef khint_t khiter_t;

/* two flag bits per bucket: 2 = empty, 1 = deleted */
#define __ac_iseither(flag, i) ((flag[(i) >> 4] >> (((i)&0xfU) << 1)) & 3)

#define KHASH_MAP_INIT_INT64(name, khval_t)                                                                            \
    typedef struct kh_##name##_s {                                                                                     \
        khint_t n_buckets, size, n_occupied, upper_bound;                                                              \
        khint32_t *flags;                                                                                              \
        khint64_t *keys;                                                                                               \
        khval_t *vals;                                                                                                 \
    } kh_##name##_t;                                                                                                   \
    static inline khint_t kh_get_##name(const kh_##name##_t *h, khint64_t key)                                         \
    {                                                                                                                  \
        for (khint_t i = 0; i < h->n_buckets; ++i)                                                                     \
            if (!__ac_iseither(h->flags, i) && h->keys[i] == key)                                                      \
                return i;                                                                                              \
        return h->n_buckets;                                                                                           \
    }

#define khash_t(name)      kh_##name##_t
#define kh_get(name, h, k) kh_get_##name(h, k)
#define kh_exist(h, x)     (!__ac_iseither((h)->flags, (x)))
#define kh_val(h, x)       ((h)->vals[x])
#define kh_begin(h)        (khint_t)(0)
#define kh_end(h)          ((h)->n_buckets)
#define kh_foreach_value(h, vvar, code)                                                                                \
    {                                                                                                                  \
        for (khint_t __i = kh_begin(h); __i != kh_end(h); ++__i) {                                                     \
            if (!kh_exist(h, __i))                                                                                     \
                continue;                                                                                              \
            (vvar) = kh_val(h, __i);                                                                                   \
            code;                                                                                                      \
        }                                                                                                              \
    }

#endif
