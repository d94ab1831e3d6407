/* Schema migrations: sql/migrations/NNNN_*.sql applied in order, each in its own transaction, recorded once. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>
#include "gateway.h"

/* This runs before the server, off any event loop: blocking libpq is the right tool here. */

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static char *read_file(const char *path)
{
    FILE *fp = fopen(path, "rb");
    if (fp == NULL)
        return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s == NULL)
        abort();
    size_t got = fread(s, 1, (size_t)n, fp);
    s[got] = '\0';
    fclose(fp);
    return s;
}

static int exec_ok(PGconn *conn, const char *sql, const char *what)
{
    PGresult *res = PQexec(conn, sql);
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
    if (!ok)
        fprintf(stderr, "migrate: %s: %s", what, PQerrorMessage(conn));
    PQclear(res);
    return ok;
}

int ch_migrate(const ch_config_t *config, const char *dir)
{
    PGconn *conn = PQconnectdb(config->pg_conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "migrate: could not connect to PostgreSQL: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return 1;
    }
    DIR *d = opendir(dir);
    if (d == NULL) {
        fprintf(stderr, "migrate: could not open %s\n", dir);
        PQfinish(conn);
        return 1;
    }
    char **names = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len > 4 && strcmp(e->d_name + len - 4, ".sql") == 0) {
            names = realloc(names, (n + 1) * sizeof(*names));
            if (names == NULL || (names[n++] = strdup(e->d_name)) == NULL)
                abort();
        }
    }
    closedir(d);
    qsort(names, n, sizeof(*names), cmp_names);

    int ret = 0, applied = 0;
    /* One migrator at a time: a second `cityhall migrate` waits for the first instead of racing it. */
    if (!exec_ok(conn,
                 "SELECT pg_advisory_lock(7243001);"
                 "CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, "
                 "applied_at timestamptz NOT NULL DEFAULT now())",
                 "schema_migrations")) {
        ret = 1;
        goto out;
    }
    for (size_t i = 0; i < n && ret == 0; ++i) {
        const char *params[1] = {names[i]};
        PGresult *res = PQexecParams(conn, "SELECT 1 FROM schema_migrations WHERE name = $1", 1, NULL, params, NULL,
                                     NULL, 0);
        int done = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
        PQclear(res);
        if (done)
            continue;
        char path[1024];
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        char *sql = read_file(path);
        if (sql == NULL) {
            fprintf(stderr, "migrate: could not read %s\n", path);
            ret = 1;
            break;
        }
        if (!exec_ok(conn, "BEGIN", names[i]) || !exec_ok(conn, sql, names[i])) {
            exec_ok(conn, "ROLLBACK", "rollback");
            ret = 1;
        } else {
            res = PQexecParams(conn, "INSERT INTO schema_migrations (name) VALUES ($1)", 1, NULL, params, NULL, NULL, 0);
            int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
            PQclear(res);
            if (!ok || !exec_ok(conn, "COMMIT", names[i])) {
                exec_ok(conn, "ROLLBACK", "rollback");
                ret = 1;
            } else {
                printf("migrate: applied %s\n", names[i]);
                ++applied;
            }
        }
        free(sql);
    }
    if (ret == 0)
        printf("migrate: %d applied, %zu already present\n", applied, n - (size_t)applied);
out:
    for (size_t i = 0; i < n; ++i)
        free(names[i]);
    free(names);
    PQfinish(conn);
    return ret;
}
