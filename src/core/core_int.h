/* Private helpers shared by the core's blocking primitives (pool, chan, wg, ctx_sleep). */
#ifndef TRIALHUB_CORE_INT_H
#define TRIALHUB_CORE_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "trialhub/ctx.h"

/* Waits on a condition variable until signalled or until a context is done. Usage, with the
 * primitive's own mutex `mu` guarding its predicate:
 *
 *     th__waiter w;
 *     th__waiter_init(&w, &mu, &cond);
 *     lock(mu);
 *     while (!predicate && (err = th__waiter_wait(&w, ctx, TH_CTX_NO_DEADLINE)) == 0) {}
 *     unlock(mu);
 *     th__waiter_finish(&w);       // never with mu held
 *
 * The first wait registers an after-func on ctx that broadcasts cond under mu, so cancellation
 * wakes the sleeper without polling; lock order is primitive mutex, then context mutex. */
typedef struct th__waiter {
    th_ctx_hook hook;
    pthread_mutex_t *mu;
    pthread_cond_t *cond;
    bool armed;
} th__waiter;

void th__waiter_init(th__waiter *waiter, pthread_mutex_t *mu, pthread_cond_t *cond);

/* Called with *mu held. Sleeps until a wake-up, until ctx is done, or until deadline_ns
 * (CLOCK_MONOTONIC; TH_CTX_NO_DEADLINE for none). Returns 0 after a wake-up or the deadline
 * (re-check the predicate and the clock), or th_ctx_err(ctx) when ctx is done (checked before
 * sleeping, so it never sleeps on a done context). */
int th__waiter_wait(th__waiter *waiter, th_ctx *ctx, uint64_t deadline_ns);

/* Called without *mu held, once, after the last th__waiter_wait(). */
void th__waiter_finish(th__waiter *waiter);

/* pthread_cond_init with CLOCK_MONOTONIC, for timed waits. Returns 0 or TH_ESYS. */
int th__cond_init_monotonic(pthread_cond_t *cond);

/* Waits on cond until deadline_ns (CLOCK_MONOTONIC) at most. */
void th__cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *mu, uint64_t deadline_ns);

/* pthread_create through fault injection, with all signals blocked in the new thread (signals
 * are for the main thread). name may be NULL. Returns 0 or TH_ESYS. */
int th__thread_start(pthread_t *thread, const char *name, void *(*fn)(void *), void *arg);

#endif
