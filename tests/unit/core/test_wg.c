/* Tests the wait group (include/trialhub/wg.h): counting and its refusals (below zero, overflow),
 * waiters released exactly when the counter reaches zero, waits that end with their context,
 * concurrent done() from many threads, and th_wg_create under allocation failure. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <time.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/ctx.h"
#include "trialhub/wg.h"

#include "test_util.h"

/* ---- helpers ----------------------------------------------------------------------------- */

static th_wg *new_wg(void)
{
    th_wg *wg = NULL;
    assert_int_equal(th_wg_create(&wg), 0);
    assert_non_null(wg);
    return wg;
}

static char sentinel_byte;
#define SENTINEL ((th_wg *)(void *)&sentinel_byte)

/* ---- single-threaded --------------------------------------------------------------------- */

static void test_create_under_oom(void **state)
{
    (void)state;
    for (long n = 0;; n++) {
        assert_true(n < 100);
        th_wg *wg = SENTINEL;
        th__fault_fail_after(n);
        int rc = th_wg_create(&wg);
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            assert_false(fired);
            assert_true(n >= 1);
            assert_ptr_not_equal(wg, SENTINEL);
            assert_int_equal(th_wg_count(wg), 0);
            assert_int_equal(th_wg_add(wg, 1), 0);
            th_wg_done(wg);
            assert_int_equal(th_wg_wait(th_ctx_background(), wg), 0);
            th_wg_destroy(wg);
            break;
        }
        assert_true(fired);
        assert_int_equal(rc, TH_ENOMEM);
        assert_ptr_equal(wg, SENTINEL);
    }
    th_wg_destroy(NULL);
}

static void test_wait_at_zero_returns_at_once(void **state)
{
    (void)state;
    th_wg *wg = new_wg();
    assert_int_equal(th_wg_count(wg), 0);
    assert_int_equal(th_wg_wait(th_ctx_background(), wg), 0);
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    assert_int_equal(th_wg_wait(ctx, wg), 0);

    /* Back to zero after counting: also at once, and reusable. */
    for (int round = 0; round < 3; round++) {
        assert_int_equal(th_wg_add(wg, 2), 0);
        th_wg_done(wg);
        th_wg_done(wg);
        assert_int_equal(th_wg_count(wg), 0);
        assert_int_equal(th_wg_wait(ctx, wg), 0);
    }
    th_ctx_release(ctx);
    th_wg_destroy(wg);
}

static void test_add_counts_and_refuses_below_zero(void **state)
{
    (void)state;
    th_wg *wg = new_wg();
    assert_int_equal(th_wg_add(wg, -1), TH_EINVAL);
    assert_int_equal(th_wg_count(wg), 0);
    assert_int_equal(th_wg_add(wg, LONG_MIN), TH_EINVAL);
    assert_int_equal(th_wg_count(wg), 0);

    assert_int_equal(th_wg_add(wg, 3), 0);
    assert_int_equal(th_wg_count(wg), 3);
    assert_int_equal(th_wg_add(wg, 0), 0);
    assert_int_equal(th_wg_count(wg), 3);
    assert_int_equal(th_wg_add(wg, -4), TH_EINVAL); /* unchanged, not clamped */
    assert_int_equal(th_wg_count(wg), 3);
    assert_int_equal(th_wg_add(wg, -2), 0);
    assert_int_equal(th_wg_count(wg), 1);
    th_wg_done(wg);
    assert_int_equal(th_wg_count(wg), 0);
    assert_int_equal(th_wg_add(wg, -1), TH_EINVAL);
    assert_int_equal(th_wg_count(wg), 0);
    assert_int_equal(th_wg_wait(th_ctx_background(), wg), 0);
    th_wg_destroy(wg);
}

static void test_add_refuses_overflow(void **state)
{
    (void)state;
    th_wg *wg = new_wg();
    assert_int_equal(th_wg_add(wg, LONG_MAX), 0);
    assert_int_equal(th_wg_count(wg), LONG_MAX);
    assert_int_equal(th_wg_add(wg, 1), TH_EINVAL);
    assert_int_equal(th_wg_add(wg, LONG_MAX), TH_EINVAL);
    assert_int_equal(th_wg_count(wg), LONG_MAX);
    assert_int_equal(th_wg_add(wg, -LONG_MAX), 0);
    assert_int_equal(th_wg_count(wg), 0);

    assert_int_equal(th_wg_add(wg, LONG_MAX - 5), 0);
    assert_int_equal(th_wg_add(wg, 6), TH_EINVAL);
    assert_int_equal(th_wg_add(wg, 5), 0);
    assert_int_equal(th_wg_count(wg), LONG_MAX);
    assert_int_equal(th_wg_add(wg, -LONG_MAX), 0);
    th_wg_destroy(wg);
}

/* ---- waiting ----------------------------------------------------------------------------- */

typedef struct wait_arg {
    th_wg *wg;
    th_ctx *ctx;
    atomic_long *dones; /* how many done() calls the test has started */
    long dones_at_return;
    int rc;
    uint64_t done_ns;
    atomic_int *finished;
} wait_arg;

static void *wait_thread(void *p)
{
    wait_arg *arg = p;
    arg->rc = th_wg_wait(arg->ctx, arg->wg);
    arg->done_ns = th_clock_now_ns();
    if (arg->dones) {
        arg->dones_at_return = atomic_load(arg->dones);
    }
    if (arg->finished) {
        atomic_fetch_add(arg->finished, 1);
    }
    return NULL;
}

/* Several waiters return 0 only once the last done() has been called, and all of them wake. */
static void test_waiters_wake_at_zero(void **state)
{
    (void)state;
    enum { WAITERS = 4, JOBS = 5 };
    th_wg *wg = new_wg();
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    assert_int_equal(th_wg_add(wg, JOBS), 0);
    atomic_long dones = 0;
    atomic_int finished = 0;
    wait_arg args[WAITERS];
    pthread_t threads[WAITERS];
    for (int i = 0; i < WAITERS; i++) {
        args[i] = (wait_arg){.wg = wg,
                             .ctx = i % 2 ? ctx : th_ctx_background(),
                             .dones = &dones,
                             .finished = &finished};
        threads[i] = spawn(wait_thread, &args[i]);
    }
    for (int j = 0; j < JOBS; j++) {
        sleep_ms(5);
        assert_int_equal(atomic_load(&finished), 0);
        atomic_fetch_add(&dones, 1);
        th_wg_done(wg);
    }
    for (int i = 0; i < WAITERS; i++) {
        join(threads[i]);
        assert_int_equal(args[i].rc, 0);
        assert_int_equal(args[i].dones_at_return, JOBS);
    }
    assert_int_equal(th_wg_count(wg), 0);
    assert_int_equal(th_ctx_err(ctx), 0);
    th_ctx_release(ctx);
    th_wg_destroy(wg);
}

/* A single add(-n) that reaches zero releases the waiters as well. */
static void test_negative_add_to_zero_wakes(void **state)
{
    (void)state;
    th_wg *wg = new_wg();
    assert_int_equal(th_wg_add(wg, 7), 0);
    wait_arg arg = {.wg = wg, .ctx = th_ctx_background()};
    pthread_t t = spawn(wait_thread, &arg);
    sleep_ms(20);
    uint64_t t0 = th_clock_now_ns();
    assert_int_equal(th_wg_add(wg, -7), 0);
    join(t);
    assert_int_equal(arg.rc, 0);
    assert_true(arg.done_ns - t0 < PROMPT_NS);
    th_wg_destroy(wg);
}

static void test_wait_returns_ctx_cancel(void **state)
{
    (void)state;
    th_wg *wg = new_wg();
    assert_int_equal(th_wg_add(wg, 1), 0);
    th_ctx *parent = NULL, *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &parent), 0);
    assert_int_equal(th_ctx_with_cancel(parent, &ctx), 0);
    enum { WAITERS = 3 };
    wait_arg args[WAITERS];
    pthread_t threads[WAITERS];
    for (int i = 0; i < WAITERS; i++) {
        args[i] = (wait_arg){.wg = wg, .ctx = i == 0 ? parent : ctx};
        threads[i] = spawn(wait_thread, &args[i]);
    }
    sleep_ms(30);
    uint64_t t0 = th_clock_now_ns();
    th_ctx_cancel(parent);
    for (int i = 0; i < WAITERS; i++) {
        join(threads[i]);
        assert_int_equal(args[i].rc, TH_ECANCELED);
        assert_true(args[i].done_ns - t0 < PROMPT_NS);
    }
    assert_int_equal(th_wg_count(wg), 1); /* the counter is not touched */

    /* Already canceled: at once. */
    t0 = th_clock_now_ns();
    assert_int_equal(th_wg_wait(ctx, wg), TH_ECANCELED);
    assert_true(th_clock_now_ns() - t0 < PROMPT_NS);

    /* A waiter on a live context is unaffected by another waiter's cancel. */
    wait_arg live = {.wg = wg, .ctx = th_ctx_background()};
    pthread_t lt = spawn(wait_thread, &live);
    th_ctx *other = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &other), 0);
    wait_arg canceled = {.wg = wg, .ctx = other};
    pthread_t ct = spawn(wait_thread, &canceled);
    sleep_ms(20);
    th_ctx_cancel(other);
    join(ct);
    assert_int_equal(canceled.rc, TH_ECANCELED);
    th_wg_done(wg);
    join(lt);
    assert_int_equal(live.rc, 0);

    th_ctx_release(other);
    th_ctx_release(ctx);
    th_ctx_release(parent);
    th_wg_destroy(wg);
}

static void test_wait_returns_ctx_timeout(void **state)
{
    (void)state;
    th_wg *wg = new_wg();
    assert_int_equal(th_wg_add(wg, 2), 0);
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_timeout(th_ctx_background(), MS(30), &ctx), 0);
    uint64_t deadline = th_ctx_deadline(ctx);
    assert_int_equal(th_wg_wait(ctx, wg), TH_ETIMEDOUT);
    uint64_t now = th_clock_now_ns();
    assert_true(now >= deadline);
    assert_true(now - deadline < LATE_NS + PROMPT_NS);
    assert_int_equal(th_wg_count(wg), 2);
    /* Again on the expired context: at once. */
    assert_int_equal(th_wg_wait(ctx, wg), TH_ETIMEDOUT);
    th_ctx_release(ctx);
    assert_int_equal(th_wg_add(wg, -2), 0);
    th_wg_destroy(wg);
}

/* ---- concurrency ------------------------------------------------------------------------- */

enum { CD_THREADS = 8 };

typedef struct done_arg {
    th_wg *wg;
    atomic_long *dones;
    atomic_int *go;
    long count;
} done_arg;

static void *done_thread(void *p)
{
    done_arg *arg = p;
    while (!atomic_load(arg->go)) {
        sched_yield();
    }
    for (long i = 0; i < arg->count; i++) {
        atomic_fetch_add(arg->dones, 1);
        th_wg_done(arg->wg);
    }
    return NULL;
}

/* Many threads call done() at once: the counter ends at exactly 0, and waiters return only after
 * the very last done() has started. */
static void test_concurrent_done(void **state)
{
    (void)state;
    long per = SCALED(20000);
    th_wg *wg = new_wg();
    assert_int_equal(th_wg_add(wg, CD_THREADS * per), 0);
    atomic_long dones = 0;
    atomic_int go = 0;
    enum { WAITERS = 2 };
    wait_arg wa[WAITERS];
    pthread_t wt[WAITERS];
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_timeout(th_ctx_background(), 40 * TH_NS_PER_S, &ctx), 0);
    for (int i = 0; i < WAITERS; i++) {
        wa[i] = (wait_arg){.wg = wg, .ctx = i ? ctx : th_ctx_background(), .dones = &dones};
        wt[i] = spawn(wait_thread, &wa[i]);
    }
    done_arg da[CD_THREADS];
    pthread_t dt[CD_THREADS];
    for (int i = 0; i < CD_THREADS; i++) {
        da[i] = (done_arg){.wg = wg, .dones = &dones, .go = &go, .count = per};
        dt[i] = spawn(done_thread, &da[i]);
    }
    atomic_store(&go, 1);
    for (int i = 0; i < CD_THREADS; i++) {
        join(dt[i]);
    }
    for (int i = 0; i < WAITERS; i++) {
        join(wt[i]);
        assert_int_equal(wa[i].rc, 0);
        assert_int_equal(wa[i].dones_at_return, CD_THREADS * per);
    }
    assert_int_equal(th_wg_count(wg), 0);
    assert_int_equal(th_wg_add(wg, -1), TH_EINVAL);
    th_ctx_release(ctx);
    th_wg_destroy(wg);
}

typedef struct round_arg {
    th_wg *wg;
    atomic_int *progress;
} round_arg;

static void *round_job(void *p)
{
    round_arg *arg = p;
    atomic_fetch_add(arg->progress, 1);
    th_wg_done(arg->wg);
    return NULL;
}

/* Many short rounds of add / start jobs / wait on one reused group: a lost wake-up hangs (or,
 * with the watchdog context, fails with TH_ETIMEDOUT). */
static void test_many_rounds(void **state)
{
    (void)state;
    enum { JOBS = 4 };
    th_wg *wg = new_wg();
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_timeout(th_ctx_background(), 40 * TH_NS_PER_S, &ctx), 0);
    int rounds = SCALED(1000);
    for (int r = 0; r < rounds; r++) {
        atomic_int progress = 0;
        round_arg arg = {.wg = wg, .progress = &progress};
        pthread_t t[JOBS];
        assert_int_equal(th_wg_add(wg, JOBS), 0);
        for (int i = 0; i < JOBS; i++) {
            t[i] = spawn(round_job, &arg);
        }
        assert_int_equal(th_wg_wait(r % 2 ? ctx : th_ctx_background(), wg), 0);
        assert_int_equal(atomic_load(&progress), JOBS);
        assert_int_equal(th_wg_count(wg), 0);
        for (int i = 0; i < JOBS; i++) {
            join(t[i]);
        }
    }
    th_ctx_release(ctx);
    th_wg_destroy(wg);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup_reset, teardown_check)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_create_under_oom),
        T(test_wait_at_zero_returns_at_once),
        T(test_add_counts_and_refuses_below_zero),
        T(test_add_refuses_overflow),
        T(test_waiters_wake_at_zero),
        T(test_negative_add_to_zero_wakes),
        T(test_wait_returns_ctx_cancel),
        T(test_wait_returns_ctx_timeout),
        T(test_concurrent_done),
        T(test_many_rounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
