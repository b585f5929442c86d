/* Thread and condition-variable helpers shared by the core: monotonic timed waits, and thread
 * start-up that blocks signals (they belong to the main thread) and goes through fault
 * injection. */
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>

#include "core/core_int.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/error.h"

int th__cond_init_monotonic(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0) {
        return TH_ESYS;
    }
    int rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0) {
        rc = pthread_cond_init(cond, &attr);
    }
    pthread_condattr_destroy(&attr);
    return rc == 0 ? 0 : TH_ESYS;
}

void th__cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *mu, uint64_t deadline_ns)
{
    struct timespec ts = {
        .tv_sec = (time_t)(deadline_ns / TH_NS_PER_S),
        .tv_nsec = (long)(deadline_ns % TH_NS_PER_S),
    };
    (void)pthread_cond_timedwait(cond, mu, &ts);
}

int th__thread_start(pthread_t *thread, const char *name, void *(*fn)(void *), void *arg)
{
    if (th__fault_should_fail()) {
        return TH_ESYS;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(thread, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        return TH_ESYS;
    }
    if (name != NULL) {
        char short_name[16];
        strncpy(short_name, name, sizeof(short_name) - 1);
        short_name[sizeof(short_name) - 1] = '\0';
        (void)pthread_setname_np(*thread, short_name);
    }
    return 0;
}
