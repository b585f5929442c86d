/* Post-commit scoring on the pool, score write-back through the writer, and the sweeper that
 * re-queues what a full pool or writer left pending.
 *
 * A task owns its th_qr; it computes the score and becomes a writer job (the same allocation),
 * which frees itself in done(). Locking: `mu` protects the sweeper's wake-up state; counters are
 * atomics. The sweeper never holds `mu` while it works. */
#include "trialhub/scoring.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core/core_int.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/log.h"
#include "trialhub/progress.h"

struct th_scoring {
    th_scoring_config cfg;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool stop;                     /* under mu */
    _Atomic int64_t last_defer_ms; /* wall time of the latest submission left pending */
    pthread_t sweeper;
    bool sweeper_started;
    _Atomic uint64_t scored, deferred, alerts, swept;
    _Atomic int64_t inflight; /* tasks and jobs not yet finished */
    th_metric *m_scored;
    th_ctx *ctx; /* canceled by th_scoring_stop(): ends the sweeper's waits */
};

typedef struct score_task {
    th_write_job job; /* first: the task becomes the writer job */
    th_scoring *svc;
    th_qr *qr;
    th_qr_score score;
    char band[32];
    char trial_id[TH_ID_MAX + 1];
    char site_id[TH_ID_MAX + 1];
    char patient_id[TH_ID_MAX + 1];
    char instrument[128];
    int visit_week;
} score_task;

static void request_sweep(th_scoring *s)
{
    atomic_fetch_add(&s->deferred, 1);
    atomic_store(&s->last_defer_ms, (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS));
}

static void task_free(score_task *t)
{
    th_qr_destroy(t->qr);
    atomic_fetch_sub(&t->svc->inflight, 1);
    th_free(t);
}

static int score_apply(th_store *store, th_write_job *job)
{
    score_task *t = (score_task *)job;
    return th_store_qr_set_score(store, &t->score, (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS));
}

/* After the commit, on the writer thread: the progress cache and the live events hear of it. */
static void announce(th_scoring *s, const score_task *t)
{
    if (s->cfg.progress) {
        th_progress_note note = {
            .qr_id = t->score.id,
            .score_seq = t->score.seq,
            .trial_id = t->trial_id,
            .site_id = t->site_id,
            .patient_id = t->patient_id,
            .instrument = t->instrument,
            .visit_week = t->visit_week,
            .has_score = t->score.has_score,
            .score = t->score.score,
            .alert = t->score.alert,
        };
        th_progress_note_score(s->cfg.progress, &note);
    }
    if (t->score.alert && th_events_active(s->cfg.events)) {
        char fields[384], topic[TH_ID_MAX + 8];
        th_buf b;
        th_buf_init_with(&b, fields, sizeof(fields), 0);
        th_buf_puts(&b, "\"trial\":");
        th_buf_json_str(&b, t->trial_id);
        th_buf_puts(&b, ",\"site\":");
        th_buf_json_str(&b, t->site_id);
        th_buf_puts(&b, ",\"patient\":");
        th_buf_json_str(&b, t->patient_id);
        th_buf_printf(&b, ",\"resource\":\"QuestionnaireResponse/%lld\",\"kind\":\"safety\"",
                      (long long)t->score.id);
        if (!th_buf_failed(&b)) {
            snprintf(topic, sizeof(topic), "trial:%s", t->trial_id);
            th_events_publish(s->cfg.events, "alerts", "alert.raised", t->trial_id, t->site_id,
                              b.data);
            th_events_publish(s->cfg.events, topic, "alert.raised", t->trial_id, t->site_id,
                              b.data);
        }
        th_buf_free(&b);
    }
}

static void score_done(th_write_job *job, int status)
{
    score_task *t = (score_task *)job;
    th_scoring *s = t->svc;
    if (status == 0) {
        announce(s, t);
        atomic_fetch_add(&s->scored, 1);
        if (t->score.alert) {
            atomic_fetch_add(&s->alerts, 1);
        }
        if (s->m_scored) {
            const char *labels[] = {t->score.band ? t->score.band : "none"};
            th_metric_add(s->m_scored, labels, 1);
        }
    } else if (status != TH_ENOTFOUND) {
        request_sweep(s);
    }
    task_free(t);
}

static void score_run(void *arg, int status)
{
    score_task *t = arg;
    th_scoring *s = t->svc;
    if (status != 0) {
        request_sweep(s); /* pool shut down before running it: stays pending */
        task_free(t);
        return;
    }
    const th_qr_fields *f = th_qr_get_fields(t->qr);
    th_fhir_score sc;
    if (f->instrument == NULL || th_fhir_score_compute(f->instrument, t->qr, &sc) != 0) {
        memset(&sc, 0, sizeof(sc));
    }
    t->score.has_score = sc.kind != TH_FHIR_SCORE_NONE && sc.answered > 0;
    t->score.score = sc.value;
    t->score.score_is_int = sc.is_integer;
    if (sc.band) {
        snprintf(t->band, sizeof(t->band), "%s", sc.band);
        t->score.band = t->band;
    }
    t->score.alert = sc.alert;
    /* Free the document here, on the pool, not in done() on the writer thread. */
    th_qr_destroy(t->qr);
    t->qr = NULL;
    t->job.apply = score_apply;
    t->job.done = score_done;
    if (th_writer_try_submit(s->cfg.writer, &t->job) != 0) {
        request_sweep(s);
        task_free(t);
    }
}

/* Queues a scoring task; takes qr. With wait, blocks for room until the service stops (the
 * sweeper); without, fails at once when the pool is full. Returns 0 or the pool's error. */
static int submit_task(th_scoring *s, const th_scoring_item *item, th_qr *qr, bool wait)
{
    score_task *t = th_calloc(1, sizeof(*t));
    if (t == NULL) {
        th_qr_destroy(qr);
        return TH_ENOMEM;
    }
    t->svc = s;
    t->qr = qr;
    t->score.id = item->qr_id;
    snprintf(t->trial_id, sizeof(t->trial_id), "%s", item->trial_id ? item->trial_id : "");
    snprintf(t->site_id, sizeof(t->site_id), "%s", item->site_id ? item->site_id : "");
    snprintf(t->patient_id, sizeof(t->patient_id), "%s", item->patient_id ? item->patient_id : "");
    snprintf(t->instrument, sizeof(t->instrument), "%s", item->instrument ? item->instrument : "");
    t->visit_week = item->visit_week;
    atomic_fetch_add(&s->inflight, 1);
    int rc = wait ? th_pool_submit(s->ctx, s->cfg.pool, score_run, t)
                  : th_pool_try_submit(s->cfg.pool, score_run, t);
    if (rc != 0) {
        task_free(t);
    }
    return rc;
}

void th_scoring_submit(th_scoring *s, const th_scoring_item *item, th_qr *qr)
{
    if (submit_task(s, item, qr, false) != 0) {
        request_sweep(s);
    }
}

/* ---- the sweeper -------------------------------------------------------------------------- */

typedef struct sweep_batch {
    int64_t ids[256];
    int n;
} sweep_batch;

static int collect_pending(void *arg, int64_t id)
{
    sweep_batch *b = arg;
    b->ids[b->n++] = id;
    return 0;
}

/* Re-queues pending rows received before cutoff_ms, oldest first, waiting for room in the
 * pool as needed. Later rounds skip the last few seconds, whose rows are most likely still on
 * their way through the pool, so that a sweep does not score them twice. */
static void sweep(th_scoring *s, int64_t cutoff_ms)
{
    int64_t after = 0;
    for (;;) {
        sweep_batch b = {.n = 0};
        if (th_store_qr_pending(s->cfg.store, after, cutoff_ms, 256, collect_pending, &b) != 0 ||
            b.n == 0) {
            return;
        }
        for (int i = 0; i < b.n; i++) {
            after = b.ids[i];
            th_qr_stored row;
            if (th_store_qr_get(s->cfg.store, b.ids[i], &row) != 0) {
                continue;
            }
            th_qr *qr = NULL;
            if (th_qr_parse(s->cfg.qreg, row.body, row.body_len, NULL, &qr, NULL) != 0) {
                th_qr_stored_free(&row);
                continue;
            }
            th_scoring_item item = {b.ids[i],       row.trial_id,   row.site_id,
                                    row.patient_id, row.instrument, row.visit_week};
            int rc = submit_task(s, &item, qr, true);
            th_qr_stored_free(&row);
            if (rc != 0) {
                return; /* stopping, or the pool is shut down */
            }
            atomic_fetch_add(&s->swept, 1);
        }
        if (b.n < 256) {
            return;
        }
    }
}

/* Sweeps once at start (everything an earlier run left pending), then, every interval, while
 * some deferral is not yet covered by a finished sweep's cut-off. */
static void *sweeper_main(void *arg)
{
    th_scoring *s = arg;
    int64_t covered_ms = -1; /* rows received before this were swept */
    pthread_mutex_lock(&s->mu);
    while (!s->stop) {
        int64_t now_ms = (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);
        if (covered_ms < 0 || atomic_load(&s->last_defer_ms) >= covered_ms) {
            int64_t cutoff_ms = covered_ms < 0 ? now_ms + 1 : now_ms - 2000;
            pthread_mutex_unlock(&s->mu);
            sweep(s, cutoff_ms);
            pthread_mutex_lock(&s->mu);
            covered_ms = cutoff_ms;
        }
        if (!s->stop) {
            th__cond_wait_until(&s->cond, &s->mu,
                                th_clock_after_ns(s->cfg.sweep_interval_ms * TH_NS_PER_MS));
        }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void collect_events(void *arg, th_metric *family, th_buf *out)
{
    th_scoring_stats st;
    th_scoring_get_stats(arg, &st);
    th_metrics_sample(out, family, NULL, "event=\"scored\"", (double)st.scored);
    th_metrics_sample(out, family, NULL, "event=\"deferred\"", (double)st.deferred);
    th_metrics_sample(out, family, NULL, "event=\"swept\"", (double)st.swept);
    th_metrics_sample(out, family, NULL, "event=\"safety_alert\"", (double)st.alerts);
}

int th_scoring_create(const th_scoring_config *config, th_scoring **out)
{
    if (config == NULL || config->pool == NULL || config->writer == NULL || config->store == NULL ||
        config->qreg == NULL) {
        return TH_EINVAL;
    }
    th_scoring *s = th_calloc(1, sizeof(*s));
    if (s == NULL) {
        return TH_ENOMEM;
    }
    s->cfg = *config;
    if (s->cfg.sweep_interval_ms == 0) {
        s->cfg.sweep_interval_ms = 1000;
    }
    pthread_mutex_init(&s->mu, NULL);
    int rc = th_ctx_with_cancel(th_ctx_background(), &s->ctx);
    if (rc == 0) {
        rc = th__cond_init_monotonic(&s->cond);
    }
    static const char *const band_label[] = {"band"};
    if (rc == 0 && config->metrics) {
        rc = th_metrics_counter(config->metrics, "trialhub_scored_total",
                                "Questionnaire responses scored, by severity band.", 1, band_label,
                                &s->m_scored);
    }
    if (rc == 0 && config->metrics) {
        rc = th_metrics_collector(config->metrics, "trialhub_scoring_events_total",
                                  "Scoring: rows scored, left pending for the sweeper (deferred), "
                                  "re-queued by the sweeper (swept), safety alerts raised.",
                                  "counter", collect_events, s);
    }
    if (rc == 0) {
        rc = th__thread_start(&s->sweeper, "th-sweeper", sweeper_main, s);
    }
    if (rc != 0) {
        th_ctx_release(s->ctx);
        pthread_mutex_destroy(&s->mu);
        th_free(s);
        return rc;
    }
    s->sweeper_started = true;
    *out = s;
    return 0;
}

void th_scoring_get_stats(th_scoring *s, th_scoring_stats *out)
{
    out->scored = atomic_load(&s->scored);
    out->deferred = atomic_load(&s->deferred);
    out->alerts = atomic_load(&s->alerts);
    out->swept = atomic_load(&s->swept);
}

void th_scoring_stop(th_scoring *s)
{
    th_ctx_cancel(s->ctx);
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->mu);
    if (s->sweeper_started) {
        pthread_join(s->sweeper, NULL);
        s->sweeper_started = false;
    }
}

void th_scoring_destroy(th_scoring *s)
{
    if (s == NULL) {
        return;
    }
    th_scoring_stop(s);
    /* Tasks left in a pool whose shutdown timed out may still finish; give them a moment. */
    for (int i = 0; i < 500 && atomic_load(&s->inflight) > 0; i++) {
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    th_ctx_release(s->ctx);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->mu);
    th_free(s);
}
