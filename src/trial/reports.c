/* The report service: flights (one computation per key and deadline, shared by its waiters) on
 * a pool of their own, and the asynchronous jobs.
 *
 * Locking: `mu` protects the flight table, every flight's waiter list and the job table. It is
 * never held while a report is built or rendered, nor while a done() callback runs (a flight
 * detaches its waiters under `mu`, then calls them without it), so abandon() may be called from
 * any thread, including one that holds a lock of its own (the HTTP hang-up watcher). Lock order:
 * callers' locks -> mu. */
#include "trialhub/reports.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/ctx.h"
#include "trialhub/log.h"
#include "trialhub/pool.h"

/* A request joins a running computation of the same report whose deadline is at most this much
 * earlier than its own (identical requests arrive a few microseconds apart). */
#define JOIN_SLACK_NS (1000 * TH_NS_PER_MS)

typedef struct flight flight;

struct th_report_waiter {
    flight *f;
    th_report_done_fn done;
    void *arg;
    th_report_waiter *next;
    bool attached; /* under mu */
};

struct flight {
    th_reports *rs;
    char trial_id[TH_ID_MAX + 1];
    th_report_format format;
    th_report_chart chart;
    uint64_t deadline_ns;
    th_ctx *ctx;
    th_report_waiter *waiters; /* under mu */
    uint64_t canceled_ns;      /* under mu: when the last waiter left, 0 if none did */
    bool finished;             /* under mu: out of the table, waiters detached */
    flight *next;              /* in rs->flights, under mu */
};

typedef struct job {
    th_reports *rs;
    th_report_job_info info;
    th_report_waiter *waiter; /* while running */
    void *data;
    size_t len;
    const char *media_type;
    struct job *next;
} job;

struct th_reports {
    th_reports_config cfg;
    th_pool *pool;
    pthread_mutex_t mu;
    pthread_cond_t idle; /* signalled when the last flight finishes */
    flight *flights;     /* running or queued */
    size_t nflights;
    job *jobs;
    size_t njobs;
    bool closing;
    th_metric *m_reports;
    th_metric *m_cancel_latency;
};

static void count(th_reports *rs, const char *outcome, const char *stage)
{
    if (rs->m_reports) {
        const char *labels[] = {outcome, stage};
        th_metric_add(rs->m_reports, labels, 1);
    }
}

/* ---- flights ------------------------------------------------------------------------------ */

static void flight_free(flight *f)
{
    th_ctx_release(f->ctx);
    th_free(f);
}

/* Takes f out of the table and detaches its waiters; returns them. */
static th_report_waiter *flight_finish(th_reports *rs, flight *f, uint64_t *canceled_ns)
{
    pthread_mutex_lock(&rs->mu);
    for (flight **pp = &rs->flights; *pp; pp = &(*pp)->next) {
        if (*pp == f) {
            *pp = f->next;
            rs->nflights--;
            break;
        }
    }
    f->finished = true;
    th_report_waiter *list = f->waiters;
    f->waiters = NULL;
    for (th_report_waiter *w = list; w; w = w->next) {
        w->attached = false;
    }
    *canceled_ns = f->canceled_ns;
    if (rs->nflights == 0) {
        pthread_cond_broadcast(&rs->idle);
    }
    pthread_mutex_unlock(&rs->mu);
    return list;
}

static void flight_complete(flight *f, int status, const char *stage, const th_buf *out)
{
    th_reports *rs = f->rs;
    uint64_t canceled_ns = 0;
    th_report_waiter *list = flight_finish(rs, f, &canceled_ns);
    uint64_t now = th_clock_now_ns();
    /* Metrics: one per computation. */
    if (status == 0) {
        count(rs, "completed", "done");
    } else if (canceled_ns) {
        count(rs, "client_canceled", stage);
    } else if (status == TH_ETIMEDOUT) {
        count(rs, "timed_out", stage);
    } else if (status == TH_ESHUTDOWN || status == TH_ECANCELED) {
        count(rs, "shutdown", stage);
    } else {
        count(rs, "failed", stage);
    }
    uint64_t cancel_at = canceled_ns ? canceled_ns : status == TH_ETIMEDOUT ? f->deadline_ns : 0;
    if (cancel_at) {
        double latency_s = now > cancel_at ? (double)(now - cancel_at) / 1e9 : 0.0;
        if (rs->m_cancel_latency) {
            th_metric_observe(rs->m_cancel_latency, NULL, latency_s);
        }
        TH_LOG(TH_LOG_INFO, "report canceled", TH_LOG_STR("trial", f->trial_id),
               TH_LOG_STR("reason", canceled_ns ? "client" : "deadline"),
               TH_LOG_STR("stage", stage), TH_LOG_DBL("cancel_latency_ms", latency_s * 1e3));
    }
    const char *media = th_report_media_type(f->format);
    while (list) {
        th_report_waiter *w = list;
        list = w->next;
        w->done(w->arg, status, stage, media, out ? out->data : NULL, out ? out->len : 0);
        th_free(w);
    }
    flight_free(f);
}

static void flight_run(void *arg, int status)
{
    flight *f = arg;
    if (status != 0) {
        flight_complete(f, TH_ESHUTDOWN, "queue", NULL);
        return;
    }
    const char *stage = "query";
    th_report *report = NULL;
    /* A deadline that passed while the flight waited in the queue: the timer thread may not
     * have marked the context yet on a busy machine. */
    if (th_clock_now_ns() >= f->deadline_ns) {
        flight_complete(f, TH_ETIMEDOUT, "queue", NULL);
        return;
    }
    int rc = th_ctx_done(f->ctx)
                 ? th_ctx_err(f->ctx)
                 : th_report_build(f->ctx, f->rs->cfg.store, f->trial_id, &report, &stage);
    th_buf out;
    th_buf_init(&out, f->rs->cfg.max_output_bytes);
    if (rc == 0) {
        stage = "render";
        rc = th_report_render(f->ctx, report, f->format, f->chart, &out);
        if (rc == 0 && th_buf_failed(&out)) {
            rc = out.len >= f->rs->cfg.max_output_bytes ? TH_ETOOBIG : TH_ENOMEM;
        }
    }
    th_report_destroy(report);
    flight_complete(f, rc, stage, rc == 0 ? &out : NULL);
    th_buf_free(&out);
}

int th_reports_start(th_reports *rs, const th_report_key *key, uint64_t deadline_ns,
                     th_report_done_fn done, void *arg, th_report_waiter **out)
{
    th_report_waiter *w = th_calloc(1, sizeof(*w));
    if (w == NULL) {
        return TH_ENOMEM;
    }
    w->done = done;
    w->arg = arg;
    pthread_mutex_lock(&rs->mu);
    if (rs->closing) {
        pthread_mutex_unlock(&rs->mu);
        th_free(w);
        return TH_ESHUTDOWN;
    }
    for (flight *f = rs->flights; f; f = f->next) {
        if (!f->finished && f->canceled_ns == 0 && f->format == key->format &&
            f->chart == key->chart && f->deadline_ns + JOIN_SLACK_NS >= deadline_ns &&
            strcmp(f->trial_id, key->trial_id) == 0) {
            w->f = f;
            w->attached = true;
            w->next = f->waiters;
            f->waiters = w;
            pthread_mutex_unlock(&rs->mu);
            *out = w;
            return 0;
        }
    }
    flight *f = th_calloc(1, sizeof(*f));
    int rc = f ? th_ctx_with_deadline(th_ctx_background(), deadline_ns, &f->ctx) : TH_ENOMEM;
    if (rc == 0) {
        f->rs = rs;
        snprintf(f->trial_id, sizeof(f->trial_id), "%s", key->trial_id);
        f->format = key->format;
        f->chart = key->chart;
        f->deadline_ns = deadline_ns;
        w->f = f;
        w->attached = true;
        f->waiters = w;
        f->next = rs->flights;
        rs->flights = f;
        rs->nflights++;
        /* Submitted under mu so that nobody joins a flight that will never run. */
        rc = th_pool_try_submit(rs->pool, flight_run, f);
        if (rc != 0) {
            rs->flights = f->next;
            rs->nflights--;
        }
    }
    pthread_mutex_unlock(&rs->mu);
    if (rc != 0) {
        if (rc == TH_EOVERLOAD) {
            count(rs, "overloaded", "queue");
        }
        if (f) {
            flight_free(f);
        }
        th_free(w);
        return rc;
    }
    *out = w;
    return 0;
}

/* Detaches w if its done() has not started. Under mu. */
static bool abandon_locked(th_report_waiter *w)
{
    if (!w->attached) {
        return false;
    }
    flight *f = w->f;
    for (th_report_waiter **pp = &f->waiters; *pp; pp = &(*pp)->next) {
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    }
    w->attached = false;
    if (f->waiters == NULL) {
        /* Nobody wants it any more: every stage below stops at its next check. */
        f->canceled_ns = th_clock_now_ns();
        th_ctx_cancel(f->ctx);
    }
    th_free(w);
    return true;
}

bool th_reports_abandon(th_reports *rs, th_report_waiter *w)
{
    pthread_mutex_lock(&rs->mu);
    bool detached = abandon_locked(w);
    pthread_mutex_unlock(&rs->mu);
    return detached;
}

/* ---- jobs --------------------------------------------------------------------------------- */

const char *th_report_job_state_name(th_report_job_state state)
{
    static const char *const names[] = {"running", "done", "failed", "canceled", "timed_out"};
    return (unsigned)state < sizeof(names) / sizeof(names[0]) ? names[state] : "unknown";
}

static int64_t wall_ms(void)
{
    return (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);
}

static job *job_find(th_reports *rs, const char *id)
{
    for (job *j = rs->jobs; j; j = j->next) {
        if (strcmp(j->info.id, id) == 0) {
            return j;
        }
    }
    return NULL;
}

static void job_free(job *j)
{
    th_free(j->data);
    th_free(j);
}

/* Forgets finished jobs older than the TTL. Under mu. */
static void jobs_expire(th_reports *rs, int64_t now_ms)
{
    job **pp = &rs->jobs;
    while (*pp) {
        job *j = *pp;
        if (j->info.state != TH_JOB_RUNNING &&
            now_ms - j->info.finished_ms > (int64_t)rs->cfg.job_ttl_s * 1000) {
            *pp = j->next;
            rs->njobs--;
            job_free(j);
        } else {
            pp = &j->next;
        }
    }
}

static void job_done(void *arg, int status, const char *stage, const char *media_type,
                     const void *data, size_t len)
{
    job *j = arg;
    void *copy = NULL;
    if (status == 0) {
        copy = th_malloc(len ? len : 1);
        if (copy == NULL) {
            status = TH_ENOMEM;
        } else if (len) {
            memcpy(copy, data, len);
        }
    }
    th_reports *rs = j->rs;
    pthread_mutex_lock(&rs->mu);
    j->waiter = NULL;
    j->data = copy;
    j->len = copy ? len : 0;
    j->media_type = media_type;
    j->info.size = j->len;
    j->info.finished_ms = wall_ms();
    j->info.error = status;
    snprintf(j->info.stage, sizeof(j->info.stage), "%s", status == 0 ? "done" : stage);
    j->info.state = status == 0                                        ? TH_JOB_DONE
                    : status == TH_ETIMEDOUT                           ? TH_JOB_TIMED_OUT
                    : status == TH_ECANCELED || status == TH_ESHUTDOWN ? TH_JOB_CANCELED
                                                                       : TH_JOB_FAILED;
    pthread_mutex_unlock(&rs->mu);
}

int th_reports_job_start(th_reports *rs, const th_report_key *key, uint64_t timeout_ns,
                         th_report_job_info *info)
{
    job *j = th_calloc(1, sizeof(*j));
    if (j == NULL) {
        return TH_ENOMEM;
    }
    j->rs = rs;
    unsigned char rnd[9];
    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        uint64_t t = th_clock_now_ns();
        memcpy(rnd, &t, sizeof(t));
        rnd[8] = 0;
    }
    snprintf(j->info.id, sizeof(j->info.id), "r%02x%02x%02x%02x%02x%02x%02x%02x%02x", rnd[0],
             rnd[1], rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7], rnd[8]);
    snprintf(j->info.trial_id, sizeof(j->info.trial_id), "%s", key->trial_id);
    j->info.format = key->format;
    j->info.chart = key->chart;
    j->info.state = TH_JOB_RUNNING;
    j->info.created_ms = wall_ms();
    snprintf(j->info.stage, sizeof(j->info.stage), "queue");
    pthread_mutex_lock(&rs->mu);
    jobs_expire(rs, j->info.created_ms);
    bool full = rs->njobs >= rs->cfg.max_jobs;
    if (!full) {
        j->next = rs->jobs;
        rs->jobs = j;
        rs->njobs++;
    }
    pthread_mutex_unlock(&rs->mu);
    if (full) {
        th_free(j);
        return TH_EOVERLOAD;
    }
    /* The job is in the table before it can finish; its waiter is set under mu below, or by
     * job_done (which clears it) if the report is already done by then. */
    *info = j->info;
    th_report_waiter *w = NULL;
    int rc = th_reports_start(rs, key, th_clock_after_ns(timeout_ns), job_done, j, &w);
    pthread_mutex_lock(&rs->mu);
    if (rc != 0) {
        for (job **pp = &rs->jobs; *pp; pp = &(*pp)->next) {
            if (*pp == j) {
                *pp = j->next;
                rs->njobs--;
                break;
            }
        }
        job_free(j);
    } else if (j->info.state == TH_JOB_RUNNING) {
        j->waiter = w;
    }
    pthread_mutex_unlock(&rs->mu);
    return rc;
}

int th_reports_job_get(th_reports *rs, const char *id, th_report_job_info *info)
{
    pthread_mutex_lock(&rs->mu);
    jobs_expire(rs, wall_ms());
    job *j = job_find(rs, id);
    if (j) {
        *info = j->info;
    }
    pthread_mutex_unlock(&rs->mu);
    return j ? 0 : TH_ENOTFOUND;
}

int th_reports_job_file(th_reports *rs, const char *id, th_buf *out, const char **media_type)
{
    pthread_mutex_lock(&rs->mu);
    job *j = job_find(rs, id);
    int rc = j == NULL ? TH_ENOTFOUND : j->info.state != TH_JOB_DONE ? TH_EAGAIN : 0;
    if (rc == 0) {
        th_buf_append(out, j->data, j->len);
        *media_type = j->media_type;
        rc = th_buf_failed(out) ? TH_ENOMEM : 0;
    }
    pthread_mutex_unlock(&rs->mu);
    return rc;
}

int th_reports_job_delete(th_reports *rs, const char *id, bool *was_running)
{
    pthread_mutex_lock(&rs->mu);
    job *j = job_find(rs, id);
    int rc = j ? 0 : TH_ENOTFOUND;
    if (j) {
        *was_running = j->info.state == TH_JOB_RUNNING;
        if (!*was_running) {
            for (job **pp = &rs->jobs; *pp; pp = &(*pp)->next) {
                if (*pp == j) {
                    *pp = j->next;
                    rs->njobs--;
                    break;
                }
            }
            job_free(j);
        } else if (j->waiter && abandon_locked(j->waiter)) {
            /* Detached before its completion started: it is canceled now. (Otherwise its
             * completion is waiting for mu and will record the outcome.) */
            j->waiter = NULL;
            j->info.state = TH_JOB_CANCELED;
            j->info.finished_ms = wall_ms();
            j->info.error = TH_ECANCELED;
        }
    }
    pthread_mutex_unlock(&rs->mu);
    return rc;
}

/* ---- life cycle --------------------------------------------------------------------------- */

int th_reports_create(const th_reports_config *config, th_reports **out)
{
    if (config == NULL || config->store == NULL) {
        return TH_EINVAL;
    }
    th_reports *rs = th_calloc(1, sizeof(*rs));
    if (rs == NULL) {
        return TH_ENOMEM;
    }
    rs->cfg = *config;
    rs->cfg.threads = rs->cfg.threads ? rs->cfg.threads : 2;
    rs->cfg.queue = rs->cfg.queue ? rs->cfg.queue : 8;
    rs->cfg.max_jobs = rs->cfg.max_jobs ? rs->cfg.max_jobs : 64;
    rs->cfg.job_ttl_s = rs->cfg.job_ttl_s ? rs->cfg.job_ttl_s : 3600;
    rs->cfg.max_output_bytes = rs->cfg.max_output_bytes ? rs->cfg.max_output_bytes : 64u << 20;
    pthread_mutex_init(&rs->mu, NULL);
    pthread_cond_init(&rs->idle, NULL);
    th_pool_config pc = {"reports", rs->cfg.threads, rs->cfg.queue};
    int rc = th_pool_create(&pc, &rs->pool);
    static const char *const labels[] = {"outcome", "stage"};
    static const double bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1};
    if (rc == 0 && config->metrics) {
        rc = th_metrics_counter(config->metrics, "trialhub_reports_total",
                                "Report computations by outcome (completed, client_canceled, "
                                "timed_out, failed, overloaded, shutdown) and the stage running "
                                "at the end.",
                                2, labels, &rs->m_reports);
    }
    if (rc == 0 && config->metrics) {
        rc = th_metrics_histogram(config->metrics, "trialhub_report_cancel_latency_seconds",
                                  "From a report's cancel (client gone, or deadline) to the last "
                                  "work done on it.",
                                  0, NULL, bounds, sizeof(bounds) / sizeof(bounds[0]),
                                  &rs->m_cancel_latency);
    }
    if (rc != 0) {
        th_pool_destroy(rs->pool);
        pthread_cond_destroy(&rs->idle);
        pthread_mutex_destroy(&rs->mu);
        th_free(rs);
        return rc;
    }
    *out = rs;
    return 0;
}

void th_reports_destroy(th_reports *rs)
{
    if (rs == NULL) {
        return;
    }
    pthread_mutex_lock(&rs->mu);
    rs->closing = true;
    for (flight *f = rs->flights; f; f = f->next) {
        th_ctx_cancel(f->ctx);
    }
    pthread_mutex_unlock(&rs->mu);
    th_ctx *ctx = NULL;
    if (th_ctx_with_timeout(th_ctx_background(), 10 * TH_NS_PER_S, &ctx) == 0) {
        if (th_pool_shutdown(ctx, rs->pool) != 0) {
            th_log(TH_LOG_WARN, "report pool did not stop in time", 0, NULL);
        }
        th_ctx_release(ctx);
    }
    pthread_mutex_lock(&rs->mu);
    while (rs->nflights > 0) {
        pthread_cond_wait(&rs->idle, &rs->mu);
    }
    pthread_mutex_unlock(&rs->mu);
    th_pool_destroy(rs->pool);
    while (rs->jobs) {
        job *j = rs->jobs;
        rs->jobs = j->next;
        job_free(j);
    }
    pthread_cond_destroy(&rs->idle);
    pthread_mutex_destroy(&rs->mu);
    th_free(rs);
}
