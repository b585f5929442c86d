/* Tests the bounded MPMC channel (include/trialhub/chan.h): FIFO order, the non-blocking and
 * closed-channel error codes, close and context wake-ups of blocked senders and receivers,
 * exactly-once delivery under many producers and consumers, the fan-out/fan-in shape, and
 * th_chan_create under allocation failure. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "trialhub/alloc.h"
#include "trialhub/chan.h"
#include "trialhub/clock.h"
#include "trialhub/ctx.h"
#include "trialhub/wg.h"

#include "test_util.h"

/* ---- helpers ----------------------------------------------------------------------------- */

static th_chan *new_chan(size_t cap)
{
    th_chan *ch = NULL;
    assert_int_equal(th_chan_create(cap, &ch), 0);
    assert_non_null(ch);
    return ch;
}

static th_ctx *new_cancel(void)
{
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    return ctx;
}

/* Items are small integers carried in the pointer; 0 (NULL) is never sent. */
static void *item(uintptr_t v)
{
    return (void *)v;
}

static uintptr_t val(void *p)
{
    return (uintptr_t)p;
}

static char sentinel_byte;
#define SENTINEL ((void *)&sentinel_byte)

/* ---- creation ---------------------------------------------------------------------------- */

static void test_create_invalid_and_cap(void **state)
{
    (void)state;
    th_chan *ch = (th_chan *)SENTINEL;
    assert_int_equal(th_chan_create(0, &ch), TH_EINVAL);
    assert_ptr_equal(ch, SENTINEL);

    const size_t caps[] = {1, 2, 7, 1024};
    for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
        ch = new_chan(caps[i]);
        assert_int_equal(th_chan_cap(ch), caps[i]);
        assert_int_equal(th_chan_len(ch), 0);
        th_chan_destroy(ch);
    }
    th_chan_destroy(NULL);
}

static void test_create_under_oom(void **state)
{
    (void)state;
    for (long n = 0;; n++) {
        assert_true(n < 100);
        th_chan *ch = (th_chan *)SENTINEL;
        th__fault_fail_after(n);
        int rc = th_chan_create(16, &ch);
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            assert_false(fired);
            assert_true(n >= 1);
            assert_ptr_not_equal(ch, SENTINEL);
            /* It works. */
            assert_int_equal(th_chan_try_send(ch, item(1)), 0);
            void *got = NULL;
            assert_int_equal(th_chan_try_recv(ch, &got), 0);
            assert_ptr_equal(got, item(1));
            th_chan_destroy(ch);
            break;
        }
        assert_true(fired);
        assert_int_equal(rc, TH_ENOMEM);
        assert_ptr_equal(ch, SENTINEL);
    }
}

/* ---- single-threaded semantics ----------------------------------------------------------- */

static void test_fifo_and_full_empty(void **state)
{
    (void)state;
    th_chan *ch = new_chan(4);
    for (uintptr_t i = 1; i <= 4; i++) {
        assert_int_equal(th_chan_try_send(ch, item(i)), 0);
        assert_int_equal(th_chan_len(ch), i);
    }
    assert_int_equal(th_chan_try_send(ch, item(5)), TH_EOVERLOAD);
    assert_int_equal(th_chan_len(ch), 4);
    for (uintptr_t i = 1; i <= 4; i++) {
        void *got = NULL;
        assert_int_equal(th_chan_recv(th_ctx_background(), ch, &got), 0);
        assert_int_equal(val(got), i);
    }
    void *got = SENTINEL;
    assert_int_equal(th_chan_try_recv(ch, &got), TH_EAGAIN);
    assert_ptr_equal(got, SENTINEL);
    assert_int_equal(th_chan_len(ch), 0);

    /* Capacity 1. */
    th_chan *one = new_chan(1);
    assert_int_equal(th_chan_send(th_ctx_background(), one, item(9)), 0);
    assert_int_equal(th_chan_try_send(one, item(10)), TH_EOVERLOAD);
    assert_int_equal(th_chan_try_recv(one, &got), 0);
    assert_int_equal(val(got), 9);
    assert_int_equal(th_chan_try_recv(one, &got), TH_EAGAIN);
    th_chan_destroy(one);
    th_chan_destroy(ch);
}

/* Interleaved sends and receives at every fill level, across the ring's wrap-around, checked
 * against a model queue. */
static void test_fifo_wraparound_against_model(void **state)
{
    (void)state;
    enum { CAP = 5, OPS = 20000 };
    th_chan *ch = new_chan(CAP);
    uintptr_t model[CAP];
    size_t head = 0, len = 0;
    uintptr_t next = 1;
    uint32_t rng = 12345;
    for (int op = 0; op < OPS; op++) {
        rng = rng * 1103515245u + 12345u;
        bool do_send = ((rng >> 16) & 3) < 2;
        bool blocking = ((rng >> 20) & 1) != 0;
        if (do_send) {
            if (len == CAP) {
                assert_int_equal(th_chan_try_send(ch, item(next)), TH_EOVERLOAD);
                continue;
            }
            int rc = blocking ? th_chan_send(th_ctx_background(), ch, item(next))
                              : th_chan_try_send(ch, item(next));
            assert_int_equal(rc, 0);
            model[(head + len) % CAP] = next++;
            len++;
        } else {
            void *got = SENTINEL;
            if (len == 0) {
                assert_int_equal(th_chan_try_recv(ch, &got), TH_EAGAIN);
                assert_ptr_equal(got, SENTINEL);
                continue;
            }
            int rc =
                blocking ? th_chan_recv(th_ctx_background(), ch, &got) : th_chan_try_recv(ch, &got);
            assert_int_equal(rc, 0);
            assert_int_equal(val(got), model[head]);
            head = (head + 1) % CAP;
            len--;
        }
        assert_int_equal(th_chan_len(ch), len);
    }
    th_chan_destroy(ch);
}

static void test_close_semantics(void **state)
{
    (void)state;
    th_chan *ch = new_chan(3);
    assert_int_equal(th_chan_try_send(ch, item(1)), 0);
    assert_int_equal(th_chan_try_send(ch, item(2)), 0);
    assert_int_equal(th_chan_close(ch), 0);
    assert_int_equal(th_chan_close(ch), TH_ECLOSED);
    assert_int_equal(th_chan_close(ch), TH_ECLOSED);

    /* Sends fail, even with room left. */
    assert_int_equal(th_chan_try_send(ch, item(3)), TH_ECLOSED);
    assert_int_equal(th_chan_send(th_ctx_background(), ch, item(3)), TH_ECLOSED);
    assert_int_equal(th_chan_len(ch), 2);

    /* Receivers drain what is left, in order, then see TH_ECLOSED for good. */
    void *got = NULL;
    assert_int_equal(th_chan_recv(th_ctx_background(), ch, &got), 0);
    assert_int_equal(val(got), 1);
    assert_int_equal(th_chan_try_recv(ch, &got), 0);
    assert_int_equal(val(got), 2);
    got = SENTINEL;
    assert_int_equal(th_chan_try_recv(ch, &got), TH_ECLOSED);
    assert_int_equal(th_chan_recv(th_ctx_background(), ch, &got), TH_ECLOSED);
    assert_int_equal(th_chan_recv(th_ctx_background(), ch, &got), TH_ECLOSED);
    assert_ptr_equal(got, SENTINEL);
    assert_int_equal(th_chan_close(ch), TH_ECLOSED);
    th_chan_destroy(ch);

    /* A full channel that is closed reports TH_ECLOSED to senders, not TH_EOVERLOAD. */
    ch = new_chan(1);
    assert_int_equal(th_chan_try_send(ch, item(7)), 0);
    assert_int_equal(th_chan_close(ch), 0);
    assert_int_equal(th_chan_try_send(ch, item(8)), TH_ECLOSED);
    assert_int_equal(th_chan_send(th_ctx_background(), ch, item(8)), TH_ECLOSED);
    assert_int_equal(th_chan_try_recv(ch, &got), 0);
    assert_int_equal(val(got), 7);
    assert_int_equal(th_chan_try_recv(ch, &got), TH_ECLOSED);
    th_chan_destroy(ch);

    /* Empty and closed: the context's state does not matter. */
    ch = new_chan(2);
    assert_int_equal(th_chan_close(ch), 0);
    got = SENTINEL;
    assert_int_equal(th_chan_recv(th_ctx_background(), ch, &got), TH_ECLOSED);
    assert_ptr_equal(got, SENTINEL);
    th_chan_destroy(ch);
}

/* ---- blocking and wake-ups --------------------------------------------------------------- */

typedef struct op_arg {
    th_chan *ch;
    th_ctx *ctx;
    void *item;
    int rc;
    uint64_t done_ns;
    atomic_int *finished; /* optional: counts returned operations */
} op_arg;

static void *send_thread(void *p)
{
    op_arg *arg = p;
    arg->rc = th_chan_send(arg->ctx, arg->ch, arg->item);
    arg->done_ns = th_clock_now_ns();
    if (arg->finished) {
        atomic_fetch_add(arg->finished, 1);
    }
    return NULL;
}

static void *recv_thread(void *p)
{
    op_arg *arg = p;
    arg->rc = th_chan_recv(arg->ctx, arg->ch, &arg->item);
    arg->done_ns = th_clock_now_ns();
    if (arg->finished) {
        atomic_fetch_add(arg->finished, 1);
    }
    return NULL;
}

static void test_blocked_recv_gets_later_send(void **state)
{
    (void)state;
    th_chan *ch = new_chan(2);
    atomic_int finished = 0;
    op_arg r = {.ch = ch, .ctx = th_ctx_background(), .item = SENTINEL, .finished = &finished};
    pthread_t t = spawn(recv_thread, &r);
    sleep_ms(20);
    assert_int_equal(atomic_load(&finished), 0); /* nothing to receive yet */
    assert_int_equal(th_chan_try_send(ch, item(42)), 0);
    join(t);
    assert_int_equal(r.rc, 0);
    assert_int_equal(val(r.item), 42);
    assert_int_equal(th_chan_len(ch), 0);
    th_chan_destroy(ch);
}

static void test_blocked_send_completes_after_recv(void **state)
{
    (void)state;
    th_chan *ch = new_chan(2);
    assert_int_equal(th_chan_try_send(ch, item(1)), 0);
    assert_int_equal(th_chan_try_send(ch, item(2)), 0);
    atomic_int finished = 0;
    op_arg s = {.ch = ch, .ctx = th_ctx_background(), .item = item(3), .finished = &finished};
    pthread_t t = spawn(send_thread, &s);
    sleep_ms(20);
    assert_int_equal(atomic_load(&finished), 0); /* no room yet */
    assert_int_equal(th_chan_len(ch), 2);
    void *got = NULL;
    assert_int_equal(th_chan_try_recv(ch, &got), 0);
    assert_int_equal(val(got), 1);
    join(t);
    assert_int_equal(s.rc, 0);
    for (uintptr_t want = 2; want <= 3; want++) {
        assert_int_equal(th_chan_try_recv(ch, &got), 0);
        assert_int_equal(val(got), want);
    }
    th_chan_destroy(ch);
}

enum { BLOCKED = 4 };

/* Blocked senders (channel full) all get TH_ECLOSED on close, promptly; the buffered items are
 * still delivered afterwards and the senders' items never entered the channel. */
static void test_close_wakes_blocked_senders(void **state)
{
    (void)state;
    th_chan *ch = new_chan(2);
    assert_int_equal(th_chan_try_send(ch, item(1)), 0);
    assert_int_equal(th_chan_try_send(ch, item(2)), 0);
    th_ctx *ctx = new_cancel(); /* a real context, so the waiters arm their hooks */
    atomic_int finished = 0;
    op_arg args[BLOCKED];
    pthread_t threads[BLOCKED];
    for (int i = 0; i < BLOCKED; i++) {
        args[i] = (op_arg){.ch = ch,
                           .ctx = i % 2 ? ctx : th_ctx_background(),
                           .item = item(100 + (uintptr_t)i),
                           .finished = &finished};
        threads[i] = spawn(send_thread, &args[i]);
    }
    sleep_ms(30);
    assert_int_equal(atomic_load(&finished), 0);
    uint64_t t0 = th_clock_now_ns();
    assert_int_equal(th_chan_close(ch), 0);
    for (int i = 0; i < BLOCKED; i++) {
        join(threads[i]);
        assert_int_equal(args[i].rc, TH_ECLOSED);
        assert_true(args[i].done_ns - t0 < PROMPT_NS);
    }
    void *got = NULL;
    assert_int_equal(th_chan_recv(th_ctx_background(), ch, &got), 0);
    assert_int_equal(val(got), 1);
    assert_int_equal(th_chan_recv(th_ctx_background(), ch, &got), 0);
    assert_int_equal(val(got), 2);
    assert_int_equal(th_chan_recv(th_ctx_background(), ch, &got), TH_ECLOSED);
    assert_int_equal(th_ctx_err(ctx), 0);
    th_ctx_release(ctx);
    th_chan_destroy(ch);
}

/* Blocked receivers (channel empty) all get TH_ECLOSED on close, promptly, item untouched. */
static void test_close_wakes_blocked_receivers(void **state)
{
    (void)state;
    th_chan *ch = new_chan(2);
    th_ctx *ctx = new_cancel();
    atomic_int finished = 0;
    op_arg args[BLOCKED];
    pthread_t threads[BLOCKED];
    for (int i = 0; i < BLOCKED; i++) {
        args[i] = (op_arg){.ch = ch,
                           .ctx = i % 2 ? ctx : th_ctx_background(),
                           .item = SENTINEL,
                           .finished = &finished};
        threads[i] = spawn(recv_thread, &args[i]);
    }
    sleep_ms(30);
    assert_int_equal(atomic_load(&finished), 0);
    uint64_t t0 = th_clock_now_ns();
    assert_int_equal(th_chan_close(ch), 0);
    for (int i = 0; i < BLOCKED; i++) {
        join(threads[i]);
        assert_int_equal(args[i].rc, TH_ECLOSED);
        assert_ptr_equal(args[i].item, SENTINEL);
        assert_true(args[i].done_ns - t0 < PROMPT_NS);
    }
    th_ctx_release(ctx);
    th_chan_destroy(ch);
}

/* Receivers blocked on one channel and senders blocked on another (a channel cannot have both
 * at once), woken by closing both in one go: each side gets TH_ECLOSED. */
static void test_close_wakes_senders_and_receivers_together(void **state)
{
    (void)state;
    th_chan *empty = new_chan(1);
    th_chan *full = new_chan(1);
    assert_int_equal(th_chan_try_send(full, item(1)), 0);
    atomic_int finished = 0;
    op_arg rs[BLOCKED], ss[BLOCKED];
    pthread_t rt[BLOCKED], st[BLOCKED];
    for (int i = 0; i < BLOCKED; i++) {
        rs[i] = (op_arg){
            .ch = empty, .ctx = th_ctx_background(), .item = SENTINEL, .finished = &finished};
        ss[i] = (op_arg){
            .ch = full, .ctx = th_ctx_background(), .item = item(50), .finished = &finished};
        rt[i] = spawn(recv_thread, &rs[i]);
        st[i] = spawn(send_thread, &ss[i]);
    }
    sleep_ms(30);
    assert_int_equal(atomic_load(&finished), 0);
    assert_int_equal(th_chan_close(empty), 0);
    assert_int_equal(th_chan_close(full), 0);
    for (int i = 0; i < BLOCKED; i++) {
        join(rt[i]);
        join(st[i]);
        assert_int_equal(rs[i].rc, TH_ECLOSED);
        assert_ptr_equal(rs[i].item, SENTINEL);
        assert_int_equal(ss[i].rc, TH_ECLOSED);
    }
    void *got = NULL;
    assert_int_equal(th_chan_try_recv(full, &got), 0);
    assert_int_equal(val(got), 1);
    assert_int_equal(th_chan_try_recv(full, &got), TH_ECLOSED);
    th_chan_destroy(empty);
    th_chan_destroy(full);
}

static void test_blocked_ops_return_ctx_cancel(void **state)
{
    (void)state;
    th_chan *full = new_chan(1);
    th_chan *empty = new_chan(1);
    assert_int_equal(th_chan_try_send(full, item(1)), 0);
    th_ctx *parent = new_cancel();
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(parent, &ctx), 0);
    op_arg s = {.ch = full, .ctx = ctx, .item = item(2)};
    op_arg r = {.ch = empty, .ctx = ctx, .item = SENTINEL};
    pthread_t st = spawn(send_thread, &s);
    pthread_t rt = spawn(recv_thread, &r);
    sleep_ms(30);
    uint64_t t0 = th_clock_now_ns();
    th_ctx_cancel(parent); /* through an ancestor */
    join(st);
    join(rt);
    assert_int_equal(s.rc, TH_ECANCELED);
    assert_int_equal(r.rc, TH_ECANCELED);
    assert_ptr_equal(r.item, SENTINEL);
    assert_true(s.done_ns - t0 < PROMPT_NS);
    assert_true(r.done_ns - t0 < PROMPT_NS);
    /* The failed send left the channel as it was; the channels still work. */
    assert_int_equal(th_chan_len(full), 1);
    void *got = NULL;
    assert_int_equal(th_chan_try_recv(full, &got), 0);
    assert_int_equal(val(got), 1);
    assert_int_equal(th_chan_try_recv(full, &got), TH_EAGAIN);
    assert_int_equal(th_chan_try_send(empty, item(3)), 0);
    assert_int_equal(th_chan_try_recv(empty, &got), 0);
    assert_int_equal(val(got), 3);

    /* Already-done context and no progress possible: the error at once. */
    assert_int_equal(th_chan_try_send(full, item(4)), 0);
    t0 = th_clock_now_ns();
    assert_int_equal(th_chan_send(ctx, full, item(5)), TH_ECANCELED);
    got = SENTINEL;
    assert_int_equal(th_chan_recv(ctx, empty, &got), TH_ECANCELED);
    assert_ptr_equal(got, SENTINEL);
    assert_true(th_clock_now_ns() - t0 < PROMPT_NS);
    assert_int_equal(th_chan_len(full), 1);

    th_ctx_release(ctx);
    th_ctx_release(parent);
    th_chan_destroy(full);
    th_chan_destroy(empty);
}

static void test_blocked_ops_return_ctx_timeout(void **state)
{
    (void)state;
    th_chan *full = new_chan(1);
    th_chan *empty = new_chan(1);
    assert_int_equal(th_chan_try_send(full, item(1)), 0);

    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_timeout(th_ctx_background(), MS(30), &ctx), 0);
    uint64_t deadline = th_ctx_deadline(ctx);
    assert_int_equal(th_chan_send(ctx, full, item(2)), TH_ETIMEDOUT);
    uint64_t now = th_clock_now_ns();
    assert_true(now >= deadline);
    assert_true(now - deadline < LATE_NS + PROMPT_NS);
    th_ctx_release(ctx);

    assert_int_equal(th_ctx_with_timeout(th_ctx_background(), MS(30), &ctx), 0);
    deadline = th_ctx_deadline(ctx);
    void *got = SENTINEL;
    assert_int_equal(th_chan_recv(ctx, empty, &got), TH_ETIMEDOUT);
    now = th_clock_now_ns();
    assert_ptr_equal(got, SENTINEL);
    assert_true(now >= deadline);
    assert_true(now - deadline < LATE_NS + PROMPT_NS);
    th_ctx_release(ctx);

    assert_int_equal(th_chan_len(full), 1);
    assert_int_equal(th_chan_try_recv(full, &got), 0);
    assert_int_equal(val(got), 1);
    assert_int_equal(th_chan_len(empty), 0);
    th_chan_destroy(full);
    th_chan_destroy(empty);
}

/* ---- many producers and consumers -------------------------------------------------------- */

enum { MP_PRODUCERS = 4, MP_CONSUMERS = 4 };

typedef struct mpmc {
    th_chan *ch;
    th_ctx *ctx;         /* for the blocking calls: a watchdog, or the background */
    atomic_uchar *seen;  /* per item: times received */
    size_t per_producer; /* items 1 + p * per_producer ... */
} mpmc;

typedef struct mp_arg {
    mpmc *m;
    int id;
    size_t received;
    uint64_t sum;
} mp_arg;

static void *mp_producer(void *p)
{
    mp_arg *arg = p;
    mpmc *m = arg->m;
    size_t base = (size_t)arg->id * m->per_producer;
    for (size_t i = 0; i < m->per_producer; i++) {
        void *it = item(base + i + 1);
        int rc;
        if (i % 3 == 0) {
            /* Non-blocking first, falling back to blocking: both paths must wake receivers. */
            while ((rc = th_chan_try_send(m->ch, it)) == TH_EOVERLOAD) {
                if (i % 2 == 0) {
                    sched_yield();
                } else {
                    rc = th_chan_send(m->ctx, m->ch, it);
                    break;
                }
            }
        } else {
            rc = th_chan_send(m->ctx, m->ch, it);
        }
        T_CHECK(rc == 0);
        if (rc != 0) {
            break;
        }
    }
    return NULL;
}

static void *mp_consumer(void *p)
{
    mp_arg *arg = p;
    mpmc *m = arg->m;
    size_t total = m->per_producer * MP_PRODUCERS;
    for (unsigned n = 0;; n++) {
        void *got = NULL;
        int rc;
        if (n % 4 == 0) {
            rc = th_chan_try_recv(m->ch, &got);
            if (rc == TH_EAGAIN) {
                rc = th_chan_recv(m->ctx, m->ch, &got);
            }
        } else {
            rc = th_chan_recv(m->ctx, m->ch, &got);
        }
        if (rc == TH_ECLOSED) {
            break;
        }
        T_CHECK(rc == 0);
        if (rc != 0) {
            break;
        }
        uintptr_t v = val(got);
        T_CHECK(v >= 1 && v <= total);
        if (v >= 1 && v <= total) {
            atomic_fetch_add(&m->seen[v - 1], 1);
        }
        arg->received++;
        arg->sum += v;
    }
    return NULL;
}

static void run_mpmc(size_t cap, size_t total, bool watchdog)
{
    mpmc m = {.per_producer = total / MP_PRODUCERS};
    total = m.per_producer * MP_PRODUCERS;
    m.ch = new_chan(cap);
    m.seen = calloc(total, sizeof(*m.seen));
    assert_non_null(m.seen);
    m.ctx = th_ctx_background();
    if (watchdog) {
        /* A lost wake-up then fails as TH_ETIMEDOUT instead of hanging. */
        assert_int_equal(th_ctx_with_timeout(th_ctx_background(), 40 * TH_NS_PER_S, &m.ctx), 0);
    }
    pthread_t pt[MP_PRODUCERS], ct[MP_CONSUMERS];
    mp_arg pa[MP_PRODUCERS], ca[MP_CONSUMERS];
    for (int i = 0; i < MP_CONSUMERS; i++) {
        ca[i] = (mp_arg){.m = &m, .id = i};
        ct[i] = spawn(mp_consumer, &ca[i]);
    }
    for (int i = 0; i < MP_PRODUCERS; i++) {
        pa[i] = (mp_arg){.m = &m, .id = i};
        pt[i] = spawn(mp_producer, &pa[i]);
    }
    for (int i = 0; i < MP_PRODUCERS; i++) {
        join(pt[i]);
    }
    assert_int_equal(th_chan_close(m.ch), 0);
    size_t received = 0;
    uint64_t sum = 0;
    for (int i = 0; i < MP_CONSUMERS; i++) {
        join(ct[i]);
        received += ca[i].received;
        sum += ca[i].sum;
    }
    assert_int_equal(atomic_load(&thread_failures), 0);
    assert_int_equal(received, total);
    assert_true(sum == (uint64_t)total * (total + 1) / 2);
    for (size_t i = 0; i < total; i++) {
        if (atomic_load(&m.seen[i]) != 1) {
            fail_msg("item %zu received %d times", i + 1, (int)atomic_load(&m.seen[i]));
        }
    }
    assert_int_equal(th_chan_len(m.ch), 0);
    if (watchdog) {
        assert_int_equal(th_ctx_err(m.ctx), 0);
        th_ctx_release(m.ctx);
    }
    free(m.seen);
    th_chan_destroy(m.ch);
}

static void test_mpmc_exactly_once(void **state)
{
    (void)state;
    run_mpmc(64, SCALED(400000), false);
}

/* Capacity 1 and a context on every blocking call: the most blocking and waking. */
static void test_mpmc_exactly_once_cap1_with_ctx(void **state)
{
    (void)state;
    run_mpmc(1, SCALED(60000), true);
}

/* ---- fan-out / fan-in -------------------------------------------------------------------- */

enum { FO_PRODUCERS = 6 };

typedef struct fan {
    th_chan *ch;
    th_wg *wg;
    size_t per_producer;
    int close_rc;
    int wait_rc;
} fan;

typedef struct fan_arg {
    fan *f;
    uintptr_t id;
} fan_arg;

/* Items carry (producer, sequence) so the consumer can check per-producer order. */
#define FAN_SHIFT 24

static void *fan_producer(void *p)
{
    fan_arg *arg = p;
    for (uintptr_t i = 0; i < arg->f->per_producer; i++) {
        int rc = th_chan_send(th_ctx_background(), arg->f->ch, item((arg->id << FAN_SHIFT) | i));
        T_CHECK(rc == 0);
    }
    th_wg_done(arg->f->wg);
    return NULL;
}

static void *fan_closer(void *p)
{
    fan *f = p;
    f->wait_rc = th_wg_wait(th_ctx_background(), f->wg);
    f->close_rc = th_chan_close(f->ch);
    return NULL;
}

/* N producers, a th_wg, one closer, one consumer: every item arrives once, each producer's in
 * its sending order, and the consumer ends on TH_ECLOSED. */
static void test_fan_out_fan_in(void **state)
{
    (void)state;
    fan f = {.per_producer = SCALED(40000)};
    f.ch = new_chan(16);
    assert_int_equal(th_wg_create(&f.wg), 0);
    assert_int_equal(th_wg_add(f.wg, FO_PRODUCERS), 0);
    pthread_t pt[FO_PRODUCERS];
    fan_arg pa[FO_PRODUCERS];
    for (int i = 0; i < FO_PRODUCERS; i++) {
        pa[i] = (fan_arg){.f = &f, .id = (uintptr_t)i + 1};
        pt[i] = spawn(fan_producer, &pa[i]);
    }
    pthread_t closer = spawn(fan_closer, &f);

    uintptr_t next[FO_PRODUCERS + 1] = {0};
    size_t count = 0;
    for (;;) {
        void *got = NULL;
        int rc = th_chan_recv(th_ctx_background(), f.ch, &got);
        if (rc == TH_ECLOSED) {
            break;
        }
        assert_int_equal(rc, 0);
        uintptr_t producer = val(got) >> FAN_SHIFT;
        uintptr_t seq = val(got) & (((uintptr_t)1 << FAN_SHIFT) - 1);
        assert_true(producer >= 1 && producer <= FO_PRODUCERS);
        assert_int_equal(seq, next[producer]);
        next[producer]++;
        count++;
    }
    for (int i = 0; i < FO_PRODUCERS; i++) {
        join(pt[i]);
    }
    join(closer);
    assert_int_equal(f.wait_rc, 0);
    assert_int_equal(f.close_rc, 0);
    assert_int_equal(count, f.per_producer * FO_PRODUCERS);
    for (int i = 1; i <= FO_PRODUCERS; i++) {
        assert_int_equal(next[i], f.per_producer);
    }
    assert_int_equal(th_wg_count(f.wg), 0);
    th_wg_destroy(f.wg);
    th_chan_destroy(f.ch);
}

/* ---- cancellation in the middle of a stream ---------------------------------------------- */

enum { CS_PRODUCERS = 4, CS_MAX = 1 << 20 };

typedef struct cstream {
    th_chan *ch;
    th_ctx *ctx;
    atomic_uchar *sent;     /* per item: send returned 0 */
    atomic_uchar *received; /* per item: times received */
    atomic_long received_count;
} cstream;

typedef struct cs_arg {
    cstream *c;
    uintptr_t id;
    int last_rc;
} cs_arg;

static void *cs_producer(void *p)
{
    cs_arg *arg = p;
    cstream *c = arg->c;
    uintptr_t per = CS_MAX / CS_PRODUCERS;
    for (uintptr_t i = 0; i < per; i++) {
        uintptr_t v = arg->id * per + i + 1;
        int rc = th_chan_send(c->ctx, c->ch, item(v));
        if (rc != 0) {
            arg->last_rc = rc;
            return NULL;
        }
        atomic_store(&c->sent[v - 1], 1);
    }
    arg->last_rc = 0;
    return NULL;
}

static void *cs_consumer(void *p)
{
    cstream *c = p;
    for (;;) {
        void *got = NULL;
        int rc = th_chan_recv(th_ctx_background(), c->ch, &got);
        if (rc == TH_ECLOSED) {
            return NULL;
        }
        T_CHECK(rc == 0);
        uintptr_t v = val(got);
        T_CHECK(v >= 1 && v <= CS_MAX);
        atomic_fetch_add(&c->received[v - 1], 1);
        atomic_fetch_add(&c->received_count, 1);
    }
}

/* Producers are stopped by canceling their context mid-stream: exactly the items whose send
 * returned 0 are received, once each; a failed send never leaks its item into the channel. */
static void test_cancel_mid_stream(void **state)
{
    (void)state;
    cstream c = {0};
    c.ch = new_chan(8);
    c.sent = calloc(CS_MAX, sizeof(*c.sent));
    c.received = calloc(CS_MAX, sizeof(*c.received));
    assert_non_null(c.sent);
    assert_non_null(c.received);
    atomic_init(&c.received_count, 0);
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &c.ctx), 0);
    pthread_t pt[CS_PRODUCERS];
    cs_arg pa[CS_PRODUCERS];
    for (int i = 0; i < CS_PRODUCERS; i++) {
        pa[i] = (cs_arg){.c = &c, .id = (uintptr_t)i, .last_rc = 1};
        pt[i] = spawn(cs_producer, &pa[i]);
    }
    pthread_t consumer = spawn(cs_consumer, &c); /* one consumer: producers outpace it */
    while (atomic_load(&c.received_count) < SCALED(20000)) {
        sched_yield();
    }
    th_ctx_cancel(c.ctx);
    for (int i = 0; i < CS_PRODUCERS; i++) {
        join(pt[i]);
        /* A producer that never had to wait may finish; the others see the cancel. */
        assert_true(pa[i].last_rc == TH_ECANCELED || pa[i].last_rc == 0);
    }
    assert_int_equal(th_chan_close(c.ch), 0);
    join(consumer);
    assert_int_equal(atomic_load(&thread_failures), 0);
    long sent = 0;
    for (size_t i = 0; i < CS_MAX; i++) {
        unsigned char s = atomic_load(&c.sent[i]);
        unsigned char r = atomic_load(&c.received[i]);
        if (s != r) {
            fail_msg("item %zu: sent %d, received %d times", i + 1, s, r);
        }
        sent += s;
    }
    assert_int_equal(sent, atomic_load(&c.received_count));
    th_ctx_release(c.ctx);
    free(c.sent);
    free(c.received);
    th_chan_destroy(c.ch);
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup_reset, teardown_check)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_create_invalid_and_cap),
        T(test_create_under_oom),
        T(test_fifo_and_full_empty),
        T(test_fifo_wraparound_against_model),
        T(test_close_semantics),
        T(test_blocked_recv_gets_later_send),
        T(test_blocked_send_completes_after_recv),
        T(test_close_wakes_blocked_senders),
        T(test_close_wakes_blocked_receivers),
        T(test_close_wakes_senders_and_receivers_together),
        T(test_blocked_ops_return_ctx_cancel),
        T(test_blocked_ops_return_ctx_timeout),
        T(test_mpmc_exactly_once),
        T(test_mpmc_exactly_once_cap1_with_ctx),
        T(test_fan_out_fan_in),
        T(test_cancel_mid_stream),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
