/*
 * libFuzzer target for binary protobuf request bodies: every request type of every module's route table (the
 * first input byte picks one) is decoded as gateway/call.c does for application/x-protobuf (unknown fields, bad
 * UTF-8 and oversized fields refused), then re-encoded both ways. What the gateway accepts must pass
 * protobuf_c_message_check, pack to exactly its packed size and to the same bytes after a second decode, and its
 * JSON form must parse back to the same JSON: a handler sees the same request whichever encoding carried it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gateway.h"
#include "cityhall/transcode.h"
#include "fuzz_util.h"

static const ProtobufCMessageDescriptor **descs;
static size_t ndescs;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    for (size_t m = 0; m < ch_nmodules; ++m)
        for (size_t i = 0; i < ch_modules[m]->nroutes; ++i) {
            const ProtobufCMessageDescriptor *d = ch_modules[m]->routes[i].request;
            size_t k = 0;
            while (k < ndescs && descs[k] != d)
                ++k;
            if (d == NULL || k < ndescs)
                continue;
            descs = realloc(descs, (ndescs + 1) * sizeof(*descs));
            descs[ndescs++] = d;
        }
    return 0;
}

static uint8_t *pack(const ProtobufCMessage *msg, size_t *len)
{
    *len = protobuf_c_message_get_packed_size(msg);
    uint8_t *b = malloc(*len ? *len : 1);
    if (protobuf_c_message_pack(msg, b) != *len)
        fz_fail("pack wrote another size than get_packed_size", NULL, 0);
    return b;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    const ProtobufCMessageDescriptor *desc = descs[data[0] % ndescs];
    ch_arena_t *arena = ch_arena_new();
    ProtobufCAllocator *alloc = ch_arena_allocator(arena);
    ProtobufCMessage *msg = protobuf_c_message_unpack(desc, alloc, size - 1, data + 1);
    if (msg == NULL || ch_pb_unknown_field(msg) != NULL || ch_pb_check_limits(msg, NULL) != 0) { /* call.c: 400 */
        ch_arena_free(arena);
        return 0;
    }
    if (!protobuf_c_message_check(msg))
        fz_fail("decoded message fails protobuf_c_message_check", desc->name, strlen(desc->name));

    size_t l1, l2;
    uint8_t *b1 = pack(msg, &l1);
    ProtobufCMessage *again = protobuf_c_message_unpack(desc, alloc, l1, b1);
    if (again == NULL)
        fz_fail("the re-encoded message does not decode", desc->name, strlen(desc->name));
    uint8_t *b2 = pack(again, &l2);
    if (l1 != l2 || memcmp(b1, b2, l1) != 0)
        fz_fail("encoding changed through a decode", desc->name, strlen(desc->name));

    ch_buf_t j1 = {0}, j2 = {0};
    ch_transcode_error_t err;
    ch_pb_to_json(msg, &j1);
    ProtobufCMessage *from_json = ch_json_to_pb(desc, j1.base, j1.len, alloc, &err);
    if (from_json == NULL) {
        fprintf(stderr, "%s: refused at '%s': %s\n", desc->name, err.field, err.message);
        fz_fail("the JSON form of a decoded message does not parse", j1.base, j1.len);
    }
    ch_pb_to_json(from_json, &j2);
    if (j1.len != j2.len || memcmp(j1.base, j2.base, j1.len) != 0)
        fz_fail("JSON changed through a parse", j1.base, j1.len);

    ch_buf_free(&j1);
    ch_buf_free(&j2);
    free(b1);
    free(b2);
    ch_arena_free(arena);
    return 0;
}
