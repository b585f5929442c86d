/* Unit tests for th_pool: config validation, exactly-once completion, bounded-queue overload,
 * blocking submit with contexts, exact stats, run-time resize, idle CPU cost, shutdown with and
 * without a deadline, and th_pool_create under injected allocation and thread failures. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/ctx.h"
#include "trialhub/error.h"
#include "trialhub/pool.h"

/* Safety limit for waits that succeed at once in a correct pool; reaching it is a failure. */
#define WAIT_LIMIT_NS (20 * TH_NS_PER_S)

static pthread_t main_thread;

/* ---- small helpers --------------------------------------------------------------------------- */

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / TH_NS_PER_S),
                          .tv_nsec = (long)(ns % TH_NS_PER_S)};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static void cond_init_monotonic(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(cond, &attr);
    pthread_condattr_destroy(&attr);
}

static void cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *mu, uint64_t deadline_ns)
{
    struct timespec ts = {.tv_sec = (time_t)(deadline_ns / TH_NS_PER_S),
                          .tv_nsec = (long)(deadline_ns % TH_NS_PER_S)};
    (void)pthread_cond_timedwait(cond, mu, &ts);
}

/* Number of threads in this process, from /proc/self/task. */
static int count_threads(void)
{
    DIR *dir = opendir("/proc/self/task");
    assert_non_null(dir);
    int nthreads = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] != '.') {
            nthreads++;
        }
    }
    closedir(dir);
    return nthreads;
}

/* Polls the thread count until it equals expected or the limit passes; returns the last count.
 * Exited threads leave /proc asynchronously, so this is a poll, not a handshake. */
static int wait_thread_count(int expected)
{
    uint64_t deadline_ns = th_clock_after_ns(WAIT_LIMIT_NS);
    int nthreads = count_threads();
    while (nthreads != expected && th_clock_now_ns() < deadline_ns) {
        sleep_ns(TH_NS_PER_MS);
        nthreads = count_threads();
    }
    return nthreads;
}

/* The thread count once it has stopped moving: a detached worker of an earlier test that has
 * finished its task may still be on its way out when the next test takes its baseline. */
static int settled_thread_count(void)
{
    int last = count_threads(), same = 0;
    for (int i = 0; i < 200 && same < 5; i++) {
        sleep_ns(10 * TH_NS_PER_MS);
        int now = count_threads();
        same = now == last ? same + 1 : 0;
        last = now;
    }
    return last;
}

/* A one-shot gate that tasks wait on until the test opens it. */
typedef struct latch {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool open;
} latch;

static void latch_init(latch *l)
{
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cond, NULL);
    l->open = false;
}

static void latch_open(latch *l)
{
    pthread_mutex_lock(&l->mu);
    l->open = true;
    pthread_cond_broadcast(&l->cond);
    pthread_mutex_unlock(&l->mu);
}

static void latch_wait(latch *l)
{
    pthread_mutex_lock(&l->mu);
    while (!l->open) {
        pthread_cond_wait(&l->cond, &l->mu);
    }
    pthread_mutex_unlock(&l->mu);
}

static void latch_destroy(latch *l)
{
    pthread_cond_destroy(&l->cond);
    pthread_mutex_destroy(&l->mu);
}

/* A counter that threads bump and the test waits on. */
typedef struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    long count;
} gate;

static void gate_init(gate *g)
{
    pthread_mutex_init(&g->mu, NULL);
    cond_init_monotonic(&g->cond);
    g->count = 0;
}

static void gate_add(gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->count++;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->mu);
}

static long gate_count(gate *g)
{
    pthread_mutex_lock(&g->mu);
    long count = g->count;
    pthread_mutex_unlock(&g->mu);
    return count;
}

/* Waits until the count reaches n (or the safety limit passes); returns the count seen. */
static long gate_wait(gate *g, long n)
{
    uint64_t deadline_ns = th_clock_after_ns(WAIT_LIMIT_NS);
    pthread_mutex_lock(&g->mu);
    while (g->count < n && th_clock_now_ns() < deadline_ns) {
        cond_wait_until(&g->cond, &g->mu, deadline_ns);
    }
    long count = g->count;
    pthread_mutex_unlock(&g->mu);
    return count;
}

static void gate_destroy(gate *g)
{
    pthread_cond_destroy(&g->cond);
    pthread_mutex_destroy(&g->mu);
}

/* A reusable-once barrier for n parties that gives up after the safety limit (and then lets
 * everybody through), so a pool that runs too few tasks at once fails instead of hanging. */
typedef struct barrier {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    long arrived;
    long parties;
    bool broken;
} barrier;

static void barrier_init(barrier *b, long parties)
{
    pthread_mutex_init(&b->mu, NULL);
    cond_init_monotonic(&b->cond);
    b->arrived = 0;
    b->parties = parties;
    b->broken = false;
}

/* Returns true when all parties met. */
static bool barrier_wait(barrier *b)
{
    uint64_t deadline_ns = th_clock_after_ns(WAIT_LIMIT_NS);
    pthread_mutex_lock(&b->mu);
    b->arrived++;
    pthread_cond_broadcast(&b->cond);
    while (b->arrived < b->parties && !b->broken) {
        if (th_clock_now_ns() >= deadline_ns) {
            b->broken = true;
            pthread_cond_broadcast(&b->cond);
            break;
        }
        cond_wait_until(&b->cond, &b->mu, deadline_ns);
    }
    bool met = b->arrived >= b->parties;
    pthread_mutex_unlock(&b->mu);
    return met;
}

static void barrier_destroy(barrier *b)
{
    pthread_cond_destroy(&b->cond);
    pthread_mutex_destroy(&b->mu);
}

/* ---- the recording task ---------------------------------------------------------------------- */

/* What one task saw. Every field is written by the task and read by the test after a
 * handshake (a gate) or after the pool has joined its workers. */
typedef struct task_rec {
    atomic_int runs;          /* completion calls, any status */
    atomic_int status;        /* status of the last call */
    atomic_bool on_main;      /* the last call ran on the test's main thread */
    latch *hold;              /* if set, a call with status 0 waits for it before returning */
    gate *started;            /* if set, counted when a call begins */
    gate *finished;           /* if set, counted when a call ends */
    barrier *meet;            /* if set, a call with status 0 waits there first */
    atomic_bool met;          /* barrier result */
    atomic_int *inflight;     /* if set, tracks the tasks running at once ... */
    atomic_int *max_inflight; /* ... and the most seen */
} task_rec;

static void rec_task(void *arg, int status)
{
    task_rec *t = arg;
    atomic_store(&t->status, status);
    atomic_store(&t->on_main, pthread_equal(pthread_self(), main_thread) != 0);
    if (t->inflight != NULL) {
        int now = atomic_fetch_add(t->inflight, 1) + 1;
        int seen = atomic_load(t->max_inflight);
        while (now > seen && !atomic_compare_exchange_weak(t->max_inflight, &seen, now)) {
        }
    }
    if (t->started != NULL) {
        gate_add(t->started);
    }
    if (status == 0 && t->meet != NULL) {
        atomic_store(&t->met, barrier_wait(t->meet));
    }
    if (status == 0 && t->hold != NULL) {
        latch_wait(t->hold);
    }
    if (t->inflight != NULL) {
        atomic_fetch_sub(t->inflight, 1);
    }
    atomic_fetch_add(&t->runs, 1);
    if (t->finished != NULL) {
        gate_add(t->finished);
    }
}

/* Heap-allocated so that a failed assertion (which longjmps out of the test) never leaves a
 * worker waiting on a dead stack frame. */
typedef struct fixture {
    latch hold;
    gate started;
    gate finished;
    size_t nrecs;
    task_rec recs[];
} fixture;

static fixture *fixture_new(size_t nrecs)
{
    fixture *fx = calloc(1, sizeof(*fx) + nrecs * sizeof(task_rec));
    assert_non_null(fx);
    latch_init(&fx->hold);
    gate_init(&fx->started);
    gate_init(&fx->finished);
    fx->nrecs = nrecs;
    return fx;
}

/* Records [from, from + n) count in `finished`; with blocking, they also signal `started` and
 * wait on `hold`. */
static void fixture_setup(fixture *fx, size_t from, size_t n, bool blocking)
{
    for (size_t i = from; i < from + n; i++) {
        fx->recs[i].finished = &fx->finished;
        if (blocking) {
            fx->recs[i].started = &fx->started;
            fx->recs[i].hold = &fx->hold;
        }
    }
}

static void fixture_free(fixture *fx)
{
    latch_destroy(&fx->hold);
    gate_destroy(&fx->started);
    gate_destroy(&fx->finished);
    free(fx);
}

static void assert_ran_once(const fixture *fx, size_t from, size_t n, int status)
{
    for (size_t i = from; i < from + n; i++) {
        int runs = atomic_load(&fx->recs[i].runs);
        int seen = atomic_load(&fx->recs[i].status);
        if (runs != 1 || seen != status) {
            fail_msg("task %zu: %d completion calls with status %s, want 1 with %s", i, runs,
                     th_errname(seen), th_errname(status));
        }
    }
}

static void assert_never_ran(const fixture *fx, size_t from, size_t n)
{
    for (size_t i = from; i < from + n; i++) {
        int runs = atomic_load(&fx->recs[i].runs);
        if (runs != 0) {
            fail_msg("task %zu was refused but got %d completion calls", i, runs);
        }
    }
}

static th_pool *make_pool(const char *name, unsigned nthreads, size_t queue_capacity)
{
    th_pool_config config = {.name = name, .nthreads = nthreads, .queue_capacity = queue_capacity};
    th_pool *pool = NULL;
    assert_int_equal(th_pool_create(&config, &pool), 0);
    assert_non_null(pool);
    return pool;
}

/* Submits records [from, from + n) with try_submit; each must be accepted. */
static void submit_all(th_pool *pool, fixture *fx, size_t from, size_t n)
{
    for (size_t i = from; i < from + n; i++) {
        int rc = th_pool_try_submit(pool, rec_task, &fx->recs[i]);
        if (rc != 0) {
            fail_msg("try_submit of task %zu returned %s", i, th_errname(rc));
        }
    }
}

/* Polls the stats until `completed` reaches n with nothing busy or queued. The counters are
 * updated after a task function returns, so no handshake can tell the test when; this poll is
 * bounded by the safety limit. */
static th_pool_stats wait_quiescent(th_pool *pool, uint64_t completed)
{
    uint64_t deadline_ns = th_clock_after_ns(WAIT_LIMIT_NS);
    th_pool_stats stats;
    for (;;) {
        th_pool_get_stats(pool, &stats);
        if ((stats.completed >= completed && stats.busy == 0 && stats.queued == 0) ||
            th_clock_now_ns() >= deadline_ns) {
            return stats;
        }
        sched_yield();
    }
}

static th_ctx *timeout_ctx(uint64_t timeout_ns)
{
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_timeout(th_ctx_background(), timeout_ns, &ctx), 0);
    return ctx;
}

static uint64_t process_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * TH_NS_PER_S + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* ---- creation ------------------------------------------------------------------------------ */

static char sentinel_byte;
#define SENTINEL_POOL ((th_pool *)(void *)&sentinel_byte)

static void test_create_rejects_bad_config(void **state)
{
    (void)state;
    th_pool *pool = SENTINEL_POOL;
    assert_int_equal(th_pool_create(NULL, &pool), TH_EINVAL);
    assert_ptr_equal(pool, SENTINEL_POOL);

    const th_pool_config bad[] = {
        {.name = "bad", .nthreads = 0, .queue_capacity = 8},
        {.name = "bad", .nthreads = TH_POOL_MAX_THREADS + 1, .queue_capacity = 8},
        {.name = "bad", .nthreads = 4, .queue_capacity = 0},
        {.name = NULL, .nthreads = 0, .queue_capacity = 0},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(th_pool_create(&bad[i], &pool), TH_EINVAL);
        assert_ptr_equal(pool, SENTINEL_POOL);
    }
}

static void test_create_reports_config(void **state)
{
    (void)state;
    const struct {
        size_t asked;
        size_t want;
    } caps[] = {{1, 2}, {2, 2}, {3, 4}, {5, 8}, {8, 8}, {1000, 1024}};
    int base = settled_thread_count();
    for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
        unsigned nthreads = (unsigned)(i % 3) + 1;
        const char *name = i % 2 ? NULL : "a-pool-name-much-longer-than-fifteen-bytes";
        th_pool *pool = make_pool(name, nthreads, caps[i].asked);
        th_pool_stats stats;
        th_pool_get_stats(pool, &stats);
        assert_int_equal(stats.capacity, caps[i].want);
        assert_int_equal(stats.nthreads, nthreads);
        assert_int_equal(stats.busy, 0);
        assert_int_equal(stats.queued, 0);
        assert_int_equal(stats.submitted, 0);
        assert_int_equal(stats.completed, 0);
        assert_int_equal(stats.rejected, 0);
        assert_int_equal(stats.canceled, 0);
        /* Workers start at once. */
        assert_int_equal(wait_thread_count(base + (int)nthreads), base + (int)nthreads);
        th_pool_destroy(pool);
        assert_int_equal(wait_thread_count(base), base);
    }
}

/* ---- running tasks ------------------------------------------------------------------------- */

static void test_tasks_run_exactly_once(void **state)
{
    (void)state;
    enum { NTASKS = 2000 };
    fixture *fx = fixture_new(NTASKS);
    fixture_setup(fx, 0, NTASKS, false);
    th_pool *pool = make_pool("once", 4, 64);

    size_t rejected = 0;
    for (size_t i = 0; i < NTASKS; i++) {
        int rc;
        while ((rc = th_pool_try_submit(pool, rec_task, &fx->recs[i])) == TH_EOVERLOAD) {
            rejected++;
            sched_yield();
        }
        assert_int_equal(rc, 0);
    }
    assert_int_equal(gate_wait(&fx->finished, NTASKS), NTASKS);
    assert_ran_once(fx, 0, NTASKS, 0);
    for (size_t i = 0; i < NTASKS; i++) {
        assert_false(atomic_load(&fx->recs[i].on_main));
    }

    th_pool_stats stats = wait_quiescent(pool, NTASKS);
    assert_int_equal(stats.submitted, NTASKS);
    assert_int_equal(stats.completed, NTASKS);
    assert_int_equal(stats.rejected, rejected);
    assert_int_equal(stats.canceled, 0);
    assert_int_equal(stats.busy, 0);
    assert_int_equal(stats.queued, 0);

    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), 0);
    th_pool_destroy(pool);
    /* Nothing ran twice after the joins either. */
    assert_ran_once(fx, 0, NTASKS, 0);
    fixture_free(fx);
}

/* ---- overload -------------------------------------------------------------------------------- */

/* Two workers held inside tasks, the queue filled to its capacity: every further try_submit
 * must fail at once with TH_EOVERLOAD and its task must never run. */
static void check_overload(size_t asked_capacity, size_t want_capacity)
{
    enum { NWORKERS = 2, NREFUSED = 200 };
    fixture *fx = fixture_new(NWORKERS + want_capacity + 1);
    size_t refused_rec = NWORKERS + want_capacity;
    fixture_setup(fx, 0, NWORKERS, true);
    fixture_setup(fx, NWORKERS, want_capacity + 1, false);
    th_pool *pool = make_pool("overload", NWORKERS, asked_capacity);

    th_pool_stats stats;
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.capacity, want_capacity);

    /* One at a time, so that the queue never holds more than one task before the fill. */
    for (size_t i = 0; i < NWORKERS; i++) {
        submit_all(pool, fx, i, 1);
        assert_int_equal(gate_wait(&fx->started, (long)i + 1), i + 1);
    }
    submit_all(pool, fx, NWORKERS, want_capacity);

    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.busy, NWORKERS);
    assert_int_equal(stats.queued, want_capacity);
    assert_int_equal(stats.submitted, NWORKERS + want_capacity);
    assert_int_equal(stats.rejected, 0);

    uint64_t took_ns[NREFUSED];
    for (size_t i = 0; i < NREFUSED; i++) {
        uint64_t t0 = th_clock_now_ns();
        int rc = th_pool_try_submit(pool, rec_task, &fx->recs[refused_rec]);
        took_ns[i] = th_clock_now_ns() - t0;
        if (rc != TH_EOVERLOAD) {
            th_pool_get_stats(pool, &stats);
            fail_msg("capacity %zu: try_submit #%zu on a full queue returned %s, want "
                     "TH_EOVERLOAD (queued %zu, capacity %zu)",
                     want_capacity, i, th_errname(rc), stats.queued, stats.capacity);
        }
    }
    qsort(took_ns, NREFUSED, sizeof(took_ns[0]), cmp_u64);
    /* Refusing is a few atomic loads: the median must be far below a millisecond even on a
     * loaded machine under a sanitizer; the worst case only has to be clearly not a wait. */
    if (took_ns[NREFUSED / 2] >= 200 * TH_NS_PER_US || took_ns[NREFUSED - 1] >= TH_NS_PER_S) {
        fail_msg("refusal took median %llu ns, max %llu ns",
                 (unsigned long long)took_ns[NREFUSED / 2],
                 (unsigned long long)took_ns[NREFUSED - 1]);
    }

    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.rejected, NREFUSED);
    assert_int_equal(stats.queued, want_capacity);
    assert_int_equal(stats.submitted, NWORKERS + want_capacity);
    assert_int_equal(stats.completed, 0);

    latch_open(&fx->hold);
    assert_int_equal(gate_wait(&fx->finished, (long)(NWORKERS + want_capacity)),
                     NWORKERS + want_capacity);
    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), 0);
    assert_ran_once(fx, 0, NWORKERS + want_capacity, 0);
    assert_never_ran(fx, refused_rec, 1);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.completed, NWORKERS + want_capacity);
    assert_int_equal(stats.submitted, NWORKERS + want_capacity);
    assert_int_equal(stats.rejected, NREFUSED);
    assert_int_equal(stats.canceled, 0);
    th_pool_destroy(pool);
    fixture_free(fx);
}

static void test_overload_capacity_2(void **state)
{
    (void)state;
    check_overload(2, 2);
}

static void test_overload_capacity_5_rounds_to_8(void **state)
{
    (void)state;
    check_overload(5, 8);
}

static void test_overload_capacity_64(void **state)
{
    (void)state;
    check_overload(64, 64);
}

/* queue_capacity 1 is valid and rounds up to 2, the least the ring can hold: two tasks fit, the
 * third is refused. */
static void test_overload_capacity_1(void **state)
{
    (void)state;
    check_overload(1, 2);
}

/* ---- blocking submit ----------------------------------------------------------------------- */

typedef struct submitter {
    th_pool *pool;
    th_ctx *ctx;
    task_rec *rec;
    gate entered;
    gate returned;
    atomic_int rc;
} submitter;

static void *submitter_main(void *arg)
{
    submitter *s = arg;
    gate_add(&s->entered);
    atomic_store(&s->rc, th_pool_submit(s->ctx, s->pool, rec_task, s->rec));
    gate_add(&s->returned);
    return NULL;
}

static submitter *submitter_start(pthread_t *thread, th_pool *pool, th_ctx *ctx, task_rec *rec)
{
    submitter *s = calloc(1, sizeof(*s));
    assert_non_null(s);
    s->pool = pool;
    s->ctx = ctx;
    s->rec = rec;
    gate_init(&s->entered);
    gate_init(&s->returned);
    atomic_init(&s->rc, 1);
    assert_int_equal(pthread_create(thread, NULL, submitter_main, s), 0);
    assert_int_equal(gate_wait(&s->entered, 1), 1);
    return s;
}

static void submitter_free(submitter *s)
{
    gate_destroy(&s->entered);
    gate_destroy(&s->returned);
    free(s);
}

/* One worker held, queue of 2 full: a blocking submit waits, then gets in when a slot frees. */
static void test_blocking_submit_waits_for_room(void **state)
{
    (void)state;
    fixture *fx = fixture_new(4);
    fixture_setup(fx, 0, 1, true);
    fixture_setup(fx, 1, 3, false);
    th_pool *pool = make_pool("block", 1, 2);
    submit_all(pool, fx, 0, 1);
    assert_int_equal(gate_wait(&fx->started, 1), 1);
    submit_all(pool, fx, 1, 2);

    pthread_t thread;
    submitter *s = submitter_start(&thread, pool, th_ctx_background(), &fx->recs[3]);
    /* An observation window, not synchronisation: the submit must still be waiting after it. */
    sleep_ns(50 * TH_NS_PER_MS);
    assert_int_equal(gate_count(&s->returned), 0);
    th_pool_stats stats;
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.queued, 2);
    assert_int_equal(stats.submitted, 3);
    assert_int_equal(stats.rejected, 0);

    latch_open(&fx->hold);
    assert_int_equal(gate_wait(&s->returned, 1), 1);
    assert_int_equal(atomic_load(&s->rc), 0);
    assert_int_equal(pthread_join(thread, NULL), 0);
    assert_int_equal(gate_wait(&fx->finished, 4), 4);
    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), 0);
    assert_ran_once(fx, 0, 4, 0);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.submitted, 4);
    assert_int_equal(stats.completed, 4);
    assert_int_equal(stats.rejected, 0);
    th_pool_destroy(pool);
    submitter_free(s);
    fixture_free(fx);
}

/* A full queue and a context that ends while the submit waits: the submit returns the
 * context's error and its task never runs. Covers a deadline, a cancel from another thread,
 * and a context that is already done. */
static void test_blocking_submit_returns_ctx_error(void **state)
{
    (void)state;
    enum { HELD = 0, FILL = 1, TIMED = 3, CANCELED = 4, PRE_CANCELED = 5, NRECS = 6 };
    fixture *fx = fixture_new(NRECS);
    fixture_setup(fx, HELD, 1, true);
    fixture_setup(fx, FILL, NRECS - FILL, false);
    th_pool *pool = make_pool("blockctx", 1, 2);
    submit_all(pool, fx, HELD, 1);
    assert_int_equal(gate_wait(&fx->started, 1), 1);
    submit_all(pool, fx, FILL, 2);

    /* Deadline. */
    th_ctx *ctx = timeout_ctx(100 * TH_NS_PER_MS);
    uint64_t t0 = th_clock_now_ns();
    assert_int_equal(th_pool_submit(ctx, pool, rec_task, &fx->recs[TIMED]), TH_ETIMEDOUT);
    uint64_t took_ns = th_clock_now_ns() - t0;
    th_ctx_release(ctx);
    assert_true(took_ns >= 80 * TH_NS_PER_MS);
    assert_true(took_ns < 10 * TH_NS_PER_S);

    /* Cancel from another thread while it waits. */
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    pthread_t thread;
    submitter *s = submitter_start(&thread, pool, ctx, &fx->recs[CANCELED]);
    sleep_ns(30 * TH_NS_PER_MS); /* let it reach the wait; the result is the same if not */
    assert_int_equal(gate_count(&s->returned), 0);
    th_ctx_cancel(ctx);
    assert_int_equal(gate_wait(&s->returned, 1), 1);
    assert_int_equal(atomic_load(&s->rc), TH_ECANCELED);
    assert_int_equal(pthread_join(thread, NULL), 0);

    /* Already done: refused without waiting. */
    assert_int_equal(th_pool_submit(ctx, pool, rec_task, &fx->recs[PRE_CANCELED]), TH_ECANCELED);
    th_ctx_release(ctx);

    th_pool_stats stats;
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.submitted, 3);
    assert_int_equal(stats.queued, 2);
    assert_int_equal(stats.rejected, 0); /* only try_submit refusals count */

    latch_open(&fx->hold);
    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), 0);
    assert_ran_once(fx, HELD, 3, 0);
    assert_never_ran(fx, TIMED, 3);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.submitted, 3);
    assert_int_equal(stats.completed, 3);
    th_pool_destroy(pool);
    submitter_free(s);
    fixture_free(fx);
}

typedef struct shutdown_call {
    th_pool *pool;
    th_ctx *ctx;
    gate entering;
    gate returned;
    atomic_int rc;
} shutdown_call;

static void *shutdown_main(void *arg)
{
    shutdown_call *call = arg;
    gate_add(&call->entering);
    atomic_store(&call->rc, th_pool_shutdown(call->ctx, call->pool));
    gate_add(&call->returned);
    return NULL;
}

/* A blocking submit waiting for room is woken by shutdown with TH_ESHUTDOWN, while the workers
 * are still busy, and its task never runs. */
static void test_blocking_submit_woken_by_shutdown(void **state)
{
    (void)state;
    fixture *fx = fixture_new(4);
    fixture_setup(fx, 0, 1, true);
    fixture_setup(fx, 1, 3, false);
    th_pool *pool = make_pool("blockshut", 1, 2);
    submit_all(pool, fx, 0, 1);
    assert_int_equal(gate_wait(&fx->started, 1), 1);
    submit_all(pool, fx, 1, 2);

    pthread_t sub_thread, shut_thread;
    submitter *s = submitter_start(&sub_thread, pool, th_ctx_background(), &fx->recs[3]);
    sleep_ns(30 * TH_NS_PER_MS); /* let it reach the wait; the result is the same if not */

    shutdown_call *call = calloc(1, sizeof(*call));
    assert_non_null(call);
    call->pool = pool;
    call->ctx = th_ctx_background();
    gate_init(&call->entering);
    gate_init(&call->returned);
    assert_int_equal(pthread_create(&shut_thread, NULL, shutdown_main, call), 0);

    assert_int_equal(gate_wait(&s->returned, 1), 1);
    assert_int_equal(atomic_load(&s->rc), TH_ESHUTDOWN);
    assert_int_equal(pthread_join(sub_thread, NULL), 0);
    /* The shutdown cannot finish while the worker is held. */
    assert_int_equal(gate_count(&call->returned), 0);

    latch_open(&fx->hold);
    assert_int_equal(pthread_join(shut_thread, NULL), 0);
    assert_int_equal(atomic_load(&call->rc), 0);
    assert_ran_once(fx, 0, 3, 0);
    assert_never_ran(fx, 3, 1);
    th_pool_destroy(pool);
    gate_destroy(&call->entering);
    gate_destroy(&call->returned);
    free(call);
    submitter_free(s);
    fixture_free(fx);
}

/* ---- stats --------------------------------------------------------------------------------- */

static void test_stats_exact_at_quiescent_points(void **state)
{
    (void)state;
    enum { NWORKERS = 3, CAP = 16, NREFUSED = 3, NLATER = 5 };
    enum { NRECS = NWORKERS + CAP + 1 + NLATER };
    fixture *fx = fixture_new(NRECS);
    fixture_setup(fx, 0, NWORKERS, true);
    fixture_setup(fx, NWORKERS, NRECS - NWORKERS, false);
    th_pool *pool = make_pool("stats", NWORKERS, CAP);

    th_pool_stats stats;
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.nthreads, NWORKERS);
    assert_int_equal(stats.capacity, CAP);
    assert_int_equal(stats.busy + stats.queued + stats.submitted + stats.completed +
                         stats.rejected + stats.canceled,
                     0);

    submit_all(pool, fx, 0, NWORKERS);
    assert_int_equal(gate_wait(&fx->started, NWORKERS), NWORKERS);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.busy, NWORKERS);
    assert_int_equal(stats.queued, 0);
    assert_int_equal(stats.submitted, NWORKERS);
    assert_int_equal(stats.completed, 0);

    submit_all(pool, fx, NWORKERS, CAP);
    for (int i = 0; i < NREFUSED; i++) {
        assert_int_equal(th_pool_try_submit(pool, rec_task, &fx->recs[NWORKERS + CAP]),
                         TH_EOVERLOAD);
    }
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.busy, NWORKERS);
    assert_int_equal(stats.queued, CAP);
    assert_int_equal(stats.submitted, NWORKERS + CAP);
    assert_int_equal(stats.completed, 0);
    assert_int_equal(stats.rejected, NREFUSED);
    assert_int_equal(stats.canceled, 0);

    latch_open(&fx->hold);
    stats = wait_quiescent(pool, NWORKERS + CAP);
    assert_int_equal(stats.busy, 0);
    assert_int_equal(stats.queued, 0);
    assert_int_equal(stats.submitted, NWORKERS + CAP);
    assert_int_equal(stats.completed, NWORKERS + CAP);
    assert_int_equal(stats.rejected, NREFUSED);

    submit_all(pool, fx, NWORKERS + CAP + 1, NLATER);
    stats = wait_quiescent(pool, NWORKERS + CAP + NLATER);
    assert_int_equal(stats.submitted, NWORKERS + CAP + NLATER);
    assert_int_equal(stats.completed, NWORKERS + CAP + NLATER);
    assert_int_equal(stats.nthreads, NWORKERS);

    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), 0);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.busy, 0);
    assert_int_equal(stats.queued, 0);
    assert_int_equal(stats.submitted, NWORKERS + CAP + NLATER);
    assert_int_equal(stats.completed, NWORKERS + CAP + NLATER);
    assert_int_equal(stats.rejected, NREFUSED);
    assert_int_equal(stats.canceled, 0);
    assert_never_ran(fx, NWORKERS + CAP, 1);
    th_pool_destroy(pool);
    fixture_free(fx);
}

/* ---- resize -------------------------------------------------------------------------------- */

/* Runs n tasks that must all be inside the pool at the same moment (a barrier of n). */
static void assert_concurrency(th_pool *pool, long n)
{
    fixture *fx = fixture_new((size_t)n);
    barrier meet;
    barrier_init(&meet, n);
    for (long i = 0; i < n; i++) {
        fx->recs[i].meet = &meet;
        fx->recs[i].finished = &fx->finished;
    }
    submit_all(pool, fx, 0, (size_t)n);
    assert_int_equal(gate_wait(&fx->finished, n), n);
    for (long i = 0; i < n; i++) {
        if (!atomic_load(&fx->recs[i].met)) {
            fail_msg("%ld tasks were never in flight at once", n);
        }
    }
    assert_ran_once(fx, 0, (size_t)n, 0);
    barrier_destroy(&meet);
    fixture_free(fx);
}

static void test_resize_grow_shrink_grow(void **state)
{
    (void)state;
    int base = settled_thread_count();
    th_pool *pool = make_pool("resize", 2, 64);
    th_pool_stats stats;
    assert_int_equal(wait_thread_count(base + 2), base + 2);
    assert_concurrency(pool, 2);

    /* Grow: the new workers start at once and run tasks side by side with the old. */
    assert_int_equal(th_pool_resize(pool, 6), 0);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.nthreads, 6);
    assert_int_equal(wait_thread_count(base + 6), base + 6);
    assert_concurrency(pool, 6);

    /* Shrink while idle: the surplus workers exit; work still completes, two at a time. */
    assert_int_equal(th_pool_resize(pool, 2), 0);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.nthreads, 2);
    assert_int_equal(wait_thread_count(base + 2), base + 2);
    enum { NAFTER = 60 }; /* fits in the queue */
    fixture *fx = fixture_new(NAFTER);
    atomic_int inflight = 0, max_inflight = 0;
    for (size_t i = 0; i < NAFTER; i++) {
        fx->recs[i].finished = &fx->finished;
        fx->recs[i].inflight = &inflight;
        fx->recs[i].max_inflight = &max_inflight;
    }
    submit_all(pool, fx, 0, NAFTER);
    assert_int_equal(gate_wait(&fx->finished, NAFTER), NAFTER);
    assert_ran_once(fx, 0, NAFTER, 0);
    assert_true(atomic_load(&max_inflight) <= 2);
    fixture_free(fx);

    /* Grow again after the shrink. */
    assert_int_equal(th_pool_resize(pool, 5), 0);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.nthreads, 5);
    assert_int_equal(wait_thread_count(base + 5), base + 5);
    assert_concurrency(pool, 5);

    /* Shrink while busy: running tasks finish, then the surplus workers leave. */
    fx = fixture_new(5);
    fixture_setup(fx, 0, 5, true);
    submit_all(pool, fx, 0, 5);
    assert_int_equal(gate_wait(&fx->started, 5), 5);
    assert_int_equal(th_pool_resize(pool, 1), 0);
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.nthreads, 1);
    assert_int_equal(stats.busy, 5);
    latch_open(&fx->hold);
    assert_int_equal(gate_wait(&fx->finished, 5), 5);
    assert_ran_once(fx, 0, 5, 0);
    assert_int_equal(wait_thread_count(base + 1), base + 1);
    fixture_free(fx);
    assert_concurrency(pool, 1);

    /* Shrink then grow at once, before the surplus workers had a chance to leave. */
    assert_int_equal(th_pool_resize(pool, 4), 0);
    assert_int_equal(th_pool_resize(pool, 1), 0);
    assert_int_equal(th_pool_resize(pool, 4), 0);
    assert_int_equal(wait_thread_count(base + 4), base + 4);
    assert_concurrency(pool, 4);

    stats = wait_quiescent(pool, 2 + 6 + NAFTER + 5 + 5 + 1 + 4);
    assert_int_equal(stats.completed, 2 + 6 + NAFTER + 5 + 5 + 1 + 4);
    assert_int_equal(stats.submitted, stats.completed);
    th_pool_destroy(pool);
    assert_int_equal(wait_thread_count(base), base);
}

static void test_resize_rejects_bad_sizes(void **state)
{
    (void)state;
    th_pool *pool = make_pool("resizebad", 2, 8);
    assert_int_equal(th_pool_resize(pool, 0), TH_EINVAL);
    assert_int_equal(th_pool_resize(pool, TH_POOL_MAX_THREADS + 1), TH_EINVAL);
    th_pool_stats stats;
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.nthreads, 2);
    assert_int_equal(th_pool_resize(pool, 2), 0); /* same size: nothing to do */
    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), 0);
    assert_int_equal(th_pool_resize(pool, 3), TH_ESHUTDOWN);
    th_pool_destroy(pool);
}

/* A grow whose third new thread cannot start keeps the two it started and says so. */
static void test_resize_thread_failure_keeps_started_workers(void **state)
{
    (void)state;
    int base = settled_thread_count();
    th_pool *pool = make_pool("resizefail", 2, 16);
    assert_int_equal(wait_thread_count(base + 2), base + 2);

    th__fault_fail_after(2);
    int rc = th_pool_resize(pool, 6);
    bool fired = th__fault_fired();
    th__fault_fail_after(-1);
    assert_true(fired);
    assert_true(rc == TH_ESYS || rc == TH_ENOMEM);
    th_pool_stats stats;
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.nthreads, 4);
    assert_int_equal(wait_thread_count(base + 4), base + 4);
    assert_concurrency(pool, 4);

    assert_int_equal(th_pool_resize(pool, 6), 0);
    assert_int_equal(wait_thread_count(base + 6), base + 6);
    assert_concurrency(pool, 6);
    th_pool_destroy(pool);
    assert_int_equal(wait_thread_count(base), base);
}

/* ---- idle cost ----------------------------------------------------------------------------- */

static void test_idle_workers_cost_no_cpu(void **state)
{
    (void)state;
    enum { NWORKERS = 8, NWARM = 64 };
    fixture *fx = fixture_new(NWARM);
    fixture_setup(fx, 0, NWARM, false);
    th_pool *pool = make_pool("idle", NWORKERS, 64);
    submit_all(pool, fx, 0, NWARM);
    assert_int_equal(gate_wait(&fx->finished, NWARM), NWARM);
    (void)wait_quiescent(pool, NWARM);

    uint64_t cpu0 = process_cpu_ns(), wall0 = th_clock_now_ns();
    sleep_ns(200 * TH_NS_PER_MS);
    uint64_t cpu_ns = process_cpu_ns() - cpu0, wall_ns = th_clock_now_ns() - wall0;
    assert_true(wall_ns >= 200 * TH_NS_PER_MS);
    if (cpu_ns >= 20 * TH_NS_PER_MS) {
        fail_msg("%d idle workers used %llu us of CPU in %llu ms", NWORKERS,
                 (unsigned long long)(cpu_ns / TH_NS_PER_US),
                 (unsigned long long)(wall_ns / TH_NS_PER_MS));
    }
    th_pool_destroy(pool);
    assert_ran_once(fx, 0, NWARM, 0);
    fixture_free(fx);
}

/* ---- shutdown ------------------------------------------------------------------------------ */

/* Shutdown without a deadline runs everything already queued (including tasks that raced with
 * its start), with status 0, and refuses anything after it started. */
static void test_shutdown_drains_queue(void **state)
{
    (void)state;
    /* Probes can only fill the room left in the queue (the workers are held), so there are
     * enough of them however late the shutdown thread gets going. */
    enum { NWORKERS = 2, CAP = 128, NQUEUED = 40, NPROBES = CAP - NQUEUED };
    enum { NRECS = NWORKERS + NQUEUED + NPROBES + 1 };
    int base = settled_thread_count();
    fixture *fx = fixture_new(NRECS);
    fixture_setup(fx, 0, NWORKERS, true);
    fixture_setup(fx, NWORKERS, NRECS - NWORKERS, false);
    th_pool *pool = make_pool("drain", NWORKERS, CAP);
    submit_all(pool, fx, 0, NWORKERS);
    assert_int_equal(gate_wait(&fx->started, NWORKERS), NWORKERS);
    submit_all(pool, fx, NWORKERS, NQUEUED);

    shutdown_call *call = calloc(1, sizeof(*call));
    assert_non_null(call);
    call->pool = pool;
    call->ctx = th_ctx_background();
    gate_init(&call->entering);
    gate_init(&call->returned);
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, shutdown_main, call), 0);
    assert_int_equal(gate_wait(&call->entering, 1), 1);

    /* Submit probes until the pool says it is shutting down; those accepted before that must
     * run too. */
    size_t probe = NWORKERS + NQUEUED, accepted = 0, late = NRECS - 1;
    uint64_t deadline_ns = th_clock_after_ns(WAIT_LIMIT_NS);
    for (;;) {
        assert_true(th_clock_now_ns() < deadline_ns);
        /* Once the queue is full, the spare record must be refused. */
        bool full = probe == NWORKERS + NQUEUED + NPROBES;
        int rc = th_pool_try_submit(pool, rec_task, &fx->recs[full ? late : probe]);
        if (rc == TH_ESHUTDOWN) {
            break;
        }
        if (rc == 0) {
            if (full) {
                fail_msg("the queue accepted more than its capacity of %d", CAP);
            }
            probe++;
            accepted++;
        } else {
            assert_int_equal(rc, TH_EOVERLOAD);
        }
        sched_yield();
    }
    assert_int_equal(th_pool_try_submit(pool, rec_task, &fx->recs[late]), TH_ESHUTDOWN);
    assert_int_equal(th_pool_submit(th_ctx_background(), pool, rec_task, &fx->recs[late]),
                     TH_ESHUTDOWN);
    assert_int_equal(th_pool_resize(pool, 4), TH_ESHUTDOWN);
    /* Held workers keep the shutdown waiting. */
    assert_int_equal(gate_count(&call->returned), 0);

    latch_open(&fx->hold);
    assert_int_equal(pthread_join(thread, NULL), 0);
    assert_int_equal(atomic_load(&call->rc), 0);
    size_t total = NWORKERS + NQUEUED + accepted;
    assert_ran_once(fx, 0, total, 0);
    assert_never_ran(fx, total, NRECS - total);
    th_pool_stats stats;
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.submitted, total);
    assert_int_equal(stats.completed, total);
    assert_int_equal(stats.canceled, 0);
    assert_int_equal(stats.queued, 0);
    assert_int_equal(stats.busy, 0);
    /* Every worker was joined (and so was the thread that called shutdown). */
    assert_int_equal(wait_thread_count(base), base);

    assert_int_equal(th_pool_try_submit(pool, rec_task, &fx->recs[late]), TH_ESHUTDOWN);
    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), TH_ESHUTDOWN);
    th_pool_destroy(pool);
    assert_never_ran(fx, late, 1);
    gate_destroy(&call->entering);
    gate_destroy(&call->returned);
    free(call);
    fixture_free(fx);
}

/* Shutdown with a deadline while every worker is stuck in a task: it returns TH_ETIMEDOUT on
 * time, having completed every queued task with TH_ECANCELED on the calling thread exactly once.
 * The stuck tasks finish later, their workers exit on their own and nothing leaks. */
static void check_shutdown_deadline(bool destroy_while_stuck)
{
    enum { NWORKERS = 2, NQUEUED = 10, NRECS = NWORKERS + NQUEUED + 1 };
    int base = settled_thread_count();
    fixture *fx = fixture_new(NRECS);
    fixture_setup(fx, 0, NWORKERS, true);
    fixture_setup(fx, NWORKERS, NRECS - NWORKERS, false);
    th_pool *pool = make_pool("deadline", NWORKERS, 16);
    submit_all(pool, fx, 0, NWORKERS);
    assert_int_equal(gate_wait(&fx->started, NWORKERS), NWORKERS);
    submit_all(pool, fx, NWORKERS, NQUEUED);

    th_ctx *ctx = timeout_ctx(150 * TH_NS_PER_MS);
    uint64_t t0 = th_clock_now_ns();
    int rc = th_pool_shutdown(ctx, pool);
    uint64_t took_ns = th_clock_now_ns() - t0;
    th_ctx_release(ctx);
    assert_int_equal(rc, TH_ETIMEDOUT);
    assert_true(took_ns >= 100 * TH_NS_PER_MS);
    assert_true(took_ns < 10 * TH_NS_PER_S);

    assert_ran_once(fx, NWORKERS, NQUEUED, TH_ECANCELED);
    for (size_t i = NWORKERS; i < NWORKERS + NQUEUED; i++) {
        assert_true(atomic_load(&fx->recs[i].on_main));
    }
    assert_int_equal(gate_count(&fx->finished), NQUEUED);
    th_pool_stats stats;
    th_pool_get_stats(pool, &stats);
    assert_int_equal(stats.canceled, NQUEUED);
    assert_int_equal(stats.completed, 0);
    assert_int_equal(stats.queued, 0);
    assert_int_equal(stats.busy, NWORKERS);
    assert_int_equal(stats.submitted, NWORKERS + NQUEUED);

    size_t late = NRECS - 1;
    assert_int_equal(th_pool_try_submit(pool, rec_task, &fx->recs[late]), TH_ESHUTDOWN);
    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), TH_ESHUTDOWN);

    if (destroy_while_stuck) {
        t0 = th_clock_now_ns();
        th_pool_destroy(pool); /* must not wait for the stuck tasks */
        assert_true(th_clock_now_ns() - t0 < 5 * TH_NS_PER_S);
        latch_open(&fx->hold);
        assert_int_equal(gate_wait(&fx->finished, NRECS - 1), NRECS - 1);
    } else {
        latch_open(&fx->hold);
        assert_int_equal(gate_wait(&fx->finished, NRECS - 1), NRECS - 1);
        th_pool_destroy(pool);
    }
    /* The stuck workers exit by themselves (the last one frees the pool). */
    assert_int_equal(wait_thread_count(base), base);
    assert_ran_once(fx, 0, NWORKERS, 0);
    assert_ran_once(fx, NWORKERS, NQUEUED, TH_ECANCELED);
    assert_never_ran(fx, late, 1);
    fixture_free(fx);
}

static void test_shutdown_deadline_then_release_then_destroy(void **state)
{
    (void)state;
    check_shutdown_deadline(false);
}

static void test_shutdown_deadline_destroy_while_task_stuck(void **state)
{
    (void)state;
    check_shutdown_deadline(true);
}

/* Shutdown with a context that is already done, on idle workers: it returns at once (0 if it
 * found nothing to wait for, else TH_ECANCELED), the workers exit on their own, and destroy
 * frees everything. Repeated to shake out races between detaching and exiting workers. */
static void test_shutdown_with_done_ctx(void **state)
{
    (void)state;
    int base = settled_thread_count();
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    th_ctx_cancel(ctx);
    for (int round = 0; round < 20; round++) {
        th_pool *pool = make_pool("donectx", 3, 8);
        int rc = th_pool_shutdown(ctx, pool);
        assert_true(rc == 0 || rc == TH_ECANCELED);
        assert_int_equal(th_pool_try_submit(pool, rec_task, NULL), TH_ESHUTDOWN);
        th_pool_destroy(pool);
        assert_int_equal(wait_thread_count(base), base);
    }
    th_ctx_release(ctx);
}

/* Short tasks, a deadline that expires while the workers are still draining: whichever way each
 * task goes, it is completed exactly once (run with 0, or canceled with TH_ECANCELED), and the
 * counters add up once every worker has exited. */
static void busy_task(void *arg, int status)
{
    uint64_t until = th_clock_after_ns(50 * TH_NS_PER_US);
    if (status == 0) {
        while (th_clock_now_ns() < until) {
        }
    }
    rec_task(arg, status);
}

static void test_shutdown_deadline_races_with_workers(void **state)
{
    (void)state;
    enum { NTASKS = 64, ROUNDS = 20 };
    int base = settled_thread_count();
    size_t total_ran = 0, total_canceled = 0;
    for (int round = 0; round < ROUNDS; round++) {
        fixture *fx = fixture_new(NTASKS);
        fixture_setup(fx, 0, NTASKS, false);
        th_pool *pool = make_pool("race", 2, NTASKS);
        for (size_t i = 0; i < NTASKS; i++) {
            assert_int_equal(th_pool_try_submit(pool, busy_task, &fx->recs[i]), 0);
        }
        th_ctx *ctx = timeout_ctx((uint64_t)(round % 5) * 300 * TH_NS_PER_US);
        int rc = th_pool_shutdown(ctx, pool);
        th_ctx_release(ctx);
        assert_true(rc == 0 || rc == TH_ETIMEDOUT);
        assert_int_equal(gate_wait(&fx->finished, NTASKS), NTASKS);
        assert_int_equal(wait_thread_count(base), base);
        size_t ran = 0, canceled = 0;
        for (size_t i = 0; i < NTASKS; i++) {
            int runs = atomic_load(&fx->recs[i].runs);
            int status = atomic_load(&fx->recs[i].status);
            if (runs != 1 || (status != 0 && status != TH_ECANCELED)) {
                fail_msg("round %d task %zu: %d calls, status %s", round, i, runs,
                         th_errname(status));
            }
            ran += status == 0;
            canceled += status == TH_ECANCELED;
        }
        th_pool_stats stats;
        th_pool_get_stats(pool, &stats);
        assert_int_equal(stats.submitted, NTASKS);
        assert_int_equal(stats.completed, ran);
        assert_int_equal(stats.canceled, canceled);
        assert_int_equal(stats.busy, 0);
        assert_int_equal(stats.queued, 0);
        if (rc == 0) {
            assert_int_equal(canceled, 0);
        }
        total_ran += ran;
        total_canceled += canceled;
        th_pool_destroy(pool);
        fixture_free(fx);
    }
    print_message("    %zu tasks ran, %zu canceled\n", total_ran, total_canceled);
}

static void test_shutdown_twice(void **state)
{
    (void)state;
    th_pool *pool = make_pool("twice", 2, 8);
    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), 0);
    assert_int_equal(th_pool_shutdown(th_ctx_background(), pool), TH_ESHUTDOWN);
    th_ctx *ctx = timeout_ctx(TH_NS_PER_S);
    assert_int_equal(th_pool_shutdown(ctx, pool), TH_ESHUTDOWN);
    th_ctx_release(ctx);
    th_pool_destroy(pool);
}

/* Destroy without a shutdown first drains the queue like a shutdown without deadline. */
static void test_destroy_drains_queue(void **state)
{
    (void)state;
    enum { NQUEUED = 30 };
    int base = settled_thread_count();
    fixture *fx = fixture_new(NQUEUED);
    fixture_setup(fx, 0, NQUEUED, false);
    th_pool *pool = make_pool("destroy", 1, 32);
    submit_all(pool, fx, 0, NQUEUED);
    th_pool_destroy(pool);
    assert_ran_once(fx, 0, NQUEUED, 0);
    assert_int_equal(wait_thread_count(base), base);
    fixture_free(fx);
}

static void test_destroy_null(void **state)
{
    (void)state;
    th_pool_destroy(NULL);
}

/* ---- failure injection --------------------------------------------------------------------- */

/* Fails the Nth fallible acquisition (allocation or thread start) for increasing N until
 * th_pool_create succeeds: each failure is a clean error with *out untouched, no thread left
 * running, and nothing leaked (LeakSanitizer checks at exit). */
static void test_create_under_injected_failures(void **state)
{
    (void)state;
    enum { NTHREADS = 3 };
    th_pool_config config = {.name = "oom", .nthreads = NTHREADS, .queue_capacity = 8};
    int base = settled_thread_count();
    bool saw_nomem = false, saw_sys = false;
    long n;
    th_pool *pool = SENTINEL_POOL;
    for (n = 0; n < 1000; n++) {
        pool = SENTINEL_POOL;
        th__fault_fail_after(n);
        int rc = th_pool_create(&config, &pool);
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            assert_false(fired);
            break;
        }
        if (!fired) {
            fail_msg("create failed with %s at n=%ld with no injected failure", th_errname(rc), n);
        }
        assert_true(rc == TH_ENOMEM || rc == TH_ESYS);
        saw_nomem |= rc == TH_ENOMEM;
        saw_sys |= rc == TH_ESYS;
        assert_ptr_equal(pool, SENTINEL_POOL);
        int nthreads = wait_thread_count(base);
        if (nthreads != base) {
            fail_msg("n=%ld: %d threads left running after a failed create", n, nthreads - base);
        }
    }
    assert_true(n < 1000);
    /* At least the pool itself and each worker thread are fallible. */
    assert_true(n >= 1 + NTHREADS);
    assert_true(saw_nomem);
    assert_true(saw_sys);
    assert_ptr_not_equal(pool, SENTINEL_POOL);

    fixture *fx = fixture_new(1);
    fixture_setup(fx, 0, 1, false);
    submit_all(pool, fx, 0, 1);
    th_pool_destroy(pool);
    assert_ran_once(fx, 0, 1, 0);
    assert_int_equal(wait_thread_count(base), base);
    fixture_free(fx);
}

static int group_setup(void **state)
{
    (void)state;
    main_thread = pthread_self();
    /* Start the process-wide helpers (the context timer thread) before any test takes a thread
     * count as its baseline. */
    th_ctx *ctx = NULL;
    if (th_ctx_with_timeout(th_ctx_background(), TH_NS_PER_S, &ctx) != 0) {
        return -1;
    }
    th_ctx_release(ctx);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_rejects_bad_config),
        cmocka_unit_test(test_create_reports_config),
        cmocka_unit_test(test_tasks_run_exactly_once),
        cmocka_unit_test(test_overload_capacity_2),
        cmocka_unit_test(test_overload_capacity_5_rounds_to_8),
        cmocka_unit_test(test_overload_capacity_64),
        cmocka_unit_test(test_blocking_submit_waits_for_room),
        cmocka_unit_test(test_blocking_submit_returns_ctx_error),
        cmocka_unit_test(test_blocking_submit_woken_by_shutdown),
        cmocka_unit_test(test_stats_exact_at_quiescent_points),
        cmocka_unit_test(test_resize_grow_shrink_grow),
        cmocka_unit_test(test_resize_rejects_bad_sizes),
        cmocka_unit_test(test_resize_thread_failure_keeps_started_workers),
        cmocka_unit_test(test_idle_workers_cost_no_cpu),
        cmocka_unit_test(test_shutdown_drains_queue),
        cmocka_unit_test(test_shutdown_deadline_then_release_then_destroy),
        cmocka_unit_test(test_shutdown_deadline_destroy_while_task_stuck),
        cmocka_unit_test(test_shutdown_with_done_ctx),
        cmocka_unit_test(test_shutdown_deadline_races_with_workers),
        cmocka_unit_test(test_shutdown_twice),
        cmocka_unit_test(test_destroy_drains_queue),
        cmocka_unit_test(test_destroy_null),
        cmocka_unit_test(test_create_under_injected_failures),
        /* Last: when it fails it leaves its held workers behind. */
        cmocka_unit_test(test_overload_capacity_1),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}
