/* Tests cancellation contexts (include/trialhub/ctx.h): propagation down the tree and never up,
 * deadlines (accuracy, inheritance, the timer heap), descriptors, after-funcs, sleeps, reference
 * counting, concurrent cancellation, and the constructors under allocation failure. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <time.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/ctx.h"

#include "test_util.h"

/* ---- helpers ----------------------------------------------------------------------------- */

static th_ctx *new_cancel(th_ctx *parent)
{
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(parent, &ctx), 0);
    assert_non_null(ctx);
    return ctx;
}

static th_ctx *new_timeout(th_ctx *parent, uint64_t ns)
{
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_timeout(parent, ns, &ctx), 0);
    assert_non_null(ctx);
    return ctx;
}

static th_ctx *new_deadline(th_ctx *parent, uint64_t deadline_ns)
{
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_deadline(parent, deadline_ns, &ctx), 0);
    assert_non_null(ctx);
    return ctx;
}

static int ctx_fd(th_ctx *ctx)
{
    int fd = -1;
    assert_int_equal(th_ctx_fd(ctx, &fd), 0);
    assert_true(fd >= 0);
    return fd;
}

/* poll() for POLLIN; returns poll's result (1 readable, 0 timeout). */
static int poll_in(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc;
    do {
        rc = poll(&p, 1, timeout_ms);
    } while (rc < 0 && errno == EINTR);
    if (rc == 1 && !(p.revents & POLLIN)) {
        return -1;
    }
    return rc;
}

static uint32_t xorshift(uint32_t *state)
{
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    return x;
}

/* What an after-func saw when it ran. The plain fields are read only after the hook is known to
 * have finished (th_ctx_after_func_stop() returned false, or the canceler was joined). */
typedef struct hook_rec {
    atomic_int calls;
    th_ctx *ctx;
    atomic_int *seq;
    int seq_no;
    int err_seen;
    uint64_t when_ns;
    pthread_t thread;
} hook_rec;

static void rec_hook(void *arg)
{
    hook_rec *rec = arg;
    rec->thread = pthread_self();
    rec->when_ns = th_clock_now_ns();
    rec->err_seen = rec->ctx ? th_ctx_err(rec->ctx) : 0;
    if (rec->seq) {
        rec->seq_no = atomic_fetch_add(rec->seq, 1);
    }
    atomic_fetch_add(&rec->calls, 1);
}

static void arm(th_ctx *ctx, th_ctx_hook *hook, hook_rec *rec)
{
    rec->ctx = ctx;
    assert_int_equal(th_ctx_after_func(ctx, hook, rec_hook, rec), 0);
}

/* ---- allocation failure (these run first, before anything has started the timer thread, so
 * that the thread start and the first heap allocation are among the injected failures) ------- */

static char sentinel_byte;
#define SENTINEL ((th_ctx *)(void *)&sentinel_byte)

enum ctor { CTOR_CANCEL, CTOR_TIMEOUT, CTOR_DEADLINE };

/* Fails the Nth acquisition for N = 0, 1, ... until the constructor succeeds; each failure must
 * be a clean code with *out untouched (ASan's leak checker sees anything left behind). Returns
 * the number of failures. */
static int ctor_under_oom(th_ctx *parent, enum ctor ctor, bool *saw_esys)
{
    for (long n = 0;; n++) {
        assert_true(n < 100);
        th_ctx *out = SENTINEL;
        th__fault_fail_after(n);
        int rc;
        switch (ctor) {
        case CTOR_CANCEL:
            rc = th_ctx_with_cancel(parent, &out);
            break;
        case CTOR_TIMEOUT:
            rc = th_ctx_with_timeout(parent, 10 * TH_NS_PER_S, &out);
            break;
        default:
            rc = th_ctx_with_deadline(parent, th_clock_after_ns(10 * TH_NS_PER_S), &out);
            break;
        }
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            assert_false(fired);
            assert_ptr_not_equal(out, SENTINEL);
            assert_int_equal(th_ctx_err(out), th_ctx_err(parent));
            if (ctor != CTOR_CANCEL) {
                assert_true(th_ctx_deadline(out) != TH_CTX_NO_DEADLINE);
            }
            th_ctx_release(out);
            return (int)n;
        }
        assert_true(fired);
        assert_true(rc == TH_ENOMEM || rc == TH_ESYS);
        if (rc == TH_ESYS) {
            *saw_esys = true;
        }
        assert_ptr_equal(out, SENTINEL);
    }
}

static void test_oom_with_timeout(void **state)
{
    (void)state;
    bool saw_esys = false;
    /* First use of the timer: context, thread start and heap allocation can all fail. */
    int failures = ctor_under_oom(th_ctx_background(), CTOR_TIMEOUT, &saw_esys);
    assert_true(failures >= 1);
    failures = ctor_under_oom(th_ctx_background(), CTOR_DEADLINE, &saw_esys);
    assert_true(failures >= 1);

    /* Under a live parent: a failure after linking must unlink again (the parent's cancel
     * below walks its children; a dangling one is a use-after-free under ASan). */
    th_ctx *parent = new_cancel(th_ctx_background());
    failures = ctor_under_oom(parent, CTOR_TIMEOUT, &saw_esys);
    assert_true(failures >= 1);
    failures = ctor_under_oom(parent, CTOR_DEADLINE, &saw_esys);
    assert_true(failures >= 1);
    th_ctx *child = new_timeout(parent, 10 * TH_NS_PER_S);
    th_ctx_cancel(parent);
    assert_int_equal(th_ctx_err(child), TH_ECANCELED);
    th_ctx_release(child);
    th_ctx_release(parent);

    /* The timer still works after its start failed. */
    th_ctx *t = new_timeout(th_ctx_background(), MS(1));
    assert_int_equal(poll_in(ctx_fd(t), 5000), 1);
    assert_int_equal(th_ctx_err(t), TH_ETIMEDOUT);
    th_ctx_release(t);
    (void)saw_esys; /* only when this test runs first; reported, not required */
}

static void test_oom_with_cancel(void **state)
{
    (void)state;
    bool saw_esys = false;
    int failures = ctor_under_oom(th_ctx_background(), CTOR_CANCEL, &saw_esys);
    assert_true(failures >= 1);

    th_ctx *parent = new_cancel(th_ctx_background());
    failures = ctor_under_oom(parent, CTOR_CANCEL, &saw_esys);
    assert_true(failures >= 1);
    th_ctx *child = new_cancel(parent);
    th_ctx_cancel(parent);
    assert_int_equal(th_ctx_err(child), TH_ECANCELED);

    /* Under a done parent the failure is still clean. */
    failures = ctor_under_oom(parent, CTOR_CANCEL, &saw_esys);
    assert_true(failures >= 1);
    failures = ctor_under_oom(parent, CTOR_TIMEOUT, &saw_esys);
    assert_true(failures >= 1);
    assert_false(saw_esys);
    th_ctx_release(child);
    th_ctx_release(parent);
}

static void test_oom_fd(void **state)
{
    (void)state;
    th_ctx *ctx = new_cancel(th_ctx_background());
    int fd = -12345;
    th__fault_fail_after(0);
    assert_int_equal(th_ctx_fd(ctx, &fd), TH_ESYS);
    assert_true(th__fault_fired());
    th__fault_fail_after(-1);
    assert_int_equal(fd, -12345);
    /* A later call makes the descriptor, and it works. */
    fd = ctx_fd(ctx);
    assert_int_equal(poll_in(fd, 0), 0);
    th_ctx_cancel(ctx);
    assert_int_equal(poll_in(fd, 0), 1);
    th_ctx_release(ctx);
}

/* ---- background and basics --------------------------------------------------------------- */

static void noop_hook(void *arg)
{
    atomic_fetch_add((atomic_int *)arg, 1);
}

static void test_background(void **state)
{
    (void)state;
    th_ctx *bg = th_ctx_background();
    assert_non_null(bg);
    assert_ptr_equal(th_ctx_background(), bg);
    assert_int_equal(th_ctx_err(bg), 0);
    assert_false(th_ctx_done(bg));
    assert_true(th_ctx_deadline(bg) == TH_CTX_NO_DEADLINE);
    assert_true(th_ctx_remaining_ns(bg) == TH_CTX_NO_DEADLINE);

    th_ctx_cancel(bg);
    th_ctx_release(bg);
    assert_ptr_equal(th_ctx_ref(bg), bg);
    th_ctx_unref(bg);
    th_ctx_unref(bg);
    assert_false(th_ctx_done(bg));

    int fd = -7;
    assert_int_equal(th_ctx_fd(bg, &fd), TH_EINVAL);
    assert_int_equal(fd, -7);

    atomic_int calls = 0;
    th_ctx_hook hook;
    assert_int_equal(th_ctx_after_func(bg, &hook, noop_hook, &calls), 0);
    th_ctx_cancel(bg);
    assert_true(th_ctx_after_func_stop(&hook));
    assert_int_equal(atomic_load(&calls), 0);

    /* NULL is a no-op for release and unref. */
    th_ctx_release(NULL);
    th_ctx_unref(NULL);

    /* Children of the background still work after all that. */
    th_ctx *c = new_cancel(bg);
    assert_false(th_ctx_done(c));
    th_ctx_release(c);
}

static void test_with_cancel_basics(void **state)
{
    (void)state;
    th_ctx *ctx = new_cancel(th_ctx_background());
    assert_int_equal(th_ctx_err(ctx), 0);
    assert_false(th_ctx_done(ctx));
    assert_true(th_ctx_deadline(ctx) == TH_CTX_NO_DEADLINE);
    assert_true(th_ctx_remaining_ns(ctx) == TH_CTX_NO_DEADLINE);

    th_ctx_cancel(ctx);
    assert_int_equal(th_ctx_err(ctx), TH_ECANCELED);
    assert_true(th_ctx_done(ctx));
    th_ctx_cancel(ctx); /* idempotent */
    assert_int_equal(th_ctx_err(ctx), TH_ECANCELED);
    th_ctx_release(ctx);

    /* Release alone cancels: watch through a second reference. */
    ctx = new_cancel(th_ctx_background());
    assert_ptr_equal(th_ctx_ref(ctx), ctx);
    th_ctx_release(ctx);
    assert_int_equal(th_ctx_err(ctx), TH_ECANCELED);
    th_ctx_unref(ctx);

    /* Unref does not cancel. */
    ctx = new_cancel(th_ctx_background());
    th_ctx_ref(ctx);
    th_ctx_unref(ctx);
    assert_int_equal(th_ctx_err(ctx), 0);
    th_ctx_release(ctx);
}

/* ---- propagation ------------------------------------------------------------------------- */

static void test_cancel_reaches_grandchildren(void **state)
{
    (void)state;
    th_ctx *root = new_cancel(th_ctx_background());
    th_ctx *child = new_cancel(root);
    th_ctx *grand = new_cancel(child);
    th_ctx *grand_t = new_timeout(child, 10 * TH_NS_PER_S);
    th_ctx *great = new_cancel(grand_t);

    hook_rec rec = {0};
    th_ctx_hook hook;
    arm(great, &hook, &rec);
    assert_int_equal(th_ctx_err(great), 0);

    th_ctx_cancel(root);
    assert_int_equal(th_ctx_err(root), TH_ECANCELED);
    assert_int_equal(th_ctx_err(child), TH_ECANCELED);
    assert_int_equal(th_ctx_err(grand), TH_ECANCELED);
    assert_int_equal(th_ctx_err(grand_t), TH_ECANCELED);
    assert_int_equal(th_ctx_err(great), TH_ECANCELED);
    /* The descendant's hook ran once, on this thread, before cancel returned. */
    assert_int_equal(atomic_load(&rec.calls), 1);
    assert_true(pthread_equal(rec.thread, pthread_self()));
    assert_int_equal(rec.err_seen, TH_ECANCELED);
    assert_false(th_ctx_after_func_stop(&hook));

    th_ctx_release(great);
    th_ctx_release(grand_t);
    th_ctx_release(grand);
    th_ctx_release(child);
    th_ctx_release(root);
    assert_int_equal(atomic_load(&rec.calls), 1);
}

static void test_child_cancel_does_not_reach_parent_or_siblings(void **state)
{
    (void)state;
    th_ctx *parent = new_cancel(th_ctx_background());
    th_ctx *a = new_cancel(parent);
    th_ctx *b = new_cancel(parent);
    th_ctx *c = new_timeout(parent, 10 * TH_NS_PER_S);
    th_ctx *a1 = new_cancel(a);
    th_ctx *b1 = new_cancel(b);

    hook_rec rp = {0}, rb = {0};
    th_ctx_hook hp, hb;
    arm(parent, &hp, &rp);
    arm(b, &hb, &rb);

    th_ctx_cancel(a);
    assert_int_equal(th_ctx_err(a), TH_ECANCELED);
    assert_int_equal(th_ctx_err(a1), TH_ECANCELED);
    assert_int_equal(th_ctx_err(parent), 0);
    assert_int_equal(th_ctx_err(b), 0);
    assert_int_equal(th_ctx_err(b1), 0);
    assert_int_equal(th_ctx_err(c), 0);
    assert_int_equal(atomic_load(&rp.calls), 0);
    assert_int_equal(atomic_load(&rb.calls), 0);

    /* Releasing (and freeing) a child leaves the rest alone as well. */
    th_ctx_release(a1);
    th_ctx_release(a);
    th_ctx_release(c);
    assert_int_equal(th_ctx_err(parent), 0);
    assert_int_equal(th_ctx_err(b), 0);

    /* A new child after all that is live, and the parent's cancel still reaches the rest. */
    th_ctx *d = new_cancel(parent);
    assert_int_equal(th_ctx_err(d), 0);
    th_ctx_cancel(parent);
    assert_int_equal(th_ctx_err(b), TH_ECANCELED);
    assert_int_equal(th_ctx_err(b1), TH_ECANCELED);
    assert_int_equal(th_ctx_err(d), TH_ECANCELED);
    assert_int_equal(atomic_load(&rp.calls), 1);
    assert_int_equal(atomic_load(&rb.calls), 1);
    assert_false(th_ctx_after_func_stop(&hp));
    assert_false(th_ctx_after_func_stop(&hb));

    th_ctx_release(d);
    th_ctx_release(b1);
    th_ctx_release(b);
    th_ctx_release(parent);
}

static void test_child_of_done_parent_starts_done(void **state)
{
    (void)state;
    th_ctx *parent = new_cancel(th_ctx_background());
    th_ctx_cancel(parent);

    th_ctx *c1 = new_cancel(parent);
    th_ctx *c2 = new_timeout(parent, MS(1));
    th_ctx *c3 = new_deadline(parent, 0);
    th_ctx *g = new_cancel(c1);
    assert_int_equal(th_ctx_err(c1), TH_ECANCELED);
    assert_int_equal(th_ctx_err(c2), TH_ECANCELED);
    assert_int_equal(th_ctx_err(c3), TH_ECANCELED);
    assert_int_equal(th_ctx_err(g), TH_ECANCELED);

    /* It is done in every way: fd readable, after_func refused. */
    assert_int_equal(poll_in(ctx_fd(c1), 0), 1);
    atomic_int calls = 0;
    th_ctx_hook hook;
    assert_int_equal(th_ctx_after_func(g, &hook, noop_hook, &calls), TH_ECANCELED);

    /* c2's own 1 ms deadline passing later changes nothing: the first cause wins. Wait for a
     * later timer to have fired, which means the timer has passed c2's deadline too. */
    th_ctx *later = new_timeout(th_ctx_background(), MS(5));
    assert_int_equal(poll_in(ctx_fd(later), 5000), 1);
    assert_int_equal(th_ctx_err(c2), TH_ECANCELED);
    assert_int_equal(atomic_load(&calls), 0);
    th_ctx_release(later);

    th_ctx_release(g);
    th_ctx_release(c3);
    th_ctx_release(c2);
    th_ctx_release(c1);
    th_ctx_release(parent);
}

static void test_first_cause_wins(void **state)
{
    (void)state;
    /* Canceled before the deadline: stays TH_ECANCELED after the deadline passes. */
    uint64_t d = th_clock_after_ns(MS(100));
    th_ctx *a = new_deadline(th_ctx_background(), d);
    th_ctx *marker = new_deadline(th_ctx_background(), d + MS(1));
    th_ctx_cancel(a);
    assert_int_equal(th_ctx_err(a), TH_ECANCELED);
    assert_int_equal(poll_in(ctx_fd(marker), 5000), 1);
    assert_int_equal(th_ctx_err(marker), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(a), TH_ECANCELED);

    /* Timed out first: cancel and release do not turn it into TH_ECANCELED. */
    th_ctx_cancel(marker);
    assert_int_equal(th_ctx_err(marker), TH_ETIMEDOUT);
    th_ctx_ref(marker);
    th_ctx_release(marker);
    assert_int_equal(th_ctx_err(marker), TH_ETIMEDOUT);
    th_ctx_unref(marker);
    th_ctx_release(a);
}

/* ---- deadlines --------------------------------------------------------------------------- */

static void test_deadline_error_reaches_descendants(void **state)
{
    (void)state;
    th_ctx *parent = new_timeout(th_ctx_background(), MS(30));
    uint64_t deadline = th_ctx_deadline(parent);
    th_ctx *child = new_cancel(parent);
    th_ctx *grand = new_timeout(child, 10 * TH_NS_PER_S);
    th_ctx *great = new_cancel(grand);
    /* Descendants inherit the earlier deadline. */
    assert_true(th_ctx_deadline(child) == deadline);
    assert_true(th_ctx_deadline(grand) == deadline);
    assert_true(th_ctx_deadline(great) == deadline);

    hook_rec rec = {0};
    th_ctx_hook hook;
    arm(great, &hook, &rec);

    assert_int_equal(poll_in(ctx_fd(great), 5000), 1);
    assert_true(th_clock_now_ns() >= deadline);
    assert_int_equal(th_ctx_err(parent), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(child), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(grand), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(great), TH_ETIMEDOUT);

    assert_false(th_ctx_after_func_stop(&hook));
    assert_int_equal(atomic_load(&rec.calls), 1);
    assert_int_equal(rec.err_seen, TH_ETIMEDOUT);
    assert_false(pthread_equal(rec.thread, pthread_self())); /* the timer thread ran it */
    assert_true(rec.when_ns >= deadline);

    /* A child made after the deadline starts done with TH_ETIMEDOUT, and its after_func says so. */
    th_ctx *late = new_cancel(child);
    assert_int_equal(th_ctx_err(late), TH_ETIMEDOUT);
    atomic_int calls = 0;
    th_ctx_hook h2;
    assert_int_equal(th_ctx_after_func(late, &h2, noop_hook, &calls), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_remaining_ns(late), 0);

    th_ctx_release(late);
    th_ctx_release(great);
    th_ctx_release(grand);
    th_ctx_release(child);
    th_ctx_release(parent);
    assert_int_equal(atomic_load(&calls), 0);
}

/* Several deadlines created out of order: each fires not before its time, in deadline order,
 * the median within LATE_NS after its time and none later than PROMPT_NS (one scheduling
 * hiccup on a loaded machine must not fail the suite; a timer that polls or sleeps too long
 * would). */
static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void test_deadline_accuracy_and_order(void **state)
{
    (void)state;
    enum { N = 8 };
    static const int order[N] = {5, 1, 7, 3, 0, 6, 2, 4};
    th_ctx *ctx[N];
    th_ctx_hook hooks[N];
    hook_rec recs[N] = {0};
    atomic_int seq = 0;
    uint64_t base = th_clock_after_ns(MS(50));
    for (int i = 0; i < N; i++) {
        int k = order[i];
        ctx[k] = new_deadline(th_ctx_background(), base + (uint64_t)k * MS(10));
        assert_true(th_ctx_deadline(ctx[k]) == base + (uint64_t)k * MS(10));
        recs[k].seq = &seq;
        arm(ctx[k], &hooks[k], &recs[k]);
    }
    for (int k = 0; k < N; k++) {
        assert_int_equal(poll_in(ctx_fd(ctx[k]), 5000), 1);
    }
    uint64_t late[N];
    for (int k = 0; k < N; k++) {
        assert_false(th_ctx_after_func_stop(&hooks[k]));
        assert_int_equal(atomic_load(&recs[k].calls), 1);
        assert_int_equal(th_ctx_err(ctx[k]), TH_ETIMEDOUT);
        assert_int_equal(recs[k].err_seen, TH_ETIMEDOUT);
        uint64_t deadline = th_ctx_deadline(ctx[k]);
        if (recs[k].when_ns < deadline) {
            fail_msg("deadline %d fired %llu ns early", k,
                     (unsigned long long)(deadline - recs[k].when_ns));
        }
        late[k] = recs[k].when_ns - deadline;
        if (late[k] >= PROMPT_NS) {
            fail_msg("deadline %d fired %llu us late", k,
                     (unsigned long long)(late[k] / TH_NS_PER_US));
        }
        assert_int_equal(recs[k].seq_no, k);
        assert_int_equal(th_ctx_remaining_ns(ctx[k]), 0);
        th_ctx_release(ctx[k]);
    }
    qsort(late, N, sizeof(late[0]), cmp_u64);
    if (late[N / 2] >= LATE_NS) {
        fail_msg("deadlines fired %llu us late (median)",
                 (unsigned long long)(late[N / 2] / TH_NS_PER_US));
    }
}

static void test_parent_deadline_wins(void **state)
{
    (void)state;
    uint64_t pd = th_clock_after_ns(MS(60));
    th_ctx *parent = new_deadline(th_ctx_background(), pd);
    assert_true(th_ctx_deadline(parent) == pd);
    assert_true(th_ctx_remaining_ns(parent) <= MS(60));

    th_ctx *later = new_deadline(parent, pd + 10 * TH_NS_PER_S);
    th_ctx *later_t = new_timeout(parent, 10 * TH_NS_PER_S);
    th_ctx *plain = new_cancel(parent);
    th_ctx *never = new_timeout(parent, UINT64_MAX);
    assert_true(th_ctx_deadline(later) == pd);
    assert_true(th_ctx_deadline(later_t) == pd);
    assert_true(th_ctx_deadline(plain) == pd);
    assert_true(th_ctx_deadline(never) == pd);
    assert_true(th_ctx_remaining_ns(later) <= MS(60));

    /* An earlier deadline of the child's own holds for it (and its descendants). */
    uint64_t cd = th_clock_after_ns(MS(20));
    th_ctx *earlier = new_deadline(parent, cd);
    th_ctx *earlier_kid = new_cancel(earlier);
    assert_true(th_ctx_deadline(earlier) == cd);
    assert_true(th_ctx_deadline(earlier_kid) == cd);
    /* Records the parent's state when the child's deadline fires: the timer fires in deadline
     * order, so the parent (40 ms later) must still be live then, and untouched by its child. */
    hook_rec rec = {.ctx = parent};
    th_ctx_hook hook;
    assert_int_equal(th_ctx_after_func(earlier, &hook, rec_hook, &rec), 0);

    assert_int_equal(poll_in(ctx_fd(earlier_kid), 5000), 1);
    assert_true(th_clock_now_ns() >= cd);
    assert_int_equal(th_ctx_err(earlier), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(earlier_kid), TH_ETIMEDOUT);
    assert_false(th_ctx_after_func_stop(&hook));
    assert_int_equal(atomic_load(&rec.calls), 1);
    assert_int_equal(rec.err_seen, 0);
    assert_true(rec.when_ns >= cd);

    assert_int_equal(poll_in(ctx_fd(later), 5000), 1);
    assert_true(th_clock_now_ns() >= pd);
    /* `later` is done, but the timer thread may still be walking its siblings: a cancel of the
     * (already timed-out) parent returns only once that walk is over, and changes nothing. */
    th_ctx_cancel(parent);
    assert_int_equal(th_ctx_err(later), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(later_t), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(plain), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(never), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(parent), TH_ETIMEDOUT);

    th_ctx_release(earlier_kid);
    th_ctx_release(earlier);
    th_ctx_release(never);
    th_ctx_release(plain);
    th_ctx_release(later_t);
    th_ctx_release(later);
    th_ctx_release(parent);
}

static void test_deadline_edge_values(void **state)
{
    (void)state;
    /* Remaining time of a long timeout is close to it, never above. */
    th_ctx *long_t = new_timeout(th_ctx_background(), 10 * TH_NS_PER_S);
    uint64_t rem = th_ctx_remaining_ns(long_t);
    assert_true(rem <= 10 * TH_NS_PER_S && rem > 9 * TH_NS_PER_S);
    th_ctx_release(long_t);

    /* A deadline in the past or a zero timeout: done (TH_ETIMEDOUT) promptly. */
    th_ctx *past = new_deadline(th_ctx_background(), 1);
    th_ctx *zero = new_timeout(th_ctx_background(), 0);
    assert_int_equal(poll_in(ctx_fd(past), 5000), 1);
    assert_int_equal(poll_in(ctx_fd(zero), 5000), 1);
    assert_int_equal(th_ctx_err(past), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(zero), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_remaining_ns(past), 0);
    th_ctx_release(past);
    th_ctx_release(zero);

    /* A timeout that would overflow saturates to "no deadline" instead of wrapping into the
     * past. */
    th_ctx *huge = new_timeout(th_ctx_background(), UINT64_MAX - 1);
    th_ctx *max = new_timeout(th_ctx_background(), UINT64_MAX);
    assert_true(th_ctx_deadline(huge) == TH_CTX_NO_DEADLINE);
    assert_true(th_ctx_deadline(max) == TH_CTX_NO_DEADLINE);
    th_ctx *marker = new_timeout(th_ctx_background(), MS(5));
    assert_int_equal(poll_in(ctx_fd(marker), 5000), 1);
    assert_int_equal(th_ctx_err(huge), 0);
    assert_int_equal(th_ctx_err(max), 0);
    th_ctx_release(marker);
    th_ctx_release(max);
    th_ctx_release(huge);
}

/* Many timers with shuffled deadlines, a third of them freed before they fire (removal from the
 * middle of the heap, and growth past its first allocation): the rest fire in deadline order,
 * none early. */
static void test_many_timers(void **state)
{
    (void)state;
    enum { N = 300 };
    static th_ctx *ctx[N];
    static th_ctx_hook hooks[N];
    static hook_rec recs[N];
    static bool kept[N];
    atomic_int seq = 0;
    uint64_t base = th_clock_after_ns(MS(150));
    for (int i = 0; i < N; i++) {
        int slot = (i * 119 + 13) % N; /* 119 is coprime with 300: a permutation */
        uint64_t deadline = base + (uint64_t)slot * 100 * TH_NS_PER_US;
        recs[i] = (hook_rec){.seq = &seq, .seq_no = -1};
        ctx[i] = new_deadline(th_ctx_background(), deadline);
        arm(ctx[i], &hooks[i], &recs[i]);
        kept[i] = true;
    }
    /* Free a third of them, in yet another order, from anywhere in the heap. (With these two
     * permutations, a removal that forgot to sift the moved element up breaks the order.) */
    for (int k = 0; k < N; k++) {
        int i = (k * 13) % N; /* 13 is coprime with 300 */
        if (i % 3 == 1 && th_clock_now_ns() + MS(100) < th_ctx_deadline(ctx[i])) {
            /* Freed well before its deadline: the hook runs here, once, with TH_ECANCELED. */
            th_ctx_release(ctx[i]);
            assert_int_equal(atomic_load(&recs[i].calls), 1);
            assert_int_equal(recs[i].err_seen, TH_ECANCELED);
            kept[i] = false;
        }
    }
    bool created_in_time = th_clock_now_ns() < base;
    for (int i = 0; i < N; i++) {
        if (kept[i]) {
            assert_int_equal(poll_in(ctx_fd(ctx[i]), 5000), 1);
        }
    }
    for (int i = 0; i < N; i++) {
        if (!kept[i]) {
            continue;
        }
        assert_false(th_ctx_after_func_stop(&hooks[i]));
        assert_int_equal(atomic_load(&recs[i].calls), 1);
        assert_int_equal(recs[i].err_seen, TH_ETIMEDOUT);
        assert_true(recs[i].when_ns >= th_ctx_deadline(ctx[i]));
    }
    if (created_in_time) {
        for (int i = 0; i < N; i++) {
            for (int j = 0; j < N; j++) {
                if (kept[i] && kept[j] && th_ctx_deadline(ctx[i]) < th_ctx_deadline(ctx[j])) {
                    assert_true(recs[i].seq_no < recs[j].seq_no);
                }
            }
        }
    }
    for (int i = 0; i < N; i++) {
        if (kept[i]) {
            th_ctx_release(ctx[i]);
        }
    }
}

/* ---- descriptors ------------------------------------------------------------------------- */

typedef struct poll_arg {
    int fd;
    int rc;
    uint64_t woke_ns;
} poll_arg;

static void *poll_thread(void *p)
{
    poll_arg *arg = p;
    arg->rc = poll_in(arg->fd, 10000);
    arg->woke_ns = th_clock_now_ns();
    return NULL;
}

static void test_fd_readable_on_cancel(void **state)
{
    (void)state;
    th_ctx *ctx = new_cancel(th_ctx_background());
    th_ctx *kid = new_cancel(ctx);
    int fd = ctx_fd(ctx);
    int kid_fd = ctx_fd(kid);
    assert_int_equal(ctx_fd(ctx), fd); /* the same descriptor every time */
    assert_int_not_equal(fd, kid_fd);
    assert_int_equal(poll_in(fd, 0), 0);
    assert_int_equal(poll_in(kid_fd, 0), 0);

    /* A thread blocked in poll() wakes on cancel. */
    poll_arg arg = {.fd = kid_fd};
    pthread_t t = spawn(poll_thread, &arg);
    sleep_ms(20);
    uint64_t t0 = th_clock_now_ns();
    th_ctx_cancel(ctx);
    join(t);
    assert_int_equal(arg.rc, 1);
    assert_true(arg.woke_ns - t0 < PROMPT_NS);

    /* It stays readable. */
    assert_int_equal(poll_in(fd, 0), 1);
    assert_int_equal(poll_in(fd, 0), 1);
    assert_int_equal(poll_in(kid_fd, 0), 1);

    /* Made after the cancel: readable at once. */
    th_ctx *late_parent = new_cancel(th_ctx_background());
    th_ctx_cancel(late_parent);
    assert_int_equal(poll_in(ctx_fd(late_parent), 0), 1);
    th_ctx *born_done = new_cancel(late_parent);
    assert_int_equal(poll_in(ctx_fd(born_done), 0), 1);
    th_ctx_release(born_done);
    th_ctx_release(late_parent);

    /* The descriptor is closed when the last reference goes (only this thread opens files
     * now, so the number cannot have been reused). */
    th_ctx_release(kid);
    assert_int_equal(fcntl(kid_fd, F_GETFD), -1);
    assert_int_equal(errno, EBADF);
    th_ctx_ref(ctx);
    th_ctx_release(ctx);
    assert_true(fcntl(fd, F_GETFD) >= 0); /* still referenced */
    th_ctx_unref(ctx);
    assert_int_equal(fcntl(fd, F_GETFD), -1);
    assert_int_equal(errno, EBADF);
}

static void test_fd_readable_on_deadline(void **state)
{
    (void)state;
    th_ctx *ctx = new_timeout(th_ctx_background(), MS(30));
    th_ctx *kid = new_cancel(ctx);
    uint64_t deadline = th_ctx_deadline(ctx);
    int fd = ctx_fd(kid);
    assert_int_equal(poll_in(fd, 5000), 1);
    uint64_t now = th_clock_now_ns();
    assert_true(now >= deadline);
    assert_true(now - deadline < LATE_NS + PROMPT_NS);
    assert_int_equal(th_ctx_err(kid), TH_ETIMEDOUT);
    assert_int_equal(poll_in(ctx_fd(ctx), 0), 1);
    assert_int_equal(poll_in(fd, 0), 1);
    th_ctx_release(kid);
    th_ctx_release(ctx);

    /* Made after the deadline: readable at once. */
    ctx = new_timeout(th_ctx_background(), 0);
    th_ctx *marker = new_timeout(th_ctx_background(), MS(2));
    assert_int_equal(poll_in(ctx_fd(marker), 5000), 1);
    assert_int_equal(th_ctx_err(ctx), TH_ETIMEDOUT);
    assert_int_equal(poll_in(ctx_fd(ctx), 0), 1);
    th_ctx_release(marker);
    th_ctx_release(ctx);
}

/* ---- after-funcs ------------------------------------------------------------------------- */

static void test_after_func_runs_once_on_cancel(void **state)
{
    (void)state;
    th_ctx *ctx = new_cancel(th_ctx_background());
    enum { N = 4 };
    th_ctx_hook hooks[N];
    hook_rec recs[N] = {0};
    for (int i = 0; i < N; i++) {
        arm(ctx, &hooks[i], &recs[i]);
    }
    th_ctx_cancel(ctx);
    for (int i = 0; i < N; i++) {
        assert_int_equal(atomic_load(&recs[i].calls), 1);
        assert_true(pthread_equal(recs[i].thread, pthread_self()));
        assert_int_equal(recs[i].err_seen, TH_ECANCELED);
    }
    th_ctx_cancel(ctx);
    th_ctx_ref(ctx);
    th_ctx_release(ctx);
    for (int i = 0; i < N; i++) {
        assert_int_equal(atomic_load(&recs[i].calls), 1);
        assert_false(th_ctx_after_func_stop(&hooks[i]));
        assert_false(th_ctx_after_func_stop(&hooks[i])); /* still false, still once */
        assert_int_equal(atomic_load(&recs[i].calls), 1);
    }
    th_ctx_unref(ctx);

    /* Release runs them too. */
    ctx = new_cancel(th_ctx_background());
    hook_rec rec = {0};
    th_ctx_hook hook;
    arm(ctx, &hook, &rec);
    th_ctx_release(ctx);
    assert_int_equal(atomic_load(&rec.calls), 1);
}

/* Stopped hooks never run, wherever they sit in the list (head, middle, tail). */
static void test_after_func_stopped_never_runs(void **state)
{
    (void)state;
    enum { N = 5 };
    for (int mask = 0; mask < (1 << N); mask++) {
        th_ctx *ctx = new_cancel(th_ctx_background());
        th_ctx_hook hooks[N];
        hook_rec recs[N] = {0};
        for (int i = 0; i < N; i++) {
            arm(ctx, &hooks[i], &recs[i]);
        }
        for (int i = 0; i < N; i++) {
            if (mask & (1 << i)) {
                assert_true(th_ctx_after_func_stop(&hooks[i]));
            }
        }
        th_ctx_cancel(ctx);
        for (int i = 0; i < N; i++) {
            bool stopped = (mask & (1 << i)) != 0;
            assert_int_equal(atomic_load(&recs[i].calls), stopped ? 0 : 1);
            if (!stopped) {
                assert_false(th_ctx_after_func_stop(&hooks[i]));
            }
        }
        th_ctx_release(ctx);
    }

    /* Register, stop, register again with the same storage: only the second runs. */
    th_ctx *ctx = new_cancel(th_ctx_background());
    hook_rec first = {0}, second = {0};
    th_ctx_hook hook;
    arm(ctx, &hook, &first);
    assert_true(th_ctx_after_func_stop(&hook));
    arm(ctx, &hook, &second);
    th_ctx_release(ctx);
    assert_int_equal(atomic_load(&first.calls), 0);
    assert_int_equal(atomic_load(&second.calls), 1);
}

static void test_after_func_on_done_ctx(void **state)
{
    (void)state;
    atomic_int calls = 0;
    th_ctx_hook hook;

    th_ctx *canceled = new_cancel(th_ctx_background());
    th_ctx_cancel(canceled);
    assert_int_equal(th_ctx_after_func(canceled, &hook, noop_hook, &calls), TH_ECANCELED);

    th_ctx *timed = new_timeout(th_ctx_background(), 0);
    assert_int_equal(poll_in(ctx_fd(timed), 5000), 1);
    assert_int_equal(th_ctx_after_func(timed, &hook, noop_hook, &calls), TH_ETIMEDOUT);

    th_ctx_release(timed);
    th_ctx_release(canceled);
    assert_int_equal(atomic_load(&calls), 0);
}

typedef struct slow_hook_arg {
    atomic_int started;
    atomic_int finished;
} slow_hook_arg;

static void slow_hook(void *p)
{
    slow_hook_arg *arg = p;
    atomic_store(&arg->started, 1);
    sleep_ms(50);
    atomic_store(&arg->finished, 1);
}

static void *cancel_thread(void *p)
{
    th_ctx_cancel(p);
    return NULL;
}

/* A stop that races with a running hook returns false only once the hook has finished. */
static void test_after_func_stop_waits_for_running_hook(void **state)
{
    (void)state;
    th_ctx *ctx = new_cancel(th_ctx_background());
    slow_hook_arg arg = {0};
    th_ctx_hook hook;
    assert_int_equal(th_ctx_after_func(ctx, &hook, slow_hook, &arg), 0);
    pthread_t t = spawn(cancel_thread, ctx);
    while (!atomic_load(&arg.started)) {
        sched_yield();
    }
    assert_false(th_ctx_after_func_stop(&hook));
    assert_int_equal(atomic_load(&arg.finished), 1);
    join(t);
    th_ctx_release(ctx);
}

typedef struct reentrant_arg {
    th_ctx *ctx;
    th_ctx *parent;
    int child_err;
    int rc;
    atomic_int calls;
} reentrant_arg;

static void reentrant_hook(void *p)
{
    reentrant_arg *arg = p;
    /* Would deadlock if the canceler held a context lock while running hooks. */
    th_ctx *child = NULL;
    arg->rc = th_ctx_with_cancel(arg->ctx, &child);
    if (arg->rc == 0) {
        arg->child_err = th_ctx_err(child);
        th_ctx_release(child);
    }
    th_ctx_cancel(arg->parent);
    atomic_fetch_add(&arg->calls, 1);
}

static void test_after_func_runs_without_locks(void **state)
{
    (void)state;
    th_ctx *parent = new_cancel(th_ctx_background());
    th_ctx *ctx = new_cancel(parent);
    th_ctx *sibling = new_cancel(parent);
    reentrant_arg arg = {.ctx = ctx, .parent = parent};
    th_ctx_hook hook;
    assert_int_equal(th_ctx_after_func(ctx, &hook, reentrant_hook, &arg), 0);
    th_ctx_cancel(ctx);
    assert_int_equal(atomic_load(&arg.calls), 1);
    assert_int_equal(arg.rc, 0);
    assert_int_equal(arg.child_err, TH_ECANCELED);
    assert_int_equal(th_ctx_err(parent), TH_ECANCELED);
    assert_int_equal(th_ctx_err(sibling), TH_ECANCELED);
    assert_false(th_ctx_after_func_stop(&hook));
    th_ctx_release(sibling);
    th_ctx_release(ctx);
    th_ctx_release(parent);

    /* The same from the timer thread. */
    parent = new_cancel(th_ctx_background());
    ctx = new_timeout(parent, MS(5));
    arg = (reentrant_arg){.ctx = ctx, .parent = parent};
    assert_int_equal(th_ctx_after_func(ctx, &hook, reentrant_hook, &arg), 0);
    assert_int_equal(poll_in(ctx_fd(parent), 5000), 1);
    assert_false(th_ctx_after_func_stop(&hook));
    assert_int_equal(atomic_load(&arg.calls), 1);
    assert_int_equal(arg.child_err, TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(ctx), TH_ETIMEDOUT);
    assert_int_equal(th_ctx_err(parent), TH_ECANCELED);
    th_ctx_release(ctx);
    th_ctx_release(parent);
}

/* ---- sleep ------------------------------------------------------------------------------- */

static void test_sleep_full(void **state)
{
    (void)state;
    th_ctx *ctx = new_cancel(th_ctx_background());
    uint64_t t0 = th_clock_now_ns();
    assert_int_equal(th_ctx_sleep(ctx, MS(20)), 0);
    assert_true(th_clock_now_ns() - t0 >= MS(20));
    t0 = th_clock_now_ns();
    assert_int_equal(th_ctx_sleep(th_ctx_background(), MS(10)), 0);
    assert_true(th_clock_now_ns() - t0 >= MS(10));
    assert_int_equal(th_ctx_sleep(ctx, 0), 0);

    /* A deadline later than the sleep does not cut it short. */
    th_ctx *t = new_timeout(ctx, 10 * TH_NS_PER_S);
    assert_int_equal(th_ctx_sleep(t, MS(5)), 0);
    assert_int_equal(th_ctx_err(t), 0);
    th_ctx_release(t);
    th_ctx_release(ctx);
}

typedef struct sleep_arg {
    th_ctx *ctx;
    uint64_t ns;
    int rc;
    uint64_t woke_ns;
} sleep_arg;

static void *sleep_thread(void *p)
{
    sleep_arg *arg = p;
    arg->rc = th_ctx_sleep(arg->ctx, arg->ns);
    arg->woke_ns = th_clock_now_ns();
    return NULL;
}

static void test_sleep_interrupted_by_cancel(void **state)
{
    (void)state;
    th_ctx *ctx = new_cancel(th_ctx_background());
    th_ctx *kid = new_cancel(ctx);
    sleep_arg a = {.ctx = ctx, .ns = 10 * TH_NS_PER_S};
    sleep_arg b = {.ctx = kid, .ns = 10 * TH_NS_PER_S};
    pthread_t ta = spawn(sleep_thread, &a);
    pthread_t tb = spawn(sleep_thread, &b);
    sleep_ms(30);
    uint64_t t0 = th_clock_now_ns();
    th_ctx_cancel(ctx);
    join(ta);
    join(tb);
    assert_int_equal(a.rc, TH_ECANCELED);
    assert_int_equal(b.rc, TH_ECANCELED);
    assert_true(a.woke_ns - t0 < PROMPT_NS);
    assert_true(b.woke_ns - t0 < PROMPT_NS);

    /* On a done context it returns at once. */
    t0 = th_clock_now_ns();
    assert_int_equal(th_ctx_sleep(ctx, 10 * TH_NS_PER_S), TH_ECANCELED);
    assert_true(th_clock_now_ns() - t0 < PROMPT_NS);
    th_ctx_release(kid);
    th_ctx_release(ctx);
}

static void test_sleep_interrupted_by_deadline(void **state)
{
    (void)state;
    th_ctx *ctx = new_timeout(th_ctx_background(), MS(30));
    uint64_t deadline = th_ctx_deadline(ctx);
    assert_int_equal(th_ctx_sleep(ctx, 10 * TH_NS_PER_S), TH_ETIMEDOUT);
    uint64_t now = th_clock_now_ns();
    assert_true(now >= deadline);
    assert_true(now - deadline < LATE_NS + PROMPT_NS);
    th_ctx_release(ctx);
}

/* ---- references -------------------------------------------------------------------------- */

typedef struct ref_arg {
    th_ctx *ctx;
    int fd;
    int poll_rc;
    int err;
    int after_rc;
    int child_err;
} ref_arg;

static void *ref_thread(void *p)
{
    ref_arg *arg = p;
    arg->poll_rc = poll_in(arg->fd, 10000);
    /* The creator has released its reference by now; ours keeps the context valid. */
    arg->err = th_ctx_err(arg->ctx);
    atomic_int calls = 0;
    th_ctx_hook hook;
    arg->after_rc = th_ctx_after_func(arg->ctx, &hook, noop_hook, &calls);
    th_ctx *child = NULL;
    if (th_ctx_with_cancel(arg->ctx, &child) == 0) {
        arg->child_err = th_ctx_err(child);
        th_ctx_release(child);
    }
    th_ctx_unref(arg->ctx);
    return NULL;
}

static void test_ref_keeps_ctx_alive(void **state)
{
    (void)state;
    th_ctx *ctx = new_cancel(th_ctx_background());
    ref_arg arg = {.ctx = th_ctx_ref(ctx), .fd = ctx_fd(ctx)};
    pthread_t t = spawn(ref_thread, &arg);
    th_ctx_release(ctx); /* cancels; the thread's reference keeps the memory */
    join(t);
    assert_int_equal(arg.poll_rc, 1);
    assert_int_equal(arg.err, TH_ECANCELED);
    assert_int_equal(arg.after_rc, TH_ECANCELED);
    assert_int_equal(arg.child_err, TH_ECANCELED);

    /* A child keeps its released parent alive, and frees it when it goes. */
    th_ctx *parent = new_timeout(th_ctx_background(), 10 * TH_NS_PER_S);
    th_ctx *child = new_cancel(parent);
    uint64_t deadline = th_ctx_deadline(parent);
    th_ctx_release(parent);
    assert_int_equal(th_ctx_err(child), TH_ECANCELED);
    assert_true(th_ctx_deadline(child) == deadline);
    th_ctx *grand = new_cancel(child);
    assert_int_equal(th_ctx_err(grand), TH_ECANCELED);
    th_ctx_release(child);
    th_ctx_release(grand); /* frees grand, child and parent */

    /* Releasing children first, then the parent, also frees everything. */
    parent = new_cancel(th_ctx_background());
    child = new_cancel(parent);
    grand = new_cancel(child);
    th_ctx_release(grand);
    th_ctx_release(child);
    assert_int_equal(th_ctx_err(parent), 0);
    th_ctx_release(parent);
}

/* Guards the cancel walk against a cost per level of depth: a chain thousands deep is canceled
 * from a thread with a small stack (a recursive walk overflows it), and a walk that held one
 * mutex per level would make TSan abort (it tracks at most 64 held by a thread). The chain is
 * freed whichever end is released first. */
static void test_deep_chain(void **state)
{
    (void)state;
    enum { DEPTH = 5000 };
    static th_ctx *chain[DEPTH];
    pthread_attr_t attr;
    assert_int_equal(pthread_attr_init(&attr), 0);
    assert_int_equal(pthread_attr_setstacksize(&attr, 128 * 1024), 0);
    for (int order = 0; order < 2; order++) {
        chain[0] = new_cancel(th_ctx_background());
        for (int i = 1; i < DEPTH; i++) {
            chain[i] = new_cancel(chain[i - 1]);
        }
        hook_rec rec = {0};
        th_ctx_hook hook;
        arm(chain[DEPTH - 1], &hook, &rec);
        pthread_t t;
        assert_int_equal(pthread_create(&t, &attr, cancel_thread, chain[0]), 0);
        join(t);
        assert_int_equal(th_ctx_err(chain[DEPTH - 1]), TH_ECANCELED);
        assert_int_equal(th_ctx_err(chain[DEPTH / 2]), TH_ECANCELED);
        assert_false(th_ctx_after_func_stop(&hook));
        assert_int_equal(atomic_load(&rec.calls), 1);
        assert_false(pthread_equal(rec.thread, pthread_self()));
        for (int i = 0; i < DEPTH; i++) {
            th_ctx_release(chain[order == 0 ? i : DEPTH - 1 - i]);
        }
    }
    pthread_attr_destroy(&attr);
}

/* ---- concurrency ------------------------------------------------------------------------- */

enum { CC_THREADS = 6, CC_HOOKS = 4 };

typedef struct cc_shared {
    pthread_barrier_t start;
    pthread_barrier_t end;
    th_ctx *targets[3]; /* parent, child, grandchild */
    bool quit;
} cc_shared;

typedef struct cc_arg {
    cc_shared *sh;
    int id;
} cc_arg;

static void *cc_thread(void *p)
{
    cc_arg *arg = p;
    for (;;) {
        pthread_barrier_wait(&arg->sh->start);
        if (arg->sh->quit) {
            return NULL;
        }
        th_ctx *target = arg->sh->targets[arg->id % 3];
        th_ctx_cancel(target);
        T_CHECK(th_ctx_err(target) == TH_ECANCELED);
        pthread_barrier_wait(&arg->sh->end);
    }
}

/* Many threads cancel the same contexts (and their ancestors) at once: every hook runs exactly
 * once. */
static void test_concurrent_cancel_fires_hooks_once(void **state)
{
    (void)state;
    cc_shared sh = {.quit = false};
    assert_int_equal(pthread_barrier_init(&sh.start, NULL, CC_THREADS + 1), 0);
    assert_int_equal(pthread_barrier_init(&sh.end, NULL, CC_THREADS + 1), 0);
    pthread_t threads[CC_THREADS];
    cc_arg args[CC_THREADS];
    for (int i = 0; i < CC_THREADS; i++) {
        args[i] = (cc_arg){.sh = &sh, .id = i};
        threads[i] = spawn(cc_thread, &args[i]);
    }
    int rounds = SCALED(2000);
    for (int r = 0; r < rounds; r++) {
        th_ctx *p = new_cancel(th_ctx_background());
        th_ctx *c = new_cancel(p);
        th_ctx *g = new_cancel(c);
        sh.targets[0] = p;
        sh.targets[1] = c;
        sh.targets[2] = g;
        th_ctx_hook hooks[3][CC_HOOKS];
        hook_rec recs[3][CC_HOOKS];
        for (int k = 0; k < 3; k++) {
            for (int h = 0; h < CC_HOOKS; h++) {
                recs[k][h] = (hook_rec){.calls = 0};
                arm(sh.targets[k], &hooks[k][h], &recs[k][h]);
            }
        }
        pthread_barrier_wait(&sh.start);
        pthread_barrier_wait(&sh.end);
        for (int k = 0; k < 3; k++) {
            assert_int_equal(th_ctx_err(sh.targets[k]), TH_ECANCELED);
            for (int h = 0; h < CC_HOOKS; h++) {
                assert_false(th_ctx_after_func_stop(&hooks[k][h]));
                assert_int_equal(atomic_load(&recs[k][h].calls), 1);
                assert_int_equal(recs[k][h].err_seen, TH_ECANCELED);
            }
        }
        th_ctx_release(g);
        th_ctx_release(c);
        th_ctx_release(p);
    }
    sh.quit = true;
    pthread_barrier_wait(&sh.start);
    for (int i = 0; i < CC_THREADS; i++) {
        join(threads[i]);
    }
    pthread_barrier_destroy(&sh.start);
    pthread_barrier_destroy(&sh.end);
}

typedef struct cc_create_arg {
    th_ctx *parent;
    atomic_int *go;
    atomic_int *cancel_returned;
    int made;
    int born_done_but_live;
} cc_create_arg;

static void *create_while_canceling_thread(void *p)
{
    cc_create_arg *arg = p;
    enum { MAX = 64 };
    th_ctx *kids[MAX];
    int n = 0;
    while (!atomic_load(arg->go)) {
        sched_yield();
    }
    for (; n < MAX; n++) {
        bool was_done = th_ctx_done(arg->parent);
        if (th_ctx_with_cancel(arg->parent, &kids[n]) != 0) {
            break;
        }
        if (was_done && !th_ctx_done(kids[n])) {
            arg->born_done_but_live++;
        }
    }
    arg->made = n;
    /* Once th_ctx_cancel(parent) has returned, every child is done, whether it was linked
     * before the cancel or born after it. (th_ctx_done(parent) alone is not enough: the parent's
     * error is set before the cancel has walked down to the children.) */
    while (!atomic_load(arg->cancel_returned)) {
        sched_yield();
    }
    for (int i = 0; i < n; i++) {
        T_CHECK(th_ctx_err(kids[i]) == TH_ECANCELED);
        th_ctx_release(kids[i]);
    }
    return NULL;
}

/* Children created on other threads while the parent is being canceled all end up done. */
static void test_create_while_canceling(void **state)
{
    (void)state;
    enum { T = 3 };
    int rounds = SCALED(500);
    for (int r = 0; r < rounds; r++) {
        th_ctx *parent = new_cancel(th_ctx_background());
        atomic_int go = 0, cancel_returned = 0;
        cc_create_arg args[T];
        pthread_t threads[T];
        for (int i = 0; i < T; i++) {
            args[i] =
                (cc_create_arg){.parent = parent, .go = &go, .cancel_returned = &cancel_returned};
            threads[i] = spawn(create_while_canceling_thread, &args[i]);
        }
        atomic_store(&go, 1);
        for (int spin = 0; spin < r % 50; spin++) {
            sched_yield();
        }
        th_ctx_cancel(parent);
        atomic_store(&cancel_returned, 1);
        for (int i = 0; i < T; i++) {
            join(threads[i]);
            assert_int_equal(args[i].made, 64);
            assert_int_equal(args[i].born_done_but_live, 0);
        }
        th_ctx_release(parent);
    }
}

/* Moves the calling thread to cpu (no-op for -1). The race tests below want the two threads on
 * different CPUs: one that shares the first thread's CPU only runs after its walk is over. */
static void pin_to_cpu(int cpu)
{
    if (cpu < 0) {
        return;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((size_t)cpu, &set);
    (void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/* The first two CPUs this thread may use, or -1s. */
static void two_cpus(const cpu_set_t *allowed, int cpus[2])
{
    cpus[0] = cpus[1] = -1;
    int found = 0;
    for (int c = 0; c < CPU_SETSIZE && found < 2; c++) {
        if (CPU_ISSET((size_t)c, allowed)) {
            cpus[found++] = c;
        }
    }
    if (found < 2) {
        cpus[0] = cpus[1] = -1;
    }
}

/* Children per round (fewer under TSan, where the walk is slow anyway). */
enum { WIDE = 20000, WIDE_WATCHERS = 2 };
#define WIDE_N (TEST_TSAN ? WIDE / 4 : WIDE)

typedef struct wide_arg {
    th_ctx *target;   /* canceled by this watcher while the first cancel walks */
    th_ctx **kids;    /* target's WIDE_N children */
    atomic_int ready; /* the watcher is watching */
    int cpu;          /* for the watcher, or -1 */
    bool kid_live;    /* a child was live right after the watcher's cancel returned */
    int target_err;
} wide_arg;

static void *wide_watcher(void *p)
{
    wide_arg *arg = p;
    int n = WIDE_N;
    pin_to_cpu(arg->cpu);
    atomic_store(&arg->ready, 1);
    /* Wait until the first cancel has reached the children (a walk starts at one end or the
     * other): it is then surely under way, and still has most of the children to go. */
    while (!th_ctx_done(arg->kids[0]) && !th_ctx_done(arg->kids[n - 1])) {
    }
    th_ctx_cancel(arg->target);
    /* From both ends towards the middle, whatever order a walk takes the children in. */
    arg->kid_live = false;
    for (int i = 0; i < n / 2 && !arg->kid_live; i++) {
        arg->kid_live = !th_ctx_done(arg->kids[i]) || !th_ctx_done(arg->kids[n - 1 - i]);
    }
    arg->target_err = th_ctx_err(arg->target);
    return NULL;
}

enum wide_mode {
    WIDE_SAME,       /* the watcher cancels the same context as the first canceler */
    WIDE_DESCENDANT, /* the watcher cancels a child of what the first canceler cancels */
    WIDE_TIMER,      /* the first canceler is the timer thread (a deadline on the top) */
};

/* One round: top (-> mid) -> WIDE_N children. The first cancel starts at top (this thread, or
 * the timer); watcher threads cancel their target (top or mid) while that walk is under way.
 * With the timer, whose CPU is unknown, there is a watcher on each of two CPUs. Returns whether
 * some watcher's cancel returned while a child of its target was still live. */
static bool wide_round(enum wide_mode mode, th_ctx **kids, const int cpus[2])
{
    int n = WIDE_N;
    th_ctx *top = mode == WIDE_TIMER ? new_timeout(th_ctx_background(), MS(TEST_TSAN ? 150 : 30))
                                     : new_cancel(th_ctx_background());
    th_ctx *mid = mode == WIDE_SAME ? NULL : new_cancel(top);
    th_ctx *target = mid ? mid : top;
    for (int i = 0; i < n; i++) {
        kids[i] = new_cancel(target);
    }
    int watchers = mode == WIDE_TIMER ? 2 : 1;
    wide_arg args[WIDE_WATCHERS];
    pthread_t threads[WIDE_WATCHERS];
    for (int w = 0; w < watchers; w++) {
        args[w] = (wide_arg){
            .target = target, .kids = kids, .cpu = mode == WIDE_TIMER ? cpus[w] : cpus[1]};
        threads[w] = spawn(wide_watcher, &args[w]);
    }
    for (int w = 0; w < watchers; w++) {
        while (!atomic_load(&args[w].ready)) {
            sched_yield();
        }
    }
    if (mode != WIDE_TIMER) {
        th_ctx_cancel(top);
    }
    bool late = false;
    int want = mode == WIDE_TIMER ? TH_ETIMEDOUT : TH_ECANCELED;
    for (int w = 0; w < watchers; w++) {
        join(threads[w]);
        assert_int_equal(args[w].target_err, want);
        late = late || args[w].kid_live;
    }
    /* For the timer's walk to be over: this cancel must wait for it (and changes nothing). */
    th_ctx_cancel(top);
    for (int i = 0; i < n; i++) {
        assert_int_equal(th_ctx_err(kids[i]), want);
        th_ctx_release(kids[i]);
    }
    th_ctx_release(mid);
    th_ctx_release(top);
    return late;
}

/* "th_ctx_cancel cancels ctx and every descendant": when th_ctx_cancel(x) returns, on any thread,
 * x's whole subtree is done, also when another thread (or the timer) is already canceling x or
 * one of its ancestors (Go's guarantee: the second cancel waits for the first to finish). A wide
 * tree makes the first cancel's walk long enough to race into, and the threads are put on
 * different CPUs so that they really overlap. */
static void test_concurrent_cancel_reaches_descendants_before_return(void **state)
{
    (void)state;
    static th_ctx *kids[WIDE];
    static const char *const names[] = {"same context", "descendant", "timer, then descendant"};
    int rounds = TEST_TSAN ? 4 : 16;
    int late[3] = {0};
    cpu_set_t saved;
    int cpus[2] = {-1, -1};
    if (pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved) == 0) {
        two_cpus(&saved, cpus);
    }
    pin_to_cpu(cpus[0]);
    for (int mode = WIDE_SAME; mode <= WIDE_TIMER; mode++) {
        for (int r = 0; r < rounds; r++) {
            late[mode] += wide_round((enum wide_mode)mode, kids, cpus);
        }
    }
    if (cpus[0] >= 0) {
        (void)pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
    }
    char msg[512] = "";
    size_t used = 0;
    for (int mode = WIDE_SAME; mode <= WIDE_TIMER; mode++) {
        if (late[mode] > 0 && used < sizeof(msg)) {
            int k = snprintf(msg + used, sizeof(msg) - used, " [%s: %d of %d rounds]", names[mode],
                             late[mode], rounds);
            used += k > 0 ? (size_t)k : 0;
        }
    }
    if (used > 0) {
        fail_msg("th_ctx_cancel() returned while a child of its context was still live:%s", msg);
    }
}

/* The stress test: worker threads build small trees under one shared root, hand some of them to
 * a thread that cancels them at any moment, mix in short deadlines, cancel various levels, and
 * release in random order, checking the invariants as they go. */
enum { ST_WORKERS = 4 };

typedef struct stress {
    th_ctx *root;
    _Atomic(th_ctx *) slot[ST_WORKERS];
    atomic_bool stop;
    int iters;
} stress;

typedef struct stress_arg {
    stress *s;
    int id;
} stress_arg;

static void shuffle(int *v, int n, uint32_t *rng)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(xorshift(rng) % (uint32_t)(i + 1));
        int tmp = v[i];
        v[i] = v[j];
        v[j] = tmp;
    }
}

static void *stress_chaos(void *p)
{
    stress *s = p;
    while (!atomic_load(&s->stop)) {
        bool any = false;
        for (int i = 0; i < ST_WORKERS; i++) {
            th_ctx *x = atomic_exchange(&s->slot[i], NULL);
            if (x != NULL) {
                any = true;
                th_ctx_cancel(x);
                th_ctx_unref(x);
            }
        }
        if (!any) {
            sched_yield();
        }
    }
    return NULL;
}

static void *stress_worker(void *p)
{
    stress_arg *arg = p;
    stress *s = arg->s;
    uint32_t rng = 0x9e3779b9u * (uint32_t)(arg->id + 1);
    enum { A, B, C, D, E, N };
    for (int it = 0; it < s->iters; it++) {
        th_ctx *c[N] = {0};
        th_ctx_hook hooks[N];
        hook_rec recs[N];
        bool armed[N];
        /* root -> A -> {B -> C, D}; E (below) is another child of A. */
        uint64_t timeout = it % 4 == 0 ? (xorshift(&rng) % 2000) * TH_NS_PER_US : 10 * TH_NS_PER_S;
        bool created =
            th_ctx_with_cancel(s->root, &c[A]) == 0 && th_ctx_with_cancel(c[A], &c[B]) == 0 &&
            th_ctx_with_timeout(c[B], timeout, &c[C]) == 0 && th_ctx_with_cancel(c[A], &c[D]) == 0;
        T_CHECK(created);
        if (!created) {
            return NULL;
        }
        for (int k = A; k <= D; k++) {
            recs[k] = (hook_rec){.ctx = c[k]};
            int rc = th_ctx_after_func(c[k], &hooks[k], rec_hook, &recs[k]);
            armed[k] = rc == 0;
            if (!armed[k]) {
                T_CHECK(rc == th_ctx_err(c[k]) && rc != 0);
            }
        }
        bool handed = it % 3 == 0;
        if (handed) {
            th_ctx_unref(atomic_exchange(&s->slot[arg->id], th_ctx_ref(c[A])));
        }
        /* When th_ctx_cancel(x) returns, x's subtree is done, even while the chaos thread (or
         * the timer) is canceling x or an ancestor. Contexts outside x's subtree are live unless
         * A was handed to the chaos thread. */
        switch (xorshift(&rng) % 5) {
        case 0:
            th_ctx_cancel(c[A]);
            T_CHECK(th_ctx_err(c[A]) == TH_ECANCELED);
            T_CHECK(th_ctx_err(c[B]) == TH_ECANCELED);
            T_CHECK(th_ctx_err(c[C]) == TH_ECANCELED || th_ctx_err(c[C]) == TH_ETIMEDOUT);
            T_CHECK(th_ctx_err(c[D]) == TH_ECANCELED);
            break;
        case 1:
            th_ctx_cancel(c[B]);
            T_CHECK(th_ctx_err(c[B]) == TH_ECANCELED);
            T_CHECK(th_ctx_done(c[C]));
            T_CHECK(handed || (!th_ctx_done(c[A]) && !th_ctx_done(c[D])));
            break;
        case 2:
            th_ctx_cancel(c[C]);
            T_CHECK(th_ctx_done(c[C]));
            T_CHECK(handed || (!th_ctx_done(c[A]) && !th_ctx_done(c[B]) && !th_ctx_done(c[D])));
            break;
        case 3:
            th_ctx_cancel(c[D]);
            T_CHECK(th_ctx_err(c[D]) == TH_ECANCELED);
            T_CHECK(handed || (!th_ctx_done(c[A]) && !th_ctx_done(c[B])));
            break;
        default:
            break;
        }
        bool a_done = th_ctx_done(c[A]);
        created = th_ctx_with_cancel(c[A], &c[E]) == 0;
        T_CHECK(created);
        if (!created) {
            return NULL;
        }
        T_CHECK(!a_done || th_ctx_err(c[E]) == TH_ECANCELED);
        recs[E] = (hook_rec){.ctx = c[E]};
        int rc = th_ctx_after_func(c[E], &hooks[E], rec_hook, &recs[E]);
        armed[E] = rc == 0;
        T_CHECK(rc == 0 || rc == TH_ECANCELED);

        /* Observer references, then the creators' releases in random order. */
        int order[N] = {A, B, C, D, E};
        for (int k = 0; k < N; k++) {
            th_ctx_ref(c[k]);
        }
        shuffle(order, N, &rng);
        for (int k = 0; k < N; k++) {
            th_ctx_release(c[order[k]]);
        }
        for (int k = 0; k < N; k++) {
            int err = th_ctx_err(c[k]);
            T_CHECK(err == TH_ECANCELED || (k == C && err == TH_ETIMEDOUT));
            if (armed[k]) {
                T_CHECK(!th_ctx_after_func_stop(&hooks[k]));
                T_CHECK(atomic_load(&recs[k].calls) == 1);
                T_CHECK(recs[k].err_seen == err);
            } else {
                T_CHECK(atomic_load(&recs[k].calls) == 0);
            }
        }
        shuffle(order, N, &rng);
        for (int k = 0; k < N; k++) {
            th_ctx_unref(c[order[k]]);
        }
    }
    return NULL;
}

static void test_stress_tree(void **state)
{
    (void)state;
    stress s = {.iters = SCALED(50000)};
    s.root = new_cancel(th_ctx_background());
    for (int i = 0; i < ST_WORKERS; i++) {
        atomic_init(&s.slot[i], NULL);
    }
    atomic_init(&s.stop, false);
    pthread_t chaos = spawn(stress_chaos, &s);
    pthread_t workers[ST_WORKERS];
    stress_arg args[ST_WORKERS];
    for (int i = 0; i < ST_WORKERS; i++) {
        args[i] = (stress_arg){.s = &s, .id = i};
        workers[i] = spawn(stress_worker, &args[i]);
    }
    for (int i = 0; i < ST_WORKERS; i++) {
        join(workers[i]);
    }
    atomic_store(&s.stop, true);
    join(chaos);
    for (int i = 0; i < ST_WORKERS; i++) {
        th_ctx_unref(atomic_exchange(&s.slot[i], NULL));
    }
    assert_int_equal(atomic_load(&thread_failures), 0);
    assert_int_equal(th_ctx_err(s.root), 0); /* nothing below it reached it */
    th_ctx_release(s.root);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup_reset, teardown_check)

int main(void)
{
    const struct CMUnitTest tests[] = {
        /* First: before anything has started the timer thread. */
        T(test_oom_with_timeout),
        T(test_oom_with_cancel),
        T(test_oom_fd),
        T(test_background),
        T(test_with_cancel_basics),
        T(test_cancel_reaches_grandchildren),
        T(test_child_cancel_does_not_reach_parent_or_siblings),
        T(test_child_of_done_parent_starts_done),
        T(test_first_cause_wins),
        T(test_deadline_error_reaches_descendants),
        T(test_deadline_accuracy_and_order),
        T(test_parent_deadline_wins),
        T(test_deadline_edge_values),
        T(test_many_timers),
        T(test_fd_readable_on_cancel),
        T(test_fd_readable_on_deadline),
        T(test_after_func_runs_once_on_cancel),
        T(test_after_func_stopped_never_runs),
        T(test_after_func_on_done_ctx),
        T(test_after_func_stop_waits_for_running_hook),
        T(test_after_func_runs_without_locks),
        T(test_sleep_full),
        T(test_sleep_interrupted_by_cancel),
        T(test_sleep_interrupted_by_deadline),
        T(test_ref_keeps_ctx_alive),
        T(test_deep_chain),
        T(test_concurrent_cancel_fires_hooks_once),
        T(test_create_while_canceling),
        T(test_concurrent_cancel_reaches_descendants_before_return),
        T(test_stress_tree),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
