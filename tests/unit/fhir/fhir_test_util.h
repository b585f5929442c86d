/* Helpers shared by the FHIR unit tests: fixture files, a registry with the MII instruments,
 * PHQ-9/GAD-7 responses built from weights, and issue lookups. Header-only (static inline). */
#ifndef TRIALHUB_FHIR_TEST_UTIL_H
#define TRIALHUB_FHIR_TEST_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trialhub/fhir.h"

#ifndef TH_TEST_FHIR_DATA
#error "TH_TEST_FHIR_DATA must name tests/data/fhir"
#endif

#define TU_MII_DIR TH_TEST_FHIR_DATA "/mii"

/* 2026-12-01T00:00:00Z: the tests' "now", after every fixture's authored time. */
#define TU_NOW_S INT64_C(1796083200)

static inline th_qr_options tu_opts(void)
{
    th_qr_options o = {.now_unix_ns = TU_NOW_S * 1000000000, .max_future_skew_ns = 0};
    return o;
}

/* Reads TH_TEST_FHIR_DATA/rel into a NUL-terminated malloc'd buffer. */
static inline char *tu_read(const char *rel, size_t *len)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", TH_TEST_FHIR_DATA, rel);
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fail_msg("cannot open %s", path);
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)size + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    buf[size] = '\0';
    if (len != NULL) {
        *len = (size_t)size;
    }
    return buf;
}

static inline th_qreg *tu_registry(bool with_mii)
{
    th_qreg *reg = NULL;
    assert_int_equal(th_qreg_create(&reg), TH_OK);
    if (with_mii) {
        char err[512];
        int rc = th_qreg_load_dir(reg, TU_MII_DIR, err, sizeof(err));
        if (rc != TH_OK) {
            fail_msg("load_dir: %s: %s", th_errname(rc), err);
        }
    }
    return reg;
}

static inline void tu_print_issues(th_qr *qr)
{
    th_fhir_issues *is = th_qr_issues(qr);
    for (size_t i = 0; i < th_fhir_issues_count(is); i++) {
        const th_fhir_issue *x = th_fhir_issues_get(is, i);
        print_message("  issue %zu: %s %s [%s] linkId=%s: %s\n", i,
                      th_fhir_severity_name(x->severity), th_fhir_issue_type_name(x->code),
                      x->expression ? x->expression : "-", x->link_id ? x->link_id : "-",
                      x->diagnostics);
    }
}

/* Parses json (NUL-terminated) with the tests' options; fails the test on anything but TH_OK. */
static inline th_qr *tu_parse(const th_qreg *reg, const char *json)
{
    th_qr_options o = tu_opts();
    th_qr *qr = NULL;
    th_fhir_parse_error perr;
    int rc = th_qr_parse(reg, json, strlen(json), &o, &qr, &perr);
    if (rc != TH_OK) {
        fail_msg("th_qr_parse: %s (line %d col %d: %s)", th_errname(rc), perr.line, perr.column,
                 perr.message);
    }
    return qr;
}

/* Asserts that qr has no issues at all (printing them when it has). */
static inline void tu_assert_clean(th_qr *qr)
{
    if (th_fhir_issues_count(th_qr_issues(qr)) != 0) {
        tu_print_issues(qr);
        fail_msg("expected no issues");
    }
    assert_true(th_qr_valid(qr));
}

/* Finds an issue with this code whose linkId and expression match (NULL: any). */
static inline const th_fhir_issue *tu_find(th_qr *qr, th_fhir_issue_type code, const char *link_id,
                                           const char *expression)
{
    th_fhir_issues *is = th_qr_issues(qr);
    for (size_t i = 0; i < th_fhir_issues_count(is); i++) {
        const th_fhir_issue *x = th_fhir_issues_get(is, i);
        if (x->code != code) {
            continue;
        }
        if (link_id != NULL && (x->link_id == NULL || strcmp(x->link_id, link_id) != 0)) {
            continue;
        }
        if (expression != NULL &&
            (x->expression == NULL || strcmp(x->expression, expression) != 0)) {
            continue;
        }
        return x;
    }
    return NULL;
}

static inline void tu_expect(th_qr *qr, th_fhir_issue_type code, const char *link_id,
                             const char *expression)
{
    if (tu_find(qr, code, link_id, expression) == NULL) {
        tu_print_issues(qr);
        fail_msg("missing issue %s linkId=%s expression=%s", th_fhir_issue_type_name(code),
                 link_id ? link_id : "*", expression ? expression : "*");
    }
    assert_false(th_qr_valid(qr));
}

static const char *const tu_phq9_links[9] = {"44250-9", "44255-8", "44259-0", "44254-1", "44251-7",
                                             "44258-2", "44252-5", "44253-3", "44260-8"};
static const char *const tu_gad7_links[7] = {"69725-0", "68509-9", "69733-4", "69734-2",
                                             "69735-9", "69689-8", "69736-7"};
static const char *const tu_answer_codes[4] = {"LA6568-5", "LA6569-3", "LA6570-1", "LA6571-9"};

/* Builds a response to the built-in PHQ-9 (n = 9) or GAD-7 (n = 7) with the given weights
 * (0..3; -1 leaves the item out). extra_items is appended inside "item" (may be ""), extra_top
 * after "authored" (may be ""). Returns a malloc'd string. */
static inline char *tu_response(int n, const int *weights, const char *extra_items,
                                const char *extra_top)
{
    const char *const *links = n == 9 ? tu_phq9_links : tu_gad7_links;
    const char *canonical = n == 9 ? "http://loinc.org/q/44249-1" : "http://loinc.org/q/69737-5";
    size_t cap = 8192 + strlen(extra_items) + strlen(extra_top);
    char *s = malloc(cap);
    assert_non_null(s);
    int len = snprintf(s, cap,
                       "{\"resourceType\":\"QuestionnaireResponse\",\"questionnaire\":\"%s\","
                       "\"status\":\"completed\",\"subject\":{\"reference\":\"Patient/P001\"},"
                       "\"authored\":\"2026-11-02T09:30:00+01:00\"%s,\"item\":[",
                       canonical, extra_top);
    const char *sep = "";
    for (int i = 0; i < n; i++) {
        if (weights[i] < 0) {
            continue;
        }
        len += snprintf(s + len, cap - (size_t)len,
                        "%s{\"linkId\":\"%s\",\"answer\":[{\"valueCoding\":{\"system\":"
                        "\"http://loinc.org\",\"code\":\"%s\"}}]}",
                        sep, links[i], tu_answer_codes[weights[i]]);
        sep = ",";
    }
    if (extra_items[0] != '\0') {
        len += snprintf(s + len, cap - (size_t)len, "%s%s", sep, extra_items);
    }
    snprintf(s + len, cap - (size_t)len, "]}");
    return s;
}

#endif
