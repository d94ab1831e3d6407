/* The cityhall binary: `serve`, `migrate`, `seed` and the administrative subcommands. */
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
    fprintf(fp, "usage: cityhall <command> [--config FILE]\n"
                "\n"
                "commands:\n"
                "  serve     run the gateway until SIGTERM or SIGINT\n"
                "  migrate   apply sql/migrations/*.sql not applied yet (--dir DIR to override)\n"
                "  seed      load the demo data of every module\n"
                "  version   print the version\n"
                "\n"
                "Settings come from --config FILE (key = value lines) and CITYHALL_* environment variables;\n"
                "see README.md.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1], *config_path = NULL, *dir = getenv("CITYHALL_MIGRATIONS");
    for (int i = 2; i < argc; ++i) {
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc) {
            config_path = argv[++i];
        } else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
            dir = argv[++i];
        } else {
            fprintf(stderr, "cityhall: unknown argument \"%s\"\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
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
    if (strcmp(cmd, "serve") == 0)
        return ch_server_run(&cfg);
    if (strcmp(cmd, "migrate") == 0)
        return ch_migrate(&cfg, dir != NULL ? dir : CH_SOURCE_ROOT "/sql/migrations");
    if (strcmp(cmd, "seed") == 0) {
        printf("seed: no module has demo data yet\n");
        return 0;
    }
    fprintf(stderr, "cityhall: unknown command \"%s\"\n", cmd);
    usage(stderr);
    return 2;
}
