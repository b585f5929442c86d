/* Cancellation contexts: a reference-counted tree, a process-wide timer thread for deadlines, and
 * after-func hooks that wake blocked waiters.
 *
 * Locking. Each context has a mutex `mu` protecting its children list, its pending hooks, its
 * descriptor and its `firing` flag; `err` is written under mu and read lock-free. Lock order is
 * always ancestor before descendant, and no thread holds more than one: a cancel walks the
 * subtree one context at a time under the global walk_mu (taken before any context lock), and
 * a context that is being freed unlinks itself from its parent holding only the parent's
 * lock. The timer's
 * mutex is taken after no context lock or after the freeing context's (never the other way):
 * the timer holds no references, only pointers that a freeing context removes from its heap, and
 * it takes a reference (only if the count is not already zero) before canceling what it popped.
 * Hooks run with no lock held. */
#include "trialhub/ctx.h"

#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/core_int.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"

struct th_ctx {
    pthread_mutex_t mu;
    pthread_cond_t fired_cond; /* broadcast when this context's hooks have all run */
    _Atomic int err;           /* 0 while live; set once, under mu */
    atomic_uint refs;
    bool immortal;        /* the background context */
    uint64_t deadline_ns; /* effective deadline, immutable after creation */
    th_ctx *parent;       /* holds a reference on the parent; NULL for the background */
    th_ctx *children;     /* live children, under mu */
    th_ctx *sib_prev;     /* links in parent->children, under parent->mu */
    th_ctx *sib_next;
    bool linked;               /* in parent->children, under parent->mu */
    th_ctx_hook *hooks;        /* pending hooks, under mu */
    th_ctx_hook *firing_hooks; /* hooks taken by the canceler, owned by it while firing */
    bool firing;               /* under mu */
    int fd;                    /* eventfd or -1, under mu */
    size_t heap_index;         /* position in the timer heap, under timer.mu */
    bool in_heap;              /* under timer.mu */
    th_ctx *fire_next;         /* link in one cancel's list of contexts whose hooks to run */
    th_ctx *walk_next;         /* link in one cancel's walk of the subtree */
};

static th_ctx background = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .fired_cond = PTHREAD_COND_INITIALIZER,
    .immortal = true,
    .deadline_ns = TH_CTX_NO_DEADLINE,
    .fd = -1,
};

th_ctx *th_ctx_background(void)
{
    return &background;
}

/* ---- timer ------------------------------------------------------------------------------- */

/* A binary min-heap of contexts by deadline, served by one thread started on first use. */
static struct {
    pthread_mutex_t mu; /* protects everything below and every ctx's heap_index/in_heap */
    pthread_cond_t cond;
    bool started;
    th_ctx **heap;
    size_t len;
    size_t cap;
} timer = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void cancel_tree(th_ctx *ctx, int err);

static void heap_swap(size_t a, size_t b)
{
    th_ctx *tmp = timer.heap[a];
    timer.heap[a] = timer.heap[b];
    timer.heap[b] = tmp;
    timer.heap[a]->heap_index = a;
    timer.heap[b]->heap_index = b;
}

static void heap_up(size_t i)
{
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (timer.heap[up]->deadline_ns <= timer.heap[i]->deadline_ns) {
            break;
        }
        heap_swap(i, up);
        i = up;
    }
}

static void heap_down(size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, min = i;
        if (l < timer.len && timer.heap[l]->deadline_ns < timer.heap[min]->deadline_ns) {
            min = l;
        }
        if (r < timer.len && timer.heap[r]->deadline_ns < timer.heap[min]->deadline_ns) {
            min = r;
        }
        if (min == i) {
            return;
        }
        heap_swap(i, min);
        i = min;
    }
}

static void heap_remove_at(size_t i)
{
    timer.heap[i]->in_heap = false;
    timer.len--;
    if (i != timer.len) {
        timer.heap[i] = timer.heap[timer.len];
        timer.heap[i]->heap_index = i;
        heap_down(i);
        heap_up(i);
    }
}

static bool try_ref(th_ctx *ctx)
{
    unsigned refs = atomic_load(&ctx->refs);
    while (refs > 0) {
        if (atomic_compare_exchange_weak(&ctx->refs, &refs, refs + 1)) {
            return true;
        }
    }
    return false;
}

static void *timer_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&timer.mu);
    for (;;) {
        if (timer.len == 0) {
            pthread_cond_wait(&timer.cond, &timer.mu);
            continue;
        }
        th_ctx *first = timer.heap[0];
        if (first->deadline_ns > th_clock_now_ns()) {
            th__cond_wait_until(&timer.cond, &timer.mu, first->deadline_ns);
            continue;
        }
        heap_remove_at(0);
        bool alive = try_ref(first);
        pthread_mutex_unlock(&timer.mu);
        if (alive) {
            cancel_tree(first, TH_ETIMEDOUT);
            th_ctx_unref(first);
        }
        pthread_mutex_lock(&timer.mu);
    }
    return NULL;
}

/* Adds ctx to the heap, starting the timer thread on first use. Returns 0, TH_ENOMEM or
 * TH_ESYS. */
static int timer_add(th_ctx *ctx)
{
    int rc = 0;
    pthread_mutex_lock(&timer.mu);
    if (!timer.started) {
        rc = th__cond_init_monotonic(&timer.cond);
        if (rc == 0) {
            pthread_t thread;
            rc = th__thread_start(&thread, "th-ctx-timer", timer_main, NULL);
            if (rc == 0) {
                pthread_detach(thread);
                timer.started = true;
            } else {
                pthread_cond_destroy(&timer.cond);
            }
        }
    }
    if (rc == 0 && timer.len == timer.cap) {
        size_t cap = timer.cap ? timer.cap * 2 : 64;
        th_ctx **heap = th_realloc_array(timer.heap, cap, sizeof(*heap));
        if (heap == NULL) {
            rc = TH_ENOMEM;
        } else {
            timer.heap = heap;
            timer.cap = cap;
        }
    }
    if (rc == 0) {
        ctx->heap_index = timer.len;
        ctx->in_heap = true;
        timer.heap[timer.len++] = ctx;
        heap_up(ctx->heap_index);
        if (ctx->heap_index == 0) {
            pthread_cond_signal(&timer.cond);
        }
    }
    pthread_mutex_unlock(&timer.mu);
    return rc;
}

static void timer_remove(th_ctx *ctx)
{
    pthread_mutex_lock(&timer.mu);
    if (ctx->in_heap) {
        heap_remove_at(ctx->heap_index);
    }
    pthread_mutex_unlock(&timer.mu);
}

/* ---- creation and lifetime --------------------------------------------------------------- */

static void ctx_free(th_ctx *ctx)
{
    if (ctx->deadline_ns != TH_CTX_NO_DEADLINE) {
        timer_remove(ctx);
    }
    th_ctx *parent = ctx->parent;
    if (!parent->immortal) {
        pthread_mutex_lock(&parent->mu);
        if (ctx->linked) {
            if (ctx->sib_prev) {
                ctx->sib_prev->sib_next = ctx->sib_next;
            } else {
                parent->children = ctx->sib_next;
            }
            if (ctx->sib_next) {
                ctx->sib_next->sib_prev = ctx->sib_prev;
            }
            ctx->linked = false;
        }
        pthread_mutex_unlock(&parent->mu);
    }
    assert(ctx->children == NULL);
    if (ctx->fd >= 0) {
        close(ctx->fd);
    }
    pthread_cond_destroy(&ctx->fired_cond);
    pthread_mutex_destroy(&ctx->mu);
    th_free(ctx);
}

th_ctx *th_ctx_ref(th_ctx *ctx)
{
    if (!ctx->immortal) {
        atomic_fetch_add(&ctx->refs, 1);
    }
    return ctx;
}

void th_ctx_unref(th_ctx *ctx)
{
    /* Iterative: dropping the last reference of a child drops one on its parent. */
    while (ctx != NULL && !ctx->immortal) {
        unsigned before = atomic_fetch_sub(&ctx->refs, 1);
        assert(before > 0);
        if (before != 1) {
            return;
        }
        th_ctx *parent = ctx->parent;
        ctx_free(ctx);
        ctx = parent;
    }
}

static int ctx_new(th_ctx *parent, uint64_t deadline_ns, th_ctx **out)
{
    th_ctx *ctx = th_calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        return TH_ENOMEM;
    }
    if (pthread_mutex_init(&ctx->mu, NULL) != 0) {
        th_free(ctx);
        return TH_ESYS;
    }
    if (pthread_cond_init(&ctx->fired_cond, NULL) != 0) {
        pthread_mutex_destroy(&ctx->mu);
        th_free(ctx);
        return TH_ESYS;
    }
    atomic_init(&ctx->refs, 1);
    atomic_init(&ctx->err, 0);
    ctx->fd = -1;
    ctx->parent = th_ctx_ref(parent);

    uint64_t parent_deadline = parent->deadline_ns;
    bool own_timer = deadline_ns < parent_deadline;
    ctx->deadline_ns = own_timer ? deadline_ns : parent_deadline;

    if (!parent->immortal) {
        pthread_mutex_lock(&parent->mu);
        int parent_err = atomic_load(&parent->err);
        if (parent_err != 0) {
            atomic_store(&ctx->err, parent_err);
        } else {
            ctx->sib_next = parent->children;
            if (parent->children) {
                parent->children->sib_prev = ctx;
            }
            parent->children = ctx;
            ctx->linked = true;
        }
        pthread_mutex_unlock(&parent->mu);
    }

    if (own_timer && atomic_load(&ctx->err) == 0) {
        int rc = timer_add(ctx);
        if (rc != 0) {
            th_ctx_unref(ctx); /* unlinks from the parent and drops the parent's reference */
            return rc;
        }
    }
    *out = ctx;
    return 0;
}

int th_ctx_with_cancel(th_ctx *parent, th_ctx **out)
{
    return ctx_new(parent, TH_CTX_NO_DEADLINE, out);
}

int th_ctx_with_deadline(th_ctx *parent, uint64_t deadline_ns, th_ctx **out)
{
    return ctx_new(parent, deadline_ns, out);
}

int th_ctx_with_timeout(th_ctx *parent, uint64_t timeout_ns, th_ctx **out)
{
    return ctx_new(parent, th_clock_after_ns(timeout_ns), out);
}

/* ---- cancellation ------------------------------------------------------------------------ */

/* Marks one context done with err. Called with ctx->mu held. If it has hooks, it is pushed on
 * *fire with a reference; its live children are unlinked and pushed on *walk, each with a
 * reference (a child whose count already dropped to zero is being freed and is skipped: it has
 * no children left, since children hold references on their parent). */
static void mark_done_locked(th_ctx *ctx, int err, th_ctx **fire, th_ctx **walk)
{
    if (atomic_load(&ctx->err) != 0) {
        return;
    }
    atomic_store_explicit(&ctx->err, err, memory_order_release);
    if (ctx->fd >= 0) {
        uint64_t one = 1;
        ssize_t n = write(ctx->fd, &one, sizeof(one));
        (void)n; /* an eventfd counter cannot overflow from one write per context */
    }
    if (ctx->hooks != NULL) {
        for (th_ctx_hook *hook = ctx->hooks; hook != NULL; hook = hook->next) {
            hook->prev = hook; /* marks "taken for firing" for th_ctx_after_func_stop() */
        }
        ctx->firing_hooks = ctx->hooks;
        ctx->hooks = NULL;
        ctx->firing = true;
        atomic_fetch_add(&ctx->refs, 1);
        ctx->fire_next = *fire;
        *fire = ctx;
    }
    th_ctx *child = ctx->children;
    ctx->children = NULL;
    while (child != NULL) {
        th_ctx *next = child->sib_next;
        child->linked = false; /* under ctx->mu, which guards the sibling links */
        child->sib_prev = child->sib_next = NULL;
        if (try_ref(child)) {
            child->walk_next = *walk;
            *walk = child;
        }
        child = next;
    }
}

/* Serialises cancellation walks. A walk is short (usually one context), and holding this for
 * it gives the guarantee callers rely on: when th_ctx_cancel(x) returns, on any thread, x and
 * every descendant of x are done, even if another thread was in the middle of canceling x or
 * one of its ancestors (that walk finishes first). Hooks run after it is released. */
static pthread_mutex_t walk_mu = PTHREAD_MUTEX_INITIALIZER;

/* Cancels ctx and its subtree. The walk is iterative (a chain thousands deep costs no stack)
 * and holds one context lock at a time, under walk_mu: lock order walk_mu, then a context. */
static void cancel_tree(th_ctx *ctx, int err)
{
    if (ctx->immortal) {
        return;
    }
    th_ctx *fire = NULL, *walk = NULL, *walked = NULL;
    pthread_mutex_lock(&walk_mu);
    pthread_mutex_lock(&ctx->mu);
    mark_done_locked(ctx, err, &fire, &walk);
    pthread_mutex_unlock(&ctx->mu);
    while (walk != NULL) {
        th_ctx *c = walk;
        walk = c->walk_next;
        pthread_mutex_lock(&c->mu);
        mark_done_locked(c, err, &fire, &walk);
        pthread_mutex_unlock(&c->mu);
        c->walk_next = walked; /* its reference is dropped once walk_mu is released */
        walked = c;
    }
    pthread_mutex_unlock(&walk_mu);

    while (walked != NULL) {
        th_ctx *c = walked;
        walked = c->walk_next;
        th_ctx_unref(c);
    }
    while (fire != NULL) {
        th_ctx *c = fire;
        fire = c->fire_next;
        th_ctx_hook *hook = c->firing_hooks;
        while (hook != NULL) {
            th_ctx_hook *next = hook->next;
            hook->fn(hook->arg);
            hook = next;
        }
        pthread_mutex_lock(&c->mu);
        c->firing_hooks = NULL;
        c->firing = false;
        pthread_cond_broadcast(&c->fired_cond);
        pthread_mutex_unlock(&c->mu);
        th_ctx_unref(c);
    }
}

void th_ctx_cancel(th_ctx *ctx)
{
    cancel_tree(ctx, TH_ECANCELED);
}

void th_ctx_release(th_ctx *ctx)
{
    if (ctx == NULL || ctx->immortal) {
        return;
    }
    cancel_tree(ctx, TH_ECANCELED);
    th_ctx_unref(ctx);
}

int th_ctx_err(const th_ctx *ctx)
{
    return atomic_load_explicit(&ctx->err, memory_order_acquire);
}

bool th_ctx_done(const th_ctx *ctx)
{
    return th_ctx_err(ctx) != 0;
}

uint64_t th_ctx_deadline(const th_ctx *ctx)
{
    return ctx->deadline_ns;
}

uint64_t th_ctx_remaining_ns(const th_ctx *ctx)
{
    if (ctx->deadline_ns == TH_CTX_NO_DEADLINE) {
        return TH_CTX_NO_DEADLINE;
    }
    uint64_t now = th_clock_now_ns();
    return ctx->deadline_ns > now ? ctx->deadline_ns - now : 0;
}

int th_ctx_fd(th_ctx *ctx, int *fd_out)
{
    if (ctx->immortal) {
        return TH_EINVAL;
    }
    int rc = 0;
    pthread_mutex_lock(&ctx->mu);
    if (ctx->fd < 0) {
        int fd = th__fault_should_fail() ? -1 : eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (fd < 0) {
            rc = TH_ESYS;
        } else {
            ctx->fd = fd;
            if (atomic_load(&ctx->err) != 0) {
                uint64_t one = 1;
                ssize_t n = write(fd, &one, sizeof(one));
                (void)n;
            }
        }
    }
    if (rc == 0) {
        *fd_out = ctx->fd;
    }
    pthread_mutex_unlock(&ctx->mu);
    return rc;
}

/* ---- hooks ------------------------------------------------------------------------------- */

int th_ctx_after_func(th_ctx *ctx, th_ctx_hook *hook, void (*fn)(void *arg), void *arg)
{
    hook->fn = fn;
    hook->arg = arg;
    hook->ctx = ctx;
    hook->prev = NULL;
    hook->next = NULL;
    if (ctx->immortal) {
        return 0; /* never fires; stop finds nothing to undo */
    }
    pthread_mutex_lock(&ctx->mu);
    int err = atomic_load(&ctx->err);
    if (err == 0) {
        hook->next = ctx->hooks;
        if (ctx->hooks) {
            ctx->hooks->prev = hook;
        }
        ctx->hooks = hook;
    }
    pthread_mutex_unlock(&ctx->mu);
    return err;
}

bool th_ctx_after_func_stop(th_ctx_hook *hook)
{
    th_ctx *ctx = hook->ctx;
    if (ctx->immortal) {
        return true;
    }
    bool stopped;
    pthread_mutex_lock(&ctx->mu);
    if (hook->prev != hook) {
        /* Still pending: unlink it. */
        if (hook->prev) {
            hook->prev->next = hook->next;
        } else {
            ctx->hooks = hook->next;
        }
        if (hook->next) {
            hook->next->prev = hook->prev;
        }
        stopped = true;
    } else {
        /* Taken by a canceler: wait until every hook of this context has run. */
        while (ctx->firing) {
            pthread_cond_wait(&ctx->fired_cond, &ctx->mu);
        }
        stopped = false;
    }
    pthread_mutex_unlock(&ctx->mu);
    return stopped;
}

/* ---- waiting ----------------------------------------------------------------------------- */

static void waiter_wake(void *arg)
{
    th__waiter *waiter = arg;
    pthread_mutex_lock(waiter->mu);
    pthread_cond_broadcast(waiter->cond);
    pthread_mutex_unlock(waiter->mu);
}

void th__waiter_init(th__waiter *waiter, pthread_mutex_t *mu, pthread_cond_t *cond)
{
    waiter->mu = mu;
    waiter->cond = cond;
    waiter->armed = false;
}

int th__waiter_wait(th__waiter *waiter, th_ctx *ctx, uint64_t deadline_ns)
{
    if (!waiter->armed) {
        int err = th_ctx_after_func(ctx, &waiter->hook, waiter_wake, waiter);
        if (err != 0) {
            return err;
        }
        waiter->armed = true;
    }
    int err = th_ctx_err(ctx);
    if (err != 0) {
        return err;
    }
    if (deadline_ns == TH_CTX_NO_DEADLINE) {
        pthread_cond_wait(waiter->cond, waiter->mu);
    } else {
        th__cond_wait_until(waiter->cond, waiter->mu, deadline_ns);
    }
    return 0;
}

void th__waiter_finish(th__waiter *waiter)
{
    if (waiter->armed) {
        (void)th_ctx_after_func_stop(&waiter->hook);
        waiter->armed = false;
    }
}

int th_ctx_sleep(th_ctx *ctx, uint64_t ns)
{
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cond;
    if (th__cond_init_monotonic(&cond) != 0) {
        return TH_ESYS;
    }
    uint64_t deadline_ns = th_clock_after_ns(ns);
    th__waiter waiter;
    th__waiter_init(&waiter, &mu, &cond);
    int err = 0;
    pthread_mutex_lock(&mu);
    while (th_clock_now_ns() < deadline_ns &&
           (err = th__waiter_wait(&waiter, ctx, deadline_ns)) == 0) {
    }
    pthread_mutex_unlock(&mu);
    th__waiter_finish(&waiter);
    pthread_cond_destroy(&cond);
    pthread_mutex_destroy(&mu);
    return err;
}
