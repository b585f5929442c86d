/* GET /fhir/QuestionnaireResponse: the FHIR search that multi-site collection asks every site for
 * (`_lastUpdated`, `subject`, `questionnaire`, `_count`), answered as a searchset Bundle in
 * keyset pages. The first page fixes the largest row id as the search's bound (`_asof`); every
 * page holds the next matches with `_cursor` < id <= `_asof` in id order, so that paging while
 * new responses arrive neither skips nor repeats a row. Unknown parameters are refused (FHIR's
 * strict handling) unless the client sends `Prefer: handling=lenient`. The key's scope narrows
 * every search: a patient key sees its own responses only. See docs/internals/fhir_search.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/api.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"

#define SEARCH_PATH       "/fhir/QuestionnaireResponse"
#define COUNT_DEFAULT     50
#define COUNT_MAX         500
#define LAST_UPDATED_MAX  8 /* _lastUpdated parameters in one search */
#define QUESTIONNAIRE_MAX 1024
#define SEARCH_TIMEOUT_S  20
#define DATE_PARAM_MAX    48
#define ORIGIN_MAX        272 /* http:// and a Host of up to 255 bytes */

typedef enum total_mode { TOTAL_DEFAULT, TOTAL_NONE, TOTAL_ACCURATE } total_mode;

/* A search as parsed from the query string. Strings point into the request (libmicrohttpd's
 * decoded arguments) or into this struct. */
typedef struct search_params {
    char last_updated[LAST_UPDATED_MAX][DATE_PARAM_MAX]; /* as sent, '+' restored */
    unsigned nlast_updated;
    int64_t from_ms;           /* received_ms >= from_ms; INT64_MIN: none */
    int64_t until_ms;          /* received_ms < until_ms; INT64_MAX: none */
    const char *subject_param; /* as sent: Patient/P001 or P001 */
    const char *patient_id;    /* P001, in patient_buf */
    char patient_buf[TH_ID_MAX + 1];
    char trial_buf[TH_ID_MAX + 1]; /* the subject's trial, for an admin's search */
    const char *questionnaire;
    size_t count;
    bool count_given;
    int64_t cursor; /* 0: first page */
    int64_t asof;   /* 0: not given */
    total_mode total;
    const char *total_param;
    bool lenient;
    char error[192]; /* why the search is refused: never a value the client sent */
} search_params;

/* ---- dates --------------------------------------------------------------------------------- */

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

/* Parses a FHIR search date (YYYY, YYYY-MM, YYYY-MM-DD, or a date with Thh:mm, Thh:mm:ss or
 * Thh:mm:ss.fff and an optional zone Z or +hh:mm / -hh:mm; without a zone, UTC) into the range
 * it covers at its precision, [*lo_ms, *hi_ms): 2026-11-01 is that whole day. */
static bool parse_search_date(const char *s, int64_t *lo_ms, int64_t *hi_ms)
{
    static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    size_t len = strlen(s);
    int y, mo = 1, d = 1, h = 0, mi = 0, sec = 0;
    if (len < 4 || !digits(s, 4, &y) || y == 0) {
        return false;
    }
    if (len == 4) {
        *lo_ms = days_from_civil(y, 1, 1) * 86400000;
        *hi_ms = days_from_civil(y + 1, 1, 1) * 86400000;
        return true;
    }
    if (len < 7 || s[4] != '-' || !digits(s + 5, 2, &mo) || mo < 1 || mo > 12) {
        return false;
    }
    if (len == 7) {
        *lo_ms = days_from_civil(y, mo, 1) * 86400000;
        *hi_ms = days_from_civil(mo == 12 ? y + 1 : y, mo == 12 ? 1 : mo + 1, 1) * 86400000;
        return true;
    }
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (len < 10 || s[7] != '-' || !digits(s + 8, 2, &d) || d < 1 || d > mdays[mo - 1] ||
        (mo == 2 && d == 29 && !leap)) {
        return false;
    }
    int64_t day_ms = days_from_civil(y, mo, d) * 86400000;
    if (len == 10) {
        *lo_ms = day_ms;
        *hi_ms = day_ms + 86400000;
        return true;
    }
    if (s[10] != 'T' || len < 16 || s[13] != ':' || !digits(s + 11, 2, &h) ||
        !digits(s + 14, 2, &mi) || h > 23 || mi > 59) {
        return false;
    }
    size_t i = 16;
    int64_t width_ms = 60000;
    int64_t frac_ms = 0;
    if (i < len && s[i] == ':') {
        if (len < i + 3 || !digits(s + i + 1, 2, &sec) || sec > 59) {
            return false;
        }
        i += 3;
        width_ms = 1000;
        if (i < len && s[i] == '.') {
            i++;
            size_t start = i;
            int64_t scale = 100;
            while (i < len && s[i] >= '0' && s[i] <= '9') {
                /* Stored times have milliseconds: finer digits narrow nothing further. */
                if (scale > 0) {
                    frac_ms += (s[i] - '0') * scale;
                    width_ms = scale;
                    scale /= 10;
                }
                i++;
            }
            if (i == start || i - start > 9) {
                return false;
            }
        }
    }
    int offset_s = 0;
    const char *tz = s + i;
    size_t tzlen = len - i;
    if (tzlen == 1 && tz[0] == 'Z') {
        offset_s = 0;
    } else if (tzlen == 6 && (tz[0] == '+' || tz[0] == '-') && tz[3] == ':') {
        int oh, om;
        if (!digits(tz + 1, 2, &oh) || !digits(tz + 4, 2, &om) || om > 59 || oh > 14 ||
            (oh == 14 && om != 0)) {
            return false;
        }
        offset_s = (oh * 3600 + om * 60) * (tz[0] == '-' ? -1 : 1);
    } else if (tzlen != 0) {
        return false;
    }
    *lo_ms = day_ms + ((int64_t)h * 3600 + mi * 60 + sec - offset_s) * 1000 + frac_ms;
    *hi_ms = *lo_ms + width_ms;
    return true;
}

/* One _lastUpdated value: a prefix (eq when none) and a date, narrowing [from, until). The
 * stored time is an instant, so gt means after the value's whole range and le up to its end. */
static bool add_last_updated(search_params *sp, const char *value)
{
    if (sp->nlast_updated == LAST_UPDATED_MAX) {
        snprintf(sp->error, sizeof(sp->error), "at most %d _lastUpdated parameters",
                 LAST_UPDATED_MAX);
        return false;
    }
    size_t len = strlen(value);
    if (len >= DATE_PARAM_MAX) {
        snprintf(sp->error, sizeof(sp->error), "_lastUpdated: the value is too long");
        return false;
    }
    /* A '+' in a query string is a space once decoded: a client that did not encode the zone's
     * '+' as %2B meant '+'. */
    char *copy = sp->last_updated[sp->nlast_updated];
    memcpy(copy, value, len + 1);
    if (len >= 6 && copy[len - 6] == ' ') {
        copy[len - 6] = '+';
    }
    const char *date = copy;
    char prefix[3] = "eq";
    if (len >= 2 && copy[0] >= 'a' && copy[0] <= 'z' && copy[1] >= 'a' && copy[1] <= 'z') {
        memcpy(prefix, copy, 2);
        date = copy + 2;
    }
    int64_t lo, hi;
    if (!parse_search_date(date, &lo, &hi)) {
        snprintf(sp->error, sizeof(sp->error),
                 "_lastUpdated: expected a prefix (gt, ge, lt, le, eq or none) and a date such as "
                 "2026-11-01 or 2026-11-01T10:00:00Z");
        return false;
    }
    int64_t from = INT64_MIN, until = INT64_MAX;
    if (strcmp(prefix, "eq") == 0) {
        from = lo;
        until = hi;
    } else if (strcmp(prefix, "ge") == 0) {
        from = lo;
    } else if (strcmp(prefix, "gt") == 0) {
        from = hi;
    } else if (strcmp(prefix, "le") == 0) {
        until = hi;
    } else if (strcmp(prefix, "lt") == 0) {
        until = lo;
    } else {
        snprintf(sp->error, sizeof(sp->error),
                 "_lastUpdated: the prefix must be gt, ge, lt, le or eq (ne, sa, eb and ap are "
                 "not supported)");
        return false;
    }
    sp->from_ms = from > sp->from_ms ? from : sp->from_ms;
    sp->until_ms = until < sp->until_ms ? until : sp->until_ms;
    sp->nlast_updated++;
    return true;
}

/* ---- parameters ---------------------------------------------------------------------------- */

static bool positive_int(const char *s, int64_t max, int64_t *out)
{
    int64_t v = 0;
    size_t n = 0;
    for (; s[n]; n++) {
        if (s[n] < '0' || s[n] > '9' || n == 18) {
            return false;
        }
        v = v * 10 + (s[n] - '0');
    }
    if (n == 0 || v > max) {
        return false;
    }
    *out = v;
    return true;
}

static bool is_id(const char *s)
{
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.' || c == '_')) {
            return false;
        }
    }
    return n > 0 && n <= TH_ID_MAX;
}

/* A parameter name is echoed in an error only when it is short and plain. */
static const char *printable_name(const char *name)
{
    size_t n = 0;
    for (; name[n]; n++) {
        char c = name[n];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.' || c == ':')) {
            return NULL;
        }
    }
    return n > 0 && n <= 40 ? name : NULL;
}

static int once(search_params *sp, bool seen, const char *name)
{
    if (seen) {
        snprintf(sp->error, sizeof(sp->error), "%s may be given once", name);
        return -1;
    }
    return 0;
}

/* th__req_query_each() callback: takes one parameter, or fills sp->error and stops. */
static int take_param(void *arg, const char *name, const char *value)
{
    search_params *sp = arg;
    bool known = strcmp(name, "_lastUpdated") == 0 || strcmp(name, "subject") == 0 ||
                 strcmp(name, "questionnaire") == 0 || strcmp(name, "_count") == 0 ||
                 strcmp(name, "_cursor") == 0 || strcmp(name, "_asof") == 0 ||
                 strcmp(name, "_total") == 0 || strcmp(name, "_format") == 0;
    if (!known) {
        if (sp->lenient) {
            return 0; /* ignored, and left out of the links */
        }
        const char *shown = printable_name(name);
        snprintf(sp->error, sizeof(sp->error),
                 "unknown or unsupported search parameter%s%s%s (supported: _lastUpdated, "
                 "subject, questionnaire, _count, _total, _format)",
                 shown ? " '" : "", shown ? shown : "", shown ? "'" : "");
        return -1;
    }
    if (value == NULL || value[0] == '\0') {
        snprintf(sp->error, sizeof(sp->error), "%s needs a value", name);
        return -1;
    }
    if (strcmp(name, "_lastUpdated") == 0) {
        return add_last_updated(sp, value) ? 0 : -1;
    }
    if (strcmp(name, "subject") == 0) {
        if (once(sp, sp->subject_param != NULL, name) != 0) {
            return -1;
        }
        const char *id = strncmp(value, "Patient/", 8) == 0 ? value + 8 : value;
        if (!is_id(id)) {
            snprintf(sp->error, sizeof(sp->error),
                     "subject must be Patient/<id> or <id> (one patient; no lists)");
            return -1;
        }
        sp->subject_param = value;
        snprintf(sp->patient_buf, sizeof(sp->patient_buf), "%s", id);
        sp->patient_id = sp->patient_buf;
        return 0;
    }
    if (strcmp(name, "questionnaire") == 0) {
        if (once(sp, sp->questionnaire != NULL, name) != 0) {
            return -1;
        }
        if (strlen(value) > QUESTIONNAIRE_MAX) {
            snprintf(sp->error, sizeof(sp->error), "questionnaire is too long");
            return -1;
        }
        sp->questionnaire = value;
        return 0;
    }
    if (strcmp(name, "_count") == 0) {
        int64_t n = 0;
        if (once(sp, sp->count_given, name) != 0) {
            return -1;
        }
        if (strcmp(value, "0") != 0 && !positive_int(value, INT64_MAX, &n)) {
            snprintf(sp->error, sizeof(sp->error), "_count must be a whole number (0-%d)",
                     COUNT_MAX);
            return -1;
        }
        /* FHIR lets a server return fewer than asked: larger pages are clamped, and the self
         * link says the _count used. */
        sp->count = n > COUNT_MAX ? COUNT_MAX : (size_t)n;
        sp->count_given = true;
        return 0;
    }
    if (strcmp(name, "_cursor") == 0 || strcmp(name, "_asof") == 0) {
        int64_t *slot = name[1] == 'c' ? &sp->cursor : &sp->asof;
        if (once(sp, *slot != 0, name) != 0) {
            return -1;
        }
        if (!positive_int(value, INT64_MAX, slot) || *slot == 0) {
            snprintf(sp->error, sizeof(sp->error),
                     "%s is not valid: use the next link of the previous page as it is", name);
            return -1;
        }
        return 0;
    }
    if (strcmp(name, "_total") == 0) {
        if (once(sp, sp->total_param != NULL, name) != 0) {
            return -1;
        }
        if (strcmp(value, "none") == 0) {
            sp->total = TOTAL_NONE;
        } else if (strcmp(value, "estimate") == 0 || strcmp(value, "accurate") == 0) {
            sp->total = TOTAL_ACCURATE;
        } else {
            snprintf(sp->error, sizeof(sp->error), "_total must be none, estimate or accurate");
            return -1;
        }
        sp->total_param = value;
        return 0;
    }
    /* _format: JSON is all this server speaks ('+' arrives decoded as a space). */
    if (strcmp(value, "json") != 0 && strcmp(value, "application/json") != 0 &&
        strcmp(value, "application/fhir+json") != 0 &&
        strcmp(value, "application/fhir json") != 0) {
        snprintf(sp->error, sizeof(sp->error), "_format: only json is supported");
        return -1;
    }
    return 0;
}

static bool parse_params(th_req *req, search_params *sp)
{
    memset(sp, 0, sizeof(*sp));
    sp->from_ms = INT64_MIN;
    sp->until_ms = INT64_MAX;
    sp->count = COUNT_DEFAULT;
    const char *prefer = th__req_header(req, "Prefer");
    sp->lenient = prefer && strstr(prefer, "handling=lenient") != NULL;
    if (th__req_query_each(req, take_param, sp) != 0) {
        return false;
    }
    if (sp->cursor && (sp->asof == 0 || sp->cursor >= sp->asof)) {
        snprintf(sp->error, sizeof(sp->error),
                 "_cursor is not valid: use the next link of the previous page as it is");
        return false;
    }
    return true;
}

/* ---- the answer ---------------------------------------------------------------------------- */

/* Appends value percent-encoded for a query string. */
static void put_encoded(th_buf *b, const char *value)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)value; *p; p++) {
        unsigned char c = *p;
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~' || c == ':' || c == '/' || c == '@') {
            th_buf_append(b, &c, 1);
        } else {
            char esc[3] = {'%', hex[c >> 4], hex[c & 15]};
            th_buf_append(b, esc, 3);
        }
    }
}

static void put_param(th_buf *b, const char **sep, const char *name, const char *value)
{
    th_buf_puts(b, *sep);
    th_buf_puts(b, name);
    th_buf_puts(b, "=");
    put_encoded(b, value);
    *sep = "&";
}

/* The server's base for links: http://<Host> when the Host header is a plain host[:port], else
 * "" (the links are then relative to the server, which FHIR clients resolve against their base
 * URL's origin). */
static void make_origin(th_req *req, char origin[ORIGIN_MAX])
{
    origin[0] = '\0';
    const char *host = th__req_header(req, "Host");
    if (host == NULL || host[0] == '\0' || strlen(host) >= ORIGIN_MAX - 8) {
        return;
    }
    for (const char *p = host; *p; p++) {
        char c = *p;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.' || c == ':' || c == '[' || c == ']')) {
            return;
        }
    }
    snprintf(origin, ORIGIN_MAX, "http://%s", host);
}

/* A link of this search: its filters, the _count used, and the page's _cursor / _asof. */
static void put_link(th_buf *b, const search_params *sp, int64_t cursor, int64_t asof)
{
    const char *sep = "";
    th_buf_puts(b, SEARCH_PATH "?");
    for (unsigned i = 0; i < sp->nlast_updated; i++) {
        put_param(b, &sep, "_lastUpdated", sp->last_updated[i]);
    }
    if (sp->subject_param) {
        put_param(b, &sep, "subject", sp->subject_param);
    }
    if (sp->questionnaire) {
        put_param(b, &sep, "questionnaire", sp->questionnaire);
    }
    th_buf_printf(b, "%s_count=%zu", sep, sp->count);
    if (sp->total_param) {
        th_buf_puts(b, "&_total=");
        put_encoded(b, sp->total_param);
    }
    if (cursor > 0) {
        th_buf_printf(b, "&_cursor=%lld", (long long)cursor);
    }
    if (asof > 0) {
        th_buf_printf(b, "&_asof=%lld", (long long)asof);
    }
}

typedef struct search_out {
    th_buf entries;     /* the page's entries as JSON text, comma-separated */
    const char *origin; /* "" or http://host */
    int err;            /* TH_ENOMEM or TH_EPARSE: why building the page stopped */
} search_out;

static int add_entry(void *arg, const th_qr_stored *row)
{
    search_out *out = arg;
    json_t *resource = NULL;
    int rc = th__fhir_qr_resource(row, &resource);
    char *text = rc == 0 ? json_dumps(resource, JSON_COMPACT) : NULL;
    json_decref(resource);
    if (text == NULL) {
        out->err = rc ? rc : TH_ENOMEM;
        return out->err;
    }
    th_buf *b = &out->entries;
    th_buf_puts(b, b->len ? ",{\"fullUrl\":\"" : "{\"fullUrl\":\"");
    th_buf_printf(b, "%s" SEARCH_PATH "/%lld\",\"resource\":", out->origin, (long long)row->id);
    th_buf_puts(b, text);
    th_buf_puts(b, ",\"search\":{\"mode\":\"match\"}}");
    free(text);
    if (th_buf_failed(b)) {
        out->err = TH_ENOMEM;
        return out->err;
    }
    return 0;
}

/* Narrows q to what the key may see, and to the subject's trial (which picks the index).
 * Returns 0, 403 (the subject is outside the key's scope) or 404 (no such patient: the answer
 * is an empty Bundle). */
static unsigned scope_search(th_req *req, search_params *sp, th_qr_search *q)
{
    const th_key *key = &req->key;
    switch (key->role) {
    case TH_ROLE_ADMIN:
        break;
    case TH_ROLE_INVESTIGATOR:
        q->trial_id = key->trial_id;
        break;
    case TH_ROLE_SITE:
        q->trial_id = key->trial_id;
        q->site_id = key->site_id;
        break;
    case TH_ROLE_PATIENT:
        /* Only ever its own responses: another subject is refused whether it exists or not. */
        if (sp->patient_id && strcmp(sp->patient_id, key->patient_id) != 0) {
            return 403;
        }
        q->trial_id = key->trial_id;
        q->patient_id = key->patient_id;
        break;
    default:
        return 403;
    }
    if (sp->patient_id == NULL) {
        return 0;
    }
    q->patient_id = sp->patient_id;
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(th__api_of(req)->cfg->roster, &g);
    if (view == NULL) {
        return 503;
    }
    const th_roster_patient *patient = th_roster_patient_find(view, sp->patient_id);
    unsigned status = 404;
    if (patient) {
        status = th__fhir_scope_for_patient(key, patient->id, patient->trial_id, patient->site_id);
        if (status == 0 && q->trial_id == NULL) {
            /* An admin's search by subject walks one trial's rows, not the whole table (the
             * roster's strings live only as long as the view: copied). */
            snprintf(sp->trial_buf, sizeof(sp->trial_buf), "%s", patient->trial_id);
            q->trial_id = sp->trial_buf;
        }
    }
    th_snapshot_release(&g);
    return status;
}

void th__fhir_qr_search(th_req *req)
{
    th_api *api = th__api_of(req);
    search_params sp;
    if (!parse_params(req, &sp)) {
        th__resp_error(req, 400, sp.error);
        return;
    }
    th_qr_search q = {
        .questionnaire = sp.questionnaire,
        .received_from_ms = sp.from_ms,
        .received_until_ms = sp.until_ms,
        .after_id = sp.cursor,
        .asof_id = sp.asof,
        .limit = sp.count,
        .count = sp.total == TOTAL_ACCURATE || (sp.total == TOTAL_DEFAULT && sp.cursor == 0),
    };
    unsigned status = scope_search(req, &sp, &q);
    if (status == 403) {
        th__resp_error(req, 403, "this key may not read this patient's data");
        return;
    }
    if (status == 503) {
        th__resp_error(req, 503, "out of memory");
        return;
    }
    char origin[ORIGIN_MAX];
    make_origin(req, origin);
    search_out out = {.origin = origin};
    th_buf_init(&out.entries, 0);
    th_qr_page page = {.asof_id = sp.asof, .total = q.count ? 0 : -1};
    int rc = 0;
    /* The range is empty: a patient not in the roster, or a time window that closes itself. */
    if (status != 404 && sp.from_ms < sp.until_ms) {
        th_ctx *ctx = NULL;
        rc = th_ctx_with_timeout(th_ctx_background(), (uint64_t)SEARCH_TIMEOUT_S * TH_NS_PER_S,
                                 &ctx);
        if (rc == 0) {
            rc = th_store_qr_search(ctx, api->cfg->store, &q, add_entry, &out, &page);
            th_ctx_release(ctx);
        }
    }
    if (rc != 0) {
        th_buf_free(&out.entries);
        if (rc == TH_EPARSE) {
            th__resp_error(req, 500, "a stored resource cannot be read");
        } else if (rc == TH_ETIMEDOUT) {
            th__resp_error(req, th__status_for(rc), "the search took too long; narrow it");
        } else {
            th__resp_error(req, 503, "the store cannot be read now");
        }
        return;
    }
    th_buf b;
    th_buf_init(&b, 0);
    th_buf_puts(&b, "{\"resourceType\":\"Bundle\",\"type\":\"searchset\",");
    if (page.total >= 0) {
        th_buf_printf(&b, "\"total\":%lld,", (long long)page.total);
    }
    /* Links hold only characters that need no JSON escaping: put_encoded() made sure. */
    th_buf_puts(&b, "\"link\":[{\"relation\":\"self\",\"url\":\"");
    th_buf_puts(&b, out.origin);
    put_link(&b, &sp, sp.cursor, page.asof_id);
    if (page.more) {
        th_buf_puts(&b, "\"},{\"relation\":\"next\",\"url\":\"");
        th_buf_puts(&b, out.origin);
        put_link(&b, &sp, page.last_id, page.asof_id);
    }
    th_buf_puts(&b, "\"}],\"entry\":[");
    if (out.entries.len > 0) {
        th_buf_append(&b, out.entries.data, out.entries.len);
    }
    th_buf_puts(&b, "]}");
    bool failed = th_buf_failed(&out.entries);
    th_buf_free(&out.entries);
    if (failed) {
        th_buf_free(&b);
        th__resp_error(req, 503, "out of memory");
        return;
    }
    th__resp_buf(req, 200, "application/fhir+json", &b);
}
