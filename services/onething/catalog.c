/* The one-thing catalog: parsing and checking a version, the process-wide cache, field checks, `catalog load`. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libpq-fe.h>
#include "catalog.h"
#include "cityhall/pii.h"

typedef Cityhall__Onething__V1__BundleList BundleList;
typedef Cityhall__Onething__V1__Bundle Bundle;
typedef Cityhall__Onething__V1__ServiceItem ServiceItem;

/*
 * A catalog version is a JSON document (its shape is described in sql/migrations/0008_onething.sql). Once
 * parsed it is never modified: every thread reads the same structures without locks. Strings point into the
 * jansson tree kept in `root`; arrays are allocated once and freed only by ot_catalog_free (the cache never
 * frees: there are a handful of versions in a process's life).
 */

static const char *const dataset_names[OT_DS__COUNT] = {
    "account", "registry", "marriages", "birth_records", "social_insurance", "businesses", "licences",
};

const char *ot_dataset_name(unsigned i)
{
    return i < OT_DS__COUNT ? dataset_names[i] : "";
}

int ot_dataset_logged(unsigned i)
{
    return i != 0 && i != 6; /* the citizen's own account and e-licences are not someone's dataset */
}

/* ---- problems ---- */

typedef struct parse {
    ch_buf_t *errors;
    int n;
} parse_t;

static void problem(parse_t *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(parse_t *p, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(line))
        n = sizeof(line) - 1;
    ++p->n;
    if (p->errors != NULL) {
        ch_buf_append(p->errors, line, (size_t)n);
        ch_buf_append(p->errors, "\n", 1);
    }
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n == 0 ? 1 : n, size);
    if (p == NULL)
        abort();
    return p;
}

/* ---- identifiers ---- */

static int match_ident(const char *s, const char *first, const char *rest, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max || strchr(first, s[0]) == NULL)
        return 0;
    for (size_t i = 1; i < n; ++i)
        if (strchr(rest, s[i]) == NULL)
            return 0;
    return 1;
}

#define LOWER  "abcdefghijklmnopqrstuvwxyz"
#define UPPER  "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#define DIGITS "0123456789"

static int item_code_ok(const char *s)
{
    return match_ident(s, UPPER, UPPER DIGITS "_", 32) && strlen(s) >= 2;
}

static int bundle_code_ok(const char *s)
{
    return match_ident(s, LOWER, LOWER DIGITS "_", 32) && strlen(s) >= 2;
}

static int dept_ok(const char *s)
{
    return match_ident(s, LOWER DIGITS, LOWER DIGITS "-", 64);
}

/* Field names: dotted lower-case words ("child.birth_cert_no"), at most 64 bytes. */
static int field_name_ok(const char *s)
{
    if (strlen(s) > 64)
        return 0;
    int at_start = 1;
    for (const char *c = s; *c != '\0'; ++c) {
        if (at_start) {
            if (*c < 'a' || *c > 'z')
                return 0;
            at_start = 0;
        } else if (*c == '.') {
            at_start = 1;
        } else if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_')) {
            return 0;
        }
    }
    return s[0] != '\0' && !at_start;
}

/* ---- JSON accessors that report what is wrong ---- */

static const char *get_string(parse_t *p, json_t *obj, const char *key, const char *where, int required)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL || json_is_null(v)) {
        if (required)
            problem(p, "%s: \"%s\" is required", where, key);
        return NULL;
    }
    if (!json_is_string(v)) {
        problem(p, "%s: \"%s\" must be a string", where, key);
        return NULL;
    }
    return json_string_value(v);
}

static int get_int(parse_t *p, json_t *obj, const char *key, const char *where, long long lo, long long hi,
                   long long *out)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        problem(p, "%s: \"%s\" must be an integer from %lld to %lld", where, key, lo, hi);
        return -1;
    }
    *out = json_integer_value(v);
    return 1;
}

static int get_bool(parse_t *p, json_t *obj, const char *key, const char *where)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return 0;
    if (!json_is_boolean(v)) {
        problem(p, "%s: \"%s\" must be true or false", where, key);
        return 0;
    }
    return json_is_true(v);
}

/* An array of strings (absent: empty). Returns a calloc'ed array of borrowed strings. */
static const char **get_strings(parse_t *p, json_t *obj, const char *key, const char *where, size_t *n)
{
    json_t *v = json_object_get(obj, key);
    *n = 0;
    if (v == NULL)
        return xcalloc(1, sizeof(char *));
    if (!json_is_array(v)) {
        problem(p, "%s: \"%s\" must be an array of strings", where, key);
        return xcalloc(1, sizeof(char *));
    }
    const char **out = xcalloc(json_array_size(v) + 1, sizeof(char *));
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e)
    {
        if (!json_is_string(e)) {
            problem(p, "%s: \"%s\" must be an array of strings", where, key);
            continue;
        }
        out[(*n)++] = json_string_value(e);
    }
    return out;
}

static void check_keys(parse_t *p, json_t *obj, const char *where, const char *const *known)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v)
    {
        int ok = 0;
        for (const char *const *k = known; *k != NULL && !ok; ++k)
            ok = strcmp(*k, key) == 0;
        if (!ok)
            problem(p, "%s: unknown member \"%s\"", where, key);
    }
}

/* ---- prefill facts: what ot_prefill_facts (0008) can return, and the datasets behind each ---- */

typedef struct fact {
    const char *key;
    unsigned datasets;
    int sealed_type; /* -1: plain; else the field type a sealed value needs */
} fact_t;

#define REG OT_DS_REGISTRY
static const fact_t facts[] = {
    {"account.phone", OT_DS_ACCOUNT, OT_PHONE},
    {"me.name", REG, -1},
    {"me.id_number", REG, OT_ID_NUMBER},
    {"me.sex", REG, -1},
    {"me.birth_date", REG, -1},
    {"me.address", REG, -1},
    {"me.parent_role", REG, -1},
    {"marriage.cert_no", REG | OT_DS_MARRIAGES, -1},
    {"marriage.registered_on", REG | OT_DS_MARRIAGES, -1},
    {"spouse.name", REG | OT_DS_MARRIAGES, -1},
    {"spouse.id_number", REG | OT_DS_MARRIAGES, OT_ID_NUMBER},
    {"birth_record.cert_no", REG | OT_DS_BIRTH_RECORDS, -1},
    {"birth_record.child_name", REG | OT_DS_BIRTH_RECORDS, -1},
    {"birth_record.child_sex", REG | OT_DS_BIRTH_RECORDS, -1},
    {"birth_record.child_birth_date", REG | OT_DS_BIRTH_RECORDS, -1},
    {"birth_record.hospital", REG | OT_DS_BIRTH_RECORDS, -1},
    {"family.mother.name", REG | OT_DS_BIRTH_RECORDS | OT_DS_MARRIAGES, -1},
    {"family.mother.id_number", REG | OT_DS_BIRTH_RECORDS | OT_DS_MARRIAGES, OT_ID_NUMBER},
    {"family.father.name", REG | OT_DS_BIRTH_RECORDS | OT_DS_MARRIAGES, -1},
    {"family.father.id_number", REG | OT_DS_BIRTH_RECORDS | OT_DS_MARRIAGES, OT_ID_NUMBER},
    {"family.mother.employer", REG | OT_DS_BIRTH_RECORDS | OT_DS_MARRIAGES | OT_DS_SOCIAL_INSURANCE, -1},
    {"social_insurance.employer", REG | OT_DS_SOCIAL_INSURANCE, -1},
    {"social_insurance.insured_since", REG | OT_DS_SOCIAL_INSURANCE, -1},
    {"social_insurance.status", REG | OT_DS_SOCIAL_INSURANCE, -1},
    {"businesses.legal_rep_count", REG | OT_DS_BUSINESSES, -1},
};
#undef REG

/* The fact behind a prefill key; licence facts ("licence:<ITEM>.<field>") are checked against the catalog. */
static const fact_t *fact_find(const char *key)
{
    for (size_t i = 0; i < sizeof(facts) / sizeof(facts[0]); ++i)
        if (strcmp(facts[i].key, key) == 0)
            return &facts[i];
    return NULL;
}

unsigned ot_prefill_datasets(const ot_field_t *f)
{
    unsigned ds = 0;
    for (size_t i = 0; i < f->n_prefill; ++i) {
        if (strncmp(f->prefill[i], "licence:", 8) == 0) {
            ds |= OT_DS_LICENCES;
            continue;
        }
        const fact_t *fact = fact_find(f->prefill[i]);
        if (fact != NULL)
            ds |= fact->datasets;
    }
    return ds;
}

/* ---- what each pre-check reads from the form ---- */

typedef struct needs {
    const char *field;
    ot_type_t type;
    int required; /* the field must be in the form (it may still be optional to fill) */
} needs_t;

static const needs_t birth_needs[] = {
    {"child.name", OT_STRING, 1},
    {"child.sex", OT_ENUM, 1},
    {"child.birth_date", OT_DATE, 1},
    {"child.birth_cert_no", OT_STRING, 1},
    {"mother.name", OT_STRING, 1},
    {"mother.id_number", OT_ID_NUMBER, 1},
    {"father.name", OT_STRING, 1},
    {"father.id_number", OT_ID_NUMBER, 1},
    {"parents.marriage_cert_no", OT_STRING, 0},
    {"hukou.follow", OT_ENUM, 0},
    {NULL, 0, 0},
};
static const needs_t business_needs[] = {
    {"company.name", OT_STRING, 1},
    {"legal_rep.name", OT_STRING, 1},
    {"legal_rep.id_number", OT_ID_NUMBER, 1},
    {NULL, 0, 0},
};
static const needs_t retirement_needs[] = {
    {"retiree.name", OT_STRING, 1},
    {"retiree.id_number", OT_ID_NUMBER, 1},
    {"retire.date", OT_DATE, 1},
    {"retiree.category", OT_ENUM, 0},
    {NULL, 0, 0},
};

static const struct {
    const char *name;
    ot_precheck_t kind;
    const needs_t *needs;
} prechecks[] = {
    {"none", OT_PRECHECK_NONE, NULL},
    {"birth", OT_PRECHECK_BIRTH, birth_needs},
    {"business_opening", OT_PRECHECK_BUSINESS, business_needs},
    {"retirement", OT_PRECHECK_RETIREMENT, retirement_needs},
};

static const char *const type_names[] = {"string", "date", "id_number", "enum", "phone", "bool", "int"};

/* ---- parsing ---- */

static int has_option(const ot_field_t *f, const char *opt)
{
    for (size_t i = 0; i < f->n_options; ++i)
        if (strcmp(f->options[i], opt) == 0)
            return 1;
    return 0;
}

static void parse_field(parse_t *p, const ot_catalog_t *cat, ot_bundle_t *b, json_t *jf, size_t index, ot_field_t *f)
{
    char where[160];
    snprintf(where, sizeof(where), "bundle %s: form[%zu]", b->code, index);
    if (!json_is_object(jf)) {
        problem(p, "%s: must be an object", where);
        return;
    }
    static const char *const known[] = {"name",    "label", "type", "required", "options",    "prefill",  "items",
                                        "max_len", "min",   "max",  "pattern",  "not_future", "not_past", NULL};
    check_keys(p, jf, where, known);
    f->name = get_string(p, jf, "name", where, 1);
    if (f->name != NULL) {
        if (!field_name_ok(f->name))
            problem(p, "%s: name \"%s\" must be dotted lower-case words (at most 64 bytes)", where, f->name);
        snprintf(where, sizeof(where), "bundle %s: field %s", b->code, f->name);
    }
    f->label = get_string(p, jf, "label", where, 1);
    f->type_name = get_string(p, jf, "type", where, 1);
    f->type = OT_STRING;
    if (f->type_name != NULL) {
        size_t t = 0;
        while (t < sizeof(type_names) / sizeof(type_names[0]) && strcmp(type_names[t], f->type_name) != 0)
            ++t;
        if (t == sizeof(type_names) / sizeof(type_names[0]))
            problem(p, "%s: unknown type \"%s\"", where, f->type_name);
        else
            f->type = (ot_type_t)t;
    }
    f->required = get_bool(p, jf, "required", where);
    f->options = get_strings(p, jf, "options", where, &f->n_options);
    if (f->type == OT_ENUM && f->n_options == 0)
        problem(p, "%s: an enum needs options", where);
    if (f->type != OT_ENUM && f->n_options != 0)
        problem(p, "%s: only an enum has options", where);
    for (size_t i = 0; i < f->n_options; ++i)
        for (size_t j = 0; j < i; ++j)
            if (strcmp(f->options[i], f->options[j]) == 0)
                problem(p, "%s: option \"%s\" is listed twice", where, f->options[i]);
    long long v;
    f->max_len = 200;
    if (get_int(p, jf, "max_len", where, 1, 10000, &v) > 0) {
        if (f->type != OT_STRING)
            problem(p, "%s: max_len applies to strings", where);
        f->max_len = (long)v;
    }
    f->min = -1000000000000LL;
    f->max = 1000000000000LL;
    if (get_int(p, jf, "min", where, f->min, f->max, &v) > 0)
        f->min = v;
    if (get_int(p, jf, "max", where, f->min, f->max, &v) > 0)
        f->max = v;
    if ((json_object_get(jf, "min") != NULL || json_object_get(jf, "max") != NULL) && f->type != OT_INT)
        problem(p, "%s: min and max apply to ints", where);
    if (f->min > f->max)
        problem(p, "%s: min is greater than max", where);
    f->not_future = get_bool(p, jf, "not_future", where);
    f->not_past = get_bool(p, jf, "not_past", where);
    if ((f->not_future || f->not_past) && f->type != OT_DATE)
        problem(p, "%s: not_future and not_past apply to dates", where);
    if (f->not_future && f->not_past)
        problem(p, "%s: a date cannot be both not_future and not_past", where);
    const char *pattern = get_string(p, jf, "pattern", where, 0);
    if (pattern != NULL) {
        if (f->type != OT_STRING) {
            problem(p, "%s: a pattern applies to strings", where);
        } else {
            f->pattern = xcalloc(1, sizeof(regex_t));
            if (regcomp(f->pattern, pattern, REG_EXTENDED | REG_NOSUB) != 0) {
                problem(p, "%s: pattern is not a POSIX extended regular expression", where);
                free(f->pattern);
                f->pattern = NULL;
            }
        }
    }
    f->items = get_strings(p, jf, "items", where, &f->n_items);
    if (f->n_items == 0)
        problem(p, "%s: items must name at least one item of the bundle", where);
    for (size_t i = 0; i < f->n_items; ++i) {
        int found = 0;
        for (size_t k = 0; k < b->n_items && !found; ++k)
            found = b->items[k].item != NULL && strcmp(b->items[k].item->code, f->items[i]) == 0;
        if (!found)
            problem(p, "%s: item %s is not an item of the bundle", where, f->items[i]);
    }
    f->prefill = get_strings(p, jf, "prefill", where, &f->n_prefill);
    for (size_t i = 0; i < f->n_prefill; ++i) {
        const char *key = f->prefill[i];
        if (strncmp(key, "licence:", 8) == 0) {
            const char *dot = strchr(key + 8, '.');
            char code[40];
            size_t n = dot != NULL ? (size_t)(dot - key - 8) : 0;
            if (dot == NULL || n == 0 || n >= sizeof(code) || !field_name_ok(dot + 1)) {
                problem(p, "%s: prefill \"%s\" must be licence:<ITEM>.<field>", where, key);
                continue;
            }
            memcpy(code, key + 8, n);
            code[n] = '\0';
            if (ot_catalog_item_by_code(cat, code) == NULL)
                problem(p, "%s: prefill \"%s\" names an unknown item", where, key);
            b->datasets |= OT_DS_LICENCES;
            continue;
        }
        const fact_t *fact = fact_find(key);
        if (fact == NULL) {
            problem(p, "%s: unknown prefill key \"%s\"", where, key);
            continue;
        }
        if (fact->sealed_type >= 0 && (int)f->type != fact->sealed_type)
            problem(p, "%s: prefill \"%s\" fills only a %s field", where, key, type_names[fact->sealed_type]);
        if (fact->sealed_type < 0 && (f->type == OT_ID_NUMBER || f->type == OT_PHONE))
            problem(p, "%s: prefill \"%s\" is not a %s", where, key, f->type_name);
        b->datasets |= fact->datasets;
    }
}

static void parse_bundle(parse_t *p, ot_catalog_t *cat, json_t *jb, size_t index, ot_bundle_t *b)
{
    char where[96];
    snprintf(where, sizeof(where), "bundles[%zu]", index);
    if (!json_is_object(jb)) {
        problem(p, "%s: must be an object", where);
        return;
    }
    static const char *const known[] = {"code",         "name",  "description", "precheck",
                                        "consent_text", "items", "form",        NULL};
    check_keys(p, jb, where, known);
    b->code = get_string(p, jb, "code", where, 1);
    if (b->code == NULL)
        b->code = "";
    else if (!bundle_code_ok(b->code))
        problem(p, "%s: code \"%s\" must be 2-32 of a-z 0-9 _ starting with a letter", where, b->code);
    else
        snprintf(where, sizeof(where), "bundle %s", b->code);
    b->name = get_string(p, jb, "name", where, 1);
    b->description = get_string(p, jb, "description", where, 0);
    b->consent_text = get_string(p, jb, "consent_text", where, 1);
    const char *precheck = get_string(p, jb, "precheck", where, 1);
    const needs_t *needs = NULL;
    if (precheck != NULL) {
        size_t k = 0;
        while (k < sizeof(prechecks) / sizeof(prechecks[0]) && strcmp(prechecks[k].name, precheck) != 0)
            ++k;
        if (k == sizeof(prechecks) / sizeof(prechecks[0])) {
            problem(p, "%s: unknown precheck \"%s\" (none, birth, business_opening, retirement)", where, precheck);
        } else {
            b->precheck = prechecks[k].kind;
            needs = prechecks[k].needs;
        }
    }

    json_t *items = json_object_get(jb, "items");
    if (!json_is_array(items) || json_array_size(items) == 0 || json_array_size(items) > 64) {
        problem(p, "%s: items must be an array of 1 to 64 items", where);
        items = NULL;
    }
    b->items = xcalloc(items != NULL ? json_array_size(items) : 0, sizeof(*b->items));
    size_t i;
    json_t *ji;
    if (items != NULL) {
        json_array_foreach(items, i, ji)
        {
            ot_bundle_item_t *bi = &b->items[b->n_items];
            static const char *const iknown[] = {"code", "depends_on", NULL};
            if (!json_is_object(ji)) {
                problem(p, "%s: items[%zu] must be an object", where, i);
                continue;
            }
            check_keys(p, ji, where, iknown);
            const char *code = get_string(p, ji, "code", where, 1);
            if (code == NULL)
                continue;
            bi->item = ot_catalog_item_by_code(cat, code);
            if (bi->item == NULL) {
                problem(p, "%s: unknown item %s", where, code);
                continue;
            }
            for (size_t k = 0; k < b->n_items; ++k)
                if (b->items[k].item == bi->item)
                    problem(p, "%s: item %s is listed twice", where, code);
            bi->depends_on = get_strings(p, ji, "depends_on", where, &bi->n_depends_on);
            ++b->n_items;
        }
    }
    /* dependencies name items of this bundle, and the graph has no cycle (Kahn's algorithm) */
    int *indegree = xcalloc(b->n_items, sizeof(int));
    for (size_t k = 0; k < b->n_items; ++k) {
        for (size_t d = 0; d < b->items[k].n_depends_on; ++d) {
            const char *dep = b->items[k].depends_on[d];
            size_t m = 0;
            while (m < b->n_items && strcmp(b->items[m].item->code, dep) != 0)
                ++m;
            if (m == b->n_items)
                problem(p, "%s: %s depends on %s, which is not an item of the bundle", where, b->items[k].item->code,
                        dep);
            else if (m == k)
                problem(p, "%s: %s depends on itself", where, dep);
            else
                ++indegree[k];
        }
    }
    size_t done = 0;
    int progress = 1;
    char *ready = xcalloc(b->n_items, 1);
    while (progress) {
        progress = 0;
        for (size_t k = 0; k < b->n_items; ++k) {
            if (ready[k] || indegree[k] != 0)
                continue;
            ready[k] = 1;
            ++done;
            progress = 1;
            for (size_t m = 0; m < b->n_items; ++m)
                for (size_t d = 0; d < b->items[m].n_depends_on; ++d)
                    if (strcmp(b->items[m].depends_on[d], b->items[k].item->code) == 0 && indegree[m] > 0)
                        --indegree[m];
        }
    }
    if (done < b->n_items)
        problem(p, "%s: the dependencies form a cycle", where);
    free(ready);
    free(indegree);

    json_t *form = json_object_get(jb, "form");
    if (!json_is_array(form) || json_array_size(form) == 0 || json_array_size(form) > 128) {
        problem(p, "%s: form must be an array of 1 to 128 fields", where);
        form = NULL;
    }
    b->fields = xcalloc(form != NULL ? json_array_size(form) : 0, sizeof(*b->fields));
    if (form != NULL) {
        json_array_foreach(form, i, ji)
        {
            ot_field_t *f = &b->fields[b->n_fields++];
            parse_field(p, cat, b, ji, i, f);
            for (size_t k = 0; f->name != NULL && k + 1 < b->n_fields; ++k)
                if (b->fields[k].name != NULL && strcmp(b->fields[k].name, f->name) == 0)
                    problem(p, "%s: field %s is listed twice", where, f->name);
        }
    }
    /* every item is fed by at least one field */
    for (size_t k = 0; k < b->n_items; ++k) {
        int used = 0;
        for (size_t m = 0; m < b->n_fields && !used; ++m)
            for (size_t n = 0; n < b->fields[m].n_items && !used; ++n)
                used = strcmp(b->fields[m].items[n], b->items[k].item->code) == 0;
        if (!used)
            problem(p, "%s: no field of the form is used by item %s", where, b->items[k].item->code);
    }
    for (const needs_t *n = needs; n != NULL && n->field != NULL; ++n) {
        const ot_field_t *f = ot_bundle_field(b, n->field);
        if (f == NULL) {
            if (n->required)
                problem(p, "%s: precheck %s needs a field %s (%s)", where, precheck, n->field, type_names[n->type]);
            continue;
        }
        if (f->type != n->type)
            problem(p, "%s: precheck %s needs %s to be a %s", where, precheck, n->field, type_names[n->type]);
        if (strcmp(n->field, "child.sex") == 0 && !(f->n_options == 2 && has_option(f, "M") && has_option(f, "F")))
            problem(p, "%s: child.sex must have the options M and F", where);
        if (strcmp(n->field, "hukou.follow") == 0 && !(has_option(f, "mother") && has_option(f, "father")))
            problem(p, "%s: hukou.follow must have the options mother and father", where);
        if (strcmp(n->field, "retiree.category") == 0 && !(has_option(f, "worker") && has_option(f, "cadre")))
            problem(p, "%s: retiree.category must have the options worker and cadre", where);
    }
}

/* The protobuf BundleList of GET /v1/onething/bundles, allocated for the life of the catalog. */
static void build_bundle_list(ot_catalog_t *cat, ch_arena_t *arena)
{
    ProtobufCAllocator *a = ch_arena_allocator(arena);
#define NEW(T) ((T *)a->alloc(a->allocator_data, sizeof(T)))
    BundleList *list = NEW(BundleList);
    cityhall__onething__v1__bundle_list__init(list);
    list->n_bundles = cat->n_bundles;
    list->bundles = a->alloc(a->allocator_data, (cat->n_bundles + 1) * sizeof(Bundle *));
    for (size_t i = 0; i < cat->n_bundles; ++i) {
        const ot_bundle_t *b = &cat->bundles[i];
        Bundle *pb = NEW(Bundle);
        cityhall__onething__v1__bundle__init(pb);
        pb->code = (char *)b->code;
        pb->name = (char *)b->name;
        pb->description = (char *)(b->description != NULL ? b->description : "");
        pb->catalog_version = cat->version;
        pb->n_items = b->n_items;
        pb->items = a->alloc(a->allocator_data, (b->n_items + 1) * sizeof(ServiceItem *));
        for (size_t k = 0; k < b->n_items; ++k) {
            const ot_item_t *it = b->items[k].item;
            ServiceItem *si = NEW(ServiceItem);
            cityhall__onething__v1__service_item__init(si);
            si->item_code = (char *)it->code;
            si->name = (char *)it->name;
            si->department = (char *)it->department;
            si->legal_days = it->legal_days;
            si->promised_days = it->promised_days;
            si->n_depends_on = b->items[k].n_depends_on;
            si->depends_on = (char **)b->items[k].depends_on;
            si->n_materials = it->n_materials;
            si->materials = (char **)it->materials;
            pb->items[k] = si;
        }
        list->bundles[i] = pb;
    }
    cat->bundle_list = &list->base;
#undef NEW
}

ot_catalog_t *ot_catalog_parse(const char *json, size_t len, int version, ch_buf_t *errors)
{
    parse_t p = {errors, 0};
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        problem(&p, "not valid JSON (line %d, column %d): %s", jerr.line, jerr.column, jerr.text);
        if (errors != NULL)
            ch_buf_append(errors, "", 1);
        return NULL;
    }
    ot_catalog_t *cat = xcalloc(1, sizeof(*cat));
    cat->version = version;
    cat->root = root;
    if (!json_is_object(root)) {
        problem(&p, "the catalog must be a JSON object");
        goto out;
    }
    static const char *const known[] = {"title", "departments", "items", "bundles", NULL};
    check_keys(&p, root, "catalog", known);

    /* departments */
    json_t *depts = json_object_get(root, "departments");
    size_t ndepts = json_is_array(depts) ? json_array_size(depts) : 0;
    if (!json_is_array(depts) || ndepts == 0)
        problem(&p, "departments must be a non-empty array of {code, name}");
    const char **dept_codes = xcalloc(ndepts + 1, sizeof(char *));
    size_t i;
    json_t *e;
    if (json_is_array(depts)) {
        json_array_foreach(depts, i, e)
        {
            char where[64];
            snprintf(where, sizeof(where), "departments[%zu]", i);
            static const char *const dknown[] = {"code", "name", NULL};
            if (!json_is_object(e)) {
                problem(&p, "%s: must be an object", where);
                continue;
            }
            check_keys(&p, e, where, dknown);
            const char *code = get_string(&p, e, "code", where, 1);
            get_string(&p, e, "name", where, 1);
            if (code == NULL)
                continue;
            if (!dept_ok(code))
                problem(&p, "%s: code \"%s\" must be 1-64 of a-z 0-9 -", where, code);
            for (size_t k = 0; k < i; ++k)
                if (dept_codes[k] != NULL && strcmp(dept_codes[k], code) == 0)
                    problem(&p, "%s: department %s is listed twice", where, code);
            dept_codes[i] = code;
        }
    }

    /* items */
    json_t *items = json_object_get(root, "items");
    if (!json_is_array(items) || json_array_size(items) == 0) {
        problem(&p, "items must be a non-empty array");
        items = NULL;
    }
    cat->items = xcalloc(items != NULL ? json_array_size(items) : 0, sizeof(*cat->items));
    if (items != NULL) {
        json_array_foreach(items, i, e)
        {
            char where[64];
            snprintf(where, sizeof(where), "items[%zu]", i);
            if (!json_is_object(e)) {
                problem(&p, "%s: must be an object", where);
                continue;
            }
            static const char *const iknown[] = {"code",          "name",      "department", "legal_days",
                                                 "promised_days", "materials", NULL};
            check_keys(&p, e, where, iknown);
            ot_item_t *it = &cat->items[cat->n_items];
            it->code = get_string(&p, e, "code", where, 1);
            if (it->code == NULL)
                continue;
            if (!item_code_ok(it->code))
                problem(&p, "%s: code \"%s\" must be 2-32 of A-Z 0-9 _ starting with a letter", where, it->code);
            snprintf(where, sizeof(where), "item %s", it->code);
            if (ot_catalog_item_by_code(cat, it->code) != NULL)
                problem(&p, "%s: listed twice", where);
            it->name = get_string(&p, e, "name", where, 1);
            it->department = get_string(&p, e, "department", where, 1);
            if (it->department != NULL) {
                int known_dept = 0;
                for (size_t k = 0; k < ndepts && !known_dept; ++k)
                    known_dept = dept_codes[k] != NULL && strcmp(dept_codes[k], it->department) == 0;
                if (!known_dept)
                    problem(&p, "%s: department %s is not in departments", where, it->department);
            } else {
                it->department = "";
            }
            if (it->name == NULL)
                it->name = "";
            long long legal = 0, promised = 0;
            if (get_int(&p, e, "legal_days", where, 1, 365, &legal) == 0)
                problem(&p, "%s: \"legal_days\" is required", where);
            if (get_int(&p, e, "promised_days", where, 0, 365, &promised) == 0)
                problem(&p, "%s: \"promised_days\" is required", where);
            if (promised > legal)
                problem(&p, "%s: promised_days is more than legal_days", where);
            it->legal_days = (int)legal;
            it->promised_days = (int)promised;
            it->materials = get_strings(&p, e, "materials", where, &it->n_materials);
            ++cat->n_items;
        }
    }
    free(dept_codes);

    /* bundles */
    json_t *bundles = json_object_get(root, "bundles");
    if (!json_is_array(bundles) || json_array_size(bundles) == 0) {
        problem(&p, "bundles must be a non-empty array");
        bundles = NULL;
    }
    cat->bundles = xcalloc(bundles != NULL ? json_array_size(bundles) : 0, sizeof(*cat->bundles));
    if (bundles != NULL) {
        json_array_foreach(bundles, i, e)
        {
            ot_bundle_t *b = &cat->bundles[cat->n_bundles++];
            parse_bundle(&p, cat, e, i, b);
            for (size_t k = 0; k + 1 < cat->n_bundles; ++k)
                if (b->code[0] != '\0' && strcmp(cat->bundles[k].code, b->code) == 0)
                    problem(&p, "bundle %s: listed twice", b->code);
        }
    }
out:
    if (errors != NULL)
        ch_buf_append(errors, "", 1);
    if (p.n > 0) {
        ot_catalog_free(cat);
        return NULL;
    }
    cat->arena = ch_arena_new();
    build_bundle_list(cat, cat->arena);
    return cat;
}

void ot_catalog_free(ot_catalog_t *cat)
{
    if (cat == NULL)
        return;
    for (size_t i = 0; i < cat->n_items; ++i)
        free(cat->items[i].materials);
    free(cat->items);
    for (size_t i = 0; i < cat->n_bundles; ++i) {
        ot_bundle_t *b = &cat->bundles[i];
        for (size_t k = 0; k < b->n_items; ++k)
            free(b->items[k].depends_on);
        free(b->items);
        for (size_t k = 0; k < b->n_fields; ++k) {
            ot_field_t *f = &b->fields[k];
            free(f->options);
            free(f->prefill);
            free(f->items);
            if (f->pattern != NULL) {
                regfree(f->pattern);
                free(f->pattern);
            }
        }
        free(b->fields);
    }
    free(cat->bundles);
    if (cat->arena != NULL)
        ch_arena_free(cat->arena);
    json_decref(cat->root);
    free(cat);
}

const ot_item_t *ot_catalog_item_by_code(const ot_catalog_t *cat, const char *code)
{
    for (size_t i = 0; i < cat->n_items; ++i)
        if (cat->items[i].code != NULL && strcmp(cat->items[i].code, code) == 0)
            return &cat->items[i];
    return NULL;
}

const ot_bundle_t *ot_catalog_bundle(const ot_catalog_t *cat, const char *code)
{
    for (size_t i = 0; i < cat->n_bundles; ++i)
        if (strcmp(cat->bundles[i].code, code) == 0)
            return &cat->bundles[i];
    return NULL;
}

const ot_field_t *ot_bundle_field(const ot_bundle_t *b, const char *name)
{
    for (size_t i = 0; i < b->n_fields; ++i)
        if (b->fields[i].name != NULL && strcmp(b->fields[i].name, name) == 0)
            return &b->fields[i];
    return NULL;
}

/* ---- the process-wide cache ---- */

#define CACHE_MAX 64

/* Guards `cached`; a catalog, once in the table, is immutable and never freed, so readers use it unlocked. */
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static const ot_catalog_t *cached[CACHE_MAX];
static int active_hint;

const ot_catalog_t *ot_catalog_cached(int version)
{
    const ot_catalog_t *cat = NULL;
    pthread_mutex_lock(&cache_lock);
    for (size_t i = 0; i < CACHE_MAX && cached[i] != NULL && cat == NULL; ++i)
        if (cached[i]->version == version)
            cat = cached[i];
    pthread_mutex_unlock(&cache_lock);
    return cat;
}

const ot_catalog_t *ot_catalog_cache(int version, const char *json, size_t len)
{
    const ot_catalog_t *cat = ot_catalog_cached(version);
    if (cat != NULL)
        return cat;
    /* parsed outside the lock: two threads may both parse a new version; the first one in is kept */
    ot_catalog_t *mine = ot_catalog_parse(json, len, version, NULL);
    if (mine == NULL)
        return NULL;
    pthread_mutex_lock(&cache_lock);
    size_t i = 0;
    while (i < CACHE_MAX && cached[i] != NULL && cached[i]->version != version)
        ++i;
    if (i < CACHE_MAX && cached[i] == NULL) {
        cached[i] = mine;
        cat = mine;
        mine = NULL;
    } else if (i < CACHE_MAX) {
        cat = cached[i];
    } else {
        /* more versions than slots in one process's life: serve it uncached (it is leaked, rarely) */
        cat = mine;
        mine = NULL;
    }
    pthread_mutex_unlock(&cache_lock);
    ot_catalog_free(mine);
    return cat;
}

int ot_catalog_active_hint(void)
{
    return __atomic_load_n(&active_hint, __ATOMIC_RELAXED);
}

void ot_catalog_set_active_hint(int version)
{
    __atomic_store_n(&active_hint, version, __ATOMIC_RELAXED);
}

/* ---- dates ---- */

static long days_from_civil(int y, int m, int d)
{
    y -= m <= 2;
    long era = (y >= 0 ? y : y - 399) / 400;
    long yoe = y - era * 400;
    long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

long ot_date_days(const char *s)
{
    if (strlen(s) != 10 || s[4] != '-' || s[7] != '-')
        return -1;
    for (int i = 0; i < 10; ++i)
        if (i != 4 && i != 7 && (s[i] < '0' || s[i] > '9'))
            return -1;
    int y = atoi(s), m = atoi(s + 5), d = atoi(s + 8);
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1900 || y > 2100 || m < 1 || m > 12 || d < 1)
        return -1;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > mdays[m - 1] + (m == 2 && leap))
        return -1;
    return days_from_civil(y, m, d);
}

void ot_civil_from_days(long z, int *y, int *m, int *d)
{
    z += 719468;
    long era = (z >= 0 ? z : z - 146096) / 146097;
    long doe = z - era * 146097;
    long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    long mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = (int)(yoe + era * 400 + (*m <= 2));
}

long ot_days_from_civil(int y, int m, int d)
{
    return days_from_civil(y, m, d);
}

long ot_today_cst(void)
{
    return (long)((time(NULL) + 8 * 3600) / 86400);
}

/* ---- field values ---- */

/* Code points of valid UTF-8 without control characters, or -1. */
static long text_chars(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    long chars = 0;
    while (p < end) {
        unsigned c = *p;
        int k = c < 0x80                 ? 0
                : c >= 0xC2 && c <= 0xDF ? 1
                : c >= 0xE0 && c <= 0xEF ? 2
                : c >= 0xF0 && c <= 0xF4 ? 3
                                         : -1;
        if (k < 0 || (k == 0 && (c < 0x20 || c == 0x7f)) || end - p <= k)
            return -1;
        for (int i = 1; i <= k; ++i)
            if ((p[i] & 0xC0) != 0x80)
                return -1;
        if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] > 0x9F) || (c == 0xF0 && p[1] < 0x90) ||
            (c == 0xF4 && p[1] > 0x8F))
            return -1;
        p += k + 1;
        ++chars;
    }
    return chars;
}

const char *ot_field_check(ch_call_t *call, const ot_field_t *f, const char *value, const char **out)
{
    const char *s = value;
    while (*s == ' ')
        ++s;
    size_t n = strlen(s);
    while (n > 0 && s[n - 1] == ' ')
        --n;
    long chars = text_chars(s, n);
    if (chars < 0)
        return "must be UTF-8 text without control characters";
    char *v = ch_call_alloc(call, n + 1);
    memcpy(v, s, n);
    v[n] = '\0';
    *out = v;
    switch (f->type) {
    case OT_STRING:
        if (chars > f->max_len)
            return ch_call_printf(call, "at most %ld characters", f->max_len);
        if (f->pattern != NULL && regexec(f->pattern, v, 0, NULL, 0) != 0)
            return "does not have the expected format";
        return NULL;
    case OT_DATE: {
        long d = ot_date_days(v);
        if (d < 0)
            return "must be a date YYYY-MM-DD";
        if (f->not_future && d > ot_today_cst())
            return "must not be in the future";
        if (f->not_past && d < ot_today_cst())
            return "must not be in the past";
        return NULL;
    }
    case OT_ID_NUMBER: {
        if (n == 18 && v[17] == 'x')
            v[17] = 'X';
        const char *why = "must be 18 characters";
        if (n == 18 && ch_id_number_check(v, &why) == 0)
            return NULL;
        return why;
    }
    case OT_ENUM:
        for (size_t i = 0; i < f->n_options; ++i)
            if (strcmp(f->options[i], v) == 0)
                return NULL;
        return "is not one of the options";
    case OT_PHONE:
        return ch_phone_check(v) == 0 ? NULL : "must be an 11-digit mainland mobile number";
    case OT_BOOL:
        return strcmp(v, "true") == 0 || strcmp(v, "false") == 0 ? NULL : "must be true or false";
    case OT_INT: {
        const char *d = v[0] == '-' ? v + 1 : v;
        size_t digits = strspn(d, DIGITS);
        if (digits == 0 || digits > 13 || d[digits] != '\0')
            return "must be a whole number";
        long long x = strtoll(v, NULL, 10);
        if (x < f->min || x > f->max)
            return ch_call_printf(call, "must be from %lld to %lld", f->min, f->max);
        return NULL;
    }
    }
    return "unknown type";
}

/* ---- `cityhall catalog load FILE.json` ---- */

static int exec_ok(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
    if (!ok)
        fprintf(stderr, "catalog load: %s", PQerrorMessage(conn));
    PQclear(res);
    return ok;
}

/*
 * Checks the file with the same parser the gateway uses, then, in one transaction under an advisory lock,
 * inserts it as the next version and makes it the only active one. A file identical (as jsonb) to the active
 * version changes nothing. Applications keep the version they were submitted under; new submissions, forms and
 * bundle lists use the new one from the next request on.
 */
int ot_cmd_catalog_load(const ch_config_t *config, int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: cityhall catalog load FILE.json\n");
        return 2;
    }
    FILE *fp = fopen(argv[1], "rb");
    if (fp == NULL) {
        fprintf(stderr, "catalog load: could not open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    ch_buf_t text = {0};
    char chunk[65536];
    size_t got;
    while ((got = fread(chunk, 1, sizeof(chunk), fp)) > 0 && text.len < 16 * 1024 * 1024)
        ch_buf_append(&text, chunk, got);
    int read_error = ferror(fp);
    fclose(fp);
    if (read_error || text.len == 0 || text.len >= 16 * 1024 * 1024) {
        fprintf(stderr, "catalog load: could not read %s (or it is empty, or larger than 16 MiB)\n", argv[1]);
        ch_buf_free(&text);
        return 1;
    }
    ch_buf_t errors = {0};
    ot_catalog_t *cat = ot_catalog_parse(text.base, text.len, 0, &errors);
    if (cat == NULL) {
        fprintf(stderr, "%scatalog load: %s is not a valid catalog: nothing loaded\n", errors.base, argv[1]);
        ch_buf_free(&errors);
        ch_buf_free(&text);
        return 1;
    }
    ch_buf_free(&errors);
    size_t nbundles = cat->n_bundles, nitems = cat->n_items;
    ot_catalog_free(cat);

    PGconn *conn = PQconnectdb(config->pg_conninfo);
    int ret = 1;
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "catalog load: could not connect to PostgreSQL: %s", PQerrorMessage(conn));
        goto out;
    }
    if (!exec_ok(conn, "BEGIN") || !exec_ok(conn, "SELECT pg_advisory_xact_lock(7243008)"))
        goto out;
    const char *base = strrchr(argv[1], '/');
    const char *v[2] = {text.base, base != NULL ? base + 1 : argv[1]};
    PGresult *res = PQexecParams(conn,
                                 "SELECT coalesce(max(version), 0), "
                                 "       coalesce(bool_or(active AND catalog = $1::jsonb), false), "
                                 "       max(version) FILTER (WHERE active) "
                                 "FROM catalog_versions",
                                 1, NULL, v, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "catalog load: %s", PQerrorMessage(conn));
        PQclear(res);
        goto out;
    }
    int next = atoi(PQgetvalue(res, 0, 0)) + 1, same = PQgetvalue(res, 0, 1)[0] == 't';
    char active[16];
    snprintf(active, sizeof(active), "%s", PQgetvalue(res, 0, 2));
    PQclear(res);
    if (same) {
        exec_ok(conn, "ROLLBACK");
        printf("catalog load: %s is already the active catalog (version %s): nothing to do\n", argv[1], active);
        ret = 0;
        goto out;
    }
    char version[16];
    snprintf(version, sizeof(version), "%d", next);
    const char *w[3] = {version, text.base, v[1]};
    if (!exec_ok(conn, "UPDATE catalog_versions SET active = false WHERE active"))
        goto out;
    res = PQexecParams(
        conn, "INSERT INTO catalog_versions (version, catalog, active, source) VALUES ($1::int, $2::jsonb, true, $3)",
        3, NULL, w, NULL, NULL, 0);
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok)
        fprintf(stderr, "catalog load: %s", PQerrorMessage(conn));
    PQclear(res);
    if (!ok || !exec_ok(conn, "COMMIT"))
        goto out;
    printf("catalog load: version %d is active (%zu bundles, %zu items); applications keep the version they were "
           "submitted under\n",
           next, nbundles, nitems);
    ret = 0;
out:
    if (ret != 0 && PQstatus(conn) == CONNECTION_OK)
        PQclear(PQexec(conn, "ROLLBACK"));
    PQfinish(conn);
    ch_buf_free(&text);
    return ret;
}
