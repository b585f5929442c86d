/* The group-commit writer (DESIGN.md rule 6, "accepted means durable"): one thread owns the
 * store's write side. Requests hand it jobs through a bounded channel; it takes the first job
 * and whatever else is already queued (up to max_batch, optionally waiting max_wait_us for
 * more), applies them all in one transaction, commits (one fsync for the whole batch), and only
 * then completes every job. A full channel is refused at once (TH_EOVERLOAD: 503), so memory
 * does not grow with offered load. */
#ifndef TRIALHUB_WRITER_H
#define TRIALHUB_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"
#include "trialhub/metrics.h"
#include "trialhub/store.h"

typedef struct th_writer th_writer;
typedef struct th_write_job th_write_job;

/* A unit of work. The submitter owns the storage and must keep it alive until done() is called.
 * apply() runs on the writer thread inside the batch transaction and returns 0 or a job-level
 * error (TH_EEXIST, TH_ENOTFOUND, ...) that leaves the transaction usable; TH_EIO aborts the
 * whole batch. done() runs on the writer thread after the commit, exactly once, with apply's
 * result, or with TH_EIO if the batch failed, or TH_ESHUTDOWN if the writer stopped before
 * applying it; it must be quick (resume a connection, post a task). */
struct th_write_job {
    int (*apply)(th_store *store, th_write_job *job);
    void (*done)(th_write_job *job, int status);
    void *arg;
};

typedef struct th_writer_config {
    size_t queue_capacity; /* jobs that may wait for the writer; full -> TH_EOVERLOAD */
    unsigned max_batch;    /* most jobs in one transaction */
    unsigned max_wait_us;  /* how long to wait for more jobs before committing; 0: commit as
                            * soon as nothing more is queued (the batch grows by itself while
                            * the previous commit is in flight) */
} th_writer_config;

typedef struct th_writer_stats {
    uint64_t batches;
    uint64_t jobs;
    uint64_t failed_batches;
    size_t queued;
    uint64_t last_commit_ns; /* duration of the last commit */
    int64_t last_ok_ms;      /* wall time of the last successful commit, 0 if none */
    int fatal;               /* 0, or the error that stopped the writer (commit failure) */
} th_writer_stats;

/* Starts the writer thread on store (which it does not own). When metrics is not NULL the
 * writer registers and feeds trialhub_writer_batch_size and trialhub_writer_commit_seconds.
 * Returns 0, TH_EINVAL, TH_ENOMEM or TH_ESYS; *out is owned by the caller
 * (th_writer_destroy()). */
TH_MUST_CHECK int th_writer_create(th_store *store, const th_writer_config *config,
                                   th_metrics *metrics, th_writer **out);

/* Queues job without waiting. Returns 0 (done() will be called exactly once), TH_EOVERLOAD when
 * the queue is full, TH_ESHUTDOWN after stop, or TH_EIO after a fatal commit failure; on error
 * done() is never called. Thread-safe. */
TH_MUST_CHECK int th_writer_try_submit(th_writer *writer, th_write_job *job);

/* Like th_writer_try_submit() but waits for room until ctx ends (admin and CLI paths). */
TH_MUST_CHECK int th_writer_submit(th_ctx *ctx, th_writer *writer, th_write_job *job);

/* Runs job through the writer and waits for its done(): convenience for callers that have a
 * thread to spare (CLI, start-up, tests). Returns apply's result or the writer's error. */
TH_MUST_CHECK int th_writer_run(th_ctx *ctx, th_writer *writer,
                                int (*apply)(th_store *store, void *arg), void *arg);

void th_writer_get_stats(th_writer *writer, th_writer_stats *out);

/* Stops intake, commits every job already queued, and joins the thread. Idempotent. */
void th_writer_stop(th_writer *writer);

/* Stops (if needed) and frees. NULL is a no-op. */
void th_writer_destroy(th_writer *writer);

#endif
