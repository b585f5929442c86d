/* Issue lists and FHIR OperationOutcome resources: how every FHIR error leaves trialhub, from a
 * 400 for a malformed body to a 422 that lists every problem of a QuestionnaireResponse. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "fhir/fhir_int.h"
#include "trialhub/alloc.h"

#define DIAG_MAX 481 /* 480 bytes of diagnostics + NUL */

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when the bytes there are not one. */
static size_t utf8_seq_len(const unsigned char *s)
{
    unsigned char c = s[0];
    if (c < 0x80) {
        return 1;
    }
    size_t n;
    unsigned min;
    unsigned cp;
    if ((c & 0xE0) == 0xC0) {
        n = 2, min = 0x80, cp = c & 0x1Fu;
    } else if ((c & 0xF0) == 0xE0) {
        n = 3, min = 0x800, cp = c & 0x0Fu;
    } else if ((c & 0xF8) == 0xF0) {
        n = 4, min = 0x10000, cp = c & 0x07u;
    } else {
        return 0;
    }
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            return 0; /* also stops at the NUL */
        }
        cp = (cp << 6) | (s[i] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        return 0;
    }
    return n;
}

size_t th__fhir_utf8_copy(char *dst, size_t cap, const char *src)
{
    size_t out = 0;
    const unsigned char *s = (const unsigned char *)src;
    while (*s != 0) {
        size_t n = utf8_seq_len(s);
        if (n == 0) {
            if (out + 1 >= cap) {
                break;
            }
            dst[out++] = '?';
            s++;
            continue;
        }
        if (out + n >= cap) {
            break;
        }
        memcpy(dst + out, s, n);
        out += n;
        s += n;
    }
    dst[out] = '\0';
    return out;
}

const char *th_fhir_severity_name(th_fhir_severity severity)
{
    switch (severity) {
    case TH_FHIR_SEV_FATAL:
        return "fatal";
    case TH_FHIR_SEV_ERROR:
        return "error";
    case TH_FHIR_SEV_WARNING:
        return "warning";
    case TH_FHIR_SEV_INFORMATION:
        return "information";
    }
    return "unknown";
}

const char *th_fhir_issue_type_name(th_fhir_issue_type code)
{
    switch (code) {
#define TH__FHIR_ISSUE_NAME(name, text) \
    case TH_FHIR_ISSUE_##name:          \
        return text;
        TH_FHIR_ISSUE_TYPE_MAP(TH__FHIR_ISSUE_NAME)
#undef TH__FHIR_ISSUE_NAME
    }
    return "unknown";
}

int th_fhir_issues_create(th_fhir_issues **out)
{
    if (out == NULL) {
        return TH_EINVAL;
    }
    th_fhir_issues *issues = th_calloc(1, sizeof(*issues));
    if (issues == NULL) {
        return TH_ENOMEM;
    }
    *out = issues;
    return TH_OK;
}

void th__fhir_issues_clear(th_fhir_issues *issues)
{
    for (size_t i = 0; i < issues->n; i++) {
        /* diagnostics is the start of the issue's one allocation (see issues_add). */
        th_free((void *)issues->v[i].diagnostics);
    }
    th_free(issues->v);
    memset(issues, 0, sizeof(*issues));
}

void th_fhir_issues_destroy(th_fhir_issues *issues)
{
    if (issues == NULL) {
        return;
    }
    th__fhir_issues_clear(issues);
    th_free(issues);
}

int th_fhir_issues_add(th_fhir_issues *issues, th_fhir_severity severity, th_fhir_issue_type code,
                       const char *link_id, const char *expression, const char *fmt, ...)
{
    if (issues == NULL || fmt == NULL) {
        return TH_EINVAL;
    }
    bool is_error = severity == TH_FHIR_SEV_FATAL || severity == TH_FHIR_SEV_ERROR;
    if (issues->n >= TH_FHIR_MAX_ISSUES) {
        issues->omitted++;
        issues->nerrors += is_error;
        return TH_OK;
    }
    if (issues->n == issues->cap) {
        size_t cap = issues->cap == 0 ? 8 : issues->cap * 2;
        th_fhir_issue *v = th_realloc_array(issues->v, cap, sizeof(*v));
        if (v == NULL) {
            return TH_ENOMEM;
        }
        issues->v = v;
        issues->cap = cap;
    }

    char raw[DIAG_MAX];
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(raw, sizeof(raw), fmt, ap);
    va_end(ap);
    if (r < 0) {
        raw[0] = '\0';
    }
    /* One allocation per issue holds its three strings, each made valid UTF-8. */
    size_t dlen = strlen(raw) + 1;
    size_t elen = expression != NULL ? strlen(expression) + 1 : 0;
    size_t llen = link_id != NULL ? strlen(link_id) + 1 : 0;
    char *block = th_malloc(dlen + elen + llen);
    if (block == NULL) {
        return TH_ENOMEM;
    }
    th_fhir_issue *issue = &issues->v[issues->n];
    issue->severity = severity;
    issue->code = code;
    char *p = block;
    issue->diagnostics = p;
    p += th__fhir_utf8_copy(p, dlen, raw) + 1;
    issue->expression = NULL;
    if (expression != NULL) {
        issue->expression = p;
        p += th__fhir_utf8_copy(p, elen, expression) + 1;
    }
    issue->link_id = NULL;
    if (link_id != NULL) {
        issue->link_id = p;
        th__fhir_utf8_copy(p, llen, link_id);
    }
    issues->n++;
    issues->nerrors += is_error;
    return TH_OK;
}

size_t th_fhir_issues_count(const th_fhir_issues *issues)
{
    return issues != NULL ? issues->n : 0;
}

const th_fhir_issue *th_fhir_issues_get(const th_fhir_issues *issues, size_t i)
{
    if (issues == NULL || i >= issues->n) {
        return NULL;
    }
    return &issues->v[i];
}

size_t th_fhir_issues_errors(const th_fhir_issues *issues)
{
    return issues != NULL ? issues->nerrors : 0;
}

size_t th_fhir_issues_omitted(const th_fhir_issues *issues)
{
    return issues != NULL ? issues->omitted : 0;
}

/* Appends {severity, code, diagnostics, expression[]} to array; strings must be valid UTF-8. */
static int append_issue(json_t *array, th_fhir_severity severity, th_fhir_issue_type code,
                        const char *diagnostics, const char *expression)
{
    json_t *issue = json_object();
    if (issue == NULL || json_array_append_new(array, issue) != 0) {
        return TH_ENOMEM;
    }
    if (json_object_set_new(issue, "severity", json_string(th_fhir_severity_name(severity))) ||
        json_object_set_new(issue, "code", json_string(th_fhir_issue_type_name(code))) ||
        json_object_set_new(issue, "diagnostics", json_string(diagnostics))) {
        return TH_ENOMEM;
    }
    if (expression != NULL && expression[0] != '\0') {
        json_t *expr = json_array();
        if (expr == NULL || json_object_set_new(issue, "expression", expr) != 0 ||
            json_array_append_new(expr, json_string(expression)) != 0) {
            return TH_ENOMEM;
        }
    }
    return TH_OK;
}

static json_t *outcome_new(json_t **issue_array)
{
    json_t *oo = json_object();
    json_t *arr = json_array();
    if (oo == NULL || arr == NULL ||
        json_object_set_new(oo, "resourceType", json_string("OperationOutcome")) != 0 ||
        json_object_set(oo, "issue", arr) != 0) {
        json_decref(oo);
        json_decref(arr);
        return NULL;
    }
    json_decref(arr); /* oo holds it */
    *issue_array = arr;
    return oo;
}

int th_fhir_outcome_from_issues(const th_fhir_issues *issues, json_t **out)
{
    if (issues == NULL || out == NULL) {
        return TH_EINVAL;
    }
    json_t *arr;
    json_t *oo = outcome_new(&arr);
    if (oo == NULL) {
        return TH_ENOMEM;
    }
    int rc = TH_OK;
    for (size_t i = 0; i < issues->n && rc == TH_OK; i++) {
        const th_fhir_issue *is = &issues->v[i];
        rc = append_issue(arr, is->severity, is->code, is->diagnostics, is->expression);
    }
    if (rc == TH_OK && issues->omitted > 0) {
        char msg[96];
        snprintf(msg, sizeof(msg), "%zu more issues were found but are not listed",
                 issues->omitted);
        rc = append_issue(arr, TH_FHIR_SEV_INFORMATION, TH_FHIR_ISSUE_TOO_COSTLY, msg, NULL);
    }
    if (rc == TH_OK && issues->n == 0 && issues->omitted == 0) {
        rc = append_issue(arr, TH_FHIR_SEV_INFORMATION, TH_FHIR_ISSUE_INFORMATIONAL, "no issues",
                          NULL);
    }
    if (rc != TH_OK) {
        json_decref(oo);
        return rc;
    }
    *out = oo;
    return TH_OK;
}

int th_fhir_outcome_single(th_fhir_severity severity, th_fhir_issue_type code,
                           const char *diagnostics, const char *expression, json_t **out)
{
    if (diagnostics == NULL || out == NULL) {
        return TH_EINVAL;
    }
    char diag[DIAG_MAX];
    char expr[256];
    th__fhir_utf8_copy(diag, sizeof(diag), diagnostics);
    if (expression != NULL) {
        th__fhir_utf8_copy(expr, sizeof(expr), expression);
    }
    json_t *arr;
    json_t *oo = outcome_new(&arr);
    if (oo == NULL) {
        return TH_ENOMEM;
    }
    if (append_issue(arr, severity, code, diag, expression != NULL ? expr : NULL) != TH_OK) {
        json_decref(oo);
        return TH_ENOMEM;
    }
    *out = oo;
    return TH_OK;
}

int th_fhir_outcome_parse_error(const th_fhir_parse_error *perr, json_t **out)
{
    if (perr == NULL || out == NULL) {
        return TH_EINVAL;
    }
    char msg[DIAG_MAX];
    snprintf(msg, sizeof(msg), "malformed JSON at line %d, column %d: %s", perr->line, perr->column,
             perr->message);
    return th_fhir_outcome_single(TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_STRUCTURE, msg, NULL, out);
}
