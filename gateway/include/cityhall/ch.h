/* Names every part of cityhall shares: error codes, roles, and the status mapping. */
#ifndef CITYHALL_CH_H
#define CITYHALL_CH_H

#include <stdint.h>

/** Return codes of ch_* functions: 0 or one of these (negative). */
enum {
    CH_OK = 0,
    CH_EINVAL = -1,   /* bad argument or input */
    CH_EFULL = -2,    /* a bounded queue is full */
    CH_EUNAVAIL = -3, /* a dependency is down or not connected */
    CH_ETIMEDOUT = -4,
    CH_EDB = -5,      /* the database refused the statement (constraint, syntax...) */
    CH_ECLOSED = -6,  /* shutting down */
    CH_ENOTFOUND = -7,
};

/** The error codes of the API contract (grpc-gateway names and status mapping). */
typedef enum ch_code {
    CH_CODE_INVALID_ARGUMENT,   /* 400 */
    CH_CODE_UNAUTHENTICATED,    /* 401 */
    CH_CODE_PERMISSION_DENIED,  /* 403 */
    CH_CODE_NOT_FOUND,          /* 404 */
    CH_CODE_METHOD_NOT_ALLOWED, /* 405 (not a gRPC code; the gateway answers it for a known path) */
    CH_CODE_ALREADY_EXISTS,     /* 409 */
    CH_CODE_ABORTED,            /* 409 */
    CH_CODE_PAYLOAD_TOO_LARGE,  /* 413 */
    CH_CODE_UNSUPPORTED_MEDIA,  /* 415 */
    CH_CODE_FAILED_PRECONDITION,/* 422 */
    CH_CODE_RESOURCE_EXHAUSTED, /* 429 + Retry-After */
    CH_CODE_INTERNAL,           /* 500 */
    CH_CODE_UNAVAILABLE,        /* 503 + Retry-After */
    CH_CODE_DEADLINE_EXCEEDED,  /* 504 */
    CH_CODE__COUNT
} ch_code_t;

int ch_code_status(ch_code_t code);
const char *ch_code_name(ch_code_t code);

/** Roles a principal can hold; a route lists the roles it admits (0 = public). */
enum {
    CH_ROLE_CITIZEN = 1u << 0,
    CH_ROLE_STAFF = 1u << 1,
    CH_ROLE_KIOSK = 1u << 2,
    CH_ROLE_DEPT = 1u << 3,
    CH_ROLE_ADMIN = 1u << 4,
};
#define CH_PUBLIC 0u

/**
 * Logs one JSON line on stderr: {"time","level","event","msg"}. `event` is a short snake_case name; the
 * message never carries personal data (use masked forms or keyed hashes).
 */
enum { CH_LOG_DEBUG, CH_LOG_INFO, CH_LOG_WARN, CH_LOG_ERROR };
void ch_log(int level, const char *event, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/** Monotonic clock in microseconds. */
uint64_t ch_now_us(void);

#endif
