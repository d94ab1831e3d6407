/* Unit tests of personal-data helpers: GB 11643 ID numbers, masks, AES-256-GCM, keyed hashes, the key file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "gateway.h"
#include "cityhall/pii.h"
#include "tap.h"

/* An ID number with the given 17 first digits and its right check character. */
static void id_make(const char *first17, char *out)
{
    memcpy(out, first17, 17);
    out[17] = ch_id_number_check_char(first17);
    out[18] = '\0';
}

static int id_ok(const char *id)
{
    const char *why = NULL;
    return ch_id_number_check(id, &why) == 0 && why == NULL;
}

static const char *id_why(const char *id)
{
    const char *why = NULL;
    return ch_id_number_check(id, &why) == CH_EINVAL ? why : NULL;
}

static void test_id_numbers(void)
{
    /* the GB 11643-1999 example and numbers whose check character is X */
    tap_ok(id_ok("11010519491231002X"), "the standard's example 11010519491231002X is valid");
    tap_ok(id_ok("440524198001010013"), "440524198001010013 (check digit 3) is valid");
    tap_ok(id_ok("44052419800101003X"), "44052419800101003X is valid");
    tap_ok(ch_id_number_check_char("11010519491231002") == 'X', "the check character of 11010519491231002 is X");
    tap_ok(ch_id_number_check_char("44052419800101002") == '1', "the check character of 44052419800101002 is 1");
    int all = 1, xs = 0;
    char id[19], first[40];
    for (int seq = 0; seq < 1000; ++seq) {
        snprintf(first, sizeof(first), "44010619900307%03d", seq);
        id_make(first, id);
        all &= id_ok(id);
        xs += id[17] == 'X';
    }
    tap_ok(all && xs > 0, "every sequence number with its computed check character is valid (%d end in X)", xs);

    tap_is_str(id_why("11010519491231002x"), "must be 17 digits followed by a digit or X", "a lower-case x is refused");
    tap_is_str(id_why("110105194912310021"), "wrong check character", "a wrong check digit is refused");
    tap_is_str(id_why("110105194912310020"), "wrong check character", "a digit where X belongs is refused");
    tap_is_str(id_why("44052419800101001X"), "wrong check character", "X where a digit belongs is refused");
    tap_is_str(id_why("440524198001010030"), "wrong check character", "a digit where X belongs is refused (2)");
    tap_is_str(id_why("4405241880010100"), "must be 18 characters", "a short number is refused");
    tap_is_str(id_why("4405241880010100144"), "must be 18 characters", "a long number is refused");
    tap_is_str(id_why(""), "must be 18 characters", "an empty number is refused");
    tap_is_str(id_why(NULL), "must be 18 characters", "no number is refused");
    tap_is_str(id_why("44052418800101A014"), "must be 17 digits followed by a digit or X", "letters are refused");
    tap_is_str(id_why("4405241880 1010014"), "must be 17 digits followed by a digit or X", "spaces are refused");
    tap_is_str(id_why("44052418800101001\xe4"), "must be 17 digits followed by a digit or X", "non-ASCII is refused");

    id_make("01052419800101001", id);
    tap_is_str(id_why(id), "invalid region code", "a region starting with 0 is refused");
    id_make("91052419800101001", id);
    tap_is_str(id_why(id), "invalid region code", "a region starting with 9 is refused");

    id_make("44010620000229001", id);
    tap_ok(id_ok(id), "Feb 29 of a leap year divisible by 400 (2000) is valid");
    id_make("44010619960229001", id);
    tap_ok(id_ok(id), "Feb 29 of a leap year (1996) is valid");
    id_make("44010619000229001", id);
    tap_is_str(id_why(id), "invalid birth date", "Feb 29 of 1900 (not a leap year) is refused");
    id_make("44010619990229001", id);
    tap_is_str(id_why(id), "invalid birth date", "Feb 29 of 1999 is refused");
    id_make("44010619990230001", id);
    tap_is_str(id_why(id), "invalid birth date", "Feb 30 is refused");
    id_make("44010619990431001", id);
    tap_is_str(id_why(id), "invalid birth date", "Apr 31 is refused");
    id_make("44010619991301001", id);
    tap_is_str(id_why(id), "invalid birth date", "month 13 is refused");
    id_make("44010619990001001", id);
    tap_is_str(id_why(id), "invalid birth date", "month 00 is refused");
    id_make("44010619990100001", id);
    tap_is_str(id_why(id), "invalid birth date", "day 00 is refused");
    id_make("44010618991231001", id);
    tap_is_str(id_why(id), "invalid birth date", "a birth before 1900 is refused");
    id_make("44010619000101001", id);
    tap_ok(id_ok(id), "1900-01-01 is valid");

    /* dates around today (China Standard Time) */
    time_t now = time(NULL) + 8 * 3600;
    struct tm tm;
    gmtime_r(&now, &tm);
    snprintf(first, sizeof(first), "440106%04d%02d%02d001", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday);
    id_make(first, id);
    tap_ok(id_ok(id), "a person born today is valid");
    time_t later = now + 2 * 86400;
    gmtime_r(&later, &tm);
    snprintf(first, sizeof(first), "440106%04d%02d%02d001", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday);
    id_make(first, id);
    tap_is_str(id_why(id), "birth date is in the future", "a birth date the day after tomorrow is refused");
    snprintf(first, sizeof(first), "440106%04d0101001", tm.tm_year + 1900 + 1);
    id_make(first, id);
    tap_is_str(id_why(id), "birth date is in the future", "a birth date next year is refused");

    const char *why = NULL;
    ch_id_number_check("110105194912310021", &why);
    tap_ok(why != NULL && strstr(why, "1101") == NULL, "the reason never echoes the number");
}

static void test_masks(void)
{
    char out[64];
    ch_id_number_mask("11010519491231002X", out);
    tap_is_str(out, "1101**********002X", "an ID number shows its first and last 4 characters");
    ch_id_number_mask("123", out);
    tap_is_str(out, "******************", "a malformed ID number is fully masked");
    ch_phone_mask("13812345678", out);
    tap_is_str(out, "138****5678", "a phone number shows its first 3 and last 4 digits");
    ch_phone_mask("1381234", out);
    tap_is_str(out, "***********", "a malformed phone number is fully masked");
    tap_ok(ch_phone_check("13812345678") == 0 && ch_phone_check("19912345678") == 0, "mainland mobiles 13x-19x pass");
    tap_ok(ch_phone_check("12812345678") != 0 && ch_phone_check("23812345678") != 0 &&
               ch_phone_check("1381234567") != 0 && ch_phone_check("138123456789") != 0 &&
               ch_phone_check("1381234567a") != 0 && ch_phone_check(NULL) != 0,
           "12x, non-1 prefixes, wrong lengths and letters are refused");

    ch_name_mask("张三", out, sizeof(out));
    tap_is_str(out, "张*", "a two-character name shows its surname");
    ch_name_mask("王小明", out, sizeof(out));
    tap_is_str(out, "王**", "a three-character name shows one character and two stars");
    ch_name_mask("欧阳娜娜", out, sizeof(out));
    tap_is_str(out, "欧阳**", "a compound surname (欧阳) is kept whole");
    ch_name_mask("欧阳", out, sizeof(out));
    tap_is_str(out, "欧*", "a two-character name that looks like a compound surname shows one character");
    ch_name_mask("李", out, sizeof(out));
    tap_is_str(out, "*", "a one-character name is fully masked");
    ch_name_mask("Alice", out, sizeof(out));
    tap_is_str(out, "A****", "a Latin name shows its first letter");
    ch_name_mask("阿卜杜·热合曼", out, sizeof(out));
    tap_is_str(out, "阿******", "a name with a middle dot counts characters, not bytes");
    ch_name_mask("\xe5\xbc\xa0\xff", out, sizeof(out));
    tap_is_str(out, "****", "invalid UTF-8 is fully masked, byte by byte");
    ch_name_mask("", out, sizeof(out));
    tap_is_str(out, "*", "an empty name shows one star");
    char small[4];
    ch_name_mask("王小明明", small, sizeof(small));
    tap_ok(strcmp(small, "***") == 0, "a buffer too small for the surname shows stars only (%s)", small);
}

static void test_crypto(const char *dir)
{
    char path[512], err[512];
    snprintf(path, sizeof(path), "%s/keys/data.key", dir);
    tap_ok(ch_pii_keys_load(path, err, sizeof(err)) == NULL && strstr(err, "keys init") != NULL,
           "a missing key file names the command that creates it");
    tap_ok(ch_pii_keys_create(path, err, sizeof(err)) == 0, "the key file is created with its folder");
    struct stat st;
    tap_ok(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600 && st.st_size == 129,
           "the key file is 0600 and holds 128 hex digits and a newline");
    char folder[512];
    snprintf(folder, sizeof(folder), "%s/keys", dir);
    tap_ok(stat(folder, &st) == 0 && (st.st_mode & 0777) == 0700, "its folder is 0700");
    char before[200] = "", after[200] = "";
    FILE *fp = fopen(path, "r");
    if (fp && fgets(before, sizeof(before), fp) == NULL)
        before[0] = '\0';
    if (fp)
        fclose(fp);
    tap_ok(ch_pii_keys_create(path, err, sizeof(err)) == 0, "creating again succeeds");
    fp = fopen(path, "r");
    if (fp && fgets(after, sizeof(after), fp) == NULL)
        after[0] = '\0';
    if (fp)
        fclose(fp);
    tap_ok(strcmp(before, after) == 0 && strlen(before) == 129, "creating again keeps the existing key");

    ch_pii_keys_t *keys = ch_pii_keys_load(path, err, sizeof(err));
    tap_ok(keys != NULL, "the key file loads");

    chmod(path, 0640);
    tap_ok(ch_pii_keys_load(path, err, sizeof(err)) == NULL && strstr(err, "readable by group or others") != NULL,
           "a group-readable key file is refused");
    chmod(path, 0604);
    tap_ok(ch_pii_keys_load(path, err, sizeof(err)) == NULL, "a world-readable key file is refused");
    chmod(path, 0600);
    char bad[512];
    snprintf(bad, sizeof(bad), "%s/short.key", dir);
    fp = fopen(bad, "w");
    fputs("abcd\n", fp);
    fclose(fp);
    chmod(bad, 0600);
    tap_ok(ch_pii_keys_load(bad, err, sizeof(err)) == NULL && strstr(err, "128 hex digits") != NULL,
           "a key file of the wrong length is refused");
    char link_path[512];
    snprintf(link_path, sizeof(link_path), "%s/link.key", dir);
    tap_ok(symlink(path, link_path) == 0 && ch_pii_keys_load(link_path, err, sizeof(err)) == NULL,
           "a symbolic link in place of the key file is refused");

    const char *plain = "11010519491231002X";
    ch_buf_t sealed = {0}, sealed2 = {0}, open = {0};
    ch_pii_encrypt(keys, plain, strlen(plain), &sealed);
    ch_pii_encrypt(keys, plain, strlen(plain), &sealed2);
    tap_ok(sealed.len == 12 + strlen(plain) + 16, "a sealed value is nonce (12) + ciphertext + tag (16)");
    tap_ok(memmem(sealed.base, sealed.len, plain, strlen(plain)) == NULL,
           "the plaintext does not appear in the sealed value");
    tap_ok(sealed.len == sealed2.len && memcmp(sealed.base, sealed2.base, 12) != 0 &&
               memcmp(sealed.base, sealed2.base, sealed.len) != 0,
           "two encryptions of the same value use different nonces and differ");
    tap_ok(ch_pii_decrypt(keys, sealed.base, sealed.len, &open) == 0 && open.len == strlen(plain) &&
               memcmp(open.base, plain, open.len) == 0,
           "decryption gives the plaintext back");
    int tamper_refused = 1;
    for (size_t i = 0; i < sealed.len; ++i) {
        ch_buf_t o = {0};
        sealed.base[i] ^= 0x01;
        tamper_refused &= ch_pii_decrypt(keys, sealed.base, sealed.len, &o) == CH_EINVAL && o.len == 0;
        sealed.base[i] ^= 0x01;
        ch_buf_free(&o);
    }
    tap_ok(tamper_refused, "a flipped bit anywhere (nonce, ciphertext or tag) fails decryption and yields nothing");
    ch_buf_t o = {0};
    tap_ok(ch_pii_decrypt(keys, sealed.base, sealed.len - 1, &o) == CH_EINVAL &&
               ch_pii_decrypt(keys, sealed.base, 27, &o) == CH_EINVAL,
           "a truncated sealed value is refused");
    ch_buf_t empty = {0};
    ch_pii_encrypt(keys, "", 0, &empty);
    tap_ok(empty.len == 28 && ch_pii_decrypt(keys, empty.base, empty.len, &o) == 0 && o.len == 0,
           "an empty value round-trips");
    ch_buf_free(&o);

    /* a different key cannot open it */
    char path2[512];
    snprintf(path2, sizeof(path2), "%s/other/data.key", dir);
    ch_pii_keys_create(path2, err, sizeof(err));
    ch_pii_keys_t *keys2 = ch_pii_keys_load(path2, err, sizeof(err));
    tap_ok(keys2 != NULL && ch_pii_decrypt(keys2, sealed.base, sealed.len, &o) == CH_EINVAL,
           "another data key cannot decrypt");

    uint8_t h_id[32], h_phone[32], h_id2[32], h_other[32];
    ch_pii_hmac(keys, "id", "13812345678", 11, h_id);
    ch_pii_hmac(keys, "phone", "13812345678", 11, h_phone);
    ch_pii_hmac(keys, "id", "13812345678", 11, h_id2);
    ch_pii_hmac(keys2, "id", "13812345678", 11, h_other);
    tap_ok(memcmp(h_id, h_id2, 32) == 0, "the keyed hash is deterministic (a look-up key)");
    tap_ok(memcmp(h_id, h_phone, 32) != 0, "the same value hashes differently in the id and phone domains");
    tap_ok(memcmp(h_id, h_other, 32) != 0, "another data key gives another hash");
    uint8_t a[32], b[32];
    ch_pii_hmac(keys, "ab", "c", 1, a);
    ch_pii_hmac(keys, "a", "bc", 2, b);
    tap_ok(memcmp(a, b, 32) != 0, "the domain separator keeps (\"ab\",\"c\") and (\"a\",\"bc\") apart");

    /* independent check: HMAC-SHA-256(key2, "id\0" || value) with the openssl command line */
    char hex[65], cmd[1024], line[256] = "";
    fp = fopen(path, "r");
    char keyhex[200] = "";
    if (fp && fgets(keyhex, sizeof(keyhex), fp) == NULL)
        keyhex[0] = '\0';
    if (fp)
        fclose(fp);
    keyhex[128] = '\0';
    ch_hex(h_id, 32, hex);
    snprintf(
        cmd, sizeof(cmd),
        "printf 'id\\00013812345678' | openssl dgst -sha256 -mac HMAC -macopt hexkey:%s 2>/dev/null | sed 's/.*= //'",
        keyhex + 64);
    FILE *pp = popen(cmd, "r");
    if (pp && fgets(line, sizeof(line), pp) == NULL)
        line[0] = '\0';
    if (pp)
        pclose(pp);
    line[strcspn(line, "\n")] = '\0';
    tap_is_str(line, hex, "the keyed hash is HMAC-SHA-256 over domain, 0x00, value with the file's second 32 bytes");
    uint8_t bytes[3] = {0x00, 0xab, 0xff};
    char hx[7];
    ch_hex(bytes, 3, hx);
    tap_is_str(hx, "00abff", "ch_hex is lower case");

    ch_buf_free(&sealed);
    ch_buf_free(&sealed2);
    ch_buf_free(&open);
    ch_buf_free(&empty);

    /* ch_pii_init loads <var>/keys/data.key */
    tap_ok(ch_pii_init(dir, err, sizeof(err)) == 0 && ch_pii != NULL, "ch_pii_init loads the data folder's key");
}

int main(void)
{
    char base[] = "/tmp/ch_pii_XXXXXX";
    if (mkdtemp(base) == NULL)
        abort();
    test_id_numbers();
    test_masks();
    test_crypto(base);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", base);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", base);
    return tap_done();
}
