/* Analysis and webhook workers: lease, run, heartbeat, finish or fail, announce, notify.
 *
 * Each worker thread owns the task it leased; nothing else is shared but the queue (its own
 * locking), the blob store (read-only paths) and the events hub. `stop` ends every wait and every
 * running analyzer (its context is a child of `stop`). */
#include "trialhub/analysis.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/core_int.h"
#include "trial/notify_int.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/log.h"
#include "trialhub/runner.h"

typedef struct worker {
    th_workers *ws;
    pthread_t thread;
    bool started;
    bool webhook;
    char owner[TH_TASK_OWNER_MAX + 1];
    /* the task being run (heartbeat tick) */
    const th_task *task;
} worker;

struct th_workers {
    th_workers_config cfg;
    char **argv; /* copy of cfg.analyzer */
    th_ctx *stop;
    worker *workers;
    size_t nworkers;
    th_metric *m_tasks;
};

static void count(th_workers *ws, const char *kind, const char *outcome)
{
    if (ws->m_tasks) {
        const char *labels[] = {kind, outcome};
        th_metric_add(ws->m_tasks, labels, 1);
    }
}

/* ---- payloads ----------------------------------------------------------------------------- */

int th_analysis_payload(const th_analysis_request *req, char **json_out)
{
    json_t *p =
        json_pack("{s:s,s:s,s:s,s:s,s:I,s:I,s:I}", "trial", req->trial_id, "subject", req->subject,
                  "blob", req->blob_key, "modality", req->modality, "rows", (json_int_t)req->rows,
                  "columns", (json_int_t)req->columns, "size", (json_int_t)req->size);
    if (p && req->callback_url) {
        json_object_set_new(p, "callback_url", json_string(req->callback_url));
    }
    char *text = p ? json_dumps(p, JSON_COMPACT) : NULL;
    json_decref(p);
    if (text == NULL) {
        return TH_ENOMEM;
    }
    size_t n = strlen(text);
    *json_out = th_malloc(n + 1);
    if (*json_out) {
        memcpy(*json_out, text, n + 1);
    }
    free(text);
    return *json_out ? 0 : TH_ENOMEM;
}

void th_analysis_announce(th_events *events, const th_task *task)
{
    if (!th_events_active(events)) {
        return;
    }
    json_t *payload = json_loads(task->payload ? task->payload : "{}", 0, NULL);
    const char *trial = json_string_value(json_object_get(payload, "trial"));
    char fields[256];
    snprintf(fields, sizeof(fields),
             "\"task\":\"%s\",\"kind\":\"%s\",\"state\":\"%s\",\"attempts\":%d", task->id,
             task->kind, th_task_state_name(task->state), task->attempts);
    th_events_publish(events, "tasks", "task.state", trial, NULL, fields);
    if (trial) {
        char topic[TH_ID_MAX + 8];
        snprintf(topic, sizeof(topic), "trial:%s", trial);
        th_events_publish(events, topic, "task.state", trial, NULL, fields);
    }
    json_decref(payload);
}

int th_analysis_notify(th_ctx *ctx, th_queue *queue, const char *task_id)
{
    th_task t;
    int rc = th_queue_get(ctx, queue, task_id, &t);
    if (rc != 0) {
        return rc;
    }
    json_t *payload = json_loads(t.payload ? t.payload : "{}", 0, NULL);
    const char *url = json_string_value(json_object_get(payload, "callback_url"));
    const char *trial = json_string_value(json_object_get(payload, "trial"));
    if (url == NULL || trial == NULL) {
        json_decref(payload);
        th_task_free(&t);
        return 0;
    }
    json_t *spec_payload = json_pack("{s:s,s:s,s:s,s:s}", "task", t.id, "trial", trial, "url", url,
                                     "state", th_task_state_name(t.state));
    char *text = spec_payload ? json_dumps(spec_payload, JSON_COMPACT) : NULL;
    char key[TH_TASK_ID_SIZE + 16];
    snprintf(key, sizeof(key), "%s:%s", t.id, th_task_state_name(t.state));
    th_task_spec spec = {.kind = TH_WEBHOOK_KIND,
                         .payload = text,
                         .priority = 1,
                         .max_attempts = 20, /* with the 1 h cap: retried for hours */
                         .idempotency_key = key,
                         .scope = trial};
    char id[TH_TASK_ID_SIZE];
    bool existed = false;
    rc = text ? th_queue_enqueue(ctx, queue, &spec, id, &existed) : TH_ENOMEM;
    free(text);
    json_decref(spec_payload);
    json_decref(payload);
    th_task_free(&t);
    return rc;
}

/* ---- analysis runs ----------------------------------------------------------------------- */

static int heartbeat_tick(void *arg)
{
    worker *w = arg;
    th_workers *ws = w->ws;
    int rc = th_queue_heartbeat(ws->stop, ws->cfg.queue, w->task->id, w->owner, w->task->attempts,
                                ws->cfg.lease_ms);
    if (rc == TH_ECANCELED || rc == TH_ECONFLICT || rc == TH_ENOTFOUND) {
        return rc; /* canceled, or the lease is gone: stop the analyzer */
    }
    return 0; /* busy database, or shutting down (the context stops the run) */
}

static void after_state_change(worker *w, const char *task_id)
{
    th_workers *ws = w->ws;
    th_task t;
    if (th_queue_get(ws->stop, ws->cfg.queue, task_id, &t) == 0) {
        th_analysis_announce(ws->cfg.events, &t);
        th_task_free(&t);
    }
    int rc = th_analysis_notify(ws->stop, ws->cfg.queue, task_id);
    if (rc != 0) {
        TH_LOG(TH_LOG_WARN, "webhook not queued", TH_LOG_STR("task", task_id),
               TH_LOG_STR("error", th_errname(rc)));
    }
}

/* Records a failed attempt; err must not hold patient data. */
static void fail_task(worker *w, const th_task *t, const char *err, bool retryable)
{
    th_workers *ws = w->ws;
    int rc = th_queue_fail(th_ctx_background(), ws->cfg.queue, t->id, w->owner, t->attempts, err,
                           retryable);
    TH_LOG(TH_LOG_WARN, "analysis attempt failed", TH_LOG_STR("task", t->id),
           TH_LOG_INT("attempt", t->attempts), TH_LOG_STR("reason", err),
           TH_LOG_STR("recorded", rc == 0 ? "yes" : th_errname(rc)));
    count(ws, "analysis", retryable ? "failed" : "dead");
    after_state_change(w, t->id);
}

static void run_analysis(worker *w, const th_task *t)
{
    th_workers *ws = w->ws;
    th_analysis_announce(ws->cfg.events, t);
    json_t *payload = json_loads(t->payload ? t->payload : "{}", 0, NULL);
    const char *blob = json_string_value(json_object_get(payload, "blob"));
    const char *modality = json_string_value(json_object_get(payload, "modality"));
    char path[4096];
    if (blob == NULL || th_blob_path(ws->cfg.blobs, blob, path, sizeof(path)) != 0 ||
        access(path, R_OK) != 0) {
        json_decref(payload);
        fail_task(w, t, "the image is not in the blob store", false);
        return;
    }
    json_t *request = json_pack("{s:s,s:s,s:s,s:{}}", "task", t->id, "image", path, "modality",
                                modality ? modality : "", "parameters");
    json_decref(payload);
    char *stdin_text = request ? json_dumps(request, JSON_COMPACT) : NULL;
    json_decref(request);
    if (stdin_text == NULL) {
        fail_task(w, t, "out of memory", true);
        return;
    }
    th_ctx *ctx = NULL;
    if (th_ctx_with_timeout(ws->stop, (uint64_t)ws->cfg.task_timeout_ms * TH_NS_PER_MS, &ctx) !=
        0) {
        free(stdin_text);
        fail_task(w, t, "out of memory", true);
        return;
    }
    w->task = t;
    th_run_limits limits = {.max_stdout = ws->cfg.max_output,
                            .tick_ns = (uint64_t)ws->cfg.heartbeat_ms * TH_NS_PER_MS,
                            .tick = heartbeat_tick,
                            .tick_arg = w};
    th_run_result res;
    uint64_t start = th_clock_now_ns();
    int rc = th_run(ctx, ws->argv, stdin_text, strlen(stdin_text), &limits, &res);
    free(stdin_text);
    bool shutting_down = th_ctx_done(ws->stop);
    th_ctx_release(ctx);
    w->task = NULL;
    if (res.err_bytes) {
        /* What the analyzer printed is its own business and may hold anything (a library
         * quoting a DICOM header): only its size is logged. */
        TH_LOG(TH_LOG_INFO, "analyzer wrote to stderr", TH_LOG_STR("task", t->id),
               TH_LOG_INT("bytes", res.err_bytes));
    }
    char reason[256];
    if (rc == TH_ECANCELED && !shutting_down) {
        /* The task was canceled (DELETE): the queue already says so. */
        count(ws, "analysis", "canceled");
        TH_LOG(TH_LOG_INFO, "analysis canceled; analyzer stopped", TH_LOG_STR("task", t->id),
               TH_LOG_INT("pid", res.pid));
        after_state_change(w, t->id);
    } else if (rc == TH_ECONFLICT || rc == TH_ENOTFOUND) {
        TH_LOG(TH_LOG_WARN, "analysis lease lost; analyzer stopped", TH_LOG_STR("task", t->id));
    } else if (shutting_down) {
        fail_task(w, t, "the worker shut down during the analysis", true);
    } else if (rc == TH_ETIMEDOUT) {
        snprintf(reason, sizeof(reason), "the analyzer did not finish within %u s and was killed",
                 ws->cfg.task_timeout_ms / 1000);
        fail_task(w, t, reason, true);
    } else if (rc == TH_ETOOBIG) {
        fail_task(w, t, "the analyzer's output is larger than the limit", false);
    } else if (rc != 0) {
        snprintf(reason, sizeof(reason), "the analyzer could not be run: %s", th_errname(rc));
        fail_task(w, t, reason, true);
    } else if (res.term_signal) {
        snprintf(reason, sizeof(reason), "the analyzer crashed (signal %d)", res.term_signal);
        fail_task(w, t, reason, true);
    } else {
        json_error_t jerr;
        json_t *out = json_loadb(res.out ? res.out : "", res.out_len, 0, &jerr);
        const char *error = json_string_value(json_object_get(out, "error"));
        if (res.exit_code != 0) {
            /* Its own error text is not kept: last_error is shown by the API and webhooks, and
             * an analyzer's message may quote the image's header. */
            snprintf(reason, sizeof(reason), "the analyzer exited with code %d%s", res.exit_code,
                     error ? " and an error message" : "");
            /* 2: a bad request, 3: an unreadable image; anything else may pass next time. */
            fail_task(w, t, reason, res.exit_code != 2 && res.exit_code != 3);
        } else if (!json_is_object(out)) {
            snprintf(reason, sizeof(reason),
                     "the analyzer's output is not a JSON object (line %d, column %d)",
                     out ? 1 : jerr.line, out ? 1 : jerr.column);
            fail_task(w, t, reason, true);
        } else {
            char *result = json_dumps(out, JSON_COMPACT);
            int frc = result ? th_queue_finish(th_ctx_background(), ws->cfg.queue, t->id, w->owner,
                                               t->attempts, result)
                             : TH_ENOMEM;
            free(result);
            if (frc == 0) {
                count(ws, "analysis", "succeeded");
                TH_LOG(TH_LOG_INFO, "analysis succeeded", TH_LOG_STR("task", t->id),
                       TH_LOG_INT("attempt", t->attempts),
                       TH_LOG_DBL("seconds", (double)(th_clock_now_ns() - start) / 1e9));
                after_state_change(w, t->id);
            } else if (frc == TH_ECONFLICT || frc == TH_ECANCELED) {
                /* Another worker holds it now, or it was canceled: its result stands. */
                TH_LOG(TH_LOG_WARN, "analysis result not written", TH_LOG_STR("task", t->id),
                       TH_LOG_STR("why", th_errname(frc)));
            } else {
                fail_task(w, t, "the result could not be stored", true);
            }
        }
        json_decref(out);
    }
    th_run_result_free(&res);
}

/* ---- webhook deliveries ------------------------------------------------------------------ */

static void run_webhook(worker *w, const th_task *t)
{
    th_workers *ws = w->ws;
    char reason[256] = "";
    bool retryable = true;
    int rc =
        th__notify_deliver(ws->stop, ws->cfg.queue, ws->cfg.store, t, ws->cfg.webhook_allow_private,
                           ws->cfg.webhook_timeout_ms, reason, sizeof(reason), &retryable);
    if (rc == 0) {
        int frc =
            th_queue_finish(th_ctx_background(), ws->cfg.queue, t->id, w->owner, t->attempts, NULL);
        count(ws, "webhook", frc == 0 ? "succeeded" : "lost");
        return;
    }
    if (th_ctx_done(ws->stop)) {
        snprintf(reason, sizeof(reason), "the worker shut down during the delivery");
        retryable = true;
    }
    if (th_queue_fail(th_ctx_background(), ws->cfg.queue, t->id, w->owner, t->attempts, reason,
                      retryable) == 0) {
        count(ws, "webhook", retryable ? "failed" : "dead");
    }
    TH_LOG(TH_LOG_WARN, "webhook delivery failed", TH_LOG_STR("task", t->id),
           TH_LOG_INT("attempt", t->attempts), TH_LOG_STR("reason", reason));
}

/* ---- the threads ------------------------------------------------------------------------- */

static void *worker_main(void *arg)
{
    worker *w = arg;
    th_workers *ws = w->ws;
    th_task_kind kind = {w->webhook ? TH_WEBHOOK_KIND : TH_ANALYSIS_KIND,
                         w->webhook ? 0 : ws->cfg.max_running};
    while (!th_ctx_done(ws->stop)) {
        th_task t;
        int rc = th_queue_lease(ws->stop, ws->cfg.queue, &kind, 1, w->owner, ws->cfg.lease_ms, &t);
        if (rc == TH_EAGAIN) {
            if (th_queue_wait(ws->stop, ws->cfg.queue, 1000) != 0) {
                break;
            }
            continue;
        }
        if (rc != 0) {
            if (th_ctx_done(ws->stop)) {
                break;
            }
            TH_LOG(TH_LOG_WARN, "lease failed", TH_LOG_STR("kind", kind.kind),
                   TH_LOG_STR("error", th_errname(rc)));
            (void)th_ctx_sleep(ws->stop, TH_NS_PER_S);
            continue;
        }
        if (w->webhook) {
            run_webhook(w, &t);
        } else {
            run_analysis(w, &t);
        }
        th_task_free(&t);
    }
    return NULL;
}

int th_workers_start(const th_workers_config *config, th_workers **out)
{
    if (config == NULL || config->queue == NULL || config->store == NULL ||
        (config->threads && config->blobs == NULL) ||
        (config->threads && (config->analyzer == NULL || config->analyzer[0] == NULL))) {
        return TH_EINVAL;
    }
    th_workers *ws = th_calloc(1, sizeof(*ws));
    if (ws == NULL) {
        return TH_ENOMEM;
    }
    ws->cfg = *config;
    th_workers_config *k = &ws->cfg;
    k->lease_ms = k->lease_ms ? k->lease_ms : 30000;
    k->task_timeout_ms = k->task_timeout_ms ? k->task_timeout_ms : 600000;
    if (k->heartbeat_ms == 0) {
        k->heartbeat_ms = k->lease_ms / 3 < 500 ? k->lease_ms / 3 : 500;
    }
    k->webhook_threads = k->webhook_threads ? k->webhook_threads : 1;
    k->webhook_timeout_ms = k->webhook_timeout_ms ? k->webhook_timeout_ms : 10000;
    int rc = 0;
    size_t nargs = 0;
    while (config->analyzer && config->analyzer[nargs]) {
        nargs++;
    }
    ws->argv = th_calloc(nargs + 1, sizeof(char *));
    for (size_t i = 0; ws->argv && i < nargs; i++) {
        size_t n = strlen(config->analyzer[i]);
        ws->argv[i] = th_malloc(n + 1);
        if (ws->argv[i] == NULL) {
            rc = TH_ENOMEM;
            break;
        }
        memcpy(ws->argv[i], config->analyzer[i], n + 1);
    }
    k->analyzer = NULL;
    if (ws->argv == NULL) {
        rc = TH_ENOMEM;
    }
    static const char *const labels[] = {"kind", "outcome"};
    if (rc == 0 && config->metrics) {
        rc = th_metrics_counter(config->metrics, "trialhub_worker_tasks_total",
                                "Task attempts by kind and outcome (succeeded, failed: will retry, "
                                "dead, canceled).",
                                2, labels, &ws->m_tasks);
    }
    if (rc == 0) {
        rc = th_ctx_with_cancel(th_ctx_background(), &ws->stop);
    }
    ws->nworkers = k->threads + k->webhook_threads;
    ws->workers = rc == 0 ? th_calloc(ws->nworkers, sizeof(worker)) : NULL;
    if (rc == 0 && ws->workers == NULL) {
        rc = TH_ENOMEM;
    }
    char host[64] = "host";
    (void)gethostname(host, sizeof(host) - 1);
    for (size_t i = 0; rc == 0 && i < ws->nworkers; i++) {
        worker *w = &ws->workers[i];
        w->ws = ws;
        w->webhook = i >= k->threads;
        snprintf(w->owner, sizeof(w->owner), "%.16s:%.16s:%ld:%u",
                 config->name ? config->name : "w", host, (long)getpid(), (unsigned)i);
        rc =
            th__thread_start(&w->thread, w->webhook ? "th-webhook" : "th-analysis", worker_main, w);
        w->started = rc == 0;
    }
    if (rc != 0) {
        th_workers_stop(ws);
        return rc;
    }
    *out = ws;
    return 0;
}

void th_workers_stop(th_workers *ws)
{
    if (ws == NULL) {
        return;
    }
    if (ws->stop) {
        th_ctx_cancel(ws->stop);
    }
    for (size_t i = 0; ws->workers && i < ws->nworkers; i++) {
        if (ws->workers[i].started) {
            pthread_join(ws->workers[i].thread, NULL);
        }
    }
    th_free(ws->workers);
    for (size_t i = 0; ws->argv && ws->argv[i]; i++) {
        th_free(ws->argv[i]);
    }
    th_free(ws->argv);
    th_ctx_release(ws->stop);
    th_free(ws);
}
