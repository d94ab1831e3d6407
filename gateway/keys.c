/* The `keys` commands: create the data key and the signing keyrings (`keys init`), add a signing key (`keys rotate`).
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include "gateway.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"

/* The keyrings under <var>/keys/: access tokens, and health-code QR tokens. */
static const char *const rings[] = {"access", "healthcode", "licence"};

static int ring_known(const char *name)
{
    for (size_t i = 0; i < sizeof(rings) / sizeof(rings[0]); ++i)
        if (strcmp(rings[i], name) == 0)
            return 1;
    return 0;
}

/* True when `dir` holds at least one <kid>.pem file. */
static int ring_has_key(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return 0;
    struct dirent *de;
    int found = 0;
    while (!found && (de = readdir(d)) != NULL) {
        size_t n = strlen(de->d_name);
        found = de->d_name[0] != '.' && n > 4 && strcmp(de->d_name + n - 4, ".pem") == 0;
    }
    closedir(d);
    return found;
}

static int var_dir_ok(const ch_config_t *config)
{
    if (config->var_dir[0] == '\0') {
        fprintf(stderr, "cityhall keys: no data folder (set CITYHALL_VAR or var_dir)\n");
        return 0;
    }
    return 1;
}

/* keys init: creates only what is missing, then checks that everything loads (permissions, key types). */
static int cmd_keys_init(const ch_config_t *config, int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "usage: cityhall keys init\n");
        return 2;
    }
    if (!var_dir_ok(config))
        return 2;
    char path[1024], err[1024];
    ch_pii_keys_path(config->var_dir, path, sizeof(path));
    struct stat st;
    int existed = lstat(path, &st) == 0;
    if (ch_pii_keys_create(path, err, sizeof(err)) != 0) {
        fprintf(stderr, "cityhall keys init: %s\n", err);
        return 1;
    }
    ch_pii_keys_t *keys = ch_pii_keys_load(path, err, sizeof(err));
    if (keys == NULL) {
        fprintf(stderr, "cityhall keys init: %s\n", err);
        return 1;
    }
    printf("keys: data key %s (%s)\n", path, existed ? "exists" : "created");

    for (size_t i = 0; i < sizeof(rings) / sizeof(rings[0]); ++i) {
        char dir[1024], kid[64] = "";
        snprintf(dir, sizeof(dir), "%s/keys/%s", config->var_dir, rings[i]);
        int created = 0;
        if (!ring_has_key(dir)) {
            if (ch_keyring_rotate(dir, kid, sizeof(kid), err, sizeof(err)) != 0) {
                fprintf(stderr, "cityhall keys init: %s\n", err);
                return 1;
            }
            created = 1;
        }
        ch_keyring_t *ring = ch_keyring_load(dir, err, sizeof(err));
        if (ring == NULL) {
            fprintf(stderr, "cityhall keys init: %s\n", err);
            return 1;
        }
        printf("keys: %s keyring %s, signing key %s (%s)\n", rings[i], dir, ch_keyring_current_kid(ring),
               created ? "created" : "exists");
        ch_keyring_free(ring);
    }
    return 0;
}

/* keys rotate [--ring access|healthcode|licence]: a new signing key; older keys keep verifying while their files exist. */
static int cmd_keys_rotate(const ch_config_t *config, int argc, char **argv)
{
    const char *ring_name = "access";
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--ring") == 0 && i + 1 < argc && ring_known(argv[i + 1])) {
            ring_name = argv[++i];
        } else {
            fprintf(stderr, "usage: cityhall keys rotate [--ring access|healthcode|licence]\n");
            return 2;
        }
    }
    if (!var_dir_ok(config))
        return 2;
    char dir[1024], kid[64], err[1024];
    snprintf(dir, sizeof(dir), "%s/keys/%s", config->var_dir, ring_name);
    if (ch_keyring_rotate(dir, kid, sizeof(kid), err, sizeof(err)) != 0) {
        fprintf(stderr, "cityhall keys rotate: %s\n", err);
        return 1;
    }
    ch_keyring_t *ring = ch_keyring_load(dir, err, sizeof(err));
    if (ring == NULL) {
        fprintf(stderr, "cityhall keys rotate: the new key was written but the keyring does not load: %s\n", err);
        return 1;
    }
    ch_keyring_free(ring);
    printf("keys: %s keyring %s, new signing key %s; running gateways use it within 2 s; older keys verify until "
           "their files are removed\n",
           ring_name, dir, kid);
    return 0;
}

static const ch_command_t commands[] = {
    {"keys init",
     "create what is missing: the data key (<var>/keys/data.key) and the access, healthcode and licence "
     "signing keyrings",
     cmd_keys_init},
    {"keys rotate", "[--ring access|healthcode|licence]: add a signing key (the newest signs; older ones still verify)",
     cmd_keys_rotate},
    {NULL, NULL, NULL},
};

const ch_module_t ch_keys_module = {"keys", NULL, 0, NULL, commands};
