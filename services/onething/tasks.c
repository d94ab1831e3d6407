/* The staff task queue: a department's items with the applicant's form values, each view in the access log. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "cityhall/audit.h"
#include "cityhall/jws.h"
#include "cityhall/pii.h"
#include "dispatch.h"

typedef Cityhall__Onething__V1__Task Task;
typedef Cityhall__Onething__V1__TaskList TaskList;
typedef Cityhall__Onething__V1__FieldValue FieldValue;
typedef Google__Protobuf__Timestamp Timestamp;

/*
 * GET /v1/staff/tasks?state=in_review,failed_technical&page_size=20&page_token=...
 * Staff see the items of their own department only (the token's dept claim), oldest submission first. Each task
 * carries the form values its item uses, with ID and phone numbers masked. Showing them is a read of the
 * applicant's data: one access-log entry per applicant on the page is committed before the answer goes out.
 * The page token is the last task's (submitted_at, item_id), base64url-encoded.
 */

#define PAGE_DEFAULT 20
#define PAGE_MAX     100

static const char *const item_states[] = {
    "blocked_on_dependency", "dispatched", "in_review", "supplement_requested", "approved", "issued", "rejected",
    "failed_technical",      "withdrawn",  NULL};
static const char default_states[] = "{dispatched,in_review,supplement_requested,failed_technical}";

/* $1 dept, $2 states, $3 after submitted_at (text, or NULL), $4 after item id, $5 limit */
const ch_pg_stmt_t ot_stmt_tasks = {
    "ot_tasks",
    "SELECT i.item_id, i.application_id, i.item_code, ot_item_name(a.catalog_version, i.item_code), i.state, "
    "       floor(extract(epoch FROM ot_effective_due(i.due_at, i.paused_seconds, i.paused_at, now())))::bigint, "
    "       i.state IN ('dispatched', 'in_review', 'failed_technical') AND (ot_effective_due(i.due_at, "
    "i.paused_seconds, i.paused_at, now()) <= now() OR EXISTS ( "
    "           SELECT 1 FROM escalations e WHERE e.item_id = i.item_id AND e.resolved_at IS NULL)), "
    "       EXISTS (SELECT 1 FROM escalations e WHERE e.item_id = i.item_id AND e.resolved_at IS NULL), "
    "       r.name, encode(a.fields_enc, 'hex'), ot_item_fields(a.catalog_version, a.bundle_code, i.item_code)::text, "
    "       (SELECT floor(extract(epoch FROM min(coalesce(o.delivered_at, o.created_at))))::bigint FROM outbox o "
    "        WHERE o.item_id = i.item_id), "
    "       a.citizen_id, a.submitted_at::text "
    "FROM application_items i JOIN applications a USING (application_id) "
    "     LEFT JOIN citizens c ON c.citizen_id = a.citizen_id "
    "     LEFT JOIN registry_residents r ON r.resident_id = c.registry_id "
    "WHERE i.department = $1 AND i.state = ANY ($2::text[]) "
    "  AND ($3::timestamptz IS NULL OR (a.submitted_at, i.item_id) > ($3::timestamptz, $4::uuid)) "
    "ORDER BY a.submitted_at, i.item_id LIMIT $5::integer",
    5};
enum {
    T_ITEM,
    T_APP,
    T_CODE,
    T_NAME,
    T_STATE,
    T_DUE,
    T_OVERDUE,
    T_ESC,
    T_HOLDER,
    T_FIELDS,
    T_SPEC,
    T_RECEIVED,
    T_CITIZEN,
    T_SUBMITTED
};

typedef struct tasks_state {
    TaskList *list;
} tasks_state_t;

static Timestamp *ts_at(ch_call_t *call, int64_t s)
{
    Timestamp *t = ch_call_alloc(call, sizeof(*t));
    google__protobuf__timestamp__init(t);
    t->seconds = s;
    return t;
}

/* The value as staff see it: ID and phone numbers masked, everything else as the citizen gave it. */
static char *shown_value(ch_call_t *call, const char *type, json_t *v)
{
    char buf[64];
    const char *s = json_string_value(v);
    char *text;
    if (s == NULL) {
        char *d = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
        text = ch_call_strdup(call, d != NULL ? d : "");
        free(d);
    } else {
        text = ch_call_strdup(call, s);
    }
    if (type == NULL)
        return text;
    if (strcmp(type, "id_number") == 0) {
        if (strlen(text) == 18) {
            ch_id_number_mask(text, buf);
            return ch_call_strdup(call, buf);
        }
        size_t n = strlen(text);
        for (size_t i = n > 2 ? 1 : 0; i + 1 < n; ++i)
            text[i] = '*';
        return text;
    }
    if (strcmp(type, "phone") == 0 && strlen(text) == 11) {
        ch_phone_mask(text, buf);
        return ch_call_strdup(call, buf);
    }
    return text;
}

static void task_fields(ch_call_t *call, Task *t, const char *fields_hex, const char *spec_json)
{
    json_t *values = ot_fields_open(fields_hex);
    json_t *spec = json_loads(spec_json, 0, NULL);
    size_t n = json_array_size(spec), k = 0;
    t->fields = ch_call_alloc(call, sizeof(FieldValue *) * (n > 0 ? n : 1));
    for (size_t i = 0; i < n && values != NULL; ++i) {
        json_t *f = json_array_get(spec, i);
        const char *name = json_string_value(json_object_get(f, "name"));
        json_t *v = name != NULL ? json_object_get(values, name) : NULL;
        if (v == NULL)
            continue;
        FieldValue *fv = ch_call_alloc(call, sizeof(*fv));
        cityhall__onething__v1__field_value__init(fv);
        fv->name = ch_call_strdup(call, name);
        fv->value = shown_value(call, json_string_value(json_object_get(f, "type")), v);
        t->fields[k++] = fv;
    }
    t->n_fields = k;
    json_decref(spec);
    json_decref(values);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void on_logged(ch_call_t *call, ch_pg_result_t *r)
{
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    tasks_state_t *st = ch_call_data(call);
    ch_reply(call, 200, &st->list->base);
}

static void on_tasks(ch_call_t *call, ch_pg_result_t *r)
{
    tasks_state_t *st = ch_call_data(call);
    if (r->err == CH_EDB && r->sqlstate != NULL && strncmp(r->sqlstate, "22", 2) == 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "page_token: not a token of this list");
        return;
    }
    if (r->err != 0) {
        ch_fail_err(call, r->err);
        return;
    }
    PGresult *res = r->res[0];
    int rows = PQntuples(res);
    TaskList *list = st->list;
    int n = rows > (int)list->n_tasks ? (int)list->n_tasks : rows; /* n_tasks holds the page size until here */
    size_t page = list->n_tasks;
    list->tasks = ch_call_alloc(call, sizeof(Task *) * (size_t)(n > 0 ? n : 1));
    list->n_tasks = (size_t)n;
    /* the applicants on this page, once each, for the access log */
    const char **citizens = ch_call_alloc(call, sizeof(char *) * (size_t)(n > 0 ? n : 1));
    int ncitizens = 0;
    for (int i = 0; i < n; ++i) {
        Task *t = ch_call_alloc(call, sizeof(*t));
        cityhall__onething__v1__task__init(t);
        t->task_id = ch_call_strdup(call, PQgetvalue(res, i, T_ITEM));
        t->application_id = ch_call_strdup(call, PQgetvalue(res, i, T_APP));
        t->item_code = ch_call_strdup(call, PQgetvalue(res, i, T_CODE));
        t->item_name = ch_call_strdup(call, PQgetvalue(res, i, T_NAME));
        t->department = (char *)ch_call_principal(call)->dept;
        t->state = ch_call_strdup(call, PQgetvalue(res, i, T_STATE));
        if (!PQgetisnull(res, i, T_DUE))
            t->due_at = ts_at(call, strtoll(PQgetvalue(res, i, T_DUE), NULL, 10));
        t->overdue = strcmp(PQgetvalue(res, i, T_OVERDUE), "t") == 0;
        t->escalated = strcmp(PQgetvalue(res, i, T_ESC), "t") == 0;
        char masked[64] = "";
        if (!PQgetisnull(res, i, T_HOLDER))
            ch_name_mask(PQgetvalue(res, i, T_HOLDER), masked, sizeof(masked));
        t->applicant_masked_name = ch_call_strdup(call, masked);
        task_fields(call, t, PQgetvalue(res, i, T_FIELDS), PQgetvalue(res, i, T_SPEC));
        if (!PQgetisnull(res, i, T_RECEIVED))
            t->received_at = ts_at(call, strtoll(PQgetvalue(res, i, T_RECEIVED), NULL, 10));
        list->tasks[i] = t;
        const char *c = PQgetvalue(res, i, T_CITIZEN);
        int seen = 0;
        for (int k = 0; k < ncitizens && !seen; ++k)
            seen = strcmp(citizens[k], c) == 0;
        if (!seen)
            citizens[ncitizens++] = ch_call_strdup(call, c);
    }
    if ((size_t)rows > page && n > 0) {
        /* more after this page: the last task's sort key */
        char *key = ch_call_printf(call, "%s|%s", PQgetvalue(res, n - 1, T_SUBMITTED), PQgetvalue(res, n - 1, T_ITEM));
        ch_buf_t b = {0};
        ch_b64url_encode((const uint8_t *)key, strlen(key), &b);
        list->next_page_token = ch_call_strdup(call, b.base != NULL ? b.base : "");
        ch_buf_free(&b);
    }
    if (ncitizens == 0) {
        ch_reply(call, 200, &list->base);
        return;
    }
    /* in citizen order: every writer of the access log takes its per-citizen locks in that order */
    qsort(citizens, (size_t)ncitizens, sizeof(*citizens), cmp_str);
    ch_pg_query_t *q = ch_call_alloc(call, sizeof(*q) * (size_t)ncitizens);
    for (int k = 0; k < ncitizens; ++k)
        ch_audit_query(call, citizens[k], "onething.task_view", "one-thing application reviewed in the staff queue",
                       &q[k]);
    int ret = ch_call_pg(call, q, ncitizens, on_logged);
    if (ret != 0)
        ch_fail_err(call, ret);
}

/* "in_review,failed_technical" into a text[] literal; NULL when a state is unknown. */
static const char *states_literal(ch_call_t *call, const char *q)
{
    ch_buf_t b = {0};
    ch_buf_append(&b, "{", 1);
    const char *p = q;
    int n = 0, ok = 1;
    while (ok && *p != '\0') {
        size_t len = strcspn(p, ",");
        int known = 0;
        for (const char *const *s = item_states; *s != NULL; ++s)
            known |= strlen(*s) == len && strncmp(*s, p, len) == 0;
        if (!known) {
            ok = 0;
            break;
        }
        if (n++ > 0)
            ch_buf_append(&b, ",", 1);
        ch_buf_append(&b, p, len);
        p += len;
        if (*p == ',')
            ++p;
    }
    ch_buf_append(&b, "}", 1);
    char *s = ok && n > 0 ? ch_call_strdup(call, b.base) : NULL;
    ch_buf_free(&b);
    return s;
}

void ot_tasks(ch_call_t *call)
{
    const ch_principal_t *p = ch_call_principal(call);
    const char *state = ch_call_query(call, "state"), *size = ch_call_query(call, "page_size"),
               *token = ch_call_query(call, "page_token");
    char errors[512] = "";
    size_t len = 0;
    const char *states = default_states;
    if (state != NULL && state[0] != '\0' && (states = states_literal(call, state)) == NULL)
        len += (size_t)snprintf(errors + len, sizeof(errors) - len,
                                "state: one or more of blocked_on_dependency, dispatched, in_review, "
                                "supplement_requested, approved, issued, rejected, failed_technical, withdrawn");
    long page = PAGE_DEFAULT;
    if (size != NULL && size[0] != '\0') {
        char *end;
        page = strtol(size, &end, 10);
        if (*end != '\0' || page < 1) {
            len += (size_t)snprintf(errors + len, sizeof(errors) - len, "%spage_size: a whole number from 1",
                                    len > 0 ? "; " : "");
            page = PAGE_DEFAULT;
        } else if (page > PAGE_MAX) {
            page = PAGE_MAX; /* capped, as every list */
        }
    }
    const char *after_at = NULL, *after_id = NULL;
    if (token != NULL && token[0] != '\0') {
        size_t tl = strlen(token);
        uint8_t *raw = ch_call_alloc(call, tl * 3 / 4 + 4);
        long n = tl <= 200 ? ch_b64url_decode(token, tl, raw) : -1;
        char *bar = NULL;
        if (n > 0) {
            raw[n] = '\0';
            bar = strchr((char *)raw, '|');
        }
        int ok = bar != NULL && strlen(bar + 1) == 36;
        for (const char *c = (const char *)raw; ok && c < bar; ++c)
            ok = isdigit((unsigned char)*c) || strchr(" :.+-", *c) != NULL;
        if (!ok) {
            len += (size_t)snprintf(errors + len, sizeof(errors) - len, "%spage_token: not a token of this list",
                                    len > 0 ? "; " : "");
        } else {
            *bar = '\0';
            after_at = (const char *)raw;
            after_id = bar + 1;
        }
    }
    if (len > 0) {
        ch_fail(call, CH_CODE_INVALID_ARGUMENT, "%s", errors);
        return;
    }
    tasks_state_t *st = ch_call_alloc(call, sizeof(*st));
    st->list = ch_call_alloc(call, sizeof(*st->list));
    cityhall__onething__v1__task_list__init(st->list);
    st->list->n_tasks = (size_t)page; /* the page size, until the rows arrive */
    ch_call_set_data(call, st);
    if (p->dept == NULL || p->dept[0] == '\0') {
        st->list->n_tasks = 0;
        ch_reply(call, 200, &st->list->base);
        return;
    }
    const char **v = ch_call_alloc(call, 5 * sizeof(*v));
    v[0] = p->dept;
    v[1] = states;
    v[2] = after_at;
    v[3] = after_id;
    v[4] = ch_call_printf(call, "%ld", page + 1);
    ch_pg_query_t q = {&ot_stmt_tasks, v, NULL};
    int ret = ch_call_pg(call, &q, 1, on_tasks);
    if (ret != 0)
        ch_fail_err(call, ret);
}
