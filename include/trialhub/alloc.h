/* Allocation wrappers used by all trialhub code, with fault injection for tests: the Nth
 * fallible resource acquisition (allocation, thread or descriptor creation) can be made to fail,
 * so every constructor is tested under failure (libuv's test-loop-oom, curl's torture mode). */
#ifndef TRIALHUB_ALLOC_H
#define TRIALHUB_ALLOC_H

#include <stdbool.h>
#include <stddef.h>

/* Like malloc/calloc/realloc/free, but they fail when fault injection says so. th_calloc and
 * th_realloc_array check n * size for overflow and fail with NULL instead of wrapping.
 * th_realloc_array leaves ptr untouched on failure. Thread-safe. */
void *th_malloc(size_t size);
void *th_calloc(size_t n, size_t size);
void *th_realloc_array(void *ptr, size_t n, size_t size);
void th_free(void *ptr);

/* Zeroed memory for n objects of size bytes aligned to align (a power of two, at least
 * sizeof(void *)), for types declared with _Alignas beyond malloc's alignment. Free with
 * th_free(). Fails with NULL on overflow or when fault injection says so. */
void *th_aligned_calloc(size_t align, size_t n, size_t size);

/* Test hook: the next `countdown` fallible acquisitions succeed and the one after fails, once.
 * A negative countdown disables injection (the default). Returns nothing; thread-safe, but
 * meant for single-threaded constructor tests. Counts acquisitions on every thread. */
void th__fault_fail_after(long countdown);

/* Returns true when fault injection says that this acquisition must fail. Every fallible
 * acquisition in trialhub (allocation, pthread_create, eventfd, ...) calls it first. */
bool th__fault_should_fail(void);

/* Returns true when the injected failure has fired since the last th__fault_fail_after(). */
bool th__fault_fired(void);

#endif
