/* Interim reports: a trial's responses summarised per arm x visit week x instrument (score and
 * change from baseline statistics, completion against the schedule, safety alerts), per site
 * (enrolment, completion by visit, alerts), rendered as JSON, CSV, a printable PDF, or one chart
 * as PNG or SVG (cairo). Every stage runs under a th_ctx: a deadline or a client that went away
 * stops the SQL query, the statistics and the drawing within milliseconds.
 *
 * th_report is plain data: it is built by report.c from the store, and read by render.c. All of
 * its strings and arrays live in the report's own allocations, freed by th_report_destroy(). */
#ifndef TRIALHUB_REPORT_H
#define TRIALHUB_REPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/buf.h"
#include "trialhub/ctx.h"
#include "trialhub/error.h"
#include "trialhub/stats.h"
#include "trialhub/store.h"

#define TH_REPORT_MAX_WEEKS 32
#define TH_REPORT_MAX_ARMS  16 /* the admin API allows 16 */

/* One arm x visit week x instrument. */
typedef struct th_report_cell {
    const char *arm;
    const char *instrument;      /* the Questionnaire's canonical URL */
    const char *instrument_name; /* "PHQ-9", "GAD-7", or the URL for others */
    int week;
    th_stats score;  /* each patient's score at this visit (the latest if several) */
    th_stats change; /* score minus the same patient's week-0 score, where both exist */
    size_t expected; /* patients of the arm whose visit is due by the report's day */
    size_t received; /* patients of the arm with a scored response at this visit */
    size_t alerts;   /* safety alerts raised by responses of this cell */
} th_report_cell;

typedef struct th_report_site {
    const char *id;
    const char *name;
    size_t enrolled;
    size_t expected[TH_REPORT_MAX_WEEKS]; /* per scheduled week (index as in weeks[]) */
    size_t received[TH_REPORT_MAX_WEEKS]; /* patients with any response at that week */
    size_t alerts;
    /* Patients per arm (index as in th_report.arms). All zero while enrolled > 0 means "not
     * broken down": the renderers then show the site's total only. */
    size_t enrolled_by_arm[TH_REPORT_MAX_ARMS];
} th_report_site;

typedef struct th_report {
    const char *trial_id;
    const char *trial_name;
    char generated_at[40]; /* RFC 3339 UTC */
    size_t responses;      /* responses read */
    size_t patients;       /* enrolled */
    size_t alerts;         /* safety alerts, all states */
    const char **arms;
    size_t narms;
    size_t *enrolled_by_arm;        /* narms entries */
    int weeks[TH_REPORT_MAX_WEEKS]; /* the schedule */
    size_t nweeks;
    th_report_site *sites;
    size_t nsites;
    th_report_cell *cells; /* sorted by instrument, arm, week */
    size_t ncells;
    void *priv; /* report.c's allocations */
} th_report;

typedef enum th_report_format {
    TH_REPORT_JSON = 0,
    TH_REPORT_CSV,
    TH_REPORT_PDF,
    TH_REPORT_PNG, /* one chart */
    TH_REPORT_SVG, /* one chart */
} th_report_format;

typedef enum th_report_chart {
    TH_CHART_SCORES = 0, /* mean score (95% CI) by visit, one line per arm, per instrument */
    TH_CHART_ENROLMENT,  /* patients enrolled by site and arm */
    TH_CHART_COMPLETION, /* completion (received / expected) by site and visit */
} th_report_chart;

/* Builds the report of trial_id from store: reads the trial, its sites and patients, streams its
 * responses (stage "query"), then computes every cell's statistics (stage "statistics"). The
 * visits due are counted as of today (UTC). Returns 0 with *out set (th_report_destroy()),
 * TH_ENOTFOUND (no such trial), th_ctx_err(ctx), TH_EIO or TH_ENOMEM; *stage (if not NULL) names
 * the stage that was running when it returned. Thread-safe. */
TH_MUST_CHECK int th_report_build(th_ctx *ctx, th_store *store, const char *trial_id,
                                  th_report **out, const char **stage);

/* Renders report in format into out (appended). chart is used by PNG and SVG only. ctx (may be
 * NULL) is checked between charts and inside long loops. Returns 0, th_ctx_err(ctx), TH_ENOMEM,
 * TH_ETOOBIG (out's limit reached), TH_EIO (cairo failed), or TH_EINVAL (unknown format or
 * chart; a report with more than TH_REPORT_MAX_WEEKS weeks or TH_REPORT_MAX_ARMS arms). On error
 * out is left as it was. Thread-safe for distinct outputs (cairo contexts are per call). */
TH_MUST_CHECK int th_report_render(th_ctx *ctx, const th_report *report, th_report_format format,
                                   th_report_chart chart, th_buf *out);

/* Media type of a format ("application/json", "text/csv; charset=utf-8", "application/pdf",
 * "image/png", "image/svg+xml"). */
const char *th_report_media_type(th_report_format format);

void th_report_destroy(th_report *report);

#endif
