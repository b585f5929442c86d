/* FHIR R4 for ePRO: the Questionnaire registry (built-in PHQ-9 and GAD-7, plus Questionnaire,
 * CodeSystem and ValueSet files loaded at start-up), QuestionnaireResponse parsing and
 * validation, scoring from the standard FHIR weights, and OperationOutcome building. Pure
 * library code: no I/O on the request path, no HTTP, no store. See docs/internals/fhir.md. */
#ifndef TRIALHUB_FHIR_H
#define TRIALHUB_FHIR_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/error.h"

#if defined(__GNUC__)
#define TH_FHIR_PRINTF(fmt_index, first_arg) __attribute__((format(printf, fmt_index, first_arg)))
#else
#define TH_FHIR_PRINTF(fmt_index, first_arg)
#endif

/* ==== Issues ================================================================================ */

/* OperationOutcome.issue.severity. */
typedef enum th_fhir_severity {
    TH_FHIR_SEV_FATAL,
    TH_FHIR_SEV_ERROR,
    TH_FHIR_SEV_WARNING,
    TH_FHIR_SEV_INFORMATION
} th_fhir_severity;

/* OperationOutcome.issue.code: the FHIR IssueType codes trialhub uses. XX(NAME, "fhir-code"). */
#define TH_FHIR_ISSUE_TYPE_MAP(XX)     \
    XX(INVALID, "invalid")             \
    XX(STRUCTURE, "structure")         \
    XX(REQUIRED, "required")           \
    XX(VALUE, "value")                 \
    XX(INVARIANT, "invariant")         \
    XX(SECURITY, "security")           \
    XX(LOGIN, "login")                 \
    XX(FORBIDDEN, "forbidden")         \
    XX(PROCESSING, "processing")       \
    XX(NOT_SUPPORTED, "not-supported") \
    XX(DUPLICATE, "duplicate")         \
    XX(NOT_FOUND, "not-found")         \
    XX(TOO_LONG, "too-long")           \
    XX(CODE_INVALID, "code-invalid")   \
    XX(TOO_COSTLY, "too-costly")       \
    XX(BUSINESS_RULE, "business-rule") \
    XX(CONFLICT, "conflict")           \
    XX(TRANSIENT, "transient")         \
    XX(EXCEPTION, "exception")         \
    XX(TIMEOUT, "timeout")             \
    XX(THROTTLED, "throttled")         \
    XX(INFORMATIONAL, "informational")

typedef enum th_fhir_issue_type {
#define TH__FHIR_ISSUE_ENUM(name, code) TH_FHIR_ISSUE_##name,
    TH_FHIR_ISSUE_TYPE_MAP(TH__FHIR_ISSUE_ENUM)
#undef TH__FHIR_ISSUE_ENUM
} th_fhir_issue_type;

/* One problem. All strings are owned by the issue list and live until it is destroyed.
 * diagnostics never contains patient answers, names or free text taken from a submitted
 * resource: only fixed text, linkIds and values from the Questionnaire, counts and JSON paths. */
typedef struct th_fhir_issue {
    th_fhir_severity severity;
    th_fhir_issue_type code;
    const char *diagnostics; /* never NULL */
    const char *expression;  /* FHIRPath location, e.g. "QuestionnaireResponse.item[3]"; or NULL */
    const char *link_id;     /* the Questionnaire item concerned, or NULL */
} th_fhir_issue;

/* An ordered list of issues. At most TH_FHIR_MAX_ISSUES are kept; further ones are counted
 * (th_fhir_issues_omitted) but not stored, so a hostile body cannot make the list grow without
 * bound. */
typedef struct th_fhir_issues th_fhir_issues;

#define TH_FHIR_MAX_ISSUES 100u

/* Creates an empty issue list in *out. Returns 0, TH_EINVAL (out NULL) or TH_ENOMEM (*out
 * untouched). The caller owns the list and frees it with th_fhir_issues_destroy(). */
TH_MUST_CHECK int th_fhir_issues_create(th_fhir_issues **out);

/* Frees the list and every string it owns. NULL is a no-op. */
void th_fhir_issues_destroy(th_fhir_issues *issues);

/* Appends an issue. link_id and expression may be NULL; both are copied. diagnostics is built
 * from fmt (printf-style) and truncated to 480 bytes at a UTF-8 boundary; invalid UTF-8 bytes
 * are replaced by '?'. The caller must not pass patient data (answers, names, free text) in
 * any of them. When the list already holds TH_FHIR_MAX_ISSUES, the issue is only counted.
 * Returns 0, TH_EINVAL (issues or fmt NULL) or TH_ENOMEM (the list is unchanged). Not
 * thread-safe: one thread at a time per list. */
TH_MUST_CHECK int th_fhir_issues_add(th_fhir_issues *issues, th_fhir_severity severity,
                                     th_fhir_issue_type code, const char *link_id,
                                     const char *expression, const char *fmt, ...)
    TH_FHIR_PRINTF(6, 7);

/* Returns the number of stored issues (omitted ones excluded). NULL gives 0. */
size_t th_fhir_issues_count(const th_fhir_issues *issues);

/* Returns stored issue i (0-based, in the order added), or NULL when i is out of range. The
 * pointer is valid until the next th_fhir_issues_add() or the list's destruction. */
const th_fhir_issue *th_fhir_issues_get(const th_fhir_issues *issues, size_t i);

/* Returns the number of issues of severity fatal or error, omitted ones included: a resource
 * is acceptable exactly when this is 0. NULL gives 0. */
size_t th_fhir_issues_errors(const th_fhir_issues *issues);

/* Returns how many issues were counted but not stored because the list was full. */
size_t th_fhir_issues_omitted(const th_fhir_issues *issues);

/* Return the FHIR code for a severity ("error") or an issue type ("code-invalid"); static
 * strings, "unknown" for out-of-range values. Thread-safe. */
const char *th_fhir_severity_name(th_fhir_severity severity);
const char *th_fhir_issue_type_name(th_fhir_issue_type code);

/* ==== OperationOutcome ====================================================================== */

/* Builds an OperationOutcome (resourceType, issue[] with severity, code, diagnostics and
 * expression[]) from issues in *out, a new jansson reference the caller must json_decref(). The
 * linkId of an issue is already part of its diagnostics. When issues were omitted, a last
 * information issue says how many. An empty list gives one "informational" issue, since
 * OperationOutcome.issue is 1..*. Returns 0, TH_EINVAL or TH_ENOMEM (*out untouched).
 * Thread-safe for distinct lists; the list is only read. */
TH_MUST_CHECK int th_fhir_outcome_from_issues(const th_fhir_issues *issues, json_t **out);

/* Builds an OperationOutcome with one issue, for 400/404/409/413/415/503 answers. expression
 * may be NULL. The strings are copied (invalid UTF-8 bytes become '?'); they must not carry
 * patient data. Returns 0, TH_EINVAL (diagnostics or out NULL) or TH_ENOMEM (*out untouched).
 * Thread-safe. */
TH_MUST_CHECK int th_fhir_outcome_single(th_fhir_severity severity, th_fhir_issue_type code,
                                         const char *diagnostics, const char *expression,
                                         json_t **out);

/* Where and why a body is not JSON (filled by th_qr_parse() on TH_EPARSE). message is
 * jansson's text without the "near '<token>'" part, so it never echoes the body. */
typedef struct th_fhir_parse_error {
    int line;        /* 1-based; 0 when not known */
    int column;      /* 1-based, in characters; 0 when not known */
    size_t position; /* bytes from the start of the body */
    char message[160];
} th_fhir_parse_error;

/* Builds the 400 OperationOutcome for a parse error: one error issue of code "structure" whose
 * diagnostics give line, column and message. Same contract as th_fhir_outcome_single(). */
TH_MUST_CHECK int th_fhir_outcome_parse_error(const th_fhir_parse_error *perr, json_t **out);

/* ==== Questionnaire registry ================================================================= */

typedef struct th_qreg th_qreg;

/* One instrument: a compiled Questionnaire. Owned by its registry, immutable, valid until the
 * registry is destroyed; safe to use from any thread. */
typedef struct th_fhir_instrument th_fhir_instrument;

/* Instruments whose severity bands and safety alert trialhub knows, recognised by
 * Questionnaire.code (LOINC 44249-1, 69737-5) or by the LOINC canonical. */
typedef enum th_fhir_scale {
    TH_FHIR_SCALE_OTHER,
    TH_FHIR_SCALE_PHQ9,
    TH_FHIR_SCALE_GAD7
} th_fhir_scale;

typedef enum th_fhir_score_kind {
    TH_FHIR_SCORE_NONE, /* the instrument defines no score */
    TH_FHIR_SCORE_SUM,  /* sum of the answers' weights */
    TH_FHIR_SCORE_MEAN  /* mean of the answered items' weights */
} th_fhir_score_kind;

/* Creates a registry holding the built-in PHQ-9 (http://loinc.org/q/44249-1) and GAD-7
 * (http://loinc.org/q/69737-5), compiled from the Questionnaire JSON embedded in the library.
 * Also seeds jansson's hash function, so call it before other threads use jansson.
 * Returns 0, TH_EINVAL (out NULL) or TH_ENOMEM (*out untouched). The caller owns the registry.
 * Not thread-safe while loading; once loading is done the registry is immutable and every
 * const function below may be called from any number of threads at once. */
TH_MUST_CHECK int th_qreg_create(th_qreg **out);

/* Frees the registry and all its instruments. No other thread may use it any more; every
 * th_qr parsed against it must already be destroyed. NULL is a no-op. */
void th_qreg_destroy(th_qreg *reg);

/* Loads every "*.json" file of directory dir (not recursive, sorted by name, dot-files
 * skipped; TRIALHUB_QUESTIONNAIRES), each holding one Questionnaire, CodeSystem or ValueSet,
 * or a Bundle of them; other resource types (e.g. example responses) are skipped. CodeSystems and
 * ValueSets of the same call are available to its Questionnaires whatever the file order. All or
 * nothing: on any error nothing of the directory is added. On error, err (if not NULL, errlen > 0)
 * receives one line naming the file and the problem, e.g. "dir/x.json: item 'q1': unknown item type
 * 'foo'" (there is no patient data in these files). Returns 0, TH_EINVAL (bad arguments or
 * resource), TH_EPARSE (not JSON; the message has line and column), TH_EEXIST (a url|version or id
 * already loaded), TH_ENOTFOUND (dir missing), TH_EIO (unreadable or larger than 16 MiB),
 * TH_ENOMEM. Not thread-safe: call before the registry is shared. */
TH_MUST_CHECK int th_qreg_load_dir(th_qreg *reg, const char *dir, char *err, size_t errlen);

/* Loads one resource (or Bundle) from memory; name is used in error messages only. Same
 * contract and return codes as th_qreg_load_dir(); data is copied as needed, the caller keeps
 * it. */
TH_MUST_CHECK int th_qreg_load_buffer(th_qreg *reg, const char *name, const char *data, size_t len,
                                      char *err, size_t errlen);

/* Finds the instrument for a canonical as a QuestionnaireResponse sends it: "url" or
 * "url|version". The exact url|version wins when loaded; otherwise any version with the same
 * url is accepted (the first one loaded, built-ins first), because apps pin versions that
 * differ from the one a server holds. Returns 0 with *out set, TH_ENOTFOUND, or TH_EINVAL.
 * Thread-safe; does not allocate. */
TH_MUST_CHECK int th_qreg_find(const th_qreg *reg, const char *canonical,
                               const th_fhir_instrument **out);

/* Returns the number of instruments and instrument i (0-based, load order, built-ins first;
 * NULL when out of range). Thread-safe. */
size_t th_qreg_count(const th_qreg *reg);
const th_fhir_instrument *th_qreg_get(const th_qreg *reg, size_t i);

/* Gives the searchset Bundle of every Questionnaire, as served by GET /fhir/Questionnaire:
 * compact JSON, rendered once when loading ends. *json is NUL-terminated and points into the
 * registry, valid until th_qreg_destroy(); *len excludes the NUL. Thread-safe. */
void th_qreg_bundle(const th_qreg *reg, const char **json, size_t *len);

/* Instrument accessors. The strings belong to the registry. Thread-safe. */
const char *th_fhir_instrument_url(const th_fhir_instrument *inst);
const char *th_fhir_instrument_version(const th_fhir_instrument *inst); /* NULL if none */
const char *th_fhir_instrument_id(const th_fhir_instrument *inst);      /* NULL if none */
const char *th_fhir_instrument_title(const th_fhir_instrument *inst);   /* NULL if none */
bool th_fhir_instrument_builtin(const th_fhir_instrument *inst);
th_fhir_scale th_fhir_instrument_scale(const th_fhir_instrument *inst);
/* How the instrument is scored and over how many items (0 for TH_FHIR_SCORE_NONE). */
th_fhir_score_kind th_fhir_instrument_score_kind(const th_fhir_instrument *inst);
size_t th_fhir_instrument_scored_items(const th_fhir_instrument *inst);

/* ==== QuestionnaireResponse ================================================================== */

typedef struct th_qr th_qr;

typedef enum th_qr_status {
    TH_QR_STATUS_UNKNOWN, /* missing or not a QuestionnaireResponse status code */
    TH_QR_STATUS_IN_PROGRESS,
    TH_QR_STATUS_COMPLETED,
    TH_QR_STATUS_AMENDED,
    TH_QR_STATUS_ENTERED_IN_ERROR,
    TH_QR_STATUS_STOPPED
} th_qr_status;

/* Validation settings. now_unix_ns is the wall clock (th_clock_wall_ns()); an authored time
 * later than now_unix_ns + max_future_skew_ns is in the future. */
typedef struct th_qr_options {
    int64_t now_unix_ns;
    int64_t max_future_skew_ns;
} th_qr_options;

/* Skew allowed when th_qr_parse() is given no options: phones' clocks run a little fast. */
#define TH_QR_DEFAULT_FUTURE_SKEW_NS (INT64_C(300) * 1000000000)

/* What the store needs from a response. Strings point into the parsed document (no copies)
 * and live as long as the th_qr; a field is NULL (or -1, 0) when absent or invalid, and then
 * there is an issue about it. */
typedef struct th_qr_fields {
    const char *questionnaire;            /* canonical as sent, "url" or "url|version" */
    const th_fhir_instrument *instrument; /* matched instrument, NULL if unknown */
    const char *identifier_system;        /* Identifier.system, NULL if no identifier */
    const char *identifier_value;         /* Identifier.value */
    const char *patient_id;               /* <id> of subject.reference "Patient/<id>" */
    const char *authored;                 /* original string */
    int64_t authored_unix_s;              /* authored as Unix seconds (UTC) */
    uint32_t authored_nsec;               /* fraction of the second, 0..999999999 */
    th_qr_status status;
    int visit_week; /* visit-week extension, -1 when absent */
} th_qr_fields;

/* Parses body (len bytes, need not be NUL-terminated; not retained) as JSON with duplicate
 * keys rejected, and validates it as a QuestionnaireResponse against reg. Every problem is
 * collected (up to TH_FHIR_MAX_ISSUES), never only the first: wrong resourceType, unknown
 * questionnaire, status other than completed/amended, subject not "Patient/<id>", authored
 * missing or not a dateTime with seconds and time zone or in the future, identifier without
 * system or value, bad visit-week extension, unknown linkIds, items out of place or repeated,
 * required items missing, too many answers, wrong answer types, codes not allowed, values out
 * of range or too long. Display items are ignored; nested items are walked.
 *
 * Returns 0 with *out set when the body is JSON, whether or not it is valid: check
 * th_qr_valid() (or th_fhir_issues_errors(th_qr_issues(qr))) after adding your own issues
 * (e.g. the enrolment check) with th_fhir_issues_add(). Returns TH_EPARSE when the body is not
 * JSON (or has a duplicate key, a NUL in a string, a number out of range): *perr (if not NULL)
 * gets line, column and message for a 400. Other returns: TH_EINVAL, TH_ENOMEM. On error *out
 * is untouched. opts may be NULL: the wall clock and TH_QR_DEFAULT_FUTURE_SKEW_NS. The caller
 * owns *out and frees it with th_qr_destroy() before destroying reg. Thread-safe: any number of
 * threads may parse against one registry at once. */
TH_MUST_CHECK int th_qr_parse(const th_qreg *reg, const char *body, size_t len,
                              const th_qr_options *opts, th_qr **out, th_fhir_parse_error *perr);

/* Frees a parsed response, its document and its issues. NULL is a no-op. */
void th_qr_destroy(th_qr *qr);

/* Returns the extracted fields; valid until th_qr_destroy(). */
const th_qr_fields *th_qr_get_fields(const th_qr *qr);

/* Returns the response's issue list, owned by qr; the caller may add issues to it. */
th_fhir_issues *th_qr_issues(th_qr *qr);

/* Returns true when the response has no fatal or error issue (including ones the caller
 * added). */
bool th_qr_valid(const th_qr *qr);

/* Returns the parsed document, borrowed: valid until th_qr_destroy(), do not modify it. */
const json_t *th_qr_json(const th_qr *qr);

/* ==== Scoring =============================================================================== */

/* A response's score. Bands and the alert apply to PHQ-9 and GAD-7 only:
 * PHQ-9 total 0-27: 0-4 minimal, 5-9 mild, 10-14 moderate, 15-19 moderately severe, 20-27
 * severe; alert when item 9 (LOINC 44260-8) is above 0. GAD-7 total 0-21: 0-4 minimal, 5-9
 * mild, 10-14 moderate, 15-21 severe. */
typedef struct th_fhir_score {
    th_fhir_score_kind kind;
    double value;          /* 0 for TH_FHIR_SCORE_NONE */
    bool is_integer;       /* value has no fractional part */
    bool complete;         /* every scored item has a weighted answer */
    unsigned answered;     /* scored items with a weighted answer */
    unsigned expected;     /* scored items of the instrument */
    const char *band;      /* static string ("mild"...), NULL when none or incomplete */
    bool alert;            /* safety alert (PHQ-9 item 9 > 0) */
    bool has_app_score;    /* the response carries the app's own total (e.g. *-score-total) */
    double app_score;      /* that total, as sent */
    bool app_score_agrees; /* |app_score - value| < 1e-6 */
} th_fhir_score;

/* Scores qr, parsed against inst (th_qr_get_fields(qr)->instrument), into *out. Meant for
 * valid responses; invalid answers are not counted. A partial response is scored over the
 * answered items with complete = false and no band; the alert is raised whenever item 9 is
 * answered above 0. Returns 0, or TH_EINVAL (NULL argument, or inst is not qr's instrument).
 * Does not allocate. Thread-safe for distinct qr; qr is only read. */
TH_MUST_CHECK int th_fhir_score_compute(const th_fhir_instrument *inst, const th_qr *qr,
                                        th_fhir_score *out);

/* Returns "none", "sum" or "mean". */
const char *th_fhir_score_kind_name(th_fhir_score_kind kind);

#endif
