/* Image analysis: the task an upload becomes, and the workers that do it. An analysis is a task
 * of kind "analysis" in the durable queue (queue.h) whose payload names the trial, the patient's
 * pseudonymous id, the image's blob key and what the upload's DICOM header said; its result is
 * the analyzer's JSON. Workers (threads of `trialhub serve` or of `trialhub worker` processes)
 * lease tasks, run the analyzer as a child process under the task's deadline (runner.h), keep
 * the lease alive with heartbeats (which is also how they learn of a cancel), and finish or fail
 * the task; a result is written once. Every state change is announced (live event task.state)
 * and, when the upload named a callback URL, a webhook delivery is queued (notify.h). */
#ifndef TRIALHUB_ANALYSIS_H
#define TRIALHUB_ANALYSIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/blob.h"
#include "trialhub/error.h"
#include "trialhub/events.h"
#include "trialhub/metrics.h"
#include "trialhub/queue.h"
#include "trialhub/store.h"

#define TH_ANALYSIS_KIND "analysis"
#define TH_WEBHOOK_KIND  "webhook"

typedef struct th_workers th_workers;

typedef struct th_workers_config {
    th_queue *queue;
    th_store *store; /* webhook secrets */
    th_blob_store *blobs;
    th_events *events;           /* may be NULL */
    th_metrics *metrics;         /* may be NULL */
    unsigned threads;            /* analysis runners; 0: none (webhooks only, if webhook_threads) */
    unsigned webhook_threads;    /* webhook senders; 0: 1 */
    unsigned max_running;        /* analyses at once across every process; 0: no limit */
    char *const *analyzer;       /* argv of the analyzer, NULL-terminated (copied) */
    uint32_t lease_ms;           /* 0: 30000 */
    uint32_t task_timeout_ms;    /* one attempt's deadline; 0: 600000 */
    uint32_t heartbeat_ms;       /* 0: min(lease/3, 500): a cancel stops the analyzer within it */
    size_t max_output;           /* analyzer stdout; 0: 1 MiB */
    const char *name;            /* worker name prefix (host:pid by default) */
    bool webhook_allow_private;  /* callbacks to loopback/private addresses (tests) */
    uint32_t webhook_timeout_ms; /* 0: 10000 */
} th_workers_config;

/* Starts the worker threads. Returns 0, TH_EINVAL, TH_ENOMEM or TH_ESYS. */
TH_MUST_CHECK int th_workers_start(const th_workers_config *config, th_workers **out);

/* Stops: running analyzers get SIGTERM (then SIGKILL after the grace period), their tasks are
 * failed as retryable ("worker shutting down") so that another worker redoes them, and the
 * threads are joined. NULL is a no-op. */
void th_workers_stop(th_workers *workers);

/* The payload of an analysis task, as the upload writes it (JSON text into out). Strings are
 * ids and codes only. Returns 0 or TH_ENOMEM. */
typedef struct th_analysis_request {
    const char *trial_id;
    const char *subject;
    const char *blob_key;
    const char *modality;
    uint32_t rows, columns;
    uint64_t size;
    const char *callback_url; /* NULL: none */
} th_analysis_request;

TH_MUST_CHECK int th_analysis_payload(const th_analysis_request *req, char **json_out);

/* Queues the webhook delivery that tells task's callback URL about its state, once per state
 * (idempotency key). Does nothing if the task has no callback URL. Returns 0 or the queue's
 * error. */
TH_MUST_CHECK int th_analysis_notify(th_ctx *ctx, th_queue *queue, const char *task_id);

/* Publishes task.state for task on topic "tasks" (and the trial's topic). */
void th_analysis_announce(th_events *events, const th_task *task);

#endif
