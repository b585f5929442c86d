/* Rendering of interim reports (src/trial/render.c) on a report built by hand: 2 arms, 3 sites,
 * weeks 0, 2, 4, PHQ-9 and GAD-7 cells with some NaN statistics. JSON parses and holds the
 * numbers (NaN as null, doubles exact); CSV follows RFC 4180 and defuses formulas; the PDF reads
 * back with pdftotext and runs to more pages for many sites; PNG and SVG charts are 1200x800.
 * Errors leave the output as it was: a canceled context (before and during a render), an
 * output limit, and every allocation failure in turn. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unit/core/test_util.h"
#include "trialhub/ctx.h"
#include "trialhub/report.h"

#define PHQ9 "http://loinc.org/q/44249-1"
#define GAD7 "http://loinc.org/q/69737-5"

#define NCELLS 12 /* 2 instruments x 2 arms x 3 weeks */

typedef struct fixture {
    th_report r;
    const char *arms[2];
    size_t enrolled_by_arm[2];
    th_report_site sites[3];
    th_report_cell cells[NCELLS];
} fixture;

static th_stats stats(size_t n, double mean, double sd, double median, double q1, double q3,
                      double lo, double hi)
{
    return (th_stats){n, mean, sd, median, q1, q3, lo, hi};
}

static th_stats none(void)
{
    return stats(0, NAN, NAN, NAN, NAN, NAN, NAN, NAN);
}

/* n per cell, in cell order (PHQ-9 A 0/2/4, PHQ-9 B, GAD-7 A, GAD-7 B): distinctive numbers that
 * the PDF test looks for. */
static const size_t cell_n[NCELLS] = {137, 121, 1, 142, 118, 97, 135, 120, 88, 139, 115, 0};

static void build(fixture *f)
{
    memset(f, 0, sizeof(*f));
    f->arms[0] = "A";
    f->arms[1] = "B";
    f->enrolled_by_arm[0] = 151;
    f->enrolled_by_arm[1] = 149;
    static const char *const ids[3] = {"S01", "S02", "S03"};
    static const char *const names[3] = {"Berlin Charit\xc3\xa9", "H\xc3\xb4pital \"Nord\", Lyon",
                                         "Leeds General"};
    static const size_t enrolled[3] = {120, 100, 80};
    for (int i = 0; i < 3; i++) {
        th_report_site *s = &f->sites[i];
        s->id = ids[i];
        s->name = names[i];
        s->enrolled = enrolled[i];
        s->alerts = (size_t)(3 - i);
        for (int w = 0; w < 3; w++) {
            s->expected[w] = w == 2 && i == 2 ? 0 : enrolled[i] - (size_t)(10 * w);
            s->received[w] = s->expected[w] ? s->expected[w] - (size_t)(5 * (w + i)) : 0;
        }
    }
    /* Sites 1 and 2 are broken down by arm; site 3 is not (all zero). */
    f->sites[0].enrolled_by_arm[0] = 61;
    f->sites[0].enrolled_by_arm[1] = 59;
    f->sites[1].enrolled_by_arm[0] = 50;
    f->sites[1].enrolled_by_arm[1] = 50;

    static const int weeks[3] = {0, 2, 4};
    for (size_t k = 0; k < NCELLS; k++) {
        th_report_cell *c = &f->cells[k];
        size_t instrument = k / 6, arm = (k / 3) % 2, w = k % 3;
        c->instrument = instrument ? GAD7 : PHQ9;
        c->instrument_name = instrument ? "GAD-7" : "PHQ-9";
        c->arm = f->arms[arm];
        c->week = weeks[w];
        c->expected = 150 - 10 * w;
        c->received = cell_n[k];
        c->alerts = k % 4;
        double base = instrument ? 12.0 : 16.0, drop = arm ? 1.5 : 3.0;
        double mean = base - drop * (double)w;
        size_t n = cell_n[k];
        c->score =
            n == 0   ? none()
            : n == 1 ? stats(1, mean, NAN, mean, mean, mean, NAN, NAN)
                     : stats(n, mean, 4.0, mean + 0.5, mean - 3, mean + 3, mean - 0.7, mean + 0.7);
        c->change = w == 0 || n < 2 ? none()
                                    : stats(n - 2, -drop * (double)w, 3.5, -drop * (double)w, -5, 1,
                                            -drop * (double)w - 0.6, -drop * (double)w + 0.6);
    }
    /* An exact value that %.6g would round: JSON must carry it bit for bit. */
    f->cells[0].score.mean = 50.0 / 3.0;
    /* No visit due at all: completion is null / empty. */
    f->cells[5].expected = 0;

    th_report *r = &f->r;
    r->trial_id = "DEP-01";
    r->trial_name = "Depression Study \xc3\x9c"
                    "ber 2";
    snprintf(r->generated_at, sizeof(r->generated_at), "2024-05-01T12:30:00Z");
    r->responses = 1234;
    r->patients = 300;
    r->alerts = 6;
    r->arms = f->arms;
    r->narms = 2;
    r->enrolled_by_arm = f->enrolled_by_arm;
    r->weeks[0] = 0;
    r->weeks[1] = 2;
    r->weeks[2] = 4;
    r->nweeks = 3;
    r->sites = f->sites;
    r->nsites = 3;
    r->cells = f->cells;
    r->ncells = NCELLS;
}

/* A report with nsites sites (names "Site 1" ...), for paging and cancellation. */
typedef struct big {
    fixture f;
    th_report_site *sites;
    char (*names)[32];
} big;

static void build_big(big *b, size_t nsites)
{
    build(&b->f);
    b->sites = calloc(nsites, sizeof(*b->sites));
    b->names = calloc(nsites, sizeof(*b->names));
    assert_non_null(b->sites);
    assert_non_null(b->names);
    for (size_t i = 0; i < nsites; i++) {
        b->sites[i] = b->f.sites[i % 3];
        snprintf(b->names[i], sizeof(b->names[i]), "Site %zu", i + 1);
        b->sites[i].id = b->names[i];
        b->sites[i].name = b->names[i];
    }
    b->f.r.sites = b->sites;
    b->f.r.nsites = nsites;
}

static void free_big(big *b)
{
    free(b->sites);
    free(b->names);
}

static th_buf render_ok(const th_report *r, th_report_format format, th_report_chart chart)
{
    th_buf out;
    th_buf_init(&out, 0);
    assert_int_equal(th_report_render(NULL, r, format, chart, &out), 0);
    assert_false(th_buf_failed(&out));
    assert_true(out.len > 0);
    return out;
}

/* ---- JSON -------------------------------------------------------------------------------- */

static json_t *at(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (v == NULL) {
        fail_msg("missing key %s", key);
    }
    return v;
}

static void test_json_values(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    th_buf out = render_ok(&f.r, TH_REPORT_JSON, TH_CHART_SCORES);
    json_error_t err;
    json_t *doc = json_loadb(out.data, out.len, 0, &err);
    if (doc == NULL) {
        fail_msg("JSON does not parse: %s at %d: %.80s", err.text, err.position, out.data);
    }
    assert_string_equal(json_string_value(at(doc, "trial")), "DEP-01");
    assert_string_equal(json_string_value(at(doc, "name")), f.r.trial_name);
    assert_string_equal(json_string_value(at(doc, "generated_at")), "2024-05-01T12:30:00Z");
    assert_int_equal(json_integer_value(at(doc, "responses")), 1234);
    assert_int_equal(json_integer_value(at(doc, "patients")), 300);
    assert_int_equal(json_integer_value(at(doc, "alerts")), 6);

    json_t *arms = at(doc, "arms");
    assert_int_equal(json_array_size(arms), 2);
    assert_string_equal(json_string_value(at(json_array_get(arms, 1), "arm")), "B");
    assert_int_equal(json_integer_value(at(json_array_get(arms, 1), "enrolled")), 149);
    json_t *weeks = at(doc, "schedule_weeks");
    assert_int_equal(json_array_size(weeks), 3);
    assert_int_equal(json_integer_value(json_array_get(weeks, 2)), 4);

    json_t *sites = at(doc, "sites");
    assert_int_equal(json_array_size(sites), 3);
    json_t *s2 = json_array_get(sites, 1);
    assert_string_equal(json_string_value(at(s2, "site")), "S02");
    assert_string_equal(json_string_value(at(s2, "name")), "H\xc3\xb4pital \"Nord\", Lyon");
    assert_int_equal(json_integer_value(at(s2, "enrolled")), 100);
    assert_int_equal(json_integer_value(at(s2, "alerts")), 2);
    json_t *visits = at(s2, "visits");
    assert_int_equal(json_array_size(visits), 3);
    json_t *v1 = json_array_get(visits, 1);
    assert_int_equal(json_integer_value(at(v1, "week")), 2);
    assert_int_equal(json_integer_value(at(v1, "expected")), 90);
    assert_int_equal(json_integer_value(at(v1, "received")), 80);
    /* The arm breakdown where the report has one, and only there. */
    assert_int_equal(json_integer_value(at(json_array_get(at(s2, "arms"), 0), "enrolled")), 50);
    assert_null(json_object_get(json_array_get(sites, 2), "arms"));

    json_t *cells = at(doc, "cells");
    assert_int_equal(json_array_size(cells), NCELLS);
    json_t *c0 = json_array_get(cells, 0);
    assert_string_equal(json_string_value(at(c0, "arm")), "A");
    assert_string_equal(json_string_value(at(c0, "instrument")), PHQ9);
    assert_string_equal(json_string_value(at(c0, "instrument_name")), "PHQ-9");
    assert_int_equal(json_integer_value(at(c0, "week")), 0);
    assert_int_equal(json_integer_value(at(c0, "expected")), 150);
    assert_int_equal(json_integer_value(at(c0, "received")), 137);
    assert_true(json_real_value(at(c0, "completion")) == 137.0 / 150.0);
    json_t *score = at(c0, "score");
    assert_int_equal(json_integer_value(at(score, "n")), 137);
    assert_true(json_real_value(at(score, "mean")) == 50.0 / 3.0); /* exact */
    assert_true(json_number_value(at(score, "sd")) == 4.0);
    assert_true(json_number_value(at(score, "iqr")) == 6.0);
    json_t *ci = at(score, "ci95");
    assert_int_equal(json_array_size(ci), 2);
    assert_true(json_number_value(json_array_get(ci, 0)) == 16.0 - 0.7);
    /* NaN is null: no change at week 0, no SD or CI for n = 1, nothing for n = 0. */
    json_t *change = at(c0, "change");
    assert_int_equal(json_integer_value(at(change, "n")), 0);
    assert_true(json_is_null(at(change, "mean")));
    assert_true(json_is_null(json_array_get(at(change, "ci95"), 1)));
    json_t *c2 = at(json_array_get(cells, 2), "score");
    assert_int_equal(json_integer_value(at(c2, "n")), 1);
    assert_true(json_number_value(at(c2, "mean")) == 10.0);
    assert_true(json_is_null(at(c2, "sd")));
    assert_true(json_is_null(json_array_get(at(c2, "ci95"), 0)));
    json_t *c11 = json_array_get(cells, 11);
    assert_string_equal(json_string_value(at(c11, "instrument_name")), "GAD-7");
    assert_true(json_is_null(at(at(c11, "score"), "median")));
    assert_true(json_is_null(at(json_array_get(cells, 5), "completion")));
    json_t *c1 = at(json_array_get(cells, 1), "change");
    assert_true(json_number_value(at(c1, "mean")) == -3.0);
    json_decref(doc);
    th_buf_free(&out);
}

/* ---- CSV --------------------------------------------------------------------------------- */

/* Splits an RFC 4180 record at p (through its CRLF) into fields; returns the next record. */
static const char *csv_record(const char *p, char fields[][128], size_t *nfields)
{
    size_t n = 0, len = 0;
    bool quoted = false;
    for (;; p++) {
        assert_true(*p != '\0'); /* every record ends with CRLF */
        if (quoted) {
            if (*p == '"' && p[1] == '"') {
                fields[n][len++] = '"';
                p++;
            } else if (*p == '"') {
                quoted = false;
            } else {
                fields[n][len++] = *p;
            }
        } else if (*p == '"' && len == 0) {
            quoted = true;
        } else if (*p == ',' || *p == '\r') {
            fields[n++][len] = '\0';
            len = 0;
            if (*p == '\r') {
                assert_int_equal(p[1], '\n');
                *nfields = n;
                return p + 2;
            }
        } else {
            assert_true(*p != '\n' && *p != '"');
            fields[n][len++] = *p;
        }
        assert_true(len < 127 && n < 40);
    }
}

static void test_csv_rows(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    th_buf out = render_ok(&f.r, TH_REPORT_CSV, TH_CHART_SCORES);
    const char *header =
        "trial,arm,instrument,instrument_name,week,expected,received,completion,alerts,n,mean,sd,"
        "median,q1,q3,ci95_low,ci95_high,change_n,change_mean,change_sd,change_median,change_q1,"
        "change_q3,change_ci95_low,change_ci95_high\r\n";
    assert_memory_equal(out.data, header, strlen(header));
    static char fields[40][128];
    size_t nfields, rows = 0;
    const char *p = out.data + strlen(header);
    while (*p) {
        p = csv_record(p, fields, &nfields);
        assert_int_equal(nfields, 25);
        rows++;
        if (rows == 1) {
            assert_string_equal(fields[0], "DEP-01");
            assert_string_equal(fields[3], "PHQ-9");
            assert_string_equal(fields[9], "137");
            assert_string_equal(fields[10], "16.666666666666668"); /* 50/3, exact */
            assert_string_equal(fields[18], "");                   /* no change at week 0 */
        }
        if (rows == 3) {
            assert_string_equal(fields[9], "1");
            assert_string_equal(fields[11], ""); /* no SD for n = 1 */
        }
        if (rows == 2) {
            assert_string_equal(fields[18], "-3"); /* a number: no apostrophe */
        }
        if (rows == 6) {
            assert_string_equal(fields[7], ""); /* nothing due: no completion */
        }
    }
    assert_int_equal(rows, NCELLS);
    th_buf_free(&out);
}

/* Text fields are quoted when needed and defused when a spreadsheet would run them. */
static void test_csv_escapes_text_fields(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    f.r.trial_id = "H\xc3\xb4pital \"Nord\", Lyon";
    f.cells[0].instrument_name = "=HYPERLINK(\"http://x\",\"y\")";
    f.cells[1].arm = "-B";
    f.cells[2].instrument_name = "@SUM(A1)";
    f.cells[3].instrument_name = "+1";
    f.cells[4].instrument_name = "line\nbreak";
    th_buf out = render_ok(&f.r, TH_REPORT_CSV, TH_CHART_SCORES);
    assert_non_null(strstr(out.data, "\r\n\"H\xc3\xb4pital \"\"Nord\"\", Lyon\",A,"));
    assert_non_null(strstr(out.data, ",\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\","));
    assert_non_null(strstr(out.data, ",'-B,"));
    assert_non_null(strstr(out.data, ",'@SUM(A1),"));
    assert_non_null(strstr(out.data, ",'+1,"));
    assert_non_null(strstr(out.data, ",\"line\nbreak\","));
    static char fields[40][128];
    size_t nfields, rows = 0;
    const char *p = out.data;
    while (*p) {
        p = csv_record(p, fields, &nfields);
        assert_int_equal(nfields, 25);
        if (rows == 1) {
            assert_string_equal(fields[0], "H\xc3\xb4pital \"Nord\", Lyon");
            assert_string_equal(fields[3], "'=HYPERLINK(\"http://x\",\"y\")");
        }
        rows++;
    }
    assert_int_equal(rows, NCELLS + 1);
    th_buf_free(&out);
}

/* ---- PDF --------------------------------------------------------------------------------- */

/* pdftotext's text of a PDF (malloc'd), and its page count (form feeds). */
static char *pdf_text(const th_buf *pdf, int *pages)
{
    char path[] = "/tmp/test_render.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, pdf->data, pdf->len), (ssize_t)pdf->len);
    close(fd);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "pdftotext -layout %s - 2>&1", path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 1 << 16, len = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    size_t n;
    while ((n = fread(text + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (cap - len < 4096) {
            cap *= 2;
            text = realloc(text, cap);
            assert_non_null(text);
        }
    }
    text[len] = '\0';
    assert_int_equal(pclose(p), 0);
    unlink(path);
    *pages = 0;
    for (const char *q = text; (q = strchr(q, '\f')) != NULL; q++) {
        (*pages)++;
    }
    return text;
}

/* Whether word appears in text delimited by spaces, line ends or the ends of text. */
static bool has_word(const char *text, const char *word)
{
    size_t n = strlen(word);
    for (const char *p = text; (p = strstr(p, word)) != NULL; p++) {
        bool left = p == text || strchr(" \n\f(/", p[-1]);
        bool right = p[n] == '\0' || strchr(" \n\f)/", p[n]);
        if (left && right) {
            return true;
        }
    }
    return false;
}

static void test_pdf_text(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    th_buf out = render_ok(&f.r, TH_REPORT_PDF, TH_CHART_SCORES);
    assert_memory_equal(out.data, "%PDF-", 5);
    int pages;
    char *text = pdf_text(&out, &pages);
    if (strstr(text, f.r.trial_name) == NULL) {
        fail_msg("trial name missing from:\n%s", text);
    }
    assert_non_null(strstr(text, "DEP-01"));
    assert_non_null(strstr(text, "Berlin Charit\xc3\xa9"));
    assert_non_null(strstr(text, "H\xc3\xb4pital \"Nord\", Lyon"));
    assert_non_null(strstr(text, "2024-05-01T12:30:00Z"));
    assert_true(has_word(text, "1234")); /* responses */
    for (size_t k = 0; k < NCELLS; k++) {
        char n[16];
        snprintf(n, sizeof(n), "%zu", cell_n[k]);
        if (!has_word(text, n)) {
            fail_msg("n = %s missing from:\n%s", n, text);
        }
    }
    assert_non_null(strstr(text, "16.7 (4.0)")); /* PHQ-9, arm A, week 0: mean (SD) */
    assert_non_null(strstr(text, "Safety alerts by site"));
    assert_true(pages >= 2);
    free(text);
    th_buf_free(&out);
}

/* Many sites run to more pages, with nothing drawn off them: the last site is on a page. */
static void test_pdf_many_sites_pages(void **state)
{
    (void)state;
    big b;
    build_big(&b, 150);
    th_buf out = render_ok(&b.f.r, TH_REPORT_PDF, TH_CHART_SCORES);
    int pages;
    char *text = pdf_text(&out, &pages);
    assert_true(pages >= 8);
    assert_non_null(strstr(text, "Site 150"));
    assert_non_null(strstr(text, "sites 145\xe2\x80\x93"
                                 "150 of 150"));
    free(text);
    th_buf_free(&out);
    free_big(&b);
}

/* A bad byte in a name is drawn as '?' instead of failing the document (cairo refuses bad
 * UTF-8 by putting the whole drawing in an error state). */
static void test_pdf_bad_utf8(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    f.sites[2].name = "Bad \xff\xfe name\x01";
    f.arms[1] = "B\xc3";
    th_buf out = render_ok(&f.r, TH_REPORT_PDF, TH_CHART_SCORES);
    int pages;
    char *text = pdf_text(&out, &pages);
    assert_non_null(strstr(text, "Bad ?? name"));
    free(text);
    th_buf_free(&out);
    out = render_ok(&f.r, TH_REPORT_SVG, TH_CHART_ENROLMENT);
    th_buf_free(&out);
}

/* The same report renders to the same bytes (the creation date is the report's). */
static void test_pdf_deterministic(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    th_buf a = render_ok(&f.r, TH_REPORT_PDF, TH_CHART_SCORES);
    th_buf b = render_ok(&f.r, TH_REPORT_PDF, TH_CHART_SCORES);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.data, b.data, a.len);
    th_buf_free(&a);
    th_buf_free(&b);
}

/* ---- PNG and SVG ------------------------------------------------------------------------- */

static uint32_t be32(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

static void test_png_charts(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    for (int chart = TH_CHART_SCORES; chart <= TH_CHART_COMPLETION; chart++) {
        th_buf out = render_ok(&f.r, TH_REPORT_PNG, (th_report_chart)chart);
        assert_true(out.len > 33);
        assert_memory_equal(out.data, "\x89PNG\r\n\x1a\n", 8);
        assert_memory_equal(out.data + 12, "IHDR", 4);
        assert_int_equal(be32(out.data + 16), 1200);
        assert_int_equal(be32(out.data + 20), 800);
        th_buf_free(&out);
    }
}

static void test_svg_charts(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    for (int chart = TH_CHART_SCORES; chart <= TH_CHART_COMPLETION; chart++) {
        th_buf out = render_ok(&f.r, TH_REPORT_SVG, (th_report_chart)chart);
        assert_true(strncmp(out.data, "<?xml", 5) == 0 || strncmp(out.data, "<svg", 4) == 0);
        assert_non_null(strstr(out.data, "<svg"));
        assert_non_null(strstr(out.data, "width=\"1200"));
        assert_non_null(strstr(out.data, "height=\"800"));
        assert_non_null(strstr(out.data, "</svg>"));
        th_buf_free(&out);
    }
}

/* Empty reports (no sites, cells or arms yet) still render. */
static void test_empty_report(void **state)
{
    (void)state;
    th_report r;
    memset(&r, 0, sizeof(r));
    r.trial_id = "EMPTY";
    r.trial_name = "";
    for (int format = TH_REPORT_JSON; format <= TH_REPORT_SVG; format++) {
        for (int chart = TH_CHART_SCORES; chart <= TH_CHART_COMPLETION; chart++) {
            th_buf out = render_ok(&r, (th_report_format)format, (th_report_chart)chart);
            th_buf_free(&out);
        }
    }
}

/* ---- errors ------------------------------------------------------------------------------ */

static void test_invalid_and_media_types(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    th_buf out;
    th_buf_init(&out, 0);
    assert_int_equal(th_report_render(NULL, &f.r, (th_report_format)99, TH_CHART_SCORES, &out),
                     TH_EINVAL);
    assert_int_equal(th_report_render(NULL, &f.r, TH_REPORT_PNG, (th_report_chart)7, &out),
                     TH_EINVAL);
    f.r.nweeks = TH_REPORT_MAX_WEEKS + 1;
    assert_int_equal(th_report_render(NULL, &f.r, TH_REPORT_JSON, TH_CHART_SCORES, &out),
                     TH_EINVAL);
    assert_int_equal(out.len, 0);
    th_buf_free(&out);
    assert_string_equal(th_report_media_type(TH_REPORT_JSON), "application/json");
    assert_string_equal(th_report_media_type(TH_REPORT_CSV), "text/csv; charset=utf-8");
    assert_string_equal(th_report_media_type(TH_REPORT_PDF), "application/pdf");
    assert_string_equal(th_report_media_type(TH_REPORT_PNG), "image/png");
    assert_string_equal(th_report_media_type(TH_REPORT_SVG), "image/svg+xml");
}

/* out holds "prefix" before each call; a failed call must leave exactly that. */
static void assert_prefix_only(const th_buf *out)
{
    assert_false(th_buf_failed(out));
    assert_int_equal(out->len, 6);
    assert_string_equal(out->data, "prefix");
}

static void test_canceled_before(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    th_ctx *ctx;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    th_ctx_cancel(ctx);
    th_buf out;
    th_buf_init(&out, 0);
    th_buf_puts(&out, "prefix");
    for (int format = TH_REPORT_JSON; format <= TH_REPORT_SVG; format++) {
        assert_int_equal(
            th_report_render(ctx, &f.r, (th_report_format)format, TH_CHART_SCORES, &out),
            TH_ECANCELED);
        assert_prefix_only(&out);
    }
    th_buf_free(&out);
    th_ctx_release(ctx);
}

typedef struct canceler {
    th_ctx *ctx;
    long after_ms;
    _Atomic uint64_t canceled_ns;
} canceler;

static void *cancel_later(void *arg)
{
    canceler *c = arg;
    sleep_ms(c->after_ms);
    atomic_store(&c->canceled_ns, th_clock_now_ns());
    th_ctx_cancel(c->ctx);
    return NULL;
}

/* Canceled while drawing a long PDF: TH_ECANCELED soon after, nothing written, nothing leaked
 * (ASan), and the same for a deadline. */
static void test_canceled_during_pdf(void **state)
{
    (void)state;
    big b;
    build_big(&b, 3000);
    th_buf out;
    th_buf_init(&out, 0);
    th_buf_puts(&out, "prefix");

    canceler c = {.after_ms = 20};
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &c.ctx), 0);
    pthread_t t = spawn(cancel_later, &c);
    int rc = th_report_render(c.ctx, &b.f.r, TH_REPORT_PDF, TH_CHART_SCORES, &out);
    uint64_t returned_ns = th_clock_now_ns();
    join(t);
    if (rc == 0) {
        fail_msg("the PDF was done before the cancel (%zu bytes): make the report bigger", out.len);
    }
    assert_int_equal(rc, TH_ECANCELED);
    assert_true(returned_ns - atomic_load(&c.canceled_ns) < PROMPT_NS);
    assert_prefix_only(&out);
    th_ctx_release(c.ctx);

    th_ctx *deadline;
    assert_int_equal(th_ctx_with_timeout(th_ctx_background(), MS(20), &deadline), 0);
    assert_int_equal(th_report_render(deadline, &b.f.r, TH_REPORT_PDF, TH_CHART_SCORES, &out),
                     TH_ETIMEDOUT);
    assert_prefix_only(&out);
    th_ctx_release(deadline);
    th_buf_free(&out);
    free_big(&b);
}

/* An output limit fails with TH_ETOOBIG and leaves out as it was. */
static void test_output_limit(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    for (int format = TH_REPORT_JSON; format <= TH_REPORT_SVG; format++) {
        th_buf out;
        th_buf_init(&out, 600);
        th_buf_puts(&out, "prefix");
        assert_int_equal(
            th_report_render(NULL, &f.r, (th_report_format)format, TH_CHART_SCORES, &out),
            TH_ETOOBIG);
        assert_prefix_only(&out);
        th_buf_free(&out);
    }
}

/* Fails the Nth allocation for N = 0, 1, ... until the render succeeds: every failure is
 * TH_ENOMEM with out as it was, and the output that finally succeeds is the reference. (cairo
 * allocates with malloc, out of reach of injection; the output buffer is not. For the PDF this
 * guards against cairo 1.16 losing a write error met while finishing the document.) */
static void test_allocation_failures(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    static const th_report_format formats[] = {TH_REPORT_JSON, TH_REPORT_CSV, TH_REPORT_PNG,
                                               TH_REPORT_PDF};
    for (size_t i = 0; i < sizeof(formats) / sizeof(formats[0]); i++) {
        th_buf ref = render_ok(&f.r, formats[i], TH_CHART_SCORES);
        long n;
        int rc = TH_ENOMEM;
        for (n = 0; n < 1000; n++) {
            th_buf out;
            th_buf_init(&out, 0);
            th_buf_puts(&out, "prefix");
            th__fault_fail_after(n);
            rc = th_report_render(NULL, &f.r, formats[i], TH_CHART_SCORES, &out);
            bool fired = th__fault_fired();
            th__fault_fail_after(-1);
            if (rc == 0) {
                if (fired) {
                    fail_msg("format %d: injected failure %ld ignored", (int)formats[i], n);
                }
                assert_int_equal(out.len, 6 + ref.len);
                assert_memory_equal(out.data + 6, ref.data, ref.len);
                th_buf_free(&out);
                break;
            }
            assert_int_equal(rc, TH_ENOMEM);
            assert_prefix_only(&out);
            th_buf_free(&out);
        }
        assert_int_equal(rc, 0);
        assert_true(n >= 1);
        th_buf_free(&ref);
    }
}

/* ---- concurrency ------------------------------------------------------------------------- */

static void *render_worker(void *arg)
{
    const th_report *r = arg;
    for (int i = 0; i < 3; i++) {
        th_report_format format = i == 0 ? TH_REPORT_PDF : i == 1 ? TH_REPORT_PNG : TH_REPORT_SVG;
        th_buf out;
        th_buf_init(&out, 0);
        T_CHECK(th_report_render(NULL, r, format, (th_report_chart)i, &out) == 0);
        T_CHECK(out.len > 1000);
        th_buf_free(&out);
    }
    return NULL;
}

/* Distinct calls share nothing (TSan checks our side; cairo locks its font caches). */
static void test_concurrent_renders(void **state)
{
    (void)state;
    fixture f;
    build(&f);
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        threads[i] = spawn(render_worker, &f.r);
    }
    for (int i = 0; i < 4; i++) {
        join(threads[i]);
    }
}

/* Writes sample outputs for a person to look at when TH_RENDER_SAMPLES names a folder. */
static void test_write_samples(void **state)
{
    (void)state;
    const char *dir = getenv("TH_RENDER_SAMPLES");
    if (dir == NULL) {
        skip();
    }
    fixture f;
    build(&f);
    static const struct {
        th_report_format format;
        th_report_chart chart;
        const char *name;
    } samples[] = {
        {TH_REPORT_PDF, TH_CHART_SCORES, "report.pdf"},
        {TH_REPORT_PNG, TH_CHART_SCORES, "scores.png"},
        {TH_REPORT_PNG, TH_CHART_ENROLMENT, "enrolment.png"},
        {TH_REPORT_PNG, TH_CHART_COMPLETION, "completion.png"},
        {TH_REPORT_SVG, TH_CHART_SCORES, "scores.svg"},
        {TH_REPORT_JSON, TH_CHART_SCORES, "report.json"},
        {TH_REPORT_CSV, TH_CHART_SCORES, "report.csv"},
    };
    for (size_t i = 0; i < sizeof(samples) / sizeof(samples[0]); i++) {
        th_buf out = render_ok(&f.r, samples[i].format, samples[i].chart);
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", dir, samples[i].name);
        FILE *file = fopen(path, "wb");
        assert_non_null(file);
        assert_int_equal(fwrite(out.data, 1, out.len, file), out.len);
        assert_int_equal(fclose(file), 0);
        th_buf_free(&out);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_json_values, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_csv_rows, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_csv_escapes_text_fields, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_pdf_text, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_pdf_many_sites_pages, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_pdf_bad_utf8, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_pdf_deterministic, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_png_charts, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_svg_charts, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_empty_report, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_invalid_and_media_types, setup_reset, teardown_check),
        /* before any deadline starts the timer thread, whose acquisitions injection counts */
        cmocka_unit_test_setup_teardown(test_allocation_failures, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_canceled_before, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_canceled_during_pdf, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_output_limit, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_concurrent_renders, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_write_samples, setup_reset, teardown_check),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
