/* Blocking libpq helpers for commands (seed, import, admin): they run off every event loop. */
#include <stdio.h>
#include <stdlib.h>
#include "cityhall/cmd.h"

int ch_cmd_exec(PGconn *conn, const char *sql, const char *what)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    int ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (!ok)
        fprintf(stderr, "%s: %s", what, PQerrorMessage(conn));
    PQclear(res);
    return ok;
}


/* Runs a one-row query; returns its first column as a number, or -1 on error. */
long long ch_cmd_number(PGconn *conn, const char *sql, int nparams, const char *const *params, const char *what)
{
    PGresult *res = PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
    long long v = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        v = PQgetisnull(res, 0, 0) ? 0 : strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    else
        fprintf(stderr, "%s: %s", what, PQerrorMessage(conn));
    PQclear(res);
    return v;
}


int ch_cmd_copy_begin(PGconn *conn, const char *sql, const char *what)
{
    PGresult *res = PQexec(conn, sql);
    int ok = PQresultStatus(res) == PGRES_COPY_IN;
    if (!ok)
        fprintf(stderr, "%s: %s", what, PQerrorMessage(conn));
    PQclear(res);
    return ok;
}


int ch_cmd_copy_put(PGconn *conn, ch_buf_t *buf, const char *what)
{
    if (buf->len == 0)
        return 1;
    if (PQputCopyData(conn, buf->base, (int)buf->len) != 1) {
        fprintf(stderr, "%s: %s", what, PQerrorMessage(conn));
        return 0;
    }
    buf->len = 0;
    return 1;
}


/* Ends a COPY (aborting it with `abort_msg` when not NULL); returns 1 if the server accepted the data. */
int ch_cmd_copy_end(PGconn *conn, const char *abort_msg, const char *what)
{
    if (PQputCopyEnd(conn, abort_msg) != 1) {
        fprintf(stderr, "%s: %s", what, PQerrorMessage(conn));
        return 0;
    }
    int ok = 1;
    PGresult *res;
    while ((res = PQgetResult(conn)) != NULL) {
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            if (abort_msg == NULL)
                fprintf(stderr, "%s: %s", what, PQerrorMessage(conn));
            ok = 0;
        }
        PQclear(res);
    }
    return ok;
}


PGconn *ch_cmd_connect(const ch_config_t *config, const char *what)
{
    PGconn *conn = PQconnectdb(config->pg_conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "%s: could not connect to PostgreSQL: %s", what, PQerrorMessage(conn));
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

/* Reads one CSV record (RFC 4180: quotes, "" inside quotes, CRLF or LF, newlines inside quotes). Fields are
   NUL-terminated in `rec`; returns the field count, 0 at end of file, -1 for a malformed record. `*lines`
   counts the physical lines consumed. */
int ch_cmd_csv_record(FILE *fp, ch_buf_t *rec, size_t *starts, int max, long *lines)
{
    rec->len = 0;
    int nf = 0, c = getc(fp);
    if (c == EOF)
        return 0;
    starts[nf++] = 0;
    size_t field_start = 0;
    int quoted = 0, after_quote = 0, bad = 0;
    for (;; c = getc(fp)) {
        if (c == EOF) {
            if (quoted)
                bad = 1;
            ++*lines;
            break;
        }
        if (quoted) {
            if (c == '"') {
                int d = getc(fp);
                if (d == '"') {
                    ch_buf_append(rec, "\"", 1);
                    continue;
                }
                ungetc(d, fp);
                quoted = 0;
                after_quote = 1;
                continue;
            }
            if (c == '\n')
                ++*lines;
            char ch = (char)c;
            ch_buf_append(rec, &ch, 1);
            continue;
        }
        if (c == '\r') {
            int d = getc(fp);
            if (d != '\n')
                ungetc(d, fp);
            ++*lines;
            break;
        }
        if (c == '\n') {
            ++*lines;
            break;
        }
        if (c == ',') {
            ch_buf_append(rec, "", 1);
            field_start = rec->len;
            if (nf < max)
                starts[nf] = field_start;
            ++nf;
            after_quote = 0;
            continue;
        }
        if (c == '"' && !after_quote && rec->len == field_start) {
            quoted = 1;
            continue;
        }
        if (after_quote)
            bad = 1; /* text after a closing quote */
        char ch = (char)c;
        ch_buf_append(rec, &ch, 1);
    }
    ch_buf_append(rec, "", 1);
    return bad ? -1 : nf;
}
