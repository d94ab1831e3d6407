/* Helpers for `cityhall` commands that talk to PostgreSQL with blocking libpq (never on an event loop). */
#ifndef CITYHALL_CMD_H
#define CITYHALL_CMD_H

#include <stdio.h>
#include <libpq-fe.h>
#include "cityhall/config.h"
#include "cityhall/transcode.h" /* ch_buf_t */

/** Connects to config->pg_conninfo; prints why and returns NULL when it cannot. */
PGconn *ch_cmd_connect(const ch_config_t *config, const char *what);
/** Runs `sql`; returns 1 on success, else prints `what` and the server's message and returns 0. */
int ch_cmd_exec(PGconn *conn, const char *sql, const char *what);
/** A one-row, one-column query with text parameters: its value as a number (NULL: 0), or -1 on error. */
long long ch_cmd_number(PGconn *conn, const char *sql, int nparams, const char *const *params, const char *what);
/** COPY ... FROM STDIN: starts it (1 on success), sends and empties `buf`, ends it (aborting with a message). */
int ch_cmd_copy_begin(PGconn *conn, const char *sql, const char *what);
int ch_cmd_copy_put(PGconn *conn, ch_buf_t *buf, const char *what);
int ch_cmd_copy_end(PGconn *conn, const char *abort_msg, const char *what);

/**
 * Reads one CSV record (RFC 4180: quotes, "" inside quotes, CRLF or LF, newlines inside quotes) into `rec`,
 * fields NUL-terminated at offsets `starts` (at most `max` recorded); returns the field count, 0 at end of
 * file, -1 for a malformed record. `*lines` counts the physical lines consumed.
 */
int ch_cmd_csv_record(FILE *fp, ch_buf_t *rec, size_t *starts, int max, long *lines);

#endif
