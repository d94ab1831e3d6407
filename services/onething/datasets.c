/* Department datasets: `cityhall seed` (derived from the synthetic registry) and `cityhall import dataset NAME
 * FILE.csv`. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libpq-fe.h>
#include <openssl/crypto.h>
#include "catalog.h"
#include "cityhall/pii.h"
#include "cityhall/cmd.h"

/*
 * Both commands run off any event loop: blocking libpq. Datasets identify people by the keyed hash of their ID
 * number, the registry's id_hmac: the seed derives them from the registry without decrypting anything (it reads
 * id_hmac, sex, birth date and household), the importer hashes the numbers of its CSV file. Rows travel by COPY
 * into a staging table, then one INSERT ... SELECT per dataset (ON CONFLICT: the seed adds only what is missing,
 * an import updates what it names again). No raw ID number is sent to the database or printed, except the demo
 * people's on the operator's terminal (as identity's seed does).
 */

#define SEED_LOCK  "SELECT pg_advisory_lock(7243009)"
#define COPY_CHUNK (256 * 1024)
#define FETCH_ROWS 10000
#define REF_YEAR   2024        /* the synthetic registry's reference date is 2024-12-31 (services/identity/seed.c) */
#define NO_BIRTH   (-1000000L) /* a resident without a birth date (days since 1970 are negative before 1970) */

/* ---- blocking libpq helpers ---- */

/* Appends `s` escaped for COPY's text format ("" stays an empty string; NULL is \N). */
static void copy_text(ch_buf_t *out, const char *s)
{
    if (s == NULL) {
        ch_buf_append(out, "\\N", 2);
        return;
    }
    for (; *s != '\0'; ++s) {
        switch (*s) {
        case '\\':
            ch_buf_append(out, "\\\\", 2);
            break;
        case '\t':
            ch_buf_append(out, "\\t", 2);
            break;
        case '\n':
            ch_buf_append(out, "\\n", 2);
            break;
        case '\r':
            ch_buf_append(out, "\\r", 2);
            break;
        default:
            ch_buf_append(out, s, 1);
        }
    }
}

/*
 * The staging table both commands fill: one row per dataset row, `kind` naming the dataset and a..h its columns
 * as text (hashes as hex), `line` the CSV line (or the order of generation).
 */
static const char stage_sql[] = "CREATE TEMP TABLE ot_stage (kind text NOT NULL, a text, b text, c text, d text, "
                                "e text, f text, g text, h text, line bigint NOT NULL) ON COMMIT DROP";

/* Appends one staging row: kind, then 8 columns (NULL for fewer), then line. */
static void stage_row(ch_buf_t *out, const char *kind, const char *const cols[8], long long line)
{
    copy_text(out, kind);
    for (int i = 0; i < 8; ++i) {
        ch_buf_append(out, "\t", 1);
        copy_text(out, cols[i]);
    }
    char l[32];
    int n = snprintf(l, sizeof(l), "\t%lld\n", line);
    ch_buf_append(out, l, (size_t)n);
}

/* The INSERT of each dataset from the staging table; `conflict` is the ON CONFLICT clause. */
#define UPSERT_BIRTH                                                                                                   \
    "INSERT INTO birth_records (cert_no, child_name, child_sex, child_birth_date, hospital, mother_id_hmac, "          \
    "father_id_hmac, child_id_hmac) SELECT a, b, c, d::date, e, decode(f, 'hex'), decode(g, 'hex'), decode(h, 'hex') " \
    "FROM ot_stage WHERE kind = 'birth_records' ORDER BY line "
#define UPSERT_MARRIAGES                                                                                               \
    "INSERT INTO marriages (cert_no, husband_id_hmac, wife_id_hmac, registered_on, dissolved_on) "                     \
    "SELECT a, decode(b, 'hex'), decode(c, 'hex'), d::date, e::date FROM ot_stage WHERE kind = 'marriages' ORDER BY "  \
    "line "
#define UPSERT_SI                                                                                                      \
    "INSERT INTO social_insurance (id_hmac, employer, insured_since, status) "                                         \
    "SELECT decode(a, 'hex'), b, c::date, d FROM ot_stage WHERE kind = 'social_insurance' ORDER BY line "
#define UPSERT_BUSINESSES                                                                                              \
    "INSERT INTO businesses (uscc, name, legal_rep_id_hmac, registered_on, address, status) "                          \
    "SELECT a, b, decode(c, 'hex'), d::date, e, f FROM ot_stage WHERE kind = 'businesses' ORDER BY line "

/* ---- USCC (GB 32100-2015) and organisation codes (GB 11714-1997) ---- */

static const char uscc_chars[] = "0123456789ABCDEFGHJKLMNPQRTUWXY"; /* no I, O, S, V, Z */

static int uscc_value(char c)
{
    const char *p = c != '\0' ? strchr(uscc_chars, c) : NULL;
    return p != NULL ? (int)(p - uscc_chars) : -1;
}

static char uscc_check_char(const char *first17)
{
    static const int w[17] = {1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28};
    int sum = 0;
    for (int i = 0; i < 17; ++i)
        sum += uscc_value(first17[i]) * w[i];
    int c = 31 - sum % 31;
    return uscc_chars[c == 31 ? 0 : c];
}

int ot_uscc_check(const char *uscc)
{
    if (strlen(uscc) != 18)
        return CH_EINVAL;
    for (int i = 0; i < 18; ++i)
        if (uscc_value(uscc[i]) < 0)
            return CH_EINVAL;
    for (int i = 2; i < 8; ++i)
        if (uscc[i] < '0' || uscc[i] > '9')
            return CH_EINVAL;
    return uscc_check_char(uscc) == uscc[17] ? CH_OK : CH_EINVAL;
}

/* An organisation code body of 8 characters gets its GB 11714 check character. */
static char org_check_char(const char *body8)
{
    static const int w[8] = {3, 7, 9, 10, 5, 8, 4, 2};
    int sum = 0;
    for (int i = 0; i < 8; ++i) {
        char c = body8[i];
        sum += (c >= '0' && c <= '9' ? c - '0' : c - 'A' + 10) * w[i];
    }
    int c = 11 - sum % 11;
    return c == 10 ? 'X' : c == 11 ? '0' : (char)('0' + c);
}

/* "91" + region + "MA" + 6 characters from `seed` + the organisation check + the USCC check. */
static void make_uscc(char out[19], const char *region, uint64_t seed)
{
    char body[9] = "MA";
    for (int i = 2; i < 8; ++i) {
        /* letters of the organisation code: USCC characters that GB 11714 also reads (no I O S V Z) */
        body[i] = uscc_chars[seed % 31];
        seed /= 31;
    }
    body[8] = '\0';
    snprintf(out, 19, "91%.6s%.8s%c", region, body, org_check_char(body));
    out[17] = uscc_check_char(out);
    out[18] = '\0';
}

/* ---- a deterministic generator (splitmix64), seeded per household ---- */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static long rng_range(uint64_t *s, long lo, long hi)
{
    return hi <= lo ? lo : lo + (long)(rng_next(s) % (uint64_t)(hi - lo + 1));
}

static int rng_percent(uint64_t *s, int pct)
{
    return (int)(rng_next(s) % 100) < pct;
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s != '\0'; ++s)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

#define PICK(s, arr) ((arr)[rng_next(s) % (sizeof(arr) / sizeof((arr)[0]))])
#define YEARS(n)     ((long)(n)*365L + (long)(n) / 4)

/* ---- what synthetic records are made of ---- */

typedef struct city {
    const char *prefix; /* the first four digits of a GB/T 2260 code */
    const char *name;
    const char *hospitals[3];
} city_t;

static const city_t cities[] = {
    {"4401", "广州市", {"广州市妇女儿童医疗中心", "广东省妇幼保健院", "中山大学附属第三医院"}},
    {"4403", "深圳市", {"深圳市妇幼保健院", "北京大学深圳医院", "深圳市人民医院"}},
    {"4404", "珠海市", {"珠海市妇幼保健院", "珠海市人民医院", "中山大学附属第五医院"}},
    {"4405", "汕头市", {"汕头市妇幼保健院", "汕头市中心医院", "汕头大学医学院第一附属医院"}},
    {"4406", "佛山市", {"佛山市妇幼保健院", "佛山市第一人民医院", "南方医科大学顺德医院"}},
    {"4407", "江门市", {"江门市妇幼保健院", "江门市中心医院", "江门市人民医院"}},
    {"4408", "湛江市", {"湛江市妇幼保健院", "广东医科大学附属医院", "湛江中心人民医院"}},
    {"4412", "肇庆市", {"肇庆市妇幼保健院", "肇庆市第一人民医院", "肇庆市中医院"}},
    {"4413", "惠州市", {"惠州市第二妇幼保健院", "惠州市中心人民医院", "惠州市第一人民医院"}},
    {"4419", "东莞市", {"东莞市妇幼保健院", "东莞市人民医院", "东莞康华医院"}},
    {"4420", "中山市", {"中山市博爱医院", "中山市人民医院", "中山市中医院"}},
    {"4451", "潮州市", {"潮州市妇幼保健院", "潮州市中心医院", "潮州市人民医院"}},
};

static const city_t *city_of(const char *region)
{
    for (size_t i = 0; i < sizeof(cities) / sizeof(cities[0]); ++i)
        if (strncmp(region, cities[i].prefix, 4) == 0)
            return &cities[i];
    return &cities[0];
}

static const char *const words[] = {"华美", "恒信", "宏图", "鑫源", "粤海", "南方", "嘉禾", "锦程", "瑞丰", "新星",
                                    "利达", "金穗", "腾达", "永安", "康泰", "华彩", "德信", "汇通", "启航", "明辉"};
static const char *const trades[] = {"科技", "贸易",     "餐饮管理", "电子",     "物流", "建材",
                                     "服装", "文化传播", "信息技术", "机电设备", "食品", "装饰工程"};

/* ---- deriving the datasets from the synthetic registry ---- */

typedef struct member {
    long long resident_id;
    char hmac[65];
    char sex;
    long birth; /* days since the epoch; NO_BIRTH when unknown */
    char region[7];
    char address[208];
} member_t;

#define MEMBERS_MAX 16

typedef struct derive {
    ch_buf_t out;
    long long line;
    long long counts[4]; /* birth_records, marriages, social_insurance, businesses */
} derive_t;

static void date_text(long days, char out[11])
{
    int y, m, d;
    ot_civil_from_days(days, &y, &m, &d);
    snprintf(out, 11, "%04d-%02d-%02d", y, m, d);
}

static void emit_marriage(derive_t *dv, uint64_t *rng, const member_t *husband, const member_t *wife, long not_after)
{
    long from = husband->birth + YEARS(22);
    if (wife->birth + YEARS(20) > from)
        from = wife->birth + YEARS(20);
    long to = from + YEARS(4);
    long ref = ot_days_from_civil(REF_YEAR, 12, 31);
    if (to > not_after)
        to = not_after;
    if (to > ref)
        to = ref;
    if (to < from)
        return; /* too young to have married by then */
    long on = rng_range(rng, from, to);
    char date[11], cert[48];
    date_text(on, date);
    snprintf(cert, sizeof(cert), "J%s-%.4s-%08lld", husband->region, date, husband->resident_id);
    const char *cols[8] = {cert, husband->hmac, wife->hmac, date, NULL, NULL, NULL, NULL};
    stage_row(&dv->out, "marriages", cols, dv->line++);
    ++dv->counts[1];
}

static void emit_birth(derive_t *dv, uint64_t *rng, const member_t *child, const char *name, const member_t *mother,
                       const member_t *father)
{
    int y, m, d;
    ot_civil_from_days(child->birth, &y, &m, &d);
    if (y < 1996)
        return; /* birth medical certificates exist since 1996 */
    char cert[16], date[11], sex[2] = {child->sex, '\0'};
    snprintf(cert, sizeof(cert), "%c%09lld", 'A' + (y - 1996) % 26, child->resident_id % 1000000000LL);
    date_text(child->birth, date);
    const char *cols[8] = {cert,
                           name,
                           sex,
                           date,
                           PICK(rng, city_of(child->region)->hospitals),
                           mother->hmac,
                           father != NULL ? father->hmac : NULL,
                           child->hmac};
    stage_row(&dv->out, "birth_records", cols, dv->line++);
    ++dv->counts[0];
}

static void emit_insurance(derive_t *dv, uint64_t *rng, const member_t *p)
{
    long ref = ot_days_from_civil(REF_YEAR, 12, 31);
    if (p->birth == NO_BIRTH || ref - p->birth < YEARS(18))
        return;
    long age = (ref - p->birth) / 365;
    int working = p->sex == 'M' ? age < 60 : age < 55;
    if (!rng_percent(rng, working ? 82 : 70))
        return;
    long start = p->birth + YEARS(18) + rng_range(rng, 0, YEARS(6));
    long floor = ot_days_from_civil(1993, 1, 1);
    if (start < floor)
        start = floor + rng_range(rng, 0, 700);
    if (start > ref - 30)
        start = ref - 30;
    char employer[160] = "", date[11];
    const city_t *c = city_of(p->region);
    if (working && rng_percent(rng, 92))
        snprintf(employer, sizeof(employer), "%s%s%s有限公司", c->name, PICK(rng, words), PICK(rng, trades));
    date_text(start, date);
    const char *cols[8] = {p->hmac, employer, date, working ? "active" : "retired", NULL, NULL, NULL, NULL};
    stage_row(&dv->out, "social_insurance", cols, dv->line++);
    ++dv->counts[2];
}

static void emit_business(derive_t *dv, uint64_t *rng, const member_t *p)
{
    long ref = ot_days_from_civil(REF_YEAR, 12, 31);
    if (p->birth == NO_BIRTH || ref - p->birth < YEARS(25) || ref - p->birth > YEARS(65) || !rng_percent(rng, 4))
        return;
    const city_t *c = city_of(p->region);
    char uscc[19], name[200], date[11];
    make_uscc(uscc, p->region, rng_next(rng));
    snprintf(name, sizeof(name), "%s%s%s有限公司", c->name, PICK(rng, words), PICK(rng, trades));
    date_text(rng_range(rng, p->birth + YEARS(25), ref - 30), date);
    const char *cols[8] = {uscc,     name, p->hmac, date, p->address[0] != '\0' ? p->address : c->name,
                           "active", NULL, NULL};
    stage_row(&dv->out, "businesses", cols, dv->line++);
    ++dv->counts[3];
}

/*
 * One household of the synthetic registry, its members in registry order. The generator (identity's seed.c)
 * writes a couple as husband then wife, then their children, then the husband's parents; so: a man followed by a
 * woman of a plausible age are married; members born 16+ years after the wife are their children; two members
 * born 16+ years before the husband, a man then a woman, are his married parents.
 */
static void derive_household(derive_t *dv, const char *household, member_t *m, int n, char names[][72])
{
    uint64_t rng = fnv1a(household);
    for (int i = 0; i < n; ++i) {
        emit_insurance(dv, &rng, &m[i]);
        emit_business(dv, &rng, &m[i]);
    }
    if (n < 2 || m[0].sex != 'M' || m[1].sex != 'F' || m[0].birth == NO_BIRTH || m[1].birth == NO_BIRTH)
        return;
    long first_child = ot_days_from_civil(REF_YEAR, 12, 31);
    for (int i = 2; i < n; ++i)
        if (m[i].birth >= m[1].birth + YEARS(16) && m[i].birth < first_child)
            first_child = m[i].birth;
    emit_marriage(dv, &rng, &m[0], &m[1], first_child - 30);
    for (int i = 2; i < n; ++i) {
        if (m[i].birth >= m[1].birth + YEARS(16))
            emit_birth(dv, &rng, &m[i], names[i], &m[1], &m[0]);
    }
    for (int i = 2; i + 1 < n; ++i) {
        if (m[i].sex == 'M' && m[i + 1].sex == 'F' && m[i].birth != NO_BIRTH && m[i + 1].birth != NO_BIRTH &&
            m[i].birth <= m[0].birth - YEARS(16)) {
            emit_marriage(dv, &rng, &m[i], &m[i + 1], m[0].birth - 30);
            break;
        }
    }
}

/* ---- the demo people (identity's DEMO- households), with fixed records ---- */

typedef struct demo_row {
    long long resident_id;
    char name[72];
    char hmac[65];
    char masked[24];
    char birth[11];
    char address[208];
} demo_row_t;

#define DEMO_MAX 16

static const demo_row_t *demo_find(const demo_row_t *rows, int n, const char *name)
{
    for (int i = 0; i < n; ++i)
        if (strcmp(rows[i].name, name) == 0)
            return &rows[i];
    return NULL;
}

static int demo_load(PGconn *conn, demo_row_t *rows, int *n)
{
    PGresult *res = PQexec(conn, "SELECT resident_id, name, encode(id_hmac, 'hex'), id_masked, birth_date::text, "
                                 "coalesce(address, '') FROM registry_residents WHERE household_id LIKE 'DEMO-%' "
                                 "ORDER BY resident_id");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "seed: %s", PQerrorMessage(conn));
        PQclear(res);
        return 0;
    }
    *n = 0;
    for (int i = 0; i < PQntuples(res) && *n < DEMO_MAX; ++i) {
        demo_row_t *r = &rows[(*n)++];
        r->resident_id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
        snprintf(r->name, sizeof(r->name), "%s", PQgetvalue(res, i, 1));
        snprintf(r->hmac, sizeof(r->hmac), "%s", PQgetvalue(res, i, 2));
        snprintf(r->masked, sizeof(r->masked), "%s", PQgetvalue(res, i, 3));
        snprintf(r->birth, sizeof(r->birth), "%s", PQgetvalue(res, i, 4));
        snprintf(r->address, sizeof(r->address), "%s", PQgetvalue(res, i, 5));
    }
    PQclear(res);
    return 1;
}

/* The newborn's birth-record number: a letter for the year and the child's resident id (as the synthetic ones). */
static void demo_cert(const demo_row_t *child, char out[16])
{
    int y = atoi(child->birth);
    snprintf(out, 16, "%c%09lld", 'A' + (y - 1996) % 26, child->resident_id % 1000000000LL);
}

/* The demo families' records: the newborn's birth record and parents' marriage, insurance, a business owner. */
static void demo_stage(derive_t *dv, const demo_row_t *rows, int n)
{
    const demo_row_t *mother = demo_find(rows, n, "陈晓敏"), *father = demo_find(rows, n, "黄志明"),
                     *baby = demo_find(rows, n, "黄梓睿"), *owner = demo_find(rows, n, "李建国"),
                     *old_m = demo_find(rows, n, "李永华"), *old_f = demo_find(rows, n, "梁桂芳"),
                     *single = demo_find(rows, n, "张丽娟");
    if (mother != NULL && father != NULL) {
        const char *m[8] = {"J440106-2019-00000001", father->hmac, mother->hmac, "2019-05-20", NULL, NULL, NULL, NULL};
        stage_row(&dv->out, "marriages", m, dv->line++);
        const char *s1[8] = {mother->hmac, "广州天河软件园信息科技有限公司", "2016-07-01", "active", NULL, NULL, NULL,
                             NULL};
        stage_row(&dv->out, "social_insurance", s1, dv->line++);
        const char *s2[8] = {father->hmac, "广州市黄埔区明辉机电设备有限公司", "2014-09-01", "active", NULL, NULL, NULL,
                             NULL};
        stage_row(&dv->out, "social_insurance", s2, dv->line++);
        if (baby != NULL) {
            char cert[16];
            demo_cert(baby, cert);
            const char *b[8] = {cert,         baby->name,   "M",       baby->birth, "广州市天河区妇幼保健院",
                                mother->hmac, father->hmac, baby->hmac};
            stage_row(&dv->out, "birth_records", b, dv->line++);
        }
    }
    if (owner != NULL) {
        const char *s[8] = {owner->hmac, "深圳市南山区建国贸易有限公司", "1995-08-01", "active", NULL, NULL, NULL,
                            NULL};
        stage_row(&dv->out, "social_insurance", s, dv->line++);
        char u1[19], u2[19];
        make_uscc(u1, "440305", 20080318);
        make_uscc(u2, "440305", 20161102);
        const char *b1[8] = {
            u1, "深圳市南山区建国贸易有限公司", owner->hmac, "2008-03-18", owner->address, "active", NULL, NULL};
        const char *b2[8] = {
            u2, "深圳市科园餐饮管理有限公司", owner->hmac, "2016-11-02", owner->address, "active", NULL, NULL};
        stage_row(&dv->out, "businesses", b1, dv->line++);
        stage_row(&dv->out, "businesses", b2, dv->line++);
    }
    if (old_m != NULL && old_f != NULL) {
        const char *m[8] = {"J440305-1970-00000002", old_m->hmac, old_f->hmac, "1970-01-15", NULL, NULL, NULL, NULL};
        stage_row(&dv->out, "marriages", m, dv->line++);
        const char *s1[8] = {old_m->hmac, "", "1986-07-01", "retired", NULL, NULL, NULL, NULL};
        const char *s2[8] = {old_f->hmac, "", "1988-03-01", "retired", NULL, NULL, NULL, NULL};
        stage_row(&dv->out, "social_insurance", s1, dv->line++);
        stage_row(&dv->out, "social_insurance", s2, dv->line++);
    }
    if (single != NULL) {
        const char *s[8] = {single->hmac, "佛山市禅城区丽华服装有限公司", "2012-03-01", "active", NULL, NULL, NULL,
                            NULL};
        stage_row(&dv->out, "social_insurance", s, dv->line++);
    }
}

/* ---- `cityhall seed`: the datasets of the synthetic registry and of the demo people ---- */

/* Streams the registry's households (those grown since `through`) from `rd` and stages their records on `wr`. */
static int derive_all(PGconn *rd, PGconn *wr, derive_t *dv, long long through)
{
    char filter[160] = "", sql[1024];
    if (through > 0)
        snprintf(filter, sizeof(filter),
                 "AND household_id IN (SELECT household_id FROM registry_residents WHERE resident_id > %lld)", through);
    snprintf(sql, sizeof(sql),
             "DECLARE residents NO SCROLL CURSOR FOR "
             "SELECT resident_id, encode(id_hmac, 'hex'), name, coalesce(sex, '?'), "
             "       coalesce(birth_date - date '1970-01-01', -1000000), coalesce(region, '440106'), "
             "       coalesce(address, ''), "
             "       household_id "
             "FROM registry_residents WHERE household_id IS NOT NULL AND household_id NOT LIKE 'DEMO-%%' %s "
             "ORDER BY household_id COLLATE \"C\", resident_id",
             filter);
    if (!ch_cmd_exec(rd, sql, "seed"))
        return 0;
    member_t m[MEMBERS_MAX];
    char names[MEMBERS_MAX][72];
    char household[80] = "";
    int n = 0;
    for (;;) {
        PGresult *res = PQexec(rd, "FETCH 10000 FROM residents");
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            fprintf(stderr, "seed: %s", PQerrorMessage(rd));
            PQclear(res);
            return 0;
        }
        int rows = PQntuples(res);
        for (int i = 0; i < rows; ++i) {
            const char *hh = PQgetvalue(res, i, 7);
            if (strcmp(hh, household) != 0) {
                if (n > 0)
                    derive_household(dv, household, m, n, names);
                snprintf(household, sizeof(household), "%s", hh);
                n = 0;
            }
            if (n == MEMBERS_MAX)
                continue;
            member_t *p = &m[n];
            p->resident_id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
            snprintf(p->hmac, sizeof(p->hmac), "%s", PQgetvalue(res, i, 1));
            snprintf(names[n], sizeof(names[n]), "%s", PQgetvalue(res, i, 2));
            p->sex = PQgetvalue(res, i, 3)[0];
            p->birth = strtol(PQgetvalue(res, i, 4), NULL, 10);
            snprintf(p->region, sizeof(p->region), "%.6s", PQgetvalue(res, i, 5));
            snprintf(p->address, sizeof(p->address), "%s", PQgetvalue(res, i, 6));
            ++n;
        }
        PQclear(res);
        if (dv->out.len >= COPY_CHUNK && !ch_cmd_copy_put(wr, &dv->out, "seed"))
            return 0;
        if (rows == 0)
            break;
    }
    if (n > 0)
        derive_household(dv, household, m, n, names);
    return ch_cmd_exec(rd, "CLOSE residents", "seed");
}

/* Inserts the staged rows of each dataset (new keys only); adds the counts to `added`. */
static int stage_merge(PGconn *wr, const char *conflict, long long added[4], long long updated[4], const char *what)
{
    static const char *const upserts[4] = {UPSERT_BIRTH, UPSERT_MARRIAGES, UPSERT_SI, UPSERT_BUSINESSES};
    for (int k = 0; k < 4; ++k) {
        char sql[1400];
        snprintf(sql, sizeof(sql),
                 "WITH up AS (%s %s RETURNING (xmax = 0) AS inserted) "
                 "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up",
                 upserts[k], conflict != NULL ? conflict : "ON CONFLICT DO NOTHING");
        PGresult *res = PQexec(wr, sql);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            fprintf(stderr, "%s: %s", what, PQerrorMessage(wr));
            PQclear(res);
            return 0;
        }
        added[k] += strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        if (updated != NULL)
            updated[k] += strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        PQclear(res);
    }
    return 1;
}

static const char *const dataset_order[4] = {"birth_records", "marriages", "social_insurance", "businesses"};

/* What a newcomer needs to try the bundles with curl; the retirement demo is a synthetic resident. */
static void print_demo(const ch_config_t *config, PGconn *conn, const demo_row_t *rows, int n)
{
    const demo_row_t *mother = demo_find(rows, n, "陈晓敏"), *father = demo_find(rows, n, "黄志明"),
                     *baby = demo_find(rows, n, "黄梓睿");
    char base[200];
    if (config->https_port != 0)
        snprintf(base, sizeof(base), "curl -sk -H 'content-type: application/json' https://127.0.0.1:%d",
                 config->https_port);
    else
        snprintf(base, sizeof(base),
                 "curl -s --http2-prior-knowledge -H 'content-type: application/json' http://127.0.0.1:%d",
                 config->http_port);
    printf("\n=== one-thing (一件事) demo: bundles birth, business_opening, retirement (SYNTHETIC data) ===\n");
    if (mother != NULL && father != NULL && baby != NULL) {
        char cert[16];
        demo_cert(baby, cert);
        printf("birth (出生一件事): log in as 19900000001 (%s, the newborn's mother). Hospital birth record %s\n"
               "  for %s (born %s) names her and %s as the parents; the form prefills from it, the marriage\n"
               "  registry and social insurance. ID numbers come masked: send them back as they are (they stand\n"
               "  for the prefilled numbers) or type full ones.\n",
               mother->name, cert, baby->name, baby->birth, father->name);
        printf("  TOKEN=<access_token of 19900000001's login, as above>\n"
               "  %s/v1/onething/bundles -H \"Authorization: Bearer $TOKEN\"\n"
               "  %s/v1/onething/bundles/birth/form -H \"Authorization: Bearer $TOKEN\"\n"
               "  %s/v1/onething/applications -H \"Authorization: Bearer $TOKEN\" -H 'Idempotency-Key: birth-1' \\\n"
               "       -d '{\"bundle_code\":\"birth\",\"consent\":true,\"fields\":[\n"
               "            {\"name\":\"child.name\",\"value\":\"%s\"},{\"name\":\"child.sex\",\"value\":\"M\"},\n"
               "            {\"name\":\"child.birth_date\",\"value\":\"%s\"},"
               "{\"name\":\"child.hospital\",\"value\":\"广州市天河区妇幼保健院\"},\n"
               "            {\"name\":\"child.birth_cert_no\",\"value\":\"%s\"},"
               "{\"name\":\"mother.name\",\"value\":\"%s\"},\n"
               "            "
               "{\"name\":\"mother.id_number\",\"value\":\"%s\"},{\"name\":\"father.name\",\"value\":\"%s\"},\n"
               "            {\"name\":\"father.id_number\",\"value\":\"%s\"},"
               "{\"name\":\"parents.marriage_cert_no\",\"value\":\"J440106-2019-00000001\"},\n"
               "            "
               "{\"name\":\"hukou.follow\",\"value\":\"mother\"},{\"name\":\"hukou.address\",\"value\":\"%s\"},\n"
               "            {\"name\":\"applicant.phone\",\"value\":\"199****0001\"},"
               "{\"name\":\"social_card.bank\",\"value\":\"工商银行\"},\n"
               "            {\"name\":\"maternity.bank_account\",\"value\":\"6222020200112233445\"}]}'\n"
               "  %s/v1/onething/applications -H \"Authorization: Bearer $TOKEN\"     (then .../applications/<id>)\n"
               "  %s/v1/me/notifications -H \"Authorization: Bearer $TOKEN\"\n",
               base, base, base, baby->name, baby->birth, cert, mother->name, mother->masked, father->name,
               father->masked, mother->address, base, base);
    }
    printf("business_opening (企业开办): log in as 19900000002 (李建国, legal representative of 2 businesses).\n");
    /* a synthetic man past the statutory retirement age with 16+ years of active social insurance */
    PGresult *res =
        PQexec(conn, "SELECT r.name, encode(r.id_enc, 'hex'), r.birth_date::text, s.insured_since::text "
                     "FROM registry_residents r JOIN social_insurance s ON s.id_hmac = r.id_hmac "
                     "WHERE s.status = 'active' AND r.sex = 'M' AND r.household_id NOT LIKE 'DEMO-%' "
                     "  AND r.birth_date <= (now() AT TIME ZONE 'Asia/Shanghai')::date - interval '61 years' "
                     "  AND s.insured_since <= (now() AT TIME ZONE 'Asia/Shanghai')::date - interval '16 years' "
                     "  AND NOT EXISTS (SELECT 1 FROM citizens c WHERE c.registry_id = r.resident_id) "
                     "ORDER BY r.resident_id LIMIT 1");
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 && ch_pii != NULL) {
        const char *hex = PQgetvalue(res, 0, 1);
        size_t len = strlen(hex) / 2;
        uint8_t *sealed = malloc(len + 1);
        if (sealed == NULL)
            abort();
        for (size_t k = 0; k < len; ++k) {
            unsigned v;
            sscanf(hex + 2 * k, "%2x", &v);
            sealed[k] = (uint8_t)v;
        }
        ch_buf_t plain = {0};
        if (ch_pii_decrypt(ch_pii, sealed, len, &plain) == 0 && plain.len == 18)
            printf("retirement (退休一件事): log in with a new phone (e.g. 19900000009), bind the real name of the\n"
                   "  synthetic resident %s %.18s (born %s, insured since %s) with POST /v1/me/real-name,\n"
                   "  then GET /v1/onething/bundles/retirement/form and submit it.\n",
                   PQgetvalue(res, 0, 0), plain.base, PQgetvalue(res, 0, 2), PQgetvalue(res, 0, 3));
        if (plain.base != NULL)
            OPENSSL_cleanse(plain.base, plain.cap);
        ch_buf_free(&plain);
        free(sealed);
    } else {
        printf("retirement (退休一件事): no synthetic resident qualifies yet (seed more: --citizens 2000).\n");
    }
    PQclear(res);
    printf("staff of police-hukou, health, medical-insurance and hrss work their items: GET /v1/staff/tasks.\n\n");
}

int ot_seed(const ch_config_t *config, int argc, char **argv)
{
    (void)argc;
    (void)argv; /* `--citizens N` belongs to identity's seed, which ran first */
    char err[512];
    if (ch_pii_init(config->var_dir, err, sizeof(err)) != 0) {
        fprintf(stderr, "seed: %s\n", err);
        return 1;
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    PGconn *wr = ch_cmd_connect(config, "seed");
    if (wr == NULL)
        return 1;
    PGconn *rd = ch_cmd_connect(config, "seed");
    if (rd == NULL) {
        PQfinish(wr);
        return 1;
    }
    int ret = 1, in_copy = 0;
    derive_t dv = {0};
    demo_row_t demo[DEMO_MAX];
    int ndemo = 0;
    if (!ch_cmd_exec(wr, SEED_LOCK, "seed") || !ch_cmd_exec(wr, "BEGIN", "seed") ||
        !ch_cmd_exec(rd, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", "seed"))
        goto out;
    long long through = ch_cmd_number(wr,
                                     "SELECT coalesce(max(through_resident), 0) FROM dataset_loads "
                                     "WHERE source = 'seed'",
                                     0, NULL, "seed");
    long long last = ch_cmd_number(rd, "SELECT coalesce(max(resident_id), 0) FROM registry_residents", 0, NULL, "seed");
    if (through < 0 || last < 0 || !demo_load(rd, demo, &ndemo))
        goto out;
    if (!ch_cmd_exec(wr, stage_sql, "seed") ||
        !ch_cmd_copy_begin(wr, "COPY ot_stage (kind, a, b, c, d, e, f, g, h, line) FROM STDIN", "seed"))
        goto out;
    in_copy = 1;
    if (last > through && !derive_all(rd, wr, &dv, through))
        goto out;
    demo_stage(&dv, demo, ndemo);
    if (!ch_cmd_copy_put(wr, &dv.out, "seed"))
        goto out;
    in_copy = 0;
    if (!ch_cmd_copy_end(wr, NULL, "seed"))
        goto out;
    long long added[4] = {0};
    if (!stage_merge(wr, NULL, added, NULL, "seed"))
        goto out;
    for (int k = 0; k < 4; ++k) {
        char rows[24], thr[24];
        snprintf(rows, sizeof(rows), "%lld", added[k]);
        snprintf(thr, sizeof(thr), "%lld", last);
        const char *v[3] = {dataset_order[k], rows, thr};
        PGresult *res = PQexecParams(wr,
                                     "INSERT INTO dataset_loads (dataset, source, rows, through_resident) "
                                     "VALUES ($1, 'seed', $2::bigint, $3::bigint)",
                                     3, NULL, v, NULL, NULL, 0);
        int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok)
            fprintf(stderr, "seed: %s", PQerrorMessage(wr));
        PQclear(res);
        if (!ok)
            goto out;
    }
    if (!ch_cmd_exec(wr, "COMMIT", "seed"))
        goto out;
    ch_cmd_exec(rd, "COMMIT", "seed");
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    if (last > through)
        printf("seed: one-thing datasets from the registry's households: %lld birth records, %lld marriages, "
               "%lld social insurance records, %lld businesses added in %.2f s\n",
               added[0], added[1], added[2], added[3], s);
    else
        printf("seed: the one-thing datasets already cover the registry: nothing to derive (%lld demo rows added)\n",
               added[0] + added[1] + added[2] + added[3]);
    print_demo(config, wr, demo, ndemo);
    ret = 0;
out:
    if (in_copy)
        ch_cmd_copy_end(wr, "seed failed", "seed");
    if (ret != 0) {
        PQclear(PQexec(wr, "ROLLBACK"));
        PQclear(PQexec(rd, "ROLLBACK"));
    }
    ch_buf_free(&dv.out);
    PQfinish(rd);
    PQfinish(wr);
    return ret;
}

/* ---- `cityhall import dataset NAME FILE.csv` ---- */

#define IMPORT_MAX_FIELDS   8
#define IMPORT_MAX_REPORTED 50

static char *trim(char *s)
{
    while (*s == ' ')
        ++s;
    size_t n = strlen(s);
    while (n > 0 && s[n - 1] == ' ')
        s[--n] = '\0';
    return s;
}

/* UTF-8 text without control characters, at most `max` bytes (and at least one when `required`). */
static const char *text_check(const char *s, size_t max, int required)
{
    size_t n = strlen(s);
    if (required && n == 0)
        return "required";
    if (n > max)
        return "too long";
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        int k = c < 0x80                 ? 0
                : c >= 0xC2 && c <= 0xDF ? 1
                : c >= 0xE0 && c <= 0xEF ? 2
                : c >= 0xF0 && c <= 0xF4 ? 3
                                         : -1;
        if (k < 0 || (k == 0 && (c < 0x20 || c == 0x7f)))
            return "not valid UTF-8 text";
        for (int i = 1; i <= k; ++i)
            if ((p[i] & 0xC0) != 0x80)
                return "not valid UTF-8 text";
        p += k + 1;
    }
    return NULL;
}

/* A valid ID number (a final x read as X) hashed into `hex`; NULL, or the reason (never the number). */
static const char *id_check(char *s, int want_sex, char hex[65])
{
    if (strlen(s) == 18 && s[17] == 'x')
        s[17] = 'X';
    const char *why;
    if (ch_id_number_check(s, &why) != 0)
        return why;
    if (want_sex != 0 && ((s[16] - '0') % 2 == 1 ? 'M' : 'F') != want_sex)
        return want_sex == 'M' ? "must be a man's ID number" : "must be a woman's ID number";
    uint8_t mac[32];
    ch_pii_hmac(ch_pii, "id", s, 18, mac);
    ch_hex(mac, sizeof(mac), hex);
    return NULL;
}

static const char *date_check(const char *s, int required)
{
    if (s[0] == '\0')
        return required ? "required (YYYY-MM-DD)" : NULL;
    long d = ot_date_days(s);
    if (d < 0)
        return "must be a date YYYY-MM-DD";
    if (d > ot_today_cst())
        return "must not be in the future";
    return NULL;
}

/* One dataset's CSV shape and its row check: fills the staging columns (pointing into the record or `scratch`). */
typedef struct import_spec {
    const char *name;
    const char *header;
    int nfields;
    const char *key; /* the staging column of the dataset's key */
    const char *upsert;
    const char *conflict;
    const char *(*check)(char **f, const char *cols[8], char scratch[4][65], const char **field);
} import_spec_t;

static const char *check_birth(char **f, const char *cols[8], char h[4][65], const char **field)
{
    const char *why;
    cols[0] = f[0];
    *field = "cert_no";
    if (strlen(f[0]) != 10 || f[0][0] < 'A' || f[0][0] > 'Z' || strspn(f[0] + 1, "0123456789") != 9)
        return "must be a capital letter and 9 digits";
    *field = "child_name";
    if ((why = text_check(f[1], 64, 1)) != NULL)
        return why;
    cols[1] = f[1];
    *field = "child_sex";
    if (strcmp(f[2], "M") == 0 || strcmp(f[2], "男") == 0)
        cols[2] = "M";
    else if (strcmp(f[2], "F") == 0 || strcmp(f[2], "女") == 0)
        cols[2] = "F";
    else
        return "must be M or F";
    *field = "child_birth_date";
    if ((why = date_check(f[3], 1)) != NULL)
        return why;
    cols[3] = f[3];
    *field = "hospital";
    if ((why = text_check(f[4], 200, 1)) != NULL)
        return why;
    cols[4] = f[4];
    *field = "mother_id_number";
    if ((why = id_check(f[5], 'F', h[0])) != NULL)
        return why;
    cols[5] = h[0];
    *field = "father_id_number";
    if (f[6][0] != '\0' && (why = id_check(f[6], 'M', h[1])) != NULL)
        return why;
    cols[6] = f[6][0] != '\0' ? h[1] : NULL;
    *field = "child_id_number";
    if (f[7][0] != '\0') {
        if ((why = id_check(f[7], cols[2][0], h[2])) != NULL)
            return why;
        if (memcmp(f[7] + 6, f[3], 4) != 0 || memcmp(f[7] + 10, f[3] + 5, 2) != 0 ||
            memcmp(f[7] + 12, f[3] + 8, 2) != 0)
            return "does not agree with child_birth_date";
        cols[7] = h[2];
    }
    return NULL;
}

static const char *check_marriage(char **f, const char *cols[8], char h[4][65], const char **field)
{
    const char *why;
    *field = "cert_no";
    size_t n = strlen(f[0]);
    if (n < 4 || n > 40 || strspn(f[0], "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-") != n)
        return "must be 4 to 40 of A-Z a-z 0-9 -";
    cols[0] = f[0];
    *field = "husband_id_number";
    if ((why = id_check(f[1], 'M', h[0])) != NULL)
        return why;
    cols[1] = h[0];
    *field = "wife_id_number";
    if ((why = id_check(f[2], 'F', h[1])) != NULL)
        return why;
    cols[2] = h[1];
    *field = "registered_on";
    if ((why = date_check(f[3], 1)) != NULL)
        return why;
    cols[3] = f[3];
    *field = "dissolved_on";
    if ((why = date_check(f[4], 0)) != NULL)
        return why;
    if (f[4][0] != '\0' && ot_date_days(f[4]) < ot_date_days(f[3]))
        return "is before registered_on";
    cols[4] = f[4][0] != '\0' ? f[4] : NULL;
    return NULL;
}

static const char *check_insurance(char **f, const char *cols[8], char h[4][65], const char **field)
{
    const char *why;
    *field = "id_number";
    if ((why = id_check(f[0], 0, h[0])) != NULL)
        return why;
    cols[0] = h[0];
    *field = "employer";
    if ((why = text_check(f[1], 200, 0)) != NULL)
        return why;
    cols[1] = f[1];
    *field = "insured_since";
    if ((why = date_check(f[2], 1)) != NULL)
        return why;
    cols[2] = f[2];
    *field = "status";
    if (strcmp(f[3], "active") != 0 && strcmp(f[3], "suspended") != 0 && strcmp(f[3], "retired") != 0)
        return "must be active, suspended or retired";
    cols[3] = f[3];
    return NULL;
}

static const char *check_business(char **f, const char *cols[8], char h[4][65], const char **field)
{
    const char *why;
    *field = "uscc";
    if (ot_uscc_check(f[0]) != 0)
        return "not a unified social credit code (GB 32100: 18 characters, check character)";
    cols[0] = f[0];
    *field = "name";
    if ((why = text_check(f[1], 200, 1)) != NULL)
        return why;
    cols[1] = f[1];
    *field = "legal_rep_id_number";
    if ((why = id_check(f[2], 0, h[0])) != NULL)
        return why;
    cols[2] = h[0];
    *field = "registered_on";
    if ((why = date_check(f[3], 1)) != NULL)
        return why;
    cols[3] = f[3];
    *field = "address";
    if ((why = text_check(f[4], 200, 0)) != NULL)
        return why;
    cols[4] = f[4];
    *field = "status";
    if (f[5][0] == '\0')
        cols[5] = "active";
    else if (strcmp(f[5], "active") == 0 || strcmp(f[5], "deregistered") == 0)
        cols[5] = f[5];
    else
        return "must be active or deregistered (or empty)";
    return NULL;
}

static const import_spec_t import_specs[] = {
    {"birth_records",
     "cert_no,child_name,child_sex,child_birth_date,hospital,mother_id_number,father_id_number,child_id_number", 8, "a",
     UPSERT_BIRTH,
     "ON CONFLICT (cert_no) DO UPDATE SET child_name = EXCLUDED.child_name, child_sex = EXCLUDED.child_sex, "
     "child_birth_date = EXCLUDED.child_birth_date, hospital = EXCLUDED.hospital, mother_id_hmac = "
     "EXCLUDED.mother_id_hmac, father_id_hmac = EXCLUDED.father_id_hmac, child_id_hmac = EXCLUDED.child_id_hmac, "
     "as_of = now()",
     check_birth},
    {"marriages", "cert_no,husband_id_number,wife_id_number,registered_on,dissolved_on", 5, "a", UPSERT_MARRIAGES,
     "ON CONFLICT (cert_no) DO UPDATE SET husband_id_hmac = EXCLUDED.husband_id_hmac, wife_id_hmac = "
     "EXCLUDED.wife_id_hmac, registered_on = EXCLUDED.registered_on, dissolved_on = EXCLUDED.dissolved_on, "
     "as_of = now()",
     check_marriage},
    {"social_insurance", "id_number,employer,insured_since,status", 4, "a", UPSERT_SI,
     "ON CONFLICT (id_hmac) DO UPDATE SET employer = EXCLUDED.employer, insured_since = EXCLUDED.insured_since, "
     "status = EXCLUDED.status, as_of = now()",
     check_insurance},
    {"businesses", "uscc,name,legal_rep_id_number,registered_on,address,status", 6, "a", UPSERT_BUSINESSES,
     "ON CONFLICT (uscc) DO UPDATE SET name = EXCLUDED.name, legal_rep_id_hmac = EXCLUDED.legal_rep_id_hmac, "
     "registered_on = EXCLUDED.registered_on, address = EXCLUDED.address, status = EXCLUDED.status, as_of = now()",
     check_business},
};

static void import_usage(void)
{
    fprintf(stderr, "usage: cityhall import dataset NAME FILE.csv   (all rows or none; a row naming a key again "
                    "updates it)\n");
    for (size_t i = 0; i < sizeof(import_specs) / sizeof(import_specs[0]); ++i)
        fprintf(stderr, "  %-16s header: %s\n", import_specs[i].name, import_specs[i].header);
}

/*
 * Validates every row while streaming it into the staging table (COPY) inside one transaction; a bad row, or a
 * key given twice in the file, rolls everything back: a file is imported whole or not at all. Mirrors
 * `cityhall import registry`. Errors name the line and the column, never the value.
 */
int ot_cmd_import_dataset(const ch_config_t *config, int argc, char **argv)
{
    if (argc != 3) {
        import_usage();
        return 2;
    }
    const import_spec_t *spec = NULL;
    for (size_t i = 0; i < sizeof(import_specs) / sizeof(import_specs[0]); ++i)
        if (strcmp(import_specs[i].name, argv[1]) == 0)
            spec = &import_specs[i];
    if (spec == NULL) {
        fprintf(stderr, "import: unknown dataset \"%s\"\n", argv[1]);
        import_usage();
        return 2;
    }
    const char *path = argv[2];
    FILE *fp = fopen(path, "rb");
    if (fp == NULL) {
        fprintf(stderr, "import: could not open %s: %s\n", path, strerror(errno));
        return 1;
    }
    char err[512];
    if (ch_pii_init(config->var_dir, err, sizeof(err)) != 0) {
        fprintf(stderr, "import: %s\n", err);
        fclose(fp);
        return 1;
    }
    PGconn *conn = ch_cmd_connect(config, "import");
    if (conn == NULL) {
        fclose(fp);
        return 1;
    }
    int ret = 1, in_copy = 0;
    ch_buf_t rec = {0}, out = {0};
    long lines = 0, rows = 0, bad = 0;
    size_t starts[IMPORT_MAX_FIELDS + 1];
    char *fields[IMPORT_MAX_FIELDS];

    unsigned char bom[3];
    if (fread(bom, 1, 3, fp) != 3 || memcmp(bom, "\xEF\xBB\xBF", 3) != 0)
        rewind(fp);
    int nf = ch_cmd_csv_record(fp, &rec, starts, IMPORT_MAX_FIELDS + 1, &lines);
    {
        ch_buf_t header = {0};
        for (int i = 0; nf == spec->nfields && i < nf; ++i) {
            if (i > 0)
                ch_buf_append(&header, ",", 1);
            const char *h = trim(rec.base + starts[i]);
            ch_buf_append(&header, h, strlen(h));
        }
        int ok = nf == spec->nfields && header.base != NULL && strcmp(header.base, spec->header) == 0;
        ch_buf_free(&header);
        if (!ok) {
            fprintf(stderr, "import: line 1: the header must be: %s\n", spec->header);
            goto out;
        }
    }
    if (!ch_cmd_exec(conn, SEED_LOCK, "import") || !ch_cmd_exec(conn, "BEGIN", "import") ||
        !ch_cmd_exec(conn, stage_sql, "import") ||
        !ch_cmd_copy_begin(conn, "COPY ot_stage (kind, a, b, c, d, e, f, g, h, line) FROM STDIN", "import"))
        goto out;
    in_copy = 1;
    for (;;) {
        long start_line = lines + 1;
        nf = ch_cmd_csv_record(fp, &rec, starts, IMPORT_MAX_FIELDS + 1, &lines);
        if (nf == 0)
            break;
        if (nf == 1 && rec.base[0] == '\0')
            continue; /* an empty line */
        const char *why = NULL, *field = NULL;
        const char *cols[8] = {NULL};
        char scratch[4][65];
        if (nf < 0) {
            why = "malformed CSV (a quote is not closed, or text follows a closing quote)";
        } else if (nf != spec->nfields) {
            why = "wrong number of fields";
        } else {
            for (int i = 0; i < nf; ++i)
                fields[i] = trim(rec.base + starts[i]);
            why = spec->check(fields, cols, scratch, &field);
        }
        if (why != NULL) {
            if (bad < IMPORT_MAX_REPORTED) {
                if (field != NULL)
                    fprintf(stderr, "import: line %ld: %s: %s\n", start_line, field, why);
                else
                    fprintf(stderr, "import: line %ld: %s (the header has %d)\n", start_line, why, spec->nfields);
            }
            ++bad;
            continue;
        }
        ++rows;
        if (bad == 0) {
            stage_row(&out, spec->name, cols, start_line);
            if (out.len >= COPY_CHUNK && !ch_cmd_copy_put(conn, &out, "import"))
                goto out;
        }
    }
    if (bad > IMPORT_MAX_REPORTED)
        fprintf(stderr, "import: ... and %ld more bad rows\n", bad - IMPORT_MAX_REPORTED);
    if (bad > 0) {
        fprintf(stderr, "import: %ld of %ld rows are bad: nothing imported\n", bad, bad + rows);
        goto out;
    }
    if (!ch_cmd_copy_put(conn, &out, "import"))
        goto out;
    in_copy = 0;
    if (!ch_cmd_copy_end(conn, NULL, "import"))
        goto out;
    {
        /* the same key twice in one file is a mistake in the file, not an update */
        char sql[256];
        snprintf(sql, sizeof(sql),
                 "SELECT min(line), max(line) FROM ot_stage GROUP BY %s HAVING count(*) > 1 ORDER BY 2 LIMIT 50",
                 spec->key);
        PGresult *res = PQexec(conn, sql);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            fprintf(stderr, "import: %s", PQerrorMessage(conn));
            PQclear(res);
            goto out;
        }
        int dups = PQntuples(res);
        for (int i = 0; i < dups; ++i)
            fprintf(stderr, "import: line %s: %.*s: the same as line %s\n", PQgetvalue(res, i, 1),
                    (int)strcspn(spec->header, ","), spec->header, PQgetvalue(res, i, 0));
        PQclear(res);
        if (dups > 0) {
            fprintf(stderr, "import: the file repeats a key: nothing imported\n");
            goto out;
        }
    }
    {
        long long added[4] = {0}, updated[4] = {0};
        int k = (int)(spec - import_specs);
        char sql[1600];
        snprintf(sql, sizeof(sql),
                 "WITH up AS (%s %s RETURNING (xmax = 0) AS inserted) "
                 "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up",
                 spec->upsert, spec->conflict);
        PGresult *res = PQexec(conn, sql);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            /* e.g. a child already registered under another certificate number (birth_records_child) */
            const char *why = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
            fprintf(stderr, "import: the rows conflict with what the dataset holds (%s): nothing imported\n",
                    why != NULL ? why : "refused");
            PQclear(res);
            goto out;
        }
        added[k] = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        updated[k] = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        PQclear(res);
        char nrows[24];
        snprintf(nrows, sizeof(nrows), "%ld", rows);
        const char *base = strrchr(path, '/');
        const char *v[3] = {spec->name, base != NULL ? base + 1 : path, nrows};
        res = PQexecParams(conn, "INSERT INTO dataset_loads (dataset, source, rows) VALUES ($1, $2, $3::bigint)", 3,
                           NULL, v, NULL, NULL, 0);
        int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok)
            fprintf(stderr, "import: %s", PQerrorMessage(conn));
        PQclear(res);
        if (!ok || !ch_cmd_exec(conn, "COMMIT", "import"))
            goto out;
        printf("import: %ld rows of %s: %lld added, %lld updated\n", rows, spec->name, added[k], updated[k]);
    }
    ret = 0;
out:
    if (in_copy)
        ch_cmd_copy_end(conn, "import aborted", "import");
    if (ret != 0)
        PQclear(PQexec(conn, "ROLLBACK"));
    ch_buf_free(&rec);
    ch_buf_free(&out);
    PQfinish(conn);
    fclose(fp);
    return ret;
}
