/* Personal data: GB 11643 ID numbers, phone numbers and names (checks, masks), AES-256-GCM and keyed hashes. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include "cityhall/ch.h"
#include "cityhall/pii.h"

/* ---- ID numbers (GB 11643-1999) ---- */

static const int id_weights[17] = {7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2};

char ch_id_number_check_char(const char *first17)
{
    int sum = 0;
    for (int i = 0; i < 17; ++i)
        sum += (first17[i] - '0') * id_weights[i];
    return "10X98765432"[sum % 11];
}

static int leap_year(int y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int digits(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; ++i)
        v = v * 10 + (s[i] - '0');
    return v;
}

int ch_id_number_check(const char *id, const char **why)
{
    const char *dummy;
    if (why == NULL)
        why = &dummy;
    *why = NULL;
    if (id == NULL || strlen(id) != 18) {
        *why = "must be 18 characters";
        return CH_EINVAL;
    }
    for (int i = 0; i < 17; ++i) {
        if (id[i] < '0' || id[i] > '9') {
            *why = "must be 17 digits followed by a digit or X";
            return CH_EINVAL;
        }
    }
    if (!((id[17] >= '0' && id[17] <= '9') || id[17] == 'X')) {
        *why = "must be 17 digits followed by a digit or X";
        return CH_EINVAL;
    }
    if (id[0] < '1' || id[0] > '8') {
        *why = "invalid region code";
        return CH_EINVAL;
    }
    int y = digits(id + 6, 4), m = digits(id + 10, 2), d = digits(id + 12, 2);
    static const int mdays[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1900 || m < 1 || m > 12 || d < 1 || d > mdays[m - 1] + (m == 2 && leap_year(y))) {
        *why = "invalid birth date";
        return CH_EINVAL;
    }
    /* "today" in China Standard Time (UTC+8, no daylight saving), where the numbers are issued */
    time_t now = time(NULL) + 8 * 3600;
    struct tm tm;
    gmtime_r(&now, &tm);
    long today = (long)(tm.tm_year + 1900) * 10000 + (tm.tm_mon + 1) * 100 + tm.tm_mday;
    if ((long)y * 10000 + m * 100 + d > today) {
        *why = "birth date is in the future";
        return CH_EINVAL;
    }
    if (ch_id_number_check_char(id) != id[17]) {
        *why = "wrong check character";
        return CH_EINVAL;
    }
    return 0;
}

void ch_id_number_mask(const char *id, char *out)
{
    size_t len = id != NULL ? strlen(id) : 0;
    if (len != 18) {
        /* not a number we can show any part of */
        memset(out, '*', 18);
        out[18] = '\0';
        return;
    }
    memcpy(out, id, 4);
    memset(out + 4, '*', 10);
    memcpy(out + 14, id + 14, 4);
    out[18] = '\0';
}

int ch_phone_check(const char *phone)
{
    if (phone == NULL || strlen(phone) != 11 || phone[0] != '1' || phone[1] < '3' || phone[1] > '9')
        return CH_EINVAL;
    for (int i = 2; i < 11; ++i)
        if (phone[i] < '0' || phone[i] > '9')
            return CH_EINVAL;
    return 0;
}

void ch_phone_mask(const char *phone, char *out)
{
    if (phone == NULL || strlen(phone) != 11) {
        memset(out, '*', 11);
        out[11] = '\0';
        return;
    }
    memcpy(out, phone, 3);
    memset(out + 3, '*', 4);
    memcpy(out + 7, phone + 7, 4);
    out[11] = '\0';
}

/* Length of the valid UTF-8 sequence at s (1-4), or 0 when it is not one (overlongs and surrogates included). */
static size_t utf8_char_len(const unsigned char *s, size_t avail)
{
    unsigned c = s[0];
    size_t n;
    unsigned min;
    if (c < 0x80)
        return c != 0 ? 1 : 0;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF)
        n = 3, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4)
        n = 4, min = 0x10000;
    else
        return 0;
    if (avail < n)
        return 0;
    unsigned cp = c & (0x7F >> n);
    for (size_t i = 1; i < n; ++i) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

/* Two-character surnames (复姓) kept whole, as 欧阳** shows. */
static const char *const compound_surnames[] = {
    "欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒", "夏侯",
    "轩辕", "令狐", "端木", "独孤", "南宫", "西门", "百里", "呼延", "万俟", "闻人", "澹台", "公羊", "申屠",
};

void ch_name_mask(const char *name, char *out, size_t outlen)
{
    if (outlen == 0)
        return;
    out[0] = '\0';
    if (name == NULL)
        return;
    const unsigned char *s = (const unsigned char *)name;
    size_t len = strlen(name), chars = 0, first = 0, i = 0;
    /* count code points; anything that is not valid UTF-8 is shown as stars only */
    while (i < len) {
        size_t n = utf8_char_len(s + i, len - i);
        if (n == 0) {
            first = 0;
            chars = len; /* a star per byte: nothing of an invalid name is echoed */
            break;
        }
        if (chars == 0)
            first = n;
        i += n;
        ++chars;
    }
    size_t keep = 0; /* bytes shown as they are */
    size_t kept_chars = 0;
    if (first != 0 && chars >= 2) {
        keep = first;
        kept_chars = 1;
        for (size_t k = 0; k < sizeof(compound_surnames) / sizeof(compound_surnames[0]); ++k) {
            size_t cl = strlen(compound_surnames[k]);
            if (chars >= 3 && len >= cl && memcmp(name, compound_surnames[k], cl) == 0) {
                keep = cl;
                kept_chars = 2;
                break;
            }
        }
    }
    if (keep + 2 > outlen) /* room for what is kept, one star and the NUL, or else stars only */
        keep = 0, kept_chars = 0;
    size_t o = 0;
    memcpy(out, name, keep);
    o = keep;
    for (size_t k = kept_chars; k < chars && o + 1 < outlen; ++k)
        out[o++] = '*';
    if (chars == 0 && outlen > 1)
        out[o++] = '*'; /* an empty name still shows that something is hidden */
    out[o] = '\0';
}

/* ---- keys ---- */

struct ch_pii_keys {
    uint8_t aes[32];
    uint8_t hmac[32];
    EVP_MAC_CTX *mac; /* initialized with the HMAC key; duplicated per use, never used directly */
};

ch_pii_keys_t *ch_pii;

static EVP_CIPHER *aes_gcm;
static EVP_MAC *hmac_mac;
static pthread_once_t algs_once = PTHREAD_ONCE_INIT;

static void algs_init(void)
{
    aes_gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    hmac_mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (aes_gcm == NULL || hmac_mac == NULL)
        abort();
}

void ch_pii_keys_path(const char *var_dir, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s/keys/data.key", var_dir);
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

ch_pii_keys_t *ch_pii_keys_load(const char *path, char *err, size_t errlen)
{
    pthread_once(&algs_once, algs_init);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        snprintf(err, errlen, "could not open data key file %s: %s (run `cityhall keys init`)", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "data key file %s is not a regular file", path);
        close(fd);
        return NULL;
    }
    if ((st.st_mode & 077) != 0) {
        snprintf(err, errlen, "data key file %s is readable by group or others (mode %03o): chmod 600 it", path,
                 (unsigned)(st.st_mode & 0777));
        close(fd);
        return NULL;
    }
    char text[256];
    ssize_t n = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (n < 0)
        n = 0;
    text[n] = '\0';
    while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r' || text[n - 1] == ' '))
        text[--n] = '\0';
    uint8_t raw[64];
    int ok = n == 128;
    for (int i = 0; ok && i < 64; ++i) {
        int hi = hexval(text[2 * i]), lo = hexval(text[2 * i + 1]);
        if (hi < 0 || lo < 0)
            ok = 0;
        else
            raw[i] = (uint8_t)(hi << 4 | lo);
    }
    OPENSSL_cleanse(text, sizeof(text));
    if (!ok) {
        snprintf(err, errlen, "data key file %s must hold 128 hex digits (64 bytes) on one line", path);
        return NULL;
    }
    ch_pii_keys_t *keys = calloc(1, sizeof(*keys));
    if (keys == NULL)
        abort();
    memcpy(keys->aes, raw, 32);
    memcpy(keys->hmac, raw + 32, 32);
    OPENSSL_cleanse(raw, sizeof(raw));
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
                           OSSL_PARAM_construct_end()};
    keys->mac = EVP_MAC_CTX_new(hmac_mac);
    if (keys->mac == NULL || EVP_MAC_init(keys->mac, keys->hmac, sizeof(keys->hmac), params) != 1)
        abort();
    return keys;
}

/* mkdir -p with 0700 for what it creates. */
static int mkdir_parents(const char *path, char *err, size_t errlen)
{
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL || slash == dir)
        return 0;
    *slash = '\0';
    for (char *p = dir + 1;; ++p) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
            snprintf(err, errlen, "could not create folder %s: %s", dir, strerror(errno));
            return -1;
        }
        *p = saved;
        if (saved == '\0')
            break;
    }
    return 0;
}

int ch_pii_keys_create(const char *path, char *err, size_t errlen)
{
    struct stat st;
    if (lstat(path, &st) == 0)
        return 0;
    if (errno != ENOENT) {
        snprintf(err, errlen, "could not look at %s: %s", path, strerror(errno));
        return CH_EINVAL;
    }
    if (mkdir_parents(path, err, errlen) != 0)
        return CH_EINVAL;
    uint8_t raw[64];
    char text[130];
    if (RAND_bytes(raw, sizeof(raw)) != 1) {
        snprintf(err, errlen, "no randomness");
        return CH_EINVAL;
    }
    ch_hex(raw, sizeof(raw), text);
    OPENSSL_cleanse(raw, sizeof(raw));
    text[128] = '\n';
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    unlink(tmp); /* a leftover of an interrupted run */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "could not create %s: %s", tmp, strerror(errno));
        OPENSSL_cleanse(text, sizeof(text));
        return CH_EINVAL;
    }
    int ok = fchmod(fd, 0600) == 0 && write(fd, text, 129) == 129 && fsync(fd) == 0;
    ok = close(fd) == 0 && ok;
    OPENSSL_cleanse(text, sizeof(text));
    /* link(2): the complete file appears under its name at once, and an existing key is never replaced */
    if (!ok || link(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        if (ok && e == EEXIST)
            return 0; /* created concurrently */
        snprintf(err, errlen, "could not write %s: %s", path, strerror(e));
        return CH_EINVAL;
    }
    unlink(tmp);
    return 0;
}

int ch_pii_init(const char *var_dir, char *err, size_t errlen)
{
    if (ch_pii != NULL)
        return 0;
    char path[1024];
    ch_pii_keys_path(var_dir, path, sizeof(path));
    ch_pii = ch_pii_keys_load(path, err, errlen);
    return ch_pii != NULL ? 0 : CH_EINVAL;
}

/* ---- encryption and keyed hashes ---- */

#define GCM_NONCE 12
#define GCM_TAG   16

void ch_pii_encrypt(const ch_pii_keys_t *keys, const void *plain, size_t len, ch_buf_t *out)
{
    if (len > INT32_MAX)
        abort();
    ch_buf_reserve(out, GCM_NONCE + len + GCM_TAG);
    uint8_t *nonce = (uint8_t *)out->base + out->len, *ct = nonce + GCM_NONCE;
    if (RAND_bytes(nonce, GCM_NONCE) != 1)
        abort(); /* a nonce must never repeat: refuse to encrypt without randomness */
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int n = 0, fin = 0;
    if (ctx == NULL || EVP_EncryptInit_ex2(ctx, aes_gcm, keys->aes, nonce, NULL) != 1 ||
        EVP_EncryptUpdate(ctx, ct, &n, plain, (int)len) != 1 || EVP_EncryptFinal_ex(ctx, ct + n, &fin) != 1 ||
        (size_t)(n + fin) != len || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, GCM_TAG, ct + len) != 1)
        abort();
    EVP_CIPHER_CTX_free(ctx);
    out->len += GCM_NONCE + len + GCM_TAG;
    out->base[out->len] = '\0';
}

int ch_pii_decrypt(const ch_pii_keys_t *keys, const void *sealed, size_t len, ch_buf_t *out)
{
    if (len < GCM_NONCE + GCM_TAG || len > INT32_MAX)
        return CH_EINVAL;
    const uint8_t *nonce = sealed, *ct = nonce + GCM_NONCE;
    size_t clen = len - GCM_NONCE - GCM_TAG;
    ch_buf_reserve(out, clen + 1);
    uint8_t *dst = (uint8_t *)out->base + out->len;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int n = 0, fin = 0;
    int ok = ctx != NULL && EVP_DecryptInit_ex2(ctx, aes_gcm, keys->aes, nonce, NULL) == 1 &&
             EVP_DecryptUpdate(ctx, dst, &n, ct, (int)clen) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, GCM_TAG, (void *)(ct + clen)) == 1 &&
             EVP_DecryptFinal_ex(ctx, dst + n, &fin) == 1;
    EVP_CIPHER_CTX_free(ctx);
    if (!ok) {
        ERR_clear_error();
        OPENSSL_cleanse(dst, clen);
        out->base[out->len] = '\0';
        return CH_EINVAL;
    }
    out->len += (size_t)(n + fin);
    out->base[out->len] = '\0';
    return 0;
}

void ch_pii_hmac(const ch_pii_keys_t *keys, const char *domain, const void *value, size_t len, uint8_t out[32])
{
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_dup(keys->mac);
    size_t outlen = 0;
    static const uint8_t zero = 0;
    if (ctx == NULL || EVP_MAC_update(ctx, (const uint8_t *)domain, strlen(domain)) != 1 ||
        EVP_MAC_update(ctx, &zero, 1) != 1 || EVP_MAC_update(ctx, value, len) != 1 ||
        EVP_MAC_final(ctx, out, &outlen, 32) != 1 || outlen != 32)
        abort();
    EVP_MAC_CTX_free(ctx);
}

void ch_hex(const uint8_t *in, size_t len, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < len; ++i) {
        out[2 * i] = hex[in[i] >> 4];
        out[2 * i + 1] = hex[in[i] & 15];
    }
    out[2 * len] = '\0';
}
