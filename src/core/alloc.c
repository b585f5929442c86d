/* Allocation wrappers with a process-wide fault-injection countdown for constructor tests. */
#include "trialhub/alloc.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Fallible acquisitions left before the injected failure; negative means injection is off. */
static _Atomic long fault_countdown = -1;
static atomic_bool fault_fired_flag;

void th__fault_fail_after(long countdown)
{
    atomic_store(&fault_fired_flag, false);
    atomic_store(&fault_countdown, countdown);
}

bool th__fault_should_fail(void)
{
    long left = atomic_load_explicit(&fault_countdown, memory_order_relaxed);
    while (left >= 0) {
        /* 0 means this one fails; then injection switches itself off (-1). */
        if (atomic_compare_exchange_weak(&fault_countdown, &left, left - 1)) {
            if (left == 0) {
                atomic_store(&fault_fired_flag, true);
                return true;
            }
            return false;
        }
    }
    return false;
}

bool th__fault_fired(void)
{
    return atomic_load(&fault_fired_flag);
}

void *th_malloc(size_t size)
{
    if (th__fault_should_fail()) {
        return NULL;
    }
    return malloc(size == 0 ? 1 : size);
}

void *th_calloc(size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size) {
        return NULL;
    }
    if (th__fault_should_fail()) {
        return NULL;
    }
    return calloc(n == 0 ? 1 : n, size == 0 ? 1 : size);
}

void *th_realloc_array(void *ptr, size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size) {
        return NULL;
    }
    if (th__fault_should_fail()) {
        return NULL;
    }
    return realloc(ptr, n * size == 0 ? 1 : n * size);
}

void th_free(void *ptr)
{
    free(ptr);
}

void *th_aligned_calloc(size_t align, size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size) {
        return NULL;
    }
    if (th__fault_should_fail()) {
        return NULL;
    }
    size_t total = n * size == 0 ? 1 : n * size;
    void *ptr = NULL;
    if (posix_memalign(&ptr, align, total) != 0) {
        return NULL;
    }
    memset(ptr, 0, total);
    return ptr;
}
