/* QuestionnaireResponse parsing and validation: one pass over the jansson document against the
 * compiled instrument, collecting every problem as a FHIR issue and recording each item's
 * answer weights for scoring. Diagnostics are built only from fixed text, the Questionnaire's
 * own linkIds and numbers, and positions, never from the submitted values.
 *
 * Cost, measured with callgrind (instruction counts are stable on the shared 2-core dev VM) and
 * with the CPU-time loop in tests/unit/fhir/test_fhir_qr.c (test_cost), RelWithDebInfo, gcc 12:
 * for the 1.6 KB PHQ-9 body of bench/ingest/fhir_post.lua, jansson's json_loadb took ~302k
 * instructions (~261k for tests/fuzz/corpus/qr/phq9-valid.json, 1.35 KB); th__json_parse
 * (json_parse.c), which builds the same jansson tree, takes ~89k (~82k), a good half of it
 * jansson's own node allocation and hashing. This file's walk adds ~16k (~1 us). The 53 KB MII
 * PHQ-9 example (mostly XHTML narrative) drops from ~7.5M to ~1.0M instructions. See
 * docs/internals/fhir.md. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "fhir/fhir_int.h"
#include "fhir/json_int.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"

#include "fhir/json_int.h"

#define VISIT_WEEK_URL "https://trialhub.dev/fhir/StructureDefinition/visit-week"
#define VISIT_WEEK_MAX 1040 /* twenty years of weekly visits */
#define MAX_LEVELS     32   /* item nesting followed; deeper is reported, not walked */

/* Visits every member of a JSON object once: cheaper than a json_object_get() (a hash) per
 * element we look for, and objects here have two to five members. */
#define FOR_MEMBERS(obj, iter)                                         \
    for (void *iter = json_object_iter((json_t *)(obj)); iter != NULL; \
         iter = json_object_iter_next((json_t *)(obj), iter))

typedef struct seg {
    const char *name; /* "item", "answer", "extension" */
    size_t index;
} seg;

typedef struct walk {
    const th_fhir_instrument *inst;
    th_qr *qr;
    int err;         /* TH_ENOMEM once an issue could not be stored; stops the walk */
    uint32_t serial; /* last instance number handed out (the root is 1) */
    int levels;
    size_t depth;
    seg path[2 * MAX_LEVELS + 4];
} walk;

static void push(walk *w, const char *name, size_t index)
{
    w->path[w->depth].name = name;
    w->path[w->depth].index = index;
    w->depth++;
}

static void pop(walk *w)
{
    w->depth--;
}

/* The FHIRPath of the current position plus suffix, e.g.
 * "QuestionnaireResponse.item[3].answer[0].valueCoding". */
static void format_path(const walk *w, const char *suffix, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "QuestionnaireResponse");
    for (size_t i = 0; i < w->depth && n < cap; i++) {
        n += (size_t)snprintf(buf + n, cap - n, ".%s[%zu]", w->path[i].name, w->path[i].index);
    }
    if (suffix != NULL && n < cap) {
        snprintf(buf + n, cap - n, "%s", suffix);
    }
}

/* Records an error issue at the current position (+ suffix) about item it (may be NULL). */
TH_FHIR_PRINTF(5, 6)
static void report(walk *w, th_fhir_issue_type code, const th__item *it, const char *suffix,
                   const char *fmt, ...)
{
    if (w->err != TH_OK) {
        return;
    }
    char expr[512];
    char diag[400];
    format_path(w, suffix, expr, sizeof(expr));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(diag, sizeof(diag), fmt, ap);
    va_end(ap);
    if (th_fhir_issues_add(&w->qr->issues, TH_FHIR_SEV_ERROR, code, it != NULL ? it->link_id : NULL,
                           expr, "%s", diag) != TH_OK) {
        w->err = TH_ENOMEM;
    }
}

/* ---- dates -------------------------------------------------------------------------------- */

static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static bool digits(const char *s, size_t n, int *out)
{
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return false;
        }
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return true;
}

enum dt_mode {
    DT_DATE,     /* YYYY, YYYY-MM, YYYY-MM-DD */
    DT_DATETIME, /* a date, or a full date-time with time zone */
    DT_FULL,     /* full date-time with seconds and time zone (RFC 3339) */
    DT_TIME      /* hh:mm:ss(.fff) */
};

/* hh:mm:ss(.f+) at s; returns the bytes used (0 when invalid). */
static size_t parse_time(const char *s, size_t len, int *h, int *mi, int *sec, uint32_t *nsec)
{
    if (len < 8 || s[2] != ':' || s[5] != ':' || !digits(s, 2, h) || !digits(s + 3, 2, mi) ||
        !digits(s + 6, 2, sec) || *h > 23 || *mi > 59 || *sec > 60) {
        return 0;
    }
    size_t i = 8;
    *nsec = 0;
    if (i < len && s[i] == '.') {
        i++;
        size_t start = i;
        uint32_t scale = 100000000;
        while (i < len && s[i] >= '0' && s[i] <= '9') {
            *nsec += (uint32_t)(s[i] - '0') * scale;
            scale /= 10;
            i++;
        }
        if (i == start) {
            return 0;
        }
    }
    return i;
}

/* Validates a FHIR date/dateTime/time; for a full date-time also gives Unix seconds and
 * nanoseconds (a leap second 60 counts as the next second). */
static bool parse_datetime(const char *s, size_t len, enum dt_mode mode, int64_t *unix_s,
                           uint32_t *nsec)
{
    int h, mi, sec;
    uint32_t frac;
    if (mode == DT_TIME) {
        return parse_time(s, len, &h, &mi, &sec, &frac) == len && sec < 60;
    }
    int y, mo = 1, d = 1;
    if (len < 4 || !digits(s, 4, &y) || y == 0) {
        return false;
    }
    if (len == 4) {
        return mode != DT_FULL;
    }
    if (len < 7 || s[4] != '-' || !digits(s + 5, 2, &mo) || mo < 1 || mo > 12) {
        return false;
    }
    if (len == 7) {
        return mode != DT_FULL;
    }
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (len < 10 || s[7] != '-' || !digits(s + 8, 2, &d) || d < 1 || d > mdays[mo - 1] ||
        (mo == 2 && d == 29 && !leap)) {
        return false;
    }
    if (len == 10) {
        return mode != DT_FULL;
    }
    if (mode == DT_DATE || s[10] != 'T') {
        return false;
    }
    size_t used = parse_time(s + 11, len - 11, &h, &mi, &sec, &frac);
    if (used == 0) {
        return false;
    }
    const char *tz = s + 11 + used;
    size_t tzlen = len - 11 - used;
    int offset_s = 0;
    if (tzlen == 1 && tz[0] == 'Z') {
        offset_s = 0;
    } else if (tzlen == 6 && (tz[0] == '+' || tz[0] == '-') && tz[3] == ':') {
        int oh, om;
        if (!digits(tz + 1, 2, &oh) || !digits(tz + 4, 2, &om) || om > 59 || oh > 14 ||
            (oh == 14 && om != 0)) {
            return false;
        }
        offset_s = (oh * 3600 + om * 60) * (tz[0] == '-' ? -1 : 1);
    } else {
        return false; /* a time needs a time zone */
    }
    if (unix_s != NULL) {
        *unix_s = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset_s;
        *nsec = frac;
    }
    return true;
}

/* ---- top-level elements ------------------------------------------------------------------- */

static bool is_fhir_id(const char *s, size_t len)
{
    if (len == 0 || len > 64) {
        return false;
    }
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.')) {
            return false;
        }
    }
    return true;
}

/* A required string element: NULL (with an issue) when missing, not a string or empty.
 * *len (if not NULL) gets its length. */
static const char *need_string(walk *w, const json_t *obj, const char *key, const char *path,
                               size_t *len)
{
    json_t *v = json_object_get(obj, key);
    if (v == NULL) {
        report(w, TH_FHIR_ISSUE_REQUIRED, NULL, path, "%s is missing", path + 1);
        return NULL;
    }
    if (!json_is_string(v)) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, NULL, path, "%s must be a string", path + 1);
        return NULL;
    }
    if (json_string_length(v) == 0) {
        report(w, TH_FHIR_ISSUE_VALUE, NULL, path, "%s must not be empty", path + 1);
        return NULL;
    }
    if (len != NULL) {
        *len = json_string_length(v);
    }
    return json_string_value(v);
}

static void check_header(walk *w, const th_qreg *reg, const json_t *root, const th_qr_options *opts)
{
    th_qr_fields *f = &w->qr->fields;
    const char *rt = need_string(w, root, "resourceType", ".resourceType", NULL);
    if (rt != NULL && strcmp(rt, "QuestionnaireResponse") != 0) {
        report(w, TH_FHIR_ISSUE_INVALID, NULL, ".resourceType",
               "resourceType must be QuestionnaireResponse");
    }

    f->questionnaire = need_string(w, root, "questionnaire", ".questionnaire", NULL);
    if (f->questionnaire != NULL && th_qreg_find(reg, f->questionnaire, &f->instrument) != TH_OK) {
        report(w, TH_FHIR_ISSUE_NOT_FOUND, NULL, ".questionnaire",
               "questionnaire is not a Questionnaire known here (GET /fhir/Questionnaire "
               "lists them)");
    }

    static const struct {
        const char *code;
        th_qr_status status;
    } statuses[] = {{"completed", TH_QR_STATUS_COMPLETED},
                    {"amended", TH_QR_STATUS_AMENDED},
                    {"in-progress", TH_QR_STATUS_IN_PROGRESS},
                    {"entered-in-error", TH_QR_STATUS_ENTERED_IN_ERROR},
                    {"stopped", TH_QR_STATUS_STOPPED}};
    const char *status = need_string(w, root, "status", ".status", NULL);
    if (status != NULL) {
        size_t i;
        for (i = 0; i < sizeof(statuses) / sizeof(statuses[0]); i++) {
            if (strcmp(status, statuses[i].code) == 0) {
                f->status = statuses[i].status;
                break;
            }
        }
        if (i == sizeof(statuses) / sizeof(statuses[0])) {
            report(w, TH_FHIR_ISSUE_VALUE, NULL, ".status",
                   "status is not a QuestionnaireResponse status code");
        } else if (f->status != TH_QR_STATUS_COMPLETED && f->status != TH_QR_STATUS_AMENDED) {
            report(w, TH_FHIR_ISSUE_BUSINESS_RULE, NULL, ".status",
                   "status must be completed or amended, not %s", statuses[i].code);
        }
    }

    json_t *subject = json_object_get(root, "subject");
    if (subject == NULL) {
        report(w, TH_FHIR_ISSUE_REQUIRED, NULL, ".subject", "subject is missing");
    } else if (!json_is_object(subject)) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, NULL, ".subject", "subject must be a Reference");
    } else {
        size_t len = 0;
        const char *ref = need_string(w, subject, "reference", ".subject.reference", &len);
        if (ref != NULL) {
            if (len > 8 && memcmp(ref, "Patient/", 8) == 0 && is_fhir_id(ref + 8, len - 8)) {
                f->patient_id = ref + 8;
            } else {
                report(w, TH_FHIR_ISSUE_INVALID, NULL, ".subject.reference",
                       "subject.reference must be Patient/<id> (id: 1 to 64 of A-Z a-z 0-9 "
                       "- .)");
            }
        }
    }

    size_t authored_len = 0;
    const char *authored = need_string(w, root, "authored", ".authored", &authored_len);
    if (authored != NULL) {
        size_t len = authored_len;
        int64_t secs;
        uint32_t nsec;
        if (!parse_datetime(authored, len, DT_FULL, &secs, &nsec)) {
            report(w, TH_FHIR_ISSUE_VALUE, NULL, ".authored",
                   "authored must be a dateTime with seconds and a time zone, e.g. "
                   "2026-11-02T09:30:00+01:00");
        } else {
            int64_t limit = opts->now_unix_ns;
            if (opts->max_future_skew_ns > 0) {
                limit = limit > INT64_MAX - opts->max_future_skew_ns
                            ? INT64_MAX
                            : limit + opts->max_future_skew_ns;
            }
            int64_t limit_s = limit / 1000000000;
            int64_t limit_ns = limit % 1000000000;
            if (limit_ns < 0) {
                limit_s--, limit_ns += 1000000000;
            }
            if (secs > limit_s || (secs == limit_s && nsec > limit_ns)) {
                report(w, TH_FHIR_ISSUE_BUSINESS_RULE, NULL, ".authored",
                       "authored is in the future");
            } else {
                f->authored = authored;
                f->authored_unix_s = secs;
                f->authored_nsec = nsec;
            }
        }
    }

    json_t *ident = json_object_get(root, "identifier");
    if (ident != NULL) {
        if (!json_is_object(ident)) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, NULL, ".identifier",
                   "identifier must be one Identifier object (0..1 in R4)");
        } else {
            const char *system = need_string(w, ident, "system", ".identifier.system", NULL);
            const char *value = need_string(w, ident, "value", ".identifier.value", NULL);
            if (system != NULL && value != NULL) {
                f->identifier_system = system;
                f->identifier_value = value;
            }
        }
    }

    f->visit_week = -1;
    json_t *exts = json_object_get(root, "extension");
    if (exts != NULL && !json_is_array(exts)) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, NULL, ".extension", "extension must be an array");
    }
    size_t i;
    json_t *e;
    bool seen = false;
    json_array_foreach(exts, i, e)
    {
        json_t *url = json_object_get(e, "url");
        if (!json_is_string(url) || strcmp(json_string_value(url), VISIT_WEEK_URL) != 0) {
            continue;
        }
        push(w, "extension", i);
        json_t *v = json_object_get(e, "valueInteger");
        if (seen) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, NULL, NULL,
                   "the visit-week extension appears more than once");
        } else if (!json_is_integer(v)) {
            report(w, TH_FHIR_ISSUE_VALUE, NULL, ".valueInteger",
                   "the visit-week extension needs a valueInteger");
        } else if (json_integer_value(v) < 0 || json_integer_value(v) > VISIT_WEEK_MAX) {
            report(w, TH_FHIR_ISSUE_VALUE, NULL, ".valueInteger",
                   "visit-week must be between 0 and %d", VISIT_WEEK_MAX);
        } else {
            f->visit_week = (int)json_integer_value(v);
        }
        seen = true;
        pop(w);
    }
}

/* ---- items and answers -------------------------------------------------------------------- */

/* suffix: the element name after "value"; path: what an issue's expression ends with. */
#define VK(name, kind)            \
    {                             \
        name, ".value" name, kind \
    }
static const struct {
    const char *suffix;
    const char *path;
    unsigned kind;
} value_kinds[] = {
    VK("Coding", TH__V_CODING),     VK("Integer", TH__V_INTEGER),
    VK("Decimal", TH__V_DECIMAL),   VK("String", TH__V_STRING),
    VK("Boolean", TH__V_BOOLEAN),   VK("Date", TH__V_DATE),
    VK("DateTime", TH__V_DATETIME), VK("Time", TH__V_TIME),
    VK("Uri", TH__V_URI),           VK("Attachment", TH__V_ATTACHMENT),
    VK("Quantity", TH__V_QUANTITY), VK("Reference", TH__V_REFERENCE),
};
#undef VK

#define NKINDS (sizeof(value_kinds) / sizeof(value_kinds[0]))

static unsigned kind_of(const char *suffix, size_t *index)
{
    for (size_t i = 0; i < NKINDS; i++) {
        if (strcmp(suffix, value_kinds[i].suffix) == 0) {
            *index = i;
            return value_kinds[i].kind;
        }
    }
    return 0;
}

/* "valueCoding or valueString" for a set of kinds. */
static void kinds_text(unsigned kinds, char *buf, size_t cap)
{
    size_t n = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < NKINDS && n < cap; i++) {
        if (kinds & value_kinds[i].kind) {
            n += (size_t)snprintf(buf + n, cap - n, "%svalue%s", n > 0 ? " or " : "",
                                  value_kinds[i].suffix);
        }
    }
    if (n == 0) {
        snprintf(buf, cap, "no answer");
    }
}

static size_t utf8_chars(const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        n += ((unsigned char)s[i] & 0xC0) != 0x80;
    }
    return n;
}

/* The option an answer matches, or NULL; for codings, system (may be NULL) and code are the
 * answer's. */
static const th__option *match_option(const th__item *it, unsigned kind, const json_t *val,
                                      const char *system, const char *code)
{
    const char *str = kind == TH__V_CODING || kind == TH__V_INTEGER ? NULL : json_string_value(val);
    json_int_t integer = kind == TH__V_INTEGER ? json_integer_value(val) : 0;
    for (size_t i = 0; i < it->noptions; i++) {
        const th__option *o = &it->options[i];
        if (o->kind != kind) {
            continue;
        }
        switch (kind) {
        case TH__V_CODING:
            if ((o->code == NULL || strcmp(o->code, code) == 0) &&
                (o->system == NULL || (system != NULL && strcmp(o->system, system) == 0))) {
                return o;
            }
            break;
        case TH__V_INTEGER:
            if (o->integer == integer) {
                return o;
            }
            break;
        default:
            if (str != NULL && o->str != NULL && strcmp(o->str, str) == 0) {
                return o;
            }
            break;
        }
    }
    return NULL;
}

/* Validates one answer and records its weight or number in st; *nested gets its answer.item. */
static void validate_answer(walk *w, const json_t *ans, const th__item *it, th__item_state *st,
                            json_t **nested)
{
    const char *lid = it->link_id;
    *nested = NULL;
    if (!json_is_object(ans)) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, it, NULL, "answer to '%s' must be an object", lid);
        return;
    }
    unsigned kind = 0;
    size_t kind_index = 0;
    int nvalues = 0;
    bool unknown = false;
    json_t *val = NULL;
    FOR_MEMBERS(ans, iter)
    {
        const char *key = json_object_iter_key(iter);
        if (strncmp(key, "value", 5) == 0) {
            nvalues++;
            kind = kind_of(key + 5, &kind_index);
            unknown |= kind == 0;
            val = json_object_iter_value(iter);
        } else if (strcmp(key, "item") == 0) {
            *nested = json_object_iter_value(iter);
        }
    }
    if (nvalues == 0) {
        report(w, TH_FHIR_ISSUE_REQUIRED, it, NULL, "answer to '%s' has no value[x]", lid);
        return;
    }
    if (nvalues > 1 || unknown) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, it, NULL,
               "answer to '%s' must have exactly one value[x] of a known type", lid);
        return;
    }
    const char *suffix = value_kinds[kind_index].path;
    if ((it->accepts & kind) == 0) {
        char expected[160];
        kinds_text(it->accepts, expected, sizeof(expected));
        report(w, TH_FHIR_ISSUE_VALUE, it, suffix, "answer to '%s' must be %s, not value%s", lid,
               expected, value_kinds[kind_index].suffix);
        return;
    }

    bool is_string = false;
    json_t *code = NULL, *system = NULL;
    switch (kind) {
    case TH__V_CODING: {
        FOR_MEMBERS(val, iter)
        {
            const char *key = json_object_iter_key(iter);
            if (strcmp(key, "code") == 0) {
                code = json_object_iter_value(iter);
            } else if (strcmp(key, "system") == 0) {
                system = json_object_iter_value(iter);
            }
        }
        if (!json_is_object(val) || !json_is_string(code) ||
            (system != NULL && !json_is_string(system))) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, it, suffix,
                   "valueCoding of the answer to '%s' needs a code (and a system)", lid);
            return;
        }
        break;
    }
    case TH__V_INTEGER:
    case TH__V_DECIMAL: {
        if (kind == TH__V_INTEGER ? !json_is_integer(val) : !json_is_number(val)) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, it, suffix, "answer to '%s' must be a JSON %s", lid,
                   kind == TH__V_INTEGER ? "integer" : "number");
            return;
        }
        double x = json_number_value(val);
        if ((it->has_min && x < it->min_value) || (it->has_max && x > it->max_value)) {
            char lo[32] = "-", hi[32] = "-";
            if (it->has_min) {
                snprintf(lo, sizeof(lo), "%g", it->min_value);
            }
            if (it->has_max) {
                snprintf(hi, sizeof(hi), "%g", it->max_value);
            }
            report(w, TH_FHIR_ISSUE_VALUE, it, suffix,
                   "answer to '%s' is outside the allowed range %s..%s", lid, lo, hi);
            return;
        }
        st->number = x;
        st->has_number = true;
        break;
    }
    case TH__V_BOOLEAN:
        if (!json_is_boolean(val)) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, it, suffix, "answer to '%s' must be true or false",
                   lid);
            return;
        }
        break;
    case TH__V_STRING:
    case TH__V_URI:
    case TH__V_DATE:
    case TH__V_DATETIME:
    case TH__V_TIME: {
        if (!json_is_string(val) || json_string_length(val) == 0) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, it, suffix,
                   "answer to '%s' must be a non-empty string", lid);
            return;
        }
        const char *s = json_string_value(val);
        size_t len = json_string_length(val);
        enum dt_mode mode = kind == TH__V_DATE       ? DT_DATE
                            : kind == TH__V_DATETIME ? DT_DATETIME
                                                     : DT_TIME;
        if ((kind == TH__V_DATE || kind == TH__V_DATETIME || kind == TH__V_TIME) &&
            !parse_datetime(s, len, mode, NULL, NULL)) {
            report(w, TH_FHIR_ISSUE_VALUE, it, suffix, "answer to '%s' is not a valid FHIR %s", lid,
                   kind == TH__V_DATE       ? "date"
                   : kind == TH__V_DATETIME ? "dateTime"
                                            : "time");
            return;
        }
        if (kind == TH__V_STRING && it->max_length > 0 &&
            utf8_chars(s, len) > (size_t)it->max_length) {
            report(w, TH_FHIR_ISSUE_TOO_LONG, it, suffix,
                   "answer to '%s' is longer than %ld characters", lid, it->max_length);
            return;
        }
        is_string = kind == TH__V_STRING;
        break;
    }
    default: /* Attachment, Quantity, Reference */
        if (!json_is_object(val)) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, it, suffix, "answer to '%s' must be an object", lid);
            return;
        }
        break;
    }

    /* Allowed answers: free text of an open-choice and references are not matched. */
    bool free_text = is_string && it->type == TH__QT_OPEN_CHOICE;
    if (it->options_closed && !free_text && kind != TH__V_REFERENCE) {
        const th__option *o =
            match_option(it, kind, val, json_string_value(system), json_string_value(code));
        if (o == NULL) {
            report(w, TH_FHIR_ISSUE_CODE_INVALID, it, suffix,
                   "answer to '%s' is not one of the item's allowed answers (system and code "
                   "must match)",
                   lid);
            return;
        }
        if (o->has_weight) {
            st->weight_sum += o->weight;
            st->nweights++;
        }
    }
}

static void walk_items(walk *w, const json_t *items, uint32_t parent, uint32_t instance);

/* Reports required children of an item instance (or of the root) that did not appear. */
static void check_required(walk *w, const uint32_t *children, uint32_t n, uint32_t instance)
{
    const th_fhir_instrument *inst = w->inst;
    for (uint32_t i = 0; i < n; i++) {
        const th__item *it = &inst->items[children[i]];
        const th__item_state *st = &w->qr->state[children[i]];
        if (!it->required || it->enable_when || it->type == TH__QT_DISPLAY) {
            continue;
        }
        bool present = it->type == TH__QT_GROUP ? st->seen_serial == instance
                                                : st->answered_serial == instance;
        if (!present) {
            report(w, TH_FHIR_ISSUE_REQUIRED, it, ".item", "required item '%s' is %s", it->link_id,
                   it->type == TH__QT_GROUP ? "missing" : "not answered");
        }
    }
}

static void validate_item(walk *w, uint32_t q, uint32_t instance, const json_t *answers,
                          const json_t *children)
{
    const th__item *it = &w->inst->items[q];
    th__item_state *st = &w->qr->state[q];
    if (it->type == TH__QT_DISPLAY) {
        return; /* display items carry no answers; apps may echo them */
    }
    if (st->seen_serial == instance && !(it->type == TH__QT_GROUP && it->repeats)) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, it, NULL, "item '%s' appears more than once",
               it->link_id);
    }
    st->seen_serial = instance;
    uint32_t mine = ++w->serial;

    if (it->type == TH__QT_GROUP) {
        if (answers != NULL) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, it, ".answer",
                   "group item '%s' must not have answers", it->link_id);
        }
    } else if (answers != NULL) {
        size_t n = json_array_size(answers);
        if (!json_is_array(answers) || n == 0) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, it, ".answer",
                   "answer of '%s' must be a non-empty array", it->link_id);
        } else {
            if (n > 1 && !it->repeats) {
                report(w, TH_FHIR_ISSUE_STRUCTURE, it, ".answer",
                       "item '%s' has %zu answers but does not repeat", it->link_id, n);
            }
            st->answered_serial = instance;
            for (size_t j = 0; j < n && w->err == TH_OK; j++) {
                json_t *nested;
                push(w, "answer", j);
                validate_answer(w, json_array_get(answers, j), it, st, &nested);
                if (nested != NULL) {
                    /* Each answer of a repeating question is its own instance. */
                    uint32_t owner = it->repeats ? ++w->serial : mine;
                    walk_items(w, nested, q, owner);
                    if (it->repeats) {
                        check_required(w, it->children, it->nchildren, owner);
                    }
                }
                pop(w);
            }
        }
    }
    if (children != NULL) {
        walk_items(w, children, q, mine);
    }
    /* Children are expected when the group is there, or when the question is answered. */
    bool answered = st->answered_serial == instance;
    if (it->nchildren > 0 &&
        (it->type == TH__QT_GROUP || (answered && !(it->repeats && answers != NULL)))) {
        check_required(w, it->children, it->nchildren, mine);
    }
}

static void walk_items(walk *w, const json_t *items, uint32_t parent, uint32_t instance)
{
    const th_fhir_instrument *inst = w->inst;
    const th__item *pit = parent != TH__NO_ITEM ? &inst->items[parent] : NULL;
    if (!json_is_array(items)) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, pit, ".item", "item must be an array");
        return;
    }
    size_t n = json_array_size(items);
    if (n == 0) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, pit, ".item", "item must not be an empty array");
        return;
    }
    if (w->levels >= MAX_LEVELS) {
        report(w, TH_FHIR_ISSUE_TOO_COSTLY, pit, ".item", "items are nested too deeply");
        return;
    }
    if (pit != NULL && pit->nchildren == 0) {
        report(w, TH_FHIR_ISSUE_STRUCTURE, pit, ".item", "item '%s' has no child items",
               pit->link_id);
        return;
    }
    w->levels++;
    for (size_t i = 0; i < n && w->err == TH_OK; i++) {
        json_t *ji = json_array_get(items, i);
        push(w, "item", i);
        json_t *lid = NULL, *answers = NULL, *children = NULL;
        FOR_MEMBERS(ji, iter)
        {
            const char *key = json_object_iter_key(iter);
            if (strcmp(key, "linkId") == 0) {
                lid = json_object_iter_value(iter);
            } else if (strcmp(key, "answer") == 0) {
                answers = json_object_iter_value(iter);
            } else if (strcmp(key, "item") == 0) {
                children = json_object_iter_value(iter);
            }
        }
        if (!json_is_object(ji)) {
            report(w, TH_FHIR_ISSUE_STRUCTURE, NULL, NULL, "item must be an object");
        } else if (!json_is_string(lid)) {
            report(w, TH_FHIR_ISSUE_REQUIRED, NULL, ".linkId", "item has no linkId");
        } else {
            uint32_t q =
                th__instrument_lookup(inst, json_string_value(lid), json_string_length(lid));
            if (q == TH__NO_ITEM) {
                report(w, TH_FHIR_ISSUE_STRUCTURE, NULL, ".linkId",
                       "linkId is not an item of the Questionnaire");
            } else if (inst->items[q].parent != parent) {
                const th__item *it = &inst->items[q];
                if (it->parent == TH__NO_ITEM) {
                    report(w, TH_FHIR_ISSUE_STRUCTURE, it, NULL,
                           "item '%s' belongs at the top level", it->link_id);
                } else {
                    report(w, TH_FHIR_ISSUE_STRUCTURE, it, NULL,
                           "item '%s' belongs under item '%s'", it->link_id,
                           inst->items[it->parent].link_id);
                }
            } else {
                validate_item(w, q, instance, answers, children);
            }
        }
        pop(w);
    }
    w->levels--;
}

/* ---- public API --------------------------------------------------------------------------- */

int th_qr_parse(const th_qreg *reg, const char *body, size_t len, const th_qr_options *opts,
                th_qr **out, th_fhir_parse_error *perr)
{
    if (reg == NULL || (body == NULL && len > 0) || out == NULL) {
        return TH_EINVAL;
    }
    th_qr_options defaults;
    if (opts == NULL) {
        defaults.now_unix_ns = (int64_t)th_clock_wall_ns();
        defaults.max_future_skew_ns = TH_QR_DEFAULT_FUTURE_SKEW_NS;
        opts = &defaults;
    }
    /* Same acceptance, tree and error positions as json_loadb(JSON_REJECT_DUPLICATES). */
    json_t *root = NULL;
    int prc = th__json_parse(body, len, &root, perr);
    if (prc != TH_OK) {
        return prc == TH_EPARSE ? TH_EPARSE : TH_ENOMEM;
    }
    th_qr *qr = th_malloc(sizeof(*qr));
    if (qr == NULL) {
        json_decref(root);
        return TH_ENOMEM;
    }
    memset(qr, 0, offsetof(th_qr, inline_state));
    qr->root = root;
    qr->fields.visit_week = -1;

    walk w = {.qr = qr};
    if (!json_is_object(root)) {
        report(&w, TH_FHIR_ISSUE_STRUCTURE, NULL, NULL,
               "the body must be a JSON object (a FHIR resource)");
    } else {
        check_header(&w, reg, root, opts);
    }
    const th_fhir_instrument *inst = qr->fields.instrument;
    if (inst != NULL && w.err == TH_OK) {
        if (inst->nitems <= TH__QR_INLINE_STATES) {
            qr->state = qr->inline_state;
        } else if ((qr->state = th_malloc(inst->nitems * sizeof(*qr->state))) == NULL) {
            w.err = TH_ENOMEM;
        }
    }
    if (inst != NULL && w.err == TH_OK) {
        memset(qr->state, 0, inst->nitems * sizeof(*qr->state));
        w.inst = inst;
        w.serial = 1; /* the root instance */
        json_t *items = json_object_get(root, "item");
        if (items != NULL) {
            walk_items(&w, items, TH__NO_ITEM, 1);
        }
        check_required(&w, inst->roots, inst->nroots, 1);
    }
    if (w.err != TH_OK) {
        th_qr_destroy(qr);
        return w.err;
    }
    *out = qr;
    return TH_OK;
}

void th_qr_destroy(th_qr *qr)
{
    if (qr == NULL) {
        return;
    }
    json_decref(qr->root);
    th__fhir_issues_clear(&qr->issues);
    if (qr->state != qr->inline_state) {
        th_free(qr->state);
    }
    th_free(qr);
}

const th_qr_fields *th_qr_get_fields(const th_qr *qr)
{
    return &qr->fields;
}

th_fhir_issues *th_qr_issues(th_qr *qr)
{
    return &qr->issues;
}

bool th_qr_valid(const th_qr *qr)
{
    return qr->issues.nerrors == 0;
}

const json_t *th_qr_json(const th_qr *qr)
{
    return qr->root;
}
