/* The health-code QR as an image: libqrencode's modules rendered as PNG (our own small encoder) or SVG. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <qrencode.h>
#include <zlib.h>
#include "cityhall/ch.h"
#include "qr.h"

#define TEXT_MAX 2048 /* far above a token (~400 bytes); a QR code holds at most 2331 bytes at level M */

/*
 * libqrencode keeps no state between calls when built thread-safe (Debian's is), but nothing in its API
 * promises it; images are rendered once per signed token, so a lock costs nothing that matters.
 */
static pthread_mutex_t qr_lock = PTHREAD_MUTEX_INITIALIZER;

static QRcode *qr_encode(const char *text, size_t len)
{
    if (len == 0 || len > TEXT_MAX || memchr(text, '\0', len) != NULL)
        return NULL;
    char buf[TEXT_MAX + 1];
    memcpy(buf, text, len);
    buf[len] = '\0';
    pthread_mutex_lock(&qr_lock);
    QRcode *qr = QRcode_encodeString(buf, 0, QR_ECLEVEL_M, QR_MODE_8, 1);
    pthread_mutex_unlock(&qr_lock);
    return qr;
}

/* A dark module: libqrencode sets bit 0 of a module's byte for dark. */
static int dark(const QRcode *qr, int x, int y)
{
    return qr->data[y * qr->width + x] & 1;
}

/* ---- PNG ---- */

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* One chunk: length, type, data, and the CRC-32 of type and data (PNG uses zlib's CRC). */
static void png_chunk(ch_buf_t *out, const char type[4], const uint8_t *data, size_t len)
{
    uint8_t head[8], tail[4];
    put_u32(head, (uint32_t)len);
    memcpy(head + 4, type, 4);
    ch_buf_append(out, head, 8);
    if (len != 0)
        ch_buf_append(out, data, len);
    uLong crc = crc32(0L, Z_NULL, 0);
    crc = crc32(crc, (const Bytef *)type, 4);
    if (len != 0)
        crc = crc32(crc, data, (uInt)len);
    put_u32(tail, (uint32_t)crc);
    ch_buf_append(out, tail, 4);
}

int hc_qr_png(const char *text, size_t len, int scale, int quiet, ch_buf_t *out)
{
    if (scale < 1 || scale > 32 || quiet < 0 || quiet > 16)
        return CH_EINVAL;
    QRcode *qr = qr_encode(text, len);
    if (qr == NULL)
        return CH_EINVAL;
    int modules = qr->width + 2 * quiet;
    uint32_t side = (uint32_t)modules * (uint32_t)scale;
    size_t stride = 1 + (side + 7) / 8; /* filter byte, then 8 pixels a byte, most significant bit first */
    size_t rawlen = stride * side;
    uint8_t *raw = malloc(rawlen);
    if (raw == NULL)
        abort();
    /* 1-bit grayscale: 1 is white. Build each module row once, then repeat it `scale` times. */
    for (int my = 0; my < modules; ++my) {
        uint8_t *row = raw + (size_t)my * (size_t)scale * stride;
        memset(row, 0xff, stride);
        row[0] = 0; /* filter type None */
        int qy = my - quiet;
        for (int mx = 0; mx < modules; ++mx) {
            int qx = mx - quiet;
            if (qy < 0 || qy >= qr->width || qx < 0 || qx >= qr->width || !dark(qr, qx, qy))
                continue;
            for (int k = 0; k < scale; ++k) {
                uint32_t px = (uint32_t)mx * (uint32_t)scale + (uint32_t)k;
                row[1 + px / 8] &= (uint8_t) ~(0x80u >> (px % 8));
            }
        }
        /* padding bits after the last pixel stay 1 (white), which decoders ignore anyway */
        for (int k = 1; k < scale; ++k)
            memcpy(row + (size_t)k * stride, row, stride);
    }
    QRcode_free(qr);

    uLongf zlen = compressBound((uLong)rawlen);
    uint8_t *z = malloc(zlen);
    if (z == NULL)
        abort();
    if (compress2(z, &zlen, raw, (uLong)rawlen, 9) != Z_OK) {
        free(raw);
        free(z);
        return CH_EINVAL;
    }
    free(raw);

    static const uint8_t signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    uint8_t ihdr[13];
    put_u32(ihdr, side);
    put_u32(ihdr + 4, side);
    ihdr[8] = 1;  /* bit depth */
    ihdr[9] = 0;  /* color type: grayscale */
    ihdr[10] = 0; /* compression: deflate */
    ihdr[11] = 0; /* filter method 0 */
    ihdr[12] = 0; /* no interlace */
    ch_buf_append(out, signature, sizeof(signature));
    png_chunk(out, "IHDR", ihdr, sizeof(ihdr));
    png_chunk(out, "IDAT", z, zlen);
    png_chunk(out, "IEND", NULL, 0);
    free(z);
    return 0;
}

/* ---- SVG ---- */

int hc_qr_svg(const char *text, size_t len, int quiet, ch_buf_t *out)
{
    if (quiet < 0 || quiet > 16)
        return CH_EINVAL;
    QRcode *qr = qr_encode(text, len);
    if (qr == NULL)
        return CH_EINVAL;
    int side = qr->width + 2 * quiet;
    char tmp[256];
    int n = snprintf(tmp, sizeof(tmp),
                     "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                     "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 %d %d\" width=\"%d\" height=\"%d\" "
                     "shape-rendering=\"crispEdges\">",
                     side, side, side * HC_QR_SCALE, side * HC_QR_SCALE);
    ch_buf_append(out, tmp, (size_t)n);
    n = snprintf(tmp, sizeof(tmp), "<rect width=\"%d\" height=\"%d\" fill=\"#fff\"/><path fill=\"#000\" d=\"", side,
                 side);
    ch_buf_append(out, tmp, (size_t)n);
    /* one subpath per horizontal run of dark modules: M x y h run v1 h -run z */
    for (int y = 0; y < qr->width; ++y) {
        for (int x = 0; x < qr->width;) {
            if (!dark(qr, x, y)) {
                ++x;
                continue;
            }
            int run = 1;
            while (x + run < qr->width && dark(qr, x + run, y))
                ++run;
            n = snprintf(tmp, sizeof(tmp), "M%d %dh%dv1h-%dz", x + quiet, y + quiet, run, run);
            ch_buf_append(out, tmp, (size_t)n);
            x += run;
        }
    }
    ch_buf_append(out, "\"/></svg>\n", 10);
    QRcode_free(qr);
    return 0;
}
