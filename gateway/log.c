/* Structured logging: one JSON object per line on stderr, written with a single write(2). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "gateway.h"

static const char *const level_names[] = {"debug", "info", "warn", "error"};

size_t ch_json_escape(char *dst, size_t cap, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (size_t i = 0; i < len; ++i) {
        unsigned char c = (unsigned char)s[i];
        char esc[6];
        size_t n = 0;
        if (c == '"' || c == '\\') {
            esc[n++] = '\\';
            esc[n++] = (char)c;
        } else if (c < 0x20) {
            esc[n++] = '\\';
            esc[n++] = 'u';
            esc[n++] = '0';
            esc[n++] = '0';
            esc[n++] = hex[c >> 4];
            esc[n++] = hex[c & 15];
        } else {
            esc[n++] = (char)c;
        }
        if (o + n > cap)
            break;
        memcpy(dst + o, esc, n);
        o += n;
    }
    return o;
}

void ch_log(int level, const char *event, const char *fmt, ...)
{
    char msg[1024], line[2048];
    va_list ap;
    va_start(ap, fmt);
    int mlen = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (mlen < 0)
        mlen = 0;
    if ((size_t)mlen >= sizeof(msg))
        mlen = sizeof(msg) - 1;

    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t o = (size_t)snprintf(line, sizeof(line),
                                "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\",\"event\":\"%s\",\"msg\":\"",
                                tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                                ts.tv_nsec / 1000000, level_names[level & 3], event);
    o += ch_json_escape(line + o, sizeof(line) - o - 3, msg, (size_t)mlen);
    line[o++] = '"';
    line[o++] = '}';
    line[o++] = '\n';
    ssize_t w = write(2, line, o);
    (void)w;
}
