/* Bounded worker pool. The task queue is a lock-free bounded MPMC ring (Dmitry Vyukov's
 * design): a submit is one CAS and two stores on a preallocated cell, with no allocation and no
 * lock. Workers that find it empty push themselves on the idle stack and sleep on their own
 * condition variable; submitters wake one only when some worker is idle (a Dekker handshake on
 * `nsleepers`, both sides sequentially consistent), so a busy pool takes no lock per task. The
 * waker takes the worker off the idle stack, so each sleep costs one wake-up: the submits that
 * follow see `nsleepers` == 0 and take no lock while the woken worker is being scheduled. A
 * blocked submitter is likewise woken once per wait (`room_signaled`), not once per task run.
 *
 * Locking: `mu` protects the worker slots' states, the idle stack, `nlive`, `shutdown_started`
 * and the condition variables' predicates (work for sleepers, room for blocking submitters,
 * exits for shutdown). The ring, `target`, the counters and `abandon` are atomics read without
 * it. A task never runs with `mu` held. Lock order: pool mu, then a context's mu (th__waiter).
 *
 * Lifetime: `refs` counts the owner plus every live worker thread, so workers left inside a task
 * by a shutdown that timed out keep the memory alive and the last one frees it. */
#include "trialhub/pool.h"

#include <assert.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "core/core_int.h"
#include "trialhub/alloc.h"

#define CACHELINE  64
#define CLOSED_BIT ((size_t)1 << (sizeof(size_t) * 8 - 1))
/* Empty polls before a worker goes to sleep; each is a pause, a few ns to ~40 ns. */
#define SPIN_BEFORE_SLEEP 64

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() atomic_signal_fence(memory_order_seq_cst)
#endif

typedef struct cell {
    _Atomic size_t seq;
    th_task_fn fn;
    void *arg;
} cell;

enum slot_state {
    SLOT_FREE = 0, /* no thread */
    SLOT_RUNNING,  /* a thread that the owner will join */
    SLOT_EXITED,   /* thread returned (or is returning): join it */
    SLOT_DETACHED, /* left inside a task by a timed-out shutdown; nobody joins it */
};

typedef struct worker {
    _Alignas(CACHELINE) _Atomic uint64_t completed; /* written only by its thread */
    atomic_bool busy;
    enum slot_state state; /* under pool->mu */
    bool idle;             /* on pool->idle and counted in nsleepers; under pool->mu */
    pthread_cond_t cond;   /* its sleep; signalled by whoever takes it off pool->idle */
    unsigned index;
    pthread_t thread;
    struct th_pool *pool;
} worker;

struct th_pool {
    _Alignas(CACHELINE) _Atomic size_t enqueue_pos; /* CLOSED_BIT set at shutdown */
    _Alignas(CACHELINE) _Atomic size_t dequeue_pos;
    _Alignas(CACHELINE) cell *cells;
    size_t mask;
    _Atomic unsigned target;          /* workers wanted; those with index >= target exit */
    _Atomic unsigned nsleepers;       /* workers on the idle stack, not yet claimed by a waker */
    _Atomic unsigned nsubmit_waiters; /* blocking submitters asleep or about to on room_cond */
    _Alignas(CACHELINE) _Atomic uint64_t rejected;
    _Atomic uint64_t canceled;
    atomic_bool abandon;       /* shutdown timed out: workers stop taking tasks */
    atomic_bool room_signaled; /* room_cond broadcast since a submitter last began to wait */
    atomic_uint refs;

    pthread_mutex_t mu;
    pthread_cond_t room_cond;
    pthread_cond_t exit_cond;
    unsigned nlive; /* threads started and not yet exited, under mu */
    bool shutdown_started;
    char name[12];
    worker *workers;                   /* TH_POOL_MAX_THREADS slots */
    unsigned nidle;                    /* under mu */
    worker *idle[TH_POOL_MAX_THREADS]; /* sleeping workers, most recent last; under mu */
};

static void pool_free(th_pool *pool)
{
    for (unsigned i = 0; i < TH_POOL_MAX_THREADS; i++) {
        pthread_cond_destroy(&pool->workers[i].cond);
    }
    pthread_cond_destroy(&pool->exit_cond);
    pthread_cond_destroy(&pool->room_cond);
    pthread_mutex_destroy(&pool->mu);
    th_free(pool->workers);
    th_free(pool->cells);
    th_free(pool);
}

static void pool_unref(th_pool *pool)
{
    if (atomic_fetch_sub(&pool->refs, 1) == 1) {
        pool_free(pool);
    }
}

/* ---- the ring ---------------------------------------------------------------------------- */

static int ring_push(th_pool *pool, th_task_fn fn, void *arg)
{
    size_t pos = atomic_load_explicit(&pool->enqueue_pos, memory_order_relaxed);
    cell *c;
    for (;;) {
        if (pos & CLOSED_BIT) {
            return TH_ESHUTDOWN;
        }
        c = &pool->cells[pos & pool->mask];
        size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
        intptr_t dif = (intptr_t)seq - (intptr_t)pos;
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&pool->enqueue_pos, &pos, pos + 1,
                                                      memory_order_relaxed, memory_order_relaxed)) {
                break;
            }
        } else if (dif < 0) {
            return TH_EOVERLOAD;
        } else {
            pos = atomic_load_explicit(&pool->enqueue_pos, memory_order_relaxed);
        }
    }
    c->fn = fn;
    c->arg = arg;
    /* seq_cst: ordered before the nsleepers load that follows (see the file comment). */
    atomic_store_explicit(&c->seq, pos + 1, memory_order_seq_cst);
    return 0;
}

static bool ring_pop(th_pool *pool, th_task_fn *fn, void **arg)
{
    size_t pos = atomic_load_explicit(&pool->dequeue_pos, memory_order_relaxed);
    cell *c;
    for (;;) {
        c = &pool->cells[pos & pool->mask];
        size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
        intptr_t dif = (intptr_t)seq - (intptr_t)(pos + 1);
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&pool->dequeue_pos, &pos, pos + 1,
                                                      memory_order_relaxed, memory_order_relaxed)) {
                break;
            }
        } else if (dif < 0) {
            return false;
        } else {
            pos = atomic_load_explicit(&pool->dequeue_pos, memory_order_relaxed);
        }
    }
    *fn = c->fn;
    *arg = c->arg;
    /* seq_cst: ordered before the nsubmit_waiters load that follows. */
    atomic_store_explicit(&c->seq, pos + pool->mask + 1, memory_order_seq_cst);
    return true;
}

/* True when every task ever accepted has been taken by someone (published or not). */
static bool ring_drained(th_pool *pool)
{
    size_t accepted = atomic_load(&pool->enqueue_pos) & ~CLOSED_BIT;
    return atomic_load(&pool->dequeue_pos) == accepted;
}

/* ---- workers ----------------------------------------------------------------------------- */

/* Wakes blocked submitters once per wait: the first task run after a submitter began to wait
 * broadcasts, the ones after it (until that submitter runs again) see room_signaled set. */
static void wake_submitters(th_pool *pool)
{
    if (atomic_load_explicit(&pool->nsubmit_waiters, memory_order_seq_cst) != 0 &&
        !atomic_load_explicit(&pool->room_signaled, memory_order_seq_cst) &&
        !atomic_exchange(&pool->room_signaled, true)) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->room_cond);
        pthread_mutex_unlock(&pool->mu);
    }
}

static void run_task(worker *w, th_task_fn fn, void *arg)
{
    th_pool *pool = w->pool;
    wake_submitters(pool);
    atomic_store_explicit(&w->busy, true, memory_order_relaxed);
    fn(arg, 0);
    atomic_store_explicit(&w->busy, false, memory_order_relaxed);
    atomic_store_explicit(&w->completed,
                          atomic_load_explicit(&w->completed, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

/* Whether this worker must stop taking tasks: resized away, drained after close, or
 * abandoned. Called with mu held, so the decision to exit is final. */
static bool must_exit_locked(worker *w)
{
    th_pool *pool = w->pool;
    if (atomic_load(&pool->abandon)) {
        return true;
    }
    if (w->index >= atomic_load(&pool->target)) {
        return true;
    }
    return (atomic_load(&pool->enqueue_pos) & CLOSED_BIT) && ring_drained(pool);
}

/* Puts w on the idle stack; the caller then looks at the ring once more before it sleeps (the
 * worker's side of the Dekker handshake with th_pool_try_submit). */
static void idle_push_locked(th_pool *pool, worker *w)
{
    w->idle = true;
    pool->idle[pool->nidle++] = w;
    atomic_fetch_add_explicit(&pool->nsleepers, 1, memory_order_seq_cst);
}

/* Takes w off the idle stack (it found work or must exit before anyone woke it). */
static void idle_remove_locked(th_pool *pool, worker *w)
{
    for (unsigned i = 0; i < pool->nidle; i++) {
        if (pool->idle[i] == w) {
            pool->idle[i] = pool->idle[--pool->nidle];
            break;
        }
    }
    w->idle = false;
    atomic_fetch_sub_explicit(&pool->nsleepers, 1, memory_order_seq_cst);
}

/* Wakes the most recently idle worker (its cache is the warmest), taking it off the stack so
 * that nobody wakes it twice. */
static void wake_one_locked(th_pool *pool)
{
    if (pool->nidle > 0) {
        worker *w = pool->idle[--pool->nidle];
        w->idle = false;
        atomic_fetch_sub_explicit(&pool->nsleepers, 1, memory_order_seq_cst);
        pthread_cond_signal(&w->cond);
    }
}

static void wake_all_locked(th_pool *pool)
{
    while (pool->nidle > 0) {
        wake_one_locked(pool);
    }
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    th_pool *pool = w->pool;
    th_task_fn fn;
    void *task_arg;

    for (;;) {
        if (!atomic_load_explicit(&pool->abandon, memory_order_relaxed) &&
            w->index < atomic_load_explicit(&pool->target, memory_order_relaxed)) {
            if (ring_pop(pool, &fn, &task_arg)) {
                run_task(w, fn, task_arg);
                continue;
            }
            bool found = false;
            for (int spin = 0; spin < SPIN_BEFORE_SLEEP && !found; spin++) {
                cpu_relax();
                found = ring_pop(pool, &fn, &task_arg);
            }
            if (found) {
                run_task(w, fn, task_arg);
                continue;
            }
        }
        /* Nothing to do: sleep until a submit, a resize or shutdown. */
        pthread_mutex_lock(&pool->mu);
        bool got = false, leave = false;
        for (;;) {
            if (must_exit_locked(w)) {
                leave = true;
                break;
            }
            if (ring_pop(pool, &fn, &task_arg)) {
                got = true;
                break;
            }
            if (!w->idle) {
                idle_push_locked(pool, w); /* then look at the ring once more */
                continue;
            }
            pthread_cond_wait(&w->cond, &pool->mu);
        }
        if (w->idle) {
            idle_remove_locked(pool, w);
        }
        if (leave) {
            /* A detached slot belongs to nobody; any other is joined by the owner. */
            if (w->state != SLOT_DETACHED) {
                w->state = SLOT_EXITED;
            }
            pool->nlive--;
            pthread_cond_broadcast(&pool->exit_cond);
            pthread_mutex_unlock(&pool->mu);
            pool_unref(pool);
            return NULL;
        }
        pthread_mutex_unlock(&pool->mu);
        if (got) {
            run_task(w, fn, task_arg);
        }
    }
}

/* Starts the thread of slot i. Called with mu held (or before the pool is shared). */
static int start_worker_locked(th_pool *pool, unsigned i)
{
    worker *w = &pool->workers[i];
    char name[32]; /* th__thread_start keeps the first 15 bytes */
    snprintf(name, sizeof(name), "%s-%u", pool->name, i);
    w->index = i;
    w->pool = pool;
    atomic_fetch_add(&pool->refs, 1);
    int rc = th__thread_start(&w->thread, name, worker_main, w);
    if (rc != 0) {
        atomic_fetch_sub(&pool->refs, 1);
        return rc;
    }
    w->state = SLOT_RUNNING;
    pool->nlive++;
    return 0;
}

/* Joins every slot whose thread has exited. Called with mu held: an exiting thread needs no
 * lock after marking itself, so the join cannot deadlock. */
static void join_exited_locked(th_pool *pool)
{
    for (unsigned i = 0; i < TH_POOL_MAX_THREADS; i++) {
        if (pool->workers[i].state == SLOT_EXITED) {
            pthread_join(pool->workers[i].thread, NULL);
            pool->workers[i].state = SLOT_FREE;
        }
    }
}

/* ---- public API -------------------------------------------------------------------------- */

int th_pool_create(const th_pool_config *config, th_pool **out)
{
    if (config == NULL || config->nthreads == 0 || config->nthreads > TH_POOL_MAX_THREADS ||
        config->queue_capacity == 0 || config->queue_capacity > ((size_t)1 << 30)) {
        return TH_EINVAL;
    }
    /* The ring needs two cells at least: with one, "filled at position p" and "freed for
     * position p + 1" would be the same sequence number. */
    size_t cap = 2;
    while (cap < config->queue_capacity) {
        cap <<= 1;
    }
    th_pool *pool = th_aligned_calloc(CACHELINE, 1, sizeof(*pool));
    if (pool == NULL) {
        return TH_ENOMEM;
    }
    pool->cells = th_calloc(cap, sizeof(cell));
    pool->workers = th_aligned_calloc(CACHELINE, TH_POOL_MAX_THREADS, sizeof(worker));
    if (pool->cells == NULL || pool->workers == NULL) {
        th_free(pool->cells);
        th_free(pool->workers);
        th_free(pool);
        return TH_ENOMEM;
    }
    pool->mask = cap - 1;
    for (size_t i = 0; i < cap; i++) {
        atomic_init(&pool->cells[i].seq, i);
    }
    for (unsigned i = 0; i < TH_POOL_MAX_THREADS; i++) {
        pthread_cond_init(&pool->workers[i].cond, NULL);
    }
    snprintf(pool->name, sizeof(pool->name), "%s", config->name ? config->name : "pool");
    atomic_init(&pool->refs, 1);
    atomic_init(&pool->target, config->nthreads);
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->room_cond, NULL);
    pthread_cond_init(&pool->exit_cond, NULL);

    pthread_mutex_lock(&pool->mu);
    int rc = 0;
    for (unsigned i = 0; i < config->nthreads && rc == 0; i++) {
        rc = start_worker_locked(pool, i);
    }
    pthread_mutex_unlock(&pool->mu);
    if (rc != 0) {
        th_pool_destroy(pool); /* stops and joins the workers already started */
        return rc;
    }
    *out = pool;
    return 0;
}

static void wake_worker(th_pool *pool)
{
    if (atomic_load_explicit(&pool->nsleepers, memory_order_seq_cst) != 0) {
        pthread_mutex_lock(&pool->mu);
        wake_one_locked(pool);
        pthread_mutex_unlock(&pool->mu);
    }
}

int th_pool_try_submit(th_pool *pool, th_task_fn fn, void *arg)
{
    int rc = ring_push(pool, fn, arg);
    if (rc == 0) {
        wake_worker(pool);
    } else if (rc == TH_EOVERLOAD) {
        atomic_fetch_add_explicit(&pool->rejected, 1, memory_order_relaxed);
    }
    return rc;
}

int th_pool_submit(th_ctx *ctx, th_pool *pool, th_task_fn fn, void *arg)
{
    int rc = ring_push(pool, fn, arg);
    if (rc == 0) {
        wake_worker(pool);
        return 0;
    }
    if (rc != TH_EOVERLOAD) {
        return rc;
    }
    th__waiter waiter;
    th__waiter_init(&waiter, &pool->mu, &pool->room_cond);
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->nsubmit_waiters, 1, memory_order_seq_cst);
    for (;;) {
        /* Re-armed before every re-check, under mu, like the nsubmit_waiters count. */
        atomic_store(&pool->room_signaled, false);
        rc = ring_push(pool, fn, arg);
        if (rc != TH_EOVERLOAD) {
            break;
        }
        rc = th__waiter_wait(&waiter, ctx, TH_CTX_NO_DEADLINE);
        if (rc != 0) {
            break;
        }
    }
    atomic_fetch_sub_explicit(&pool->nsubmit_waiters, 1, memory_order_seq_cst);
    if (rc == 0) {
        wake_one_locked(pool);
    }
    pthread_mutex_unlock(&pool->mu);
    th__waiter_finish(&waiter);
    return rc;
}

int th_pool_resize(th_pool *pool, unsigned nthreads)
{
    if (nthreads == 0 || nthreads > TH_POOL_MAX_THREADS) {
        return TH_EINVAL;
    }
    int rc = 0;
    pthread_mutex_lock(&pool->mu);
    if (pool->shutdown_started) {
        pthread_mutex_unlock(&pool->mu);
        return TH_ESHUTDOWN;
    }
    unsigned old = atomic_load(&pool->target);
    atomic_store(&pool->target, nthreads);
    if (nthreads < old) {
        wake_all_locked(pool); /* sleepers above the target exit */
    }
    for (unsigned i = old; i < nthreads; i++) {
        worker *w = &pool->workers[i];
        if (w->state == SLOT_RUNNING) {
            continue; /* was leaving after a shrink but had not yet: it stays */
        }
        if (w->state == SLOT_EXITED) {
            pthread_join(w->thread, NULL);
            w->state = SLOT_FREE;
        }
        rc = start_worker_locked(pool, i);
        if (rc != 0) {
            atomic_store(&pool->target, i);
            break;
        }
    }
    join_exited_locked(pool);
    pthread_mutex_unlock(&pool->mu);
    return rc;
}

void th_pool_get_stats(th_pool *pool, th_pool_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->nthreads = atomic_load(&pool->target);
    out->capacity = pool->mask + 1;
    size_t enq = atomic_load(&pool->enqueue_pos) & ~CLOSED_BIT;
    size_t deq = atomic_load(&pool->dequeue_pos);
    out->queued = enq > deq ? enq - deq : 0;
    out->submitted = enq;
    for (unsigned i = 0; i < TH_POOL_MAX_THREADS; i++) {
        out->busy += atomic_load_explicit(&pool->workers[i].busy, memory_order_relaxed);
        out->completed += atomic_load_explicit(&pool->workers[i].completed, memory_order_relaxed);
    }
    out->rejected = atomic_load(&pool->rejected);
    out->canceled = atomic_load(&pool->canceled);
}

int th_pool_shutdown(th_ctx *ctx, th_pool *pool)
{
    pthread_mutex_lock(&pool->mu);
    if (pool->shutdown_started) {
        pthread_mutex_unlock(&pool->mu);
        return TH_ESHUTDOWN;
    }
    pool->shutdown_started = true;
    atomic_fetch_or(&pool->enqueue_pos, CLOSED_BIT);
    wake_all_locked(pool);
    pthread_cond_broadcast(&pool->room_cond);

    th__waiter waiter;
    th__waiter_init(&waiter, &pool->mu, &pool->exit_cond);
    int rc = 0;
    while (pool->nlive > 0 && (rc = th__waiter_wait(&waiter, ctx, TH_CTX_NO_DEADLINE)) == 0) {
    }
    if (rc == 0) {
        join_exited_locked(pool);
        pthread_mutex_unlock(&pool->mu);
        th__waiter_finish(&waiter);
        return 0;
    }

    /* Out of time: nobody takes new tasks; what is still queued is completed as canceled
     * here; workers inside a task are left to finish it and exit on their own. */
    atomic_store(&pool->abandon, true);
    wake_all_locked(pool);
    pthread_mutex_unlock(&pool->mu);
    th__waiter_finish(&waiter);

    th_task_fn fn;
    void *arg;
    while (!ring_drained(pool)) {
        if (ring_pop(pool, &fn, &arg)) {
            atomic_fetch_add(&pool->canceled, 1);
            fn(arg, TH_ECANCELED);
        } else {
            sched_yield(); /* a submit that began before close is still publishing */
        }
    }

    pthread_mutex_lock(&pool->mu);
    join_exited_locked(pool);
    for (unsigned i = 0; i < TH_POOL_MAX_THREADS; i++) {
        worker *w = &pool->workers[i];
        if (w->state == SLOT_RUNNING) {
            pthread_detach(w->thread);
            w->state = SLOT_DETACHED;
        }
    }
    pthread_mutex_unlock(&pool->mu);
    return rc;
}

void th_pool_destroy(th_pool *pool)
{
    if (pool == NULL) {
        return;
    }
    pthread_mutex_lock(&pool->mu);
    bool started = pool->shutdown_started;
    pthread_mutex_unlock(&pool->mu);
    if (!started) {
        int rc = th_pool_shutdown(th_ctx_background(), pool);
        assert(rc == 0);
        (void)rc;
    }
    pool_unref(pool);
}
