/* The one JSON <-> protobuf transcoder, driven by protobuf-c descriptors (proto3 JSON mapping). */
#ifndef CITYHALL_TRANSCODE_H
#define CITYHALL_TRANSCODE_H

#include <stddef.h>
#include <protobuf-c/protobuf-c.h>

/** A growable byte buffer backed by malloc; free with ch_buf_free. Once anything is appended, base[len] is a NUL. */
typedef struct ch_buf {
    char *base;
    size_t len;
    size_t cap;
} ch_buf_t;

void ch_buf_reserve(ch_buf_t *buf, size_t extra);
void ch_buf_append(ch_buf_t *buf, const void *data, size_t len);
void ch_buf_free(ch_buf_t *buf);

/** Why a JSON document was refused: the field path (e.g. "items[2].name", "" for the root) and a reason. */
typedef struct ch_transcode_error {
    char field[256];
    char message[256];
} ch_transcode_error_t;

/** Nesting deeper than this (objects and arrays together) is refused. */
#define CH_TRANSCODE_MAX_DEPTH 32
/** A request's repeated fields hold at most this many elements (the largest batch a route takes). */
#define CH_TRANSCODE_MAX_ELEMENTS 10000
/** A request's string fields hold at most this many bytes. */
#define CH_TRANSCODE_MAX_STRING 65536

/**
 * Parses `len` bytes of JSON into a new message of type `desc`, allocated from `alloc` (pass a pool
 * allocator: nothing is freed by hand on success; on failure partial allocations stay in the pool; `alloc`
 * must not be NULL). An empty body (len == 0) is the empty message. Returns NULL and fills `err` when the
 * document is not valid JSON, is not an object, names an unknown field, has a value of the wrong type or out
 * of range, repeats a key, or nests deeper than CH_TRANSCODE_MAX_DEPTH. `err` may be NULL; its texts are
 * always valid UTF-8 without control characters, fit to be put in a response body as they are.
 *
 * Mapping (proto3 JSON, proto field names in snake_case; lowerCamelCase names are also accepted):
 * 64-bit integers as strings or numbers; 32-bit integers as numbers (or numeric strings); enums by
 * name or number; bytes as base64 (standard or URL-safe, padding optional); bool as true/false;
 * floats as numbers or "NaN"/"Infinity"/"-Infinity"; google.protobuf.Timestamp as an RFC 3339
 * string; map fields (repeated *Entry messages with key = 1, value = 2) as objects; null means the
 * default value.
 */
ProtobufCMessage *ch_json_to_pb(const ProtobufCMessageDescriptor *desc, const char *json, size_t len,
                                ProtobufCAllocator *alloc, ch_transcode_error_t *err);

/**
 * Appends the JSON form of `msg` to `out`. Every field is emitted, defaults included (clients of the
 * mini-program read `false` and `0` rather than absent keys), except message fields that are not set
 * and oneof members that are not the chosen case. 64-bit integers are strings, enums are names
 * (numbers when the value has no name), bytes are standard base64, Timestamps are RFC 3339 in UTC.
 */
void ch_pb_to_json(const ProtobufCMessage *msg, ch_buf_t *out);

/**
 * Checks a decoded request message (from either encoding) for what protobuf-c does not: every string field is
 * valid UTF-8 of at most CH_TRANSCODE_MAX_STRING bytes and no repeated field has more than
 * CH_TRANSCODE_MAX_ELEMENTS elements. Returns 0, or -1 with `err` (may be NULL) naming the first field refused.
 */
int ch_pb_check_limits(const ProtobufCMessage *msg, ch_transcode_error_t *err);

/** A ProtobufCAllocator that allocates from a caller-owned arena and never frees (see ch_arena_*). */
typedef struct ch_arena ch_arena_t;
ch_arena_t *ch_arena_new(void);
void ch_arena_free(ch_arena_t *arena);
ProtobufCAllocator *ch_arena_allocator(ch_arena_t *arena);

#endif
