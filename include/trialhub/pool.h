/* Bounded worker pool (DESIGN.md rule 1): a fixed number of threads and a bounded task queue.
 * Submitting never allocates and never waits unless the caller asks to: when the queue is full,
 * th_pool_try_submit() fails at once with TH_EOVERLOAD and the caller degrades (503, or the
 * durable queue). Every accepted task gets its completion call exactly once: with status 0 when
 * it runs, or TH_ECANCELED when a shutdown past its deadline abandons it. Idle workers sleep on a
 * condition variable and cost no CPU. See docs/internals/pool.md. */
#ifndef TRIALHUB_POOL_H
#define TRIALHUB_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"

typedef struct th_pool th_pool;

/* A task. status is 0 when the task runs normally, TH_ECANCELED when the pool abandons it at
 * shutdown without running it; the function is called exactly once either way and owns arg. */
typedef void (*th_task_fn)(void *arg, int status);

/* Upper bound on th_pool_config.nthreads and th_pool_resize(). */
#define TH_POOL_MAX_THREADS 256u

typedef struct th_pool_config {
    /* For logs and thread names (truncated to 15 bytes); may be NULL. Copied. */
    const char *name;
    /* Worker threads, 1..TH_POOL_MAX_THREADS. */
    unsigned nthreads;
    /* Queued tasks that may wait for a worker, >= 1. Rounded up to a power of two, and to 2 at
     * least (the lock-free ring needs two cells); the actual capacity is in
     * th_pool_stats.capacity. */
    size_t queue_capacity;
} th_pool_config;

typedef struct th_pool_stats {
    unsigned nthreads;  /* workers the pool is sized to */
    unsigned busy;      /* workers running a task right now */
    size_t queued;      /* tasks waiting for a worker */
    size_t capacity;    /* most tasks that can wait */
    uint64_t submitted; /* tasks accepted */
    uint64_t completed; /* tasks that ran */
    uint64_t rejected;  /* try_submit calls refused with TH_EOVERLOAD */
    uint64_t canceled;  /* accepted tasks completed with TH_ECANCELED at shutdown */
} th_pool_stats;

/* Creates a pool and starts its workers. On success *out owns the pool, to be ended with
 * th_pool_destroy(). Returns 0, TH_EINVAL (bad config), TH_ENOMEM or TH_ESYS (a thread could not
 * be started); on failure nothing is left running and *out is untouched. */
TH_MUST_CHECK int th_pool_create(const th_pool_config *config, th_pool **out);

/* Queues fn(arg, status) without blocking. Returns 0 (fn will be called exactly once),
 * TH_EOVERLOAD when the queue is full, or TH_ESHUTDOWN after shutdown began; on error fn is never
 * called and arg stays the caller's. Lock-free; thread-safe. */
TH_MUST_CHECK int th_pool_try_submit(th_pool *pool, th_task_fn fn, void *arg);

/* Like th_pool_try_submit(), but when the queue is full waits for room until ctx is done.
 * Returns 0, TH_ESHUTDOWN, or th_ctx_err(ctx) (fn never called). Thread-safe. */
TH_MUST_CHECK int th_pool_submit(th_ctx *ctx, th_pool *pool, th_task_fn fn, void *arg);

/* Changes the number of workers at run time. Growing starts threads at once; shrinking lets
 * surplus workers exit after their current task. Returns 0, TH_EINVAL (0 or above
 * TH_POOL_MAX_THREADS), TH_ESHUTDOWN, or TH_ESYS/TH_ENOMEM if a new thread could not be started
 * (then the pool keeps the workers it could start; stats tell how many). Thread-safe. */
TH_MUST_CHECK int th_pool_resize(th_pool *pool, unsigned nthreads);

/* Fills *out with a consistent-enough view of the counters (each is exact; they are read one
 * after another while the pool runs). Thread-safe, lock-free for the hot counters. */
void th_pool_get_stats(th_pool *pool, th_pool_stats *out);

/* Stops intake (later submits fail with TH_ESHUTDOWN), lets the workers run every task already
 * queued, and joins them, waiting at most until ctx is done. Returns 0 when everything ran and
 * every worker has exited. If ctx ends first: every task still queued is completed with
 * TH_ECANCELED on this thread, workers still inside a task are left to finish it and exit on
 * their own, and the call returns th_ctx_err(ctx). Call at most once; th_pool_destroy() is still
 * required afterwards. */
TH_MUST_CHECK int th_pool_shutdown(th_ctx *ctx, th_pool *pool);

/* Shuts the pool down (waiting without limit if th_pool_shutdown() was not called) and frees it.
 * Workers still inside a task after a timed-out shutdown keep the memory alive until they exit.
 * NULL is a no-op. Must not be called from a task of this pool. */
void th_pool_destroy(th_pool *pool);

#endif
