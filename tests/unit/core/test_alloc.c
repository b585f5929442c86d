/* Tests the allocation wrappers (include/trialhub/alloc.h): the fault-injection countdown fails
 * exactly the Nth acquisition once (also when counted across threads), the wrappers honour it,
 * and th_calloc / th_realloc_array refuse n * size overflows with NULL. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

#include "trialhub/alloc.h"

/* Every test leaves injection off, whatever happened. */
static int teardown_fault_off(void **state)
{
    (void)state;
    th__fault_fail_after(-1);
    return 0;
}

static void test_injection_off_by_default(void **state)
{
    (void)state;
    assert_false(th__fault_fired());
    for (int i = 0; i < 1000; i++) {
        assert_false(th__fault_should_fail());
    }
    assert_false(th__fault_fired());
}

static void test_fail_after_zero_fails_next_once(void **state)
{
    (void)state;
    th__fault_fail_after(0);
    assert_false(th__fault_fired());
    assert_true(th__fault_should_fail());
    assert_true(th__fault_fired());
    /* One-shot: injection switches itself off; the fired flag stays until the next arm. */
    for (int i = 0; i < 100; i++) {
        assert_false(th__fault_should_fail());
    }
    assert_true(th__fault_fired());
}

static void test_fail_after_n_fails_exactly_the_nth(void **state)
{
    (void)state;
    for (long n = 0; n < 20; n++) {
        th__fault_fail_after(n);
        for (long i = 0; i < n; i++) {
            assert_false(th__fault_should_fail());
            assert_false(th__fault_fired());
        }
        assert_true(th__fault_should_fail());
        assert_true(th__fault_fired());
        for (int i = 0; i < 10; i++) {
            assert_false(th__fault_should_fail());
        }
    }
}

static void test_negative_disables_and_rearm_clears_fired(void **state)
{
    (void)state;
    th__fault_fail_after(0);
    assert_true(th__fault_should_fail());
    assert_true(th__fault_fired());

    /* Re-arming clears the fired flag. */
    th__fault_fail_after(5);
    assert_false(th__fault_fired());

    /* Disarming before it fires: nothing fails, nothing fired. */
    th__fault_fail_after(-1);
    assert_false(th__fault_fired());
    for (int i = 0; i < 100; i++) {
        assert_false(th__fault_should_fail());
    }
    assert_false(th__fault_fired());

    th__fault_fail_after(-42);
    for (int i = 0; i < 100; i++) {
        assert_false(th__fault_should_fail());
    }
    assert_false(th__fault_fired());
}

static void test_malloc_honours_injection(void **state)
{
    (void)state;
    th__fault_fail_after(1);
    void *a = th_malloc(32);
    assert_non_null(a);
    assert_false(th__fault_fired());
    void *b = th_malloc(32);
    assert_null(b);
    assert_true(th__fault_fired());
    void *c = th_malloc(32);
    assert_non_null(c);
    memset(a, 0xab, 32);
    memset(c, 0xcd, 32);
    th_free(a);
    th_free(c);
}

static void test_calloc_honours_injection_and_zeroes(void **state)
{
    (void)state;
    th__fault_fail_after(0);
    assert_null(th_calloc(4, 16));
    assert_true(th__fault_fired());
    unsigned char *p = th_calloc(4, 16);
    assert_non_null(p);
    for (size_t i = 0; i < 64; i++) {
        assert_int_equal(p[i], 0);
    }
    th_free(p);
}

static void test_realloc_array_failure_leaves_ptr_untouched(void **state)
{
    (void)state;
    unsigned char *p = th_realloc_array(NULL, 8, 4); /* acts as malloc */
    assert_non_null(p);
    for (unsigned char i = 0; i < 32; i++) {
        p[i] = i;
    }
    th__fault_fail_after(0);
    assert_null(th_realloc_array(p, 1000, 4));
    assert_true(th__fault_fired());
    /* p is still valid and unchanged (ASan would report a use-after-free otherwise). */
    for (unsigned char i = 0; i < 32; i++) {
        assert_int_equal(p[i], i);
    }
    unsigned char *q = th_realloc_array(p, 1000, 4);
    assert_non_null(q);
    for (unsigned char i = 0; i < 32; i++) {
        assert_int_equal(q[i], i);
    }
    q[3999] = 1;
    th_free(q);
}

static void test_zero_sizes_give_freeable_pointers(void **state)
{
    (void)state;
    void *a = th_malloc(0);
    void *b = th_calloc(0, 8);
    void *c = th_calloc(8, 0);
    void *d = th_realloc_array(NULL, 0, 8);
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_non_null(d);
    th_free(a);
    th_free(b);
    th_free(c);
    th_free(d);
    th_free(NULL);
}

static void test_calloc_overflow_returns_null(void **state)
{
    (void)state;
    assert_null(th_calloc(SIZE_MAX / 2 + 1, 2));
    assert_null(th_calloc(SIZE_MAX, SIZE_MAX));
    assert_null(th_calloc(2, SIZE_MAX / 2 + 1));
    assert_null(th_calloc((SIZE_MAX >> 16) + 1, (size_t)1 << 16));
    assert_false(th__fault_fired());
}

static void test_realloc_array_overflow_returns_null_and_keeps_ptr(void **state)
{
    (void)state;
    unsigned char *p = th_realloc_array(NULL, 4, 4);
    assert_non_null(p);
    memset(p, 0x5a, 16);
    assert_null(th_realloc_array(p, SIZE_MAX / 8 + 1, 8));
    assert_null(th_realloc_array(p, SIZE_MAX, SIZE_MAX));
    assert_null(th_realloc_array(p, 2, SIZE_MAX / 2 + 1));
    assert_null(th_realloc_array(NULL, SIZE_MAX / 4 + 1, 4));
    for (size_t i = 0; i < 16; i++) {
        assert_int_equal(p[i], 0x5a);
    }
    th_free(p);
}

/* ---- countdown shared by every thread ---------------------------------------------------- */

enum { CT_THREADS = 4, CT_CALLS = 5000 };

typedef struct count_arg {
    atomic_int *start;
    int failures;
} count_arg;

static void *count_thread(void *p)
{
    count_arg *arg = p;
    atomic_fetch_add(arg->start, 1);
    while (atomic_load(arg->start) < CT_THREADS) {
        sched_yield();
    }
    for (int i = 0; i < CT_CALLS; i++) {
        if (th__fault_should_fail()) {
            arg->failures++;
        }
    }
    return NULL;
}

/* Acquisitions on every thread count towards one countdown, and exactly one of them fails. */
static void test_countdown_is_shared_across_threads(void **state)
{
    (void)state;
    for (int round = 0; round < 5; round++) {
        atomic_int start = 0;
        pthread_t threads[CT_THREADS];
        count_arg args[CT_THREADS];
        th__fault_fail_after((long)CT_THREADS * CT_CALLS / 2 + round);
        for (int i = 0; i < CT_THREADS; i++) {
            args[i] = (count_arg){.start = &start, .failures = 0};
            assert_int_equal(pthread_create(&threads[i], NULL, count_thread, &args[i]), 0);
        }
        int failures = 0;
        for (int i = 0; i < CT_THREADS; i++) {
            assert_int_equal(pthread_join(threads[i], NULL), 0);
            failures += args[i].failures;
        }
        assert_int_equal(failures, 1);
        assert_true(th__fault_fired());
    }

    /* A countdown larger than all the calls never fires. */
    atomic_int start = 0;
    pthread_t threads[CT_THREADS];
    count_arg args[CT_THREADS];
    th__fault_fail_after((long)CT_THREADS * CT_CALLS);
    for (int i = 0; i < CT_THREADS; i++) {
        args[i] = (count_arg){.start = &start, .failures = 0};
        assert_int_equal(pthread_create(&threads[i], NULL, count_thread, &args[i]), 0);
    }
    for (int i = 0; i < CT_THREADS; i++) {
        assert_int_equal(pthread_join(threads[i], NULL), 0);
        assert_int_equal(args[i].failures, 0);
    }
    assert_false(th__fault_fired());
    /* ...and the very next one is the one that fails. */
    assert_true(th__fault_should_fail());
    assert_true(th__fault_fired());
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_injection_off_by_default, teardown_fault_off),
        cmocka_unit_test_teardown(test_fail_after_zero_fails_next_once, teardown_fault_off),
        cmocka_unit_test_teardown(test_fail_after_n_fails_exactly_the_nth, teardown_fault_off),
        cmocka_unit_test_teardown(test_negative_disables_and_rearm_clears_fired,
                                  teardown_fault_off),
        cmocka_unit_test_teardown(test_malloc_honours_injection, teardown_fault_off),
        cmocka_unit_test_teardown(test_calloc_honours_injection_and_zeroes, teardown_fault_off),
        cmocka_unit_test_teardown(test_realloc_array_failure_leaves_ptr_untouched,
                                  teardown_fault_off),
        cmocka_unit_test_teardown(test_zero_sizes_give_freeable_pointers, teardown_fault_off),
        cmocka_unit_test_teardown(test_realloc_array_overflow_returns_null_and_keeps_ptr,
                                  teardown_fault_off),
        cmocka_unit_test_teardown(test_countdown_is_shared_across_threads, teardown_fault_off),
        cmocka_unit_test_teardown(test_calloc_overflow_returns_null, teardown_fault_off),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
