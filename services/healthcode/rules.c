/* The health-code rule engine: evaluation order and semantics in C, thresholds and windows from the rule set. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "cityhall/ch.h"
#include "rules.h"

static const char *const reason_names[HC_R__COUNT] = {
    [HC_R_POSITIVE_TEST] = "POSITIVE_TEST",
    [HC_R_CLOSE_CONTACT] = "CLOSE_CONTACT",
    [HC_R_HIGH_RISK_AREA] = "HIGH_RISK_AREA",
    [HC_R_QUARANTINE] = "QUARANTINE",
    [HC_R_SYMPTOMS] = "SYMPTOMS",
    [HC_R_FEVER] = "FEVER",
    [HC_R_MEDIUM_RISK_AREA] = "MEDIUM_RISK_AREA",
    [HC_R_SECONDARY_CONTACT] = "SECONDARY_CONTACT",
    [HC_R_TEST_OVERDUE] = "TEST_OVERDUE",
    [HC_R_APPEAL_OVERRIDE] = "APPEAL_OVERRIDE",
    [HC_R_NEGATIVE_TESTS] = "NEGATIVE_TESTS",
};

const char *hc_reason_name(int code)
{
    return code >= 0 && code < HC_R__COUNT ? reason_names[code] : NULL;
}

/* ---- the rule set document ---- */

/*
 * The schema, version 1 of the document format (sql/migrations/0005_healthcode.sql installs rule set 1):
 *   lookback_days                int 1..60      declarations, area exposures and contacts count this long
 *   fever_threshold_c            number 36..42  FEVER at or above it
 *   negative_tests_to_clear      int 1..5       negative tests that clear a yellow reason...
 *   negative_test_spacing_hours  int 0..168     ...each at least this long after the previous one
 *   required_test_hours          int 1..720     after a medium/high-risk exposure a negative test is due within this
 *   visit_window_days            int 1..60      a declared visit happened within this before the declaration
 *   reason_colors                object         each of the nine rule reasons: "red", "yellow" or "off"
 */
enum { K_LOOKBACK, K_FEVER, K_NEGATIVES, K_SPACING, K_REQUIRED, K_VISIT, K_COLORS, K__COUNT };

static const struct {
    const char *name;
    int integer; /* 1: an integer; 0: any number; -1: the colors object */
    double lo, hi;
} keys[K__COUNT] = {
    [K_LOOKBACK] = {"lookback_days", 1, 1, 60},
    [K_FEVER] = {"fever_threshold_c", 0, 36, 42},
    [K_NEGATIVES] = {"negative_tests_to_clear", 1, 1, 5},
    [K_SPACING] = {"negative_test_spacing_hours", 1, 0, 168},
    [K_REQUIRED] = {"required_test_hours", 1, 1, 720},
    [K_VISIT] = {"visit_window_days", 1, 1, 60},
    [K_COLORS] = {"reason_colors", -1, 0, 0},
};

static int parse_colors(json_t *obj, hc_rules_t *r, char *err, size_t errlen)
{
    if (!json_is_object(obj)) {
        snprintf(err, errlen, "reason_colors: must be an object");
        return CH_EINVAL;
    }
    unsigned seen = 0;
    const char *key;
    json_t *val;
    json_object_foreach(obj, key, val)
    {
        int code = -1;
        for (int i = 0; i < HC_R__RULES; ++i)
            if (strcmp(key, reason_names[i]) == 0)
                code = i;
        if (code < 0) {
            snprintf(err, errlen, "reason_colors: unknown reason \"%.64s\"", key);
            return CH_EINVAL;
        }
        const char *s = json_is_string(val) ? json_string_value(val) : "";
        if (strcmp(s, "red") == 0)
            r->colors[code] = HC_RED;
        else if (strcmp(s, "yellow") == 0)
            r->colors[code] = HC_YELLOW;
        else if (strcmp(s, "off") == 0)
            r->colors[code] = HC_RULE_OFF;
        else {
            snprintf(err, errlen, "reason_colors.%s: must be \"red\", \"yellow\" or \"off\"", key);
            return CH_EINVAL;
        }
        seen |= 1u << code;
    }
    for (int i = 0; i < HC_R__RULES; ++i) {
        if (!(seen & (1u << i))) {
            snprintf(err, errlen, "reason_colors: missing reason \"%s\"", reason_names[i]);
            return CH_EINVAL;
        }
    }
    return 0;
}

int hc_rules_parse(const char *json, size_t len, int version, hc_rules_t *out, char *err, size_t errlen)
{
    json_error_t je;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &je);
    if (root == NULL) {
        snprintf(err, errlen, "not valid JSON: %s (line %d)", je.text, je.line);
        return CH_EINVAL;
    }
    int ret = CH_EINVAL;
    hc_rules_t r;
    memset(&r, 0, sizeof(r));
    r.version = version;
    if (!json_is_object(root)) {
        snprintf(err, errlen, "the rule set must be a JSON object");
        goto out;
    }
    unsigned seen = 0;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val)
    {
        int k = -1;
        for (int i = 0; i < K__COUNT; ++i)
            if (strcmp(key, keys[i].name) == 0)
                k = i;
        if (k < 0) {
            snprintf(err, errlen, "unknown key \"%.64s\"", key);
            goto out;
        }
        seen |= 1u << k;
        if (keys[k].integer < 0) {
            if (parse_colors(val, &r, err, errlen) != 0)
                goto out;
            continue;
        }
        if (keys[k].integer ? !json_is_integer(val) : !json_is_number(val)) {
            snprintf(err, errlen, "%s: must be %s", key, keys[k].integer ? "an integer" : "a number");
            goto out;
        }
        double v = json_number_value(val);
        if (!(v >= keys[k].lo && v <= keys[k].hi)) {
            snprintf(err, errlen, "%s: must be from %g to %g", key, keys[k].lo, keys[k].hi);
            goto out;
        }
        switch (k) {
        case K_LOOKBACK:
            r.lookback = (int64_t)v * HC_US_PER_DAY;
            break;
        case K_FEVER:
            r.fever_c = v;
            break;
        case K_NEGATIVES:
            r.negatives_needed = (int)v;
            break;
        case K_SPACING:
            r.negative_spacing = (int64_t)v * HC_US_PER_HOUR;
            break;
        case K_REQUIRED:
            r.required_test = (int64_t)v * HC_US_PER_HOUR;
            break;
        case K_VISIT:
            r.visit_window = (int64_t)v * HC_US_PER_DAY;
            break;
        }
    }
    for (int i = 0; i < K__COUNT; ++i) {
        if (!(seen & (1u << i))) {
            snprintf(err, errlen, "missing key \"%s\"", keys[i].name);
            goto out;
        }
    }
    *out = r;
    ret = 0;
out:
    json_decref(root);
    return ret;
}

/* ---- evaluation ---- */

/* A rule that fired, before releases, negative tests and overrides are applied. */
typedef struct cand {
    int code;
    int64_t event_at; /* the reason's as_of: when the causing event happened (or the exposure began) */
    int64_t end_at;   /* the last moment the condition held: a release or negative tests must come after it */
    char source[80];
    char detail[200];
} cand_t;

typedef struct eval {
    const hc_rules_t *rules;
    const hc_inputs_t *in;
    int64_t now;
    int64_t next;
    cand_t cands[HC_R__RULES];
    int have[HC_R__RULES];
} eval_t;

/* Remembers `t` as a moment the result may change, if it is in the future. */
static void wake_at(eval_t *e, int64_t t)
{
    if (t > e->now && (e->next == 0 || t < e->next))
        e->next = t;
}

/* Records a fired rule; of two firings of one rule the one that ends later is kept (it is the harder to clear). */
static void fire(eval_t *e, int code, int64_t event_at, int64_t end_at, const char *source, const char *detail)
{
    if (e->have[code] && e->cands[code].end_at >= end_at)
        return;
    cand_t *c = &e->cands[code];
    c->code = code;
    c->event_at = event_at;
    c->end_at = end_at;
    snprintf(c->source, sizeof(c->source), "%.79s", source);
    snprintf(c->detail, sizeof(c->detail), "%.199s", detail);
    e->have[code] = 1;
}

/* The level of `region` at moment t: the covering record uploaded last decides (-1: no record covers t). */
static int area_level_at(const hc_inputs_t *in, const char *region, int64_t t)
{
    const hc_area_t *best = NULL;
    for (size_t i = 0; i < in->nareas; ++i) {
        const hc_area_t *a = &in->areas[i];
        if (memcmp(a->region, region, 6) != 0 || t < a->from || t >= a->until)
            continue;
        if (best == NULL || a->uploaded > best->uploaded || (a->uploaded == best->uploaded && a->id > best->id))
            best = a;
    }
    return best != NULL ? best->level : -1;
}

/*
 * The last stretch within [a, b) during which `region` was at `level`: its start and end (end clipped to b).
 * The level changes only at records' bounds, so it is read at each bound in turn. Returns 0 when there is none.
 */
static int exposure(const hc_inputs_t *in, const char *region, int64_t a, int64_t b, int level, int64_t *start,
                    int64_t *end)
{
    int found = 0;
    int64_t t = a;
    while (t < b) {
        int64_t next = b;
        for (size_t i = 0; i < in->nareas; ++i) {
            const hc_area_t *r = &in->areas[i];
            if (memcmp(r->region, region, 6) != 0)
                continue;
            if (r->from > t && r->from < next)
                next = r->from;
            if (r->until > t && r->until < next)
                next = r->until;
        }
        if (area_level_at(in, region, t) == level) {
            if (!found || *end != t)
                *start = t; /* a new stretch (adjacent stretches at one level are one) */
            *end = next;
            found = 1;
        }
        t = next;
    }
    return found;
}

/* Schedules the moments at which the risk records of `region` begin or end. */
static void wake_at_area_bounds(eval_t *e, const char *region)
{
    for (size_t i = 0; i < e->in->nareas; ++i) {
        const hc_area_t *r = &e->in->areas[i];
        if (memcmp(r->region, region, 6) == 0) {
            wake_at(e, r->from);
            wake_at(e, r->until);
        }
    }
}

/* One exposure to a medium- or high-risk area, as TEST_OVERDUE needs it. */
typedef struct exposure_info {
    int found;
    int ongoing; /* still exposed now (lives in the area) */
    int64_t start, end;
} exposure_info_t;

/* HIGH_RISK_AREA and MEDIUM_RISK_AREA: the home region over the look-back, and each declared visit. */
static void eval_areas(eval_t *e, exposure_info_t *worst)
{
    const hc_inputs_t *in = e->in;
    const hc_rules_t *r = e->rules;
    static const int levels[2] = {HC_AREA_HIGH, HC_AREA_MEDIUM};
    static const int codes[2] = {HC_R_HIGH_RISK_AREA, HC_R_MEDIUM_RISK_AREA};
    static const char *const names[2] = {"high", "medium"};
    char detail[200];
    memset(worst, 0, sizeof(*worst));
    for (int l = 0; l < 2; ++l) {
        int64_t s, en;
        if (in->home_region[0] != '\0' &&
            exposure(in, in->home_region, e->now - r->lookback, e->now, levels[l], &s, &en) &&
            en + r->lookback > e->now) {
            int ongoing = en >= e->now;
            snprintf(detail, sizeof(detail),
                     ongoing ? "the home region is a %s-risk area"
                             : "the home region was a %s-risk area within the look-back",
                     names[l]);
            fire(e, codes[l], s, en, "risk_areas", detail);
            wake_at(e, en + r->lookback);
            if (!worst->found || en > worst->end)
                *worst = (exposure_info_t){1, ongoing, s, en};
        }
        for (size_t d = 0; d < in->ndecls; ++d) {
            const hc_declaration_t *dc = &in->decls[d];
            if (dc->at > e->now || dc->at + r->lookback <= e->now)
                continue;
            for (size_t k = 0; k < dc->nregions; ++k) {
                char region[7];
                memcpy(region, dc->regions + 6 * k, 6);
                region[6] = '\0';
                if (!exposure(in, region, dc->at - r->visit_window, dc->at, levels[l], &s, &en) ||
                    en + r->lookback <= e->now)
                    continue;
                snprintf(detail, sizeof(detail), "declared a visit to a %s-risk area", names[l]);
                fire(e, codes[l], s, en, "risk_areas", detail);
                wake_at(e, en + r->lookback);
                if (!worst->found || en > worst->end)
                    *worst = (exposure_info_t){1, 0, s, en};
            }
        }
    }
    /*
     * The home region's records that begin or end later (a window uploaded ahead of time, an ongoing one ending).
     * A declared visit lies in the past: later records cannot change what it was exposed to.
     */
    if (in->home_region[0] != '\0')
        wake_at_area_bounds(e, in->home_region);
}

/* The latest negative test sampled at or after `t` (and not after now): its time, or 0. */
static int64_t latest_negative_since(const eval_t *e, int64_t t)
{
    int64_t best = 0;
    for (size_t i = 0; i < e->in->ntests; ++i) {
        const hc_test_t *x = &e->in->tests[i];
        if (!x->positive && x->at >= t && x->at <= e->now && x->at > best)
            best = x->at;
    }
    return best;
}

/*
 * TEST_OVERDUE: after an exposure to a medium- or high-risk area a negative test is due within required_test_hours.
 * For an exposure that ended (a visit, a home region no longer at risk): a negative test sampled after its end.
 * While it goes on (the home region is at risk now): a negative test within the last required_test_hours, again and
 * again (the rolling requirement of 常态化核酸).
 */
static void eval_test_overdue(eval_t *e, const exposure_info_t *x)
{
    const int64_t req = e->rules->required_test;
    if (!x->found || e->in->release_at > x->end)
        return;
    char detail[200];
    snprintf(detail, sizeof(detail), "no negative test within %lld h of an exposure to a risk area",
             (long long)(req / HC_US_PER_HOUR));
    if (x->ongoing) {
        int64_t recent = latest_negative_since(e, e->now - req);
        int64_t due = x->start + req;
        if (recent != 0) {
            wake_at(e, recent + req);
        } else if (e->now >= due) {
            int64_t last = latest_negative_since(e, x->start);
            int64_t since = last != 0 && last + req > due ? last + req : due;
            fire(e, HC_R_TEST_OVERDUE, since, since, "test_results", detail);
        } else {
            wake_at(e, due);
        }
        return;
    }
    if (latest_negative_since(e, x->end) != 0)
        return;
    int64_t due = x->end + req;
    if (e->now >= due)
        fire(e, HC_R_TEST_OVERDUE, due, due, "test_results", detail);
    else
        wake_at(e, due);
}

/*
 * Whether rules->negatives_needed negative tests, each at least negative_spacing after the previous one, were
 * sampled at or after `since`. Greedy: the earliest qualifying test, then the earliest one far enough after it, ...
 * On success `*at` is the last test's time and `*lab` its lab.
 */
static int negatives_clear(const eval_t *e, int64_t since, int64_t *at, const char **lab)
{
    int64_t last = INT64_MIN;
    int count = 0;
    for (;;) {
        const hc_test_t *pick = NULL;
        int64_t from = count == 0 ? since : last + e->rules->negative_spacing;
        for (size_t i = 0; i < e->in->ntests; ++i) {
            const hc_test_t *x = &e->in->tests[i];
            if (x->positive || x->at < from || x->at > e->now || (count > 0 && x->at <= last))
                continue;
            if (pick == NULL || x->at < pick->at)
                pick = x;
        }
        if (pick == NULL)
            return 0;
        last = pick->at;
        if (++count >= e->rules->negatives_needed) {
            *at = last;
            *lab = pick->lab;
            return 1;
        }
    }
}

static int code_color(const eval_t *e, int code)
{
    return e->rules->colors[code];
}

static void add_reason(hc_result_t *out, int code, const char *source, int64_t as_of, const char *detail)
{
    if (out->nreasons >= HC_MAX_REASONS)
        return;
    hc_reason_t *r = &out->reasons[out->nreasons++];
    r->code = code;
    snprintf(r->source, sizeof(r->source), "%.79s", source);
    r->as_of = as_of;
    snprintf(r->detail, sizeof(r->detail), "%.199s", detail);
}

void hc_rules_eval(const hc_rules_t *rules, const hc_inputs_t *in, int64_t now, hc_result_t *out)
{
    eval_t e;
    memset(&e, 0, sizeof(e));
    e.rules = rules;
    e.in = in;
    e.now = now;
    memset(out, 0, sizeof(*out));
    out->rule_version = rules->version;
    char buf[200];

    /* 1. red events: each holds until a release after it (step 3) */
    if (in->latest_positive.at != 0 && in->latest_positive.at <= now) {
        snprintf(buf, sizeof(buf), "lab:%s", in->latest_positive.lab != NULL ? in->latest_positive.lab : "");
        fire(&e, HC_R_POSITIVE_TEST, in->latest_positive.at, in->latest_positive.at, buf, "positive test result");
    }
    if (in->quarantine_order_at != 0 && in->quarantine_order_at > in->release_at) {
        if (in->quarantine_order_at <= now)
            fire(&e, HC_R_QUARANTINE, in->quarantine_order_at, now, "quarantine", "under medical observation");
        else
            wake_at(&e, in->quarantine_order_at);
    }
    int64_t contact = in->close_contact_at > in->contact_declared_at ? in->close_contact_at : in->contact_declared_at;
    if (contact != 0 && contact <= now) {
        int marked = contact == in->close_contact_at;
        fire(&e, HC_R_CLOSE_CONTACT, contact, contact, marked ? "checkins" : "declaration",
             marked ? "close contact of a confirmed case" : "declared contact with a confirmed case");
    }

    /* 2. windowed events: risk areas, self-declared symptoms and fever, contacts at one remove */
    exposure_info_t worst;
    eval_areas(&e, &worst);
    for (size_t i = 0; i < in->ndecls; ++i) {
        const hc_declaration_t *d = &in->decls[i];
        if (d->at > now || d->at + rules->lookback <= now)
            continue;
        if (d->symptoms) {
            fire(&e, HC_R_SYMPTOMS, d->at, d->at, "declaration", "declared symptoms");
            wake_at(&e, d->at + rules->lookback);
        }
        if (d->temperature_c != 0 && d->temperature_c >= rules->fever_c) {
            snprintf(buf, sizeof(buf), "declared a temperature of %.1f C or more", rules->fever_c);
            fire(&e, HC_R_FEVER, d->at, d->at, "declaration", buf);
            wake_at(&e, d->at + rules->lookback);
        }
    }
    for (size_t i = 0; i < in->nsecondary; ++i) {
        int64_t t = in->secondary_at[i];
        if (t > now || t + rules->lookback <= now)
            continue;
        fire(&e, HC_R_SECONDARY_CONTACT, t, t, "checkins", "contact at one remove of a confirmed case");
        wake_at(&e, t + rules->lookback);
    }
    eval_test_overdue(&e, &worst);

    /* 3. a release from medical observation clears every reason whose condition ended before it */
    for (int c = 0; c < HC_R__RULES; ++c)
        if (e.have[c] && in->release_at > e.cands[c].end_at)
            e.have[c] = 0;

    /* 4. negative tests clear yellow reasons whose condition ended before the first of them */
    int cleared[HC_R__RULES] = {0}, ncleared = 0;
    int64_t cleared_at = 0;
    const char *cleared_lab = "";
    for (int c = 0; c < HC_R__RULES; ++c) {
        int64_t at;
        const char *lab;
        if (!e.have[c] || code_color(&e, c) != HC_YELLOW || !negatives_clear(&e, e.cands[c].end_at, &at, &lab))
            continue;
        e.have[c] = 0;
        cleared[c] = 1;
        ++ncleared;
        if (at > cleared_at) {
            cleared_at = at;
            cleared_lab = lab != NULL ? lab : "";
        }
    }

    /* 5. the color, and an approved appeal's override over what was known when it was decided */
    int ov = in->override.present && in->override.decided_at <= now && now < in->override.expires_at;
    if (in->override.present) {
        wake_at(&e, in->override.decided_at);
        if (ov)
            wake_at(&e, in->override.expires_at);
    }
    int color = ov ? in->override.color : HC_GREEN;
    for (int c = 0; c < HC_R__RULES; ++c) {
        if (!e.have[c] || code_color(&e, c) == HC_RULE_OFF)
            continue;
        if (ov && e.cands[c].event_at <= in->override.decided_at)
            continue; /* decided on: the override stands for it */
        if (code_color(&e, c) > color)
            color = code_color(&e, c);
    }
    out->color = color;

    /* 6. the reasons: the override first, then every reason in force (the override keeps them as history) */
    if (ov) {
        snprintf(buf, sizeof(buf), "appeal %.64s approved: color set to %s",
                 in->override.appeal_id != NULL ? in->override.appeal_id : "", hc_color_name(in->override.color));
        add_reason(out, HC_R_APPEAL_OVERRIDE, "appeal", in->override.decided_at, buf);
    }
    for (int c = 0; c < HC_R__RULES; ++c)
        if (e.have[c] && code_color(&e, c) != HC_RULE_OFF)
            add_reason(out, c, e.cands[c].source, e.cands[c].event_at, e.cands[c].detail);
    if (ncleared > 0) {
        int n = snprintf(buf, sizeof(buf), "%d negative tests at least %lld h apart cleared", rules->negatives_needed,
                         (long long)(rules->negative_spacing / HC_US_PER_HOUR));
        const char *sep = " ";
        for (int c = 0; c < HC_R__RULES && n > 0 && (size_t)n < sizeof(buf); ++c) {
            if (cleared[c]) {
                n += snprintf(buf + n, sizeof(buf) - (size_t)n, "%s%s", sep, reason_names[c]);
                sep = ", ";
            }
        }
        char source[80];
        snprintf(source, sizeof(source), "lab:%s", cleared_lab);
        add_reason(out, HC_R_NEGATIVE_TESTS, source, cleared_at, buf);
    }
    out->next_eval_at = e.next;
}

/* ---- output ---- */

void hc_time_format(int64_t us, char *out, size_t outlen)
{
    int64_t sec = us / HC_US_PER_S, frac = us % HC_US_PER_S;
    if (frac < 0) {
        frac += HC_US_PER_S;
        sec -= 1;
    }
    time_t t = (time_t)sec;
    struct tm tm;
    gmtime_r(&t, &tm);
    if (frac == 0)
        snprintf(out, outlen, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                 tm.tm_hour, tm.tm_min, tm.tm_sec);
    else
        snprintf(out, outlen, "%04d-%02d-%02dT%02d:%02d:%02d.%06lldZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                 tm.tm_hour, tm.tm_min, tm.tm_sec, (long long)frac);
}

static void json_str(ch_buf_t *out, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    ch_buf_append(out, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; ++p) {
        if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p};
            ch_buf_append(out, esc, 2);
        } else if (*p < 0x20) {
            char esc[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
            ch_buf_append(out, esc, 6);
        } else {
            ch_buf_append(out, p, 1);
        }
    }
    ch_buf_append(out, "\"", 1);
}

void hc_result_reasons_json(const hc_result_t *r, ch_buf_t *out)
{
    char tmp[64];
    ch_buf_append(out, "[", 1);
    for (size_t i = 0; i < r->nreasons; ++i) {
        const hc_reason_t *x = &r->reasons[i];
        if (i > 0)
            ch_buf_append(out, ",", 1);
        ch_buf_append(out, "{\"code\":", 8);
        json_str(out, reason_names[x->code]);
        ch_buf_append(out, ",\"data_source\":", 15);
        json_str(out, x->source);
        ch_buf_append(out, ",\"as_of\":", 9);
        hc_time_format(x->as_of, tmp, sizeof(tmp));
        json_str(out, tmp);
        int n = snprintf(tmp, sizeof(tmp), ",\"rule_version\":%d,\"detail\":", r->rule_version);
        ch_buf_append(out, tmp, (size_t)n);
        json_str(out, x->detail);
        ch_buf_append(out, "}", 1);
    }
    ch_buf_append(out, "]", 1);
}
