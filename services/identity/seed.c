/* `cityhall seed` (a synthetic population registry and demo accounts) and `cityhall import registry FILE.csv`. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libpq-fe.h>
#include <openssl/crypto.h>
#include "identity.h"
#include "cityhall/pii.h"
#include "cityhall/cmd.h"

/*
 * Both commands run off any event loop: blocking libpq is the right tool. Rows reach PostgreSQL through
 * COPY (never row-by-row INSERTs), each row carrying what the registry stores: the ID number's keyed hash,
 * its AES-256-GCM ciphertext and masked form, and the phone number's keyed hash. No raw ID or phone number
 * is ever sent to the database, and none is printed except the demo people's, on the operator's terminal.
 */

#define SEED_DEFAULT_CITIZENS 2000
#define COPY_CHUNK            (256 * 1024)
/* Serializes seeders and importers (a session advisory lock; migrations use 7243001). */
#define REGISTRY_LOCK "SELECT pg_advisory_lock(7243003)"

/* ---- calendar: days since 1970-01-01 <-> civil dates (proleptic Gregorian) ---- */

static long days_from_civil(int y, int m, int d)
{
    y -= m <= 2;
    long era = (y >= 0 ? y : y - 399) / 400;
    long yoe = y - era * 400;
    long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(long z, int *y, int *m, int *d)
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

/* Today in China Standard Time (UTC+8), as days since the epoch. */
static long today_cst(void)
{
    return (long)((time(NULL) + 8 * 3600) / 86400);
}

/* ---- a deterministic generator (splitmix64): the same seed gives the same people on every machine ---- */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi]. */
static long rng_range(uint64_t *s, long lo, long hi)
{
    return lo + (long)(rng_next(s) % (uint64_t)(hi - lo + 1));
}

static int rng_percent(uint64_t *s, int pct)
{
    return (int)(rng_next(s) % 100) < pct;
}

#define PICK(s, arr) ((arr)[rng_next(s) % (sizeof(arr) / sizeof((arr)[0]))])

/* ---- what synthetic Guangdong residents are made of ---- */

typedef struct region {
    const char *code;  /* GB/T 2260 */
    const char *place; /* city and district, as an address starts */
    int weight;
} region_t;

static const region_t regions[] = {
    {"440103", "广州市荔湾区", 4}, {"440104", "广州市越秀区", 4}, {"440105", "广州市海珠区", 6},
    {"440106", "广州市天河区", 8}, {"440111", "广州市白云区", 8}, {"440112", "广州市黄埔区", 4},
    {"440113", "广州市番禺区", 6}, {"440303", "深圳市罗湖区", 4}, {"440304", "深圳市福田区", 6},
    {"440305", "深圳市南山区", 6}, {"440306", "深圳市宝安区", 9}, {"440307", "深圳市龙岗区", 8},
    {"440402", "珠海市香洲区", 4}, {"440507", "汕头市龙湖区", 3}, {"440604", "佛山市禅城区", 4},
    {"440605", "佛山市南海区", 5}, {"440606", "佛山市顺德区", 5}, {"440703", "江门市蓬江区", 3},
    {"440802", "湛江市赤坎区", 2}, {"441202", "肇庆市端州区", 2}, {"441302", "惠州市惠城区", 4},
    {"441900", "东莞市", 9},       {"442000", "中山市", 5},       {"445102", "潮州市湘桥区", 2},
};
#define NREGIONS (sizeof(regions) / sizeof(regions[0]))

static const char *const streets[] = {
    "中山路",   "人民路",   "解放路",   "建设路", "新华路",   "东风路", "越秀路", "滨江路",   "环市路",   "花城大道",
    "深南大道", "科技园路", "南海大道", "季华路", "岭南大道", "迎宾路", "文明路", "工业大道", "体育西路", "华景路",
    "龙岗大道", "金沙路",   "港湾大道", "长安路", "翠亨路",   "学府路", "荔湾路", "沿江路",   "东湖路",   "北京路",
};

/* Common surnames, weighted toward Guangdong (陈 李 黄 张 梁 ...), two compound ones included. */
static const char *const surnames[] = {
    "陈", "陈", "陈", "李", "李", "黄", "黄", "张", "张", "梁", "刘", "刘", "林", "吴",   "何",   "罗", "郑",
    "谢", "周", "杨", "冯", "邓", "曾", "许", "蔡", "钟", "叶", "赵", "王", "王", "彭",   "卢",   "郭", "潘",
    "朱", "胡", "苏", "余", "杜", "廖", "江", "温", "方", "莫", "麦", "邱", "严", "司徒", "欧阳", "区",
};
static const char *const given_male[] = {
    "伟", "强", "磊", "军", "勇", "杰", "涛", "明", "超", "华", "建", "国", "志", "文", "斌", "浩", "宇",
    "俊", "鹏", "辉", "锦", "荣", "家", "伟", "子", "健", "嘉", "永", "振", "泽", "铭", "昊", "博", "晨",
};
static const char *const given_female[] = {
    "芳", "娜", "敏", "静", "丽", "艳", "娟", "霞", "秀", "玲", "婷", "雪", "慧", "颖", "琳", "欣", "怡",
    "佳", "梓", "诗", "晓", "美", "淑", "桂", "凤", "碧", "翠", "嘉", "雅", "可", "思", "月", "燕", "琪",
};
static const char *const phone_prefixes[] = {
    "130", "131", "132", "133", "134", "135", "136", "137", "138", "150", "151", "152", "153", "155", "156",
    "157", "158", "159", "176", "177", "178", "180", "181", "182", "183", "185", "186", "187", "188", "189",
};

/*
 * The population is generated against a fixed reference date, so that a given N always yields the same
 * people (only the demo newborn is dated from today). Birth dates run from 1920-01-01 to the reference date.
 */
#define BIRTH_FIRST_DAY (-18263L) /* 1920-01-01 */
#define REF_DAY         20088L    /* 2024-12-31 */
#define NDAYS           (REF_DAY - BIRTH_FIRST_DAY + 1)
/* Sequence numbers 001..980 per region, birth date and sex (odd male, even female); 99x is kept for the demo. */
#define SEQ_PER_SLOT 490

typedef struct person {
    char id[19];
    char name[40];
    char sex;   /* 'M' or 'F' */
    long birth; /* days since the epoch */
    unsigned region;
    char phone[12]; /* "" for none */
} person_t;

typedef struct household {
    char id[24];
    char address[200];
    unsigned region;
    int n;
    person_t m[8];
} household_t;

typedef struct gen {
    uint64_t rng;
    uint16_t *slots; /* issued sequence numbers per (region, birth day, sex) */
    uint64_t households;
    uint64_t phones;
    unsigned weight_total;
} gen_t;

static void gen_init(gen_t *g)
{
    memset(g, 0, sizeof(*g));
    g->rng = 0x5EED0C17A11ULL;
    g->slots = calloc(NREGIONS * (size_t)NDAYS * 2, sizeof(uint16_t));
    if (g->slots == NULL)
        abort();
    for (size_t i = 0; i < NREGIONS; ++i)
        g->weight_total += (unsigned)regions[i].weight;
}

static void gen_free(gen_t *g)
{
    free(g->slots);
}

static unsigned pick_region(gen_t *g)
{
    unsigned w = (unsigned)(rng_next(&g->rng) % g->weight_total);
    for (unsigned i = 0; i < NREGIONS; ++i) {
        if (w < (unsigned)regions[i].weight)
            return i;
        w -= (unsigned)regions[i].weight;
    }
    return 0;
}

/* Builds a GB 11643 number: region, birth date, a sequence with the sex parity, the check character. */
static void make_id(char out[19], const char *region, long birth, int seq)
{
    int y, m, d;
    civil_from_days(birth, &y, &m, &d);
    snprintf(out, 19, "%s%04d%02d%02d%03d", region, y, m, d, seq);
    out[17] = ch_id_number_check_char(out);
    out[18] = '\0';
}

/* Issues the next free sequence number of the person's (region, birth day, sex) slot, moving the birth day on
   by a day in the (never seen) case the slot is full. Slots start at a slot-dependent offset. */
static void assign_id(gen_t *g, person_t *p)
{
    for (;;) {
        if (p->birth > REF_DAY)
            p->birth = REF_DAY - 400;
        size_t slot = ((size_t)p->region * NDAYS + (size_t)(p->birth - BIRTH_FIRST_DAY)) * 2 + (p->sex == 'M');
        if (g->slots[slot] < SEQ_PER_SLOT) {
            unsigned k = (unsigned)((slot * 2654435761u + g->slots[slot]++) % SEQ_PER_SLOT);
            make_id(p->id, regions[p->region].code, p->birth, (int)(2 * k + (p->sex == 'M' ? 1 : 2)));
            return;
        }
        ++p->birth;
    }
}

static void make_name(gen_t *g, person_t *p, const char *surname)
{
    const char *a = p->sex == 'M' ? PICK(&g->rng, given_male) : PICK(&g->rng, given_female);
    if (rng_percent(&g->rng, 30)) {
        snprintf(p->name, sizeof(p->name), "%s%s", surname, a);
    } else {
        const char *b = p->sex == 'M' ? PICK(&g->rng, given_male) : PICK(&g->rng, given_female);
        snprintf(p->name, sizeof(p->name), "%s%s%s", surname, a, b);
    }
}

/* A unique mobile number: the 8 digits after the prefix are a bijection of a counter (odd multiplier, not a
   multiple of 5, modulo 10^8), so no two generated residents share one. */
static void make_phone(gen_t *g, person_t *p)
{
    uint64_t k = g->phones++;
    uint64_t tail = (k * 48271ULL * 1001ULL + 31415926ULL) % 100000000ULL;
    snprintf(p->phone, sizeof(p->phone), "%s%08llu",
             phone_prefixes[k % (sizeof(phone_prefixes) / sizeof(phone_prefixes[0]))], (unsigned long long)tail);
}

/* Adds a person born in [lo, hi] (clamped to the reference date) to the household. */
static person_t *add_person(gen_t *g, household_t *h, char sex, long lo, long hi, const char *surname, int own_region)
{
    person_t *p = &h->m[h->n++];
    memset(p, 0, sizeof(*p));
    p->sex = sex;
    /* keep both ends inside the calendar the sequence slots cover */
    if (lo < BIRTH_FIRST_DAY)
        lo = BIRTH_FIRST_DAY;
    if (hi > REF_DAY)
        hi = REF_DAY;
    if (hi < BIRTH_FIRST_DAY)
        hi = BIRTH_FIRST_DAY;
    if (lo > hi)
        lo = hi;
    p->birth = rng_range(&g->rng, lo, hi);
    /* most adults were registered where they live; some came from elsewhere in the province */
    p->region = own_region || rng_percent(&g->rng, 70) ? h->region : pick_region(g);
    make_name(g, p, surname);
    assign_id(g, p);
    long age_days = REF_DAY - p->birth;
    if (age_days >= 16 * 365 && rng_percent(&g->rng, age_days > 75 * 365 ? 55 : 95))
        make_phone(g, p);
    return p;
}

#define YEARS(n) ((long)(n)*365L + (long)(n) / 4)

/* One household: a single adult, a couple, a couple with children, three generations, or an elderly couple. */
static void gen_household(gen_t *g, household_t *h)
{
    memset(h, 0, sizeof(*h));
    h->region = pick_region(g);
    uint64_t hid = ++g->households;
    snprintf(h->id, sizeof(h->id), "%s%08llu", regions[h->region].code, (unsigned long long)hid);
    snprintf(h->address, sizeof(h->address), "%s%s%ld号%ld栋%ld%02ld房", regions[h->region].place,
             PICK(&g->rng, streets), rng_range(&g->rng, 1, 899), rng_range(&g->rng, 1, 30), rng_range(&g->rng, 1, 33),
             rng_range(&g->rng, 1, 12));
    const char *surname = PICK(&g->rng, surnames);
    int kind = (int)rng_range(&g->rng, 0, 99);
    if (kind < 14) { /* one adult */
        add_person(g, h, rng_percent(&g->rng, 50) ? 'M' : 'F', days_from_civil(1950, 1, 1),
                   days_from_civil(2004, 12, 31), surname, 0);
        return;
    }
    if (kind >= 88) { /* an elderly couple */
        person_t *hu = add_person(g, h, 'M', days_from_civil(1930, 1, 1), days_from_civil(1960, 12, 31), surname, 0);
        add_person(g, h, 'F', hu->birth - YEARS(1), hu->birth + YEARS(5), PICK(&g->rng, surnames), 0);
        return;
    }
    person_t *husband = add_person(g, h, 'M', days_from_civil(1958, 1, 1), days_from_civil(2000, 12, 31), surname, 0);
    long hb = husband->birth;
    const char *wife_surname = PICK(&g->rng, surnames);
    person_t *wife = add_person(g, h, 'F', hb - YEARS(2), hb + YEARS(6), wife_surname, 0);
    long wb = wife->birth;
    if (kind < 36)
        return; /* a couple */
    int children = rng_percent(&g->rng, 55) ? 1 : 2;
    for (int c = 0; c < children; ++c) {
        long lo = wb + YEARS(22), hi = wb + YEARS(40);
        if (lo > REF_DAY)
            break;
        /* most children take the father's surname, a few the mother's */
        const char *sn = rng_percent(&g->rng, 95) ? surname : wife_surname;
        add_person(g, h, rng_percent(&g->rng, 52) ? 'M' : 'F', lo, hi, sn, 1);
    }
    if (kind < 74)
        return; /* a couple with children */
    /* three generations: one or both of the husband's parents live with them */
    person_t *gf = add_person(g, h, 'M', hb - YEARS(38), hb - YEARS(24), surname, 0);
    if (rng_percent(&g->rng, 70))
        add_person(g, h, 'F', gf->birth - YEARS(1), gf->birth + YEARS(5), PICK(&g->rng, surnames), 0);
}

/* ---- COPY rows ---- */

/* Appends `s` escaped for COPY's text format. */
static void copy_text(ch_buf_t *out, const char *s)
{
    const char *run = s;
    for (; *s != '\0'; ++s) {
        const char *esc = NULL;
        switch (*s) {
        case '\\':
            esc = "\\\\";
            break;
        case '\t':
            esc = "\\t";
            break;
        case '\n':
            esc = "\\n";
            break;
        case '\r':
            esc = "\\r";
            break;
        default:
            continue;
        }
        ch_buf_append(out, run, (size_t)(s - run));
        ch_buf_append(out, esc, 2);
        run = s + 1;
    }
    ch_buf_append(out, run, (size_t)(s - run));
}

/* Appends a bytea value in COPY text format: \\x then hex (the backslash itself escaped). */
static void copy_bytea(ch_buf_t *out, const uint8_t *p, size_t len)
{
    ch_buf_reserve(out, 3 + 2 * len + 1);
    memcpy(out->base + out->len, "\\\\x", 3);
    ch_hex(p, len, out->base + out->len + 3);
    out->len += 3 + 2 * len;
}

typedef struct resident_row {
    const char *id; /* 18 characters, valid */
    const char *name;
    char sex;              /* 'M', 'F' */
    long birth;            /* days since the epoch */
    const char *region;    /* 6 digits */
    const char *address;   /* may be "" */
    const char *household; /* may be "" */
    const char *phone;     /* "" for none */
} resident_row_t;

/*
 * Appends one row of (id_hmac, id_enc, id_masked, name, sex, birth_date, region, address, household_id,
 * phone_hmac[, line]) in COPY text format. `scratch` is reused from row to row (no allocation per row once
 * it has grown).
 */
static void resident_copy_row(ch_buf_t *out, ch_buf_t *scratch, const resident_row_t *r, long line)
{
    uint8_t mac[32];
    char masked[19], date[16];
    ch_pii_hmac(ch_pii, "id", r->id, 18, mac);
    copy_bytea(out, mac, sizeof(mac));
    ch_buf_append(out, "\t", 1);
    scratch->len = 0;
    ch_pii_encrypt(ch_pii, r->id, 18, scratch);
    copy_bytea(out, (const uint8_t *)scratch->base, scratch->len);
    ch_id_number_mask(r->id, masked);
    ch_buf_append(out, "\t", 1);
    ch_buf_append(out, masked, 18);
    ch_buf_append(out, "\t", 1);
    copy_text(out, r->name);
    int y, m, d;
    civil_from_days(r->birth, &y, &m, &d);
    int n = snprintf(date, sizeof(date), "\t%c\t%04d-%02d-%02d\t", r->sex, y, m, d);
    ch_buf_append(out, date, (size_t)n);
    ch_buf_append(out, r->region, 6);
    ch_buf_append(out, "\t", 1);
    if (r->address[0] != '\0')
        copy_text(out, r->address);
    else
        ch_buf_append(out, "\\N", 2);
    ch_buf_append(out, "\t", 1);
    if (r->household[0] != '\0')
        copy_text(out, r->household);
    else
        ch_buf_append(out, "\\N", 2);
    ch_buf_append(out, "\t", 1);
    if (r->phone[0] != '\0') {
        ch_pii_hmac(ch_pii, "phone", r->phone, strlen(r->phone), mac);
        copy_bytea(out, mac, sizeof(mac));
    } else {
        ch_buf_append(out, "\\N", 2);
    }
    if (line >= 0) {
        char l[24];
        n = snprintf(l, sizeof(l), "\t%ld", line);
        ch_buf_append(out, l, (size_t)n);
    }
    ch_buf_append(out, "\n", 1);
}

static void row_from_person(resident_row_t *r, const household_t *h, const person_t *p)
{
    r->id = p->id;
    r->name = p->name;
    r->sex = p->sex;
    r->birth = p->birth;
    r->region = regions[p->region].code;
    r->address = h->address;
    r->household = h->id;
    r->phone = p->phone;
}

/* ---- blocking libpq helpers ---- */

static int keys_or_complain(const ch_config_t *config, const char *what)
{
    char err[512];
    if (ch_pii_init(config->var_dir, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: %s\n", what, err);
        return 0;
    }
    return 1;
}

static double seconds_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

static const char stage_sql[] =
    "CREATE TEMP TABLE registry_stage (id_hmac bytea NOT NULL, id_enc bytea NOT NULL, id_masked text NOT NULL, "
    "name text NOT NULL, sex char(1), birth_date date, region char(6), address text, household_id text, "
    "phone_hmac bytea, line bigint NOT NULL) ON COMMIT DROP";
#define REGISTRY_COLUMNS "id_hmac, id_enc, id_masked, name, sex, birth_date, region, address, household_id, phone_hmac"

/*
 * Index maintenance row by row (random 32-byte keys) costs more than the COPY itself: a load at least as large
 * as the registry drops the secondary indexes and the id_hmac UNIQUE constraint inside its transaction (which
 * then holds the table's exclusive lock) and builds them again after the load (a sort, several times faster).
 * Their definitions are read from the catalog first, so that this code never restates the migration's schema.
 * Fills `rebuild` with the statements.
 */
static int registry_indexes_drop(PGconn *conn, ch_buf_t *rebuild)
{
    PGresult *res =
        PQexec(conn, "SELECT 'ALTER TABLE registry_residents DROP CONSTRAINT ' || quote_ident(conname), "
                     "       'ALTER TABLE registry_residents ADD CONSTRAINT ' || quote_ident(conname) || ' ' "
                     "       || pg_get_constraintdef(oid) "
                     "FROM pg_constraint WHERE conrelid = 'registry_residents'::regclass AND contype = 'u' "
                     "UNION ALL "
                     "SELECT 'DROP INDEX ' || i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) "
                     "FROM pg_index i WHERE i.indrelid = 'registry_residents'::regclass AND NOT i.indisprimary "
                     "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "seed: %s", PQerrorMessage(conn));
        PQclear(res);
        return 0;
    }
    int ok = 1;
    for (int i = 0; i < PQntuples(res) && ok; ++i) {
        ok = ch_cmd_exec(conn, PQgetvalue(res, i, 0), "seed");
        ch_buf_append(rebuild, PQgetvalue(res, i, 1), strlen(PQgetvalue(res, i, 1)));
        ch_buf_append(rebuild, ";", 1);
    }
    PQclear(res);
    return ok;
}

/* ---- the synthetic population ---- */

/* Generates the first `n` residents (prefix-stable: the first k of any larger n are the same people). */
typedef struct population {
    gen_t g;
    household_t h;
    int next; /* the next member of h to hand out */
    long long produced;
} population_t;

static void population_init(population_t *pop)
{
    gen_init(&pop->g);
    pop->h.n = 0;
    pop->next = 0;
    pop->produced = 0;
}

static void population_next(population_t *pop, resident_row_t *r)
{
    while (pop->next >= pop->h.n) {
        gen_household(&pop->g, &pop->h);
        pop->next = 0;
    }
    row_from_person(r, &pop->h, &pop->h.m[pop->next++]);
    ++pop->produced;
}

/*
 * Loads the synthetic residents unless they are there already. The generator is prefix-stable and a load is
 * one transaction, so "resident n-1 of the stream is in the registry" means all n are. An empty registry is
 * COPYed into directly; otherwise (imports, or a smaller seed before) through a staging table with
 * ON CONFLICT DO NOTHING, so that nobody is duplicated. Returns 0 or 1 (error).
 */
static int seed_population(PGconn *conn, long long n)
{
    if (n == 0)
        return 0;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long long existing = ch_cmd_number(conn, "SELECT count(*) FROM registry_residents", 0, NULL, "seed");
    if (existing < 0)
        return 1;
    population_t pop;
    resident_row_t r;
    if (existing > 0) {
        /* find the last resident of the stream without any cryptography, then look it up */
        population_init(&pop);
        for (long long i = 0; i < n; ++i)
            population_next(&pop, &r);
        uint8_t mac[32];
        char param[67] = "\\x";
        ch_pii_hmac(ch_pii, "id", r.id, 18, mac);
        ch_hex(mac, sizeof(mac), param + 2);
        const char *p[1] = {param};
        long long there =
            ch_cmd_number(conn, "SELECT count(*) FROM registry_residents WHERE id_hmac = $1::bytea", 1, p, "seed");
        gen_free(&pop.g);
        if (there < 0)
            return 1;
        if (there > 0) {
            printf(
                "seed: the registry already holds the %lld synthetic residents (%lld rows in all): nothing to load\n",
                n, existing);
            return 0;
        }
    }

    /* a load that dominates the table rebuilds the indexes after it; a small one maintains them row by row */
    int direct = existing == 0, rebuild = n >= 50000 && n >= existing;
    ch_buf_t indexes = {0};
    if (!ch_cmd_exec(conn, "BEGIN", "seed") || (!direct && !ch_cmd_exec(conn, stage_sql, "seed")) ||
        (rebuild && !registry_indexes_drop(conn, &indexes)) ||
        !ch_cmd_copy_begin(conn,
                    direct ? "COPY registry_residents (" REGISTRY_COLUMNS ") FROM STDIN"
                           : "COPY registry_stage (" REGISTRY_COLUMNS ", line) FROM STDIN",
                    "seed")) {
        ch_cmd_exec(conn, "ROLLBACK", "seed");
        ch_buf_free(&indexes);
        return 1;
    }
    population_init(&pop);
    ch_buf_t buf = {0}, scratch = {0};
    ch_buf_reserve(&buf, COPY_CHUNK + 4096);
    int ok = 1;
    for (long long i = 0; i < n && ok; ++i) {
        population_next(&pop, &r);
        resident_copy_row(&buf, &scratch, &r, direct ? -1 : (long)i);
        if (buf.len >= COPY_CHUNK)
            ok = ch_cmd_copy_put(conn, &buf, "seed");
    }
    ok = ok && ch_cmd_copy_put(conn, &buf, "seed");
    ok = ch_cmd_copy_end(conn, ok ? NULL : "seed failed", "seed") && ok;
    long long households = (long long)pop.g.households;
    gen_free(&pop.g);
    ch_buf_free(&buf);
    ch_buf_free(&scratch);
    long long added = n;
    if (ok && !direct) {
        /* without the UNIQUE index (dropped above, the table locked) an anti-join skips who is there already */
        ok = ch_cmd_exec(conn, "ANALYZE registry_stage", "seed");
        added = !ok ? -1
                : rebuild
                    ? ch_cmd_number(conn,
                                   "WITH ins AS (INSERT INTO registry_residents (" REGISTRY_COLUMNS ") "
                                   "SELECT " REGISTRY_COLUMNS " FROM registry_stage s WHERE NOT EXISTS "
                                   "(SELECT 1 FROM registry_residents r WHERE r.id_hmac = s.id_hmac) ORDER BY line "
                                   "RETURNING 1) SELECT count(*) FROM ins",
                                   0, NULL, "seed")
                    : ch_cmd_number(conn,
                                   "WITH ins AS (INSERT INTO registry_residents (" REGISTRY_COLUMNS ") "
                                   "SELECT " REGISTRY_COLUMNS " FROM registry_stage ORDER BY line "
                                   "ON CONFLICT (id_hmac) DO NOTHING RETURNING 1) SELECT count(*) FROM ins",
                                   0, NULL, "seed");
        ok = added >= 0;
    }
    if (ok && rebuild && indexes.len > 0) {
        ok = ch_cmd_exec(conn, "SET LOCAL maintenance_work_mem = '256MB'", "seed") &&
             ch_cmd_exec(conn, indexes.base, "seed: rebuilding the registry's indexes");
    }
    ch_buf_free(&indexes);
    if (!ok || !ch_cmd_exec(conn, "COMMIT", "seed")) {
        ch_cmd_exec(conn, "ROLLBACK", "seed");
        return 1;
    }
    double s = seconds_since(&t0);
    printf("seed: %lld synthetic residents in %lld households: %lld added in %.2f s (%.0f rows/s, generation, "
           "HMAC and AES-GCM included)\n",
           n, households, added, s, s > 0 ? (double)n / s : 0.0);
    return 0;
}

/* ---- the demo people ---- */

/*
 * Three demo households, apart from the generated population: their sequence numbers are 99x, which the
 * generator never issues, and their household ids start with DEMO. Their phone numbers (199 0000 000x) are
 * outside the generator's prefixes.
 */
typedef struct demo_person {
    const char *household; /* DEMO-<region>-<n> */
    const char *role;      /* what the newcomer can do with this person */
    const char *name;
    char sex;
    int y, m, d; /* birth date; y == 0: the newborn, born 20 days before the first seed */
    int seq;
    const char *phone; /* "" for none */
    int account;       /* 1: a citizen account bound to this resident (real name verified) */
    int dependent_of;  /* 1 + index of the guardian in this table, relation parent; 0: none */
} demo_person_t;

static const demo_person_t demo[] = {
    {"DEMO-440106-0001", "parent of a newborn (logs in, real name verified)", "陈晓敏", 'F', 1994, 3, 12, 992,
     "19900000001", 1, 0},
    {"DEMO-440106-0001", "the newborn's father (no account)", "黄志明", 'M', 1992, 7, 25, 991, "", 0, 0},
    {"DEMO-440106-0001", "the newborn (try: add as a child dependent of 19900000001)", "黄梓睿", 'M', 0, 0, 0, 993, "",
     0, 0},
    {"DEMO-440305-0002", "has both elderly parents as dependents", "李建国", 'M', 1972, 10, 1, 991, "19900000002", 1,
     0},
    {"DEMO-440305-0002", "elderly father (dependent of 19900000002)", "李永华", 'M', 1946, 5, 8, 993, "", 0, 4},
    {"DEMO-440305-0002", "elderly mother (dependent of 19900000002)", "梁桂芳", 'F', 1949, 11, 20, 992, "", 0, 4},
    {"DEMO-440604-0003", "not bound yet: log in, then bind this real name", "张丽娟", 'F', 1990, 6, 18, 994,
     "19900000003", 0, 0},
};
#define NDEMO (sizeof(demo) / sizeof(demo[0]))

static const char *demo_region(const demo_person_t *p)
{
    static char region[7];
    memcpy(region, p->household + 5, 6);
    region[6] = '\0';
    return region;
}

static const char *demo_address(const demo_person_t *p)
{
    switch (p->household[15]) {
    case '1':
        return "广州市天河区天河路385号3栋1802房";
    case '2':
        return "深圳市南山区科技园路12号8栋601房";
    default:
        return "佛山市禅城区季华路66号2栋302房";
    }
}

static void bytea_text(const uint8_t *p, size_t len, char *out)
{
    out[0] = '\\';
    out[1] = 'x';
    ch_hex(p, len, out + 2);
}

/* Inserts the demo residents (ON CONFLICT DO NOTHING), their accounts and dependents; one transaction. */
static int seed_demo(PGconn *conn)
{
    if (!ch_cmd_exec(conn, "BEGIN", "seed demo"))
        return 1;
    /* the newborn is dated from the first seed; later seeds find it by its household and leave it */
    const char *hh[1] = {demo[0].household};
    long long babies = ch_cmd_number(conn,
                                    "SELECT count(*) FROM registry_residents WHERE household_id = $1 "
                                    "AND birth_date > (now() AT TIME ZONE 'Asia/Shanghai')::date - 366",
                                    1, hh, "seed demo");
    if (babies < 0)
        goto fail;
    ch_buf_t scratch = {0};
    char hmac_text[NDEMO][67];
    for (size_t i = 0; i < NDEMO; ++i) {
        const demo_person_t *p = &demo[i];
        long birth = p->y != 0 ? days_from_civil(p->y, p->m, p->d) : today_cst() - 20;
        char id[19];
        make_id(id, demo_region(p), birth, p->seq);
        uint8_t mac[32];
        ch_pii_hmac(ch_pii, "id", id, 18, mac);
        bytea_text(mac, sizeof(mac), hmac_text[i]);
        if (p->y == 0 && babies > 0)
            continue;
        char enc_text[200], phone_text[67], masked[19], date[16];
        scratch.len = 0;
        ch_pii_encrypt(ch_pii, id, 18, &scratch);
        bytea_text((const uint8_t *)scratch.base, scratch.len, enc_text);
        ch_id_number_mask(id, masked);
        int y, m, d;
        civil_from_days(birth, &y, &m, &d);
        snprintf(date, sizeof(date), "%04d-%02d-%02d", y, m, d);
        const char *phone = NULL;
        if (p->phone[0] != '\0') {
            ch_pii_hmac(ch_pii, "phone", p->phone, 11, mac);
            bytea_text(mac, sizeof(mac), phone_text);
            phone = phone_text;
        }
        char sex[2] = {p->sex, '\0'};
        const char *v[10] = {hmac_text[i], enc_text,       masked,          p->name,      sex,
                             date,         demo_region(p), demo_address(p), p->household, phone};
        PGresult *res = PQexecParams(conn,
                                     "INSERT INTO registry_residents (" REGISTRY_COLUMNS ") VALUES ($1::bytea, "
                                     "$2::bytea, $3, $4, $5, $6::date, $7, $8, $9, $10::bytea) "
                                     "ON CONFLICT (id_hmac) DO NOTHING",
                                     10, NULL, v, NULL, NULL, 0);
        int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok)
            fprintf(stderr, "seed demo: %s", PQerrorMessage(conn));
        PQclear(res);
        if (!ok) {
            ch_buf_free(&scratch);
            goto fail;
        }
    }
    for (size_t i = 0; i < NDEMO; ++i) {
        const demo_person_t *p = &demo[i];
        if (!p->account)
            continue;
        uint8_t mac[32];
        char phone_text[67], enc_text[200];
        ch_pii_hmac(ch_pii, "phone", p->phone, 11, mac);
        bytea_text(mac, sizeof(mac), phone_text);
        scratch.len = 0;
        ch_pii_encrypt(ch_pii, p->phone, 11, &scratch);
        bytea_text((const uint8_t *)scratch.base, scratch.len, enc_text);
        /* the account (as a first login would create it), then its real name unless it has one already */
        const char *v[3] = {phone_text, enc_text, hmac_text[i]};
        PGresult *res =
            PQexecParams(conn,
                         "INSERT INTO citizens (citizen_id, phone_hmac, phone_enc) "
                         "VALUES (gen_random_uuid(), $1::bytea, $2::bytea) ON CONFLICT (phone_hmac) DO NOTHING",
                         2, NULL, v, NULL, NULL, 0);
        int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
        if (ok) {
            const char *w[2] = {phone_text, hmac_text[i]};
            res = PQexecParams(conn,
                               "UPDATE citizens SET registry_id = r.resident_id, real_name_verified_at = now() "
                               "FROM registry_residents r WHERE citizens.phone_hmac = $1::bytea "
                               "AND citizens.registry_id IS NULL AND r.id_hmac = $2::bytea "
                               "AND NOT EXISTS (SELECT 1 FROM citizens o WHERE o.registry_id = r.resident_id)",
                               2, NULL, w, NULL, NULL, 0);
            ok = PQresultStatus(res) == PGRES_COMMAND_OK;
            PQclear(res);
        }
        if (!ok) {
            fprintf(stderr, "seed demo: %s", PQerrorMessage(conn));
            ch_buf_free(&scratch);
            goto fail;
        }
    }
    ch_buf_free(&scratch);
    for (size_t i = 0; i < NDEMO; ++i) {
        const demo_person_t *p = &demo[i];
        if (p->dependent_of == 0)
            continue;
        const demo_person_t *g = &demo[p->dependent_of - 1];
        uint8_t mac[32];
        char phone_text[67];
        ch_pii_hmac(ch_pii, "phone", g->phone, 11, mac);
        bytea_text(mac, sizeof(mac), phone_text);
        const char *v[2] = {phone_text, hmac_text[i]};
        PGresult *res =
            PQexecParams(conn,
                         "INSERT INTO dependents (guardian_id, resident_id, relation, added_at) "
                         "SELECT c.citizen_id, r.resident_id, 'parent', now() FROM citizens c, registry_residents r "
                         "WHERE c.phone_hmac = $1::bytea AND c.registry_id IS NOT NULL AND r.id_hmac = $2::bytea "
                         "ON CONFLICT DO NOTHING",
                         2, NULL, v, NULL, NULL, 0);
        int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok)
            fprintf(stderr, "seed demo: %s", PQerrorMessage(conn));
        PQclear(res);
        if (!ok)
            goto fail;
    }
    if (!ch_cmd_exec(conn, "COMMIT", "seed demo"))
        goto fail;
    return 0;
fail:
    ch_cmd_exec(conn, "ROLLBACK", "seed demo");
    return 1;
}

/* Prints the demo people as the database now has them (the newborn's number is read back and decrypted). */
static int print_demo(const ch_config_t *config, PGconn *conn)
{
    PGresult *res = PQexec(conn, "SELECT r.household_id, r.name, encode(r.id_enc, 'hex'), r.birth_date::text, "
                                 "       c.citizen_id IS NOT NULL, encode(c.phone_enc, 'hex'), "
                                 "       (SELECT count(*) FROM dependents d WHERE d.guardian_id = c.citizen_id) "
                                 "FROM registry_residents r LEFT JOIN citizens c ON c.registry_id = r.resident_id "
                                 "WHERE r.household_id LIKE 'DEMO-%' ORDER BY r.household_id, r.resident_id");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "seed demo: %s", PQerrorMessage(conn));
        PQclear(res);
        return 1;
    }
    printf("\n=== SYNTHETIC demo residents: made-up people and numbers, printed for trying the API ===\n"
           "    (valid GB 11643 numbers of nobody; shown in full on this terminal only, never logged)\n\n");
    printf("%-12s %-10s %-8s %-19s %-11s %s\n", "phone", "name", "masked", "ID number", "born", "role");
    ch_buf_t plain = {0};
    for (int i = 0; i < PQntuples(res); ++i) {
        const char *name = PQgetvalue(res, i, 1), *born = PQgetvalue(res, i, 3);
        char masked[64], id[19] = "(undecryptable)";
        ch_name_mask(name, masked, sizeof(masked));
        const char *hex = PQgetvalue(res, i, 2);
        size_t len = strlen(hex) / 2;
        uint8_t *sealed = malloc(len + 1);
        if (sealed == NULL)
            abort();
        for (size_t k = 0; k < len; ++k) {
            unsigned v;
            sscanf(hex + 2 * k, "%2x", &v);
            sealed[k] = (uint8_t)v;
        }
        plain.len = 0;
        if (ch_pii_decrypt(ch_pii, sealed, len, &plain) == 0 && plain.len == 18)
            memcpy(id, plain.base, 19);
        free(sealed);
        /* match the row to the table above by name (demo names are unique) */
        const demo_person_t *p = NULL;
        for (size_t k = 0; k < NDEMO; ++k)
            if (strcmp(demo[k].name, name) == 0)
                p = &demo[k];
        const char *phone = p != NULL && p->phone[0] != '\0' ? p->phone : "-";
        const char *role = p != NULL ? p->role : "";
        int bound = PQgetvalue(res, i, 4)[0] == 't';
        char status[96] = "";
        if (bound)
            snprintf(status, sizeof(status), " [account, real name verified, %s dependents]", PQgetvalue(res, i, 6));
        else if (p != NULL && p->phone[0] != '\0' && !p->account)
            snprintf(status, sizeof(status), " [no account bound yet]");
        /* names are 2-3 CJK characters (3 bytes, 2 columns each): pad by display width */
        int width = 0;
        for (const unsigned char *c = (const unsigned char *)name; *c; ++c)
            width += (*c & 0xC0) != 0x80 ? (*c >= 0x80 ? 2 : 1) : 0;
        int mwidth = 0;
        for (const unsigned char *c = (const unsigned char *)masked; *c; ++c)
            mwidth += (*c & 0xC0) != 0x80 ? (*c >= 0x80 ? 2 : 1) : 0;
        printf("%-12s %s%*s %s%*s %-19s %-11s %s%s\n", phone, name, width < 10 ? 10 - width : 0, "", masked,
               mwidth < 8 ? 8 - mwidth : 0, "", id, born, role, status);
    }
    if (plain.base != NULL)
        OPENSSL_cleanse(plain.base, plain.cap);
    ch_buf_free(&plain);
    PQclear(res);
    char base[160];
    if (config->https_port != 0)
        snprintf(base, sizeof(base), "curl -sk -H 'content-type: application/json' https://127.0.0.1:%d",
                 config->https_port);
    else
        snprintf(base, sizeof(base),
                 "curl -s --http2-prior-knowledge -H 'content-type: application/json' http://127.0.0.1:%d",
                 config->http_port);
    printf("\ntry (a newcomer's flow; the SMS code is the last line of %s/sms-outbox.jsonl):\n"
           "  %s/v1/auth/sms-code -d '{\"phone\":\"19900000003\"}'\n"
           "  %s/v1/auth/login -d '{\"phone\":\"19900000003\",\"code\":\"<6 digits>\"}'\n"
           "  TOKEN=<access_token of the answer>\n"
           "  %s/v1/me/real-name -H \"Authorization: Bearer $TOKEN\" \\\n"
           "       -d '{\"id_number\":\"<ID number of 19900000003 above>\",\"name\":\"<name above>\"}'\n"
           "  %s/v1/me -H \"Authorization: Bearer $TOKEN\"\n"
           "  %s/v1/me/access-log -H \"Authorization: Bearer $TOKEN\"\n\n",
           config->var_dir, base, base, base, base, base);
    return 0;
}

/* ---- `cityhall seed [--citizens N]` ---- */

int identity_cmd_seed(const ch_config_t *config, int argc, char **argv)
{
    long long n = SEED_DEFAULT_CITIZENS;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--citizens") == 0 && i + 1 < argc) {
            char *end;
            errno = 0;
            n = strtoll(argv[++i], &end, 10);
            if (errno != 0 || *end != '\0' || n < 0 || n > 100000000) {
                fprintf(stderr, "seed: --citizens must be a number from 0 to 100000000\n");
                return 2;
            }
        } else {
            fprintf(stderr, "usage: cityhall seed [--citizens N]   (default %d synthetic residents)\n",
                    SEED_DEFAULT_CITIZENS);
            return 2;
        }
    }
    if (!keys_or_complain(config, "seed"))
        return 1;
    PGconn *conn = ch_cmd_connect(config, "seed");
    if (conn == NULL)
        return 1;
    int ret = 1;
    if (!ch_cmd_exec(conn, REGISTRY_LOCK, "seed"))
        goto out;
    if (seed_population(conn, n) != 0 || seed_demo(conn) != 0 || print_demo(config, conn) != 0)
        goto out;
    if (identity_seed_staff(config, conn) != 0 || identity_seed_kiosk(config, conn) != 0) {
        fprintf(stderr, "seed: the staff and kiosk demo data failed\n");
        goto out;
    }
    ret = 0;
out:
    PQfinish(conn);
    return ret;
}

/* ---- `cityhall import registry FILE.csv` ---- */

#define IMPORT_HEADER       "id_number,name,sex,birth_date,region,address,household_id,phone"
#define IMPORT_FIELDS       8
#define IMPORT_MAX_REPORTED 50

static int utf8_valid(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        int n = c < 0x80                 ? 0
                : c >= 0xC2 && c <= 0xDF ? 1
                : c >= 0xE0 && c <= 0xEF ? 2
                : c >= 0xF0 && c <= 0xF4 ? 3
                                         : -1;
        if (n < 0)
            return 0;
        for (int i = 1; i <= n; ++i)
            if ((p[i] & 0xC0) != 0x80)
                return 0;
        if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] > 0x9F) || (c == 0xF0 && p[1] < 0x90) ||
            (c == 0xF4 && p[1] > 0x8F))
            return 0;
        p += n + 1;
    }
    return 1;
}

static int has_control(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; ++p)
        if (*p < 0x20 || *p == 0x7f)
            return 1;
    return 0;
}

static char *trim(char *s)
{
    while (*s == ' ')
        ++s;
    size_t n = strlen(s);
    while (n > 0 && s[n - 1] == ' ')
        s[--n] = '\0';
    return s;
}

/*
 * Checks one record; on success fills `r` (pointing into the record) and returns NULL, else the reason (which
 * never quotes the value). Sex and birth date, when given, must agree with the ID number; when empty they are
 * taken from it. The region (where the resident is registered now) defaults to the ID number's first six digits.
 */
static const char *import_check(char **f, resident_row_t *r, char *id)
{
    char *idn = trim(f[0]);
    if (strlen(idn) == 18 && idn[17] == 'x')
        idn[17] = 'X';
    const char *why;
    static char reason[96];
    if (ch_id_number_check(idn, &why) != 0) {
        snprintf(reason, sizeof(reason), "id_number: %s", why);
        return reason;
    }
    memcpy(id, idn, 19);
    r->id = id;
    char *name = trim(f[1]);
    if (name[0] == '\0')
        return "name: required";
    if (strlen(name) > 64)
        return "name: at most 64 bytes";
    if (!utf8_valid(name) || has_control(name))
        return "name: not valid UTF-8 text";
    r->name = name;
    char id_sex = (id[16] - '0') % 2 == 1 ? 'M' : 'F';
    char *sex = trim(f[2]);
    if (sex[0] == '\0')
        r->sex = id_sex;
    else if (strcmp(sex, "M") == 0 || strcmp(sex, "男") == 0)
        r->sex = 'M';
    else if (strcmp(sex, "F") == 0 || strcmp(sex, "女") == 0)
        r->sex = 'F';
    else
        return "sex: must be M or F (or empty)";
    if (r->sex != id_sex)
        return "sex: does not agree with the ID number";
    int y = (id[6] - '0') * 1000 + (id[7] - '0') * 100 + (id[8] - '0') * 10 + (id[9] - '0');
    int m = (id[10] - '0') * 10 + (id[11] - '0'), d = (id[12] - '0') * 10 + (id[13] - '0');
    r->birth = days_from_civil(y, m, d);
    char *birth = trim(f[3]);
    if (birth[0] != '\0') {
        int by, bm, bd, used = 0;
        if (strlen(birth) != 10 || sscanf(birth, "%4d-%2d-%2d%n", &by, &bm, &bd, &used) != 3 || used != 10)
            return "birth_date: must be YYYY-MM-DD (or empty)";
        if (by != y || bm != m || bd != d)
            return "birth_date: does not agree with the ID number";
    }
    char *region = trim(f[4]);
    if (region[0] == '\0') {
        region = id; /* the first six digits; copied by the row writer */
    } else {
        if (strlen(region) != 6 || strspn(region, "0123456789") != 6)
            return "region: must be 6 digits (or empty)";
    }
    r->region = region;
    char *address = trim(f[5]);
    if (strlen(address) > 200 || !utf8_valid(address) || has_control(address))
        return "address: at most 200 bytes of UTF-8 text";
    r->address = address;
    char *household = trim(f[6]);
    if (strlen(household) > 64 || !utf8_valid(household) || has_control(household))
        return "household_id: at most 64 bytes of text";
    r->household = household;
    char *phone = trim(f[7]);
    if (phone[0] != '\0' && ch_phone_check(phone) != 0)
        return "phone: must be an 11-digit mainland mobile number (or empty)";
    r->phone = phone;
    return NULL;
}

/*
 * Validates every row while streaming it into a staging table (COPY) inside one transaction; any bad row,
 * or the same ID number twice in the file, rolls everything back, so a file is imported whole or not at all.
 * Rows whose ID number is already in the registry update it (a re-import of corrected data).
 */
int identity_cmd_import_registry(const ch_config_t *config, int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: cityhall import registry FILE.csv\n  header: " IMPORT_HEADER "\n");
        return 2;
    }
    const char *path = argv[1];
    FILE *fp = fopen(path, "rb");
    if (fp == NULL) {
        fprintf(stderr, "import: could not open %s: %s\n", path, strerror(errno));
        return 1;
    }
    if (!keys_or_complain(config, "import")) {
        fclose(fp);
        return 1;
    }
    PGconn *conn = ch_cmd_connect(config, "import");
    if (conn == NULL) {
        fclose(fp);
        return 1;
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int ret = 1;
    ch_buf_t rec = {0}, out = {0}, scratch = {0};
    long lines = 0, rows = 0, bad = 0;
    size_t starts[IMPORT_FIELDS + 1];
    char *fields[IMPORT_FIELDS];
    int in_copy = 0;

    /* the header, after an optional UTF-8 byte order mark */
    unsigned char bom[3];
    if (fread(bom, 1, 3, fp) != 3 || memcmp(bom, "\xEF\xBB\xBF", 3) != 0)
        rewind(fp);
    long start_line = lines + 1;
    int nf = ch_cmd_csv_record(fp, &rec, starts, IMPORT_FIELDS + 1, &lines);
    if (nf != IMPORT_FIELDS) {
        fprintf(stderr, "import: line 1: the header must be: " IMPORT_HEADER "\n");
        goto out;
    }
    for (int i = 0; i < IMPORT_FIELDS; ++i)
        fields[i] = rec.base + starts[i];
    {
        char header[128];
        snprintf(header, sizeof(header), "%s,%s,%s,%s,%s,%s,%s,%s", trim(fields[0]), trim(fields[1]), trim(fields[2]),
                 trim(fields[3]), trim(fields[4]), trim(fields[5]), trim(fields[6]), trim(fields[7]));
        if (strcmp(header, IMPORT_HEADER) != 0) {
            fprintf(stderr, "import: line 1: the header must be: " IMPORT_HEADER "\n");
            goto out;
        }
    }
    if (!ch_cmd_exec(conn, REGISTRY_LOCK, "import") || !ch_cmd_exec(conn, "BEGIN", "import") ||
        !ch_cmd_exec(conn, stage_sql, "import") ||
        !ch_cmd_copy_begin(conn, "COPY registry_stage (" REGISTRY_COLUMNS ", line) FROM STDIN", "import"))
        goto out;
    in_copy = 1;
    for (;;) {
        start_line = lines + 1;
        nf = ch_cmd_csv_record(fp, &rec, starts, IMPORT_FIELDS + 1, &lines);
        if (nf == 0)
            break;
        if (nf == 1 && rec.base[0] == '\0')
            continue; /* an empty line */
        const char *why = NULL;
        resident_row_t r;
        char id[19], region[7];
        if (nf < 0) {
            why = "malformed CSV (a quote is not closed, or text follows a closing quote)";
        } else if (nf != IMPORT_FIELDS) {
            why = "must have 8 fields";
        } else {
            for (int i = 0; i < IMPORT_FIELDS; ++i)
                fields[i] = rec.base + starts[i];
            why = import_check(fields, &r, id);
        }
        if (why != NULL) {
            if (bad < IMPORT_MAX_REPORTED)
                fprintf(stderr, "import: line %ld: %s\n", start_line, why);
            ++bad;
            continue;
        }
        memcpy(region, r.region, 6);
        region[6] = '\0';
        r.region = region;
        ++rows;
        if (bad == 0) {
            resident_copy_row(&out, &scratch, &r, start_line);
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
        /* the same person twice in one file is a mistake in the file, not an update */
        PGresult *res = PQexec(conn, "SELECT min(line), max(line) FROM registry_stage GROUP BY id_hmac "
                                     "HAVING count(*) > 1 ORDER BY 2 LIMIT 50");
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            fprintf(stderr, "import: %s", PQerrorMessage(conn));
            PQclear(res);
            goto out;
        }
        int dups = PQntuples(res);
        for (int i = 0; i < dups; ++i)
            fprintf(stderr, "import: line %s: id_number: the same as line %s\n", PQgetvalue(res, i, 1),
                    PQgetvalue(res, i, 0));
        PQclear(res);
        if (dups > 0) {
            fprintf(stderr, "import: the file repeats ID numbers: nothing imported\n");
            goto out;
        }
    }
    {
        PGresult *res =
            PQexec(conn, "WITH up AS (INSERT INTO registry_residents (" REGISTRY_COLUMNS ") "
                         "SELECT " REGISTRY_COLUMNS " FROM registry_stage ORDER BY line "
                         "ON CONFLICT (id_hmac) DO UPDATE SET name = EXCLUDED.name, sex = EXCLUDED.sex, "
                         "birth_date = EXCLUDED.birth_date, region = EXCLUDED.region, address = EXCLUDED.address, "
                         "household_id = EXCLUDED.household_id, phone_hmac = EXCLUDED.phone_hmac "
                         "RETURNING (xmax = 0) AS inserted) "
                         "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up");
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            fprintf(stderr, "import: %s", PQerrorMessage(conn));
            PQclear(res);
            goto out;
        }
        long long ins = strtoll(PQgetvalue(res, 0, 0), NULL, 10), upd = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        PQclear(res);
        if (!ch_cmd_exec(conn, "COMMIT", "import"))
            goto out;
        printf("import: %ld rows: %lld residents added, %lld updated in %.2f s\n", rows, ins, upd, seconds_since(&t0));
    }
    ret = 0;
out:
    if (in_copy)
        ch_cmd_copy_end(conn, "import aborted", "import");
    if (ret != 0)
        ch_cmd_exec(conn, "ROLLBACK", "import");
    ch_buf_free(&rec);
    ch_buf_free(&out);
    ch_buf_free(&scratch);
    PQfinish(conn);
    fclose(fp);
    return ret;
}
