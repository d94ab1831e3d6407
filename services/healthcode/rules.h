/* The health-code rule engine: a pure function of (rule set, one resident's inputs, now) -> color and reasons. */
#ifndef HC_RULES_H
#define HC_RULES_H

#include <stddef.h>
#include <stdint.h>
#include "cityhall/transcode.h" /* ch_buf_t */
#include "healthcode.h"         /* HC_GREEN, HC_YELLOW, HC_RED */

/*
 * Times are Unix microseconds (int64) throughout: PostgreSQL's timestamptz resolution, so that "a release after the
 * positive test" compares exactly what the database holds. The engine does no I/O and reads no clock: `now` is an
 * argument (the database's now() in production, a fixed clock in tests/unit/test_rules.c).
 */
#define HC_US_PER_S    INT64_C(1000000)
#define HC_US_PER_HOUR (INT64_C(3600) * HC_US_PER_S)
#define HC_US_PER_DAY  (INT64_C(24) * HC_US_PER_HOUR)

/** Reason codes. The first HC_R__RULES are the ones a rule set colors; the last two only annotate. */
typedef enum hc_reason_code {
    HC_R_POSITIVE_TEST,     /* a positive test not followed by a release */
    HC_R_CLOSE_CONTACT,     /* a close-contact mark or a declared contact, not followed by a release */
    HC_R_HIGH_RISK_AREA,    /* lived in or declared a visit to a high-risk area within the look-back */
    HC_R_QUARANTINE,        /* ordered into medical observation and not released */
    HC_R_SYMPTOMS,          /* declared symptoms within the look-back */
    HC_R_FEVER,             /* declared a temperature at or above the threshold within the look-back */
    HC_R_MEDIUM_RISK_AREA,  /* as HIGH_RISK_AREA, for a medium-risk area */
    HC_R_SECONDARY_CONTACT, /* a contact at one remove within the look-back */
    HC_R_TEST_OVERDUE,      /* exposed to a medium/high-risk area and no negative test in time */
    HC_R__RULES,
    HC_R_APPEAL_OVERRIDE = HC_R__RULES, /* an approved appeal set the color */
    HC_R_NEGATIVE_TESTS,                /* negative tests cleared yellow reasons */
    HC_R__COUNT
} hc_reason_code_t;

/** "POSITIVE_TEST", ...; NULL for an unknown code. */
const char *hc_reason_name(int code);

/** What a rule set says about a reason: which color it gives, or that it is switched off. */
enum { HC_RULE_OFF = -1 };

/** A parsed rule set (immutable once parsed; shared by every thread). */
typedef struct hc_rules {
    int version;
    int64_t lookback;         /* lookback_days: how long declarations, area exposures and contacts count */
    double fever_c;           /* fever_threshold_c */
    int negatives_needed;     /* negative_tests_to_clear */
    int64_t negative_spacing; /* negative_test_spacing_hours */
    int64_t required_test;    /* required_test_hours: a negative test is due this long after an exposure */
    int64_t visit_window;     /* visit_window_days: a declared visit happened within this before the declaration */
    int colors[HC_R__RULES];  /* reason_colors: HC_YELLOW, HC_RED or HC_RULE_OFF */
} hc_rules_t;

/**
 * Parses and validates a rule set document against the engine's schema: every key required, no unknown key, every
 * value of the right type and within range. Returns 0, or CH_EINVAL with a message naming the key in `err`.
 */
int hc_rules_parse(const char *json, size_t len, int version, hc_rules_t *out, char *err, size_t errlen);

/* ---- inputs ---- */

enum { HC_AREA_LOW = 0, HC_AREA_MEDIUM = 1, HC_AREA_HIGH = 2 };

typedef struct hc_test {
    int64_t at; /* sample time */
    int positive;
    const char *lab;
} hc_test_t;

typedef struct hc_declaration {
    int64_t at;
    int symptoms;         /* any symptom declared */
    double temperature_c; /* 0: not measured */
    const char *regions;  /* nregions 6-digit codes, back to back (no separator) */
    size_t nregions;
} hc_declaration_t;

/** One risk-area record. For a region and a moment, the record covering it that was uploaded last decides. */
typedef struct hc_area {
    char region[7];
    int level;           /* HC_AREA_* */
    int64_t from, until; /* [from, until) */
    int64_t uploaded;
    int64_t id; /* breaks ties between records uploaded at the same moment */
} hc_area_t;

typedef struct hc_inputs {
    char home_region[7];    /* registry_residents.region, "" when unknown */
    const hc_test_t *tests; /* tests sampled within the look-back, any order */
    size_t ntests;
    hc_test_t latest_positive;     /* the latest positive test of any age (at = 0: none) */
    const hc_declaration_t *decls; /* declarations within the look-back, any order */
    size_t ndecls;
    int64_t contact_declared_at; /* the latest declaration with the contact flag, any age (0: none) */
    const hc_area_t *areas;      /* records of the home region and of declared regions, any order */
    size_t nareas;
    int64_t quarantine_order_at; /* the latest order (0: none) */
    int64_t release_at;          /* the latest release (0: none) */
    int64_t close_contact_at;    /* the latest close-contact mark, any age (0: none) */
    const int64_t *secondary_at; /* contact marks at one remove within the look-back */
    size_t nsecondary;
    struct {
        int present; /* the latest override not yet expired */
        int color;   /* HC_* */
        int64_t decided_at, expires_at;
        const char *appeal_id;
    } override;
} hc_inputs_t;

/* ---- output ---- */

typedef struct hc_reason {
    int code;         /* hc_reason_code_t */
    char source[80];  /* declaration, lab:<id>, risk_areas, quarantine, checkins, appeal, test_results */
    int64_t as_of;    /* when the event that fired the rule happened */
    char detail[200]; /* for people; never personal data */
} hc_reason_t;

#define HC_MAX_REASONS 16

typedef struct hc_result {
    int color;
    int rule_version;
    size_t nreasons;
    hc_reason_t reasons[HC_MAX_REASONS];
    /**
     * The next moment at which the result may change with time alone (a look-back ending, a test falling due, an
     * override expiring, a risk window starting), or 0. The code is evaluated again then.
     */
    int64_t next_eval_at;
} hc_result_t;

/**
 * Evaluates the rules. Order: red reasons (each cleared by a release after its event), yellow reasons (each also
 * cleared by negative tests after its event), TEST_OVERDUE, then an active override, which sets its color over the
 * reasons known when it was decided (a later event still counts). Reasons come out sorted: the override first, then
 * by code; cleared yellow reasons are summarised by one NEGATIVE_TESTS reason.
 */
void hc_rules_eval(const hc_rules_t *rules, const hc_inputs_t *in, int64_t now, hc_result_t *out);

/** Appends the reasons as stored in health_codes.reasons: [{code, data_source, as_of, rule_version, detail}]. */
void hc_result_reasons_json(const hc_result_t *r, ch_buf_t *out);

/** RFC 3339 in UTC ("2026-11-28T20:01:02Z", with six decimals when the microseconds are not 0). `out` >= 40 bytes. */
void hc_time_format(int64_t us, char *out, size_t outlen);

#endif
