/* Appeals of a code's color: a citizen asks, one staff member proposes, a second one decides (four-eyes). */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>
#include "healthcode.h"
#include "venues.h"
#include "cityhall/audit.h"
#include "cityhall/pii.h"

typedef Cityhall__Healthcode__V1__AppealRequest AppealRequest;
typedef Cityhall__Healthcode__V1__Appeal Appeal;
typedef Cityhall__Healthcode__V1__AppealList AppealList;
typedef Cityhall__Healthcode__V1__AppealProposal AppealProposal;
typedef Cityhall__Healthcode__V1__AppealApproval AppealApproval;

#define REASON_MAX   1000 /* characters */
#define NOTE_MAX     1000
#define PAGE_DEFAULT 20
#define PAGE_MAX     100
/* How long an approved override holds; afterwards the rules alone decide again. */
#define OVERRIDE_DURATION "7 days"
#define AUDIT_PURPOSE     "review of a health-code appeal"
#define FOUR_EYES         "four-eyes: a second staff member must decide"

/*
 * The columns of an appeal, in the order appeal_from_row reads them, for a row source named by the macro's
 * argument: id, state, reason, color at appeal, proposed decision, proposed color, proposed by, decided by, note
 * (the decision's, else the proposal's), created and decided (Unix microseconds), resident id.
 */
#define APPEAL_COLS(a)                                                                                                 \
    a ".appeal_id::text, " a ".state, " a ".reason, " a ".color_at_appeal, "                                           \
      "coalesce(" a ".proposed_decision, ''), "                                                                        \
      "coalesce(" a ".proposed_color, ''), "                                                                           \
      "coalesce(" a ".proposed_by::text, ''), "                                                                        \
      "coalesce(" a ".decided_by::text, ''), "                                                                         \
      "coalesce(" a ".decision_note, " a ".proposal_note, ''), "                                                       \
      "(extract(epoch FROM " a ".created_at) * 1000000)::bigint, "                                                     \
      "(extract(epoch FROM " a ".decided_at) * 1000000)::bigint, " a ".resident_id"

/* Who may see an appeal as a citizen: who filed it, the resident it is about, that resident's guardians. $1 citizen. */
#define CITIZEN_SEES(a)                                                                                                \
    "(" a ".citizen_id = $1::uuid "                                                                                    \
    "OR " a ".resident_id = (SELECT registry_id FROM citizens WHERE citizen_id = $1::uuid) "                           \
    "OR " a ".resident_id IN (SELECT resident_id FROM dependents WHERE guardian_id = $1::uuid))"

/* ---- statements ---- */

/* $1 appeal_id, $2 resident_id, $3 citizen_id, $4 reason, $5 color at appeal, $6 created (Unix microseconds). */
static const ch_pg_stmt_t stmt_appeal_insert = {
    "hc_appeal_insert",
    "INSERT INTO appeals (appeal_id, resident_id, citizen_id, reason, color_at_appeal, created_at) "
    "VALUES ($1::uuid, $2::bigint, $3::uuid, $4, $5, timestamptz 'epoch' + $6::bigint * interval '1 microsecond')",
    6};

/* A page of the appeals a citizen may see, newest first, after the cursor ($2 Unix µs, $3 id; NULL: the newest). */
static const ch_pg_stmt_t stmt_appeals_mine = {
    "hc_appeals_mine",
    "SELECT " APPEAL_COLS(
        "a") ", r.name FROM appeals a JOIN registry_residents r ON r.resident_id = a.resident_id "
             "WHERE " CITIZEN_SEES(
                 "a") " AND ($2::bigint IS NULL OR (a.created_at, a.appeal_id) < "
                      "      (timestamptz 'epoch' + $2::bigint * interval '1 microsecond', $3::uuid)) "
                      "ORDER BY a.created_at DESC, a.appeal_id DESC LIMIT $4::int",
    4};

/* One appeal the citizen may see. $1 citizen_id, $2 appeal_id. */
static const ch_pg_stmt_t stmt_appeal_mine = {
    "hc_appeal_mine",
    "SELECT " APPEAL_COLS("a") ", r.name FROM appeals a JOIN registry_residents r ON r.resident_id = a.resident_id "
                               "WHERE a.appeal_id = $2::uuid AND " CITIZEN_SEES("a"),
    2};

/*
 * The staff queue: open appeals, oldest first, after the cursor ($1 Unix µs, $2 id; NULL: from the oldest), $3 rows.
 * Every appeal shown is recorded in the access log of the citizens it concerns, in the same statement:
 * $4..$9 are the actor columns of access_log_append (role, actor, dept, on behalf of, action, purpose).
 */
static const ch_pg_stmt_t stmt_appeals_queue = {
    "hc_appeals_queue",
    "SELECT " APPEAL_COLS(
        "p") ", r.name, hc_appeal_audit(p.citizen_id, p.resident_id, $4, $5, $6, $7, $8, $9) "
             "FROM (SELECT * FROM appeals a WHERE a.state IN ('submitted', 'proposed') "
             "      AND ($1::bigint IS NULL OR (a.created_at, a.appeal_id) > "
             "           (timestamptz 'epoch' + $1::bigint * interval '1 microsecond', $2::uuid)) "
             "      ORDER BY a.created_at, a.appeal_id LIMIT $3::int) p "
             "JOIN registry_residents r ON r.resident_id = p.resident_id ORDER BY p.created_at, p.appeal_id",
    9};

/*
 * Staff member $2 proposes: $3 decision (approve, reject), $4 color (approve) or NULL, $5 note. Only a submitted
 * appeal takes a proposal. One row per existing appeal: its state before the statement, then, when the proposal was
 * recorded, the appeal after it, its resident's name and the access-log entries ($6..$11 as in the queue).
 */
static const ch_pg_stmt_t stmt_appeal_propose = {
    "hc_appeal_propose",
    "WITH u AS (UPDATE appeals SET state = 'proposed', proposed_by = $2::uuid, proposed_decision = $3, "
    "           proposed_color = $4, proposal_note = nullif($5, ''), proposed_at = now() "
    "           WHERE appeal_id = $1::uuid AND state = 'submitted' RETURNING *) "
    "SELECT a.state, " APPEAL_COLS(
        "u") ", r.name, "
             "       CASE WHEN u.appeal_id IS NOT NULL "
             "            THEN hc_appeal_audit(u.citizen_id, u.resident_id, $6, $7, $8, $9, $10, $11) END "
             "FROM appeals a LEFT JOIN u ON true JOIN registry_residents r ON r.resident_id = a.resident_id "
             "WHERE a.appeal_id = $1::uuid",
    11};

/* What the decision needs to know first. $1 appeal_id. */
static const ch_pg_stmt_t stmt_appeal_read = {
    "hc_appeal_read",
    "SELECT state, coalesce(proposed_by::text, ''), resident_id FROM appeals WHERE appeal_id = $1::uuid", 1};

/*
 * Staff member $2 decides on the proposal that $5 made ($5 as read before: a proposal replaced meanwhile is not
 * decided): $3 true confirms it (approve: approved and an override of the proposed color for $6; reject: rejected),
 * false declines it (back to submitted, the proposal cleared, for a new one). The decider is never the proposer:
 * checked here and by the table. $4 note; $7..$11 role, actor, dept, on behalf of, purpose for the access log.
 * No row: the appeal changed in between.
 */
static const ch_pg_stmt_t stmt_appeal_decide = {
    "hc_appeal_decide",
    "WITH u AS (UPDATE appeals SET "
    "    state = CASE WHEN $3::bool THEN CASE proposed_decision WHEN 'approve' THEN 'approved' ELSE 'rejected' END "
    "                 ELSE 'submitted' END, "
    "    decided_by = CASE WHEN $3::bool THEN $2::uuid END, "
    "    decision_note = CASE WHEN $3::bool THEN nullif($4, '') END, "
    "    decided_at = CASE WHEN $3::bool THEN now() END, "
    "    proposed_by = CASE WHEN $3::bool THEN proposed_by END, "
    "    proposed_decision = CASE WHEN $3::bool THEN proposed_decision END, "
    "    proposed_color = CASE WHEN $3::bool THEN proposed_color END, "
    "    proposal_note = CASE WHEN $3::bool THEN proposal_note END, "
    "    proposed_at = CASE WHEN $3::bool THEN proposed_at END "
    "  WHERE appeal_id = $1::uuid AND state = 'proposed' AND proposed_by = $5::uuid AND proposed_by <> $2::uuid "
    "  RETURNING *), "
    "o AS (INSERT INTO health_overrides (resident_id, color, reason, appeal_id, decided_at, expires_at) "
    "      SELECT resident_id, proposed_color, 'appeal approved by two staff members', appeal_id::text, decided_at, "
    "             decided_at + $6::interval FROM u WHERE state = 'approved' RETURNING appeal_id) "
    "SELECT " APPEAL_COLS("u") ", r.name, "
                               "       hc_appeal_audit(u.citizen_id, u.resident_id, $7, $8, $9, $10, "
                               "                       CASE u.state WHEN 'approved' THEN 'healthcode.appeal.approve' "
                               "                                    WHEN 'rejected' THEN 'healthcode.appeal.reject' "
                               "                                    ELSE 'healthcode.appeal.decline' END, $11), "
                               "       (SELECT count(*) FROM o) "
                               "FROM u JOIN registry_residents r ON r.resident_id = u.resident_id",
    11};

const ch_pg_stmt_t *const hc_appeals_stmts[] = {
    &stmt_appeal_insert,  &stmt_appeals_mine, &stmt_appeal_mine,   &stmt_appeals_queue,
    &stmt_appeal_propose, &stmt_appeal_read,  &stmt_appeal_decide, NULL,
};

/* ---- helpers ---- */

static char *masked(ch_call_t *call, const char *name)
{
    char *out = ch_call_alloc(call, 64);
    ch_name_mask(name, out, 64);
    return out;
}

static const char *col(PGresult *res, int row, int c)
{
    return PQgetisnull(res, row, c) ? NULL : PQgetvalue(res, row, c);
}

/* An Appeal from APPEAL_COLS at column `c` of `row`, followed by the resident's name. */
static Appeal *appeal_from_row(ch_call_t *call, PGresult *res, int row, int c)
{
    Appeal *a = ch_call_alloc(call, sizeof(*a));
    cityhall__healthcode__v1__appeal__init(a);
    a->appeal_id = ch_call_strdup(call, PQgetvalue(res, row, c + 0));
    a->state = ch_call_strdup(call, PQgetvalue(res, row, c + 1));
    a->reason = ch_call_strdup(call, PQgetvalue(res, row, c + 2));
    a->color_at_appeal = ch_call_strdup(call, PQgetvalue(res, row, c + 3));
    a->proposed_decision = ch_call_strdup(call, PQgetvalue(res, row, c + 4));
    a->proposed_color = ch_call_strdup(call, PQgetvalue(res, row, c + 5));
    a->proposed_by = ch_call_strdup(call, PQgetvalue(res, row, c + 6));
    a->decided_by = ch_call_strdup(call, PQgetvalue(res, row, c + 7));
    a->note = ch_call_strdup(call, PQgetvalue(res, row, c + 8));
    a->created_at = hc_timestamp_us(call, strtoll(PQgetvalue(res, row, c + 9), NULL, 10));
    if (col(res, row, c + 10) != NULL)
        a->decided_at = hc_timestamp_us(call, strtoll(PQgetvalue(res, row, c + 10), NULL, 10));
    a->masked_name = masked(call, PQgetvalue(res, row, c + 12));
    return a;
}

/*
 * The actor columns of access_log_append for the caller (role, actor, dept, on behalf of, action, purpose), as
 * ch_audit_query makes them, for statements that append to the log of citizens they find themselves.
 */
static void audit_actor(ch_call_t *call, const char *action, const char *purpose, const char *out[6])
{
    ch_pg_query_t q;
    ch_audit_query(call, "00000000-0000-0000-0000-000000000000", action, purpose, &q);
    /* q runs ch_audit_stmt_append: access_log_append($1 citizen, $2 role, $3 actor, $4 dept, $5 behalf, $6, $7) */
    for (int i = 0; i < 6; ++i)
        out[i] = q.values[i + 1];
}

/* Reads page_size and page_token ("<Unix µs>.<appeal id>"); answers 400 and returns -1 when malformed. */
static int page_or_respond(ch_call_t *call, int *size, const char **cursor_us, const char **cursor_id)
{
    const char *ps = ch_call_query(call, "page_size"), *pt = ch_call_query(call, "page_token");
    *size = PAGE_DEFAULT;
    *cursor_us = *cursor_id = NULL;
    if (ps != NULL && ps[0] != '\0') {
        char *end;
        errno = 0;
        long n = strtol(ps, &end, 10);
        /* strtol takes leading blanks and clamps on overflow: only plain digits that fit are a page size */
        if (!isdigit((unsigned char)ps[0]) || *end != '\0' || errno == ERANGE || n < 1) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "page_size: a positive number (at most %d)", PAGE_MAX);
            return -1;
        }
        *size = n > PAGE_MAX ? PAGE_MAX : (int)n;
    }
    if (pt != NULL && pt[0] != '\0') {
        const char *dot = strchr(pt, '.');
        uint8_t id[16];
        char *end;
        int ok = dot != NULL && dot != pt && dot - pt < 20;
        if (ok) {
            long long us = strtoll(pt, &end, 10);
            ok = end == dot && us >= 0 && hc_uuid_parse(dot + 1, id) == 0;
        }
        if (!ok) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "page_token: not a token this list gave");
            return -1;
        }
        *cursor_us = ch_call_printf(call, "%.*s", (int)(dot - pt), pt);
        *cursor_id = ch_call_strdup(call, dot + 1);
    }
    return 0;
}

/* Fills an AppealList from every row (Appeal columns from column 0); the next token when the page is full. */
static AppealList *appeal_list(ch_call_t *call, PGresult *res, int page_size)
{
    AppealList *list = ch_call_alloc(call, sizeof(*list));
    cityhall__healthcode__v1__appeal_list__init(list);
    int n = PQntuples(res);
    list->n_appeals = (size_t)n;
    list->appeals = ch_call_alloc(call, ((size_t)n + 1) * sizeof(*list->appeals));
    for (int i = 0; i < n; ++i)
        list->appeals[i] = appeal_from_row(call, res, i, 0);
    list->next_page_token = "";
    if (n == page_size && n > 0)
        list->next_page_token = ch_call_printf(call, "%s.%s", PQgetvalue(res, n - 1, 9), PQgetvalue(res, n - 1, 0));
    return list;
}

/* ---- POST /v1/health/appeals ---- */

typedef struct appeal_state {
    const char *reason;
    int64_t resident_id;
    Appeal *appeal;
    char appeal_id[37];
} appeal_state_t;

static void on_appeal_created(ch_call_t *call, ch_pg_result_t *r)
{
    appeal_state_t *st = ch_call_data(call);
    if (r->err == CH_EDB && r->sqlstate != NULL && strcmp(r->sqlstate, "23505") == 0) {
        ch_fail(call, CH_CODE_ALREADY_EXISTS, "an appeal of this code is already open");
        return;
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    ch_reply(call, 201, &st->appeal->base);
}

static void on_appeal_code(ch_call_t *call, int err, HealthCode *code)
{
    appeal_state_t *st = ch_call_data(call);
    const ch_principal_t *p = ch_call_principal(call);
    if (err != 0) {
        ch_fail_err(call, err);
        return;
    }
    if (strcmp(code->color, "yellow") != 0 && strcmp(code->color, "red") != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "only a yellow or red code can be appealed");
        return;
    }
    int64_t now = hc_unix_now_us();
    Appeal *a = ch_call_alloc(call, sizeof(*a));
    cityhall__healthcode__v1__appeal__init(a);
    hc_uuid_v4(st->appeal_id);
    a->appeal_id = st->appeal_id;
    a->state = "submitted";
    a->reason = (char *)st->reason;
    a->color_at_appeal = ch_call_strdup(call, code->color);
    a->created_at = hc_timestamp_us(call, now);
    a->masked_name = code->masked_name != NULL ? code->masked_name : "";
    st->appeal = a;

    const char **v = ch_call_alloc(call, 6 * sizeof(*v));
    v[0] = st->appeal_id;
    v[1] = ch_call_printf(call, "%" PRId64, st->resident_id);
    v[2] = p->subject;
    v[3] = st->reason;
    v[4] = a->color_at_appeal;
    v[5] = ch_call_printf(call, "%" PRId64, now);
    ch_pg_query_t q[2] = {{&stmt_appeal_insert, v, NULL}};
    int n = 1;
    /* a staff member filing for a citizen at a counter, or a kiosk session: the citizen's log shows who */
    if ((p->actor != NULL && p->actor[0] != '\0') || (p->device != NULL && p->device[0] != '\0'))
        ch_audit_query(call, p->subject, "healthcode.appeal.create", "appeal filed for the citizen", &q[n++]);
    int ret = ch_call_pg_commit(call, q, n, 201, &a->base, on_appeal_created);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void appeal_with_subject(ch_call_t *call, int64_t resident_id)
{
    appeal_state_t *st = ch_call_data(call);
    st->resident_id = resident_id;
    int ret = hc_code_get(call, resident_id, on_appeal_code);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void hc_appeal_create(ch_call_t *call)
{
    AppealRequest *req = ch_call_body(call);
    appeal_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    const char *reason = req->reason;
    while (*reason == ' ' || *reason == '\n')
        ++reason;
    long chars = hc_text_chars(reason, 1);
    if (chars <= 0 || chars > REASON_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "reason: %s",
                chars == 0  ? "required"
                : chars < 0 ? "must be text without control characters"
                            : "at most 1000 characters");
        return;
    }
    st->reason = reason;
    ch_call_set_data(call, st);
    int ret = hc_subject_resolve(call, req->dependent_id, appeal_with_subject);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- GET /v1/health/appeals, GET /v1/health/appeals/{id} ---- */

static void on_mine(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    int *size = ch_call_data(call);
    ch_reply(call, 200, &appeal_list(call, r->res[0], *size)->base);
}

void hc_appeals_mine(ch_call_t *call)
{
    int *size = ch_call_alloc(call, sizeof(*size));
    const char *cursor_us, *cursor_id;
    if (page_or_respond(call, size, &cursor_us, &cursor_id) != 0)
        return;
    ch_call_set_data(call, size);
    const char **v = ch_call_alloc(call, 4 * sizeof(*v));
    v[0] = ch_call_principal(call)->subject;
    v[1] = cursor_us;
    v[2] = cursor_id;
    v[3] = ch_call_printf(call, "%d", *size);
    ch_pg_query_t q = {&stmt_appeals_mine, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_mine);
    if (ret != 0)
        ch_fail_err(call, ret);
}

static void on_mine_one(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    if (PQntuples(r->res[0]) != 1) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such appeal");
        return;
    }
    ch_reply(call, 200, &appeal_from_row(call, r->res[0], 0, 0)->base);
}

void hc_appeal_get(ch_call_t *call)
{
    const char *id = ch_call_param(call, "id");
    uint8_t bytes[16];
    if (hc_uuid_parse(id, bytes) != 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such appeal");
        return;
    }
    const char **v = ch_call_alloc(call, 2 * sizeof(*v));
    v[0] = ch_call_principal(call)->subject;
    v[1] = id;
    ch_pg_query_t q = {&stmt_appeal_mine, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_mine_one);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- GET /v1/staff/health/appeals ---- */

void hc_appeals_queue(ch_call_t *call)
{
    if (!hc_health_dept(call)) { /* another department's queue has none of these */
        AppealList empty;
        cityhall__healthcode__v1__appeal_list__init(&empty);
        ch_reply(call, 200, &empty.base);
        return;
    }
    int *size = ch_call_alloc(call, sizeof(*size));
    const char *cursor_us, *cursor_id;
    if (page_or_respond(call, size, &cursor_us, &cursor_id) != 0)
        return;
    ch_call_set_data(call, size);
    const char **v = ch_call_alloc(call, 9 * sizeof(*v));
    v[0] = cursor_us;
    v[1] = cursor_id;
    v[2] = ch_call_printf(call, "%d", *size);
    audit_actor(call, "healthcode.appeal.read", AUDIT_PURPOSE, v + 3);
    ch_pg_query_t q = {&stmt_appeals_queue, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_mine);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/staff/health/appeals/{id}/proposal ---- */

static void on_proposed(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such appeal");
        return;
    }
    if (PQgetisnull(res, 0, 1)) {
        const char *was = PQgetvalue(res, 0, 0);
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "%s",
                strcmp(was, "proposed") == 0 ? "a proposal is already waiting for a second staff member"
                                             : "the appeal is already decided");
        return;
    }
    ch_reply(call, 200, &appeal_from_row(call, res, 0, 1)->base);
}

void hc_appeal_propose(ch_call_t *call)
{
    AppealProposal *req = ch_call_body(call);
    const char *id = ch_call_param(call, "id");
    uint8_t bytes[16];
    if (!hc_health_dept(call) || hc_uuid_parse(id, bytes) != 0 ||
        hc_uuid_parse(ch_call_principal(call)->subject, bytes) != 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such appeal");
        return;
    }
    const char *color = NULL;
    if (strcmp(req->decision, "approve") == 0) {
        color = req->color[0] == '\0' ? "green" : req->color;
        if (strcmp(color, "green") != 0 && strcmp(color, "yellow") != 0) {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "color: green or yellow (the color the code takes when approved)");
            return;
        }
    } else if (strcmp(req->decision, "reject") == 0) {
        if (req->color[0] != '\0') {
            ch_fail(call, CH_CODE_INVALID_ARGUMENT, "color: only with decision approve");
            return;
        }
    } else {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "decision: approve or reject");
        return;
    }
    long chars = hc_text_chars(req->note, 1);
    if (chars < 0 || chars > NOTE_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "note: %s",
                chars < 0 ? "must be text without control characters" : "at most 1000 characters");
        return;
    }
    const char **v = ch_call_alloc(call, 11 * sizeof(*v));
    v[0] = id;
    v[1] = ch_call_principal(call)->subject;
    v[2] = req->decision;
    v[3] = color;
    v[4] = req->note;
    audit_actor(call, "healthcode.appeal.propose", AUDIT_PURPOSE, v + 5);
    ch_pg_query_t q = {&stmt_appeal_propose, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_proposed);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* ---- POST /v1/staff/health/appeals/{id}/approval ---- */

typedef struct decide_state {
    const char *id;
    int64_t resident_id;
    Appeal *appeal;
} decide_state_t;

static void on_decision_recomputed(ch_call_t *call, int err, const hc_state_t *state)
{
    /* the recompute was also queued in the committed transaction: a failure here only delays the new color */
    decide_state_t *st = ch_call_data(call);
    ch_reply(call, 200, &st->appeal->base);
}

static void on_decided(ch_call_t *call, ch_pg_result_t *r)
{
    decide_state_t *st = ch_call_data(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail(call, CH_CODE_ABORTED, "the appeal changed meanwhile; read it again");
        return;
    }
    st->appeal = appeal_from_row(call, res, 0, 0);
    if (strcmp(st->appeal->state, "approved") == 0 && hc_recompute(call, st->resident_id, on_decision_recomputed) == 0)
        return;
    ch_reply(call, 200, &st->appeal->base);
}

static void on_decision_read(ch_call_t *call, ch_pg_result_t *r)
{
    decide_state_t *st = ch_call_data(call);
    AppealApproval *req = ch_call_body(call);
    const ch_principal_t *p = ch_call_principal(call);
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    if (PQntuples(res) != 1) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such appeal");
        return;
    }
    const char *state = PQgetvalue(res, 0, 0), *proposer = PQgetvalue(res, 0, 1);
    if (strcmp(state, "proposed") != 0) {
        ch_fail(call, CH_CODE_FAILED_PRECONDITION, "%s",
                strcmp(state, "submitted") == 0 ? "the appeal has no proposal to decide yet"
                                                : "the appeal is already decided");
        return;
    }
    if (strcmp(proposer, p->subject) == 0) {
        ch_fail(call, CH_CODE_PERMISSION_DENIED, FOUR_EYES);
        return;
    }
    st->resident_id = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
    const char **v = ch_call_alloc(call, 11 * sizeof(*v));
    const char *actor[6];
    audit_actor(call, "healthcode.appeal.decide", AUDIT_PURPOSE, actor);
    v[0] = st->id;
    v[1] = p->subject;
    v[2] = req->approve ? "true" : "false";
    v[3] = req->note;
    v[4] = ch_call_strdup(call, proposer);
    v[5] = OVERRIDE_DURATION;
    v[6] = actor[0];
    v[7] = actor[1];
    v[8] = actor[2];
    v[9] = actor[3];
    v[10] = actor[5];
    /* the override's recompute is queued in the same transaction (0005's trigger on health_overrides) */
    ch_pg_query_t q = {&stmt_appeal_decide, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_decided);
    if (ret != 0)
        ch_fail_err(call, ret);
}

void hc_appeal_approve(ch_call_t *call)
{
    AppealApproval *req = ch_call_body(call);
    const char *id = ch_call_param(call, "id");
    uint8_t bytes[16];
    if (!hc_health_dept(call) || hc_uuid_parse(id, bytes) != 0 ||
        hc_uuid_parse(ch_call_principal(call)->subject, bytes) != 0) {
        ch_fail(call, CH_CODE_NOT_FOUND, "no such appeal");
        return;
    }
    long chars = hc_text_chars(req->note, 1);
    if (chars < 0 || chars > NOTE_MAX) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "note: %s",
                chars < 0 ? "must be text without control characters" : "at most 1000 characters");
        return;
    }
    decide_state_t *st = ch_call_alloc(call, sizeof(*st));
    memset(st, 0, sizeof(*st));
    st->id = id;
    ch_call_set_data(call, st);
    const char **v = ch_call_alloc(call, sizeof(*v));
    v[0] = id;
    ch_pg_query_t q = {&stmt_appeal_read, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_decision_read);
    if (ret != 0)
        ch_fail_err(call, ret);
}
