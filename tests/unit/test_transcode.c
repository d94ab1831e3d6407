/* Unit tests of the JSON <-> protobuf transcoder against every field shape of transcode_test.proto. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cityhall/transcode.h"
#include "tap.h"
#include "transcode_test.pb-c.h"

#define DESC (&cityhall__test__v1__all_types__descriptor)

typedef Cityhall__Test__V1__AllTypes all_t;

static ch_arena_t *arena;
static ch_transcode_error_t err;

static void *arena_bytes(size_t n)
{
    ProtobufCAllocator *a = ch_arena_allocator(arena);
    return a->alloc(a->allocator_data, n);
}

static all_t *parse_n(const char *json, size_t n)
{
    return (all_t *)ch_json_to_pb(DESC, json, n, ch_arena_allocator(arena), &err);
}

static all_t *parse(const char *json)
{
    return parse_n(json, strlen(json));
}

/* The encoder's output, copied into the arena so that checks can keep it without freeing by hand. */
static const char *encode(const void *msg)
{
    ch_buf_t b = {0};
    ch_pb_to_json(msg, &b);
    char *s = arena_bytes(b.len + 1);
    memcpy(s, b.base, b.len + 1);
    ch_buf_free(&b);
    return s;
}

static int has(const char *haystack, const char *needle)
{
    return haystack != NULL && strstr(haystack, needle) != NULL;
}

/* Checks that `json` is refused, naming `field` with `message` (a prefix when it ends in "..."). */
static void rejects_n(const char *json, size_t n, const char *field, const char *message, const char *what)
{
    all_t *m = parse_n(json, n);
    tap_ok(m == NULL, "%s is refused", what);
    tap_is_str(err.field, field, "%s names the field '%s'", what, field);
    size_t ml = strlen(message);
    if (ml > 3 && strcmp(message + ml - 3, "...") == 0)
        tap_ok(strncmp(err.message, message, ml - 3) == 0, "%s says '%s' (got '%s')", what, message, err.message);
    else
        tap_is_str(err.message, message, "%s says '%s'", what, message);
}

static void rejects(const char *json, const char *field, const char *message, const char *what)
{
    rejects_n(json, strlen(json), field, message, what);
}

/* JSON -> protobuf -> binary -> protobuf -> JSON, and JSON -> protobuf -> JSON -> protobuf -> JSON: both stable. */
static void round_trips(const char *json, const char *what)
{
    all_t *m = parse(json);
    tap_ok(m != NULL, "%s parses (%s%s%s)", what, err.field, *err.field ? ": " : "", err.message);
    if (m == NULL)
        return;
    const char *first = encode(m);
    size_t size = protobuf_c_message_get_packed_size(&m->base);
    uint8_t *bin = malloc(size ? size : 1);
    protobuf_c_message_pack(&m->base, bin);
    ProtobufCMessage *back = protobuf_c_message_unpack(DESC, NULL, size, bin);
    tap_ok(back != NULL, "%s: the binary form unpacks", what);
    if (back != NULL) {
        tap_is_str(encode(back), first, "%s: JSON is unchanged through the binary form", what);
        protobuf_c_message_free_unpacked(back, NULL);
    }
    free(bin);
    all_t *again = parse(first);
    tap_ok(again != NULL, "%s: the encoder's output parses", what);
    if (again != NULL)
        tap_is_str(encode(again), first, "%s: JSON is unchanged through a second parse", what);
}

static const char *const DEFAULT_JSON =
    "{\"int32_value\":0,\"sint32_value\":0,\"sfixed32_value\":0,\"uint32_value\":0,\"fixed32_value\":0,"
    "\"int64_value\":\"0\",\"sint64_value\":\"0\",\"sfixed64_value\":\"0\",\"uint64_value\":\"0\","
    "\"fixed64_value\":\"0\",\"float_value\":0,\"double_value\":0,\"bool_value\":false,\"string_value\":\"\","
    "\"bytes_value\":\"\",\"color\":\"COLOR_UNSPECIFIED\",\"int32_list\":[],\"sint32_list\":[],"
    "\"sfixed32_list\":[],\"uint32_list\":[],\"fixed32_list\":[],\"int64_list\":[],\"sint64_list\":[],"
    "\"sfixed64_list\":[],\"uint64_list\":[],\"fixed64_list\":[],\"float_list\":[],\"double_list\":[],"
    "\"bool_list\":[],\"string_list\":[],\"bytes_list\":[],\"colors\":[],\"items\":[],\"events\":[],"
    "\"labels\":{},\"names\":{},\"flags\":{},\"codes\":{},\"deadlines\":{},\"blobs\":{}}";

static void test_empty_and_defaults(void)
{
    all_t *m = parse_n("", 0);
    tap_ok(m != NULL, "an empty body is the empty message");
    tap_ok(m != NULL && m->string_value != NULL && m->string_value[0] == '\0', "an unset string is \"\", not NULL");
    tap_is_str(encode(m), DEFAULT_JSON, "every field is written, defaults included, unset messages omitted");
    m = parse("{}");
    tap_is_str(encode(m), DEFAULT_JSON, "{} is the empty message too");
    m = parse("{\"int32_value\":null,\"string_value\":null,\"item\":null,\"created_at\":null,\"int32_list\":null,"
              "\"labels\":null,\"color\":null,\"choice_text\":null,\"bytes_value\":null}");
    tap_ok(m != NULL, "null is accepted for every kind of field");
    tap_is_str(encode(m), DEFAULT_JSON, "null means the default value");
    tap_ok(m != NULL && m->choice_case == CITYHALL__TEST__V1__ALL_TYPES__CHOICE__NOT_SET,
           "a null oneof member is unset");
    rejects("  ", "", "invalid JSON at line 1 column ...", "a body of only whitespace");
}

static void test_int32_kinds(void)
{
    all_t *m = parse("{\"int32_value\":-2147483648,\"sint32_value\":2147483647,\"sfixed32_value\":-7,"
                     "\"uint32_value\":4294967295,\"fixed32_value\":123}");
    tap_ok(m != NULL && m->int32_value == INT32_MIN && m->sint32_value == INT32_MAX && m->sfixed32_value == -7 &&
               m->uint32_value == UINT32_MAX && m->fixed32_value == 123,
           "32-bit integers decode at their limits");
    const char *out = encode(m);
    tap_ok(has(out, "\"int32_value\":-2147483648,\"sint32_value\":2147483647,\"sfixed32_value\":-7,"
                    "\"uint32_value\":4294967295,\"fixed32_value\":123"),
           "32-bit integers encode as JSON numbers");
    m = parse("{\"int32_value\":\"-12\",\"uint32_value\":1e2,\"sint32_value\":3.0}");
    tap_ok(m != NULL && m->int32_value == -12 && m->uint32_value == 100 && m->sint32_value == 3,
           "32-bit integers accept numeric strings, exponents and integral reals");

    rejects("{\"int32_value\":2147483648}", "int32_value", "value out of range for int32", "2^31 into int32");
    rejects("{\"int32_value\":-2147483649}", "int32_value", "value out of range for int32", "-2^31-1 into int32");
    rejects("{\"sint32_value\":\"3000000000\"}", "sint32_value", "value out of range for sint32",
            "an out-of-range string into sint32");
    rejects("{\"sfixed32_value\":1e10}", "sfixed32_value", "value out of range for sfixed32", "1e10 into sfixed32");
    rejects("{\"uint32_value\":-1}", "uint32_value", "value out of range for uint32", "-1 into uint32");
    rejects("{\"fixed32_value\":4294967296}", "fixed32_value", "value out of range for fixed32", "2^32 into fixed32");
    rejects("{\"int32_value\":1.5}", "int32_value", "non-integral value for int32", "1.5 into int32");
    rejects("{\"uint32_value\":\"0.5\"}", "uint32_value", "non-integral value for uint32", "\"0.5\" into uint32");
    rejects("{\"int32_value\":true}", "int32_value", "expected integer", "true into int32");
    rejects("{\"int32_value\":\"12a\"}", "int32_value", "expected integer", "\"12a\" into int32");
    rejects("{\"int32_value\":\" 12\"}", "int32_value", "expected integer", "a padded numeric string");
    rejects("{\"int32_value\":[1]}", "int32_value", "expected integer", "an array into int32");
    rejects("{\"int32_value\":{}}", "int32_value", "expected integer", "an object into int32");
    rejects("{\"int32_value\":\"NaN\"}", "int32_value", "expected integer", "\"NaN\" into int32");
}

static void test_int64_kinds(void)
{
    all_t *m = parse("{\"int64_value\":\"-9223372036854775808\",\"sint64_value\":9223372036854775807,"
                     "\"sfixed64_value\":\"-1\",\"uint64_value\":\"18446744073709551615\",\"fixed64_value\":42}");
    tap_ok(m != NULL && m->int64_value == INT64_MIN && m->sint64_value == INT64_MAX && m->sfixed64_value == -1 &&
               m->uint64_value == UINT64_MAX && m->fixed64_value == 42,
           "64-bit integers decode from strings and numbers at their limits");
    const char *out = encode(m);
    tap_ok(has(out, "\"int64_value\":\"-9223372036854775808\",\"sint64_value\":\"9223372036854775807\","
                    "\"sfixed64_value\":\"-1\",\"uint64_value\":\"18446744073709551615\",\"fixed64_value\":\"42\""),
           "64-bit integers encode as strings");
    m = parse("{\"uint64_value\":18446744073709551615,\"fixed64_value\":9223372036854775808}");
    tap_ok(m != NULL && m->uint64_value == UINT64_MAX && m->fixed64_value == UINT64_C(9223372036854775808),
           "uint64 numbers above 2^63 (beyond jansson's integers) are accepted");

    rejects("{\"int64_value\":\"9223372036854775808\"}", "int64_value", "value out of range for int64",
            "2^63 as a string into int64");
    rejects("{\"int64_value\":9223372036854775808}", "int64_value", "value out of range for int64",
            "2^63 as a number into int64");
    rejects("{\"items\":[{},{\"count\":1}],\"sint64_list\":[1,-9223372036854775809]}", "sint64_list[1]",
            "value out of range for sint64", "-2^63-1 in a list of sint64");
    rejects("{\"uint64_value\":\"18446744073709551616\"}", "uint64_value", "value out of range for uint64",
            "2^64 into uint64");
    rejects("{\"uint64_value\":184467440737095516160000}", "uint64_value", "value out of range for uint64",
            "a 24-digit number into uint64");
    rejects("{\"uint64_value\":-1}", "uint64_value", "value out of range for uint64", "-1 into uint64");
    rejects("{\"fixed64_value\":\"-5\"}", "fixed64_value", "value out of range for fixed64", "\"-5\" into fixed64");
    rejects("{\"sfixed64_value\":2.5}", "sfixed64_value", "non-integral value for sfixed64", "2.5 into sfixed64");
    rejects("{\"int64_value\":\"0x10\"}", "int64_value", "expected integer", "a hex string into int64");
    rejects("{\"int64_value\":false}", "int64_value", "expected integer", "false into int64");
    rejects("{\"string_value\":99999999999999999999}", "", "invalid JSON at line 1 column ...",
            "a huge number into a string field");
    rejects("{\"int32_list\":[1,99999999999999999999]}", "int32_list[1]", "value out of range for int32",
            "a huge number in a list of int32");
    rejects("{\"uint64_value\":18446744073709551615,\"labels\":{\"a\":\"1\",\"a\":2}}", "labels[\"a\"]",
            "duplicate key", "a repeated key after a huge number");
    rejects("{\"bogus\":1e400}", "", "invalid JSON at line 1 column ...", "a huge number under an unknown name");
}

static void test_floats(void)
{
    all_t *m = parse("{\"float_value\":1.5,\"double_value\":0.1}");
    tap_ok(m != NULL && m->float_value == 1.5f && m->double_value == 0.1, "float and double decode");
    const char *out = encode(m);
    tap_ok(has(out, "\"float_value\":1.5,\"double_value\":0.1,"), "floats encode in their shortest exact form");
    m = parse("{\"float_value\":0.1,\"double_value\":\"-2.5e-3\"}");
    tap_ok(m != NULL && m->float_value == 0.1f && m->double_value == -2.5e-3, "numeric strings are floats too");
    tap_ok(has(encode(m), "\"float_value\":0.1,\"double_value\":-0.0025,"), "0.1f is written 0.1, not 0.100000001");
    m = parse("{\"float_value\":\"NaN\",\"double_value\":\"-Infinity\",\"float_list\":[\"Infinity\",-0.0,3]}");
    tap_ok(m != NULL && isnan(m->float_value) && isinf(m->double_value) && m->double_value < 0 &&
               m->n_float_list == 3 && isinf(m->float_list[0]) && signbit(m->float_list[1]),
           "NaN, Infinity and -Infinity decode");
    tap_ok(has(encode(m), "\"float_value\":\"NaN\",\"double_value\":\"-Infinity\"") &&
               has(encode(m), "\"float_list\":[\"Infinity\",-0.0,3]"),
           "non-finite values encode as strings and -0 keeps its sign");
    m = parse("{\"double_value\":1e308,\"float_value\":3.4028234663852886e38}");
    tap_ok(m != NULL && m->double_value == 1e308, "large doubles decode");
    round_trips("{\"float_value\":3.4028234663852886e38,\"float_list\":[1e-45,-3.4028234663852886e38,16777217],"
                "\"double_list\":[4.9e-324,1.7976931348623157e308,9007199254740993,0.30000000000000004]}",
                "extreme floats and doubles");
    rejects("{\"float_value\":1e39}", "float_value", "value out of range for float", "1e39 into float");
    rejects("{\"double_value\":\"1e400\"}", "double_value", "value out of range for double", "\"1e400\" into double");
    rejects("{\"double_value\":1e400}", "double_value", "value out of range for double", "1e400 into double");
    rejects("{\"double_value\":\"nan\"}", "double_value", "expected number", "\"nan\" into double");
    rejects("{\"float_value\":true}", "float_value", "expected number", "true into float");
}

static void test_bool_string_bytes(void)
{
    all_t *m =
        parse("{\"bool_value\":true,\"string_value\":\"h\\u00e9llo \xe4\xb8\xad\",\"bytes_value\":\"aGVsbG8=\"}");
    tap_ok(m != NULL && m->bool_value && strcmp(m->string_value, "h\xc3\xa9llo \xe4\xb8\xad") == 0 &&
               m->bytes_value.len == 5 && memcmp(m->bytes_value.data, "hello", 5) == 0,
           "bool, string and bytes decode");
    tap_ok(has(encode(m), "\"bool_value\":true,\"string_value\":\"h\xc3\xa9llo \xe4\xb8\xad\",\"bytes_value\":"
                          "\"aGVsbG8=\""),
           "bool, string (UTF-8 as is) and bytes (standard base64) encode");
    m = parse("{\"bytes_value\":\"-_8\"}");
    tap_ok(m != NULL && m->bytes_value.len == 2 && m->bytes_value.data[0] == 0xfb && m->bytes_value.data[1] == 0xff,
           "URL-safe base64 without padding decodes");
    tap_ok(has(encode(m), "\"bytes_value\":\"+/8=\""), "bytes are written in standard base64 with padding");
    m = parse("{\"bytes_list\":[\"\",\"YQ\",\"YWI=\",\"YWJj\"]}");
    tap_ok(m != NULL && m->n_bytes_list == 4 && m->bytes_list[0].len == 0 && m->bytes_list[1].len == 1 &&
               m->bytes_list[2].len == 2 && m->bytes_list[3].len == 3 && memcmp(m->bytes_list[3].data, "abc", 3) == 0,
           "base64 of every length decodes");
    tap_ok(has(encode(m), "\"bytes_list\":[\"\",\"YQ==\",\"YWI=\",\"YWJj\"]"), "and encodes back");

    rejects("{\"bool_value\":\"true\"}", "bool_value", "expected boolean", "\"true\" into bool");
    rejects("{\"bool_value\":1}", "bool_value", "expected boolean", "1 into bool");
    rejects("{\"string_value\":5}", "string_value", "expected string", "a number into string");
    rejects("{\"string_value\":[\"a\"]}", "string_value", "expected string", "an array into string");
    rejects("{\"bytes_value\":\"a\"}", "bytes_value", "invalid base64", "one base64 character");
    rejects("{\"bytes_value\":\"YQ=\"}", "bytes_value", "invalid base64", "short padding");
    rejects("{\"bytes_value\":\"YQ===\"}", "bytes_value", "invalid base64", "too much padding");
    rejects("{\"bytes_value\":\"Y Q==\"}", "bytes_value", "invalid base64", "a space in base64");
    rejects("{\"bytes_value\":\"YQ==YQ==\"}", "bytes_value", "invalid base64", "padding in the middle");
    rejects("{\"bytes_list\":[\"YQ\",\"*\"]}", "bytes_list[1]", "invalid base64", "a bad element of a bytes list");
    rejects("{\"bytes_value\":12}", "bytes_value", "expected string", "a number into bytes");
    rejects("{\"string_value\":\"a\\u0000b\"}", "", "invalid JSON at line 1 column ...", "a NUL inside a string");
}

static void test_enums(void)
{
    all_t *m = parse("{\"color\":\"COLOR_RED\",\"colors\":[\"COLOR_GREEN\",3,0,77]}");
    tap_ok(m != NULL && m->color == CITYHALL__TEST__V1__COLOR__COLOR_RED && m->n_colors == 4 &&
               m->colors[0] == CITYHALL__TEST__V1__COLOR__COLOR_GREEN && m->colors[1] == 3 && m->colors[3] == 77,
           "enums decode by name or number, unknown numbers kept");
    tap_ok(has(encode(m), "\"color\":\"COLOR_RED\"") &&
               has(encode(m), "\"colors\":[\"COLOR_GREEN\",\"COLOR_YELLOW\",\"COLOR_UNSPECIFIED\",77]"),
           "enums encode by name, numbers without a name stay numbers");
    rejects("{\"color\":\"COLOR_BLUE\"}", "color", "unknown value for enum Color", "an unknown enum name");
    rejects("{\"colors\":[\"COLOR_RED\",\"red\"]}", "colors[1]", "unknown value for enum Color",
            "an unknown enum name in a list");
    rejects("{\"color\":true}", "color", "expected enum name or number", "true into an enum");
    rejects("{\"color\":1.5}", "color", "non-integral value for enum", "1.5 into an enum");
    rejects("{\"color\":4294967296}", "color", "value out of range for enum", "2^32 into an enum");
}

static void test_messages_and_lists(void)
{
    all_t *m = parse("{\"item\":{\"name\":\"a\",\"count\":2,\"child\":{\"name\":\"b\"},\"children\":[{\"count\":3}]},"
                     "\"items\":[{\"name\":\"x\"},{}]}");
    tap_ok(m != NULL && m->item != NULL && strcmp(m->item->name, "a") == 0 && m->item->count == 2 &&
               m->item->child != NULL && strcmp(m->item->child->name, "b") == 0 && m->item->n_children == 1 &&
               m->item->children[0]->count == 3 && m->n_items == 2 && strcmp(m->items[0]->name, "x") == 0 &&
               m->items[1]->name != NULL,
           "nested messages and lists of messages decode");
    tap_ok(has(encode(m), "\"item\":{\"name\":\"a\",\"count\":2,\"child\":{\"name\":\"b\",\"count\":0,"
                          "\"children\":[]},\"children\":[{\"name\":\"\",\"count\":3,\"children\":[]}]}") &&
               has(encode(m), "\"items\":[{\"name\":\"x\",\"count\":0,\"children\":[]},{\"name\":\"\","
                              "\"count\":0,\"children\":[]}]"),
           "nested messages encode with their defaults");
    m = parse("{\"int32_list\":[1,-2],\"sint32_list\":[-3],\"sfixed32_list\":[4],\"uint32_list\":[5],"
              "\"fixed32_list\":[6],\"int64_list\":[\"-7\",8],\"sint64_list\":[\"9\"],\"sfixed64_list\":[10],"
              "\"uint64_list\":[\"11\"],\"fixed64_list\":[12],\"float_list\":[1.25],\"double_list\":[2.5],"
              "\"bool_list\":[true,false],\"string_list\":[\"a\",\"\"],\"colors\":[\"COLOR_RED\"]}");
    tap_ok(m != NULL && m->n_int32_list == 2 && m->int32_list[1] == -2 && m->sint32_list[0] == -3 &&
               m->sfixed32_list[0] == 4 && m->uint32_list[0] == 5 && m->fixed32_list[0] == 6 && m->n_int64_list == 2 &&
               m->int64_list[0] == -7 && m->sint64_list[0] == 9 && m->sfixed64_list[0] == 10 &&
               m->uint64_list[0] == 11 && m->fixed64_list[0] == 12 && m->float_list[0] == 1.25f &&
               m->double_list[0] == 2.5 && m->n_bool_list == 2 && m->bool_list[0] && !m->bool_list[1] &&
               m->n_string_list == 2 && strcmp(m->string_list[0], "a") == 0 && m->string_list[1] != NULL &&
               m->string_list[1][0] == '\0',
           "lists of every scalar decode");
    tap_ok(has(encode(m), "\"int32_list\":[1,-2],\"sint32_list\":[-3],\"sfixed32_list\":[4],\"uint32_list\":[5],"
                          "\"fixed32_list\":[6],\"int64_list\":[\"-7\",\"8\"],\"sint64_list\":[\"9\"],"
                          "\"sfixed64_list\":[\"10\"],\"uint64_list\":[\"11\"],\"fixed64_list\":[\"12\"],"
                          "\"float_list\":[1.25],\"double_list\":[2.5],\"bool_list\":[true,false],"
                          "\"string_list\":[\"a\",\"\"]"),
           "lists of every scalar encode");

    rejects("{\"items\":[{},{},{\"name\":5}]}", "items[2].name", "expected string", "a bad field in a list element");
    rejects("{\"item\":{\"child\":{\"child\":{\"count\":\"x\"}}}}", "item.child.child.count", "expected integer",
            "a bad field three messages down");
    rejects("{\"item\":[]}", "item", "expected object", "an array into a message");
    rejects("{\"item\":\"x\"}", "item", "expected object", "a string into a message");
    rejects("{\"int32_list\":5}", "int32_list", "expected array", "a number into a list");
    rejects("{\"items\":{}}", "items", "expected array", "an object into a list");
    rejects("{\"string_list\":[\"a\",null]}", "string_list[1]", "null is not allowed in a list", "null in a list");
    rejects("{\"bool_list\":[true,1]}", "bool_list[1]", "expected boolean", "a wrong element type in a list");
}

static void test_maps(void)
{
    all_t *m =
        parse("{\"labels\":{\"a\":\"1\",\"b\":-2,\"\":3},\"names\":{\"1\":\"x\",\"-5\":\"y\"},"
              "\"flags\":{\"true\":{\"name\":\"t\"},\"false\":null},\"codes\":{\"18446744073709551615\":"
              "\"COLOR_RED\",\"0\":2},\"deadlines\":{\"d\":\"2024-01-02T03:04:05Z\"},\"blobs\":{\"-9\":\"YQ==\"}}");
    tap_ok(m != NULL && m->n_labels == 3 && strcmp(m->labels[0]->key, "a") == 0 && m->labels[0]->value == 1 &&
               m->labels[1]->value == -2 && m->labels[2]->key[0] == '\0' && m->n_names == 2 && m->names[1]->key == -5 &&
               strcmp(m->names[1]->value, "y") == 0 && m->n_flags == 2 && m->flags[0]->key &&
               strcmp(m->flags[0]->value->name, "t") == 0 && m->flags[1]->value == NULL &&
               m->codes[0]->key == UINT64_MAX && m->codes[1]->value == 2 && m->deadlines[0]->value != NULL &&
               m->deadlines[0]->value->seconds == 1704164645 && m->blobs[0]->key == -9 && m->blobs[0]->value.len == 1,
           "maps of every key kind decode into entries");
    const char *out = encode(m);
    tap_ok(has(out, "\"labels\":{\"a\":\"1\",\"b\":\"-2\",\"\":\"3\"},\"names\":{\"1\":\"x\",\"-5\":\"y\"},"
                    "\"flags\":{\"true\":{\"name\":\"t\",\"count\":0,\"children\":[]},\"false\":{\"name\":\"\","
                    "\"count\":0,\"children\":[]}},\"codes\":{\"18446744073709551615\":\"COLOR_RED\",\"0\":"
                    "\"COLOR_GREEN\"},\"deadlines\":{\"d\":\"2024-01-02T03:04:05Z\"},\"blobs\":{\"-9\":\"YQ==\"}"),
           "maps encode as objects, a null message value as the default message (got %s)", out);

    rejects("{\"labels\":{\"k\":\"zz\"}}", "labels[\"k\"]", "expected integer", "a bad map value");
    rejects("{\"labels\":{\"k\\\"q\":true}}", "labels[\"k\\\"q\"]", "expected integer",
            "a bad map value under a key with a quote");
    rejects("{\"names\":{\"x\":\"a\"}}", "names[\"x\"]", "invalid map key", "a non-numeric int32 map key");
    rejects("{\"names\":{\"01\":\"a\"}}", "names[\"01\"]", "invalid map key", "a map key with a leading zero");
    rejects("{\"names\":{\"-0\":\"a\"}}", "names[\"-0\"]", "invalid map key", "the map key -0");
    rejects("{\"names\":{\"2147483648\":\"a\"}}", "names[\"2147483648\"]", "value out of range for int32",
            "an out-of-range map key");
    rejects("{\"flags\":{\"yes\":{}}}", "flags[\"yes\"]", "invalid map key", "a bool map key other than true/false");
    rejects("{\"flags\":{\"true\":{\"bogus\":1}}}", "flags[\"true\"].bogus", "unknown field",
            "an unknown field inside a map value");
    rejects("{\"labels\":[]}", "labels", "expected object", "an array into a map");
    rejects("{\"deadlines\":{\"d\":\"tomorrow\"}}", "deadlines[\"d\"]", "invalid RFC 3339 timestamp",
            "a bad timestamp as a map value");

    /* A binary message may repeat a key; the JSON must not (the last one wins, as in protobuf). */
    Cityhall__Test__V1__AllTypes__LabelsEntry e1 = CITYHALL__TEST__V1__ALL_TYPES__LABELS_ENTRY__INIT;
    Cityhall__Test__V1__AllTypes__LabelsEntry e2 = CITYHALL__TEST__V1__ALL_TYPES__LABELS_ENTRY__INIT;
    Cityhall__Test__V1__AllTypes__LabelsEntry e3 = CITYHALL__TEST__V1__ALL_TYPES__LABELS_ENTRY__INIT;
    e1.key = "k";
    e1.value = 1;
    e2.key = "j";
    e2.value = 2;
    e3.key = "k";
    e3.value = 3;
    Cityhall__Test__V1__AllTypes__LabelsEntry *entries[] = {&e1, &e2, &e3};
    all_t built = CITYHALL__TEST__V1__ALL_TYPES__INIT;
    built.n_labels = 3;
    built.labels = entries;
    tap_ok(has(encode(&built), "\"labels\":{\"j\":\"2\",\"k\":\"3\"}"),
           "a repeated map key is written once, last wins");

    enum { BIG = 100 };
    Cityhall__Test__V1__AllTypes__NamesEntry big[BIG], *bigp[BIG];
    for (int i = 0; i < BIG; i++) {
        cityhall__test__v1__all_types__names_entry__init(&big[i]);
        big[i].key = i % 10;
        big[i].value = i >= BIG - 10 ? "last" : "old";
        bigp[i] = &big[i];
    }
    all_t built2 = CITYHALL__TEST__V1__ALL_TYPES__INIT;
    built2.n_names = BIG;
    built2.names = bigp;
    out = encode(&built2);
    all_t *re = parse(out);
    tap_ok(re != NULL && re->n_names == 10 && !has(out, "old"), "a large map with repeated keys keeps the last values");
}

static void test_oneofs(void)
{
    all_t *m = parse("{\"choice_text\":\"hi\",\"other_time\":\"2020-01-01T00:00:00Z\"}");
    tap_ok(m != NULL && m->choice_case == CITYHALL__TEST__V1__ALL_TYPES__CHOICE_CHOICE_TEXT &&
               strcmp(m->choice_text, "hi") == 0 && m->other_case == CITYHALL__TEST__V1__ALL_TYPES__OTHER_OTHER_TIME &&
               m->other_time->seconds == 1577836800,
           "oneof members set their case");
    const char *out = encode(m);
    tap_ok(has(out, "\"choice_text\":\"hi\",\"other_time\":\"2020-01-01T00:00:00Z\"}") && !has(out, "choice_number") &&
               !has(out, "other_flag"),
           "only the chosen member of a oneof is written");
    m = parse("{\"choice_item\":{\"name\":\"n\"}}");
    tap_ok(m != NULL && m->choice_case == CITYHALL__TEST__V1__ALL_TYPES__CHOICE_CHOICE_ITEM &&
               strcmp(m->choice_item->name, "n") == 0,
           "a message member of a oneof decodes");
    m = parse("{\"choice_number\":null,\"choice_color\":\"COLOR_YELLOW\"}");
    tap_ok(m != NULL && m->choice_case == CITYHALL__TEST__V1__ALL_TYPES__CHOICE_CHOICE_COLOR && m->choice_color == 3,
           "a null member does not take the oneof");
    round_trips("{\"choice_text\":\"\",\"other_flag\":false}", "oneof members holding default values");
    round_trips("{\"choice_bytes\":\"\"}", "an empty bytes oneof member");
    round_trips("{\"choice_number\":\"0\"}", "a zero int64 oneof member");
    round_trips("{\"choice_item\":{}}", "an empty message oneof member");
    rejects("{\"choice_text\":\"a\",\"choice_number\":1}", "choice_number",
            "another field of the same oneof is already set", "two members of one oneof");
    rejects("{\"other_flag\":true,\"choiceColor\":1,\"otherTime\":\"2020-01-01T00:00:00Z\"}", "otherTime",
            "another field of the same oneof is already set", "two members of a oneof, camelCase");
}

static void test_timestamps(void)
{
    struct {
        const char *in, *out;
    } ok[] = {
        {"1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"},
        {"2024-02-29T12:34:56Z", "2024-02-29T12:34:56Z"},
        {"2024-02-29T20:34:56+08:00", "2024-02-29T12:34:56Z"},
        {"2024-01-01T00:30:00-01:15", "2024-01-01T01:45:00Z"},
        {"2023-12-31t23:59:59.5z", "2023-12-31T23:59:59.500Z"},
        {"2023-12-31T23:59:59.000001Z", "2023-12-31T23:59:59.000001Z"},
        {"2023-12-31T23:59:59.123456789Z", "2023-12-31T23:59:59.123456789Z"},
        {"2023-12-31T23:59:59.1234Z", "2023-12-31T23:59:59.123400Z"},
        {"2023-12-31T23:59:59.000000000Z", "2023-12-31T23:59:59Z"},
        {"1969-07-20T20:17:40.1Z", "1969-07-20T20:17:40.100Z"},
        {"0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"},
        {"9999-12-31T23:59:59.999999999Z", "9999-12-31T23:59:59.999999999Z"},
        {"2000-02-29T00:00:00Z", "2000-02-29T00:00:00Z"},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        char json[128], want[128];
        snprintf(json, sizeof(json), "{\"created_at\":\"%s\"}", ok[i].in);
        snprintf(want, sizeof(want), "\"created_at\":\"%s\"", ok[i].out);
        all_t *m = parse(json);
        tap_ok(m != NULL && has(encode(m), want), "timestamp %s is written %s", ok[i].in, ok[i].out);
    }
    all_t *m = parse("{\"created_at\":\"1969-12-31T23:59:59.5Z\"}");
    tap_ok(m != NULL && m->created_at->seconds == -1 && m->created_at->nanos == 500000000,
           "a time before 1970 has negative seconds and positive nanos");
    m = parse("{\"events\":[\"2021-06-01T00:00:00Z\",\"2021-06-01T00:00:00.25+02:00\"]}");
    tap_ok(m != NULL && m->n_events == 2 && m->events[1]->seconds == 1622498400 && m->events[1]->nanos == 250000000,
           "a list of timestamps decodes");
    tap_ok(has(encode(m), "\"events\":[\"2021-06-01T00:00:00Z\",\"2021-05-31T22:00:00.250Z\"]"),
           "a list of timestamps encodes in UTC");

    const char *bad[] = {
        "2024-02-30T00:00:00Z",      "2023-02-29T00:00:00Z",
        "2024-13-01T00:00:00Z",      "2024-01-01 00:00:00Z",
        "2024-01-01T24:00:00Z",      "2024-01-01T00:60:00Z",
        "2024-01-01T00:00:60Z",      "2024-01-01T00:00:00",
        "2024-01-01T00:00:00.Z",     "2024-01-01T00:00:00.1234567891Z",
        "2024-01-01T00:00:00+0800",  "2024-01-01T00:00:00+24:00",
        "0000-12-31T23:59:59Z",      "0001-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59-00:01", "10000-01-01T00:00:00Z",
        "2024-1-01T00:00:00Z",       "",
        "2024-01-01T00:00:00Zjunk",  "+2024-01-01T00:00:00Z",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char json[128];
        snprintf(json, sizeof(json), "{\"created_at\":\"%s\"}", bad[i]);
        all_t *r = parse(json);
        tap_ok(r == NULL && strcmp(err.field, "created_at") == 0 &&
                   strcmp(err.message, "invalid RFC 3339 timestamp") == 0,
               "timestamp '%s' is refused", bad[i]);
    }
    /* A Timestamp on its own is a JSON string, in both directions. */
    ProtobufCMessage *tsm = ch_json_to_pb(&google__protobuf__timestamp__descriptor, "\"2020-01-01T00:00:00.5Z\"", 24,
                                          ch_arena_allocator(arena), &err);
    tap_ok(tsm != NULL && ((Google__Protobuf__Timestamp *)tsm)->seconds == 1577836800 &&
               ((Google__Protobuf__Timestamp *)tsm)->nanos == 500000000,
           "a top-level Timestamp parses from a string");
    tap_is_str(encode(tsm), "\"2020-01-01T00:00:00.500Z\"", "a top-level Timestamp encodes as a string");
    rejects("{\"created_at\":1700000000}", "created_at", "expected string", "a number into a timestamp");
    rejects("{\"created_at\":{\"seconds\":1}}", "created_at", "expected string", "an object into a timestamp");
    rejects("{\"events\":[\"2021-06-01T00:00:00Z\",\"x\"]}", "events[1]", "invalid RFC 3339 timestamp",
            "a bad timestamp in a list");

    /* Out-of-range values can only come from code; they are clamped so the output stays parseable. */
    Google__Protobuf__Timestamp ts = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
    all_t built = CITYHALL__TEST__V1__ALL_TYPES__INIT;
    built.created_at = &ts;
    ts.seconds = INT64_MAX;
    tap_ok(has(encode(&built), "\"created_at\":\"9999-12-31T23:59:59.999999999Z\""), "a huge timestamp is clamped");
    ts.seconds = 0;
    ts.nanos = -1;
    tap_ok(has(encode(&built), "\"created_at\":\"1969-12-31T23:59:59.999999999Z\""), "negative nanos are normalised");
}

static void test_names_and_structure(void)
{
    all_t *m = parse("{\"int32Value\":7,\"createdAt\":\"2020-01-01T00:00:00Z\",\"choiceText\":\"c\","
                     "\"stringList\":[\"s\"],\"item\":{\"children\":[{\"name\":\"k\"}]},\"uint64_value\":\"1\"}");
    tap_ok(m != NULL && m->int32_value == 7 && m->created_at != NULL && strcmp(m->choice_text, "c") == 0 &&
               m->n_string_list == 1 && m->uint64_value == 1,
           "lowerCamelCase names are accepted beside proto names");
    tap_ok(has(encode(m), "\"int32_value\":7") && !has(encode(m), "int32Value"), "output uses the proto names");

    rejects("{\"bogus\":1}", "bogus", "unknown field", "an unknown field");
    rejects("{\"bogus\":null}", "bogus", "unknown field", "an unknown field set to null");
    rejects("{\"item\":{\"name\":\"a\",\"nope\":[]}}", "item.nope", "unknown field", "a nested unknown field");
    rejects("{\"Int32Value\":1}", "Int32Value", "unknown field", "UpperCamelCase");
    rejects("{\"int32_Value\":1}", "int32_Value", "unknown field", "a mixed spelling");
    rejects("[]", "", "expected object", "a top-level array");
    rejects("[{\"int32_value\":1}]", "", "expected object", "a top-level array of objects");
    rejects("\"x\"", "", "expected object", "a top-level string");
    rejects("42", "", "expected object", "a top-level number");
    rejects("null", "", "expected object", "a top-level null");
    rejects("{\"int32_value\":1", "", "invalid JSON at line 1 column ...", "truncated JSON");
    rejects("{\"string_value\":\"abc", "", "invalid JSON at line 1 column ...", "a truncated string");
    rejects("{\"int32_value\":1}x", "", "invalid JSON at line 1 column ...", "trailing garbage");
    rejects("{\"int32_value\":1,}", "", "invalid JSON at line 1 column ...", "a trailing comma");
    rejects("{'int32_value':1}", "", "invalid JSON at line 1 column ...", "single quotes");
    rejects("{\"string_value\":\"\xff\"}", "", "invalid JSON at line 1 column ...", "invalid UTF-8 in a value");
    rejects("{\"string_value\":\"\xc0\xaf\"}", "", "invalid JSON at line 1 column ...", "overlong UTF-8");
    rejects("{\"string_value\":\"\xed\xa0\x80\"}", "", "invalid JSON at line 1 column ...", "an encoded surrogate");
    rejects("{\"\xfe\":1}", "", "invalid JSON at line 1 column ...", "invalid UTF-8 in a key");
    rejects("{\"string_value\":\"\\ud800\"}", "", "invalid JSON at line 1 column ...", "a lone surrogate escape");
    rejects_n("{\"int32_value\":1}\0", 18, "", "invalid JSON at line 1 column ...", "a NUL after the document");

    rejects("{\"int32_value\":1,\"int32_value\":2}", "int32_value", "duplicate key", "a repeated key");
    rejects("{\"items\":[{\"name\":\"a\"},{\"name\":\"b\",\"count\":1,\"name\":\"c\"}]}", "items[1].name",
            "duplicate key", "a repeated key in a list element");
    rejects("{\"labels\":{\"k\":\"1\",\"k\":\"2\"}}", "labels[\"k\"]", "duplicate key", "a repeated map key");
    rejects("{\"flags\":{\"true\":{\"children\":[{},{\"count\":1,\"count\":2}]}}}", "flags[\"true\"].children[1].count",
            "duplicate key", "a repeated key deep inside a map value");
    rejects("{\"string_value\":\"x\\\"}{[\",\"item\":{\"name\":\"\\u0041\",\"na\\u006de\":\"b\"}}", "item.name",
            "duplicate key", "a repeated key spelled with escapes after brackets in a string");
    rejects("{\"int32_value\":1,\"int32Value\":2}", "int32Value", "duplicate key", "a field named in both spellings");

    /* Error texts go into response bodies: they must stay valid UTF-8 without control characters. */
    all_t *r = parse("{\"bo\\u0001gus\\u00e9\":1}");
    tap_ok(r == NULL && strcmp(err.field, "bo?gus\xc3\xa9") == 0, "control characters in a reported name are replaced");
    char longkey[2000];
    memset(longkey, 0, sizeof(longkey));
    strcpy(longkey, "{\"");
    for (int i = 0; i < 600; i++)
        strcat(longkey, "\xe4\xb8\xad");
    strcat(longkey, "\":1}");
    r = parse(longkey);
    tap_ok(r == NULL && strlen(err.field) <= 255 && strlen(err.field) % 3 == 0,
           "a long reported name is cut on a character boundary");
}

static double seconds_since(struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

static void test_depth(void)
{
    /* Item chains: the top-level object is level 1, "item" level 2, each "child" one more. */
    char buf[4096];
    for (int levels = 30; levels <= 33; levels++) {
        size_t o = 0;
        o += (size_t)sprintf(buf + o, "{\"item\":");
        for (int i = 2; i < levels; i++)
            o += (size_t)sprintf(buf + o, "{\"child\":");
        o += (size_t)sprintf(buf + o, "{}");
        for (int i = 1; i < levels; i++)
            buf[o++] = '}';
        buf[o] = '\0';
        all_t *m = parse(buf);
        if (levels <= 31) {
            tap_ok(m != NULL, "%d levels of objects are accepted", levels);
            round_trips(buf, "a deep document");
        } else {
            tap_ok(m == NULL && strcmp(err.message, "nesting too deep") == 0, "%d levels of objects are refused (%s)",
                   levels, err.message);
        }
    }

    /* 10 000 levels must be refused before jansson recurses into them. */
    size_t deep = 10000;
    char *doc = malloc(deep * 6 + 64);
    size_t o = (size_t)sprintf(doc, "{\"int32_list\":");
    memset(doc + o, '[', deep);
    o += deep;
    memset(doc + o, ']', deep);
    o += deep;
    doc[o++] = '}';
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    all_t *m = parse_n(doc, o);
    double took = seconds_since(&t0);
    tap_ok(m == NULL && strcmp(err.message, "nesting too deep") == 0, "10 000 nested arrays are refused");
    tap_ok(took < 0.5, "and refused at once (%.6f s, a generous bound for noisy machines)", took);

    o = 0;
    for (size_t i = 0; i < deep; i++)
        o += (size_t)sprintf(doc + o, "{\"a\":");
    doc[o] = '\0';
    m = parse_n(doc, o);
    tap_ok(m == NULL && strcmp(err.message, "nesting too deep") == 0, "10 000 nested unterminated objects are refused");
    memcpy(doc, "{\"string_value\":\"", 17);
    memset(doc + 17, '[', deep);
    memcpy(doc + 17 + deep, "\"}", 3);
    m = parse(doc);
    tap_ok(m != NULL && strlen(m->string_value) == deep, "brackets inside strings do not count as nesting");
    free(doc);

    /* A message at the deepest level that has lists would be written one level deeper: refused up front. */
    o = 0;
    o += (size_t)sprintf(buf + o, "{\"flags\":{\"true\":");
    for (int i = 3; i < 31; i++)
        o += (size_t)sprintf(buf + o, "{\"child\":");
    o += (size_t)sprintf(buf + o, "{\"child\":{}}");
    for (int i = 3; i < 31; i++)
        buf[o++] = '}';
    o += (size_t)sprintf(buf + o, "}}");
    m = parse(buf);
    tap_ok(m == NULL && strcmp(err.message, "nesting too deep") == 0 && has(err.field, "flags[\"true\"].child.child"),
           "an Item at level 32 is refused, naming where (%s)", err.field);
}

static void test_escaping(void)
{
    all_t built = CITYHALL__TEST__V1__ALL_TYPES__INIT;
    built.string_value = "q\"b\\s/\b\f\n\r\t\x01\x1f\x7f \xe2\x80\xa8\xe2\x80\xa9 \xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80";
    tap_ok(has(encode(&built), "\"string_value\":\"q\\\"b\\\\s/\\b\\f\\n\\r\\t\\u0001\\u001f\x7f \\u2028\\u2029 "
                               "\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80\""),
           "strings escape quotes, backslashes, control characters, U+2028 and U+2029, and keep UTF-8 as is");
    built.string_value = "a\xff"
                         "b\xc3"
                         "c\xe2\x80"
                         "d\xed\xa0\x80"
                         "e\xf4\x90\x80\x80"
                         "f\xc0\xaf";
    const char *out = encode(&built);
    tap_ok(has(out, "\"string_value\":\"a\\ufffdb\\ufffdc\\ufffd\\ufffdd\\ufffd\\ufffd\\ufffde\\ufffd\\ufffd\\ufffd"
                    "\\ufffdf\\ufffd\\ufffd\""),
           "invalid UTF-8 from a binary message becomes U+FFFD (got %s)", out);
    tap_ok(parse(out) != NULL, "so the output is always valid JSON");
    built.string_value = NULL;
    tap_ok(has(encode(&built), "\"string_value\":\"\""), "a NULL string is written as \"\"");
    built.string_value = "";
    built.color = 42;
    tap_ok(has(encode(&built), "\"color\":42"), "an enum value without a name is written as a number");

    all_t *m =
        parse("{\"string_value\":\"\\u2028\\\"\\\\\\/\\b\\f\\n\\r\\t\\ud83d\\ude00\",\"string_list\":[\"\\u0001\"]}");
    tap_ok(m != NULL && strcmp(m->string_value, "\xe2\x80\xa8\"\\/\b\f\n\r\t\xf0\x9f\x98\x80") == 0,
           "JSON escapes, surrogate pairs included, decode");
    round_trips("{\"string_value\":\"\\u2028\\\"\\\\\\/\\b\\f\\n\\r\\t\\ud83d\\ude00\\u007f\","
                "\"string_list\":[\"\\u0001\",\"\\u001f\"],\"labels\":{\"\\n\\\"\":1}}",
                "escaped strings and map keys");
}

static void test_round_trips(void)
{
    round_trips("{}", "the empty message");
    round_trips("{\"int32_value\":-1,\"sint32_value\":-2,\"sfixed32_value\":-3,\"uint32_value\":4,\"fixed32_value\":5,"
                "\"int64_value\":\"-6\",\"sint64_value\":\"-7\",\"sfixed64_value\":\"-8\",\"uint64_value\":\"9\","
                "\"fixed64_value\":\"10\",\"float_value\":1.1,\"double_value\":2.2,\"bool_value\":true,"
                "\"string_value\":\"s\",\"bytes_value\":\"AAEC\",\"color\":\"COLOR_GREEN\",\"item\":{\"name\":\"i\","
                "\"child\":{\"count\":1}},\"created_at\":\"2022-01-10T08:00:00.123Z\"}",
                "every singular field");
    round_trips("{\"int32_list\":[-2147483648,2147483647],\"sint32_list\":[-1,1],\"sfixed32_list\":[0],"
                "\"uint32_list\":[4294967295],\"fixed32_list\":[1,2,3],\"int64_list\":[\"-9223372036854775808\"],"
                "\"sint64_list\":[\"9223372036854775807\"],\"sfixed64_list\":[\"-1\"],"
                "\"uint64_list\":[\"18446744073709551615\"],\"fixed64_list\":[\"0\"],\"float_list\":[0.5,-0.25],"
                "\"double_list\":[1e-300],\"bool_list\":[false,true],\"string_list\":[\"\",\"x\"],"
                "\"bytes_list\":[\"\",\"AA==\"],\"colors\":[\"COLOR_RED\",9],\"items\":[{},{\"name\":\"n\"}],"
                "\"events\":[\"0001-01-01T00:00:00Z\",\"9999-12-31T23:59:59.999999999Z\"]}",
                "every list");
    round_trips("{\"labels\":{\"a\":\"1\",\"\":\"-1\"},\"names\":{\"-2147483648\":\"min\",\"0\":\"\"},"
                "\"flags\":{\"false\":{\"children\":[{}]},\"true\":null},\"codes\":{\"7\":99},"
                "\"deadlines\":{\"x\":\"2000-01-01T00:00:00Z\",\"y\":null},\"blobs\":{\"-9223372036854775808\":\"\"}}",
                "every map");
    round_trips("{\"choice_item\":{\"children\":[{\"child\":{}}]},\"other_time\":\"1970-01-01T00:00:00Z\"}",
                "oneof messages");
}

static void test_arena_and_buffer(void)
{
    /* Many small and a few large allocations, all released by ch_arena_free (valgrind/ASan check this). */
    ch_arena_t *a = ch_arena_new();
    ProtobufCAllocator *al = ch_arena_allocator(a);
    int aligned = 1;
    for (int i = 0; i < 10000; i++) {
        size_t n = (size_t)(i % 97 == 0 ? 70000 : i % 13 + 1);
        char *p = al->alloc(al->allocator_data, n);
        memset(p, 0xab, n);
        aligned &= ((uintptr_t)p % _Alignof(max_align_t)) == 0;
    }
    tap_ok(aligned, "arena allocations are aligned for any type");
    ch_arena_free(a);

    size_t n = 20000;
    char *doc = malloc(n * 8 + 64);
    size_t o = (size_t)sprintf(doc, "{\"string_list\":[");
    for (size_t i = 0; i < n; i++)
        o += (size_t)sprintf(doc + o, "%s\"s%zu\"", i ? "," : "", i % 1000);
    o += (size_t)sprintf(doc + o, "]}");
    all_t *m = parse_n(doc, o);
    tap_ok(m != NULL && m->n_string_list == n && strcmp(m->string_list[n - 1], "s999") == 0,
           "a list of 20 000 strings parses");
    free(doc);

    ch_buf_t b = {0};
    ch_buf_append(&b, "ab", 2);
    ch_buf_append(&b, "", 0);
    ch_buf_reserve(&b, 100000);
    ch_buf_append(&b, "c", 1);
    tap_ok(b.len == 3 && strcmp(b.base, "abc") == 0 && b.cap >= 100003, "ch_buf appends, reserves and stays NUL-ended");
    ch_buf_free(&b);
    tap_ok(b.base == NULL && b.len == 0, "ch_buf_free resets the buffer");

    ch_transcode_error_t *saved = NULL;
    m = (all_t *)ch_json_to_pb(DESC, "{\"x\":1}", 7, ch_arena_allocator(arena), saved);
    tap_ok(m == NULL, "a NULL error pointer is allowed");
}

int main(void)
{
    arena = ch_arena_new();
    test_empty_and_defaults();
    test_int32_kinds();
    test_int64_kinds();
    test_floats();
    test_bool_string_bytes();
    test_enums();
    test_messages_and_lists();
    test_maps();
    test_oneofs();
    test_timestamps();
    test_names_and_structure();
    test_depth();
    test_escaping();
    test_round_trips();
    test_arena_and_buffer();
    ch_arena_free(arena);
    return tap_done();
}
