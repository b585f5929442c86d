/* Clocks. All durations and deadlines in trialhub are nanoseconds on CLOCK_MONOTONIC, so they
 * never jump with wall-clock changes; wall time is used only for timestamps that leave the
 * process. */
#ifndef TRIALHUB_CLOCK_H
#define TRIALHUB_CLOCK_H

#include <stdint.h>

#define TH_NS_PER_US UINT64_C(1000)
#define TH_NS_PER_MS UINT64_C(1000000)
#define TH_NS_PER_S  UINT64_C(1000000000)

/* Returns CLOCK_MONOTONIC in nanoseconds. Thread-safe, never fails. */
uint64_t th_clock_now_ns(void);

/* Returns CLOCK_REALTIME in nanoseconds since the Unix epoch. Thread-safe, never fails. */
uint64_t th_clock_wall_ns(void);

/* Returns now + delta_ns, saturating at UINT64_MAX instead of wrapping. */
uint64_t th_clock_after_ns(uint64_t delta_ns);

#endif
