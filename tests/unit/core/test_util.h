/* Shared by the core's cmocka tests: sanitizer-aware loop scaling, time bounds for a noisy
 * 2-core machine, checks from threads other than cmocka's, and small thread helpers. Include
 * after <cmocka.h>. */
#ifndef TRIALHUB_TEST_UTIL_H
#define TRIALHUB_TEST_UTIL_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"

#if defined(__SANITIZE_THREAD__)
#define TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TEST_TSAN 1
#endif
#endif
#ifndef TEST_TSAN
#define TEST_TSAN 0
#endif

/* Loop counts are divided by 4 under TSan, which is 5-15x slower on this kind of code. */
#define SCALED(n) (TEST_TSAN ? (n) / 4 : (n))

#define MS(x) ((uint64_t)(x)*TH_NS_PER_MS)
/* How late a deadline may fire, and how long a wake-up may take, on a noisy 2-core machine that
 * runs the sanitizer builds two tests at a time: a broken wake-up hangs for seconds, so these
 * bounds still tell it apart from a slow scheduler. */
#define LATE_NS   MS(20)
#define PROMPT_NS MS(500)

/* Checks in threads other than cmocka's: count and print, asserted as zero by the main thread. */
static atomic_int thread_failures;

#define T_CHECK(cond)                                                                       \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            atomic_fetch_add(&thread_failures, 1);                                          \
            fprintf(stderr, "%s:%d: thread check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                                   \
    } while (0)

/* cmocka setup/teardown: no injected fault left armed, no failed thread check. */
static inline int setup_reset(void **state)
{
    (void)state;
    atomic_store(&thread_failures, 0);
    return 0;
}

static inline int teardown_check(void **state)
{
    (void)state;
    th__fault_fail_after(-1);
    assert_int_equal(atomic_load(&thread_failures), 0);
    return 0;
}

static inline void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline pthread_t spawn(void *(*fn)(void *), void *arg)
{
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, fn, arg), 0);
    return t;
}

static inline void join(pthread_t t)
{
    assert_int_equal(pthread_join(t, NULL), 0);
}

#endif
