/* Cancellation contexts: a tree of scopes that every request and job carries (DESIGN.md rule 2).
 * A context is done when it is canceled, when its deadline passes, or when any ancestor is done;
 * blocking calls take a context as their first argument and return TH_ECANCELED or TH_ETIMEDOUT
 * when it ends. Modelled on Go's context package, with C lifetimes: every derived context is
 * created with one reference that its creator ends with th_ctx_release(), which also cancels it
 * and its subtree (Go's `defer cancel()`). */
#ifndef TRIALHUB_CTX_H
#define TRIALHUB_CTX_H

#include <stdbool.h>
#include <stdint.h>

#include "trialhub/error.h"

typedef struct th_ctx th_ctx;

/* No deadline: what th_ctx_deadline() returns for a context without one. */
#define TH_CTX_NO_DEADLINE UINT64_MAX

/* A callback registered with th_ctx_after_func(). The caller owns the storage (a stack or struct
 * member is fine) and must keep it alive until th_ctx_after_func_stop() has returned. The fields
 * are private. */
typedef struct th_ctx_hook {
    void (*fn)(void *arg);
    void *arg;
    th_ctx *ctx;
    struct th_ctx_hook *prev;
    struct th_ctx_hook *next;
} th_ctx_hook;

/* Returns the root context: never canceled, no deadline, never freed. Thread-safe. Its
 * th_ctx_release() and th_ctx_unref() are no-ops. */
th_ctx *th_ctx_background(void);

/* Creates a child of parent that is done when th_ctx_cancel() or th_ctx_release() is called on
 * it, or when parent is done. On success *out holds the new context with one reference owned by
 * the caller, to be ended with th_ctx_release(). Returns 0 or TH_ENOMEM (then *out is untouched).
 * A child of a context that is already done starts done, with the parent's error.
 * Thread-safe. */
TH_MUST_CHECK int th_ctx_with_cancel(th_ctx *parent, th_ctx **out);

/* Like th_ctx_with_cancel(), and also done with TH_ETIMEDOUT when CLOCK_MONOTONIC reaches
 * deadline_ns (see th_clock_now_ns()). If the parent's deadline is earlier, the parent's holds.
 * Returns 0, TH_ENOMEM, or TH_ESYS if the timer thread could not be started. */
TH_MUST_CHECK int th_ctx_with_deadline(th_ctx *parent, uint64_t deadline_ns, th_ctx **out);

/* th_ctx_with_deadline(parent, now + timeout_ns, out). */
TH_MUST_CHECK int th_ctx_with_timeout(th_ctx *parent, uint64_t timeout_ns, th_ctx **out);

/* Cancels ctx and every descendant with TH_ECANCELED, unless already done (then nothing
 * changes: the first cause wins). Wakes every waiter: fds become readable, after-funcs run on
 * the calling thread before this returns. When it returns, on any thread, ctx and all its
 * descendants are done, even if another thread was canceling ctx or an ancestor at the same
 * time. While a cancel is in flight, another thread may briefly see ctx done and a descendant
 * not yet done. Thread-safe; a no-op on the background context. */
void th_ctx_cancel(th_ctx *ctx);

/* Cancels ctx (as th_ctx_cancel) and drops the creator's reference; the memory is freed when the
 * last reference goes. Call once per created context. NULL is a no-op. Thread-safe. */
void th_ctx_release(th_ctx *ctx);

/* Takes one more reference, for handing ctx to another thread that may outlive the creator's
 * interest in it. Returns ctx. End it with th_ctx_unref(). Thread-safe. */
th_ctx *th_ctx_ref(th_ctx *ctx);

/* Drops a reference taken with th_ctx_ref(), without canceling. NULL is a no-op. */
void th_ctx_unref(th_ctx *ctx);

/* Returns 0 while ctx is live, TH_ECANCELED once canceled (itself or an ancestor) or
 * TH_ETIMEDOUT once a deadline passed. Lock-free; thread-safe. */
int th_ctx_err(const th_ctx *ctx);

/* Returns th_ctx_err(ctx) != 0. */
bool th_ctx_done(const th_ctx *ctx);

/* Returns the effective deadline (the earliest on the path to the root), or
 * TH_CTX_NO_DEADLINE. */
uint64_t th_ctx_deadline(const th_ctx *ctx);

/* Returns the nanoseconds left until the effective deadline (0 if passed), or
 * TH_CTX_NO_DEADLINE if there is none. */
uint64_t th_ctx_remaining_ns(const th_ctx *ctx);

/* Gives a file descriptor that becomes readable (POLLIN) when ctx is done and stays readable,
 * so poll()-based code can wait on it beside its own descriptors. The descriptor belongs to ctx:
 * do not read or close it, and do not use it after the last reference is dropped. Created on
 * first call. Returns 0, TH_ESYS (no descriptor could be made) or TH_EINVAL for the background
 * context, which never becomes done. Thread-safe. */
TH_MUST_CHECK int th_ctx_fd(th_ctx *ctx, int *fd_out);

/* Registers fn(arg) to run once when ctx becomes done, on the thread that cancels it (the timer
 * thread for deadlines), with no trialhub lock held. hook is caller-owned storage. Returns 0, or
 * the context's error if it is already done, in which case fn never runs and hook need not be
 * stopped. fn must be short and must not call th_ctx_after_func_stop() on its own hook.
 * Thread-safe. */
TH_MUST_CHECK int th_ctx_after_func(th_ctx *ctx, th_ctx_hook *hook, void (*fn)(void *arg),
                                    void *arg);

/* Unregisters a hook registered with th_ctx_after_func(). Returns true if fn will never run;
 * false if it has run, in which case it has also finished by the time this returns (so hook and
 * arg may be freed). Must not be called while holding a lock that fn takes. */
bool th_ctx_after_func_stop(th_ctx_hook *hook);

/* Sleeps for ns nanoseconds or until ctx is done, whichever is first. Returns 0 after a full
 * sleep, else th_ctx_err(ctx). */
int th_ctx_sleep(th_ctx *ctx, uint64_t ns);

#endif
