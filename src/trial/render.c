/* Rendering of interim reports (th_report, plain data built by report.c): JSON and CSV written
 * straight into a th_buf, a printable A4 PDF, or one chart as PNG or SVG drawn with cairo.
 * Design notes: docs/internals/report.md, section "Rendering".
 *
 * No shared state: every call creates its own cairo surface, context and font faces, so distinct
 * calls run in parallel (cairo and fontconfig lock their own font caches). */
#include "trialhub/report.h"

#include <cairo-pdf.h>
#include <cairo-svg.h>
#include <cairo.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define FONT_FAMILY "DejaVu Sans"

#define A4_W     595.2756 /* 210 mm in points */
#define A4_H     841.8898 /* 297 mm */
#define MARGIN   42.5     /* 15 mm */
#define IMAGE_W  1200
#define IMAGE_H  800
#define IMAGE_U  1.5 /* image pixels per PDF point: the same drawing code sizes both */
#define TEXT_MAX 512 /* longest label drawn, in bytes; longer ones are shortened */

/* Sites per enrolment chart in the PDF: longer lists continue in a second chart. */
#define SITES_PER_CHART 24
/* Narrowest column of the completion table (points): more weeks continue in a second table. */
#define WEEK_COL_MIN 46.0

/* ---- output ------------------------------------------------------------------------------ */

static int ctx_err(th_ctx *ctx)
{
    return ctx ? th_ctx_err(ctx) : 0;
}

/* Appends len bytes to out; TH_ETOOBIG rather than a failed buffer when out's limit would be
 * passed, so that the caller learns why. */
static int put(th_buf *out, const void *data, size_t len)
{
    if (out->limit && len > out->limit - out->len) {
        return TH_ETOOBIG;
    }
    th_buf_append(out, data, len);
    return th_buf_failed(out) ? TH_ENOMEM : 0;
}

/* JSON and CSV are built a record at a time in `line` (stack storage) and moved to out. */
static int flush(th_buf *line, th_buf *out)
{
    int rc = th_buf_failed(line) ? TH_ENOMEM : put(out, line->data, line->len);
    th_buf_reset(line);
    return rc;
}

/* The shortest of %.15g, %.16g and %.17g that reads back as the same double: exact (what a
 * consumer reads is bit for bit what report.c computed) without printing 0.1 as
 * 0.10000000000000001. trialhub never calls setlocale(), so the decimal point is '.'. */
static void fmt_exact(char dst[32], double v)
{
    for (int prec = 15;; prec++) {
        snprintf(dst, 32, "%.*g", prec, v);
        if (prec == 17 || strtod(dst, NULL) == v) {
            return;
        }
    }
}

/* generated_at is a fixed array: copied so that a missing terminator cannot run off its end. */
static void generated_at(const th_report *r, char dst[sizeof(r->generated_at) + 1])
{
    memcpy(dst, r->generated_at, sizeof(r->generated_at));
    dst[sizeof(r->generated_at)] = '\0';
}

/* Whether the site's enrolment is broken down by arm (see th_report_site.enrolled_by_arm). */
static bool site_by_arm(const th_report *r, const th_report_site *s)
{
    size_t sum = 0;
    for (size_t a = 0; a < r->narms; a++) {
        sum += s->enrolled_by_arm[a];
    }
    return sum > 0 || s->enrolled == 0;
}

static double completion(size_t received, size_t expected)
{
    return expected ? (double)received / (double)expected : NAN;
}

/* ---- JSON -------------------------------------------------------------------------------- */

static void json_num(th_buf *b, double v)
{
    if (!isfinite(v)) {
        th_buf_puts(b, "null");
        return;
    }
    char num[32];
    fmt_exact(num, v);
    th_buf_puts(b, num);
}

static void json_str(th_buf *b, const char *s)
{
    if (s) {
        th_buf_json_str(b, s);
    } else {
        th_buf_puts(b, "null");
    }
}

static void json_stats(th_buf *b, const th_stats *s)
{
    th_buf_printf(b, "{\"n\":%zu,\"mean\":", s->n);
    json_num(b, s->mean);
    th_buf_puts(b, ",\"sd\":");
    json_num(b, s->sd);
    th_buf_puts(b, ",\"median\":");
    json_num(b, s->median);
    th_buf_puts(b, ",\"q1\":");
    json_num(b, s->q1);
    th_buf_puts(b, ",\"q3\":");
    json_num(b, s->q3);
    th_buf_puts(b, ",\"iqr\":");
    json_num(b, s->q3 - s->q1);
    th_buf_puts(b, ",\"ci95\":[");
    json_num(b, s->ci_low);
    th_buf_puts(b, ",");
    json_num(b, s->ci_high);
    th_buf_puts(b, "]}");
}

static void json_site(th_buf *b, const th_report *r, const th_report_site *s)
{
    th_buf_puts(b, "{\"site\":");
    json_str(b, s->id);
    th_buf_puts(b, ",\"name\":");
    json_str(b, s->name);
    th_buf_printf(b, ",\"enrolled\":%zu", s->enrolled);
    if (r->narms && site_by_arm(r, s)) {
        th_buf_puts(b, ",\"arms\":[");
        for (size_t a = 0; a < r->narms; a++) {
            th_buf_puts(b, a ? ",{\"arm\":" : "{\"arm\":");
            json_str(b, r->arms[a]);
            th_buf_printf(b, ",\"enrolled\":%zu}", s->enrolled_by_arm[a]);
        }
        th_buf_puts(b, "]");
    }
    th_buf_printf(b, ",\"alerts\":%zu,\"visits\":[", s->alerts);
    for (size_t w = 0; w < r->nweeks; w++) {
        th_buf_printf(b, "%s{\"week\":%d,\"expected\":%zu,\"received\":%zu}", w ? "," : "",
                      r->weeks[w], s->expected[w], s->received[w]);
    }
    th_buf_puts(b, "]}");
}

static void json_cell(th_buf *b, const th_report_cell *c)
{
    th_buf_puts(b, "{\"arm\":");
    json_str(b, c->arm);
    th_buf_puts(b, ",\"instrument\":");
    json_str(b, c->instrument);
    th_buf_puts(b, ",\"instrument_name\":");
    json_str(b, c->instrument_name);
    th_buf_printf(b, ",\"week\":%d,\"expected\":%zu,\"received\":%zu,\"completion\":", c->week,
                  c->expected, c->received);
    json_num(b, completion(c->received, c->expected));
    th_buf_printf(b, ",\"alerts\":%zu,\"score\":", c->alerts);
    json_stats(b, &c->score);
    th_buf_puts(b, ",\"change\":");
    json_stats(b, &c->change);
    th_buf_puts(b, "}");
}

static int render_json(th_ctx *ctx, const th_report *r, th_buf *out)
{
    char storage[2048];
    th_buf line;
    th_buf_init_with(&line, storage, sizeof(storage), 0);
    char when[sizeof(r->generated_at) + 1];
    generated_at(r, when);
    th_buf_puts(&line, "{\"trial\":");
    json_str(&line, r->trial_id);
    th_buf_puts(&line, ",\"name\":");
    json_str(&line, r->trial_name);
    th_buf_puts(&line, ",\"generated_at\":");
    json_str(&line, when);
    th_buf_printf(&line, ",\"responses\":%zu,\"patients\":%zu,\"alerts\":%zu,\"arms\":[",
                  r->responses, r->patients, r->alerts);
    for (size_t a = 0; a < r->narms; a++) {
        th_buf_puts(&line, a ? ",{\"arm\":" : "{\"arm\":");
        json_str(&line, r->arms[a]);
        th_buf_printf(&line, ",\"enrolled\":%zu}", r->enrolled_by_arm[a]);
    }
    th_buf_puts(&line, "],\"schedule_weeks\":[");
    for (size_t w = 0; w < r->nweeks; w++) {
        th_buf_printf(&line, "%s%d", w ? "," : "", r->weeks[w]);
    }
    th_buf_puts(&line, "],\"sites\":[");
    int rc = flush(&line, out);
    for (size_t i = 0; rc == 0 && i < r->nsites; i++) {
        rc = ctx_err(ctx);
        if (rc == 0) {
            th_buf_puts(&line, i ? "," : "");
            json_site(&line, r, &r->sites[i]);
            rc = flush(&line, out);
        }
    }
    if (rc == 0) {
        th_buf_puts(&line, "],\"cells\":[");
        rc = flush(&line, out);
    }
    for (size_t i = 0; rc == 0 && i < r->ncells; i++) {
        rc = ctx_err(ctx);
        if (rc == 0) {
            th_buf_puts(&line, i ? "," : "");
            json_cell(&line, &r->cells[i]);
            rc = flush(&line, out);
        }
    }
    if (rc == 0) {
        th_buf_puts(&line, "]}");
        rc = flush(&line, out);
    }
    th_buf_free(&line);
    return rc;
}

/* ---- CSV (RFC 4180) ---------------------------------------------------------------------- */

static const char csv_header[] =
    "trial,arm,instrument,instrument_name,week,expected,received,completion,alerts,n,mean,sd,"
    "median,q1,q3,ci95_low,ci95_high,change_n,change_mean,change_sd,change_median,change_q1,"
    "change_q3,change_ci95_low,change_ci95_high\r\n";

/* A text field: quoted when it holds a comma, quote or line break (quotes doubled), and
 * prefixed with an apostrophe when a spreadsheet would read it as a formula (OWASP's list:
 * = + - @ tab CR). Numbers never go through here, so negative changes stay numbers. */
static void csv_text(th_buf *b, const char *s)
{
    s = s ? s : "";
    bool formula = s[0] != '\0' && strchr("=+-@\t\r", s[0]) != NULL;
    bool quote = strpbrk(s, ",\"\r\n") != NULL;
    if (quote) {
        th_buf_append(b, "\"", 1);
    }
    if (formula) {
        th_buf_append(b, "'", 1);
    }
    for (const char *q; (q = strchr(s, '"')) != NULL; s = q + 1) {
        th_buf_append(b, s, (size_t)(q - s) + 1);
        th_buf_append(b, "\"", 1);
    }
    th_buf_puts(b, s);
    if (quote) {
        th_buf_append(b, "\"", 1);
    }
}

/* ",value": empty for NaN (no data, or too few patients). */
static void csv_num(th_buf *b, double v)
{
    th_buf_append(b, ",", 1);
    if (isfinite(v)) {
        char num[32];
        fmt_exact(num, v);
        th_buf_puts(b, num);
    }
}

static void csv_stats(th_buf *b, const th_stats *s)
{
    th_buf_printf(b, ",%zu", s->n);
    csv_num(b, s->mean);
    csv_num(b, s->sd);
    csv_num(b, s->median);
    csv_num(b, s->q1);
    csv_num(b, s->q3);
    csv_num(b, s->ci_low);
    csv_num(b, s->ci_high);
}

static int render_csv(th_ctx *ctx, const th_report *r, th_buf *out)
{
    char storage[1024];
    th_buf line;
    th_buf_init_with(&line, storage, sizeof(storage), 0);
    int rc = put(out, csv_header, sizeof(csv_header) - 1);
    for (size_t i = 0; rc == 0 && i < r->ncells; i++) {
        rc = ctx_err(ctx);
        if (rc != 0) {
            break;
        }
        const th_report_cell *c = &r->cells[i];
        csv_text(&line, r->trial_id);
        th_buf_append(&line, ",", 1);
        csv_text(&line, c->arm);
        th_buf_append(&line, ",", 1);
        csv_text(&line, c->instrument);
        th_buf_append(&line, ",", 1);
        csv_text(&line, c->instrument_name);
        th_buf_printf(&line, ",%d,%zu,%zu", c->week, c->expected, c->received);
        csv_num(&line, completion(c->received, c->expected));
        th_buf_printf(&line, ",%zu", c->alerts);
        csv_stats(&line, &c->score);
        csv_stats(&line, &c->change);
        th_buf_append(&line, "\r\n", 2);
        rc = flush(&line, out);
    }
    th_buf_free(&line);
    return rc;
}

/* ---- cairo plumbing ---------------------------------------------------------------------- */

/* Where cairo's output goes. The write callback also notices a canceled context, so that PNG
 * encoding and the PDF's font subsetting at the end stop too, and after an error it refuses
 * everything (destroying an unfinished surface finishes it, which would write). */
typedef struct sink {
    th_buf *out;
    th_ctx *ctx;
    int err; /* why a write was refused */
    bool abandon;
} sink;

static cairo_status_t sink_write(void *closure, const unsigned char *data, unsigned int length)
{
    sink *s = closure;
    if (s->abandon || s->err) {
        return CAIRO_STATUS_WRITE_ERROR;
    }
    s->err = ctx_err(s->ctx);
    if (s->err == 0) {
        s->err = put(s->out, data, length);
    }
    return s->err ? CAIRO_STATUS_WRITE_ERROR : CAIRO_STATUS_SUCCESS;
}

static int status_err(cairo_status_t status, const sink *s)
{
    if (status == CAIRO_STATUS_SUCCESS) {
        return 0;
    }
    if (s->err) {
        return s->err;
    }
    return status == CAIRO_STATUS_NO_MEMORY ? TH_ENOMEM : TH_EIO;
}

typedef struct box {
    double x, y, w, h;
} box;

typedef struct canvas {
    th_ctx *ctx;
    const th_report *r;
    sink *sink;
    cairo_surface_t *surface;
    cairo_t *cr;
    cairo_font_face_t *regular;
    cairo_font_face_t *bold;
    double u; /* drawing units per point: 1 in the PDF, IMAGE_U in images */
    /* PDF pages: the cursor moves down from top to bottom between x0 and x1. */
    int page; /* 1-based; 0 before the first */
    double x0, x1, top, bottom, y;
} canvas;

static int canvas_status(const canvas *c)
{
    cairo_status_t status = cairo_status(c->cr);
    if (status == CAIRO_STATUS_SUCCESS) {
        status = cairo_surface_status(c->surface);
    }
    return status_err(status, c->sink);
}

/* The context's error, else cairo's: checked between charts, pages and table rows. */
static int check(const canvas *c)
{
    int rc = ctx_err(c->ctx);
    return rc ? rc : canvas_status(c);
}

/* Takes c->surface (already created, perhaps in an error state) and makes a context and the
 * two font faces. canvas_close() frees whatever was made, whatever this returns. */
static int canvas_open(canvas *c)
{
    int rc = status_err(cairo_surface_status(c->surface), c->sink);
    if (rc != 0) {
        return rc;
    }
    c->cr = cairo_create(c->surface);
    c->regular =
        cairo_toy_font_face_create(FONT_FAMILY, CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    c->bold =
        cairo_toy_font_face_create(FONT_FAMILY, CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_BOLD);
    rc = canvas_status(c);
    if (rc == 0) {
        rc = status_err(cairo_font_face_status(c->regular), c->sink);
    }
    if (rc == 0) {
        rc = status_err(cairo_font_face_status(c->bold), c->sink);
    }
    return rc;
}

/* Frees everything cairo made; for a PDF or SVG, finishing the surface writes the rest of the
 * document. Returns rc, or the first error met while finishing. */
static int canvas_close(canvas *c, int rc)
{
    if (c->cr) {
        if (rc == 0) {
            rc = check(c);
        }
        cairo_destroy(c->cr);
    }
    if (c->regular) {
        cairo_font_face_destroy(c->regular);
    }
    if (c->bold) {
        cairo_font_face_destroy(c->bold);
    }
    if (c->surface) {
        c->sink->abandon = rc != 0;
        cairo_surface_finish(c->surface);
        /* The sink's own record first: cairo 1.16's PDF surface can lose a write error met
         * while finishing (status 0 with a truncated document). */
        if (rc == 0) {
            rc =
                c->sink->err ? c->sink->err : status_err(cairo_surface_status(c->surface), c->sink);
        }
        cairo_surface_destroy(c->surface);
    }
    return rc;
}

/* ---- text -------------------------------------------------------------------------------- */

enum { ALIGN_LEFT, ALIGN_CENTER, ALIGN_RIGHT };

static const char ellipsis[] = "\xe2\x80\xa6"; /* U+2026 */
static const char no_value[] = "\xe2\x80\x93"; /* U+2013 EN DASH: no data */

/* Length of the valid UTF-8 sequence at p, or 0 if it is not one. */
static size_t utf8_seq(const unsigned char *p)
{
    if (p[0] < 0x80) {
        return 1;
    }
    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        return (p[1] & 0xc0) == 0x80 ? 2 : 0;
    }
    if (p[0] >= 0xe0 && p[0] <= 0xef) {
        if ((p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 || (p[0] == 0xe0 && p[1] < 0xa0) ||
            (p[0] == 0xed && p[1] >= 0xa0)) {
            return 0; /* overlong, or a UTF-16 surrogate */
        }
        return 3;
    }
    if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        if ((p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 || (p[3] & 0xc0) != 0x80 ||
            (p[0] == 0xf0 && p[1] < 0x90) || (p[0] == 0xf4 && p[1] >= 0x90)) {
            return 0;
        }
        return 4;
    }
    return 0;
}

/* Copies src (NULL: empty) into dst as valid UTF-8: a bad byte becomes '?' and a control
 * character a space, because cairo refuses invalid UTF-8 by putting the whole drawing in an
 * error state. Stops at a character boundary before cap. Returns the length. */
static size_t clean_utf8(const char *src, char *dst, size_t cap)
{
    const unsigned char *p = (const unsigned char *)(src ? src : "");
    size_t len = 0;
    while (*p) {
        size_t n = utf8_seq(p);
        const unsigned char *from = p;
        unsigned char subst = 0;
        if (n == 0) {
            subst = '?';
            n = 1;
        } else if (*p < 0x20 || *p == 0x7f) {
            subst = ' ';
        }
        if (len + n >= cap) {
            break;
        }
        if (subst) {
            dst[len] = (char)subst;
        } else {
            memcpy(dst + len, from, n);
        }
        len += n;
        p += n;
    }
    dst[len] = '\0';
    return len;
}

static void use_font(canvas *c, double size, bool bold)
{
    cairo_set_font_face(c->cr, bold ? c->bold : c->regular);
    cairo_set_font_size(c->cr, size);
}

static double text_width(canvas *c, const char *s)
{
    cairo_text_extents_t ext;
    cairo_text_extents(c->cr, s, &ext);
    return ext.x_advance;
}

/* Cleans src into dst (see clean_utf8) and shortens it with an ellipsis until it is at most
 * max_w wide in the current font. */
static void fit_text(canvas *c, const char *src, double max_w, char *dst, size_t cap)
{
    size_t len = clean_utf8(src, dst, cap - sizeof(ellipsis));
    double width = text_width(c, dst);
    if (width <= max_w) {
        return;
    }
    /* Start near the right length, then drop one character at a time. */
    size_t guess = (size_t)((double)len * max_w / width) + 2;
    if (guess < len) {
        len = guess;
        while (len > 0 && ((unsigned char)dst[len] & 0xc0) == 0x80) {
            len--;
        }
    }
    for (;;) {
        memcpy(dst + len, ellipsis, sizeof(ellipsis));
        if (len == 0 || text_width(c, dst) <= max_w) {
            break;
        }
        do {
            len--;
        } while (len > 0 && ((unsigned char)dst[len] & 0xc0) == 0x80);
    }
    if (text_width(c, dst) > max_w) {
        dst[0] = '\0';
    }
}

/* Draws s with its baseline at y, aligned on x, at most max_w wide. */
static void draw_text(canvas *c, double x, double y, int align, double max_w, const char *s)
{
    char fitted[TEXT_MAX];
    fit_text(c, s, max_w, fitted, sizeof(fitted));
    double w = align == ALIGN_LEFT ? 0 : text_width(c, fitted);
    cairo_move_to(c->cr, align == ALIGN_CENTER ? x - w / 2 : align == ALIGN_RIGHT ? x - w : x, y);
    cairo_show_text(c->cr, fitted);
}

__attribute__((format(printf, 6, 7))) static void
draw_textf(canvas *c, double x, double y, int align, double max_w, const char *fmt, ...)
{
    char s[TEXT_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s, sizeof(s), fmt, ap);
    va_end(ap);
    draw_text(c, x, y, align, max_w, s);
}

/* One decimal, "–" for NaN, and no "-0.0". */
static const char *fmt1(char dst[32], double v)
{
    if (!isfinite(v)) {
        return no_value;
    }
    snprintf(dst, 32, "%.1f", v > -0.05 && v < 0.05 ? 0.0 : v);
    return dst;
}

static const char *fmt_pct(char dst[32], size_t received, size_t expected)
{
    if (expected == 0) {
        return no_value;
    }
    snprintf(dst, 32, "%.0f%%", 100.0 * completion(received, expected));
    return dst;
}

/* "12.3 (4.5)": mean (SD). */
static void fmt_mean_sd(char dst[80], const th_stats *s)
{
    char x[2][32];
    if (isfinite(s->mean)) {
        snprintf(dst, 80, "%s (%s)", fmt1(x[0], s->mean), fmt1(x[1], s->sd));
    } else {
        snprintf(dst, 80, "%s", no_value);
    }
}

/* "10.1, 14.5": the 95% CI of the mean. */
static void fmt_ci(char dst[80], const th_stats *s)
{
    char x[2][32];
    if (isfinite(s->ci_low) && isfinite(s->ci_high)) {
        snprintf(dst, 80, "%s, %s", fmt1(x[0], s->ci_low), fmt1(x[1], s->ci_high));
    } else {
        snprintf(dst, 80, "%s", no_value);
    }
}

static void grey(canvas *c, double level)
{
    cairo_set_source_rgb(c->cr, level, level, level);
}

/* ---- styles: every arm is told apart by colour and, for grey-scale prints, by its dash
 * pattern and marker shape (lines) or hatching (bars) ------------------------------------- */

/* Okabe and Ito's colour-blind-safe palette, without the yellow that vanishes on white. */
static const double arm_rgb[][3] = {
    {0.000, 0.447, 0.698}, {0.835, 0.369, 0.000}, {0.000, 0.620, 0.451}, {0.800, 0.475, 0.655},
    {0.902, 0.624, 0.000}, {0.337, 0.706, 0.914}, {0.000, 0.000, 0.000},
};
#define NCOLOURS (sizeof(arm_rgb) / sizeof(arm_rgb[0]))
#define NSHAPES  6 /* dash patterns, marker shapes and hatchings each */

static const double dashes[NSHAPES][4] = {
    {0}, {5, 2.5}, {1.2, 2}, {6, 2, 1.2, 2}, {9, 3}, {3, 1.5, 1.2, 1.5},
};
static const int ndashes[NSHAPES] = {0, 2, 2, 4, 2, 4};

/* Arms not listed in the report (report.c never makes them) are drawn in grey. */
static void arm_colour(canvas *c, size_t arm)
{
    if (arm >= c->r->narms) {
        grey(c, 0.55);
        return;
    }
    const double *rgb = arm_rgb[arm % NCOLOURS];
    cairo_set_source_rgb(c->cr, rgb[0], rgb[1], rgb[2]);
}

static size_t arm_index(const th_report *r, const char *arm)
{
    for (size_t a = 0; arm && a < r->narms; a++) {
        if (r->arms[a] && strcmp(r->arms[a], arm) == 0) {
            return a;
        }
    }
    return r->narms;
}

/* "Arm A" for an arm named "A"; names that already start with "Arm" stay as they are. */
static void arm_label(const char *arm, char *dst, size_t cap)
{
    size_t prefix = arm && strncasecmp(arm, "arm", 3) == 0 ? 0 : 4;
    memcpy(dst, "Arm ", prefix);
    clean_utf8(arm, dst + prefix, cap - prefix);
}

static void arm_dash(canvas *c, size_t arm)
{
    size_t k = arm % NSHAPES;
    double scaled[4];
    for (int i = 0; i < ndashes[k]; i++) {
        scaled[i] = dashes[k][i] * c->u;
    }
    cairo_set_dash(c->cr, scaled, ndashes[k], 0);
}

/* Marker shapes change at a different period than dashes, so arms 0-35 all differ. */
static void arm_marker(canvas *c, size_t arm, double x, double y)
{
    cairo_t *cr = c->cr;
    double r = 3.1 * c->u;
    size_t shape = arm >= c->r->narms ? 5 : (arm + arm / NSHAPES) % NSHAPES;
    cairo_save(cr);
    cairo_set_dash(cr, NULL, 0, 0);
    cairo_new_path(cr);
    switch (shape) {
    case 0:
        cairo_arc(cr, x, y, r, 0, 2 * M_PI);
        break;
    case 1:
        cairo_rectangle(cr, x - 0.9 * r, y - 0.9 * r, 1.8 * r, 1.8 * r);
        break;
    case 2:
        cairo_move_to(cr, x, y - 1.2 * r);
        cairo_line_to(cr, x + 1.1 * r, y + 0.8 * r);
        cairo_line_to(cr, x - 1.1 * r, y + 0.8 * r);
        cairo_close_path(cr);
        break;
    case 3:
        cairo_move_to(cr, x, y - 1.25 * r);
        cairo_line_to(cr, x + 1.1 * r, y);
        cairo_line_to(cr, x, y + 1.25 * r);
        cairo_line_to(cr, x - 1.1 * r, y);
        cairo_close_path(cr);
        break;
    case 4:
        cairo_move_to(cr, x, y + 1.2 * r);
        cairo_line_to(cr, x + 1.1 * r, y - 0.8 * r);
        cairo_line_to(cr, x - 1.1 * r, y - 0.8 * r);
        cairo_close_path(cr);
        break;
    default: /* a cross: stroked, not filled */
        cairo_move_to(cr, x - r, y - r);
        cairo_line_to(cr, x + r, y + r);
        cairo_move_to(cr, x - r, y + r);
        cairo_line_to(cr, x + r, y - r);
        arm_colour(c, arm);
        cairo_set_line_width(cr, 1.6 * c->u);
        cairo_stroke(cr);
        cairo_restore(cr);
        return;
    }
    arm_colour(c, arm);
    cairo_fill_preserve(cr);
    grey(c, 0.15);
    cairo_set_line_width(cr, 0.6 * c->u);
    cairo_stroke(cr);
    cairo_restore(cr);
}

/* A bar in an arm's colour and hatching; arm SIZE_MAX: a site total not broken down by arm. */
static void arm_bar(canvas *c, size_t arm, double x, double y, double w, double h)
{
    cairo_t *cr = c->cr;
    if (w <= 0 || h <= 0) {
        return;
    }
    cairo_save(cr);
    cairo_rectangle(cr, x, y, w, h);
    if (arm == SIZE_MAX) {
        cairo_set_source_rgb(cr, 0.42, 0.53, 0.65);
    } else {
        arm_colour(c, arm);
    }
    cairo_fill_preserve(cr);
    size_t hatch = arm == SIZE_MAX || arm >= c->r->narms ? 0 : arm % NSHAPES;
    if (hatch) {
        cairo_clip_preserve(cr);
        cairo_new_path(cr);
        double step = 4.0 * c->u;
        for (double t = -h; t < w + h; t += step) {
            if (hatch == 1 || hatch == 3) { /* "/" */
                cairo_move_to(cr, x + t, y + h);
                cairo_line_to(cr, x + t + h, y);
            }
            if (hatch == 2 || hatch == 3) { /* "\" */
                cairo_move_to(cr, x + t, y);
                cairo_line_to(cr, x + t + h, y + h);
            }
            if (hatch == 4 && t >= 0 && t < h) { /* "-" */
                cairo_move_to(cr, x, y + t);
                cairo_line_to(cr, x + w, y + t);
            }
            if (hatch == 5 && t >= 0 && t < w) { /* "|" */
                cairo_move_to(cr, x + t, y);
                cairo_line_to(cr, x + t, y + h);
            }
        }
        cairo_set_source_rgba(cr, 0, 0, 0, 0.45);
        cairo_set_line_width(cr, 0.7 * c->u);
        cairo_stroke(cr);
        cairo_reset_clip(cr);
        cairo_rectangle(cr, x, y, w, h);
    }
    grey(c, 0.2);
    cairo_set_line_width(cr, 0.5 * c->u);
    cairo_stroke(cr);
    cairo_restore(cr);
}

/* Lays out one entry per arm ("Arm A" after a line sample with its marker, or after a bar
 * swatch) in rows across w; returns the height used, and draws only if draw. */
static double draw_legend(canvas *c, double x, double y, double w, bool lines, bool draw)
{
    const th_report *r = c->r;
    double u = c->u, row_h = 11 * u, sample_w = lines ? 24 * u : 10 * u;
    if (r->narms == 0) {
        return 0;
    }
    use_font(c, 7.5 * u, false);
    double cx = x, cy = y;
    for (size_t a = 0; a < r->narms; a++) {
        char label[TEXT_MAX], name[TEXT_MAX];
        arm_label(r->arms[a], label, sizeof(label));
        fit_text(c, label, w * 0.45, name, sizeof(name));
        double item_w = sample_w + 4 * u + text_width(c, name) + 12 * u;
        if (cx > x && cx + item_w > x + w) {
            cx = x;
            cy += row_h;
        }
        if (draw) {
            double mid = cy + row_h / 2;
            if (lines) {
                cairo_save(c->cr);
                arm_colour(c, a);
                arm_dash(c, a);
                cairo_set_line_width(c->cr, 1.4 * u);
                cairo_move_to(c->cr, cx, mid);
                cairo_line_to(c->cr, cx + sample_w, mid);
                cairo_stroke(c->cr);
                cairo_restore(c->cr);
                arm_marker(c, a, cx + sample_w / 2, mid);
            } else {
                arm_bar(c, a, cx, mid - 4 * u, sample_w, 8 * u);
            }
            grey(c, 0.1);
            cairo_move_to(c->cr, cx + sample_w + 4 * u, mid + 2.7 * u);
            cairo_show_text(c->cr, name);
        }
        cx += item_w;
    }
    return cy - y + row_h;
}

/* ---- axes -------------------------------------------------------------------------------- */

typedef struct axis {
    double lo, hi, step;
    int decimals;
} axis;

/* A "nice" axis over [lo, hi] with about `ticks` steps of 1, 2, 2.5 or 5 x 10^k. */
static axis make_axis(double lo, double hi, int ticks, bool integer)
{
    if (!isfinite(lo) || !isfinite(hi)) {
        lo = 0;
        hi = 1;
    }
    if (hi - lo < 1e-9) {
        hi = lo + 1;
        lo = lo >= 1 ? lo - 1 : lo;
    }
    double raw = (hi - lo) / ticks, mag = pow(10, floor(log10(raw))), f = raw / mag;
    double step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag;
    if (integer && step < 1) {
        step = 1;
    }
    axis a = {floor(lo / step + 1e-9) * step, ceil(hi / step - 1e-9) * step, step, 0};
    while (a.decimals < 6) {
        double scaled = step * pow(10, a.decimals);
        if (fabs(scaled - round(scaled)) < 1e-6) {
            break;
        }
        a.decimals++;
    }
    return a;
}

static int axis_ticks(const axis *a)
{
    return (int)lround((a->hi - a->lo) / a->step);
}

/* Position of v along a span from `from` (the axis' lo) to `to` (its hi). */
static double axis_pos(const axis *a, double v, double from, double to)
{
    return from + (v - a->lo) / (a->hi - a->lo) * (to - from);
}

/* Horizontal grid lines and labelled ticks of a vertical axis on the left of plot. */
static void draw_y_axis(canvas *c, box plot, const axis *a, const char *title)
{
    cairo_t *cr = c->cr;
    double u = c->u;
    use_font(c, 7.5 * u, false);
    cairo_set_line_width(cr, 0.5 * u);
    for (int k = 0; k <= axis_ticks(a); k++) {
        double v = a->lo + k * a->step;
        double y = axis_pos(a, v, plot.y + plot.h, plot.y);
        grey(c, 0.88);
        cairo_move_to(cr, plot.x, y);
        cairo_line_to(cr, plot.x + plot.w, y);
        cairo_stroke(cr);
        grey(c, 0.25);
        draw_textf(c, plot.x - 4 * u, y + 2.6 * u, ALIGN_RIGHT, 40 * u, "%.*f", a->decimals, v);
    }
    use_font(c, 8 * u, false);
    cairo_save(cr);
    cairo_translate(cr, plot.x - 34 * u, plot.y + plot.h / 2);
    cairo_rotate(cr, -M_PI / 2);
    draw_text(c, 0, 0, ALIGN_CENTER, plot.h, title);
    cairo_restore(cr);
}

static void draw_frame(canvas *c, box plot)
{
    grey(c, 0.25);
    cairo_set_line_width(c->cr, 0.8 * c->u);
    cairo_move_to(c->cr, plot.x, plot.y);
    cairo_line_to(c->cr, plot.x, plot.y + plot.h);
    cairo_line_to(c->cr, plot.x + plot.w, plot.y + plot.h);
    cairo_stroke(c->cr);
}

/* ---- chart: mean score by visit, one line per arm, for one instrument -------------------- */

/* One panel for cells[0..n), all of one instrument (sorted by arm, then week). */
static int draw_scores_panel(canvas *c, box b, const th_report_cell *cells, size_t n)
{
    const th_report *r = c->r;
    cairo_t *cr = c->cr;
    double u = c->u;

    grey(c, 0.05);
    use_font(c, 9.5 * u, true);
    draw_textf(c, b.x, b.y + 10 * u, ALIGN_LEFT, b.w, "%s: mean score by visit week (95%% CI)",
               n ? cells[0].instrument_name : "");
    double legend_h = draw_legend(c, b.x, b.y + 14 * u, b.w, true, false);
    draw_legend(c, b.x, b.y + 14 * u, b.w, true, true);

    /* Patients with a score, under the axis, if there is room for a row per arm. */
    double nrow_h = 9.5 * u;
    bool show_n =
        r->narms > 0 && r->narms <= 6 && b.h - legend_h > 150 * u + (double)r->narms * nrow_h;
    box plot = {b.x + 48 * u, b.y + 20 * u + legend_h, 0, 0};
    plot.w = b.x + b.w - 8 * u - plot.x;
    plot.h = b.y + b.h - 30 * u - (show_n ? (double)(r->narms + 1) * nrow_h : 0) - plot.y;
    if (plot.w < 40 * u || plot.h < 30 * u) {
        return check(c); /* no room: the table beside it has the numbers */
    }

    /* x: the scheduled weeks and those of the cells; y: every finite mean and CI bound. */
    double wmin = INFINITY, wmax = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
    for (size_t w = 0; w < r->nweeks; w++) {
        wmin = fmin(wmin, r->weeks[w]);
        wmax = fmax(wmax, r->weeks[w]);
    }
    for (size_t i = 0; i < n; i++) {
        const th_stats *s = &cells[i].score;
        wmin = fmin(wmin, cells[i].week);
        wmax = fmax(wmax, cells[i].week);
        double values[3] = {s->mean, s->ci_low, s->ci_high};
        for (int k = 0; k < 3; k++) {
            if (isfinite(values[k])) {
                ylo = fmin(ylo, values[k]);
                yhi = fmax(yhi, values[k]);
            }
        }
    }
    if (!isfinite(wmin)) {
        wmin = 0;
        wmax = 1;
    } else if (wmax - wmin < 1) {
        wmin -= 1;
        wmax += 1;
    }
    bool have_data = isfinite(ylo);
    if (have_data && ylo >= 0 && ylo <= yhi / 2) {
        ylo = 0; /* scores are counts of points: start at 0 unless that flattens the lines */
    }
    axis ya = make_axis(ylo, yhi, 5, false);
    double pad = fmin(18 * u, plot.w * 0.05);
    double span = plot.w - 2 * pad;
#define PX(week) (plot.x + pad + ((double)(week)-wmin) / (wmax - wmin) * span)

    /* Arms sit side by side around each week so that their error bars do not hide each other. */
    double gap = span;
    for (size_t i = 1; i < r->nweeks; i++) {
        for (size_t j = 0; j < i; j++) {
            double d = fabs(PX(r->weeks[i]) - PX(r->weeks[j]));
            gap = d > 0 ? fmin(gap, d) : gap;
        }
    }
    double dodge = r->narms > 1 ? fmin(5 * u, gap * 0.3 / (double)r->narms) : 0;

    draw_y_axis(c, plot, &ya, "Mean score");
    draw_frame(c, plot);
    use_font(c, 7.5 * u, false);
    grey(c, 0.25);
    double last_right = -INFINITY;
    for (size_t w = 0; w < r->nweeks; w++) {
        char label[16];
        snprintf(label, sizeof(label), "%d", r->weeks[w]);
        double x = PX(r->weeks[w]), half = text_width(c, label) / 2;
        cairo_move_to(cr, x, plot.y + plot.h);
        cairo_line_to(cr, x, plot.y + plot.h + 3 * u);
        cairo_stroke(cr);
        if (x - half > last_right + 3 * u) {
            draw_text(c, x, plot.y + plot.h + 11 * u, ALIGN_CENTER, 40 * u, label);
            last_right = x + half;
        }
    }
    use_font(c, 8 * u, false);
    draw_text(c, plot.x + plot.w / 2, plot.y + plot.h + 22 * u, ALIGN_CENTER, plot.w, "Visit week");
    if (!have_data) {
        grey(c, 0.4);
        draw_text(c, plot.x + plot.w / 2, plot.y + plot.h / 2, ALIGN_CENTER, plot.w,
                  "No scored responses yet");
        return check(c);
    }

    cairo_save(cr);
    cairo_rectangle(cr, plot.x - 6 * u, plot.y - 6 * u, plot.w + 12 * u, plot.h + 12 * u);
    cairo_clip(cr);
    for (size_t i = 0, next; i < n; i = next) {
        int rc = check(c);
        if (rc != 0) {
            cairo_restore(cr);
            return rc;
        }
        next = i + 1;
        while (next < n && cells[next].arm && cells[i].arm &&
               strcmp(cells[next].arm, cells[i].arm) == 0) {
            next++;
        }
        size_t a = arm_index(r, cells[i].arm);
        double dx = a < r->narms ? ((double)a - (double)(r->narms - 1) / 2) * dodge : 0;
        /* the line, broken where a visit has no mean */
        cairo_new_path(cr);
        bool pen = false;
        for (size_t k = i; k < next; k++) {
            const th_stats *s = &cells[k].score;
            if (!isfinite(s->mean)) {
                pen = false;
                continue;
            }
            double x = PX(cells[k].week) + dx, y = axis_pos(&ya, s->mean, plot.y + plot.h, plot.y);
            if (pen) {
                cairo_line_to(cr, x, y);
            } else {
                cairo_move_to(cr, x, y);
            }
            pen = true;
        }
        arm_colour(c, a);
        arm_dash(c, a);
        cairo_set_line_width(cr, 1.4 * u);
        cairo_stroke(cr);
        cairo_set_dash(cr, NULL, 0, 0);
        /* 95% CI error bars (n >= 2) */
        cairo_set_line_width(cr, 0.9 * u);
        for (size_t k = i; k < next; k++) {
            const th_stats *s = &cells[k].score;
            if (!isfinite(s->ci_low) || !isfinite(s->ci_high)) {
                continue;
            }
            double x = PX(cells[k].week) + dx;
            double y0 = axis_pos(&ya, s->ci_low, plot.y + plot.h, plot.y);
            double y1 = axis_pos(&ya, s->ci_high, plot.y + plot.h, plot.y);
            cairo_move_to(cr, x, y0);
            cairo_line_to(cr, x, y1);
            cairo_move_to(cr, x - 2.5 * u, y0);
            cairo_line_to(cr, x + 2.5 * u, y0);
            cairo_move_to(cr, x - 2.5 * u, y1);
            cairo_line_to(cr, x + 2.5 * u, y1);
        }
        cairo_stroke(cr);
        for (size_t k = i; k < next; k++) {
            if (isfinite(cells[k].score.mean)) {
                arm_marker(c, a, PX(cells[k].week) + dx,
                           axis_pos(&ya, cells[k].score.mean, plot.y + plot.h, plot.y));
            }
        }
    }
    cairo_restore(cr);

    if (show_n) {
        double y = plot.y + plot.h + 30 * u + nrow_h;
        use_font(c, 7 * u, true);
        grey(c, 0.25);
        draw_text(c, b.x, y - nrow_h + 6.5 * u, ALIGN_LEFT, b.w, "Patients with a score (n)");
        use_font(c, 7 * u, false);
        for (size_t a = 0; a < r->narms; a++) {
            arm_colour(c, a);
            draw_text(c, plot.x - 6 * u, y + (double)a * nrow_h + 6.5 * u, ALIGN_RIGHT, 44 * u,
                      r->arms[a]);
        }
        grey(c, 0.15);
        for (size_t k = 0; k < n; k++) {
            size_t a = arm_index(r, cells[k].arm);
            if (a < r->narms) {
                draw_textf(c, PX(cells[k].week), y + (double)a * nrow_h + 6.5 * u, ALIGN_CENTER,
                           gap, "%zu", cells[k].score.n);
            }
        }
    }
#undef PX
    return check(c);
}

/* Cells [from, *to) of one instrument, starting at from. */
static size_t instrument_run(const th_report *r, size_t from)
{
    const char *url = r->cells[from].instrument ? r->cells[from].instrument : "";
    size_t to = from + 1;
    while (to < r->ncells && r->cells[to].instrument && strcmp(r->cells[to].instrument, url) == 0) {
        to++;
    }
    return to;
}

/* ---- chart: enrolment by site and by arm ------------------------------------------------- */

/* Bars for sites [from, to) on the left (stacked by arm where the report has the breakdown,
 * on a scale shared by every chunk of sites), and for the arms over all sites on the right. */
static int draw_enrolment(canvas *c, box b, size_t from, size_t to)
{
    const th_report *r = c->r;
    double u = c->u;
    grey(c, 0.05);
    use_font(c, 9.5 * u, true);
    if (from == 0 && to == r->nsites) {
        draw_text(c, b.x, b.y + 10 * u, ALIGN_LEFT, b.w, "Patients enrolled by site and arm");
    } else {
        draw_textf(c, b.x, b.y + 10 * u, ALIGN_LEFT, b.w,
                   "Patients enrolled by site and arm (sites %zu\xe2\x80\x93%zu of %zu)", from + 1,
                   to, r->nsites);
    }
    double legend_h = draw_legend(c, b.x, b.y + 14 * u, b.w, false, false);
    draw_legend(c, b.x, b.y + 14 * u, b.w, false, true);
    double top = b.y + 22 * u + legend_h, bottom = b.y + b.h - 24 * u;
    size_t rows = to - from > r->narms ? to - from : r->narms;
    if (bottom - top < 10 * u || rows == 0) {
        return check(c);
    }
    /* One row height for both panels: 15 points on paper; images fill their frame. */
    double row_h = fmin(c->page ? 18 * u : INFINITY, (bottom - top) / (double)rows);
    double bar_h = fmin(row_h * 0.62, 40 * u), label_fs = fmin(7.5 * u, row_h * 0.8);
    bottom = top + row_h * (double)rows;

    size_t max_site = 0, max_arm = 0;
    for (size_t i = 0; i < r->nsites; i++) {
        max_site = r->sites[i].enrolled > max_site ? r->sites[i].enrolled : max_site;
    }
    for (size_t a = 0; a < r->narms; a++) {
        max_arm = r->enrolled_by_arm[a] > max_arm ? r->enrolled_by_arm[a] : max_arm;
    }

    /* Two panels: sites (62%), arms (the rest). */
    double site_w = r->narms ? b.w * 0.62 : b.w;
    struct panel {
        box plot;
        axis ax;
        size_t rows;
        const char *title;
    } panels[2] = {
        {{b.x + site_w * 0.34, top, site_w * 0.66 - 26 * u, bottom - top},
         make_axis(0, (double)max_site, 4, true),
         to - from,
         "Patients"},
        {{b.x + site_w + 14 * u + (b.w - site_w) * 0.3, top, (b.w - site_w) * 0.7 - 40 * u,
          bottom - top},
         make_axis(0, (double)max_arm, 3, true),
         r->narms,
         "Patients, all sites"},
    };
    for (int p = 0; p < (r->narms ? 2 : 1); p++) {
        struct panel *pn = &panels[p];
        if (pn->plot.w < 10 * u || pn->rows == 0) {
            continue;
        }
        cairo_set_line_width(c->cr, 0.5 * u);
        use_font(c, 7.5 * u, false);
        for (int k = 0; k <= axis_ticks(&pn->ax); k++) {
            double v = pn->ax.lo + k * pn->ax.step;
            double x = axis_pos(&pn->ax, v, pn->plot.x, pn->plot.x + pn->plot.w);
            grey(c, 0.88);
            cairo_move_to(c->cr, x, pn->plot.y);
            cairo_line_to(c->cr, x, pn->plot.y + pn->plot.h);
            cairo_stroke(c->cr);
            grey(c, 0.25);
            draw_textf(c, x, pn->plot.y + pn->plot.h + 10 * u, ALIGN_CENTER, 30 * u, "%.0f", v);
        }
        use_font(c, 8 * u, false);
        draw_text(c, pn->plot.x + pn->plot.w / 2, pn->plot.y + pn->plot.h + 21 * u, ALIGN_CENTER,
                  pn->plot.w + 20 * u, pn->title);
        grey(c, 0.25);
        cairo_set_line_width(c->cr, 0.8 * u);
        cairo_move_to(c->cr, pn->plot.x, pn->plot.y);
        cairo_line_to(c->cr, pn->plot.x, pn->plot.y + pn->plot.h);
        cairo_stroke(c->cr);

        double label_w = pn->plot.x - (p ? b.x + site_w + 14 * u : b.x);
        use_font(c, label_fs, false);
        for (size_t i = 0; i < pn->rows; i++) {
            int rc = check(c);
            if (rc != 0) {
                return rc;
            }
            double y = pn->plot.y + (double)i * row_h, bar_y = y + (row_h - bar_h) / 2;
            double base = (row_h + label_fs * 0.7) / 2;
            double x = pn->plot.x;
            size_t total;
            grey(c, 0.1);
            if (p == 0) {
                const th_report_site *s = &r->sites[from + i];
                total = s->enrolled;
                draw_text(c, pn->plot.x - 4 * u, y + base, ALIGN_RIGHT, label_w - 6 * u,
                          s->name && s->name[0] ? s->name : s->id);
                if (r->narms && site_by_arm(r, s)) {
                    size_t counted = 0;
                    for (size_t a = 0; a < r->narms; a++) {
                        double w = axis_pos(&pn->ax, (double)s->enrolled_by_arm[a], 0, pn->plot.w);
                        arm_bar(c, a, x, bar_y, w, bar_h);
                        x += w;
                        counted += s->enrolled_by_arm[a];
                    }
                    if (total > counted) { /* patients of arms the trial does not list */
                        double w = axis_pos(&pn->ax, (double)(total - counted), 0, pn->plot.w);
                        arm_bar(c, r->narms, x, bar_y, w, bar_h);
                        x += w;
                    }
                } else {
                    double w = axis_pos(&pn->ax, (double)total, 0, pn->plot.w);
                    arm_bar(c, SIZE_MAX, x, bar_y, w, bar_h);
                    x += w;
                }
            } else {
                total = r->enrolled_by_arm[i];
                char label[TEXT_MAX];
                arm_label(r->arms[i], label, sizeof(label));
                draw_text(c, pn->plot.x - 4 * u, y + base, ALIGN_RIGHT, label_w - 6 * u, label);
                double w = axis_pos(&pn->ax, (double)total, 0, pn->plot.w);
                arm_bar(c, i, x, bar_y, w, bar_h);
                x += w;
            }
            grey(c, 0.1);
            draw_textf(c, x + 3 * u, y + base, ALIGN_LEFT, 30 * u, "%zu", total);
        }
    }
    return check(c);
}

/* ---- chart and table: completion by site and visit --------------------------------------- */

/* One cell: shaded from white (0%) to dark blue (100%), with the percentage and
 * received/expected; light grey with "–" when no visit is due yet. */
static void completion_cell(canvas *c, box b, size_t received, size_t expected, double fs)
{
    cairo_t *cr = c->cr;
    double inset = 0.6 * c->u;
    cairo_rectangle(cr, b.x + inset, b.y + inset, b.w - 2 * inset, b.h - 2 * inset);
    double p = completion(received, expected);
    if (expected == 0) {
        grey(c, 0.95);
        cairo_fill(cr);
        grey(c, 0.5);
        use_font(c, fs, false);
        draw_text(c, b.x + b.w / 2, b.y + (b.h + fs * 0.7) / 2, ALIGN_CENTER, b.w, no_value);
        return;
    }
    double t = fmin(p, 1.0);
    cairo_set_source_rgb(cr, 1 - t * (1 - 0.031), 1 - t * (1 - 0.318), 1 - t * (1 - 0.612));
    cairo_fill(cr);
    if (t >= 0.55) {
        cairo_set_source_rgb(cr, 1, 1, 1);
    } else {
        grey(c, 0.1);
    }
    char pct[32];
    fmt_pct(pct, received, expected);
    if (b.h >= fs * 2.6) {
        use_font(c, fs, true);
        draw_text(c, b.x + b.w / 2, b.y + b.h / 2 - fs * 0.15, ALIGN_CENTER, b.w - 2 * inset, pct);
        use_font(c, fs * 0.85, false);
        draw_textf(c, b.x + b.w / 2, b.y + b.h / 2 + fs * 0.95, ALIGN_CENTER, b.w - 2 * inset,
                   "%zu/%zu", received, expected);
    } else {
        use_font(c, fs, false);
        draw_text(c, b.x + b.w / 2, b.y + (b.h + fs * 0.7) / 2, ALIGN_CENTER, b.w - 2 * inset, pct);
    }
}

/* The grid of one row: a label, then weeks [w0, w1). */
static void completion_row(canvas *c, box row, double label_w, const char *label, bool bold,
                           const size_t *received, const size_t *expected, size_t w0, size_t w1,
                           double fs)
{
    double col_w = (row.w - label_w) / (double)(w1 - w0);
    grey(c, 0.1);
    use_font(c, fs, bold);
    draw_text(c, row.x + 2 * c->u, row.y + (row.h + fs * 0.7) / 2, ALIGN_LEFT, label_w - 6 * c->u,
              label);
    for (size_t w = w0; w < w1; w++) {
        box cell = {row.x + label_w + (double)(w - w0) * col_w, row.y, col_w, row.h};
        completion_cell(c, cell, received[w], expected[w], fs);
    }
}

static void site_label(const th_report_site *s, char *dst, size_t cap)
{
    if (s->name && s->name[0] && s->id && strcmp(s->name, s->id) != 0) {
        snprintf(dst, cap, "%s (%s)", s->name, s->id);
    } else {
        snprintf(dst, cap, "%s", s->name && s->name[0] ? s->name : s->id ? s->id : "");
    }
}

static void site_totals(const th_report *r, size_t received[], size_t expected[])
{
    for (size_t w = 0; w < r->nweeks; w++) {
        received[w] = expected[w] = 0;
        for (size_t i = 0; i < r->nsites; i++) {
            received[w] += r->sites[i].received[w];
            expected[w] += r->sites[i].expected[w];
        }
    }
}

static void completion_header(canvas *c, box row, double label_w, size_t w0, size_t w1, double fs)
{
    double col_w = (row.w - label_w) / (double)(w1 - w0);
    cairo_rectangle(c->cr, row.x, row.y, row.w, row.h);
    grey(c, 0.92);
    cairo_fill(c->cr);
    grey(c, 0.1);
    use_font(c, fs, true);
    double base = row.y + (row.h + fs * 0.7) / 2;
    draw_text(c, row.x + 2 * c->u, base, ALIGN_LEFT, label_w, "Site");
    for (size_t w = w0; w < w1; w++) {
        draw_textf(c, row.x + label_w + ((double)(w - w0) + 0.5) * col_w, base, ALIGN_CENTER,
                   col_w - 2, col_w > 34 * c->u ? "Week %d" : "%d", c->r->weeks[w]);
    }
}

/* The image version: one grid with every week; sites that do not fit are counted below. */
static int draw_completion(canvas *c, box b)
{
    const th_report *r = c->r;
    double u = c->u;
    grey(c, 0.05);
    use_font(c, 9.5 * u, true);
    draw_text(c, b.x, b.y + 10 * u, ALIGN_LEFT, b.w,
              "Completion by site and visit week (patients with a response / visits due)");
    if (r->nweeks == 0) {
        return check(c);
    }
    double top = b.y + 18 * u, bottom = b.y + b.h - 14 * u;
    double label_w = fmin(b.w * 0.28, 150 * u);
    double row_h = fmin(40 * u, (bottom - top) / (double)(r->nsites + 2));
    size_t shown = r->nsites;
    if (row_h < 10 * u) {
        row_h = 10 * u;
        size_t fit = (size_t)((bottom - top) / row_h);
        shown = fit > 3 ? fit - 3 : 0; /* room for the header, the totals and the note */
    }
    double fs = fmin(9 * u, row_h * 0.36);
    if ((b.w - label_w) / (double)r->nweeks < 28 * u || row_h < 20 * u) {
        fs = fmin(7.5 * u, row_h * 0.6);
    }
    completion_header(c, (box){b.x, top, b.w, row_h}, label_w, 0, r->nweeks, fs);
    double y = top + row_h;
    for (size_t i = 0; i < shown; i++, y += row_h) {
        int rc = check(c);
        if (rc != 0) {
            return rc;
        }
        char label[TEXT_MAX];
        site_label(&r->sites[i], label, sizeof(label));
        completion_row(c, (box){b.x, y, b.w, row_h}, label_w, label, false, r->sites[i].received,
                       r->sites[i].expected, 0, r->nweeks, fs);
    }
    size_t received[TH_REPORT_MAX_WEEKS], expected[TH_REPORT_MAX_WEEKS];
    site_totals(r, received, expected);
    completion_row(c, (box){b.x, y, b.w, row_h}, label_w, "All sites", true, received, expected, 0,
                   r->nweeks, fs);
    y += row_h;
    grey(c, 0.3);
    use_font(c, 7 * u, false);
    if (shown < r->nsites) {
        draw_textf(c, b.x, y + 10 * u, ALIGN_LEFT, b.w,
                   "%zu more sites not shown (\"All sites\" counts them); the PDF report lists "
                   "every site.",
                   r->nsites - shown);
    } else {
        draw_text(c, b.x, y + 10 * u, ALIGN_LEFT, b.w,
                  "Darker: higher completion. Grey (\xe2\x80\x93): no visit due yet.");
    }
    return check(c);
}

/* ---- PDF pages --------------------------------------------------------------------------- */

/* Ends the page in progress, if any, and starts the next with the running header and footer.
 * The context is checked at every page. */
static int new_page(canvas *c)
{
    if (c->page > 0) {
        cairo_show_page(c->cr);
    }
    int rc = check(c);
    if (rc != 0) {
        return rc;
    }
    c->page++;
    char name[TEXT_MAX], when[sizeof(c->r->generated_at) + 1];
    generated_at(c->r, when);
    const char *title = c->r->trial_name && c->r->trial_name[0] ? c->r->trial_name : "";
    clean_utf8(title, name, 160);
    use_font(c, 7, false);
    grey(c, 0.4);
    draw_textf(c, c->x0, 30, ALIGN_LEFT, (c->x1 - c->x0) * 0.7, "Interim report \xc2\xb7 %s", name);
    draw_text(c, c->x1, 30, ALIGN_RIGHT, (c->x1 - c->x0) * 0.28, c->r->trial_id);
    draw_textf(c, c->x0, A4_H - 24, ALIGN_LEFT, (c->x1 - c->x0) * 0.7, "Generated %s by trialhub",
               when);
    draw_textf(c, c->x1, A4_H - 24, ALIGN_RIGHT, 80, "Page %d", c->page);
    grey(c, 0.75);
    cairo_set_line_width(c->cr, 0.4);
    cairo_move_to(c->cr, c->x0, 35);
    cairo_line_to(c->cr, c->x1, 35);
    cairo_move_to(c->cr, c->x0, A4_H - 34);
    cairo_line_to(c->cr, c->x1, A4_H - 34);
    cairo_stroke(c->cr);
    c->y = c->top;
    return check(c);
}

/* Makes room for h points below the cursor, on a new page if needed. */
static int need(canvas *c, double h)
{
    if (c->page > 0 && c->y + h <= c->bottom) {
        return 0;
    }
    return new_page(c);
}

/* A numbered section title, kept on the page with the first follow_h points of its content,
 * and an outline (bookmark) entry. Returns the outline id through *outline (may be NULL). A
 * subsection (parent != 0) has only the bookmark: its chart carries the title. */
static int section(canvas *c, const char *title, double follow_h, int parent, int *outline)
{
    int rc = need(c, 30 + follow_h);
    if (rc != 0) {
        return rc;
    }
    char link[64];
    snprintf(link, sizeof(link), "page=%d pos=[%.1f %.1f]", c->page, c->x0, c->y);
    char name[TEXT_MAX];
    clean_utf8(title, name, sizeof(name));
    int id = cairo_pdf_surface_add_outline(c->surface, parent, name, link,
                                           parent ? 0 : CAIRO_PDF_OUTLINE_FLAG_OPEN);
    if (outline) {
        *outline = id;
    }
    if (parent) {
        c->y += 10;
        return check(c);
    }
    c->y += 10;
    grey(c, 0.05);
    use_font(c, 13, true);
    draw_text(c, c->x0, c->y + 12, ALIGN_LEFT, c->x1 - c->x0, title);
    c->y += 18;
    grey(c, 0.2);
    cairo_set_line_width(c->cr, 0.8);
    cairo_move_to(c->cr, c->x0, c->y);
    cairo_line_to(c->cr, c->x1, c->y);
    cairo_stroke(c->cr);
    c->y += 8;
    return check(c);
}

/* Tables: fixed column widths (points), a header row repeated on every page the table runs to. */
typedef struct column {
    const char *title;
    double width;
    int align;
} column;

typedef struct table {
    const column *cols;
    size_t ncols;
    double row_h, fs;
} table;

static void table_header(canvas *c, const table *t)
{
    double width = 0;
    for (size_t i = 0; i < t->ncols; i++) {
        width += t->cols[i].width;
    }
    cairo_rectangle(c->cr, c->x0, c->y, width, t->row_h);
    grey(c, 0.92);
    cairo_fill(c->cr);
    grey(c, 0.1);
    use_font(c, t->fs, true);
    double x = c->x0, base = c->y + (t->row_h + t->fs * 0.7) / 2;
    for (size_t i = 0; i < t->ncols; i++) {
        const column *col = &t->cols[i];
        double tx = col->align == ALIGN_LEFT    ? x + 3
                    : col->align == ALIGN_RIGHT ? x + col->width - 3
                                                : x + col->width / 2;
        draw_text(c, tx, base, col->align, col->width - 4, col->title);
        x += col->width;
    }
    c->y += t->row_h;
}

/* Room for the table's header and first row. */
static int table_begin(canvas *c, const table *t)
{
    int rc = need(c, 2 * t->row_h);
    if (rc == 0) {
        table_header(c, t);
    }
    return rc;
}

/* Room for the next row: on a new page, the header again. */
static int table_next(canvas *c, const table *t)
{
    int page = c->page;
    int rc = check(c);
    if (rc == 0) {
        rc = need(c, t->row_h);
    }
    if (rc == 0 && c->page != page) {
        table_header(c, t);
    }
    return rc;
}

static void table_row(canvas *c, const table *t, const char *const *cells, bool bold)
{
    use_font(c, t->fs, bold);
    grey(c, 0.1);
    double x = c->x0, base = c->y + (t->row_h + t->fs * 0.7) / 2;
    for (size_t i = 0; i < t->ncols; i++) {
        const column *col = &t->cols[i];
        if (cells[i]) {
            double tx = col->align == ALIGN_LEFT    ? x + 3
                        : col->align == ALIGN_RIGHT ? x + col->width - 3
                                                    : x + col->width / 2;
            draw_text(c, tx, base, col->align, col->width - 5, cells[i]);
        }
        x += col->width;
    }
    grey(c, 0.85);
    cairo_set_line_width(c->cr, 0.3);
    cairo_move_to(c->cr, c->x0, c->y + t->row_h);
    cairo_line_to(c->cr, x, c->y + t->row_h);
    cairo_stroke(c->cr);
    c->y += t->row_h;
}

static int pdf_title(canvas *c)
{
    const th_report *r = c->r;
    int rc = new_page(c);
    if (rc != 0) {
        return rc;
    }
    double w = c->x1 - c->x0;
    grey(c, 0.05);
    use_font(c, 20, true);
    draw_text(c, c->x0, c->y + 20, ALIGN_LEFT, w, "Interim report");
    use_font(c, 14, false);
    draw_text(c, c->x0, c->y + 42, ALIGN_LEFT, w,
              r->trial_name && r->trial_name[0] ? r->trial_name : r->trial_id);
    c->y += 62;

    char when[sizeof(r->generated_at) + 1], arms[TEXT_MAX] = "", weeks[TEXT_MAX] = "";
    generated_at(r, when);
    size_t len = 0;
    for (size_t a = 0; a < r->narms && len < sizeof(arms); a++) {
        int n = snprintf(arms + len, sizeof(arms) - len, "%s%s: %zu", a ? ", " : "",
                         r->arms[a] ? r->arms[a] : "", r->enrolled_by_arm[a]);
        len += n > 0 ? (size_t)n : 0;
    }
    len = 0;
    for (size_t i = 0; i < r->nweeks && len < sizeof(weeks); i++) {
        int n = snprintf(weeks + len, sizeof(weeks) - len, "%s%d", i ? ", " : "", r->weeks[i]);
        len += n > 0 ? (size_t)n : 0;
    }
    char responses[32], patients[32], alerts[32], sites[32];
    snprintf(responses, sizeof(responses), "%zu", r->responses);
    snprintf(patients, sizeof(patients), "%zu", r->patients);
    snprintf(alerts, sizeof(alerts), "%zu", r->alerts);
    snprintf(sites, sizeof(sites), "%zu", r->nsites);
    const char *rows[][2] = {
        {"Trial", r->trial_id},          {"Generated at", when},    {"Responses", responses},
        {"Patients enrolled", patients}, {"Enrolled by arm", arms}, {"Sites", sites},
        {"Visit weeks", weeks},          {"Safety alerts", alerts},
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        use_font(c, 9.5, false);
        grey(c, 0.35);
        draw_text(c, c->x0, c->y + 10, ALIGN_LEFT, 110, rows[i][0]);
        grey(c, 0.05);
        use_font(c, 9.5, true);
        draw_text(c, c->x0 + 115, c->y + 10, ALIGN_LEFT, w - 115, rows[i][1]);
        c->y += 14;
    }
    c->y += 6;
    return check(c);
}

static int pdf_enrolment(canvas *c)
{
    const th_report *r = c->r;
    int rc = section(c, "1  Enrolment by site", 60, 0, NULL);
    if (rc != 0) {
        return rc;
    }
    /* Site, name, a column per arm when they fit, total, share of all patients. */
    size_t arm_cols = r->narms <= 4 ? r->narms : 0;
    column cols[4 + 4 + 1] = {{"Site", 64, ALIGN_LEFT}, {"Name", 0, ALIGN_LEFT}};
    size_t ncols = 2;
    char titles[4][80];
    double fixed = 64 + 52 + 56;
    for (size_t a = 0; a < arm_cols; a++) {
        arm_label(r->arms[a], titles[a], sizeof(titles[a]));
        cols[ncols++] = (column){titles[a], 48, ALIGN_RIGHT};
        fixed += 48;
    }
    cols[ncols++] = (column){"Enrolled", 52, ALIGN_RIGHT};
    cols[ncols++] = (column){"Share", 56, ALIGN_RIGHT};
    cols[1].width = (c->x1 - c->x0) - fixed;
    table t = {cols, ncols, 15, 8};
    rc = table_begin(c, &t);
    char nums[6][48];
    const char *cells[9];
    for (size_t i = 0; rc == 0 && i <= r->nsites; i++) {
        rc = table_next(c, &t);
        if (rc != 0) {
            break;
        }
        bool total = i == r->nsites;
        const th_report_site *s = total ? NULL : &r->sites[i];
        size_t k = 0, enrolled = total ? r->patients : s->enrolled;
        cells[k++] = total ? "All sites" : s->id;
        cells[k++] = total ? "" : s->name;
        for (size_t a = 0; a < arm_cols; a++, k++) {
            if (!total && !site_by_arm(r, s)) {
                cells[k] = no_value;
            } else {
                snprintf(nums[a], sizeof(nums[a]), "%zu",
                         total ? r->enrolled_by_arm[a] : s->enrolled_by_arm[a]);
                cells[k] = nums[a];
            }
        }
        snprintf(nums[4], sizeof(nums[4]), "%zu", enrolled);
        cells[k++] = nums[4];
        if (r->patients) {
            snprintf(nums[5], sizeof(nums[5]), "%.1f%%",
                     100.0 * (double)enrolled / (double)r->patients);
            cells[k++] = nums[5];
        } else {
            cells[k++] = no_value;
        }
        table_row(c, &t, cells, total);
    }
    /* The chart, SITES_PER_CHART sites at a time. */
    for (size_t from = 0; rc == 0 && from < r->nsites; from += SITES_PER_CHART) {
        size_t to = r->nsites - from > SITES_PER_CHART ? from + SITES_PER_CHART : r->nsites;
        double rows = (double)(to - from > r->narms ? to - from : r->narms);
        double legend_h = draw_legend(c, c->x0, 0, c->x1 - c->x0, false, false);
        double h = 50 + legend_h + rows * 15;
        rc = need(c, h + 12);
        if (rc == 0) {
            c->y += 12;
            rc = draw_enrolment(c, (box){c->x0, c->y, c->x1 - c->x0, h}, from, to);
            c->y += h;
        }
    }
    return rc;
}

static int pdf_completion(canvas *c)
{
    const th_report *r = c->r;
    int rc = section(c, "2  Completion by site and visit", 60, 0, NULL);
    if (rc != 0 || r->nweeks == 0) {
        return rc;
    }
    double w = c->x1 - c->x0, label_w = 140, row_h = 22, fs = 7.5;
    use_font(c, 8, false);
    grey(c, 0.25);
    draw_text(c, c->x0, c->y + 8, ALIGN_LEFT, w,
              "Each cell: patients with any response at the visit / patients whose visit is due, "
              "and the percentage.");
    draw_text(c, c->x0, c->y + 19, ALIGN_LEFT, w,
              "Darker: higher completion. Grey (\xe2\x80\x93): no visit due yet.");
    c->y += 26;
    size_t per_table = (size_t)((w - label_w) / WEEK_COL_MIN);
    per_table = per_table ? per_table : 1;
    size_t received[TH_REPORT_MAX_WEEKS], expected[TH_REPORT_MAX_WEEKS];
    site_totals(r, received, expected);
    for (size_t w0 = 0; rc == 0 && w0 < r->nweeks; w0 += per_table) {
        size_t w1 = r->nweeks - w0 > per_table ? w0 + per_table : r->nweeks;
        double tw = label_w + (double)(w1 - w0) * fmin(70, (w - label_w) / (double)(w1 - w0));
        rc = need(c, 2 * row_h + 8);
        if (rc != 0) {
            break;
        }
        c->y += 8;
        completion_header(c, (box){c->x0, c->y, tw, row_h}, label_w, w0, w1, fs);
        c->y += row_h;
        for (size_t i = 0; rc == 0 && i <= r->nsites; i++) {
            int page = c->page;
            rc = check(c);
            rc = rc ? rc : need(c, row_h);
            if (rc != 0) {
                break;
            }
            if (c->page != page) {
                completion_header(c, (box){c->x0, c->y, tw, row_h}, label_w, w0, w1, fs);
                c->y += row_h;
            }
            box row = {c->x0, c->y, tw, row_h};
            if (i == r->nsites) {
                completion_row(c, row, label_w, "All sites", true, received, expected, w0, w1, fs);
            } else {
                char label[TEXT_MAX];
                site_label(&r->sites[i], label, sizeof(label));
                completion_row(c, row, label_w, label, false, r->sites[i].received,
                               r->sites[i].expected, w0, w1, fs);
            }
            c->y += row_h;
        }
    }
    return rc;
}

/* The statistics of one instrument's cells. */
static int pdf_score_table(canvas *c, const th_report_cell *cells, size_t n)
{
    static const column cols[] = {
        {"Arm", 35, ALIGN_LEFT},
        {"Week", 26, ALIGN_RIGHT},
        {"Rec./due", 46, ALIGN_RIGHT},
        {"Compl.", 33, ALIGN_RIGHT},
        {"n", 22, ALIGN_RIGHT},
        {"Mean (SD)", 54, ALIGN_RIGHT},
        {"Median [Q1, Q3]", 70, ALIGN_RIGHT},
        {"95% CI", 56, ALIGN_RIGHT},
        {"\xce\x94 n", 22, ALIGN_RIGHT},
        {"\xce\x94 Mean (SD)", 54, ALIGN_RIGHT},
        {"\xce\x94 95% CI", 56, ALIGN_RIGHT},
        {"Alerts", 32, ALIGN_RIGHT},
    };
    table t = {cols, sizeof(cols) / sizeof(cols[0]), 13, 6.8};
    int rc = table_begin(c, &t);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = table_next(c, &t);
        if (rc != 0) {
            break;
        }
        const th_report_cell *cell = &cells[i];
        const th_stats *s = &cell->score, *d = &cell->change;
        char week[16], rec[64], pct[32], score_n[32], change_n[32], alerts[32];
        char mean[80], dmean[80], median[112], ci[80], dci[80];
        snprintf(week, sizeof(week), "%d", cell->week);
        snprintf(rec, sizeof(rec), "%zu/%zu", cell->received, cell->expected);
        snprintf(score_n, sizeof(score_n), "%zu", s->n);
        snprintf(change_n, sizeof(change_n), "%zu", d->n);
        snprintf(alerts, sizeof(alerts), "%zu", cell->alerts);
        fmt_mean_sd(mean, s);
        fmt_mean_sd(dmean, d);
        fmt_ci(ci, s);
        fmt_ci(dci, d);
        if (isfinite(s->median)) {
            char x[3][32];
            snprintf(median, sizeof(median), "%s [%s, %s]", fmt1(x[0], s->median),
                     fmt1(x[1], s->q1), fmt1(x[2], s->q3));
        } else {
            snprintf(median, sizeof(median), "%s", no_value);
        }
        const char *row[12] = {
            cell->arm, week,  rec,    fmt_pct(pct, cell->received, cell->expected),
            score_n,   mean,  median, ci,
            change_n,  dmean, dci,    alerts};
        table_row(c, &t, row, false);
    }
    return rc;
}

static int pdf_scores(canvas *c)
{
    const th_report *r = c->r;
    double chart_h = 290;
    int parent = 0;
    int rc = section(c, "3  Scores by visit", chart_h, 0, &parent);
    if (rc != 0) {
        return rc;
    }
    if (r->ncells == 0) {
        use_font(c, 9, false);
        grey(c, 0.3);
        draw_text(c, c->x0, c->y + 10, ALIGN_LEFT, c->x1 - c->x0, "No scored responses yet.");
        c->y += 16;
        return check(c);
    }
    for (size_t from = 0, to; rc == 0 && from < r->ncells; from = to) {
        to = instrument_run(r, from);
        const char *name = r->cells[from].instrument_name ? r->cells[from].instrument_name
                                                          : r->cells[from].instrument;
        rc = section(c, name ? name : "", chart_h, parent, NULL);
        if (rc == 0) {
            rc = draw_scores_panel(c, (box){c->x0, c->y, c->x1 - c->x0, chart_h}, &r->cells[from],
                                   to - from);
            c->y += chart_h + 8;
        }
        if (rc == 0) {
            rc = need(c, 40);
        }
        if (rc == 0) {
            use_font(c, 7, false);
            grey(c, 0.3);
            draw_text(c, c->x0, c->y + 7, ALIGN_LEFT, c->x1 - c->x0,
                      "\xce\x94: change from the same patient's week-0 score. \xe2\x80\x93: no "
                      "data, or too few patients.");
            c->y += 11;
            rc = pdf_score_table(c, &r->cells[from], to - from);
        }
    }
    return rc;
}

static int pdf_alerts(canvas *c)
{
    const th_report *r = c->r;
    int rc = section(c, "4  Safety alerts by site", 40, 0, NULL);
    if (rc != 0) {
        return rc;
    }
    double bar_w = 120;
    column cols[] = {
        {"Site", 64, ALIGN_LEFT},         {"Name", 0, ALIGN_LEFT},
        {"Enrolled", 52, ALIGN_RIGHT},    {"Alerts", 46, ALIGN_RIGHT},
        {"Per patient", 58, ALIGN_RIGHT}, {"", bar_w, ALIGN_LEFT},
    };
    cols[1].width = (c->x1 - c->x0) - (64 + 52 + 46 + 58 + bar_w);
    table t = {cols, sizeof(cols) / sizeof(cols[0]), 15, 8};
    size_t max_alerts = 0;
    for (size_t i = 0; i < r->nsites; i++) {
        max_alerts = r->sites[i].alerts > max_alerts ? r->sites[i].alerts : max_alerts;
    }
    rc = table_begin(c, &t);
    for (size_t i = 0; rc == 0 && i <= r->nsites; i++) {
        rc = table_next(c, &t);
        if (rc != 0) {
            break;
        }
        bool total = i == r->nsites;
        const th_report_site *s = total ? NULL : &r->sites[i];
        size_t enrolled = total ? r->patients : s->enrolled, alerts = total ? r->alerts : s->alerts;
        char nums[3][48];
        snprintf(nums[0], sizeof(nums[0]), "%zu", enrolled);
        snprintf(nums[1], sizeof(nums[1]), "%zu", alerts);
        if (enrolled) {
            snprintf(nums[2], sizeof(nums[2]), "%.2f", (double)alerts / (double)enrolled);
        } else {
            snprintf(nums[2], sizeof(nums[2]), "%s", no_value);
        }
        const char *cells[] = {
            total ? "All sites" : s->id, total ? "" : s->name, nums[0], nums[1], nums[2], NULL};
        if (!total && max_alerts) {
            double w = (bar_w - 8) * (double)alerts / (double)max_alerts;
            cairo_rectangle(c->cr, c->x1 - bar_w + 4, c->y + 4, w, t.row_h - 8);
            cairo_set_source_rgb(c->cr, 0.70, 0.16, 0.16);
            cairo_fill(c->cr);
        }
        table_row(c, &t, cells, total);
    }
    return rc;
}

static int pdf_notes(canvas *c)
{
    static const char *const lines[] = {
        "Completion: patients with a response at the visit / patients whose visit is due by the "
        "report date.",
        "Score statistics: n, mean (SD), median [Q1, Q3] (linear interpolation), and the 95% CI "
        "of the mean",
        "(mean \xc2\xb1 t(0.975, n \xe2\x88\x92 1) \xc2\xb7 SD / \xe2\x88\x9an; needs n "
        "\xe2\x89\xa5 "
        "2). Each patient counts once per visit (the latest response).",
        "Change: score minus the same patient's week-0 score. Safety alerts are counted in every "
        "state (open or closed).",
    };
    size_t nlines = sizeof(lines) / sizeof(lines[0]);
    int rc = section(c, "Notes", (double)nlines * 11, 0, NULL);
    use_font(c, 7.5, false);
    grey(c, 0.25);
    for (size_t i = 0; rc == 0 && i < nlines; i++) {
        draw_text(c, c->x0, c->y + 8, ALIGN_LEFT, c->x1 - c->x0, lines[i]);
        c->y += 11;
    }
    return rc ? rc : check(c);
}

static void pdf_metadata(canvas *c)
{
    const th_report *r = c->r;
    char title[TEXT_MAX], name[256], when[sizeof(r->generated_at) + 1];
    clean_utf8(r->trial_name && r->trial_name[0] ? r->trial_name : r->trial_id, name, sizeof(name));
    snprintf(title, sizeof(title), "Interim report: %s", name);
    cairo_pdf_surface_set_metadata(c->surface, CAIRO_PDF_METADATA_TITLE, title);
    cairo_pdf_surface_set_metadata(c->surface, CAIRO_PDF_METADATA_CREATOR, "trialhub");
    /* The report's time, not the clock's: the same report renders to the same bytes. Only a
     * well-formed YYYY-MM-DDThh:mm:ss prefix is passed on. */
    generated_at(r, when);
    static const char shape[] = "dddd-dd-ddTdd:dd:dd";
    bool ok = strlen(when) >= sizeof(shape) - 1;
    for (size_t i = 0; ok && i < sizeof(shape) - 1; i++) {
        ok = shape[i] == 'd' ? when[i] >= '0' && when[i] <= '9' : when[i] == shape[i];
    }
    if (ok) {
        memcpy(when + sizeof(shape) - 1, "Z", 2);
        cairo_pdf_surface_set_metadata(c->surface, CAIRO_PDF_METADATA_CREATE_DATE, when);
    }
}

static int render_pdf(th_ctx *ctx, const th_report *r, th_buf *out)
{
    sink s = {.out = out, .ctx = ctx};
    canvas c = {.ctx = ctx, .r = r, .sink = &s, .u = 1};
    c.x0 = MARGIN;
    c.x1 = A4_W - MARGIN;
    c.top = 50;
    c.bottom = A4_H - 46;
    c.surface = cairo_pdf_surface_create_for_stream(sink_write, &s, A4_W, A4_H);
    int rc = canvas_open(&c);
    if (rc == 0) {
        pdf_metadata(&c);
        rc = pdf_title(&c);
    }
    rc = rc ? rc : pdf_enrolment(&c);
    rc = rc ? rc : pdf_completion(&c);
    rc = rc ? rc : pdf_scores(&c);
    rc = rc ? rc : pdf_alerts(&c);
    rc = rc ? rc : pdf_notes(&c);
    return canvas_close(&c, rc);
}

/* ---- PNG and SVG: one chart -------------------------------------------------------------- */

static int draw_chart(canvas *c, th_report_chart chart)
{
    const th_report *r = c->r;
    double u = c->u;
    cairo_set_source_rgb(c->cr, 1, 1, 1);
    cairo_paint(c->cr);
    char when[sizeof(r->generated_at) + 1];
    generated_at(r, when);
    grey(c, 0.05);
    use_font(c, 11 * u, true);
    draw_textf(c, 16 * u, 20 * u, ALIGN_LEFT, IMAGE_W * 0.7, "%s (%s)",
               r->trial_name ? r->trial_name : "", r->trial_id ? r->trial_id : "");
    use_font(c, 7 * u, false);
    grey(c, 0.4);
    draw_textf(c, IMAGE_W - 16 * u, 20 * u, ALIGN_RIGHT, IMAGE_W * 0.28, "Generated %s", when);
    box b = {16 * u, 32 * u, IMAGE_W - 32 * u, IMAGE_H - 40 * u};
    switch (chart) {
    case TH_CHART_ENROLMENT: {
        /* Rows of at least 9 points; further sites are counted under the chart. */
        double legend_h = draw_legend(c, b.x, 0, b.w, false, false);
        size_t fit = (size_t)fmax(1, (b.h - 56 * u - legend_h) / (9 * u));
        size_t shown = r->nsites < fit ? r->nsites : fit;
        b.h -= shown < r->nsites ? 12 * u : 0;
        int rc = draw_enrolment(c, b, 0, shown);
        if (rc == 0 && shown < r->nsites) {
            use_font(c, 7 * u, false);
            grey(c, 0.3);
            draw_textf(c, b.x, b.y + b.h + 8 * u, ALIGN_LEFT, b.w,
                       "%zu more sites not shown; the PDF report lists every site.",
                       r->nsites - shown);
        }
        return rc ? rc : check(c);
    }
    case TH_CHART_COMPLETION:
        return draw_completion(c, b);
    case TH_CHART_SCORES:
    default: {
        size_t panels = 0;
        for (size_t from = 0; from < r->ncells; from = instrument_run(r, from)) {
            panels++;
        }
        if (panels == 0) {
            use_font(c, 10 * u, false);
            grey(c, 0.4);
            draw_text(c, b.x + b.w / 2, b.y + b.h / 2, ALIGN_CENTER, b.w,
                      "No scored responses yet");
            return check(c);
        }
        double panel_h = b.h / (double)panels;
        size_t k = 0;
        for (size_t from = 0, to; from < r->ncells; from = to, k++) {
            to = instrument_run(r, from);
            box pb = {b.x, b.y + (double)k * panel_h, b.w, panel_h - 6 * u};
            int rc = draw_scores_panel(c, pb, &r->cells[from], to - from);
            if (rc != 0) {
                return rc;
            }
        }
        return check(c);
    }
    }
}

static int render_image(th_ctx *ctx, const th_report *r, th_report_format format,
                        th_report_chart chart, th_buf *out)
{
    sink s = {.out = out, .ctx = ctx};
    canvas c = {.ctx = ctx, .r = r, .sink = &s, .u = IMAGE_U};
    if (format == TH_REPORT_PNG) {
        c.surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, IMAGE_W, IMAGE_H);
    } else {
        c.surface = cairo_svg_surface_create_for_stream(sink_write, &s, IMAGE_W, IMAGE_H);
        cairo_svg_surface_set_document_unit(c.surface, CAIRO_SVG_UNIT_PX);
    }
    int rc = canvas_open(&c);
    rc = rc ? rc : draw_chart(&c, chart);
    if (rc == 0 && format == TH_REPORT_PNG) {
        cairo_surface_flush(c.surface);
        rc = status_err(cairo_surface_write_to_png_stream(c.surface, sink_write, &s), &s);
    }
    return canvas_close(&c, rc);
}

/* ---- entry points ------------------------------------------------------------------------ */

static bool report_ok(const th_report *r)
{
    return r->nweeks <= TH_REPORT_MAX_WEEKS && r->narms <= TH_REPORT_MAX_ARMS &&
           (r->narms == 0 || (r->arms && r->enrolled_by_arm)) && (r->nsites == 0 || r->sites) &&
           (r->ncells == 0 || r->cells);
}

int th_report_render(th_ctx *ctx, const th_report *report, th_report_format format,
                     th_report_chart chart, th_buf *out)
{
    bool image = format == TH_REPORT_PNG || format == TH_REPORT_SVG;
    if (report == NULL || out == NULL || !report_ok(report) ||
        (image && (unsigned)chart > TH_CHART_COMPLETION)) {
        return TH_EINVAL;
    }
    if (th_buf_failed(out)) {
        return TH_ENOMEM;
    }
    int rc = ctx_err(ctx);
    if (rc != 0) {
        return rc;
    }
    size_t start = out->len;
    switch (format) {
    case TH_REPORT_JSON:
        rc = render_json(ctx, report, out);
        break;
    case TH_REPORT_CSV:
        rc = render_csv(ctx, report, out);
        break;
    case TH_REPORT_PDF:
        rc = render_pdf(ctx, report, out);
        break;
    case TH_REPORT_PNG:
    case TH_REPORT_SVG:
        rc = render_image(ctx, report, format, chart, out);
        break;
    default:
        rc = TH_EINVAL;
    }
    if (rc != 0) { /* leave out as it was */
        out->failed = false;
        out->len = start;
        if (out->data) {
            out->data[start] = '\0';
        }
    }
    return rc;
}

const char *th_report_media_type(th_report_format format)
{
    switch (format) {
    case TH_REPORT_JSON:
        return "application/json";
    case TH_REPORT_CSV:
        return "text/csv; charset=utf-8";
    case TH_REPORT_PDF:
        return "application/pdf";
    case TH_REPORT_PNG:
        return "image/png";
    case TH_REPORT_SVG:
        return "image/svg+xml";
    }
    return "application/octet-stream";
}
