/* The cityhall binary: `serve`, `migrate`, `seed`, `version`, and the commands the modules declare. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "gateway.h"
#include "ch_version.h"

#ifndef CH_SOURCE_ROOT
#define CH_SOURCE_ROOT "."
#endif

static void usage(FILE *fp)
{
    fprintf(fp, "usage: cityhall <command> [arguments] [--config FILE]\n"
                "\n"
                "commands:\n"
                "  serve                run the gateway until SIGTERM or SIGINT\n"
                "  migrate [--dir DIR]  apply sql/migrations/*.sql not applied yet\n"
                "  seed [...]           load the demo data of every module (identity: --citizens N)\n"
                "  version              print the version\n");
    for (size_t m = 0; m < ch_nmodules; ++m)
        for (const ch_command_t *c = ch_modules[m]->commands; c != NULL && c->name != NULL; ++c)
            fprintf(fp, "  %-20s %s\n", c->name, c->usage);
    fprintf(fp, "\nSettings come from --config FILE (key = value lines) and CITYHALL_* environment variables;\n"
                "see README.md.\n");
}

/* Matches a command of one or two words ("seed", "staff add") at argv[1..]; returns the words used. */
static int command_words(const char *name, int argc, char **argv)
{
    const char *space = strchr(name, ' ');
    if (space == NULL)
        return argc > 1 && strcmp(argv[1], name) == 0 ? 1 : 0;
    size_t n = (size_t)(space - name);
    return argc > 2 && strlen(argv[1]) == n && strncmp(argv[1], name, n) == 0 && strcmp(argv[2], space + 1) == 0 ? 2 : 0;
}

int main(int argc, char **argv)
{
    /* --config FILE may stand anywhere; everything else belongs to the command */
    const char *config_path = NULL;
    int n = 1;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            config_path = argv[++i];
        else
            argv[n++] = argv[i];
    }
    argc = n;
    argv[argc] = NULL;
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "version") == 0) {
        printf("cityhall %s\n", CH_VERSION);
        return 0;
    }
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0) {
        usage(stdout);
        return 0;
    }

    ch_config_t cfg;
    char err[512];
    ch_config_defaults(&cfg);
    if (ch_config_load(&cfg, config_path, err, sizeof(err)) != 0) {
        fprintf(stderr, "cityhall: bad configuration: %s\n", err);
        return 2;
    }
    ch_server.config = cfg;
    if (strcmp(cmd, "serve") == 0)
        return ch_server_run(&cfg);
    if (strcmp(cmd, "migrate") == 0) {
        const char *dir = getenv("CITYHALL_MIGRATIONS");
        if (argc == 4 && strcmp(argv[2], "--dir") == 0)
            dir = argv[3];
        else if (argc != 2) {
            usage(stderr);
            return 2;
        }
        return ch_migrate(&cfg, dir != NULL ? dir : CH_SOURCE_ROOT "/sql/migrations");
    }
    if (strcmp(cmd, "seed") == 0) {
        int seeded = 0;
        for (size_t m = 0; m < ch_nmodules; ++m) {
            if (ch_modules[m]->seed == NULL)
                continue;
            int ret = ch_modules[m]->seed(&cfg, argc - 1, argv + 1);
            if (ret != 0) {
                fprintf(stderr, "cityhall: seeding module %s failed\n", ch_modules[m]->name);
                return ret;
            }
            ++seeded;
        }
        if (seeded == 0)
            printf("seed: no module has demo data\n");
        return 0;
    }
    for (size_t m = 0; m < ch_nmodules; ++m) {
        for (const ch_command_t *c = ch_modules[m]->commands; c != NULL && c->name != NULL; ++c) {
            int words = command_words(c->name, argc, argv);
            if (words != 0)
                return c->run(&cfg, argc - words, argv + words);
        }
    }
    fprintf(stderr, "cityhall: unknown command \"%s\"\n", cmd);
    usage(stderr);
    return 2;
}
