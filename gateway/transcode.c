/* The generic JSON <-> protobuf transcoder: the proto3 JSON mapping, driven only by protobuf-c descriptors. */
#include "cityhall/transcode.h"

#include <errno.h>
#include <float.h>
#include <jansson.h>
#include <math.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Message nesting beyond this is written as null: only messages that did not come from ch_json_to_pb (whose
 * nesting is bounded by CH_TRANSCODE_MAX_DEPTH) can get there, and the encoder must not overflow the stack. */
#define CH_EMIT_MAX_DEPTH 100

/* google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z. */
#define CH_TS_MIN_SECONDS INT64_C(-62135596800)
#define CH_TS_MAX_SECONDS INT64_C(253402300799)

static void ch_oom(void)
{
    fputs("cityhall: out of memory\n", stderr);
    abort();
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Buffers and the arena                                                                                          */
/* ------------------------------------------------------------------------------------------------------------ */

void ch_buf_reserve(ch_buf_t *buf, size_t extra)
{
    /* One byte beyond what was asked keeps room for the NUL that ch_buf_append maintains. */
    if (extra > SIZE_MAX - buf->len - 1)
        ch_oom();
    size_t need = buf->len + extra + 1;
    if (need <= buf->cap)
        return;
    size_t cap = buf->cap ? buf->cap : 256;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    char *p = realloc(buf->base, cap);
    if (p == NULL)
        ch_oom();
    buf->base = p;
    buf->cap = cap;
}

void ch_buf_append(ch_buf_t *buf, const void *data, size_t len)
{
    ch_buf_reserve(buf, len);
    if (len)
        memcpy(buf->base + buf->len, data, len);
    buf->len += len;
    buf->base[buf->len] = '\0';
}

void ch_buf_free(ch_buf_t *buf)
{
    free(buf->base);
    buf->base = NULL;
    buf->len = buf->cap = 0;
}

typedef struct ch_arena_chunk {
    struct ch_arena_chunk *next;
    size_t size, used;
} ch_arena_chunk_t;

struct ch_arena {
    ProtobufCAllocator allocator;
    ch_arena_chunk_t *head; /* the chunk being filled; the others are full or dedicated to one allocation */
    size_t next_size;
};

#define CH_ARENA_ALIGN   alignof(max_align_t)
#define CH_ARENA_HDR     ((sizeof(ch_arena_chunk_t) + CH_ARENA_ALIGN - 1) & ~(CH_ARENA_ALIGN - 1))
#define CH_ARENA_FIRST   4096
#define CH_ARENA_LARGEST 65536

static void *arena_alloc(void *data, size_t size)
{
    ch_arena_t *a = data;
    if (size > SIZE_MAX - CH_ARENA_HDR - CH_ARENA_ALIGN)
        ch_oom();
    size = size ? (size + CH_ARENA_ALIGN - 1) & ~(CH_ARENA_ALIGN - 1) : CH_ARENA_ALIGN;
    ch_arena_chunk_t *c = a->head;
    if (c != NULL && c->size - c->used >= size) {
        void *p = (char *)c + CH_ARENA_HDR + c->used;
        c->used += size;
        return p;
    }
    if (size > a->next_size / 4) {
        /* A big block gets a chunk of its own behind the head, so the head's free space is not abandoned. */
        ch_arena_chunk_t *big = malloc(CH_ARENA_HDR + size);
        if (big == NULL)
            ch_oom();
        big->size = big->used = size;
        if (c != NULL) {
            big->next = c->next;
            c->next = big;
        } else {
            big->next = NULL;
            a->head = big;
        }
        return (char *)big + CH_ARENA_HDR;
    }
    size_t csize = a->next_size;
    if (a->next_size < CH_ARENA_LARGEST)
        a->next_size *= 2;
    c = malloc(CH_ARENA_HDR + csize);
    if (c == NULL)
        ch_oom();
    c->size = csize;
    c->used = size;
    c->next = a->head;
    a->head = c;
    return (char *)c + CH_ARENA_HDR;
}

static void arena_free(void *data, void *ptr)
{
    /* Everything goes at once in ch_arena_free. */
}

ch_arena_t *ch_arena_new(void)
{
    ch_arena_t *a = calloc(1, sizeof(*a));
    if (a == NULL)
        ch_oom();
    a->allocator.alloc = arena_alloc;
    a->allocator.free = arena_free;
    a->allocator.allocator_data = a;
    a->next_size = CH_ARENA_FIRST;
    return a;
}

void ch_arena_free(ch_arena_t *arena)
{
    if (arena == NULL)
        return;
    for (ch_arena_chunk_t *c = arena->head, *next; c != NULL; c = next) {
        next = c->next;
        free(c);
    }
    free(arena);
}

ProtobufCAllocator *ch_arena_allocator(ch_arena_t *arena)
{
    return &arena->allocator;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* Descriptor helpers shared by both directions                                                                   */
/* ------------------------------------------------------------------------------------------------------------ */

static const char *type_name(ProtobufCType type)
{
    switch (type) {
    case PROTOBUF_C_TYPE_INT32:
        return "int32";
    case PROTOBUF_C_TYPE_SINT32:
        return "sint32";
    case PROTOBUF_C_TYPE_SFIXED32:
        return "sfixed32";
    case PROTOBUF_C_TYPE_INT64:
        return "int64";
    case PROTOBUF_C_TYPE_SINT64:
        return "sint64";
    case PROTOBUF_C_TYPE_SFIXED64:
        return "sfixed64";
    case PROTOBUF_C_TYPE_UINT32:
        return "uint32";
    case PROTOBUF_C_TYPE_FIXED32:
        return "fixed32";
    case PROTOBUF_C_TYPE_UINT64:
        return "uint64";
    case PROTOBUF_C_TYPE_FIXED64:
        return "fixed64";
    case PROTOBUF_C_TYPE_FLOAT:
        return "float";
    case PROTOBUF_C_TYPE_DOUBLE:
        return "double";
    case PROTOBUF_C_TYPE_BOOL:
        return "bool";
    case PROTOBUF_C_TYPE_ENUM:
        return "enum";
    case PROTOBUF_C_TYPE_STRING:
        return "string";
    case PROTOBUF_C_TYPE_BYTES:
        return "bytes";
    case PROTOBUF_C_TYPE_MESSAGE:
        return "message";
    }
    return "unknown";
}

static bool is_integer_type(ProtobufCType type)
{
    return type <= PROTOBUF_C_TYPE_FIXED64;
}

static bool is_number_type(ProtobufCType type)
{
    return type <= PROTOBUF_C_TYPE_DOUBLE;
}

static size_t elem_size(ProtobufCType type)
{
    switch (type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_ENUM:
        return 4;
    case PROTOBUF_C_TYPE_FLOAT:
        return sizeof(float);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return 8;
    case PROTOBUF_C_TYPE_DOUBLE:
        return sizeof(double);
    case PROTOBUF_C_TYPE_BOOL:
        return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING:
        return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(ProtobufCMessage *);
    }
    return 0;
}

/* The seconds and nanos fields when `d` is google.protobuf.Timestamp, found by name because the descriptor may
 * come from any copy of timestamp.proto. */
static bool timestamp_fields(const ProtobufCMessageDescriptor *d, const ProtobufCFieldDescriptor **sec,
                             const ProtobufCFieldDescriptor **nanos)
{
    if (strcmp(d->name, "google.protobuf.Timestamp") != 0)
        return false;
    *sec = protobuf_c_message_descriptor_get_field(d, 1);
    *nanos = protobuf_c_message_descriptor_get_field(d, 2);
    return *sec != NULL && *nanos != NULL && (*sec)->type == PROTOBUF_C_TYPE_INT64 &&
           (*nanos)->type == PROTOBUF_C_TYPE_INT32 && (*sec)->label != PROTOBUF_C_LABEL_REPEATED &&
           (*nanos)->label != PROTOBUF_C_LABEL_REPEATED && !((*sec)->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
           !((*nanos)->flags & PROTOBUF_C_FIELD_FLAG_ONEOF);
}

static bool is_timestamp(const ProtobufCMessageDescriptor *d)
{
    const ProtobufCFieldDescriptor *s, *n;
    return timestamp_fields(d, &s, &n);
}

/* protoc's JSON name: each '_' dropped and the character after it upper-cased ("created_at" -> "createdAt"). */
static bool json_name_eq(const char *name, const char *key)
{
    bool up = false;
    for (; *name; name++) {
        char c = *name;
        if (c == '_') {
            up = true;
            continue;
        }
        if (up && c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        up = false;
        if (*key++ != c)
            return false;
    }
    return *key == '\0';
}

static const ProtobufCFieldDescriptor *find_field(const ProtobufCMessageDescriptor *d, const char *key)
{
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(d, key);
    if (f != NULL)
        return f;
    for (unsigned i = 0; i < d->n_fields; i++)
        if (json_name_eq(d->fields[i].name, key))
            return &d->fields[i];
    return NULL;
}

/*
 * protobuf-c 1.4.1 keeps no map_entry option, so a map is recognised by its shape: a repeated message named
 * after the field the way protoc names map entries ("labels" -> Parent.LabelsEntry) with exactly key = 1 and
 * value = 2. A hand-written message of that name and shape is indistinguishable, and is treated as a map.
 */
static bool is_map_field(const ProtobufCMessageDescriptor *parent, const ProtobufCFieldDescriptor *f)
{
    if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE)
        return false;
    const ProtobufCMessageDescriptor *e = f->descriptor;
    if (e->n_fields != 2)
        return false;
    const ProtobufCFieldDescriptor *kf = protobuf_c_message_descriptor_get_field(e, 1);
    const ProtobufCFieldDescriptor *vf = protobuf_c_message_descriptor_get_field(e, 2);
    if (kf == NULL || vf == NULL || strcmp(kf->name, "key") != 0 || strcmp(vf->name, "value") != 0 ||
        kf->label == PROTOBUF_C_LABEL_REPEATED || vf->label == PROTOBUF_C_LABEL_REPEATED ||
        ((kf->flags | vf->flags) & PROTOBUF_C_FIELD_FLAG_ONEOF))
        return false;
    if (!(is_integer_type(kf->type) || kf->type == PROTOBUF_C_TYPE_BOOL || kf->type == PROTOBUF_C_TYPE_STRING))
        return false;
    size_t plen = strlen(parent->name);
    if (strncmp(e->name, parent->name, plen) != 0 || e->name[plen] != '.')
        return false;
    const char *s = e->name + plen + 1;
    bool up = true;
    for (const char *n = f->name; *n; n++) {
        char c = *n;
        if (c == '_') {
            up = true;
            continue;
        }
        if (up && c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        up = false;
        if (*s++ != c)
            return false;
    }
    return strcmp(s, "Entry") == 0;
}

static bool has_repeated_fields(const ProtobufCMessageDescriptor *d)
{
    for (unsigned i = 0; i < d->n_fields; i++)
        if (d->fields[i].label == PROTOBUF_C_LABEL_REPEATED)
            return true;
    return false;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* JSON -> protobuf                                                                                               */
/* ------------------------------------------------------------------------------------------------------------ */

typedef struct tc {
    ProtobufCAllocator *alloc;
    ch_transcode_error_t *err;
    size_t path_len;
    char path[512]; /* the field being parsed, as it will be reported; longer paths are cut */
} tc_t;

/* Copies `src` keeping only whole, valid UTF-8 characters that fit: error texts end up in JSON bodies and logs,
 * so invalid bytes and control characters become '?'. */
static void copy_clean(char *dst, size_t cap, const char *src)
{
    const unsigned char *s = (const unsigned char *)src;
    size_t o = 0;
    while (*s) {
        size_t n = 1;
        unsigned char c = *s;
        bool ok = c >= 0x20 && c != 0x7f;
        if (c >= 0x80) {
            if (c >= 0xc2 && c <= 0xdf)
                n = 2;
            else if (c >= 0xe0 && c <= 0xef)
                n = 3;
            else if (c >= 0xf0 && c <= 0xf4)
                n = 4;
            else
                n = 0;
            for (size_t k = 1; k < n; k++)
                if ((s[k] & 0xc0) != 0x80)
                    n = 0;
            if (n == 3 && ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] >= 0xa0)))
                n = 0;
            if (n == 4 && ((c == 0xf0 && s[1] < 0x90) || (c == 0xf4 && s[1] >= 0x90)))
                n = 0;
            ok = n != 0;
            if (!ok)
                n = 1;
        }
        if (o + n >= cap)
            break;
        if (ok)
            memcpy(dst + o, s, n);
        else
            dst[o] = '?';
        o += ok ? n : 1;
        s += n;
    }
    dst[o] = '\0';
}

static int tc_fail(tc_t *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int tc_fail(tc_t *t, const char *fmt, ...)
{
    if (t->err != NULL) {
        char msg[sizeof(t->err->message) * 2];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        copy_clean(t->err->message, sizeof(t->err->message), msg);
        copy_clean(t->err->field, sizeof(t->err->field), t->path);
    }
    return -1;
}

static void path_put(tc_t *t, const char *s, size_t n)
{
    size_t room = sizeof(t->path) - 1 - t->path_len;
    if (n > room)
        n = room;
    memcpy(t->path + t->path_len, s, n);
    t->path_len += n;
    t->path[t->path_len] = '\0';
}

static void path_set(tc_t *t, size_t len)
{
    t->path_len = len;
    t->path[len] = '\0';
}

/* A message field reads `a.b`; a map key reads `labels["k"]` so that any key stays unambiguous. */
static void path_key(tc_t *t, const char *key, size_t n, bool map_key)
{
    if (!map_key) {
        if (t->path_len)
            path_put(t, ".", 1);
        path_put(t, key, n);
        return;
    }
    path_put(t, "[\"", 2);
    for (size_t i = 0; i < n; i++) {
        if (key[i] == '"' || key[i] == '\\')
            path_put(t, "\\", 1);
        path_put(t, key + i, 1);
    }
    path_put(t, "\"]", 2);
}

static void path_index(tc_t *t, size_t i)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "[%zu]", i);
    path_put(t, tmp, (size_t)n);
}

static void *tc_alloc(tc_t *t, size_t n)
{
    void *p = t->alloc->alloc(t->alloc->allocator_data, n ? n : 1);
    if (p == NULL)
        ch_oom();
    return p;
}

static char *tc_strdup(tc_t *t, const char *s, size_t n)
{
    char *p = tc_alloc(t, n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static ProtobufCMessage *tc_new_message(tc_t *t, const ProtobufCMessageDescriptor *desc)
{
    ProtobufCMessage *m = tc_alloc(t, desc->sizeof_message);
    protobuf_c_message_init(desc, m);
    return m;
}

/* True when n bytes at s are a JSON number; *integer tells whether it has neither fraction nor exponent. */
static bool is_json_number(const char *s, size_t n, bool *integer)
{
    size_t i = 0;
    if (i < n && s[i] == '-')
        i++;
    if (i == n || s[i] < '0' || s[i] > '9')
        return false;
    if (s[i] == '0')
        i++;
    else
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    *integer = true;
    if (i < n && s[i] == '.') {
        *integer = false;
        if (++i == n || s[i] < '0' || s[i] > '9')
            return false;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        *integer = false;
        if (++i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i == n || s[i] < '0' || s[i] > '9')
            return false;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    return i == n;
}

/* Integers travel as sign and magnitude so that every range check below is exact. */
static bool int_in_range(ProtobufCType type, bool neg, uint64_t mag)
{
    switch (type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_ENUM:
        return neg ? mag <= UINT64_C(2147483648) : mag <= INT32_MAX;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        return neg ? mag == 0 : mag <= UINT32_MAX;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        return neg ? mag <= UINT64_C(9223372036854775808) : mag <= INT64_MAX;
    default:
        return !neg || mag == 0;
    }
}

static void int_store(void *dst, ProtobufCType type, bool neg, uint64_t mag)
{
    /* Two's complement wrap of the magnitude gives the negative value without signed overflow at the minimum. */
    uint64_t bits = neg ? (uint64_t)0 - mag : mag;
    switch (elem_size(type)) {
    case 4: {
        uint32_t v = (uint32_t)bits;
        memcpy(dst, &v, 4);
        break;
    }
    default:
        memcpy(dst, &bits, 8);
        break;
    }
}

/* Parses a JSON integer literal (-?(0|[1-9][0-9]*)); returns 0, 1 when it is not one, 2 when it exceeds 2^64-1. */
static int parse_decimal(const char *s, size_t n, bool *neg, uint64_t *mag)
{
    size_t i = 0;
    *neg = false;
    *mag = 0;
    if (i < n && s[i] == '-') {
        *neg = true;
        i++;
    }
    if (i == n || s[i] < '0' || s[i] > '9' || (s[i] == '0' && i + 1 < n))
        return 1;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 1;
        unsigned d = (unsigned)(s[i] - '0');
        if (*mag > (UINT64_MAX - d) / 10) {
            for (; i < n; i++)
                if (s[i] < '0' || s[i] > '9')
                    return 1;
            return 2;
        }
        *mag = *mag * 10 + d;
    }
    return 0;
}

static int real_to_int(tc_t *t, double d, const char *tname, bool *neg, uint64_t *mag)
{
    if (!isfinite(d))
        return tc_fail(t, "expected integer");
    if (d != trunc(d))
        return tc_fail(t, "non-integral value for %s", tname);
    if (fabs(d) >= 18446744073709551616.0)
        return tc_fail(t, "value out of range for %s", tname);
    *neg = signbit(d) != 0;
    *mag = (uint64_t)fabs(d);
    return 0;
}

static int json_to_int(tc_t *t, const json_t *v, const char *tname, bool *neg, uint64_t *mag)
{
    switch (json_typeof(v)) {
    case JSON_INTEGER: {
        json_int_t x = json_integer_value(v);
        *neg = x < 0;
        *mag = x < 0 ? (uint64_t)0 - (uint64_t)x : (uint64_t)x;
        return 0;
    }
    case JSON_REAL:
        return real_to_int(t, json_real_value(v), tname, neg, mag);
    case JSON_STRING: {
        const char *s = json_string_value(v);
        size_t n = json_string_length(v);
        bool integer;
        if (!is_json_number(s, n, &integer))
            return tc_fail(t, "expected integer");
        if (!integer)
            return real_to_int(t, strtod(s, NULL), tname, neg, mag);
        if (parse_decimal(s, n, neg, mag) != 0)
            return tc_fail(t, "value out of range for %s", tname);
        return 0;
    }
    default:
        return tc_fail(t, "expected integer");
    }
}

static int json_to_double(tc_t *t, const json_t *v, const char *tname, double *out)
{
    switch (json_typeof(v)) {
    case JSON_INTEGER:
        *out = (double)json_integer_value(v);
        return 0;
    case JSON_REAL:
        *out = json_real_value(v);
        return 0;
    case JSON_STRING: {
        const char *s = json_string_value(v);
        size_t n = json_string_length(v);
        bool integer;
        if (strcmp(s, "NaN") == 0)
            *out = NAN;
        else if (strcmp(s, "Infinity") == 0)
            *out = INFINITY;
        else if (strcmp(s, "-Infinity") == 0)
            *out = -INFINITY;
        else if (!is_json_number(s, n, &integer))
            return tc_fail(t, "expected number");
        else if (isinf(*out = strtod(s, NULL)))
            return tc_fail(t, "value out of range for %s", tname);
        return 0;
    }
    default:
        return tc_fail(t, "expected number");
    }
}

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+' || c == '-')
        return 62;
    if (c == '/' || c == '_')
        return 63;
    return -1;
}

/* Standard or URL-safe base64, padding optional; `fresh` asks for a non-NULL pointer even for no bytes, since
 * protobuf-c drops a proto3 bytes field whose data is NULL but must keep a oneof member or a list element. */
static bool b64_decode(tc_t *t, const char *s, size_t n, bool fresh, ProtobufCBinaryData *out)
{
    size_t pad = 0;
    while (n > 0 && s[n - 1] == '=' && pad < 2) {
        n--;
        pad++;
    }
    if ((pad && (n + pad) % 4 != 0) || n % 4 == 1)
        return false;
    size_t len = n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0);
    uint8_t *d = len || fresh ? tc_alloc(t, len) : NULL;
    size_t o = 0;
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64_value((unsigned char)s[i]);
        if (v < 0)
            return false;
        acc = acc << 6 | (uint32_t)v;
        if (i % 4 == 3) {
            d[o++] = (uint8_t)(acc >> 16);
            d[o++] = (uint8_t)(acc >> 8);
            d[o++] = (uint8_t)acc;
            acc = 0;
        }
    }
    if (n % 4 == 2) {
        d[o++] = (uint8_t)(acc >> 4);
    } else if (n % 4 == 3) {
        d[o++] = (uint8_t)(acc >> 10);
        d[o++] = (uint8_t)(acc >> 2);
    }
    out->len = len;
    out->data = d;
    return true;
}

static bool digits(const char *s, size_t n, unsigned *out)
{
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    *out = v;
    return true;
}

/* RFC 3339 with 'Z' or a numeric offset and up to nine fraction digits; leap seconds (:60) are refused, as
 * google.protobuf.Timestamp smears them. */
static bool parse_rfc3339(const char *s, size_t n, int64_t *seconds, int32_t *nanos)
{
    unsigned y, mo, d, h, mi, sec, ns = 0;
    if (n < 20 || !digits(s, 4, &y) || s[4] != '-' || !digits(s + 5, 2, &mo) || s[7] != '-' || !digits(s + 8, 2, &d) ||
        (s[10] != 'T' && s[10] != 't') || !digits(s + 11, 2, &h) || s[13] != ':' || !digits(s + 14, 2, &mi) ||
        s[16] != ':' || !digits(s + 17, 2, &sec))
        return false;
    size_t i = 19;
    if (s[i] == '.') {
        size_t start = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        size_t nd = i - start;
        if (nd == 0 || nd > 9)
            return false;
        digits(s + start, nd, &ns);
        for (; nd < 9; nd++)
            ns *= 10;
    }
    int64_t offset = 0;
    if (i < n && (s[i] == 'Z' || s[i] == 'z')) {
        i++;
    } else if (i < n && (s[i] == '+' || s[i] == '-')) {
        unsigned oh, om;
        if (n - i < 6 || !digits(s + i + 1, 2, &oh) || s[i + 3] != ':' || !digits(s + i + 4, 2, &om) || oh > 23 ||
            om > 59)
            return false;
        offset = (int64_t)(oh * 3600 + om * 60) * (s[i] == '-' ? -1 : 1);
        i += 6;
    } else {
        return false;
    }
    static const unsigned mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (i != n || y < 1 || mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || sec > 59)
        return false;
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > mdays[mo - 1] + (mo == 2 && leap))
        return false;
    int64_t v = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset;
    if (v < CH_TS_MIN_SECONDS || v > CH_TS_MAX_SECONDS)
        return false;
    *seconds = v;
    *nanos = (int32_t)ns;
    return true;
}

static int parse_object(tc_t *t, const ProtobufCMessageDescriptor *desc, json_t *v, ProtobufCMessage **dst, int depth);

/* A message-typed value: a Timestamp is an RFC 3339 string, everything else an object. */
static int parse_message_value(tc_t *t, const ProtobufCMessageDescriptor *desc, json_t *v, ProtobufCMessage **dst,
                               int depth)
{
    const ProtobufCFieldDescriptor *fs, *fn;
    if (!timestamp_fields(desc, &fs, &fn))
        return parse_object(t, desc, v, dst, depth);
    if (!json_is_string(v))
        return tc_fail(t, "expected string");
    int64_t sec;
    int32_t nanos;
    if (!parse_rfc3339(json_string_value(v), json_string_length(v), &sec, &nanos))
        return tc_fail(t, "invalid RFC 3339 timestamp");
    ProtobufCMessage *m = tc_new_message(t, desc);
    memcpy((char *)m + fs->offset, &sec, sizeof(sec));
    memcpy((char *)m + fn->offset, &nanos, sizeof(nanos));
    *dst = m;
    return 0;
}

/*
 * Parses one value of field `f` (an element when the field is repeated) into `dst`. `fresh` is set for oneof
 * members and list elements: their empty strings and bytes get their own allocation, because protobuf-c skips a
 * oneof string equal to the default pointer and frees every list element it is asked to free.
 */
static int parse_value(tc_t *t, const ProtobufCFieldDescriptor *f, json_t *v, void *dst, bool fresh, int depth)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: {
        bool neg;
        uint64_t mag;
        const char *tname = type_name(f->type);
        if (json_to_int(t, v, tname, &neg, &mag) < 0)
            return -1;
        if (!int_in_range(f->type, neg, mag))
            return tc_fail(t, "value out of range for %s", tname);
        int_store(dst, f->type, neg, mag);
        return 0;
    }
    case PROTOBUF_C_TYPE_FLOAT: {
        double d;
        if (json_to_double(t, v, "float", &d) < 0)
            return -1;
        /* Up to half a unit in the last place above FLT_MAX still rounds to FLT_MAX, and "%.9g" of FLT_MAX is
         * such a value: refusing it would break round trips. */
        if (isfinite(d) && fabs(d) >= (double)FLT_MAX + 0x1p103)
            return tc_fail(t, "value out of range for float");
        if (isfinite(d) && fabs(d) > FLT_MAX)
            *(float *)dst = d < 0 ? -FLT_MAX : FLT_MAX;
        else
            *(float *)dst = (float)d;
        return 0;
    }
    case PROTOBUF_C_TYPE_DOUBLE:
        return json_to_double(t, v, "double", (double *)dst);
    case PROTOBUF_C_TYPE_BOOL:
        if (!json_is_boolean(v))
            return tc_fail(t, "expected boolean");
        *(protobuf_c_boolean *)dst = json_is_true(v);
        return 0;
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumDescriptor *ed = f->descriptor;
        if (json_is_string(v)) {
            const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value_by_name(ed, json_string_value(v));
            if (ev == NULL)
                return tc_fail(t, "unknown value for enum %s", ed->short_name);
            int32_t x = ev->value;
            memcpy(dst, &x, 4);
            return 0;
        }
        if (!json_is_number(v))
            return tc_fail(t, "expected enum name or number");
        /* proto3 enums are open: any int32 is kept, and written back as a number when it has no name. */
        bool neg;
        uint64_t mag;
        if (json_to_int(t, v, "enum", &neg, &mag) < 0)
            return -1;
        if (!int_in_range(PROTOBUF_C_TYPE_ENUM, neg, mag))
            return tc_fail(t, "value out of range for enum");
        int_store(dst, PROTOBUF_C_TYPE_ENUM, neg, mag);
        return 0;
    }
    case PROTOBUF_C_TYPE_STRING: {
        if (!json_is_string(v))
            return tc_fail(t, "expected string");
        size_t n = json_string_length(v);
        *(char **)dst = n || fresh ? tc_strdup(t, json_string_value(v), n) : (char *)protobuf_c_empty_string;
        return 0;
    }
    case PROTOBUF_C_TYPE_BYTES:
        if (!json_is_string(v))
            return tc_fail(t, "expected string");
        if (!b64_decode(t, json_string_value(v), json_string_length(v), fresh, dst))
            return tc_fail(t, "invalid base64");
        return 0;
    case PROTOBUF_C_TYPE_MESSAGE:
        return parse_message_value(t, f->descriptor, v, dst, depth);
    }
    return tc_fail(t, "unsupported field type");
}

/* proto2 optional scalars carry a has_ flag; proto3 fields and pointer-typed fields have none. */
static void mark_present(ProtobufCMessage *msg, const ProtobufCFieldDescriptor *f)
{
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->type != PROTOBUF_C_TYPE_MESSAGE &&
        f->type != PROTOBUF_C_TYPE_STRING && !(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
        *(protobuf_c_boolean *)((char *)msg + f->quantifier_offset) = 1;
}

/*
 * Every field is written back, empty lists and maps included, one level below its message. A message at the
 * deepest allowed level with a repeated field would therefore encode to JSON our own parser refuses; refusing
 * it here keeps every accepted document re-parseable after a round trip.
 */
static bool too_deep_for_output(const ProtobufCMessageDescriptor *desc, int depth)
{
    return depth > CH_TRANSCODE_MAX_DEPTH || (depth == CH_TRANSCODE_MAX_DEPTH && has_repeated_fields(desc));
}

static int parse_map_key(tc_t *t, const ProtobufCFieldDescriptor *kf, const char *key, void *dst)
{
    size_t n = strlen(key);
    if (kf->type == PROTOBUF_C_TYPE_STRING) {
        *(char **)dst = n ? tc_strdup(t, key, n) : (char *)protobuf_c_empty_string;
        return 0;
    }
    if (kf->type == PROTOBUF_C_TYPE_BOOL) {
        if (strcmp(key, "true") != 0 && strcmp(key, "false") != 0)
            return tc_fail(t, "invalid map key");
        *(protobuf_c_boolean *)dst = key[0] == 't';
        return 0;
    }
    /* Only the canonical spelling is taken ("-0" is not), so two distinct JSON keys never make one map key. */
    bool neg;
    uint64_t mag;
    int rc = parse_decimal(key, n, &neg, &mag);
    if (rc == 1 || (neg && mag == 0))
        return tc_fail(t, "invalid map key");
    if (rc == 2 || !int_in_range(kf->type, neg, mag))
        return tc_fail(t, "value out of range for %s", type_name(kf->type));
    int_store(dst, kf->type, neg, mag);
    return 0;
}

static int parse_map(tc_t *t, const ProtobufCFieldDescriptor *f, json_t *v, ProtobufCMessage *msg, int depth)
{
    if (!json_is_object(v))
        return tc_fail(t, "expected object");
    size_t n = json_object_size(v);
    if (n == 0)
        return 0;
    const ProtobufCMessageDescriptor *entry = f->descriptor;
    const ProtobufCFieldDescriptor *kf = protobuf_c_message_descriptor_get_field(entry, 1);
    const ProtobufCFieldDescriptor *vf = protobuf_c_message_descriptor_get_field(entry, 2);
    ProtobufCMessage **arr = tc_alloc(t, n * sizeof(*arr));
    size_t i = 0, mark = t->path_len;
    /* jansson keeps insertion order, so errors name the first offending key of the document. */
    for (void *it = json_object_iter(v); it != NULL; it = json_object_iter_next(v, it)) {
        const char *key = json_object_iter_key(it);
        json_t *val = json_object_iter_value(it);
        path_key(t, key, strlen(key), true);
        ProtobufCMessage *e = tc_new_message(t, entry);
        if (parse_map_key(t, kf, key, (char *)e + kf->offset) < 0)
            return -1;
        mark_present(e, kf);
        if (json_is_null(val)) {
            /* An absent message value is written back as the default message, which must fit the depth too. */
            if (vf->type == PROTOBUF_C_TYPE_MESSAGE && !is_timestamp(vf->descriptor) &&
                too_deep_for_output(vf->descriptor, depth + 1))
                return tc_fail(t, "nesting too deep");
        } else {
            if (parse_value(t, vf, val, (char *)e + vf->offset, false, depth + 1) < 0)
                return -1;
            mark_present(e, vf);
        }
        arr[i++] = e;
        path_set(t, mark);
    }
    *(size_t *)((char *)msg + f->quantifier_offset) = i;
    *(ProtobufCMessage ***)((char *)msg + f->offset) = arr;
    return 0;
}

static int parse_list(tc_t *t, const ProtobufCFieldDescriptor *f, json_t *v, ProtobufCMessage *msg, int depth)
{
    if (!json_is_array(v))
        return tc_fail(t, "expected array");
    size_t n = json_array_size(v);
    if (n == 0)
        return 0;
    size_t esz = elem_size(f->type);
    char *arr = tc_alloc(t, n * esz);
    memset(arr, 0, n * esz);
    size_t mark = t->path_len;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);
        path_index(t, i);
        if (json_is_null(e))
            return tc_fail(t, "null is not allowed in a list");
        if (parse_value(t, f, e, arr + i * esz, true, depth + 1) < 0)
            return -1;
        path_set(t, mark);
    }
    *(size_t *)((char *)msg + f->quantifier_offset) = n;
    *(void **)((char *)msg + f->offset) = arr;
    return 0;
}

/* `depth` is the JSON nesting of the value `v` (the top-level object is 1). */
static int parse_field(tc_t *t, const ProtobufCMessageDescriptor *desc, ProtobufCMessage *msg,
                       const ProtobufCFieldDescriptor *f, json_t *v, int depth)
{
    if (json_is_null(v))
        return 0;
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
        if (is_map_field(desc, f))
            return parse_map(t, f, v, msg, depth);
        return parse_list(t, f, v, msg, depth);
    }
    void *member = (char *)msg + f->offset;
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
        uint32_t *which = (uint32_t *)((char *)msg + f->quantifier_offset);
        if (*which != 0)
            return tc_fail(t, "another field of the same oneof is already set");
        if (parse_value(t, f, v, member, true, depth) < 0)
            return -1;
        *which = f->id;
        return 0;
    }
    if (parse_value(t, f, v, member, false, depth) < 0)
        return -1;
    mark_present(msg, f);
    return 0;
}

static int parse_object(tc_t *t, const ProtobufCMessageDescriptor *desc, json_t *v, ProtobufCMessage **dst, int depth)
{
    if (!json_is_object(v))
        return tc_fail(t, "expected object");
    if (too_deep_for_output(desc, depth))
        return tc_fail(t, "nesting too deep");
    ProtobufCMessage *msg = tc_new_message(t, desc);
    *dst = msg;
    /* "a_b" and "aB" name the same field; seen[] catches the second spelling, which jansson cannot. */
    uint64_t seen_small[8] = {0};
    uint64_t *seen = seen_small;
    if (desc->n_fields > 64 * 8) {
        seen = calloc((desc->n_fields + 63) / 64, sizeof(*seen));
        if (seen == NULL)
            ch_oom();
    }
    int rc = 0;
    size_t mark = t->path_len;
    for (void *it = json_object_iter(v); it != NULL; it = json_object_iter_next(v, it)) {
        const char *key = json_object_iter_key(it);
        json_t *val = json_object_iter_value(it);
        path_key(t, key, strlen(key), false);
        const ProtobufCFieldDescriptor *f = find_field(desc, key);
        if (f == NULL) {
            rc = tc_fail(t, "unknown field");
            break;
        }
        size_t idx = (size_t)(f - desc->fields);
        if (seen[idx / 64] & (UINT64_C(1) << (idx % 64))) {
            rc = tc_fail(t, "duplicate key");
            break;
        }
        seen[idx / 64] |= UINT64_C(1) << (idx % 64);
        if ((rc = parse_field(t, desc, msg, f, val, depth + 1)) < 0)
            break;
        path_set(t, mark);
    }
    if (seen != seen_small)
        free(seen);
    return rc;
}

/* Refuses deep documents before jansson recurses into them: brackets outside strings, counted on the raw bytes. */
static bool nests_too_deep(const char *s, size_t n)
{
    size_t depth = 0;
    bool in_string = false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (in_string) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '{' || c == '[') {
            if (++depth > CH_TRANSCODE_MAX_DEPTH)
                return true;
        } else if ((c == '}' || c == ']') && depth > 0) {
            depth--;
        }
    }
    return false;
}

/* Decodes the body of a JSON string (between the quotes) into out[cap]; false when it had to be cut. */
static bool decode_json_string(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        char tmp[4];
        size_t tn = 1;
        unsigned char c = (unsigned char)s[i++];
        tmp[0] = (char)c;
        if (c == '\\' && i < n) {
            char e = s[i++];
            uint32_t cp = 0;
            switch (e) {
            case 'b':
                tmp[0] = '\b';
                break;
            case 'f':
                tmp[0] = '\f';
                break;
            case 'n':
                tmp[0] = '\n';
                break;
            case 'r':
                tmp[0] = '\r';
                break;
            case 't':
                tmp[0] = '\t';
                break;
            case 'u':
                for (size_t k = 0; k < 4 && i < n; k++, i++) {
                    char h = s[i];
                    cp = cp << 4 | (uint32_t)(h <= '9' ? h - '0' : (h | 0x20) - 'a' + 10);
                }
                if (cp >= 0xd800 && cp <= 0xdbff && i + 6 <= n && s[i] == '\\' && s[i + 1] == 'u') {
                    uint32_t lo = 0;
                    for (size_t k = 0; k < 4; k++) {
                        char h = s[i + 2 + k];
                        lo = lo << 4 | (uint32_t)(h <= '9' ? h - '0' : (h | 0x20) - 'a' + 10);
                    }
                    if (lo >= 0xdc00 && lo <= 0xdfff) {
                        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                        i += 6;
                    }
                }
                cp &= 0x1fffff;
                if (cp < 0x80) {
                    tmp[0] = (char)cp;
                } else if (cp < 0x800) {
                    tmp[0] = (char)(0xc0 | cp >> 6);
                    tmp[1] = (char)(0x80 | (cp & 0x3f));
                    tn = 2;
                } else if (cp < 0x10000) {
                    tmp[0] = (char)(0xe0 | cp >> 12);
                    tmp[1] = (char)(0x80 | (cp >> 6 & 0x3f));
                    tmp[2] = (char)(0x80 | (cp & 0x3f));
                    tn = 3;
                } else {
                    tmp[0] = (char)(0xf0 | cp >> 18);
                    tmp[1] = (char)(0x80 | (cp >> 12 & 0x3f));
                    tmp[2] = (char)(0x80 | (cp >> 6 & 0x3f));
                    tmp[3] = (char)(0x80 | (cp & 0x3f));
                    tn = 4;
                }
                break;
            default:
                tmp[0] = e;
                break;
            }
        }
        if (o + tn >= cap) {
            out[o] = '\0';
            return false;
        }
        memcpy(out + o, tmp, tn);
        o += tn;
    }
    out[o] = '\0';
    return true;
}

enum { SCAN_NONE, SCAN_MESSAGE, SCAN_MAP, SCAN_LIST };

typedef struct scan_frame {
    int kind;
    bool object, expect_key;
    const ProtobufCMessageDescriptor *msg;  /* SCAN_MESSAGE */
    const ProtobufCFieldDescriptor *field;  /* SCAN_MAP, SCAN_LIST: the field the container is the value of */
    const ProtobufCFieldDescriptor *target; /* where the next value goes, NULL when unknown */
    bool target_whole;                      /* the value is the whole repeated field, not one element */
    bool target_map;
    size_t base; /* path length before this container's keys or indices */
    size_t index;
} scan_frame_t;

static bool number_overflows(const char *s, size_t n)
{
    bool integer;
    if (!is_json_number(s, n, &integer))
        return false;
    if (integer)
        return n - (s[0] == '-') > 18;
    char *copy = malloc(n + 1);
    if (copy == NULL)
        ch_oom();
    memcpy(copy, s, n);
    copy[n] = '\0';
    bool inf = isinf(strtod(copy, NULL));
    free(copy);
    return inf;
}

/*
 * Walks raw JSON bytes with the descriptors alongside, for what jansson reports only as a byte position. Up to
 * `stop` it leaves in t->path the field being read there (jansson's duplicate-key error points just past the
 * key). With `out` it copies the whole document, quoting the numbers jansson cannot hold (integers beyond 64
 * bits, reals beyond double) wherever a numeric field receives them: every numeric field takes numeric strings
 * too, so uint64 values above 2^63 parse and the others get a range error naming their field.
 */
static void scan_json(tc_t *t, const ProtobufCMessageDescriptor *root, const char *s, size_t len, size_t stop,
                      ch_buf_t *out)
{
    scan_frame_t frames[CH_TRANSCODE_MAX_DEPTH + 1];
    int depth = 0;
    size_t i = 0, copied = 0;
    path_set(t, 0);
    while (i < stop && i < len) {
        char c = s[i];
        scan_frame_t *top = depth ? &frames[depth - 1] : NULL;
        if (c == '{' || c == '[') {
            if (depth == (int)(sizeof(frames) / sizeof(frames[0])))
                break;
            scan_frame_t nf = {.kind = SCAN_NONE, .object = c == '{', .expect_key = c == '{', .base = t->path_len};
            const ProtobufCFieldDescriptor *f = top ? top->target : NULL;
            if (top == NULL && c == '{') {
                nf.kind = SCAN_MESSAGE;
                nf.msg = root;
            } else if (f != NULL && c == '{' && top->target_map) {
                nf.kind = SCAN_MAP;
                nf.field = f;
            } else if (f != NULL && c == '{' && !top->target_whole && f->type == PROTOBUF_C_TYPE_MESSAGE) {
                nf.kind = SCAN_MESSAGE;
                nf.msg = f->descriptor;
            } else if (f != NULL && c == '[' && top->target_whole && !top->target_map) {
                nf.kind = SCAN_LIST;
                nf.field = f;
                nf.target = f;
            }
            if (c == '[')
                path_index(t, 0);
            frames[depth++] = nf;
            i++;
        } else if (c == '}' || c == ']') {
            if (depth) {
                path_set(t, frames[depth - 1].base);
                depth--;
            }
            i++;
        } else if (c == ',') {
            if (top != NULL && top->object) {
                top->expect_key = true;
                path_set(t, top->base);
            } else if (top != NULL) {
                path_set(t, top->base);
                path_index(t, ++top->index);
            }
            i++;
        } else if (c == '"') {
            size_t start = ++i;
            while (i < len && s[i] != '"')
                i += s[i] == '\\' ? 2 : 1;
            size_t end = i < len ? i : len;
            i = end + 1;
            if (top != NULL && top->object && top->expect_key) {
                char key[256];
                bool whole = decode_json_string(s + start, end - start, key, sizeof(key));
                path_set(t, top->base);
                path_key(t, key, strlen(key), top->kind == SCAN_MAP);
                top->expect_key = false;
                top->target = NULL;
                top->target_whole = top->target_map = false;
                if (top->kind == SCAN_MESSAGE && whole && (top->target = find_field(top->msg, key)) != NULL) {
                    top->target_whole = top->target->label == PROTOBUF_C_LABEL_REPEATED;
                    top->target_map = top->target_whole && is_map_field(top->msg, top->target);
                } else if (top->kind == SCAN_MAP) {
                    top->target = protobuf_c_message_descriptor_get_field(top->field->descriptor, 2);
                }
            }
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            size_t start = i;
            while (i < len && s[i] != '\0' && strchr("+-.eE0123456789", s[i]) != NULL)
                i++;
            if (out != NULL && top != NULL && top->target != NULL && !top->target_whole &&
                is_number_type(top->target->type) && number_overflows(s + start, i - start)) {
                ch_buf_append(out, s + copied, start - copied);
                ch_buf_append(out, "\"", 1);
                ch_buf_append(out, s + start, i - start);
                ch_buf_append(out, "\"", 1);
                copied = i;
            }
        } else {
            i++;
        }
    }
    if (out != NULL)
        ch_buf_append(out, s + copied, len - copied);
}

ProtobufCMessage *ch_json_to_pb(const ProtobufCMessageDescriptor *desc, const char *json, size_t len,
                                ProtobufCAllocator *alloc, ch_transcode_error_t *err)
{
    tc_t t;
    t.alloc = alloc;
    t.err = err;
    path_set(&t, 0);
    if (err != NULL)
        err->field[0] = err->message[0] = '\0';
    if (len == 0)
        return tc_new_message(&t, desc);
    if (nests_too_deep(json, len)) {
        tc_fail(&t, "nesting too deep");
        return NULL;
    }

    json_error_t je;
    ch_buf_t quoted = {0};
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (root == NULL && json_error_code(&je) == json_error_numeric_overflow) {
        scan_json(&t, desc, json, len, len, &quoted);
        json = quoted.base;
        len = quoted.len;
        root = json_loadb(json, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    }
    if (root == NULL) {
        if (json_error_code(&je) == json_error_duplicate_key) {
            scan_json(&t, desc, json, len, je.position > 0 ? (size_t)je.position : 0, NULL);
            tc_fail(&t, "duplicate key");
        } else {
            path_set(&t, 0);
            tc_fail(&t, "invalid JSON at line %d column %d: %s", je.line, je.column, je.text);
        }
        ch_buf_free(&quoted);
        return NULL;
    }
    path_set(&t, 0);
    ProtobufCMessage *msg = NULL;
    int rc = parse_message_value(&t, desc, root, &msg, 1);
    json_decref(root);
    ch_buf_free(&quoted);
    return rc == 0 ? msg : NULL;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* protobuf -> JSON                                                                                               */
/* ------------------------------------------------------------------------------------------------------------ */

#define PUT_LIT(out, lit) ch_buf_append((out), (lit), sizeof(lit) - 1)

static void put_u64(ch_buf_t *out, uint64_t v, bool neg, bool quoted)
{
    char tmp[24];
    char *p = tmp + sizeof(tmp);
    if (quoted)
        *--p = '"';
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (neg)
        *--p = '-';
    if (quoted)
        *--p = '"';
    ch_buf_append(out, p, (size_t)(tmp + sizeof(tmp) - p));
}

static void put_i64(ch_buf_t *out, int64_t v, bool quoted)
{
    put_u64(out, v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v, v < 0, quoted);
}

/* Length of the valid UTF-8 sequence at p, 0 when it is not one (overlong forms and surrogates included). The
 * string's NUL stops every look-ahead, as it is never a continuation byte. */
static size_t utf8_len(const unsigned char *p)
{
    unsigned char c = p[0];
    if (c >= 0xc2 && c <= 0xdf)
        return (p[1] & 0xc0) == 0x80 ? 2 : 0;
    if (c >= 0xe0 && c <= 0xef) {
        if ((p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80)
            return 0;
        if ((c == 0xe0 && p[1] < 0xa0) || (c == 0xed && p[1] >= 0xa0))
            return 0;
        return 3;
    }
    if (c >= 0xf0 && c <= 0xf4) {
        if ((p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 || (p[3] & 0xc0) != 0x80)
            return 0;
        if ((c == 0xf0 && p[1] < 0x90) || (c == 0xf4 && p[1] >= 0x90))
            return 0;
        return 4;
    }
    return 0;
}

/*
 * Writes a JSON string. UTF-8 passes through as is, except U+2028 and U+2029 (line breaks to JavaScript) which
 * are escaped. protobuf-c does not validate UTF-8 when it decodes, so a byte that starts no valid sequence
 * becomes U+FFFD rather than making the whole document invalid.
 */
static void emit_string(ch_buf_t *out, const char *str)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)(str ? str : "");
    const unsigned char *run = p;
    PUT_LIT(out, "\"");
    for (;;) {
        unsigned char c = *p;
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            p++;
            continue;
        }
        if (c == 0)
            break;
        if (c >= 0x80) {
            size_t n = utf8_len(p);
            if (n != 0 && !(n == 3 && c == 0xe2 && p[1] == 0x80 && (p[2] == 0xa8 || p[2] == 0xa9))) {
                p += n;
                continue;
            }
            ch_buf_append(out, run, (size_t)(p - run));
            if (n == 0) {
                PUT_LIT(out, "\\ufffd");
                p++;
            } else {
                ch_buf_append(out, p[2] == 0xa8 ? "\\u2028" : "\\u2029", 6);
                p += 3;
            }
            run = p;
            continue;
        }
        ch_buf_append(out, run, (size_t)(p - run));
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t en = 2;
        switch (c) {
        case '"':
            esc[1] = '"';
            break;
        case '\\':
            esc[1] = '\\';
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            en = 6;
            break;
        }
        ch_buf_append(out, esc, en);
        run = ++p;
    }
    ch_buf_append(out, run, (size_t)(p - run));
    PUT_LIT(out, "\"");
}

static void emit_base64(ch_buf_t *out, const ProtobufCBinaryData *bd)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n = bd->data ? bd->len : 0;
    const uint8_t *s = bd->data;
    ch_buf_reserve(out, (n + 2) / 3 * 4 + 2);
    char *o = out->base + out->len;
    *o++ = '"';
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[v >> 12 & 63];
        *o++ = alphabet[v >> 6 & 63];
        *o++ = alphabet[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)s[i] << 16;
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[v >> 12 & 63];
        *o++ = '=';
        *o++ = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8;
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[v >> 12 & 63];
        *o++ = alphabet[v >> 6 & 63];
        *o++ = '=';
    }
    *o++ = '"';
    out->len = (size_t)(o - out->base);
    out->base[out->len] = '\0';
}

/* Non-finite values are the proto3 strings; -0 keeps its sign as "-0.0" (jansson reads "-0" as the integer 0);
 * otherwise the shortest %g that reads back to the same value, so a round trip is exact. */
static bool emit_special(ch_buf_t *out, double d)
{
    if (isnan(d))
        PUT_LIT(out, "\"NaN\"");
    else if (isinf(d))
        d > 0 ? PUT_LIT(out, "\"Infinity\"") : PUT_LIT(out, "\"-Infinity\"");
    else if (d == 0)
        signbit(d) ? PUT_LIT(out, "-0.0") : PUT_LIT(out, "0");
    else
        return false;
    return true;
}

static void emit_double(ch_buf_t *out, double d)
{
    if (emit_special(out, d))
        return;
    char tmp[40];
    int n = 0;
    for (int prec = 15; prec <= 17; prec++) {
        n = snprintf(tmp, sizeof(tmp), "%.*g", prec, d);
        if (strtod(tmp, NULL) == d)
            break;
    }
    ch_buf_append(out, tmp, (size_t)n);
}

static void emit_float(ch_buf_t *out, float f)
{
    if (emit_special(out, f))
        return;
    char tmp[40];
    int n = 0;
    for (int prec = 6; prec <= 9; prec++) {
        n = snprintf(tmp, sizeof(tmp), "%.*g", prec, (double)f);
        if ((float)strtod(tmp, NULL) == f)
            break;
    }
    ch_buf_append(out, tmp, (size_t)n);
}

static void two(char *p, unsigned v)
{
    p[0] = (char)('0' + v / 10 % 10);
    p[1] = (char)('0' + v % 10);
}

/* Always UTC with 'Z'; the fraction only when there is one, in 3, 6 or 9 digits. Values outside the
 * Timestamp range (only a caller's bug makes them) are normalised and clamped so the output stays parseable. */
static void emit_timestamp(ch_buf_t *out, int64_t sec, int32_t nanos)
{
    if (nanos < 0 || nanos > 999999999) {
        int64_t carry = nanos / 1000000000;
        nanos %= 1000000000;
        if (nanos < 0) {
            nanos += 1000000000;
            carry--;
        }
        sec = sec < CH_TS_MIN_SECONDS ? CH_TS_MIN_SECONDS : sec > CH_TS_MAX_SECONDS ? CH_TS_MAX_SECONDS : sec;
        sec += carry;
    }
    if (sec < CH_TS_MIN_SECONDS) {
        sec = CH_TS_MIN_SECONDS;
        nanos = 0;
    } else if (sec > CH_TS_MAX_SECONDS) {
        sec = CH_TS_MAX_SECONDS;
        nanos = 999999999;
    }
    int64_t days = sec >= 0 ? sec / 86400 : -((-sec + 86399) / 86400);
    int64_t rem = sec - days * 86400;
    int64_t y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    char tmp[40];
    tmp[0] = '"';
    two(tmp + 1, (unsigned)(y / 100));
    two(tmp + 3, (unsigned)(y % 100));
    tmp[5] = '-';
    two(tmp + 6, m);
    tmp[8] = '-';
    two(tmp + 9, d);
    tmp[11] = 'T';
    two(tmp + 12, (unsigned)(rem / 3600));
    tmp[14] = ':';
    two(tmp + 15, (unsigned)(rem / 60 % 60));
    tmp[17] = ':';
    two(tmp + 18, (unsigned)(rem % 60));
    size_t n = 20;
    if (nanos != 0) {
        unsigned v = (unsigned)nanos, nd = 9;
        if (v % 1000000 == 0) {
            v /= 1000000;
            nd = 3;
        } else if (v % 1000 == 0) {
            v /= 1000;
            nd = 6;
        }
        tmp[n++] = '.';
        for (unsigned k = nd; k > 0; k--) {
            tmp[n + k - 1] = (char)('0' + v % 10);
            v /= 10;
        }
        n += nd;
    }
    tmp[n++] = 'Z';
    tmp[n++] = '"';
    ch_buf_append(out, tmp, n);
}

static void emit_message(ch_buf_t *out, const ProtobufCMessage *msg, int depth);

/* An unset message where JSON needs a value (a map value or a list element) is written as the default message. */
static void emit_message_ptr(ch_buf_t *out, const ProtobufCMessage *msg, const ProtobufCMessageDescriptor *desc,
                             int depth)
{
    if (msg != NULL) {
        emit_message(out, msg, depth);
        return;
    }
    ProtobufCMessage *tmp = malloc(desc->sizeof_message);
    if (tmp == NULL)
        ch_oom();
    protobuf_c_message_init(desc, tmp);
    emit_message(out, tmp, depth);
    free(tmp);
}

static void emit_value(ch_buf_t *out, const ProtobufCFieldDescriptor *f, const void *p, int depth)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        put_i64(out, *(const int32_t *)p, false);
        break;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        put_u64(out, *(const uint32_t *)p, false, false);
        break;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        put_i64(out, *(const int64_t *)p, true);
        break;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        put_u64(out, *(const uint64_t *)p, false, true);
        break;
    case PROTOBUF_C_TYPE_FLOAT:
        emit_float(out, *(const float *)p);
        break;
    case PROTOBUF_C_TYPE_DOUBLE:
        emit_double(out, *(const double *)p);
        break;
    case PROTOBUF_C_TYPE_BOOL:
        *(const protobuf_c_boolean *)p ? PUT_LIT(out, "true") : PUT_LIT(out, "false");
        break;
    case PROTOBUF_C_TYPE_ENUM: {
        int32_t v;
        memcpy(&v, p, 4);
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
        if (ev != NULL)
            emit_string(out, ev->name);
        else
            put_i64(out, v, false);
        break;
    }
    case PROTOBUF_C_TYPE_STRING:
        emit_string(out, *(char *const *)p);
        break;
    case PROTOBUF_C_TYPE_BYTES:
        emit_base64(out, p);
        break;
    case PROTOBUF_C_TYPE_MESSAGE:
        emit_message_ptr(out, *(ProtobufCMessage *const *)p, f->descriptor, depth);
        break;
    }
}

static void emit_map_key(ch_buf_t *out, const ProtobufCFieldDescriptor *kf, const void *p)
{
    if (kf->type == PROTOBUF_C_TYPE_STRING)
        emit_string(out, *(char *const *)p);
    else if (kf->type == PROTOBUF_C_TYPE_BOOL)
        *(const protobuf_c_boolean *)p ? PUT_LIT(out, "\"true\"") : PUT_LIT(out, "\"false\"");
    else if (elem_size(kf->type) == 8)
        emit_value(out, kf, p, 0); /* already a quoted string */
    else if (kf->type == PROTOBUF_C_TYPE_UINT32 || kf->type == PROTOBUF_C_TYPE_FIXED32)
        put_u64(out, *(const uint32_t *)p, false, true);
    else
        put_i64(out, *(const int32_t *)p, true);
}

static int map_key_cmp(const ProtobufCFieldDescriptor *kf, const ProtobufCMessage *a, const ProtobufCMessage *b)
{
    const char *pa = (const char *)a + kf->offset, *pb = (const char *)b + kf->offset;
    switch (kf->type) {
    case PROTOBUF_C_TYPE_STRING: {
        const char *sa = *(char *const *)pa, *sb = *(char *const *)pb;
        return strcmp(sa ? sa : "", sb ? sb : "");
    }
    case PROTOBUF_C_TYPE_BOOL:
        return (*(const protobuf_c_boolean *)pa != 0) - (*(const protobuf_c_boolean *)pb != 0);
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: {
        int32_t x = *(const int32_t *)pa, y = *(const int32_t *)pb;
        return (x > y) - (x < y);
    }
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: {
        uint32_t x = *(const uint32_t *)pa, y = *(const uint32_t *)pb;
        return (x > y) - (x < y);
    }
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: {
        int64_t x = *(const int64_t *)pa, y = *(const int64_t *)pb;
        return (x > y) - (x < y);
    }
    default: {
        uint64_t x = *(const uint64_t *)pa, y = *(const uint64_t *)pb;
        return (x > y) - (x < y);
    }
    }
}

typedef struct map_sort {
    const ProtobufCFieldDescriptor *kf;
    ProtobufCMessage *const *entries;
} map_sort_t;

/* qsort has no context argument; the encoder is re-entrant per thread, so the context is thread-local. */
static _Thread_local const map_sort_t *map_sort_ctx;

static int map_index_cmp(const void *a, const void *b)
{
    size_t ia = *(const size_t *)a, ib = *(const size_t *)b;
    int c = map_key_cmp(map_sort_ctx->kf, map_sort_ctx->entries[ia], map_sort_ctx->entries[ib]);
    return c ? c : (ia > ib) - (ia < ib);
}

/*
 * A binary message may repeat a map key (the last one wins in protobuf); JSON must not, or our own parser would
 * refuse the output. Marks in skip[] every entry that a later one with the same key overrides.
 */
static void map_find_overridden(const ProtobufCFieldDescriptor *kf, ProtobufCMessage *const *entries, size_t n,
                                bool *skip)
{
    if (n <= 16) {
        for (size_t i = 0; i < n; i++)
            for (size_t j = i + 1; j < n && !skip[i]; j++)
                if (entries[i] && entries[j] && map_key_cmp(kf, entries[i], entries[j]) == 0)
                    skip[i] = true;
        return;
    }
    size_t *idx = malloc(n * sizeof(*idx));
    if (idx == NULL)
        ch_oom();
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (entries[i])
            idx[m++] = i;
    map_sort_t ctx = {kf, entries};
    const map_sort_t *saved = map_sort_ctx;
    map_sort_ctx = &ctx;
    qsort(idx, m, sizeof(*idx), map_index_cmp);
    map_sort_ctx = saved;
    for (size_t k = 0; k + 1 < m; k++)
        if (map_key_cmp(kf, entries[idx[k]], entries[idx[k + 1]]) == 0)
            skip[idx[k]] = true;
    free(idx);
}

static void emit_map(ch_buf_t *out, const ProtobufCFieldDescriptor *f, ProtobufCMessage *const *entries, size_t n,
                     int depth)
{
    const ProtobufCMessageDescriptor *entry = f->descriptor;
    const ProtobufCFieldDescriptor *kf = protobuf_c_message_descriptor_get_field(entry, 1);
    const ProtobufCFieldDescriptor *vf = protobuf_c_message_descriptor_get_field(entry, 2);
    bool skip_small[16] = {false};
    bool *skip = skip_small;
    if (n > 16 && (skip = calloc(n, sizeof(*skip))) == NULL)
        ch_oom();
    if (n > 1)
        map_find_overridden(kf, entries, n, skip);
    bool first = true;
    PUT_LIT(out, "{");
    for (size_t i = 0; i < n; i++) {
        if (entries[i] == NULL || skip[i])
            continue;
        if (!first)
            PUT_LIT(out, ",");
        first = false;
        emit_map_key(out, kf, (const char *)entries[i] + kf->offset);
        PUT_LIT(out, ":");
        emit_value(out, vf, (const char *)entries[i] + vf->offset, depth);
    }
    PUT_LIT(out, "}");
    if (skip != skip_small)
        free(skip);
}

static void emit_message(ch_buf_t *out, const ProtobufCMessage *msg, int depth)
{
    const ProtobufCMessageDescriptor *desc = msg->descriptor;
    const ProtobufCFieldDescriptor *fs, *fn;
    if (depth > CH_EMIT_MAX_DEPTH) {
        PUT_LIT(out, "null");
        return;
    }
    if (timestamp_fields(desc, &fs, &fn)) {
        emit_timestamp(out, *(const int64_t *)((const char *)msg + fs->offset),
                       *(const int32_t *)((const char *)msg + fn->offset));
        return;
    }
    bool first = true;
    PUT_LIT(out, "{");
    for (unsigned i = 0; i < desc->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &desc->fields[i];
        const char *member = (const char *)msg + f->offset;
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(const uint32_t *)((const char *)msg + f->quantifier_offset) != f->id)
            continue;
        if (f->label != PROTOBUF_C_LABEL_REPEATED && f->type == PROTOBUF_C_TYPE_MESSAGE &&
            *(ProtobufCMessage *const *)member == NULL)
            continue;
        /* `,"name":` in one write: field names are identifiers and need no escaping. */
        size_t nlen = strlen(f->name);
        ch_buf_reserve(out, nlen + 4);
        char *o = out->base + out->len;
        if (!first)
            *o++ = ',';
        first = false;
        *o++ = '"';
        memcpy(o, f->name, nlen);
        o += nlen;
        *o++ = '"';
        *o++ = ':';
        out->len = (size_t)(o - out->base);
        if (f->label != PROTOBUF_C_LABEL_REPEATED) {
            emit_value(out, f, member, depth + 1);
            continue;
        }
        size_t n = *(const size_t *)((const char *)msg + f->quantifier_offset);
        const char *arr = *(const char *const *)member;
        if (arr == NULL)
            n = 0;
        if (is_map_field(desc, f)) {
            emit_map(out, f, (ProtobufCMessage *const *)arr, n, depth + 1);
            continue;
        }
        size_t esz = elem_size(f->type);
        PUT_LIT(out, "[");
        for (size_t k = 0; k < n; k++) {
            if (k)
                PUT_LIT(out, ",");
            emit_value(out, f, arr + k * esz, depth + 1);
        }
        PUT_LIT(out, "]");
    }
    PUT_LIT(out, "}");
}

void ch_pb_to_json(const ProtobufCMessage *msg, ch_buf_t *out)
{
    if (msg == NULL)
        PUT_LIT(out, "null");
    else
        emit_message(out, msg, 0);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* limits of a decoded request                                                                                    */
/* ------------------------------------------------------------------------------------------------------------ */

static int check_string(tc_t *t, const char *s)
{
    if (s == NULL)
        return 0;
    size_t len = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p += len) {
        len = *p < 0x80 ? 1 : utf8_len(p);
        if (len == 0)
            return tc_fail(t, "not valid UTF-8");
        if ((size_t)((const char *)p - s) + len > CH_TRANSCODE_MAX_STRING)
            return tc_fail(t, "too long (at most %d bytes)", CH_TRANSCODE_MAX_STRING);
    }
    return 0;
}

static int check_message(tc_t *t, const ProtobufCMessage *msg)
{
    const ProtobufCMessageDescriptor *d = msg->descriptor;
    size_t mark = t->path_len;
    for (unsigned i = 0; i < d->n_fields; ++i) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        const char *member = (const char *)msg + f->offset;
        bool repeated = f->label == PROTOBUF_C_LABEL_REPEATED;
        if (!repeated && f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        /* the member of a oneof that is not the chosen case shares its memory with the one that is */
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(const uint32_t *)((const char *)msg + f->quantifier_offset) != f->id)
            continue;
        path_set(t, mark);
        path_key(t, f->name, strlen(f->name), false);
        size_t n = 1;
        const void *const *elems = (const void *const *)member;
        if (repeated) {
            n = *(const size_t *)((const char *)msg + f->quantifier_offset);
            if (n > CH_TRANSCODE_MAX_ELEMENTS)
                return tc_fail(t, "too many elements (at most %d)", CH_TRANSCODE_MAX_ELEMENTS);
            if (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
                continue;
            elems = *(const void *const *const *)member;
        }
        size_t field_mark = t->path_len;
        for (size_t k = 0; k < n && elems != NULL; k++) {
            if (repeated) {
                path_set(t, field_mark);
                path_index(t, k);
            }
            int rc = f->type == PROTOBUF_C_TYPE_STRING ? check_string(t, elems[k])
                     : elems[k] != NULL                ? check_message(t, elems[k])
                                                       : 0;
            if (rc < 0)
                return rc;
        }
    }
    path_set(t, mark);
    return 0;
}

int ch_pb_check_limits(const ProtobufCMessage *msg, ch_transcode_error_t *err)
{
    tc_t t = {.err = err};
    if (err != NULL)
        err->field[0] = err->message[0] = '\0';
    return check_message(&t, msg);
}
