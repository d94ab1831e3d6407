/* Table tests of the health-code rule engine (services/healthcode/rules.c) against a fixed clock. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tap.h"
#include "rules.h"

#define H   HC_US_PER_HOUR
#define D   HC_US_PER_DAY
#define MIN (INT64_C(60) * HC_US_PER_S)

/* The fixed clock: 2026-11-28T12:00:00Z. */
static const int64_t NOW = INT64_C(1795867200) * HC_US_PER_S;

static const char RULES_V2[] =
    "{\"lookback_days\": 14, \"fever_threshold_c\": 38.0, \"negative_tests_to_clear\": 2,"
    " \"negative_test_spacing_hours\": 24, \"required_test_hours\": 48, \"visit_window_days\": 14,"
    " \"reason_colors\": {\"POSITIVE_TEST\": \"red\", \"CLOSE_CONTACT\": \"red\", \"HIGH_RISK_AREA\": \"red\","
    " \"QUARANTINE\": \"red\", \"SYMPTOMS\": \"yellow\", \"FEVER\": \"yellow\", \"MEDIUM_RISK_AREA\": \"yellow\","
    " \"SECONDARY_CONTACT\": \"red\", \"TEST_OVERDUE\": \"off\"}}";

static hc_rules_t R1; /* rule set 1, exactly as the migration installs it */

/* ---- reading rule set 1 out of the migration ---- */

static char *read_file(const char *path)
{
    FILE *fp = fopen(path, "rb");
    if (fp == NULL)
        return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s == NULL)
        abort();
    s[fread(s, 1, (size_t)n, fp)] = '\0';
    fclose(fp);
    return s;
}

/* The JSON between the $rules$ quotes of sql/migrations/0005_healthcode.sql. */
static int migration_rules(hc_rules_t *out, char *err, size_t errlen)
{
    char *sql = read_file(CH_SOURCE_ROOT "/sql/migrations/0005_healthcode.sql");
    if (sql == NULL) {
        snprintf(err, errlen, "cannot read the migration");
        return -1;
    }
    char *a = strstr(sql, "$rules$"), *b = a != NULL ? strstr(a + 7, "$rules$") : NULL;
    int ret = -1;
    if (a != NULL && b != NULL)
        ret = hc_rules_parse(a + 7, (size_t)(b - a - 7), 1, out, err, errlen);
    else
        snprintf(err, errlen, "no $rules$ block in the migration");
    free(sql);
    return ret;
}

/* ---- building inputs ---- */

typedef struct fixture {
    hc_inputs_t in;
    hc_test_t tests[16];
    hc_declaration_t decls[8];
    char regions[8][64];
    hc_area_t areas[8];
    int64_t secondary[4];
} fixture_t;

static void fx_init(fixture_t *f)
{
    memset(f, 0, sizeof(*f));
    f->in.tests = f->tests;
    f->in.decls = f->decls;
    f->in.areas = f->areas;
    f->in.secondary_at = f->secondary;
    strcpy(f->in.home_region, "440106");
}

static void fx_test(fixture_t *f, int64_t at, int positive)
{
    f->tests[f->in.ntests++] = (hc_test_t){at, positive, "lab-01"};
    if (positive && at > f->in.latest_positive.at)
        f->in.latest_positive = (hc_test_t){at, 1, "lab-01"};
}

static void fx_decl(fixture_t *f, int64_t at, int symptoms, double temp, const char *regions)
{
    size_t i = f->in.ndecls++;
    snprintf(f->regions[i], sizeof(f->regions[i]), "%s", regions);
    f->decls[i] = (hc_declaration_t){at, symptoms, temp, f->regions[i], strlen(regions) / 6};
}

static void fx_area(fixture_t *f, const char *region, int level, int64_t from, int64_t until, int64_t uploaded)
{
    size_t i = f->in.nareas++;
    hc_area_t *a = &f->areas[i];
    memset(a, 0, sizeof(*a));
    memcpy(a->region, region, 6);
    a->level = level;
    a->from = from;
    a->until = until;
    a->uploaded = uploaded;
    a->id = (int64_t)i + 1;
}

static hc_result_t eval_with(const hc_rules_t *rules, const fixture_t *f)
{
    hc_result_t r;
    hc_rules_eval(rules, &f->in, NOW, &r);
    return r;
}

static hc_result_t eval(const fixture_t *f)
{
    return eval_with(&R1, f);
}

/* The reason codes in order, comma-separated ("" for none). */
static const char *codes(const hc_result_t *r)
{
    static char buf[512];
    buf[0] = '\0';
    for (size_t i = 0; i < r->nreasons; ++i) {
        if (i > 0)
            strcat(buf, ",");
        strcat(buf, hc_reason_name(r->reasons[i].code));
    }
    return buf;
}

static const hc_reason_t *reason(const hc_result_t *r, int code)
{
    for (size_t i = 0; i < r->nreasons; ++i)
        if (r->reasons[i].code == code)
            return &r->reasons[i];
    return NULL;
}

/* ---- the rule set document ---- */

static void test_parse(void)
{
    char err[256];
    hc_rules_t r;
    tap_ok(migration_rules(&R1, err, sizeof(err)) == 0, "rule set 1 of the migration passes the schema (%s)", err);
    tap_ok(R1.version == 1 && R1.lookback == 14 * D && R1.fever_c == 37.3 && R1.negatives_needed == 2 &&
               R1.negative_spacing == 24 * H && R1.required_test == 48 * H && R1.visit_window == 14 * D,
           "rule set 1: 14-day look-back, fever 37.3 C, two negatives 24 h apart, a test due within 48 h");
    tap_ok(R1.colors[HC_R_POSITIVE_TEST] == HC_RED && R1.colors[HC_R_CLOSE_CONTACT] == HC_RED &&
               R1.colors[HC_R_HIGH_RISK_AREA] == HC_RED && R1.colors[HC_R_QUARANTINE] == HC_RED &&
               R1.colors[HC_R_SYMPTOMS] == HC_YELLOW && R1.colors[HC_R_FEVER] == HC_YELLOW &&
               R1.colors[HC_R_MEDIUM_RISK_AREA] == HC_YELLOW && R1.colors[HC_R_SECONDARY_CONTACT] == HC_YELLOW &&
               R1.colors[HC_R_TEST_OVERDUE] == HC_YELLOW,
           "rule set 1 colors: four red reasons, five yellow ones");
    tap_ok(hc_rules_parse(RULES_V2, strlen(RULES_V2), 2, &r, err, sizeof(err)) == 0 && r.version == 2 &&
               r.fever_c == 38.0 && r.colors[HC_R_TEST_OVERDUE] == HC_RULE_OFF,
           "a second rule set parses, with \"off\" for a reason");

    static const struct {
        const char *json, *want;
    } bad[] = {
        {"{\"lookback_days\": 14, \"surprise\": 1}", "unknown key \"surprise\""},
        {"{\"lookback_days\": 14}", "missing key \"fever_threshold_c\""},
        {"{\"lookback_days\": \"14\"}", "lookback_days: must be an integer"},
        {"{\"lookback_days\": 14.5}", "lookback_days: must be an integer"},
        {"{\"lookback_days\": 0}", "lookback_days: must be from 1 to 60"},
        {"{\"fever_threshold_c\": 45}", "fever_threshold_c: must be from 36 to 42"},
        {"{\"reason_colors\": {\"FEVER\": \"blue\"}}", "reason_colors.FEVER: must be \"red\", \"yellow\" or \"off\""},
        {"{\"reason_colors\": {\"COUGH\": \"red\"}}", "reason_colors: unknown reason \"COUGH\""},
        {"{\"reason_colors\": {\"FEVER\": \"red\"}}", "reason_colors: missing reason \"POSITIVE_TEST\""},
        {"{\"lookback_days\": 14, \"lookback_days\": 15}", "not valid JSON"},
        {"[1, 2]", "the rule set must be a JSON object"},
        {"{", "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); ++i) {
        int ret = hc_rules_parse(bad[i].json, strlen(bad[i].json), 3, &r, err, sizeof(err));
        tap_ok(ret == CH_EINVAL && strstr(err, bad[i].want) != NULL, "rule set %s is refused: %s (got: %s)",
               bad[i].json, bad[i].want, err);
    }
}

/* ---- each rule ---- */

static void test_each_rule(void)
{
    fixture_t f;
    hc_result_t r;

    fx_init(&f);
    r = eval(&f);
    tap_ok(r.color == HC_GREEN && r.nreasons == 0 && r.rule_version == 1 && r.next_eval_at == 0,
           "no inputs: green, no reasons, rule version 1, nothing to re-evaluate");

    fx_init(&f);
    fx_test(&f, NOW - 2 * H, 1);
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "POSITIVE_TEST") == 0, "a positive test: red POSITIVE_TEST");
    tap_ok(strcmp(r.reasons[0].source, "lab:lab-01") == 0 && r.reasons[0].as_of == NOW - 2 * H,
           "POSITIVE_TEST: data source lab:<lab>, as of the sample time");

    fx_init(&f);
    f.in.latest_positive = (hc_test_t){NOW - 90 * D, 1, "lab-02"};
    r = eval(&f);
    tap_ok(r.color == HC_RED, "a positive test long ago and never released still gives red");

    fx_init(&f);
    f.in.close_contact_at = NOW - 3 * H;
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "CLOSE_CONTACT") == 0 && strcmp(r.reasons[0].source, "checkins") == 0,
           "a close-contact mark: red CLOSE_CONTACT from check-ins");

    fx_init(&f);
    f.in.contact_declared_at = NOW - 1 * H;
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "CLOSE_CONTACT") == 0 &&
               strcmp(r.reasons[0].source, "declaration") == 0,
           "a declared contact with a confirmed case: red CLOSE_CONTACT from the declaration");

    fx_init(&f);
    f.in.quarantine_order_at = NOW - 5 * D;
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "QUARANTINE") == 0 && r.reasons[0].as_of == NOW - 5 * D,
           "a quarantine order: red QUARANTINE as of the order");

    fx_init(&f);
    f.in.quarantine_order_at = NOW + 2 * H;
    r = eval(&f);
    tap_ok(r.color == HC_GREEN && r.next_eval_at == NOW + 2 * H,
           "an order that starts later: green now, re-evaluated when it starts");

    fx_init(&f);
    fx_area(&f, "440106", HC_AREA_HIGH, NOW - 1 * D, NOW + 12 * H, NOW - 1 * D);
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "HIGH_RISK_AREA") == 0 &&
               strstr(r.reasons[0].detail, "home region") != NULL && r.reasons[0].as_of == NOW - 1 * D,
           "living in a high-risk area: red HIGH_RISK_AREA as of the area's start");
    tap_ok(r.next_eval_at == NOW + 12 * H, "an ongoing high-risk window is re-evaluated when it ends");

    fx_init(&f);
    fx_area(&f, "110101", HC_AREA_HIGH, NOW - 10 * D, NOW + 5 * D, NOW - 10 * D);
    fx_decl(&f, NOW - 1 * D, 0, 0, "110101");
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "HIGH_RISK_AREA") == 0 &&
               strstr(r.reasons[0].detail, "visit") != NULL,
           "a declared visit to a high-risk area: red HIGH_RISK_AREA");
    tap_ok(r.next_eval_at == NOW + 1 * D, "re-evaluated when the 48 h test after the visit falls due");
    fx_test(&f, NOW - 12 * H, 0);
    r = eval(&f);
    tap_ok(r.color == HC_RED && r.next_eval_at == NOW + 13 * D,
           "tested negative since: the visit counts for 14 days after it, re-evaluated then");

    fx_init(&f);
    fx_area(&f, "110101", HC_AREA_HIGH, NOW - 40 * D, NOW + 5 * D, NOW - 40 * D);
    fx_decl(&f, NOW - 15 * D, 0, 0, "110101");
    r = eval(&f);
    tap_ok(r.color == HC_GREEN, "a visit declared 15 days ago no longer counts");

    fx_init(&f);
    fx_area(&f, "110101", HC_AREA_HIGH, NOW - 3 * D, NOW + 5 * D, NOW - 3 * D);
    fx_decl(&f, NOW - 5 * D, 0, 0, "110101");
    r = eval(&f);
    tap_ok(r.color == HC_GREEN, "an area that became high-risk after the visit window does not count");

    fx_init(&f);
    fx_area(&f, "440106", HC_AREA_MEDIUM, NOW - 1 * D, NOW + 5 * D, NOW - 1 * D);
    r = eval(&f);
    tap_ok(r.color == HC_YELLOW && strcmp(codes(&r), "MEDIUM_RISK_AREA") == 0,
           "living in a medium-risk area for a day: yellow MEDIUM_RISK_AREA (no test due yet)");
    tap_ok(r.next_eval_at == NOW + 1 * D, "re-evaluated when the 48 h test falls due");

    fx_init(&f);
    fx_area(&f, "440106", HC_AREA_HIGH, NOW - 5 * D, NOW + 5 * D, NOW - 5 * D);
    fx_area(&f, "440106", HC_AREA_LOW, NOW - 5 * D, NOW + 5 * D, NOW - 1 * H);
    r = eval(&f);
    tap_ok(r.color == HC_GREEN && r.nreasons == 0,
           "a later upload for the same window supersedes the earlier one (high -> low: green)");

    fx_init(&f);
    fx_area(&f, "440106", HC_AREA_HIGH, NOW - 5 * D, NOW + 5 * D, NOW - 5 * D);
    fx_area(&f, "440106", HC_AREA_LOW, NOW - 5 * D, NOW - 2 * D, NOW - 1 * H);
    r = eval(&f);
    tap_ok(r.color == HC_RED && r.reasons[0].as_of == NOW - 2 * D,
           "a later upload supersedes only its own window: high again after it");

    fx_init(&f);
    fx_decl(&f, NOW - 2 * H, 1, 0, "");
    r = eval(&f);
    tap_ok(r.color == HC_YELLOW && strcmp(codes(&r), "SYMPTOMS") == 0 &&
               strcmp(r.reasons[0].source, "declaration") == 0,
           "declared symptoms: yellow SYMPTOMS from the declaration");

    fx_init(&f);
    fx_decl(&f, NOW - 2 * H, 0, 37.3, "");
    r = eval(&f);
    tap_ok(r.color == HC_YELLOW && strcmp(codes(&r), "FEVER") == 0 && strstr(r.reasons[0].detail, "37.3") != NULL,
           "37.3 C: yellow FEVER (the threshold, not the reading, in the detail)");

    fx_init(&f);
    fx_decl(&f, NOW - 2 * H, 0, 37.2, "");
    r = eval(&f);
    tap_ok(r.color == HC_GREEN, "37.2 C: green");

    fx_init(&f);
    fx_decl(&f, NOW - 2 * H, 0, 0, "");
    r = eval(&f);
    tap_ok(r.color == HC_GREEN, "temperature 0 (not measured) is no fever");

    fx_init(&f);
    fx_decl(&f, NOW - 15 * D, 1, 39.0, "");
    r = eval(&f);
    tap_ok(r.color == HC_GREEN, "symptoms and fever declared 15 days ago no longer count");

    fx_init(&f);
    f.secondary[f.in.nsecondary++] = NOW - 1 * D;
    r = eval(&f);
    tap_ok(r.color == HC_YELLOW && strcmp(codes(&r), "SECONDARY_CONTACT") == 0 && r.next_eval_at == NOW + 13 * D,
           "a contact at one remove: yellow SECONDARY_CONTACT for 14 days");

    fx_init(&f);
    fx_area(&f, "110101", HC_AREA_MEDIUM, NOW - 10 * D, NOW + 5 * D, NOW - 10 * D);
    fx_decl(&f, NOW - 3 * D, 0, 0, "110101");
    r = eval(&f);
    tap_ok(r.color == HC_YELLOW && strcmp(codes(&r), "MEDIUM_RISK_AREA,TEST_OVERDUE") == 0,
           "a visit to a medium-risk area 3 days ago without a test: MEDIUM_RISK_AREA and TEST_OVERDUE");
    tap_ok(reason(&r, HC_R_TEST_OVERDUE) != NULL && reason(&r, HC_R_TEST_OVERDUE)->as_of == NOW - 1 * D,
           "TEST_OVERDUE is as of the moment the test fell due");
    fx_test(&f, NOW - 2 * D, 0);
    r = eval(&f);
    tap_ok(strcmp(codes(&r), "MEDIUM_RISK_AREA") == 0, "a negative test after the visit satisfies the requirement");

    fx_init(&f);
    fx_area(&f, "440106", HC_AREA_MEDIUM, NOW - 4 * D, NOW + 5 * D, NOW - 4 * D);
    fx_test(&f, NOW - 30 * H, 0);
    r = eval(&f);
    tap_ok(strcmp(codes(&r), "MEDIUM_RISK_AREA") == 0 && r.next_eval_at == NOW + 18 * H,
           "living in a medium-risk area: a negative within 48 h satisfies it until it is 48 h old");
    f.tests[0].at = NOW - 50 * H;
    r = eval(&f);
    tap_ok(strcmp(codes(&r), "MEDIUM_RISK_AREA,TEST_OVERDUE") == 0 && reason(&r, HC_R_TEST_OVERDUE) != NULL &&
               reason(&r, HC_R_TEST_OVERDUE)->as_of == NOW - 2 * H,
           "living in a medium-risk area: the last negative is 50 h old: TEST_OVERDUE since it turned 48 h");
}

/* ---- transitions ---- */

static void test_transitions(void)
{
    fixture_t f;
    hc_result_t r;

    /* yellow -> green by two negative tests at least 24 h apart after the event */
    fx_init(&f);
    fx_decl(&f, NOW - 3 * D, 0, 38.5, "");
    fx_test(&f, NOW - 2 * D, 0);
    fx_test(&f, NOW - 1 * D, 0);
    r = eval(&f);
    tap_ok(r.color == HC_GREEN && strcmp(codes(&r), "NEGATIVE_TESTS") == 0,
           "fever, then two negatives exactly 24 h apart: green, NEGATIVE_TESTS noted");
    tap_ok(strstr(r.reasons[0].detail, "cleared FEVER") != NULL && r.reasons[0].as_of == NOW - 1 * D &&
               strcmp(r.reasons[0].source, "lab:lab-01") == 0,
           "NEGATIVE_TESTS names what it cleared, as of the second test, from its lab");

    fx_init(&f);
    fx_decl(&f, NOW - 3 * D, 0, 38.5, "");
    fx_test(&f, NOW - 2 * D, 0);
    fx_test(&f, NOW - 2 * D + 23 * H, 0);
    r = eval(&f);
    tap_ok(r.color == HC_YELLOW && strcmp(codes(&r), "FEVER") == 0, "two negatives only 23 h apart: still yellow");
    fx_test(&f, NOW - 1 * H, 0);
    r = eval(&f);
    tap_ok(r.color == HC_GREEN, "a third negative 24 h after the first: green");

    fx_init(&f);
    fx_decl(&f, NOW - 3 * D, 1, 0, "");
    fx_test(&f, NOW - 5 * D, 0);
    fx_test(&f, NOW - 4 * D, 0);
    r = eval(&f);
    tap_ok(r.color == HC_YELLOW, "negatives before the yellow-causing event do not clear it");

    fx_init(&f);
    fx_decl(&f, NOW - 3 * D, 1, 0, "");
    fx_test(&f, NOW - 2 * D, 0);
    fx_decl(&f, NOW - 36 * H, 0, 38.0, "");
    fx_test(&f, NOW - 1 * D, 0);
    r = eval(&f);
    tap_ok(r.color == HC_YELLOW && strcmp(codes(&r), "FEVER,NEGATIVE_TESTS") == 0,
           "negatives clear only the yellow reasons they follow: SYMPTOMS cleared, a later FEVER stays");

    /* red stays red after negatives */
    fx_init(&f);
    fx_test(&f, NOW - 4 * D, 1);
    fx_test(&f, NOW - 3 * D, 0);
    fx_test(&f, NOW - 2 * D, 0);
    fx_test(&f, NOW - 1 * D, 0);
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "POSITIVE_TEST") == 0,
           "red (positive) stays red after three negatives 24 h apart");

    fx_init(&f);
    f.in.close_contact_at = NOW - 4 * D;
    fx_decl(&f, NOW - 4 * D, 1, 0, "");
    fx_test(&f, NOW - 3 * D, 0);
    fx_test(&f, NOW - 2 * D, 0);
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "CLOSE_CONTACT,NEGATIVE_TESTS") == 0,
           "red and yellow: negatives clear the yellow reason, the color stays red");

    /* red -> green by a release after the red event */
    fx_init(&f);
    fx_test(&f, NOW - 10 * D, 1);
    f.in.quarantine_order_at = NOW - 10 * D;
    f.in.release_at = NOW - 1 * H;
    r = eval(&f);
    tap_ok(r.color == HC_GREEN && r.nreasons == 0, "positive, quarantined, released: green");

    fx_init(&f);
    f.in.release_at = NOW - 10 * D;
    fx_test(&f, NOW - 2 * D, 1);
    r = eval(&f);
    tap_ok(r.color == HC_RED, "a release before the positive test does not clear it");

    fx_init(&f);
    f.in.quarantine_order_at = NOW - 1 * D;
    f.in.release_at = NOW - 2 * D;
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "QUARANTINE") == 0, "a new order after a release: red again");

    fx_init(&f);
    f.in.quarantine_order_at = NOW - 14 * D;
    f.in.release_at = NOW - 1 * D;
    fx_decl(&f, NOW - 3 * D, 1, 38.0, "");
    r = eval(&f);
    tap_ok(r.color == HC_GREEN, "a release also clears yellow reasons that ended before it");

    fx_init(&f);
    fx_area(&f, "440106", HC_AREA_HIGH, NOW - 5 * D, NOW + 5 * D, NOW - 5 * D);
    f.in.quarantine_order_at = NOW - 5 * D;
    f.in.release_at = NOW - 1 * H;
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "HIGH_RISK_AREA") == 0,
           "a release does not clear an exposure that goes on (the home region is still high-risk)");

    /* an approved appeal */
    fx_init(&f);
    fx_test(&f, NOW - 3 * D, 1);
    f.in.override.present = 1;
    f.in.override.color = HC_GREEN;
    f.in.override.decided_at = NOW - 1 * D;
    f.in.override.expires_at = NOW + 6 * D;
    f.in.override.appeal_id = "a-1";
    r = eval(&f);
    tap_ok(r.color == HC_GREEN && strcmp(codes(&r), "APPEAL_OVERRIDE,POSITIVE_TEST") == 0,
           "an approved appeal sets green; the positive test stays in the reasons as history");
    tap_ok(strcmp(r.reasons[0].source, "appeal") == 0 && strstr(r.reasons[0].detail, "a-1") != NULL &&
               r.reasons[0].as_of == NOW - 1 * D && r.next_eval_at == NOW + 6 * D,
           "APPEAL_OVERRIDE: from the appeal, as of the decision; re-evaluated when it expires");
    fx_test(&f, NOW - 2 * H, 1);
    r = eval(&f);
    tap_ok(r.color == HC_RED, "a positive test after the decision overrides the override");

    fx_init(&f);
    fx_test(&f, NOW - 10 * D, 1);
    f.in.override.present = 1;
    f.in.override.color = HC_GREEN;
    f.in.override.decided_at = NOW - 8 * D;
    f.in.override.expires_at = NOW - 1 * D;
    r = eval(&f);
    tap_ok(r.color == HC_RED && strcmp(codes(&r), "POSITIVE_TEST") == 0, "an expired override no longer applies");
}

/* ---- another rule set, and the stored form ---- */

static void test_versions_and_json(void)
{
    char err[256];
    hc_rules_t r2;
    hc_rules_parse(RULES_V2, strlen(RULES_V2), 2, &r2, err, sizeof(err));
    fixture_t f;
    hc_result_t r;

    fx_init(&f);
    fx_decl(&f, NOW - 1 * H, 0, 37.5, "");
    tap_ok(eval(&f).color == HC_YELLOW, "rule set 1: 37.5 C is fever");
    r = eval_with(&r2, &f);
    tap_ok(r.color == HC_GREEN && r.rule_version == 2, "rule set 2 (threshold 38.0): 37.5 C is green, version 2");

    fx_init(&f);
    f.secondary[f.in.nsecondary++] = NOW - 1 * D;
    tap_ok(eval_with(&r2, &f).color == HC_RED, "rule set 2 colors SECONDARY_CONTACT red");

    fx_init(&f);
    fx_area(&f, "110101", HC_AREA_MEDIUM, NOW - 10 * D, NOW + 5 * D, NOW - 10 * D);
    fx_decl(&f, NOW - 3 * D, 0, 0, "110101");
    r = eval_with(&r2, &f);
    tap_ok(strcmp(codes(&r), "MEDIUM_RISK_AREA") == 0, "a reason switched off is neither colored nor listed");

    fx_init(&f);
    fx_test(&f, NOW - 2 * H - 500000, 1);
    fx_decl(&f, NOW - 1 * H, 1, 0, "");
    r = eval(&f);
    ch_buf_t buf = {0};
    hc_result_reasons_json(&r, &buf);
    tap_is_str(buf.base,
               "[{\"code\":\"POSITIVE_TEST\",\"data_source\":\"lab:lab-01\",\"as_of\":\"2026-11-28T09:59:59.500000Z\","
               "\"rule_version\":1,\"detail\":\"positive test result\"},"
               "{\"code\":\"SYMPTOMS\",\"data_source\":\"declaration\",\"as_of\":\"2026-11-28T11:00:00Z\","
               "\"rule_version\":1,\"detail\":\"declared symptoms\"}]",
               "the stored reasons: code, data_source, as_of (RFC 3339), rule_version, detail, red first");
    ch_buf_free(&buf);

    char t[40];
    hc_time_format(NOW, t, sizeof(t));
    tap_is_str(t, "2026-11-28T12:00:00Z", "times are RFC 3339 in UTC");
}

int main(void)
{
    test_parse();
    test_each_rule();
    test_transitions();
    test_versions_and_json();
    return tap_done();
}
