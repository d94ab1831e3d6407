/* Citizen login by SMS code, and the sessions all logins share: tokens, refresh rotation, logout, the session list. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include "identity.h"
#include "cityhall/pii.h"

typedef Cityhall__Identity__V1__SendSmsCodeRequest SendSmsCodeRequest;
typedef Cityhall__Identity__V1__SendSmsCodeResponse SendSmsCodeResponse;
typedef Cityhall__Identity__V1__LoginRequest LoginRequest;
typedef Cityhall__Identity__V1__RefreshRequest RefreshRequest;
typedef Cityhall__Identity__V1__Session Session;
typedef Cityhall__Identity__V1__SessionList SessionList;
typedef Google__Protobuf__Timestamp Timestamp;

/*
 * Limits, in the spirit of NIST SP 800-63B and login.gov. Windows are fixed and start at the first event
 * they count (a Redis key whose TTL is the window).
 */
enum {
    SMS_RESEND_S = 60, /* one code per phone per minute */
    SMS_HOUR_MAX = 10, /* codes per phone per hour */
    SMS_HOUR_S = 3600,
    SMS_IP_MAX = 20, /* codes per client address per window */
    SMS_IP_WINDOW_S = 600,
    OTP_TTL_S = 600,   /* a code is valid 10 minutes, once */
    OTP_MAX_FAILS = 5, /* wrong codes within OTP_FAIL_WINDOW_S that lock the phone */
    OTP_FAIL_WINDOW_S = 600,
    OTP_LOCK_S = 600, /* the lock blocks logging in and sending codes */
    SESSION_ABSOLUTE_S = 12 * 3600,
    SESSION_IDLE_S = 30 * 60, /* a session not refreshed for this long cannot be refreshed any more */
    SESSION_LIST_MAX = 100,
};

/* One answer for every failed code check, so that nothing tells an unknown phone from a wrong code. */
#define MSG_BAD_CODE    "the code is wrong or expired"
#define MSG_BAD_REFRESH "the refresh token is not valid"
#define MSG_NO_SESSION  "no such session"

/* ---- shared plumbing (identity.h): ids, secrets, session statements, the token answer ---- */

const ch_pg_stmt_t identity_stmt_session_insert = {
    "identity_session_insert",
    "INSERT INTO sessions (session_id, role, subject, expires_at, client, device, actor, dept, hall) "
    "VALUES ($1::uuid, $2, $3, to_timestamp($4::bigint), $5, $6, $7, $8, $9)",
    9};

const ch_pg_stmt_t identity_stmt_refresh_insert = {
    "identity_refresh_insert",
    "INSERT INTO refresh_tokens (token_hash, session_id) VALUES (decode($1, 'hex'), $2::uuid)", 2};

static void random_bytes(void *out, size_t len)
{
    /* OpenSSL's CSPRNG is seeded from getrandom(); a failure here means the process cannot be trusted */
    if (RAND_bytes(out, (int)len) != 1)
        abort();
}

void identity_uuid(char *out)
{
    unsigned char u[16];
    random_bytes(u, sizeof(u));
    u[6] = (u[6] & 0x0f) | 0x40; /* version 4 */
    u[8] = (u[8] & 0x3f) | 0x80; /* RFC 4122 variant */
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3],
             u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

void identity_secret(char *out)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    unsigned char b[33]; /* 32 random bytes, padded to a multiple of 3 with a zero */
    random_bytes(b, 32);
    b[32] = 0;
    size_t o = 0;
    for (size_t i = 0; i < 33; i += 3) {
        uint32_t v = (uint32_t)b[i] << 16 | (uint32_t)b[i + 1] << 8 | b[i + 2];
        out[o++] = alphabet[v >> 18 & 63];
        out[o++] = alphabet[v >> 12 & 63];
        out[o++] = alphabet[v >> 6 & 63];
        out[o++] = alphabet[v & 63];
    }
    out[43] = '\0'; /* 32 bytes are 43 base64url characters without padding */
}

void identity_secret_hash(const char *secret, char *out)
{
    uint8_t md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)secret, strlen(secret), md);
    ch_hex(md, sizeof(md), out);
}

int identity_token_response(ch_call_t *call, const ch_principal_t *p, const char *refresh_token, TokenResponse *out)
{
    ch_buf_t buf = {0};
    int64_t exp = 0;
    cityhall__identity__v1__token_response__init(out);
    if (ch_auth_issue(p, CH_ACCESS_TTL_S, &buf, &exp) != 0 || buf.len == 0) {
        ch_buf_free(&buf);
        return CH_EINVAL;
    }
    out->access_token = ch_call_strdup(call, buf.base);
    ch_buf_free(&buf);
    int64_t left = exp - (int64_t)time(NULL);
    out->expires_in = (int32_t)(left < 0 ? 0 : left > CH_ACCESS_TTL_S ? CH_ACCESS_TTL_S : left);
    out->refresh_token = ch_call_strdup(call, refresh_token != NULL ? refresh_token : "");
    out->token_type = "Bearer";
    out->citizen_id = ch_call_strdup(call, p->role == CH_ROLE_CITIZEN && p->subject != NULL ? p->subject : "");
    out->session_id = ch_call_strdup(call, p->session_id != NULL ? p->session_id : "");
    const char *role = ch_role_name(p->role);
    out->role = (char *)(role != NULL ? role : "");
    return 0;
}

void identity_reply_tokens(ch_call_t *call, const ch_principal_t *p, const char *refresh_token, int real_name_verified)
{
    TokenResponse *resp = ch_call_alloc(call, sizeof(*resp));
    if (identity_token_response(call, p, refresh_token, resp) != 0) {
        ch_fail(call, CH_CODE_INTERNAL, "could not sign the access token");
        return;
    }
    resp->real_name_verified = real_name_verified != 0;
    ch_reply(call, 200, &resp->base);
}

/* ---- small helpers ---- */

static int is_uuid(const char *s)
{
    if (s == NULL || strlen(s) != 36)
        return 0;
    for (int i = 0; i < 36; ++i) {
        int dash = i == 8 || i == 13 || i == 18 || i == 23;
        if (dash ? s[i] != '-'
                 : !((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') || (s[i] >= 'A' && s[i] <= 'F')))
            return 0;
    }
    return 1;
}

static int is_code(const char *s)
{
    if (s == NULL || strlen(s) != 6)
        return 0;
    for (int i = 0; i < 6; ++i)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

/* A uniformly random 6-digit code: 32 random bits, redrawn above the largest multiple of 10^6. */
static void otp_generate(char out[7])
{
    const uint32_t limit = UINT32_MAX - UINT32_MAX % 1000000u;
    uint32_t v;
    do
        random_bytes(&v, sizeof(v));
    while (v >= limit);
    snprintf(out, 7, "%06u", (unsigned)(v % 1000000u));
}

/*
 * What the login flow knows about a phone number without holding it: the keyed hash (database and Redis
 * look-ups) and the Redis keys derived from it. Hash tags keep one phone's keys in one cluster slot.
 */
typedef struct phone_ref {
    uint8_t hmac[32];
    char hex[65];
    char key_lock[80], key_otp[80], key_fails[80], key_resend[80], key_hour[80];
} phone_ref_t;

static void phone_ref_init(phone_ref_t *ref, const char *phone)
{
    ch_pii_hmac(ch_pii, "phone", phone, strlen(phone), ref->hmac);
    ch_hex(ref->hmac, sizeof(ref->hmac), ref->hex);
    snprintf(ref->key_lock, sizeof(ref->key_lock), "id:{%s}:lock", ref->hex);
    snprintf(ref->key_otp, sizeof(ref->key_otp), "id:{%s}:otp", ref->hex);
    snprintf(ref->key_fails, sizeof(ref->key_fails), "id:{%s}:fails", ref->hex);
    snprintf(ref->key_resend, sizeof(ref->key_resend), "id:{%s}:resend", ref->hex);
    snprintf(ref->key_hour, sizeof(ref->key_hour), "id:{%s}:hour", ref->hex);
}

/* The stored form of a code: HMAC("otp", phone hash || code), so Redis never holds a code or a phone. */
static void otp_digest(const phone_ref_t *ref, const char *code, char out[65])
{
    uint8_t msg[32 + 6], md[32];
    memcpy(msg, ref->hmac, 32);
    memcpy(msg + 32, code, 6);
    ch_pii_hmac(ch_pii, "otp", msg, sizeof(msg), md);
    ch_hex(md, sizeof(md), out);
}

/* Reads the integer at `i` of an array reply, or `dflt`. */
static long long reply_int(const redisReply *r, size_t i, long long dflt)
{
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || i >= r->elements || r->element[i]->type != REDIS_REPLY_INTEGER)
        return dflt;
    return r->element[i]->integer;
}

/* A Redis failure never lets a request through a limit: it is a 503. */
static int redis_failed_or_respond(ch_call_t *call, const redisReply *reply, int err)
{
    if (err != 0) {
        ch_fail_err(call, err);
        return 1;
    }
    if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        /* -LOADING, -READONLY after a failover, -OOM, -BUSY: Redis cannot answer for now */
        ch_fail_err(call, CH_EUNAVAIL);
        return 1;
    }
    return 0;
}

static int pii_ready_or_respond(ch_call_t *call)
{
    if (ch_pii != NULL)
        return 0;
    ch_fail(call, CH_CODE_INTERNAL, "the data keys are not loaded");
    return 1;
}

/*
 * A short description of the client for the session list: the kind of app, or the first product token of
 * the User-Agent ("curl/8.1.2"), restricted to a safe alphabet.
 */
static const char *client_class(ch_call_t *call)
{
    const char *ua = ch_call_header(call, "user-agent");
    if (ua == NULL || ua[0] == '\0')
        return "unknown";
    if (strstr(ua, "miniProgram") != NULL || strstr(ua, "MicroMessenger") != NULL)
        return "wechat";
    if (strstr(ua, "AlipayClient") != NULL)
        return "alipay";
    char out[49];
    size_t n = 0;
    for (const char *p = ua; *p != '\0' && *p != ' ' && n + 1 < sizeof(out); ++p) {
        char c = *p;
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '/' ||
                 c == '-' || c == '_' || c == '+';
        out[n++] = ok ? c : '_';
    }
    out[n] = '\0';
    return n == 0 ? "unknown" : ch_call_strdup(call, out);
}

/* ---- the SMS provider: how a code reaches the phone ---- */

/**
 * An SMS gateway. `send` runs on a worker thread (it may block: files, sockets) and returns 0 once the
 * provider accepted the message. It sees the phone number and the code, and must log neither.
 */
typedef struct sms_provider {
    const char *name;
    int (*send)(const char *phone, const char *code, time_t at);
} sms_provider_t;

/* Development provider: one JSON line {"phone","code","at"} per message appended to <var>/sms-outbox.jsonl. */
static int sms_outbox_send(const char *phone, const char *code, time_t at)
{
    char path[512], line[160], when[32];
    struct tm tm;
    gmtime_r(&at, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    snprintf(path, sizeof(path), "%s/sms-outbox.jsonl", ch_config()->var_dir);
    int n = snprintf(line, sizeof(line), "{\"phone\":\"%s\",\"code\":\"%s\",\"at\":\"%s\"}\n", phone, code, when);
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    /* one write(2) with O_APPEND: concurrent senders never interleave within a line */
    ssize_t w = write(fd, line, (size_t)n);
    int ok = w == n;
    if (close(fd) != 0)
        ok = 0;
    return ok ? 0 : -1;
}

static const sms_provider_t sms_outbox = {"outbox", sms_outbox_send};

/* The provider in use. Only the development outbox exists; a configuration key will choose among several. */
static const sms_provider_t *sms_provider(void)
{
    return &sms_outbox;
}

/* ---- POST /v1/auth/sms-code ---- */

/*
 * Every check and every counter of a send in one atomic step. Returns {0, 0} when a code may go out (and
 * stores its digest, replacing any earlier code of the phone), or {reason, seconds to wait}:
 * 1 the phone is locked after wrong codes, 2 a code was sent less than a minute ago, 3 the hourly
 * allowance of the phone is used up, 4 the client address sent too many codes.
 * KEYS: lock, resend, hour, ip, otp. ARGV: digest, resend_s, hour_max, hour_s, ip_max, ip_window_s, otp_ttl_s.
 */
static const char lua_send[] =
    "local function wait(k) local t = redis.call('TTL', k) if t < 1 then return 1 end return t end\n"
    "if redis.call('EXISTS', KEYS[1]) == 1 then return {1, wait(KEYS[1])} end\n"
    "if redis.call('EXISTS', KEYS[2]) == 1 then return {2, wait(KEYS[2])} end\n"
    "if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[3]) then return {3, wait(KEYS[3])} end\n"
    "if tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[5]) then return {4, wait(KEYS[4])} end\n"
    "redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])\n"
    "if redis.call('INCR', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end\n"
    "if redis.call('INCR', KEYS[4]) == 1 then redis.call('EXPIRE', KEYS[4], ARGV[6]) end\n"
    "redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[7])\n"
    "return {0, 0}\n";

typedef struct sms_job {
    char phone[12];
    char code[7];
    time_t at;
    int failed;
} sms_job_t;

typedef struct sms_state {
    phone_ref_t ref;
    sms_job_t job;
} sms_state_t;

static void on_sms_rolled_back(ch_call_t *call, redisReply *reply, int err)
{
    ch_fail(call, CH_CODE_UNAVAILABLE, "the code could not be sent; retry shortly");
}

static void sms_work(void *arg)
{
    sms_job_t *job = arg;
    job->failed = sms_provider()->send(job->phone, job->code, job->at) != 0;
}

static void on_sms_sent(ch_call_t *call, void *arg)
{
    const sms_job_t *job = arg;
    if (job->failed) {
        /* Nothing went out: give the one-a-minute allowance back so that the citizen can retry at once. */
        sms_state_t *st = ch_call_data(call);
        const char *argv[] = {"DEL", st->ref.key_resend};
        if (ch_call_redis(call, on_sms_rolled_back, 2, argv, NULL) != 0)
            on_sms_rolled_back(call, NULL, 0);
        return;
    }
    SendSmsCodeResponse *resp = ch_call_alloc(call, sizeof(*resp));
    cityhall__identity__v1__send_sms_code_response__init(resp);
    resp->retry_after_s = SMS_RESEND_S;
    ch_reply(call, 202, &resp->base);
}

static void on_sms_admitted(ch_call_t *call, redisReply *reply, int err)
{
    if (redis_failed_or_respond(call, reply, err))
        return;
    long long reason = reply_int(reply, 0, -1), wait = reply_int(reply, 1, 1);
    switch (reason) {
    case 0:
        break;
    case 1:
        ch_fail_retry_after(call, CH_CODE_RESOURCE_EXHAUSTED, (int)wait,
                            "too many wrong codes for this phone; try again in %lld s", wait);
        return;
    case 2:
        ch_fail_retry_after(call, CH_CODE_RESOURCE_EXHAUSTED, (int)wait,
                            "a code was sent less than a minute ago; try again in %lld s", wait);
        return;
    case 3:
        ch_fail_retry_after(call, CH_CODE_RESOURCE_EXHAUSTED, (int)wait,
                            "too many codes for this phone this hour; try again in %lld s", wait);
        return;
    case 4:
        ch_fail_retry_after(call, CH_CODE_RESOURCE_EXHAUSTED, (int)wait,
                            "too many codes requested from this address; try again in %lld s", wait);
        return;
    default:
        ch_fail_err(call, CH_EUNAVAIL);
        return;
    }
    sms_state_t *st = ch_call_data(call);
    int ret = ch_call_work(call, sms_work, on_sms_sent, &st->job, sizeof(st->job));
    if (ret != 0)
        on_sms_sent(call, &(sms_job_t){.failed = 1});
}

void identity_sms_code(ch_call_t *call)
{
    SendSmsCodeRequest *req = ch_call_body(call);
    if (ch_phone_check(req->phone) != 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "phone: must be an 11-digit mainland mobile number (1[3-9]xxxxxxxxx)");
        return;
    }
    if (pii_ready_or_respond(call))
        return;
    sms_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    ch_call_set_data(call, st);
    phone_ref_init(&st->ref, req->phone);
    snprintf(st->job.phone, sizeof(st->job.phone), "%s", req->phone);
    otp_generate(st->job.code);
    st->job.at = time(NULL);

    /* the client address is personal data too: only its keyed hash names the counter */
    const char *peer = ch_call_peer(call);
    uint8_t iph[32];
    char iphex[65], digest[65];
    ch_pii_hmac(ch_pii, "ip", peer, strlen(peer), iph);
    ch_hex(iph, sizeof(iph), iphex);
    char *key_ip = ch_call_printf(call, "id:ip:%s:sms", iphex);
    otp_digest(&st->ref, st->job.code, digest);

    char a_resend[16], a_hour_max[16], a_hour_s[16], a_ip_max[16], a_ip_window[16], a_ttl[16];
    snprintf(a_resend, sizeof(a_resend), "%d", SMS_RESEND_S);
    snprintf(a_hour_max, sizeof(a_hour_max), "%d", SMS_HOUR_MAX);
    snprintf(a_hour_s, sizeof(a_hour_s), "%d", SMS_HOUR_S);
    snprintf(a_ip_max, sizeof(a_ip_max), "%d", SMS_IP_MAX);
    snprintf(a_ip_window, sizeof(a_ip_window), "%d", SMS_IP_WINDOW_S);
    snprintf(a_ttl, sizeof(a_ttl), "%d", OTP_TTL_S);
    const char *argv[] = {"EVAL",   lua_send,        "5",    st->ref.key_lock, st->ref.key_resend, st->ref.key_hour,
                          key_ip,   st->ref.key_otp, digest, a_resend,         a_hour_max,         a_hour_s,
                          a_ip_max, a_ip_window,     a_ttl};
    int ret = ch_call_redis(call, on_sms_admitted, (int)(sizeof(argv) / sizeof(argv[0])), argv, NULL);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/auth/login ---- */

/*
 * Checks a code and consumes it in one atomic step. Returns {0, 0, ms the code had left} when it matched
 * (the code is deleted: single use; the failure count is reset), {1, seconds} when the phone is locked,
 * {2, seconds} when this wrong code locked it (the pending code is burnt), {3, 0} for a wrong, unknown or
 * expired code (counted). KEYS: lock, otp, fails. ARGV: digest, max_fails, lock_s, fail_window_s.
 */
static const char lua_check[] = "local t = redis.call('TTL', KEYS[1])\n"
                                "if t ~= -2 then if t < 1 then t = 1 end return {1, t} end\n"
                                "local stored = redis.call('GET', KEYS[2])\n"
                                "if stored and stored == ARGV[1] then\n"
                                "  local left = redis.call('PTTL', KEYS[2])\n"
                                "  redis.call('DEL', KEYS[2], KEYS[3])\n"
                                "  return {0, 0, left}\n"
                                "end\n"
                                "local n = redis.call('INCR', KEYS[3])\n"
                                "if n == 1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end\n"
                                "if n >= tonumber(ARGV[2]) then\n"
                                "  redis.call('SET', KEYS[1], '1', 'EX', ARGV[3])\n"
                                "  redis.call('DEL', KEYS[2], KEYS[3])\n"
                                "  return {2, tonumber(ARGV[3])}\n"
                                "end\n"
                                "return {3, 0}\n";

typedef struct login_state {
    phone_ref_t ref;
    char phone[12];
    char digest[65];
    long long otp_left_ms; /* what the consumed code had left, to restore it if the database fails */
} login_state_t;

/*
 * Group commit. A login is durable once its account, session and first refresh token are committed, and a
 * commit waits for a WAL flush: one transaction per login caps logins/s at what the disk flushes, with the
 * CPU mostly idle. So the logins of one loop thread whose code matched while earlier batches were in
 * flight are written together: one statement, one transaction, one flush for up to BATCH_MAX logins. At low
 * load a batch holds one login and nothing waits; under load batches grow by themselves.
 *
 * The statement creates missing accounts (ON CONFLICT finds existing ones by phone hash and records the
 * login), then the sessions and refresh tokens, and returns (session_id, citizen_id, real name verified)
 * per login. Arrays, one element per login: $1 new citizen ids (used only for new accounts), $2 phone
 * hmacs (hex), $3 phone ciphertexts (hex), $4 session ids, $5 absolute expiries (Unix seconds), $6 clients,
 * $7 refresh token hashes (hex). real_name_verified_at is 0003's column (real-name binding).
 */
static const ch_pg_stmt_t stmt_login_batch = {
    "identity_citizen_login_batch",
    "WITH i AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::bigint[], $6::text[], "
    "  $7::text[]) AS t(cid, ph, enc, sid, exp, client, rh)), "
    "c AS ("
    "  INSERT INTO citizens (citizen_id, phone_hmac, phone_enc) SELECT cid, decode(ph, 'hex'), decode(enc, 'hex') FROM "
    "i"
    "  ON CONFLICT (phone_hmac) DO UPDATE SET last_login_at = now()"
    "  RETURNING citizen_id, phone_hmac, real_name_verified_at IS NOT NULL AS verified"
    "), s AS ("
    "  INSERT INTO sessions (session_id, role, subject, expires_at, client)"
    "  SELECT i.sid, 'citizen', c.citizen_id::text, to_timestamp(i.exp), i.client FROM i JOIN c ON c.phone_hmac = "
    "decode(i.ph, 'hex')"
    "  RETURNING session_id"
    "), r AS ("
    "  INSERT INTO refresh_tokens (token_hash, session_id) SELECT decode(i.rh, 'hex'), s.session_id FROM i JOIN s ON "
    "s.session_id = i.sid"
    "  RETURNING session_id"
    ") SELECT r.session_id::text, c.citizen_id::text, c.verified FROM r JOIN i ON i.sid = r.session_id "
    "JOIN c ON c.phone_hmac = decode(i.ph, 'hex')",
    7};

/* Per thread: logins in a batch, batches in flight at once (spread over the thread's connections), and the
 * bound of the queue of logins waiting for a batch (beyond it: 503). */
enum { BATCH_MAX = 64, BATCH_INFLIGHT_MAX = 4, BATCH_QUEUE_MAX = 4096 };

/* One login waiting for its batch: its own copy of everything, since its request may die meanwhile. */
typedef struct login_entry {
    ch_call_t *call; /* held (ch_call_hold) until answered or dropped */
    char cid[37], ph[65], enc[2 * (12 + 11 + 16) + 1], sid[37], client[49], rh[65], exp[24];
    char refresh[44], key_otp[80], digest[65];
    long long otp_left_ms;
    int64_t expires_at;
} login_entry_t;

/* A loop thread's queue; only that thread touches it. */
typedef struct login_batcher {
    login_entry_t *queue[BATCH_QUEUE_MAX]; /* ring */
    unsigned head, len, inflight;
} login_batcher_t;

static login_batcher_t batchers[64]; /* by loop thread (at most 64: config.c) */

typedef struct login_batch {
    login_batcher_t *b;
    unsigned n;
    login_entry_t *e[BATCH_MAX];
} login_batch_t;

static void batch_kick(login_batcher_t *b);

static void on_code_restored(ch_call_t *call, redisReply *reply, int err)
{
    ch_fail_err(call, CH_EUNAVAIL);
}

static void entry_fail(login_entry_t *e, int err)
{
    ch_call_t *call = e->call;
    if (!ch_call_gone(call)) {
        int answered = 0;
        if (err != CH_EDB && e->otp_left_ms > 0) {
            /* the database was unreachable: give the code back for the time it had left */
            char px[24];
            snprintf(px, sizeof(px), "%lld", e->otp_left_ms);
            const char *argv[] = {"SET", e->key_otp, e->digest, "PX", px, "NX"};
            answered = ch_call_redis(call, on_code_restored, 6, argv, NULL) == 0;
        }
        if (!answered)
            ch_fail_err(call, err);
    }
    ch_call_unhold(call);
    free(e);
}

static void entry_answer(login_entry_t *e, const char *citizen_id, int verified)
{
    ch_call_t *call = e->call;
    if (!ch_call_gone(call)) {
        ch_principal_t p = {.role = CH_ROLE_CITIZEN,
                            .subject = ch_call_strdup(call, citizen_id),
                            .session_id = ch_call_strdup(call, e->sid),
                            .expires_at = e->expires_at};
        identity_reply_tokens(call, &p, e->refresh, verified);
    }
    ch_call_unhold(call);
    free(e);
}

static void on_batch_committed(void *arg, ch_pg_result_t *r)
{
    login_batch_t *batch = arg;
    login_batcher_t *b = batch->b;
    --b->inflight;
    if (r->err != 0) {
        for (unsigned i = 0; i < batch->n; ++i)
            entry_fail(batch->e[i], r->err);
    } else {
        PGresult *res = r->res[0];
        int rows = PQntuples(res);
        for (unsigned i = 0; i < batch->n; ++i) {
            int row = -1;
            for (int j = 0; j < rows && row < 0; ++j)
                if (strcmp(PQgetvalue(res, j, 0), batch->e[i]->sid) == 0)
                    row = j;
            if (row < 0)
                entry_fail(batch->e[i], CH_EDB);
            else
                entry_answer(batch->e[i], PQgetvalue(res, row, 1), strcmp(PQgetvalue(res, row, 2), "t") == 0);
        }
    }
    free(batch);
    batch_kick(b);
}

/* Appends "{a,b,...}" of one field of the batch's entries (values never need quoting: hex, digits, uuids,
 * [A-Za-z0-9./_+-]). */
static char *array_literal(login_batch_t *batch, size_t offset)
{
    size_t len = 3;
    for (unsigned i = 0; i < batch->n; ++i)
        len += strlen((char *)batch->e[i] + offset) + 1;
    char *out = malloc(len), *p = out;
    if (out == NULL)
        abort();
    *p++ = '{';
    for (unsigned i = 0; i < batch->n; ++i) {
        if (i != 0)
            *p++ = ',';
        size_t n = strlen((char *)batch->e[i] + offset);
        memcpy(p, (char *)batch->e[i] + offset, n);
        p += n;
    }
    *p++ = '}';
    *p = '\0';
    return out;
}

static void batch_kick(login_batcher_t *b)
{
    while (b->len != 0 && b->inflight < BATCH_INFLIGHT_MAX) {
        login_batch_t *batch = calloc(1, sizeof(*batch));
        if (batch == NULL)
            abort();
        batch->b = b;
        /* take up to BATCH_MAX entries in order, leaving a second login of a phone already in the batch for the next
         * (ON CONFLICT DO UPDATE cannot touch one row twice in one statement) */
        unsigned kept = 0, n = b->len;
        login_entry_t *later[BATCH_MAX];
        for (unsigned k = 0; k < n && batch->n < BATCH_MAX; ++k) {
            login_entry_t *e = b->queue[b->head];
            b->head = (b->head + 1) % BATCH_QUEUE_MAX;
            --b->len;
            int dup = 0;
            for (unsigned j = 0; j < batch->n && !dup; ++j)
                dup = strcmp(batch->e[j]->ph, e->ph) == 0;
            if (dup && kept < BATCH_MAX)
                later[kept++] = e;
            else if (dup)
                entry_fail(e, CH_EFULL);
            else
                batch->e[batch->n++] = e;
        }
        for (unsigned k = 0; k < kept; ++k) { /* back to the front, in order */
            b->head = (b->head + BATCH_QUEUE_MAX - 1) % BATCH_QUEUE_MAX;
            ++b->len;
            b->queue[b->head] = later[kept - 1 - k];
        }
        char *v[7] = {
            array_literal(batch, offsetof(login_entry_t, cid)), array_literal(batch, offsetof(login_entry_t, ph)),
            array_literal(batch, offsetof(login_entry_t, enc)), array_literal(batch, offsetof(login_entry_t, sid)),
            array_literal(batch, offsetof(login_entry_t, exp)), array_literal(batch, offsetof(login_entry_t, client)),
            array_literal(batch, offsetof(login_entry_t, rh))};
        ch_pg_query_t q = {&stmt_login_batch, (const char *const *)v, NULL};
        int ret = ch_call_pg_detached(batch->e[0]->call, &q, 1, on_batch_committed, batch);
        for (int i = 0; i < 7; ++i)
            free(v[i]);
        if (ret != 0) {
            for (unsigned i = 0; i < batch->n; ++i)
                entry_fail(batch->e[i], ret);
            free(batch);
            return;
        }
        ++b->inflight;
    }
}

static void on_code_checked(ch_call_t *call, redisReply *reply, int err)
{
    if (redis_failed_or_respond(call, reply, err))
        return;
    login_state_t *st = ch_call_data(call);
    long long verdict = reply_int(reply, 0, -1), wait = reply_int(reply, 1, 1);
    switch (verdict) {
    case 0:
        st->otp_left_ms = reply_int(reply, 2, 0);
        break;
    case 1:
    case 2:
        ch_fail_retry_after(call, CH_CODE_RESOURCE_EXHAUSTED, (int)wait,
                            "too many wrong codes for this phone; try again in %lld s", wait);
        return;
    case 3:
        ch_fail(call, CH_CODE_UNAUTHENTICATED, MSG_BAD_CODE);
        return;
    default:
        ch_fail_err(call, CH_EUNAVAIL);
        return;
    }

    login_batcher_t *b = &batchers[ch_call_thread(call) % 64];
    login_entry_t *e = calloc(1, sizeof(*e));
    if (e == NULL)
        abort();
    e->call = call;
    identity_uuid(e->cid);
    identity_uuid(e->sid);
    identity_secret(e->refresh);
    identity_secret_hash(e->refresh, e->rh);
    snprintf(e->ph, sizeof(e->ph), "%s", st->ref.hex);
    snprintf(e->key_otp, sizeof(e->key_otp), "%s", st->ref.key_otp);
    snprintf(e->digest, sizeof(e->digest), "%s", st->digest);
    snprintf(e->client, sizeof(e->client), "%s", client_class(call));
    e->otp_left_ms = st->otp_left_ms;
    e->expires_at = (int64_t)time(NULL) + SESSION_ABSOLUTE_S;
    snprintf(e->exp, sizeof(e->exp), "%" PRId64, e->expires_at);
    ch_buf_t sealed = {0};
    ch_pii_encrypt(ch_pii, st->phone, strlen(st->phone), &sealed);
    if (sealed.len * 2 + 1 > sizeof(e->enc)) { /* nonce || ciphertext || tag of 11 digits is 39 bytes */
        ch_buf_free(&sealed);
        free(e);
        ch_fail(call, CH_CODE_INTERNAL, "internal error");
        return;
    }
    ch_hex((const uint8_t *)sealed.base, sealed.len, e->enc);
    ch_buf_free(&sealed);
    ch_call_hold(call);
    if (b->len == BATCH_QUEUE_MAX) {
        entry_fail(e, CH_EFULL);
        return;
    }
    b->queue[(b->head + b->len) % BATCH_QUEUE_MAX] = e;
    ++b->len;
    batch_kick(b);
}

void identity_login(ch_call_t *call)
{
    LoginRequest *req = ch_call_body(call);
    if (ch_phone_check(req->phone) != 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "phone: must be an 11-digit mainland mobile number (1[3-9]xxxxxxxxx)");
        return;
    }
    if (!is_code(req->code)) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "code: must be the 6 digits received by SMS");
        return;
    }
    if (pii_ready_or_respond(call))
        return;
    login_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    ch_call_set_data(call, st);
    snprintf(st->phone, sizeof(st->phone), "%s", req->phone);
    phone_ref_init(&st->ref, req->phone);
    otp_digest(&st->ref, req->code, st->digest);

    char a_fails[16], a_lock[16], a_window[16];
    snprintf(a_fails, sizeof(a_fails), "%d", OTP_MAX_FAILS);
    snprintf(a_lock, sizeof(a_lock), "%d", OTP_LOCK_S);
    snprintf(a_window, sizeof(a_window), "%d", OTP_FAIL_WINDOW_S);
    const char *argv[] = {"EVAL",     lua_check, "3",    st->ref.key_lock, st->ref.key_otp, st->ref.key_fails,
                          st->digest, a_fails,   a_lock, a_window};
    int ret = ch_call_redis(call, on_code_checked, (int)(sizeof(argv) / sizeof(argv[0])), argv, NULL);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/auth/refresh ---- */

/* identity_refresh_rotate (0002) decides under row locks; see the migration for its outcomes. */
static const ch_pg_stmt_t stmt_refresh = {
    "identity_refresh_rotate",
    "SELECT f.outcome, f.session_id::text, f.role, f.subject, f.expires_at, f.device, f.actor, f.dept, f.hall, "
    "CASE WHEN f.role = 'citizen' THEN EXISTS (SELECT 1 FROM citizens c WHERE c.citizen_id = f.subject::uuid "
    "AND c.real_name_verified_at IS NOT NULL) ELSE false END "
    "FROM identity_refresh_rotate(decode($1, 'hex'), decode($2, 'hex'), $3::int) f",
    3};

typedef struct refresh_state {
    char refresh[44];
    char refresh_hash[65];
} refresh_state_t;

static const char *nullable(PGresult *res, int col, ch_call_t *call)
{
    return PQgetisnull(res, 0, col) ? NULL : ch_call_strdup(call, PQgetvalue(res, 0, col));
}

static void on_refresh_done(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail_err(call, CH_EDB);
        return;
    }
    const char *outcome = PQgetvalue(res, 0, 0);
    if (strcmp(outcome, "rotated") != 0) {
        /* A reused token or an idle session was just revoked (committed): its access tokens stop now. */
        if ((strcmp(outcome, "reuse") == 0 || strcmp(outcome, "idle") == 0) && !PQgetisnull(res, 0, 1))
            ch_auth_revoke(call, PQgetvalue(res, 0, 1));
        ch_fail(call, CH_CODE_UNAUTHENTICATED, MSG_BAD_REFRESH);
        return;
    }
    refresh_state_t *st = ch_call_data(call);
    ch_principal_t p = {
        .role = ch_role_parse(PQgetvalue(res, 0, 2)),
        .subject = ch_call_strdup(call, PQgetvalue(res, 0, 3)),
        .session_id = ch_call_strdup(call, PQgetvalue(res, 0, 1)),
        .expires_at = strtoll(PQgetvalue(res, 0, 4), NULL, 10),
        .device = nullable(res, 5, call),
        .actor = nullable(res, 6, call),
        .dept = nullable(res, 7, call),
        .hall = nullable(res, 8, call),
    };
    if (p.role == 0) {
        ch_fail(call, CH_CODE_INTERNAL, "could not sign the access token");
        return;
    }
    identity_reply_tokens(call, &p, st->refresh, strcmp(PQgetvalue(res, 0, 9), "t") == 0);
}

void identity_refresh(ch_call_t *call)
{
    RefreshRequest *req = ch_call_body(call);
    if (req->refresh_token == NULL || req->refresh_token[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "refresh_token: required");
        return;
    }
    if (strlen(req->refresh_token) > 256) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, MSG_BAD_REFRESH);
        return;
    }
    refresh_state_t *st = ch_call_alloc(call, sizeof(*st));
    ch_call_set_data(call, st);
    char old_hash[65];
    identity_secret_hash(req->refresh_token, old_hash);
    identity_secret(st->refresh);
    identity_secret_hash(st->refresh, st->refresh_hash);
    const char *v[3] = {old_hash, st->refresh_hash, ch_call_printf(call, "%d", SESSION_IDLE_S)};
    ch_pg_query_t q = {&stmt_refresh, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_refresh_done);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/auth/logout ---- */

static const ch_pg_stmt_t stmt_logout = {"identity_session_logout",
                                         "UPDATE sessions SET revoked_at = now(), revoked_reason = 'logout' WHERE "
                                         "session_id = $1::uuid AND revoked_at IS NULL",
                                         1};

static void on_logout_committed(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ch_auth_revoke(call, ch_call_principal(call)->session_id);
    ch_reply(call, 204, NULL);
}

void identity_logout(ch_call_t *call)
{
    const ch_principal_t *p = ch_call_principal(call);
    if (!is_uuid(p->session_id)) {
        /* a token without a session row: nothing durable to revoke */
        if (p->session_id != NULL && p->session_id[0] != '\0')
            ch_auth_revoke(call, p->session_id);
        ch_reply(call, 204, NULL);
        return;
    }
    const char *v[1] = {p->session_id};
    ch_pg_query_t q = {&stmt_logout, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_logout_committed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- GET /v1/me/sessions, DELETE /v1/me/sessions/{id} ---- */

/* Live: not revoked, before the absolute limit, refreshed within the idle limit ($2 seconds). */
static const ch_pg_stmt_t stmt_sessions_list = {
    "identity_sessions_list",
    "SELECT session_id::text, role, extract(epoch FROM created_at), extract(epoch FROM last_seen_at), "
    "extract(epoch FROM expires_at), client FROM sessions "
    "WHERE subject = $1 AND role = 'citizen' AND revoked_at IS NULL AND expires_at > now() "
    "AND last_seen_at > now() - make_interval(secs => $2::int) ORDER BY created_at DESC LIMIT $3::int",
    3};

static const ch_pg_stmt_t stmt_session_revoke = {
    "identity_session_revoke",
    "UPDATE sessions SET revoked_at = now(), revoked_reason = 'revoked_by_owner' "
    "WHERE session_id = $1::uuid AND subject = $2 AND role = 'citizen' AND revoked_at IS NULL AND expires_at > now() "
    "AND last_seen_at > now() - make_interval(secs => $3::int) RETURNING session_id::text",
    3};

/* Staff acting for a citizen, and kiosks, use the account but do not manage its logins. */
static int own_login_or_respond(ch_call_t *call)
{
    const ch_principal_t *p = ch_call_principal(call);
    if (p->actor == NULL && p->device == NULL)
        return 0;
    ch_fail(call, CH_CODE_PERMISSION_DENIED, "sessions are managed from the citizen's own login only");
    return 1;
}

static void on_sessions_listed(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    const ch_principal_t *p = ch_call_principal(call);
    PGresult *res = r->res[0];
    int n = PQntuples(res);
    SessionList *list = ch_call_alloc(call, sizeof(*list));
    cityhall__identity__v1__session_list__init(list);
    list->n_sessions = (size_t)n;
    list->sessions = ch_call_alloc(call, sizeof(*list->sessions) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; ++i) {
        Session *s = ch_call_alloc(call, sizeof(*s));
        cityhall__identity__v1__session__init(s);
        s->session_id = ch_call_strdup(call, PQgetvalue(res, i, 0));
        s->role = ch_call_strdup(call, PQgetvalue(res, i, 1));
        s->created_at = ch_call_timestamp(call, PQgetvalue(res, i, 2));
        s->last_seen_at = ch_call_timestamp(call, PQgetvalue(res, i, 3));
        s->expires_at = ch_call_timestamp(call, PQgetvalue(res, i, 4));
        s->client = ch_call_strdup(call, PQgetvalue(res, i, 5));
        s->current = p->session_id != NULL && strcmp(s->session_id, p->session_id) == 0;
        list->sessions[i] = s;
    }
    ch_reply(call, 200, &list->base);
}

void identity_sessions_list(ch_call_t *call)
{
    if (own_login_or_respond(call))
        return;
    const char *v[3] = {ch_call_principal(call)->subject, ch_call_printf(call, "%d", SESSION_IDLE_S),
                        ch_call_printf(call, "%d", SESSION_LIST_MAX)};
    ch_pg_query_t q = {&stmt_sessions_list, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_sessions_listed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_session_revoked(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    if (PQntuples(r->res[0]) != 1) {
        ch_fail(call, CH_CODE_NOT_FOUND, MSG_NO_SESSION);
        return;
    }
    ch_auth_revoke(call, PQgetvalue(r->res[0], 0, 0));
    ch_reply(call, 204, NULL);
}

void identity_session_delete(ch_call_t *call)
{
    if (own_login_or_respond(call))
        return;
    const char *id = ch_call_param(call, "id");
    if (!is_uuid(id)) {
        /* answered exactly like a session that exists but is someone else's */
        ch_fail(call, CH_CODE_NOT_FOUND, MSG_NO_SESSION);
        return;
    }
    const char *v[3] = {id, ch_call_principal(call)->subject, ch_call_printf(call, "%d", SESSION_IDLE_S)};
    ch_pg_query_t q = {&stmt_session_revoke, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_session_revoked);
    if (ret != 0)
        ch_fail_err(call, ret);
}

const ch_pg_stmt_t *const identity_login_stmts[] = {
    &identity_stmt_session_insert,
    &identity_stmt_refresh_insert,
    &stmt_login_batch,
    &stmt_refresh,
    &stmt_logout,
    &stmt_sessions_list,
    &stmt_session_revoke,
    NULL,
};
