/* WaitGroup: waits for a counted set of jobs to finish, like Go's sync.WaitGroup, with a wait
 * that honours a context. */
#ifndef TRIALHUB_WG_H
#define TRIALHUB_WG_H

#include "trialhub/ctx.h"
#include "trialhub/error.h"

typedef struct th_wg th_wg;

/* Creates a wait group with counter 0. Returns 0 or TH_ENOMEM (*out untouched). */
TH_MUST_CHECK int th_wg_create(th_wg **out);

/* Adds delta (may be negative) to the counter; waiters wake when it reaches 0. Returns 0, or
 * TH_EINVAL when the counter would go below zero or overflow (it is then unchanged). Thread-safe.
 */
TH_MUST_CHECK int th_wg_add(th_wg *wg, long delta);

/* th_wg_add(wg, -1); calling it more often than jobs were added is a bug and asserts. */
void th_wg_done(th_wg *wg);

/* Waits until the counter is 0. Returns 0, or th_ctx_err(ctx) if ctx ends first. Thread-safe. */
TH_MUST_CHECK int th_wg_wait(th_ctx *ctx, th_wg *wg);

/* Returns the counter now (a snapshot). */
long th_wg_count(th_wg *wg);

/* Frees the group; no thread may be waiting in it. NULL is a no-op. */
void th_wg_destroy(th_wg *wg);

#endif
