/* WaitGroup: a counter under a mutex, and a condition variable broadcast when it reaches zero.
 * Locking: `mu` protects `count`; lock order is wg mu, then a context's mu (th__waiter). */
#include "trialhub/wg.h"

#include <assert.h>
#include <limits.h>
#include <pthread.h>

#include "core/core_int.h"
#include "trialhub/alloc.h"

struct th_wg {
    pthread_mutex_t mu;
    pthread_cond_t zero;
    long count;
};

int th_wg_create(th_wg **out)
{
    th_wg *wg = th_calloc(1, sizeof(*wg));
    if (wg == NULL) {
        return TH_ENOMEM;
    }
    pthread_mutex_init(&wg->mu, NULL);
    pthread_cond_init(&wg->zero, NULL);
    *out = wg;
    return 0;
}

void th_wg_destroy(th_wg *wg)
{
    if (wg == NULL) {
        return;
    }
    pthread_cond_destroy(&wg->zero);
    pthread_mutex_destroy(&wg->mu);
    th_free(wg);
}

int th_wg_add(th_wg *wg, long delta)
{
    int rc = 0;
    pthread_mutex_lock(&wg->mu);
    if ((delta < 0 && wg->count + delta < 0) || (delta > 0 && wg->count > LONG_MAX - delta)) {
        rc = TH_EINVAL;
    } else {
        wg->count += delta;
        if (wg->count == 0) {
            pthread_cond_broadcast(&wg->zero);
        }
    }
    pthread_mutex_unlock(&wg->mu);
    return rc;
}

void th_wg_done(th_wg *wg)
{
    int rc = th_wg_add(wg, -1);
    assert(rc == 0 && "th_wg_done called more often than jobs were added");
    (void)rc;
}

int th_wg_wait(th_ctx *ctx, th_wg *wg)
{
    th__waiter waiter;
    th__waiter_init(&waiter, &wg->mu, &wg->zero);
    int rc = 0;
    pthread_mutex_lock(&wg->mu);
    while (wg->count > 0 && (rc = th__waiter_wait(&waiter, ctx, TH_CTX_NO_DEADLINE)) == 0) {
    }
    pthread_mutex_unlock(&wg->mu);
    th__waiter_finish(&waiter);
    return rc;
}

long th_wg_count(th_wg *wg)
{
    pthread_mutex_lock(&wg->mu);
    long count = wg->count;
    pthread_mutex_unlock(&wg->mu);
    return count;
}
