/* Monotonic and wall clocks in nanoseconds. */
#include "trialhub/clock.h"

#include <time.h>

static uint64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    /* clock_gettime cannot fail for these clocks on Linux. */
    (void)clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * TH_NS_PER_S + (uint64_t)ts.tv_nsec;
}

uint64_t th_clock_now_ns(void)
{
    return clock_ns(CLOCK_MONOTONIC);
}

uint64_t th_clock_wall_ns(void)
{
    return clock_ns(CLOCK_REALTIME);
}

uint64_t th_clock_after_ns(uint64_t delta_ns)
{
    uint64_t now = th_clock_now_ns();
    return delta_ns > UINT64_MAX - now ? UINT64_MAX : now + delta_ns;
}
