/* What the applications engineer's files share: the parsed catalog, field checks, and the datasets commands. */
#ifndef ONETHING_CATALOG_H
#define ONETHING_CATALOG_H

#include <regex.h>
#include <stddef.h>
#include <jansson.h>
#include "onething.h"
#include "cityhall/transcode.h"

/* ---- catalog.c: one catalog version, parsed and checked (immutable once built) ---- */

typedef enum ot_type {
    OT_STRING,
    OT_DATE,
    OT_ID_NUMBER,
    OT_ENUM,
    OT_PHONE,
    OT_BOOL,
    OT_INT,
} ot_type_t;

/** The automatic pre-checks the gateway knows; a bundle names one ("none" for no pre-check). */
typedef enum ot_precheck {
    OT_PRECHECK_NONE,
    OT_PRECHECK_BIRTH,
    OT_PRECHECK_BUSINESS,
    OT_PRECHECK_RETIREMENT,
} ot_precheck_t;

/** Datasets a form or a pre-check reads (bits), as named in the access log ("dataset.read:<name>"). */
enum {
    OT_DS_ACCOUNT = 1u << 0, /* the citizen's own account (phone): not logged, it is theirs */
    OT_DS_REGISTRY = 1u << 1,
    OT_DS_MARRIAGES = 1u << 2,
    OT_DS_BIRTH_RECORDS = 1u << 3,
    OT_DS_SOCIAL_INSURANCE = 1u << 4,
    OT_DS_BUSINESSES = 1u << 5,
    OT_DS_LICENCES = 1u << 6, /* the citizen's own e-licences: not logged */
    OT_DS__COUNT = 7,
};
/** The dataset name of bit index i ("registry", ...). */
const char *ot_dataset_name(unsigned i);
/** Whether reading the dataset of bit index i is written to the citizen's access log. */
int ot_dataset_logged(unsigned i);

typedef struct ot_item {
    const char *code, *name, *department;
    int legal_days, promised_days;
    const char **materials;
    size_t n_materials;
} ot_item_t;

typedef struct ot_field {
    const char *name, *label, *type_name;
    ot_type_t type;
    int required;
    const char **options;
    size_t n_options;
    const char **prefill; /* fact keys, in order of preference */
    size_t n_prefill;
    const char **items; /* item codes using the field */
    size_t n_items;
    long max_len;       /* characters (strings) */
    long long min, max; /* ints */
    int not_future, not_past;
    regex_t *pattern; /* strings: POSIX ERE the whole value must match, or NULL */
} ot_field_t;

typedef struct ot_bundle_item {
    const ot_item_t *item;
    const char **depends_on;
    size_t n_depends_on;
} ot_bundle_item_t;

typedef struct ot_bundle {
    const char *code, *name, *description, *consent_text;
    ot_precheck_t precheck;
    ot_bundle_item_t *items;
    size_t n_items;
    ot_field_t *fields;
    size_t n_fields;
    unsigned datasets; /* OT_DS_* the form's prefill reads */
} ot_bundle_t;

typedef struct ot_catalog {
    int version;
    json_t *root; /* owns every string above */
    ot_item_t *items;
    size_t n_items;
    ot_bundle_t *bundles;
    size_t n_bundles;
    ProtobufCMessage *bundle_list; /* GET /v1/onething/bundles, built once */
    ch_arena_t *arena;             /* what bundle_list is allocated from */
} ot_catalog_t;

/**
 * Parses and checks a catalog document: shape, unique codes, known departments, items of a bundle known and
 * listed once, dependencies inside the bundle and acyclic, field names, types and constraints, prefill keys
 * the gateway can fill, fields naming items of their bundle, what each pre-check needs. Returns the catalog,
 * or NULL with one problem per line appended to `errors` (NUL-terminated).
 */
ot_catalog_t *ot_catalog_parse(const char *json, size_t len, int version, ch_buf_t *errors);
void ot_catalog_free(ot_catalog_t *cat);
const ot_bundle_t *ot_catalog_bundle(const ot_catalog_t *cat, const char *code);
const ot_field_t *ot_bundle_field(const ot_bundle_t *b, const char *name);
const ot_item_t *ot_catalog_item_by_code(const ot_catalog_t *cat, const char *code);

/**
 * The process-wide cache of parsed versions (they never change once loaded): ot_catalog_cached returns one or NULL;
 * ot_catalog_cache parses `json` and keeps it (NULL if it does not parse). Safe from every thread.
 * ot_catalog_active_hint is the active version last seen by this process (0: none yet).
 */
const ot_catalog_t *ot_catalog_cached(int version);
const ot_catalog_t *ot_catalog_cache(int version, const char *json, size_t len);
int ot_catalog_active_hint(void);
void ot_catalog_set_active_hint(int version);

/**
 * Checks one form value and returns its normalised form (trimmed; a final x of an ID number upper-cased) in
 * `out` (call memory), or a reason (static text, never the value) when it is not acceptable. An empty value
 * is the caller's business (required or omitted).
 */
const char *ot_field_check(ch_call_t *call, const ot_field_t *f, const char *value, const char **out);

/** The datasets the prefill keys of `f` read (OT_DS_* bits). */
unsigned ot_prefill_datasets(const ot_field_t *f);

/** Days since 1970-01-01 of a YYYY-MM-DD date (1900-2100), or -1 when it is not one; today in China Standard Time. */
long ot_date_days(const char *s);
long ot_today_cst(void);
void ot_civil_from_days(long days, int *y, int *m, int *d);
long ot_days_from_civil(int y, int m, int d);

/* ---- datasets.c ---- */

/** GB 32100 unified social credit code check (18 characters, check character). 0 or CH_EINVAL. */
int ot_uscc_check(const char *uscc);

#endif
