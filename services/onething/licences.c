/* E-licences (电子证照): issuing a signed licence when an item is approved, and the holder's list. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include "cityhall/jws.h"
#include "cityhall/pii.h"
#include "dispatch.h"
#include "gateway.h" /* ch_log */

typedef Cityhall__Onething__V1__Licence Licence;
typedef Cityhall__Onething__V1__LicenceList LicenceList;
typedef Google__Protobuf__Timestamp Timestamp;

/*
 * A licence is a compact JWS (ES256, typ "licence+jwt") signed with the licence ring <var>/keys/licence, whose
 * claims are the licence's facts: iss "cityhall", sub the licence id, lno the number, type the item code, name,
 * holder (masked name), issuer (department), iat, exp (= valid until) and data, the non-sensitive facts that later
 * items consume (no ID or phone number ever: the values of fields typed id_number or phone are left out). The row
 * in `licences` keeps the same facts for queries and the signature for anyone who shows the licence.
 */

#define LICENCE_TYP "licence+jwt"

static ch_keyring_t *licence_ring;

/* True when `dir` holds at least one <kid>.pem. */
static int ring_has_key(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return 0;
    struct dirent *de;
    int found = 0;
    while (!found && (de = readdir(d)) != NULL) {
        size_t n = strlen(de->d_name);
        found = n > 4 && strcmp(de->d_name + n - 4, ".pem") == 0;
    }
    closedir(d);
    return found;
}

int ot_licences_init(const ch_config_t *config)
{
    char dir[600], kid[64], err[512];
    snprintf(dir, sizeof(dir), "%s/keys/licence", config->var_dir);
    if (!ring_has_key(dir)) {
        if (ch_keyring_rotate(dir, kid, sizeof(kid), err, sizeof(err)) != 0) {
            ch_log(CH_LOG_ERROR, "startup_failed", "onething licences: could not create a signing key: %s", err);
            return -1;
        }
        ch_log(CH_LOG_INFO, "licence_key_created", "licence signing key %s created in %s", kid, dir);
    }
    licence_ring = ch_keyring_load(dir, err, sizeof(err));
    if (licence_ring == NULL) {
        ch_log(CH_LOG_ERROR, "startup_failed", "onething licences: %s", err);
        return -1;
    }
    return 0;
}

/* How long a licence of each item type is valid; unknown types get DEFAULT_YEARS. */
#define DEFAULT_YEARS 10
static const struct {
    const char *type;
    int years;
} validity[] = {
    {"BIRTH_CERT", 100},   /* 出生医学证明: for life */
    {"HUKOU_REG", 100},    /* 户口登记 */
    {"VACCINE_CERT", 100}, /* 预防接种证 */
    {"SOCIAL_CARD", 10},   /* 社会保障卡 */
    {"MED_INS", 1},        /* 医保参保登记: renewed yearly */
    {"MATERNITY", 1},      /* 生育津贴 decision */
    {"BIZ_REG", 100},      /* business licence: long-term */
    {"SEAL", 100},         {"TAX_REG", 100},
};

static int validity_years(const char *type)
{
    for (size_t i = 0; i < sizeof(validity) / sizeof(validity[0]); ++i)
        if (strcmp(validity[i].type, type) == 0)
            return validity[i].years;
    return DEFAULT_YEARS;
}

/* `t` + `years` calendar years (UTC; 29 February becomes 28 February off leap years). */
static int64_t add_years(int64_t t, int years)
{
    time_t tt = (time_t)t;
    struct tm tm;
    gmtime_r(&tt, &tm);
    int leap_day = tm.tm_mon == 1 && tm.tm_mday == 29;
    tm.tm_year += years;
    if (leap_day) {
        int y = tm.tm_year + 1900;
        if (!((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
            tm.tm_mday = 28;
    }
    return (int64_t)timegm(&tm);
}

static void uuid4(char out[37])
{
    unsigned char u[16];
    if (getrandom(u, sizeof(u), 0) != sizeof(u))
        abort();
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3],
             u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

int ot_licence_issue(ch_call_t *call, const char *type, const char *name, const char *issuer, const char *holder_name,
                     long long seq, const char *dept_number, json_t *fields, ot_licence_t *out)
{
    if (licence_ring == NULL)
        return CH_EINVAL;
    memset(out, 0, sizeof(*out));
    uuid4(out->licence_id);
    out->issued_at = (int64_t)time(NULL);
    out->valid_until = add_years(out->issued_at, validity_years(type));
    if (dept_number != NULL && dept_number[0] != '\0') {
        snprintf(out->number, sizeof(out->number), "%s", dept_number);
    } else {
        time_t now = (time_t)out->issued_at;
        struct tm tm;
        localtime_r(&now, &tm);
        snprintf(out->number, sizeof(out->number), "%.40s-%04d-%06lld", type, tm.tm_year + 1900, seq);
    }
    char masked[64];
    ch_name_mask(holder_name != NULL ? holder_name : "", masked, sizeof(masked));

    json_t *data = json_deep_copy(fields != NULL ? fields : json_object());
    if (data == NULL)
        abort();
    json_object_set_new(data, "licence_number", json_string(out->number));
    json_t *claims =
        json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:I, s:I, s:O}", "iss", "cityhall", "sub", out->licence_id,
                  "lno", out->number, "type", type, "name", name, "holder", masked, "issuer", issuer, "iat",
                  (json_int_t)out->issued_at, "exp", (json_int_t)out->valid_until, "data", data);
    if (claims == NULL)
        abort();
    char *cj = json_dumps(claims, JSON_COMPACT);
    char *dj = json_dumps(data, JSON_COMPACT);
    json_decref(claims);
    json_decref(data);
    if (cj == NULL || dj == NULL)
        abort();
    ch_buf_t jws = {0};
    int ret = ch_jws_sign(licence_ring, LICENCE_TYP, cj, strlen(cj), &jws);
    if (ret == 0) {
        out->signature = ch_call_strdup(call, jws.base);
        out->data_json = ch_call_strdup(call, dj);
    }
    ch_buf_free(&jws);
    free(cj);
    free(dj);
    return ret;
}

/* ---- GET /v1/me/licences ---- */

#define LICENCES_MAX 200

const ch_pg_stmt_t ot_stmt_licences = {
    "ot_licences",
    "SELECT l.licence_id, l.licence_number, l.type, coalesce(ot_item_name(a.catalog_version, l.type), l.type), "
    "       r.name, l.issuer, floor(extract(epoch FROM l.issued_at))::bigint, floor(extract(epoch FROM "
    "l.valid_until))::bigint, "
    "       l.signature "
    "FROM licences l LEFT JOIN application_items i ON i.item_id = l.item_id "
    "     LEFT JOIN applications a ON a.application_id = i.application_id "
    "     LEFT JOIN registry_residents r ON r.resident_id = l.holder_resident_id "
    "WHERE l.holder_citizen_id = $1::uuid ORDER BY l.issued_at DESC, l.licence_id LIMIT 200",
    1};

static Timestamp *ts_at(ch_call_t *call, int64_t s)
{
    Timestamp *t = ch_call_alloc(call, sizeof(*t));
    google__protobuf__timestamp__init(t);
    t->seconds = s;
    return t;
}

static void on_licences(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    int n = PQntuples(res);
    LicenceList *list = ch_call_alloc(call, sizeof(*list));
    cityhall__onething__v1__licence_list__init(list);
    list->n_licences = (size_t)n;
    list->licences = ch_call_alloc(call, sizeof(Licence *) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; ++i) {
        Licence *l = ch_call_alloc(call, sizeof(*l));
        cityhall__onething__v1__licence__init(l);
        l->licence_id = ch_call_strdup(call, PQgetvalue(res, i, 0));
        l->licence_number = ch_call_strdup(call, PQgetvalue(res, i, 1));
        l->type = ch_call_strdup(call, PQgetvalue(res, i, 2));
        l->name = ch_call_strdup(call, PQgetvalue(res, i, 3));
        char masked[64] = "";
        if (!PQgetisnull(res, i, 4))
            ch_name_mask(PQgetvalue(res, i, 4), masked, sizeof(masked));
        l->holder_masked_name = ch_call_strdup(call, masked);
        l->issuer = ch_call_strdup(call, PQgetvalue(res, i, 5));
        l->issued_at = ts_at(call, strtoll(PQgetvalue(res, i, 6), NULL, 10));
        l->valid_until = ts_at(call, strtoll(PQgetvalue(res, i, 7), NULL, 10));
        l->signature = ch_call_strdup(call, PQgetvalue(res, i, 8));
        list->licences[i] = l;
    }
    ch_reply(call, 200, &list->base);
}

void ot_licences(ch_call_t *call)
{
    const ch_principal_t *p = ch_call_principal(call);
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = p->subject;
    ch_pg_query_t q = {&ot_stmt_licences, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_licences);
    if (ret != 0)
        ch_fail_err(call, ret);
}
