/* Self-service kiosks: a device-signed attestation (ID card read + face match) opens a short citizen session. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include "cityhall/audit.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"
#include "identity.h"

/*
 * POST /v1/kiosk/sessions {device_id, payload, signature}. The payload is base64url of the JSON object
 * {"device_id","id_number","name","face_score","nonce","ts"}; the signature is the raw r||s ES256
 * signature of the payload's base64url text (as a JWS signing input). One read-only round trip loads the
 * kiosk (its key, only while enabled) and, from the still unverified payload, the present citizen; nothing
 * of the payload is acted on or answered before the signature verified. Refusals, in order: unknown or
 * disabled kiosk 401, bad signature 401, malformed payload or another device id inside 400, ts outside
 * ±120 s 401, face score under 0.80 403, bad nonce 400, bad ID number or no registry match or no account 422,
 * a nonce this device used before 409 (kiosk_nonces, inserted in the session's transaction, so a replay is
 * refused even after Redis lost everything). The session: role citizen bound to the kiosk (device), five
 * minutes, not refreshable; its opening is in the citizen's access log with the kiosk as the actor.
 *
 * The DESIGN's `kiosk` role is not issued here: the device holds no session of its own. Routes that later
 * open to kiosks admit CH_ROLE_CITIZEN and read principal->device (or, for device-only routes, a kiosk
 * token would be issued from this same attestation check with role "kiosk" and subject = device id).
 */

#define KIOSK_SESSION_S      300
#define KIOSK_SKEW_S         120
#define KIOSK_MIN_FACE_SCORE 0.80
#define KIOSK_PAYLOAD_MAX    4096
#define KIOSK_NONCE_MIN      16
#define KIOSK_NONCE_MAX      64
#define KIOSK_CACHE_MAX      4096


typedef Cityhall__Identity__V1__KioskSessionRequest KioskSessionRequest;

/* ---- statements ---- */

static const ch_pg_stmt_t stmt_kiosk_load = {
    "identity_kiosk_load", "SELECT hall, public_key_pem FROM kiosks WHERE device_id = $1 AND disabled_at IS NULL", 1};

/* An attestation older than KIOSK_SKEW_S is refused before this table is read: an hour is plenty. */
static const ch_pg_stmt_t stmt_kiosk_nonce_purge = {
    "identity_kiosk_nonce_purge",
    "DELETE FROM kiosk_nonces WHERE device_id = $1 AND used_at < now() - interval '1 hour'", 1};

static const ch_pg_stmt_t stmt_kiosk_nonce_insert = {"identity_kiosk_nonce_insert",
                                                     "INSERT INTO kiosk_nonces (device_id, nonce) VALUES ($1, $2)", 2};

const ch_pg_stmt_t *const identity_kiosk_stmts[] = {&stmt_kiosk_load, &stmt_kiosk_nonce_purge, &stmt_kiosk_nonce_insert,
                                                    NULL};

/* ---- parsed kiosk keys, shared by every thread ---- */

/*
 * device id -> (PEM, parsed key). The PEM comes with every request (the kiosk row is read anyway, so a
 * disabled kiosk or a replaced key takes effect at once); only parsing is saved. Entries are handed out
 * with a reference (EVP_PKEY_up_ref), so replacing or flushing one never frees a key in use.
 */
typedef struct kiosk_key {
    struct kiosk_key *next;
    char *device_id;
    char *pem;
    EVP_PKEY *pkey;
} kiosk_key_t;

static struct {
    pthread_mutex_t mutex;
    kiosk_key_t *buckets[256];
    unsigned count;
} key_cache = {PTHREAD_MUTEX_INITIALIZER, {NULL}, 0};

static unsigned key_bucket(const char *device_id)
{
    unsigned h = 2166136261u; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)device_id; *p != '\0'; ++p)
        h = (h ^ *p) * 16777619u;
    return h % 256;
}

/* A P-256 public key from SubjectPublicKeyInfo PEM, or NULL. */
static EVP_PKEY *p256_public_parse(const char *pem, size_t len)
{
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL)
        return NULL;
    EVP_PKEY *pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (pkey == NULL)
        return NULL;
    char group[64];
    size_t glen = 0;
    if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_EC ||
        EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group), &glen) != 1 ||
        strcmp(group, "prime256v1") != 0) {
        EVP_PKEY_free(pkey);
        return NULL;
    }
    return pkey;
}

static void key_entry_free(kiosk_key_t *e)
{
    EVP_PKEY_free(e->pkey);
    free(e->device_id);
    free(e->pem);
    free(e);
}

/* The parsed key of `device_id` whose PEM is `pem` (a new reference: EVP_PKEY_free it), or NULL. */
static EVP_PKEY *kiosk_key_get(const char *device_id, const char *pem)
{
    unsigned b = key_bucket(device_id);
    pthread_mutex_lock(&key_cache.mutex);
    kiosk_key_t **link = &key_cache.buckets[b];
    for (; *link != NULL; link = &(*link)->next)
        if (strcmp((*link)->device_id, device_id) == 0)
            break;
    if (*link != NULL && strcmp((*link)->pem, pem) == 0) {
        EVP_PKEY *pkey = (*link)->pkey;
        EVP_PKEY_up_ref(pkey);
        pthread_mutex_unlock(&key_cache.mutex);
        return pkey;
    }
    EVP_PKEY *pkey = p256_public_parse(pem, strlen(pem));
    if (pkey != NULL) {
        if (*link != NULL) { /* the kiosk's key was replaced */
            kiosk_key_t *old = *link;
            *link = old->next;
            key_entry_free(old);
            --key_cache.count;
        }
        if (key_cache.count >= KIOSK_CACHE_MAX) { /* more kiosks than expected: start over */
            for (unsigned i = 0; i < 256; ++i) {
                while (key_cache.buckets[i] != NULL) {
                    kiosk_key_t *e = key_cache.buckets[i];
                    key_cache.buckets[i] = e->next;
                    key_entry_free(e);
                }
            }
            key_cache.count = 0;
        }
        kiosk_key_t *e = calloc(1, sizeof(*e));
        if (e == NULL || (e->device_id = strdup(device_id)) == NULL || (e->pem = strdup(pem)) == NULL)
            abort();
        e->pkey = pkey;
        EVP_PKEY_up_ref(pkey);
        e->next = key_cache.buckets[b];
        key_cache.buckets[b] = e;
        ++key_cache.count;
    }
    pthread_mutex_unlock(&key_cache.mutex);
    return pkey;
}

/* ECDSA P-256 / SHA-256 of `msg` against a raw r||s signature (64 bytes, as in JWS). */
static int es256_verify(EVP_PKEY *pkey, const char *msg, size_t len, const uint8_t raw[64])
{
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, 32, NULL), *s = BN_bin2bn(raw + 32, 32, NULL);
    if (sig == NULL || r == NULL || s == NULL)
        abort();
    ECDSA_SIG_set0(sig, r, s);
    unsigned char *der = NULL;
    int derlen = i2d_ECDSA_SIG(sig, &der);
    ECDSA_SIG_free(sig);
    if (derlen <= 0)
        return 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL)
        abort();
    int ok = EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, pkey) == 1 &&
             EVP_DigestVerify(ctx, der, (size_t)derlen, (const unsigned char *)msg, len) == 1;
    EVP_MD_CTX_free(ctx);
    OPENSSL_free(der);
    return ok;
}

/* ---- POST /v1/kiosk/sessions ---- */

/* The attestation, parsed before it is verified: nothing in it counts until the signature did. */
typedef struct attestation {
    const char *why; /* NULL when the payload parsed */
    const char *device_id, *id_number, *name, *nonce;
    double face_score;
    int64_t ts;
} attestation_t;

typedef struct kiosk_call {
    attestation_t a;
    int id_ok; /* the ID number passed ch_id_number_check: the citizen look-up was sent */
    const char *id_why;
    const char *hall;
    const char *citizen_id;
    char session_id[37];
    int64_t expires_at;
} kiosk_call_t;

static const char *json_str(ch_call_t *call, json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return json_is_string(v) ? ch_call_strdup(call, json_string_value(v)) : NULL;
}

static void attestation_parse(ch_call_t *call, const char *payload, attestation_t *a)
{
    memset(a, 0, sizeof(*a));
    size_t len = strlen(payload);
    uint8_t *json = ch_call_alloc(call, len * 3 / 4 + 3);
    long n = ch_b64url_decode(payload, len, json);
    if (n <= 0) {
        a->why = "payload: not base64url";
        return;
    }
    json_error_t err;
    json_t *obj = json_loadb((const char *)json, (size_t)n, JSON_REJECT_DUPLICATES, &err);
    if (!json_is_object(obj)) {
        a->why = "payload: not a JSON object";
        json_decref(obj);
        return;
    }
    a->device_id = json_str(call, obj, "device_id");
    a->id_number = json_str(call, obj, "id_number");
    a->name = json_str(call, obj, "name");
    a->nonce = json_str(call, obj, "nonce");
    json_t *score = json_object_get(obj, "face_score"), *ts = json_object_get(obj, "ts");
    if (a->device_id == NULL || a->id_number == NULL || a->name == NULL || a->nonce == NULL)
        a->why = "payload: device_id, id_number, name and nonce must be strings";
    else if (!json_is_number(score))
        a->why = "payload: face_score must be a number";
    else if (!json_is_integer(ts))
        a->why = "payload: ts must be an integer (Unix seconds)";
    else if (json_object_size(obj) != 6)
        a->why = "payload: unknown field (expected device_id, id_number, name, face_score, nonce, ts)";
    if (a->why == NULL) {
        a->face_score = json_number_value(score);
        a->ts = (int64_t)json_integer_value(ts);
    }
    json_decref(obj);
}

static int nonce_ok(const char *nonce)
{
    size_t n = strlen(nonce);
    if (n < KIOSK_NONCE_MIN || n > KIOSK_NONCE_MAX)
        return 0;
    for (size_t i = 0; i < n; ++i) {
        char c = nonce[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
            return 0;
    }
    return 1;
}

/* The access-log entry of the session's opening: the kiosk, acting for the citizen it has just authenticated. */
static void kiosk_audit_query(ch_call_t *call, const char *citizen_id, const char *device_id, ch_pg_query_t *q)
{
    ch_principal_t p = {.role = CH_ROLE_CITIZEN, .subject = citizen_id, .device = device_id};
    ch_audit_query_as(call, &p, citizen_id, "kiosk.session", "self-service kiosk session (ID card and face match)", q);
}

static void on_kiosk_committed(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err == CH_EDB && r->sqlstate != NULL && strcmp(r->sqlstate, "23505") == 0 && r->message != NULL &&
        strstr(r->message, "kiosk_nonces") != NULL) {
        ch_fail(call, CH_CODE_ABORTED, "replayed attestation: this nonce was already used");
        return;
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    KioskSessionRequest *req = ch_call_body(call);
    kiosk_call_t *k = ch_call_data(call);
    ch_principal_t p = {0};
    p.role = CH_ROLE_CITIZEN;
    p.subject = k->citizen_id;
    p.session_id = k->session_id;
    p.hall = k->hall;
    p.device = req->device_id;
    p.expires_at = k->expires_at;
    identity_reply_tokens(call, &p, NULL, 1); /* bound to the resident the card named */
}

static void on_kiosk_loaded(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    KioskSessionRequest *req = ch_call_body(call);
    kiosk_call_t *k = ch_call_data(call);
    attestation_t *a = &k->a;
    if (PQntuples(r->res[0]) != 1) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "unknown or disabled kiosk");
        return;
    }
    k->hall = ch_call_strdup(call, PQgetvalue(r->res[0], 0, 0));
    EVP_PKEY *pkey = kiosk_key_get(req->device_id, PQgetvalue(r->res[0], 0, 1));
    if (pkey == NULL) {
        ch_fail(call, CH_CODE_INTERNAL, "the kiosk's registered key cannot be used");
        return;
    }
    uint8_t sig[64 + 3];
    size_t siglen = strlen(req->signature);
    int ok = siglen == 86 && ch_b64url_decode(req->signature, siglen, sig) == 64 &&
             es256_verify(pkey, req->payload, strlen(req->payload), sig);
    EVP_PKEY_free(pkey);
    if (!ok) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "the attestation's signature does not verify with the kiosk's key");
        return;
    }
    /* from here on the payload is the kiosk's word */
    if (a->why != NULL) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "%s", a->why);
        return;
    }
    if (strcmp(a->device_id, req->device_id) != 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "payload: device_id differs from the request's device_id");
        return;
    }
    int64_t now = (int64_t)time(NULL);
    if (a->ts < now - KIOSK_SKEW_S || a->ts > now + KIOSK_SKEW_S) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "stale attestation: ts must be within %d s of the server's time",
                KIOSK_SKEW_S);
        return;
    }
    if (!isfinite(a->face_score) || a->face_score < 0.0 || a->face_score > 1.0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "payload: face_score must be between 0 and 1");
        return;
    }
    if (a->face_score < KIOSK_MIN_FACE_SCORE) {
        ch_fail(call, CH_CODE_PERMISSION_DENIED, "face match too low: at least %.2f is required", KIOSK_MIN_FACE_SCORE);
        return;
    }
    if (!nonce_ok(a->nonce)) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "payload: nonce must be %d to %d characters of A-Z a-z 0-9 - _",
                KIOSK_NONCE_MIN, KIOSK_NONCE_MAX);
        return;
    }
    if (!k->id_ok) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "id_number: %s", k->id_why);
        return;
    }
    k->citizen_id = identity_present_citizen_or_respond(call, r->res[1]);
    if (k->citizen_id == NULL)
        return;

    identity_uuid(k->session_id);
    k->expires_at = now + KIOSK_SESSION_S;
    const char *nv[2] = {req->device_id, a->nonce};
    const char *pv[1] = {req->device_id};
    const char *expires = ch_call_printf(call, "%lld", (long long)k->expires_at);
    const char *sv[9] = {k->session_id,  "citizen", k->citizen_id, expires, "kiosk",
                         req->device_id, NULL,      NULL,          k->hall};
    ch_pg_query_t q[4] = {{&stmt_kiosk_nonce_purge, pv, NULL},
                          {&stmt_kiosk_nonce_insert, nv, NULL},
                          {&identity_stmt_session_insert, sv, NULL}};
    kiosk_audit_query(call, k->citizen_id, req->device_id, &q[3]);
    int ret = ch_call_pg(call, q, 4, on_kiosk_committed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void identity_kiosk_session(ch_call_t *call)
{
    KioskSessionRequest *req = ch_call_body(call);
    if (req->device_id[0] == '\0' || req->payload[0] == '\0' || req->signature[0] == '\0') {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "device_id, payload and signature are required");
        return;
    }
    if (strlen(req->payload) > KIOSK_PAYLOAD_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "payload: at most %d bytes", KIOSK_PAYLOAD_MAX);
        return;
    }
    if (!identity_ident_ok(req->device_id, 64, 1, 1)) {
        ch_fail(call, CH_CODE_UNAUTHENTICATED, "unknown or disabled kiosk");
        return;
    }
    kiosk_call_t *k = ch_call_alloc(call, sizeof(*k));
    memset(k, 0, sizeof(*k));
    ch_call_set_data(call, k);
    attestation_parse(call, req->payload, &k->a);
    ch_pg_query_t q[2];
    const char *v[1] = {req->device_id};
    q[0] = (ch_pg_query_t){&stmt_kiosk_load, v, NULL};
    int n = 1;
    if (k->a.why == NULL) {
        char *id = ch_call_alloc(call, 19);
        k->id_ok = identity_id_normalize(k->a.id_number, id, &k->id_why) == 0;
        k->a.id_number = id;
        k->a.name = identity_name_trim(call, k->a.name);
        if (k->id_ok)
            identity_present_citizen_query(call, k->a.id_number, k->a.name, &q[n++]);
    }
    int ret = ch_call_pg(call, q, n, on_kiosk_loaded);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- `cityhall kiosk add` and the demo kiosk (off the loop: blocking libpq) ---- */

/* The canonical SubjectPublicKeyInfo PEM of a P-256 key (malloc'd), or NULL. */
static char *public_pem(EVP_PKEY *pkey)
{
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio == NULL || PEM_write_bio_PUBKEY(bio, pkey) != 1) {
        BIO_free(bio);
        return NULL;
    }
    char *data;
    long n = BIO_get_mem_data(bio, &data);
    char *pem = malloc((size_t)n + 1);
    if (pem == NULL)
        abort();
    memcpy(pem, data, (size_t)n);
    pem[n] = '\0';
    BIO_free(bio);
    return pem;
}

/* Returns 1 when registered, 0 when the device id exists (with `update`: its key and hall replaced), -1 on error. */
static int kiosk_insert(PGconn *conn, const char *cmd, const char *device_id, const char *hall, const char *pem,
                        int update)
{
    const char *v[3] = {device_id, hall, pem};
    PGresult *res = PQexecParams(conn,
                                 update ? "INSERT INTO kiosks (device_id, hall, public_key_pem) VALUES ($1, $2, $3) "
                                          "ON CONFLICT (device_id) DO UPDATE SET hall = EXCLUDED.hall, "
                                          "public_key_pem = EXCLUDED.public_key_pem, disabled_at = NULL "
                                          "RETURNING (xmax = 0)"
                                        : "INSERT INTO kiosks (device_id, hall, public_key_pem) VALUES ($1, $2, $3) "
                                          "ON CONFLICT (device_id) DO NOTHING RETURNING true",
                                 3, NULL, v, NULL, NULL, 0);
    int ret;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "%s: could not register the kiosk: %s", cmd, PQerrorMessage(conn));
        ret = -1;
    } else {
        ret = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0 ? 1 : 0;
    }
    PQclear(res);
    return ret;
}

static PGconn *kiosk_connect(const ch_config_t *config, const char *cmd)
{
    PGconn *conn = PQconnectdb(config->pg_conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "%s: could not connect to PostgreSQL: %s", cmd, PQerrorMessage(conn));
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

int identity_cmd_kiosk_add(const ch_config_t *config, int argc, char **argv)
{
    static const char cmd[] = "kiosk add";
    const char *device_id = NULL, *hall = NULL, *key_path = NULL;
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: %s needs a value\n", cmd, argv[i]);
            return 2;
        }
        if (strcmp(argv[i], "--device-id") == 0)
            device_id = argv[i + 1];
        else if (strcmp(argv[i], "--hall") == 0)
            hall = argv[i + 1];
        else if (strcmp(argv[i], "--public-key") == 0)
            key_path = argv[i + 1];
        else {
            fprintf(stderr, "%s: unexpected argument \"%s\"\n", cmd, argv[i]);
            return 2;
        }
    }
    if (device_id == NULL || hall == NULL || key_path == NULL) {
        fprintf(stderr, "usage: cityhall kiosk add --device-id K --hall H --public-key FILE.pem\n");
        return 2;
    }
    if (!identity_ident_ok(device_id, 64, 1, 1) || !identity_ident_ok(hall, 64, 0, 0)) {
        fprintf(stderr, "%s: device id is 1-64 of A-Z a-z 0-9 . _ -; hall 1-64 of a-z 0-9 -\n", cmd);
        return 2;
    }
    FILE *fp = fopen(key_path, "rb");
    if (fp == NULL) {
        fprintf(stderr, "%s: could not open %s: %s\n", cmd, key_path, strerror(errno));
        return 1;
    }
    char buf[8192];
    size_t n = fread(buf, 1, sizeof(buf) - 1, fp);
    fclose(fp);
    buf[n] = '\0';
    if (strstr(buf, "PRIVATE KEY") != NULL) {
        fprintf(stderr,
                "%s: %s holds a private key: give the kiosk's public key (BEGIN PUBLIC KEY); "
                "its private key stays on the device\n",
                cmd, key_path);
        return 1;
    }
    EVP_PKEY *pkey = p256_public_parse(buf, n);
    if (pkey == NULL) {
        fprintf(stderr, "%s: %s is not a P-256 (prime256v1) public key in PEM (BEGIN PUBLIC KEY)\n", cmd, key_path);
        return 1;
    }
    char *pem = public_pem(pkey);
    EVP_PKEY_free(pkey);
    if (pem == NULL) {
        fprintf(stderr, "%s: could not encode the public key\n", cmd);
        return 1;
    }
    PGconn *conn = kiosk_connect(config, cmd);
    int ret = conn != NULL ? kiosk_insert(conn, cmd, device_id, hall, pem, 0) : -1;
    PQfinish(conn);
    free(pem);
    if (ret == 0)
        fprintf(stderr, "%s: the device id %s is taken\n", cmd, device_id);
    if (ret != 1)
        return 1;
    printf("kiosk registered:\n  device id:  %s\n  hall:       %s\n", device_id, hall);
    return 0;
}

/* The demo kiosk of the demo service hall; its private key is written under <var>/demo/. */
static const char demo_device[] = "tianhe-kiosk-01";
static const char demo_hall[] = "tianhe-hall";

/* Loads the demo key, or creates it (0600, in a 0700 folder) the first time. */
static EVP_PKEY *demo_key(const char *path, const char *dir)
{
    FILE *fp = fopen(path, "rb");
    if (fp != NULL) {
        EVP_PKEY *pkey = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
        fclose(fp);
        if (pkey == NULL)
            fprintf(stderr, "seed: %s is not a PEM private key\n", path);
        return pkey;
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "seed: could not create %s: %s\n", dir, strerror(errno));
        return NULL;
    }
    EVP_PKEY *pkey = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (pkey == NULL) {
        fprintf(stderr, "seed: could not generate a P-256 key\n");
        return NULL;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    fp = fd >= 0 ? fdopen(fd, "wb") : NULL;
    if (fp == NULL || PEM_write_PrivateKey(fp, pkey, NULL, NULL, 0, NULL, NULL) != 1 || fclose(fp) != 0) {
        fprintf(stderr, "seed: could not write %s: %s\n", path, strerror(errno));
        EVP_PKEY_free(pkey);
        return NULL;
    }
    return pkey;
}

int identity_seed_kiosk(const ch_config_t *config, void *pgconn)
{
    char dir[512], path[600];
    snprintf(dir, sizeof(dir), "%s/demo", config->var_dir);
    snprintf(path, sizeof(path), "%s/kiosk-%s.pem", dir, demo_device);
    EVP_PKEY *pkey = demo_key(path, dir);
    if (pkey == NULL)
        return 1;
    char *pem = public_pem(pkey);
    EVP_PKEY_free(pkey);
    if (pem == NULL)
        return 1;
    /* the key file is the truth: a kiosk row left from an older var/ gets this key */
    int ret = kiosk_insert(pgconn, "seed", demo_device, demo_hall, pem, 1);
    free(pem);
    if (ret < 0)
        return 1;
    printf("\nself-service kiosk (SYNTHETIC DEMO DEVICE KEY)\n"
           "  device id:    %s\n"
           "  hall:         %s\n"
           "  private key:  %s\n"
           "  open a 5-minute citizen session with an ID card read + face match (a citizen bound above):\n"
           "    ID=<id number> NAME=<name> python3 - <<'EOF' | curl -s --http2-prior-knowledge -H 'content-type: "
           "application/json' -d @- http://127.0.0.1:8080/v1/kiosk/sessions\n"
           "import base64, json, os, time\n"
           "from cryptography.hazmat.primitives import hashes, serialization\n"
           "from cryptography.hazmat.primitives.asymmetric import ec, utils\n"
           "key = serialization.load_pem_private_key(open(\"%s\", \"rb\").read(), None)\n"
           "b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b\"=\").decode()\n"
           "payload = b64(json.dumps({\"device_id\": \"%s\", \"id_number\": os.environ[\"ID\"], \"name\": "
           "os.environ[\"NAME\"],\n"
           "                          \"face_score\": 0.93, \"nonce\": os.urandom(16).hex(), \"ts\": "
           "int(time.time())}).encode())\n"
           "r, s = utils.decode_dss_signature(key.sign(payload.encode(), ec.ECDSA(hashes.SHA256())))\n"
           "print(json.dumps({\"device_id\": \"%s\", \"payload\": payload, \"signature\": b64(r.to_bytes(32, \"big\") "
           "+ s.to_bytes(32, \"big\"))}))\n"
           "EOF\n"
           "  (python3-cryptography; the signature is raw r||s ES256 over the payload's base64url text, as in JWS)\n",
           demo_device, demo_hall, path, path, demo_device, demo_device);
    return 0;
}
