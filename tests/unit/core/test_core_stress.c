/* Multithreaded stress tests for the concurrency core with every count checked exactly: a pool
 * fed by several submitters while it is resized, a snapshot read by eight threads while one
 * publishes as fast as it can, and a ctx + chan + wg fan-in with and without cancellation. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "trialhub/chan.h"
#include "trialhub/clock.h"
#include "trialhub/ctx.h"
#include "trialhub/error.h"
#include "trialhub/pool.h"
#include "trialhub/snapshot.h"
#include "trialhub/wg.h"

/* Sanitized builds run the same shapes with a quarter of the operations. */
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif
#define SCALE(n) (SANITIZED ? (n) / 4 : (n))

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / TH_NS_PER_S),
                          .tv_nsec = (long)(ns % TH_NS_PER_S)};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static void report_time(const char *what, uint64_t t0)
{
    print_message("    %s: %.2f s\n", what, (double)(th_clock_now_ns() - t0) / 1e9);
}

/* ---- (1) pool: many submitters, mixed submit kinds, concurrent resize ---------------------- */

#define POOL_TASKS      SCALE(400000)
#define POOL_SUBMITTERS 4
#define POOL_CAPACITY   64
#define POOL_CHUNK      64 /* tasks submitted one way before switching to the other */

typedef struct pool_stress {
    th_pool *pool;
    atomic_uint *runs; /* per task */
    size_t ntasks;
    atomic_ulong overloads; /* TH_EOVERLOAD answers seen by try_submit */
    atomic_ulong unexpected;
    atomic_bool stop_resizing;
    atomic_ulong resizes;
    atomic_int resize_error;
} pool_stress;

static atomic_ulong bad_task_status;

static void count_task(void *arg, int status)
{
    if (status != 0) {
        atomic_fetch_add(&bad_task_status, 1);
    }
    atomic_fetch_add_explicit((atomic_uint *)arg, 1, memory_order_relaxed);
}

typedef struct submitter_arg {
    pool_stress *ps;
    size_t from;
    size_t to;
} submitter_arg;

static void *pool_submitter_main(void *arg)
{
    submitter_arg *sa = arg;
    pool_stress *ps = sa->ps;
    unsigned long overloads = 0;
    for (size_t i = sa->from; i < sa->to; i++) {
        int rc;
        if ((i / POOL_CHUNK) % 2 == 0) {
            while ((rc = th_pool_try_submit(ps->pool, count_task, &ps->runs[i])) == TH_EOVERLOAD) {
                overloads++;
                sched_yield();
            }
        } else {
            rc = th_pool_submit(th_ctx_background(), ps->pool, count_task, &ps->runs[i]);
        }
        if (rc != 0) {
            atomic_fetch_add(&ps->unexpected, 1);
        }
    }
    atomic_fetch_add(&ps->overloads, overloads);
    return NULL;
}

static void *pool_resizer_main(void *arg)
{
    pool_stress *ps = arg;
    static const unsigned sizes[] = {4, 1, 6, 2, 5, 3, 8, 1};
    size_t k = 0;
    while (!atomic_load(&ps->stop_resizing)) {
        int rc = th_pool_resize(ps->pool, sizes[k++ % (sizeof(sizes) / sizeof(sizes[0]))]);
        if (rc != 0) {
            atomic_store(&ps->resize_error, rc);
            break;
        }
        atomic_fetch_add(&ps->resizes, 1);
        sleep_ns(100 * TH_NS_PER_US); /* pacing, not synchronisation */
    }
    return NULL;
}

static void test_pool_many_submitters_with_resize(void **state)
{
    (void)state;
    uint64_t t0 = th_clock_now_ns();
    pool_stress *ps = calloc(1, sizeof(*ps));
    assert_non_null(ps);
    ps->ntasks = POOL_TASKS;
    ps->runs = calloc(ps->ntasks, sizeof(*ps->runs));
    assert_non_null(ps->runs);
    atomic_store(&bad_task_status, 0);
    th_pool_config config = {.name = "stress", .nthreads = 4, .queue_capacity = POOL_CAPACITY};
    assert_int_equal(th_pool_create(&config, &ps->pool), 0);

    pthread_t resizer, submitters[POOL_SUBMITTERS];
    submitter_arg args[POOL_SUBMITTERS];
    assert_int_equal(pthread_create(&resizer, NULL, pool_resizer_main, ps), 0);
    for (size_t s = 0; s < POOL_SUBMITTERS; s++) {
        args[s] = (submitter_arg){.ps = ps,
                                  .from = ps->ntasks * s / POOL_SUBMITTERS,
                                  .to = ps->ntasks * (s + 1) / POOL_SUBMITTERS};
        assert_int_equal(pthread_create(&submitters[s], NULL, pool_submitter_main, &args[s]), 0);
    }
    for (size_t s = 0; s < POOL_SUBMITTERS; s++) {
        assert_int_equal(pthread_join(submitters[s], NULL), 0);
    }
    atomic_store(&ps->stop_resizing, true);
    assert_int_equal(pthread_join(resizer, NULL), 0);
    assert_int_equal(atomic_load(&ps->resize_error), 0);
    assert_true(atomic_load(&ps->resizes) > 0);
    assert_int_equal(atomic_load(&ps->unexpected), 0);

    assert_int_equal(th_pool_shutdown(th_ctx_background(), ps->pool), 0);
    th_pool_stats stats;
    th_pool_get_stats(ps->pool, &stats);
    assert_int_equal(stats.submitted, ps->ntasks);
    assert_int_equal(stats.completed, ps->ntasks);
    assert_int_equal(stats.canceled, 0);
    assert_int_equal(stats.queued, 0);
    assert_int_equal(stats.busy, 0);
    assert_int_equal(stats.rejected, atomic_load(&ps->overloads));
    assert_int_equal(atomic_load(&bad_task_status), 0);
    for (size_t i = 0; i < ps->ntasks; i++) {
        unsigned runs = atomic_load_explicit(&ps->runs[i], memory_order_relaxed);
        if (runs != 1) {
            fail_msg("task %zu ran %u times", i, runs);
        }
    }
    th_pool_destroy(ps->pool);
    print_message("    %zu tasks, %lu refusals retried, %lu resizes\n", ps->ntasks,
                  (unsigned long)stats.rejected, atomic_load(&ps->resizes));
    report_time("pool", t0);
    free(ps->runs);
    free(ps);
}

/* ---- (2) snapshot: eight readers, one updater ------------------------------------------------ */

#define SNAP_READERS   8
#define SNAP_PUBLISHES SCALE(200000)
#define SNAP_SITES     16

/* A progress tally: total is the sum of the per-site counts, in every version. */
typedef struct tally {
    uint64_t seq;
    uint64_t site[SNAP_SITES];
    uint64_t total;
} tally;

static atomic_ulong tally_frees;
static atomic_ulong tally_bad_frees;

static tally *tally_new(uint64_t seq)
{
    tally *t = malloc(sizeof(*t));
    if (t == NULL) {
        return NULL;
    }
    t->seq = seq;
    t->total = 0;
    uint64_t x = seq * 0x9e3779b97f4a7c15u + 1;
    for (int i = 0; i < SNAP_SITES; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        t->site[i] = x % 1000;
        t->total += t->site[i];
    }
    return t;
}

static bool tally_consistent(const tally *t)
{
    uint64_t sum = 0;
    for (int i = 0; i < SNAP_SITES; i++) {
        sum += t->site[i];
    }
    return sum == t->total;
}

static void tally_free(void *arg)
{
    tally *t = arg;
    if (!tally_consistent(t)) {
        atomic_fetch_add(&tally_bad_frees, 1);
    }
    atomic_fetch_add(&tally_frees, 1);
    memset(t, 0x5a, sizeof(*t)); /* a reader still using it would see an inconsistent tally */
    free(t);
}

typedef struct snap_stress {
    th_snapshot *snap;
    atomic_bool done;
    atomic_int readers_ready;
    atomic_ulong reads;
    atomic_ulong inconsistent;
    atomic_ulong went_back; /* a later read saw an older version */
    atomic_ulong null_reads;
    atomic_int idle_readers; /* readers that never got a read in */
    atomic_int publish_errors;
} snap_stress;

static void *snap_reader_main(void *arg)
{
    snap_stress *ss = arg;
    unsigned long reads = 0, inconsistent = 0, went_back = 0, null_reads = 0;
    uint64_t last_seq = 0;
    atomic_fetch_add(&ss->readers_ready, 1);
    while (!atomic_load_explicit(&ss->done, memory_order_relaxed)) {
        th_snapshot_guard guard;
        const tally *t = th_snapshot_acquire(ss->snap, &guard);
        if (t == NULL) {
            null_reads++;
            continue;
        }
        reads++;
        inconsistent += !tally_consistent(t);
        went_back += t->seq < last_seq;
        last_seq = t->seq;
        if (reads % 8 == 0) {
            /* A nested guard: never older than the outer one, both stay intact. */
            th_snapshot_guard inner_guard;
            const tally *inner = th_snapshot_acquire(ss->snap, &inner_guard);
            if (inner == NULL) {
                null_reads++;
            } else {
                reads++;
                inconsistent += !tally_consistent(inner);
                went_back += inner->seq < t->seq;
                last_seq = inner->seq;
                th_snapshot_release(&inner_guard);
            }
            inconsistent += !tally_consistent(t);
        }
        th_snapshot_release(&guard);
    }
    atomic_fetch_add(&ss->reads, reads);
    atomic_fetch_add(&ss->inconsistent, inconsistent);
    atomic_fetch_add(&ss->went_back, went_back);
    atomic_fetch_add(&ss->null_reads, null_reads);
    if (reads == 0) {
        atomic_fetch_add(&ss->idle_readers, 1);
    }
    return NULL;
}

static void *snap_updater_main(void *arg)
{
    snap_stress *ss = arg;
    /* Start publishing once every reader is reading (a handshake, not a sleep). */
    while (atomic_load(&ss->readers_ready) < SNAP_READERS) {
        sched_yield();
    }
    for (uint64_t seq = 1; seq <= SNAP_PUBLISHES; seq++) {
        tally *t = tally_new(seq);
        if (t == NULL || th_snapshot_publish(ss->snap, t) != 0) {
            free(t);
            atomic_fetch_add(&ss->publish_errors, 1);
            break;
        }
    }
    atomic_store(&ss->done, true);
    return NULL;
}

static void test_snapshot_readers_and_updater(void **state)
{
    (void)state;
    uint64_t t0 = th_clock_now_ns();
    atomic_store(&tally_frees, 0);
    atomic_store(&tally_bad_frees, 0);
    snap_stress *ss = calloc(1, sizeof(*ss));
    assert_non_null(ss);
    tally *initial = tally_new(0);
    assert_non_null(initial);
    assert_int_equal(th_snapshot_create(initial, tally_free, &ss->snap), 0);

    pthread_t readers[SNAP_READERS], updater;
    for (int i = 0; i < SNAP_READERS; i++) {
        assert_int_equal(pthread_create(&readers[i], NULL, snap_reader_main, ss), 0);
    }
    assert_int_equal(pthread_create(&updater, NULL, snap_updater_main, ss), 0);
    assert_int_equal(pthread_join(updater, NULL), 0);
    for (int i = 0; i < SNAP_READERS; i++) {
        assert_int_equal(pthread_join(readers[i], NULL), 0);
    }

    assert_int_equal(atomic_load(&ss->publish_errors), 0);
    assert_int_equal(atomic_load(&ss->inconsistent), 0);
    assert_int_equal(atomic_load(&ss->went_back), 0);
    assert_int_equal(atomic_load(&ss->null_reads), 0);
    assert_int_equal(atomic_load(&ss->idle_readers), 0);
    assert_int_equal(th_snapshot_generation(ss->snap), SNAP_PUBLISHES + 1);
    th_snapshot_guard guard;
    const tally *last = th_snapshot_acquire(ss->snap, &guard);
    assert_non_null(last);
    assert_int_equal(last->seq, SNAP_PUBLISHES);
    th_snapshot_release(&guard);

    th_snapshot_destroy(ss->snap);
    /* Every version ever created (the initial one and each published one) freed exactly once
     * (ASan reports a double free; a missing one shows here). */
    assert_int_equal(atomic_load(&tally_frees), SNAP_PUBLISHES + 1);
    assert_int_equal(atomic_load(&tally_bad_frees), 0);
    print_message("    %lu reads, %d publishes\n", atomic_load(&ss->reads), SNAP_PUBLISHES);
    report_time("snapshot", t0);
    free(ss);
}

/* ---- (3) ctx + chan + wg fan-in ------------------------------------------------------------ */

#define FANIN_PRODUCERS    4
#define FANIN_PER_PRODUCER SCALE(50000)
#define FANIN_CAPACITY     64
#define FANIN_TOTAL        ((size_t)FANIN_PRODUCERS * FANIN_PER_PRODUCER)

typedef struct fanin {
    th_chan *ch;
    th_wg *wg;
    th_ctx *ctx;          /* shared by the producers */
    size_t cancel_after;  /* the consumer cancels ctx after this many items (0: never) */
    bool consumer_stalls; /* the consumer starts only when `start` is opened */
    pthread_mutex_t start_mu;
    pthread_cond_t start_cond;
    bool start;
    size_t sent[FANIN_PRODUCERS]; /* items whose send returned 0 */
    int stop_rc[FANIN_PRODUCERS]; /* why the producer stopped (0: all sent) */
    unsigned char *received;      /* per item, written by the consumer only */
    size_t nreceived;
    size_t duplicates;
    size_t unknown;
    int consumer_rc;
    int closer_wait_rc;
    int closer_close_rc;
} fanin;

typedef struct producer_arg {
    fanin *f;
    size_t id;
} producer_arg;

static void *producer_main(void *arg)
{
    producer_arg *pa = arg;
    fanin *f = pa->f;
    size_t sent = 0;
    int rc = 0;
    for (size_t i = 0; i < FANIN_PER_PRODUCER; i++) {
        /* Like Go's select on ctx.Done(): a send that finds room succeeds even on a done
         * context, so a producer also checks before each send. */
        if ((rc = th_ctx_err(f->ctx)) != 0) {
            break;
        }
        void *item = (void *)(uintptr_t)(pa->id * FANIN_PER_PRODUCER + i + 1);
        if ((rc = th_chan_send(f->ctx, f->ch, item)) != 0) {
            break;
        }
        sent++;
    }
    f->sent[pa->id] = sent;
    f->stop_rc[pa->id] = rc;
    th_wg_done(f->wg);
    return NULL;
}

static void *closer_main(void *arg)
{
    fanin *f = arg;
    f->closer_wait_rc = th_wg_wait(th_ctx_background(), f->wg);
    f->closer_close_rc = th_chan_close(f->ch);
    return NULL;
}

static void *consumer_main(void *arg)
{
    fanin *f = arg;
    if (f->consumer_stalls) {
        pthread_mutex_lock(&f->start_mu);
        while (!f->start) {
            pthread_cond_wait(&f->start_cond, &f->start_mu);
        }
        pthread_mutex_unlock(&f->start_mu);
    }
    /* The consumer drains until closed, whatever happens to the producers' context. */
    for (;;) {
        void *item = NULL;
        int rc = th_chan_recv(th_ctx_background(), f->ch, &item);
        if (rc != 0) {
            f->consumer_rc = rc;
            break;
        }
        size_t index = (size_t)(uintptr_t)item - 1;
        if (index >= FANIN_TOTAL) {
            f->unknown++;
        } else if (f->received[index]++ != 0) {
            f->duplicates++;
        }
        f->nreceived++;
        if (f->cancel_after != 0 && f->nreceived == f->cancel_after) {
            th_ctx_cancel(f->ctx);
        }
    }
    return NULL;
}

/* Runs one fan-in: FANIN_PRODUCERS producers under ctx, one closer, one consumer. Returns the
 * total sent after checking that every item sent was received exactly once and no other. */
static size_t run_fanin(th_ctx *ctx, size_t cancel_after, bool consumer_stalls)
{
    fanin *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    f->received = calloc(FANIN_TOTAL, 1);
    assert_non_null(f->received);
    f->ctx = ctx;
    f->cancel_after = cancel_after;
    f->consumer_stalls = consumer_stalls;
    pthread_mutex_init(&f->start_mu, NULL);
    pthread_cond_init(&f->start_cond, NULL);
    assert_int_equal(th_chan_create(FANIN_CAPACITY, &f->ch), 0);
    assert_int_equal(th_wg_create(&f->wg), 0);
    assert_int_equal(th_wg_add(f->wg, FANIN_PRODUCERS), 0);

    pthread_t producers[FANIN_PRODUCERS], closer, consumer;
    producer_arg args[FANIN_PRODUCERS];
    assert_int_equal(pthread_create(&consumer, NULL, consumer_main, f), 0);
    assert_int_equal(pthread_create(&closer, NULL, closer_main, f), 0);
    for (size_t p = 0; p < FANIN_PRODUCERS; p++) {
        args[p] = (producer_arg){.f = f, .id = p};
        assert_int_equal(pthread_create(&producers[p], NULL, producer_main, &args[p]), 0);
    }
    for (size_t p = 0; p < FANIN_PRODUCERS; p++) {
        assert_int_equal(pthread_join(producers[p], NULL), 0);
    }
    if (consumer_stalls) {
        pthread_mutex_lock(&f->start_mu);
        f->start = true;
        pthread_cond_broadcast(&f->start_cond);
        pthread_mutex_unlock(&f->start_mu);
    }
    assert_int_equal(pthread_join(closer, NULL), 0);
    assert_int_equal(pthread_join(consumer, NULL), 0);

    assert_int_equal(f->closer_wait_rc, 0);
    assert_int_equal(f->closer_close_rc, 0);
    assert_int_equal(f->consumer_rc, TH_ECLOSED);
    assert_int_equal(f->duplicates, 0);
    assert_int_equal(f->unknown, 0);
    size_t total_sent = 0;
    for (size_t p = 0; p < FANIN_PRODUCERS; p++) {
        total_sent += f->sent[p];
        for (size_t i = 0; i < FANIN_PER_PRODUCER; i++) {
            unsigned char want = i < f->sent[p];
            if (f->received[p * FANIN_PER_PRODUCER + i] != want) {
                fail_msg("producer %zu item %zu: received %u times, sent %u times", p, i,
                         f->received[p * FANIN_PER_PRODUCER + i], want);
            }
        }
        if (f->sent[p] < FANIN_PER_PRODUCER) {
            assert_int_equal(f->stop_rc[p], th_ctx_err(ctx));
        } else {
            assert_int_equal(f->stop_rc[p], 0);
        }
    }
    assert_int_equal(f->nreceived, total_sent);
    assert_int_equal(th_chan_len(f->ch), 0);
    assert_int_equal(th_wg_count(f->wg), 0);

    th_wg_destroy(f->wg);
    th_chan_destroy(f->ch);
    pthread_cond_destroy(&f->start_cond);
    pthread_mutex_destroy(&f->start_mu);
    free(f->received);
    free(f);
    return total_sent;
}

static void test_fanin_complete(void **state)
{
    (void)state;
    uint64_t t0 = th_clock_now_ns();
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    assert_int_equal(run_fanin(ctx, 0, false), FANIN_TOTAL);
    assert_int_equal(th_ctx_err(ctx), 0);
    th_ctx_release(ctx);
    report_time("fan-in", t0);
}

/* The consumer cancels the producers' context halfway; everybody stops, nobody hangs, and the
 * items sent before the cancel are all received exactly once. */
static void test_fanin_canceled_midway(void **state)
{
    (void)state;
    uint64_t t0 = th_clock_now_ns();
    for (int round = 0; round < 3; round++) {
        th_ctx *ctx = NULL;
        assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
        size_t cancel_after = FANIN_TOTAL / 2;
        size_t sent = run_fanin(ctx, cancel_after, false);
        assert_int_equal(th_ctx_err(ctx), TH_ECANCELED);
        /* At most what was buffered plus one in-flight send per producer after the cancel. */
        assert_true(sent >= cancel_after);
        assert_true(sent <= cancel_after + FANIN_CAPACITY + FANIN_PRODUCERS);
        th_ctx_release(ctx);
    }
    report_time("fan-in canceled", t0);
}

/* The consumer does not read until the producers' deadline has passed: the producers block on
 * the full channel, all return TH_ETIMEDOUT, and exactly one channel's worth was sent. */
static void test_fanin_deadline_while_blocked(void **state)
{
    (void)state;
    uint64_t t0 = th_clock_now_ns();
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_timeout(th_ctx_background(), 100 * TH_NS_PER_MS, &ctx), 0);
    assert_int_equal(run_fanin(ctx, 0, true), FANIN_CAPACITY);
    assert_int_equal(th_ctx_err(ctx), TH_ETIMEDOUT);
    th_ctx_release(ctx);
    report_time("fan-in deadline", t0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_many_submitters_with_resize),
        cmocka_unit_test(test_snapshot_readers_and_updater),
        cmocka_unit_test(test_fanin_complete),
        cmocka_unit_test(test_fanin_canceled_midway),
        cmocka_unit_test(test_fanin_deadline_while_blocked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
