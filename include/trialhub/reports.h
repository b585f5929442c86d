/* The report service: interim reports computed on a bounded pool of their own (apart from the
 * HTTP threads and from scoring), each under a context with a deadline, shared between identical
 * concurrent requests, and cancelled the moment nobody waits for them any more. Also keeps the
 * asynchronous report jobs (POST /v1/trials/{id}/reports) in memory: a job is a waiter like an
 * HTTP request, so both use the same code.
 *
 * Metrics: trialhub_reports_total{outcome,stage} per computation (outcome = completed |
 * client_canceled | timed_out | failed | overloaded) and trialhub_report_cancel_latency_seconds,
 * the time from the cancel (last waiter gone, or deadline) to the last work done on it. */
#ifndef TRIALHUB_REPORTS_H
#define TRIALHUB_REPORTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/error.h"
#include "trialhub/metrics.h"
#include "trialhub/report.h"
#include "trialhub/store.h"

typedef struct th_reports th_reports;
typedef struct th_report_waiter th_report_waiter;

typedef struct th_reports_config {
    th_store *store;
    th_metrics *metrics;     /* may be NULL */
    unsigned threads;        /* 0: 2 */
    unsigned queue;          /* computations that may wait for a thread; 0: 8 */
    unsigned max_jobs;       /* asynchronous jobs kept in memory; 0: 64 */
    unsigned job_ttl_s;      /* a finished job is kept this long; 0: 3600 */
    size_t max_output_bytes; /* most bytes one report may render to; 0: 64 MiB */
} th_reports_config;

typedef struct th_report_key {
    const char *trial_id;
    th_report_format format;
    th_report_chart chart; /* PNG/SVG only */
} th_report_key;

/* Called exactly once per started waiter, on a report thread: status 0 with the rendered bytes
 * (valid during the call only), or an error (TH_ETIMEDOUT, TH_ECANCELED, TH_ENOTFOUND,
 * TH_ESHUTDOWN, TH_ENOMEM, TH_ETOOBIG, TH_EIO) with the stage that was running ("queue",
 * "query", "statistics", "render"). Must be quick: copy, resume a request, return. */
typedef void (*th_report_done_fn)(void *arg, int status, const char *stage, const char *media_type,
                                  const void *data, size_t len);

TH_MUST_CHECK int th_reports_create(const th_reports_config *config, th_reports **out);

/* Cancels every computation, waits for them, frees. Every done() has been called when it
 * returns. NULL is a no-op. */
void th_reports_destroy(th_reports *reports);

/* Asks for a report, to be ready by deadline_ns (monotonic). Joins a running computation of
 * the same key whose deadline is at most one second earlier; otherwise starts one. Returns 0
 * (done() will be called exactly once; *out identifies the waiter for th_reports_abandon()),
 * TH_EOVERLOAD (the report pool is full) or TH_ENOMEM; on error done() is never called.
 * Thread-safe. */
TH_MUST_CHECK int th_reports_start(th_reports *reports, const th_report_key *key,
                                   uint64_t deadline_ns, th_report_done_fn done, void *arg,
                                   th_report_waiter **out);

/* The waiter went away (client disconnected). Returns true if it was detached before its
 * done() started: done() will never be called, and the computation is cancelled if nobody else
 * waits for it. Returns false if done() is running or has run (it owns the completion).
 * Thread-safe. */
bool th_reports_abandon(th_reports *reports, th_report_waiter *waiter);

/* ---- asynchronous jobs */

#define TH_REPORT_JOB_ID_LEN 24

typedef enum th_report_job_state {
    TH_JOB_RUNNING = 0,
    TH_JOB_DONE,
    TH_JOB_FAILED,
    TH_JOB_CANCELED,
    TH_JOB_TIMED_OUT,
} th_report_job_state;

typedef struct th_report_job_info {
    char id[TH_REPORT_JOB_ID_LEN + 1];
    char trial_id[TH_ID_MAX + 1];
    th_report_format format;
    th_report_chart chart;
    th_report_job_state state;
    char stage[16]; /* when it failed, timed out or was canceled */
    int error;      /* the trialhub error when failed */
    int64_t created_ms, finished_ms;
    size_t size; /* bytes of the result when done */
} th_report_job_info;

/* Starts a job. Returns 0 with *info filled, TH_EOVERLOAD (too many jobs, or the pool is full)
 * or TH_ENOMEM. Thread-safe. */
TH_MUST_CHECK int th_reports_job_start(th_reports *reports, const th_report_key *key,
                                       uint64_t timeout_ns, th_report_job_info *info);

/* Fills *info. Returns 0 or TH_ENOTFOUND (unknown or expired). */
TH_MUST_CHECK int th_reports_job_get(th_reports *reports, const char *id, th_report_job_info *info);

/* Appends a finished job's result to out and sets its media type. Returns 0, TH_ENOTFOUND,
 * TH_EAGAIN (not done: see its state) or TH_ENOMEM. */
TH_MUST_CHECK int th_reports_job_file(th_reports *reports, const char *id, th_buf *out,
                                      const char **media_type);

/* Cancels a running job (it stays, as canceled) or forgets a finished one. Returns 0 with
 * *was_running set, or TH_ENOTFOUND. */
TH_MUST_CHECK int th_reports_job_delete(th_reports *reports, const char *id, bool *was_running);

const char *th_report_job_state_name(th_report_job_state state);

#endif
