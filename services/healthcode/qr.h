/* The health-code QR as an image: libqrencode's modules rendered as PNG (our own small encoder) or SVG. */
#ifndef HEALTHCODE_QR_H
#define HEALTHCODE_QR_H

#include <stddef.h>
#include "cityhall/transcode.h" /* ch_buf_t */

#define HC_QR_QUIET 4 /* modules of white border on each side (ISO/IEC 18004 asks for 4) */
#define HC_QR_SCALE 6 /* pixels per module in the PNG */

/**
 * Appends a PNG of the QR code of `text` (`len` bytes, 8-bit mode, error correction level M) to `out`:
 * 1-bit grayscale, `scale` pixels per module, a quiet zone of `quiet` modules. The PNG has exactly the
 * chunks IHDR, IDAT (zlib, compress2) and IEND. Returns 0, or CH_EINVAL when the text does not fit a QR
 * code or scale/quiet are out of range (1..32 and 0..16); nothing is appended then.
 */
int hc_qr_png(const char *text, size_t len, int scale, int quiet, ch_buf_t *out);

/**
 * Appends an SVG document of the same QR code to `out`: a white background and every dark module in one
 * <path>, in module units (viewBox), so the client scales it. Returns 0 or CH_EINVAL as hc_qr_png.
 */
int hc_qr_svg(const char *text, size_t len, int quiet, ch_buf_t *out);

#endif
