/* Group-commit writer thread. Jobs arrive on a bounded th_chan; the thread batches whatever is
 * queued, applies the batch in one transaction, commits, and completes the jobs. A failed
 * commit is fatal for the store (never retried: after a failed fsync the page cache may already
 * have dropped the data), and every later submit gets TH_EIO.
 *
 * Locking: the channel has its own lock; the counters are atomics; `batch` and `status` are
 * touched only by the writer thread. */
#include "trialhub/writer.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core/core_int.h"
#include "trialhub/alloc.h"
#include "trialhub/chan.h"
#include "trialhub/clock.h"

struct th_writer {
    th_store *store;
    th_chan *ch;
    th_writer_config config;
    th_metric *m_batch_size;
    th_metric *m_commit_seconds;
    pthread_t thread;
    bool started;
    atomic_bool stopped;
    _Atomic int fatal;
    _Atomic uint64_t batches;
    _Atomic uint64_t jobs;
    _Atomic uint64_t failed_batches;
    _Atomic uint64_t last_commit_ns;
    _Atomic int64_t last_ok_ms;
    th_write_job **batch;
    int *status;
};

static void fail_all(th_writer *w, unsigned n, int err)
{
    for (unsigned i = 0; i < n; i++) {
        w->batch[i]->done(w->batch[i], err);
    }
}

static void run_batch(th_writer *w, unsigned n)
{
    if (atomic_load(&w->fatal) != 0) {
        fail_all(w, n, TH_EIO);
        return;
    }
    if (th_store_begin(w->store) != 0) {
        atomic_fetch_add(&w->failed_batches, 1);
        fail_all(w, n, TH_EIO);
        return;
    }
    for (unsigned i = 0; i < n; i++) {
        w->status[i] = w->batch[i]->apply(w->store, w->batch[i]);
        if (w->status[i] == TH_EIO) {
            th_store_rollback(w->store);
            atomic_fetch_add(&w->failed_batches, 1);
            fail_all(w, n, TH_EIO);
            return;
        }
    }
    uint64_t t0 = th_clock_now_ns();
    if (th_store_commit(w->store) != 0) {
        /* Fatal: never retry a failed commit. */
        th_store_rollback(w->store);
        atomic_store(&w->fatal, TH_EIO);
        atomic_fetch_add(&w->failed_batches, 1);
        fail_all(w, n, TH_EIO);
        return;
    }
    uint64_t commit_ns = th_clock_now_ns() - t0;
    atomic_store(&w->last_commit_ns, commit_ns);
    atomic_store(&w->last_ok_ms, (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS));
    atomic_fetch_add(&w->batches, 1);
    atomic_fetch_add(&w->jobs, n);
    if (w->m_batch_size) {
        th_metric_observe(w->m_batch_size, NULL, n);
        th_metric_observe(w->m_commit_seconds, NULL, (double)commit_ns / 1e9);
    }
    for (unsigned i = 0; i < n; i++) {
        w->batch[i]->done(w->batch[i], w->status[i]);
    }
}

static void *writer_main(void *arg)
{
    th_writer *w = arg;
    for (;;) {
        void *item;
        if (th_chan_recv(th_ctx_background(), w->ch, &item) != 0) {
            break; /* closed and drained */
        }
        unsigned n = 0;
        w->batch[n++] = item;
        uint64_t deadline_ns =
            w->config.max_wait_us ? th_clock_after_ns(w->config.max_wait_us * TH_NS_PER_US) : 0;
        while (n < w->config.max_batch) {
            int rc = th_chan_try_recv(w->ch, &item);
            if (rc == 0) {
                w->batch[n++] = item;
                continue;
            }
            if (rc == TH_ECLOSED || deadline_ns == 0 || th_clock_now_ns() >= deadline_ns) {
                break;
            }
            struct timespec pause = {0, 20000}; /* 20 us between looks while waiting */
            nanosleep(&pause, NULL);
        }
        run_batch(w, n);
    }
    return NULL;
}

static int register_metrics(th_writer *w, th_metrics *m)
{
    static const double batch_bounds[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
    static const double commit_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                           0.01,   0.025,   0.05,   0.1,   0.25};
    int rc =
        th_metrics_histogram(m, "trialhub_writer_batch_size",
                             "Jobs committed per transaction by the group-commit writer.", 0, NULL,
                             batch_bounds, sizeof(batch_bounds) / sizeof(double), &w->m_batch_size);
    if (rc == 0) {
        rc = th_metrics_histogram(m, "trialhub_writer_commit_seconds",
                                  "Duration of each group commit (COMMIT with fsync).", 0, NULL,
                                  commit_bounds, sizeof(commit_bounds) / sizeof(double),
                                  &w->m_commit_seconds);
    }
    return rc;
}

int th_writer_create(th_store *store, const th_writer_config *config, th_metrics *metrics,
                     th_writer **out)
{
    if (store == NULL || config == NULL || config->queue_capacity == 0 || config->max_batch == 0 ||
        config->max_batch > 100000) {
        return TH_EINVAL;
    }
    th_writer *w = th_calloc(1, sizeof(*w));
    if (w == NULL) {
        return TH_ENOMEM;
    }
    w->store = store;
    w->config = *config;
    w->batch = th_calloc(config->max_batch, sizeof(*w->batch));
    w->status = th_calloc(config->max_batch, sizeof(*w->status));
    int rc = TH_ENOMEM;
    if (w->batch && w->status) {
        rc = metrics ? register_metrics(w, metrics) : 0;
    }
    if (rc == 0) {
        rc = th_chan_create(config->queue_capacity, &w->ch);
    }
    if (rc == 0) {
        rc = th__thread_start(&w->thread, "th-writer", writer_main, w);
    }
    if (rc != 0) {
        th_chan_destroy(w->ch);
        th_free(w->batch);
        th_free(w->status);
        th_free(w);
        return rc;
    }
    w->started = true;
    *out = w;
    return 0;
}

int th_writer_try_submit(th_writer *w, th_write_job *job)
{
    if (atomic_load(&w->fatal) != 0) {
        return TH_EIO;
    }
    int rc = th_chan_try_send(w->ch, job);
    return rc == TH_ECLOSED ? TH_ESHUTDOWN : rc;
}

int th_writer_submit(th_ctx *ctx, th_writer *w, th_write_job *job)
{
    if (atomic_load(&w->fatal) != 0) {
        return TH_EIO;
    }
    int rc = th_chan_send(ctx, w->ch, job);
    return rc == TH_ECLOSED ? TH_ESHUTDOWN : rc;
}

typedef struct sync_job {
    th_write_job job;
    int (*apply)(th_store *store, void *arg);
    void *arg;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool finished;
    int status;
} sync_job;

static int sync_apply(th_store *store, th_write_job *job)
{
    sync_job *s = (sync_job *)job;
    return s->apply(store, s->arg);
}

static void sync_done(th_write_job *job, int status)
{
    sync_job *s = (sync_job *)job;
    pthread_mutex_lock(&s->mu);
    s->status = status;
    s->finished = true;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->mu);
}

int th_writer_run(th_ctx *ctx, th_writer *w, int (*apply)(th_store *store, void *arg), void *arg)
{
    sync_job s = {.job = {sync_apply, sync_done, NULL}, .apply = apply, .arg = arg};
    pthread_mutex_init(&s.mu, NULL);
    pthread_cond_init(&s.cond, NULL);
    int rc = th_writer_submit(ctx, w, &s.job);
    if (rc == 0) {
        /* Once queued the job must be waited for: its storage is on this stack. */
        pthread_mutex_lock(&s.mu);
        while (!s.finished) {
            pthread_cond_wait(&s.cond, &s.mu);
        }
        pthread_mutex_unlock(&s.mu);
        rc = s.status;
    }
    pthread_cond_destroy(&s.cond);
    pthread_mutex_destroy(&s.mu);
    return rc;
}

void th_writer_get_stats(th_writer *w, th_writer_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->batches = atomic_load(&w->batches);
    out->jobs = atomic_load(&w->jobs);
    out->failed_batches = atomic_load(&w->failed_batches);
    out->queued = th_chan_len(w->ch);
    out->last_commit_ns = atomic_load(&w->last_commit_ns);
    out->last_ok_ms = atomic_load(&w->last_ok_ms);
    out->fatal = atomic_load(&w->fatal);
}

void th_writer_stop(th_writer *w)
{
    if (atomic_exchange(&w->stopped, true)) {
        return;
    }
    (void)th_chan_close(w->ch);
    if (w->started) {
        pthread_join(w->thread, NULL);
    }
}

void th_writer_destroy(th_writer *w)
{
    if (w == NULL) {
        return;
    }
    th_writer_stop(w);
    th_chan_destroy(w->ch);
    th_free(w->batch);
    th_free(w->status);
    th_free(w);
}
