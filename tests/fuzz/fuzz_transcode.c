/* libFuzzer target for the transcoder: any bytes as JSON; what parses must encode, re-parse and pack unchanged. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cityhall/transcode.h"
#include "transcode_test.pb-c.h"

static void fail(const char *what, const ch_buf_t *json)
{
    fprintf(stderr, "fuzz_transcode: %s\n%.*s\n", what, json ? (int)json->len : 0, json ? json->base : "");
    abort();
}

/* Error texts are promised to be valid UTF-8 without control characters (they go into response bodies). */
static void check_text(const char *s, size_t cap)
{
    size_t n = strnlen(s, cap);
    if (n == cap)
        fail("error text not terminated", NULL);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t len = 0;
        if (c < 0x80)
            len = 1;
        else if (c >= 0xc2 && c <= 0xdf)
            len = 2;
        else if (c >= 0xe0 && c <= 0xef)
            len = 3;
        else if (c >= 0xf0 && c <= 0xf4)
            len = 4;
        if (len == 0 || c < 0x20 || c == 0x7f || i + len > n)
            fail("error text is not clean UTF-8", NULL);
        for (size_t k = 1; k < len; k++)
            if (((unsigned char)s[i + k] & 0xc0) != 0x80)
                fail("error text is not clean UTF-8", NULL);
        i += len;
    }
}

static int same(const ch_buf_t *a, const ch_buf_t *b)
{
    return a->len == b->len && memcmp(a->base, b->base, a->len) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const ProtobufCMessageDescriptor *desc = &cityhall__test__v1__all_types__descriptor;
    ch_arena_t *arena = ch_arena_new();
    ProtobufCAllocator *alloc = ch_arena_allocator(arena);
    ch_transcode_error_t err;

    ProtobufCMessage *msg = ch_json_to_pb(desc, (const char *)data, size, alloc, &err);
    if (msg == NULL) {
        if (err.message[0] == '\0')
            fail("refused without a reason", NULL);
        check_text(err.field, sizeof(err.field));
        check_text(err.message, sizeof(err.message));
        ch_arena_free(arena);
        return 0;
    }
    if (!protobuf_c_message_check(msg))
        fail("parsed message fails protobuf_c_message_check", NULL);

    ch_buf_t first = {0}, second = {0}, third = {0};
    ch_pb_to_json(msg, &first);
    ProtobufCMessage *again = ch_json_to_pb(desc, first.base, first.len, alloc, &err);
    if (again == NULL) {
        fprintf(stderr, "re-parse refused at '%s': %s\n", err.field, err.message);
        fail("the encoder's output does not parse", &first);
    }
    ch_pb_to_json(again, &second);
    if (!same(&first, &second))
        fail("JSON changed through a second parse", &first);

    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *bin = malloc(n ? n : 1);
    if (bin == NULL)
        abort();
    if (protobuf_c_message_pack(msg, bin) != n)
        fail("packed size mismatch", &first);
    ProtobufCMessage *back = protobuf_c_message_unpack(desc, NULL, n, bin);
    if (back == NULL)
        fail("the binary form does not unpack", &first);
    ch_pb_to_json(back, &third);
    if (!same(&first, &third))
        fail("JSON changed through the binary form", &first);

    protobuf_c_message_free_unpacked(back, NULL);
    free(bin);
    ch_buf_free(&first);
    ch_buf_free(&second);
    ch_buf_free(&third);
    ch_arena_free(arena);
    return 0;
}
