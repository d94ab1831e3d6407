/* Unit tests of the health-code QR images: a well-formed PNG (signature, chunk CRCs, IHDR, pixels) and SVG. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <qrencode.h>
#include <zlib.h>
#include "cityhall/ch.h"
#include "services/healthcode/qr.h"
#include "tap.h"

static const char token[] = "eyJhbGciOiJFUzI1NiIsInR5cCI6ImhjK2p3dCIsImtpZCI6IjIwMjYxMTI4VDIwMDA0MFoifQ."
                            "eyJpc3MiOiJjaXR5aGFsbCIsInN1YiI6IjNmMmE5YzE0LTk4ZDEtNGQ2Ny1hYjEwLTAxMjM0NTY3ODlhYiIsImNvbC"
                            "I6ImdyZWVuIiwibm0iOiLlvKAqIiwiaWF0IjoxNzk1ODk0NDEwLCJleHAiOjE3OTU4OTQ3MTB9."
                            "MEUCIQDk3Zk0pGx8l2b1w4nqzYbC8oVd0xjv7dYwzZzZzZzZzQIgQ1M7oU1nF1k2ZgVh6t0m9Wq3a2V3c2Vjcm";

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

typedef struct chunk {
    char type[5];
    const uint8_t *data;
    uint32_t len;
    int crc_ok;
} chunk_t;

/* Splits a PNG into chunks after its signature; returns the count, or -1 when the framing is broken. */
static int png_chunks(const uint8_t *png, size_t len, chunk_t *out, int max)
{
    size_t o = 8;
    int n = 0;
    while (o < len && n < max) {
        if (len - o < 12)
            return -1;
        uint32_t clen = get_u32(png + o);
        if (clen > len - o - 12)
            return -1;
        chunk_t *c = &out[n++];
        memcpy(c->type, png + o + 4, 4);
        c->type[4] = '\0';
        c->data = png + o + 8;
        c->len = clen;
        uLong crc = crc32(crc32(0L, Z_NULL, 0), png + o + 4, clen + 4);
        c->crc_ok = (uint32_t)crc == get_u32(png + o + 8 + clen);
        o += 12 + clen;
    }
    return o == len ? n : -1;
}

static void test_png(void)
{
    ch_buf_t b = {0};
    tap_ok(hc_qr_png(token, strlen(token), HC_QR_SCALE, HC_QR_QUIET, &b) == 0, "a token renders as a PNG");
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    tap_ok(b.len > 8 && memcmp(b.base, sig, 8) == 0, "the PNG starts with the PNG signature");
    chunk_t c[8];
    int n = png_chunks((const uint8_t *)b.base, b.len, c, 8);
    tap_ok(n == 3, "the PNG is exactly three well-framed chunks (got %d)", n);
    if (n != 3) {
        ch_buf_free(&b);
        return;
    }
    tap_is_str(c[0].type, "IHDR", "the first chunk is IHDR");
    tap_is_str(c[1].type, "IDAT", "the second chunk is IDAT");
    tap_is_str(c[2].type, "IEND", "the last chunk is IEND");
    tap_ok(c[0].crc_ok && c[1].crc_ok && c[2].crc_ok, "every chunk's CRC-32 matches");
    tap_ok(c[2].len == 0, "IEND is empty");

    QRcode *qr = QRcode_encodeString(token, 0, QR_ECLEVEL_M, QR_MODE_8, 1);
    tap_ok(qr != NULL, "libqrencode encodes the token at level M");
    uint32_t side = (uint32_t)(qr->width + 2 * HC_QR_QUIET) * HC_QR_SCALE;
    tap_ok(c[0].len == 13 && get_u32(c[0].data) == side && get_u32(c[0].data + 4) == side,
           "IHDR's size is (modules + 2 x quiet zone) x scale = %u", side);
    tap_ok(c[0].data[8] == 1 && c[0].data[9] == 0 && c[0].data[10] == 0 && c[0].data[11] == 0 && c[0].data[12] == 0,
           "IHDR says 1-bit grayscale, deflate, filter 0, no interlace");

    size_t stride = 1 + (side + 7) / 8;
    uLongf rawlen = stride * side + 16;
    uint8_t *raw = malloc(rawlen);
    int z = uncompress(raw, &rawlen, c[1].data, c[1].len);
    tap_ok(z == Z_OK && rawlen == stride * side, "IDAT inflates to exactly height x (1 + row bytes)");
    int filters_ok = 1, pixels_ok = 1;
    for (uint32_t y = 0; z == Z_OK && y < side; ++y) {
        const uint8_t *row = raw + y * stride;
        filters_ok &= row[0] == 0;
        for (uint32_t x = 0; x < side; ++x) {
            int black = !(row[1 + x / 8] & (0x80 >> (x % 8)));
            int mx = (int)(x / HC_QR_SCALE) - HC_QR_QUIET, my = (int)(y / HC_QR_SCALE) - HC_QR_QUIET;
            int want = mx >= 0 && my >= 0 && mx < qr->width && my < qr->width && (qr->data[my * qr->width + mx] & 1);
            pixels_ok &= black == want;
        }
    }
    tap_ok(filters_ok, "every scanline uses filter None");
    tap_ok(pixels_ok, "every pixel is the module it scales, with a white quiet zone");
    free(raw);
    QRcode_free(qr);
    ch_buf_free(&b);
}

static void test_svg(void)
{
    ch_buf_t b = {0};
    tap_ok(hc_qr_svg(token, strlen(token), HC_QR_QUIET, &b) == 0, "a token renders as an SVG");
    const char *s = b.base;
    tap_ok(s != NULL && strncmp(s, "<?xml", 5) == 0, "the SVG starts with an XML declaration");
    tap_ok(s != NULL && strstr(s, "<svg xmlns=\"http://www.w3.org/2000/svg\"") != NULL, "the root is an svg element");
    const char *p = s != NULL ? strstr(s, "<path") : NULL;
    tap_ok(p != NULL && strstr(p + 1, "<path") == NULL, "the modules are one path element");
    tap_ok(p != NULL && strstr(p, "d=\"M") != NULL, "the path has drawing commands");
    tap_ok(s != NULL && b.len > 7 && strcmp(s + b.len - 7, "</svg>\n") == 0, "the document ends with </svg>");
    int lt = 0, gt = 0;
    for (size_t i = 0; i < b.len; ++i)
        lt += s[i] == '<', gt += s[i] == '>';
    tap_ok(lt == gt && lt == 5, "tags balance: declaration, svg, rect, path, /svg (%d < and %d >)", lt, gt);
    ch_buf_free(&b);
}

static void test_refusals(void)
{
    ch_buf_t b = {0};
    tap_ok(hc_qr_png("", 0, HC_QR_SCALE, HC_QR_QUIET, &b) == CH_EINVAL && b.len == 0, "empty text is refused");
    char *big = malloc(4000);
    memset(big, 'A', 4000);
    tap_ok(hc_qr_png(big, 4000, HC_QR_SCALE, HC_QR_QUIET, &b) == CH_EINVAL && b.len == 0,
           "text too long for a QR code is refused");
    tap_ok(hc_qr_svg(big, 4000, HC_QR_QUIET, &b) == CH_EINVAL && b.len == 0, "the SVG refuses it too");
    tap_ok(hc_qr_png(token, strlen(token), 0, HC_QR_QUIET, &b) == CH_EINVAL && b.len == 0, "scale 0 is refused");
    tap_ok(hc_qr_png("a\0b", 3, HC_QR_SCALE, HC_QR_QUIET, &b) == CH_EINVAL, "text with a NUL byte is refused");
    free(big);
    ch_buf_free(&b);
}

int main(void)
{
    test_png();
    test_svg();
    test_refusals();
    return tap_done();
}
