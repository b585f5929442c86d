/* Bounded channel: a ring of pointers under one mutex, with two condition variables. Signals
 * are sent only when someone waits (the waiter counts are under the mutex), so a busy channel
 * costs one uncontended lock per operation.
 *
 * Locking: `mu` protects everything in the struct; lock order is channel mu, then a context's
 * mu (th__waiter). */
#include "trialhub/chan.h"

#include <pthread.h>
#include <stdbool.h>

#include "core/core_int.h"
#include "trialhub/alloc.h"

struct th_chan {
    pthread_mutex_t mu;
    pthread_cond_t not_empty;
    pthread_cond_t not_full;
    void **items;
    size_t cap;
    size_t head; /* next to receive */
    size_t len;
    unsigned recv_waiters;
    unsigned send_waiters;
    bool closed;
};

int th_chan_create(size_t capacity, th_chan **out)
{
    if (capacity == 0) {
        return TH_EINVAL;
    }
    th_chan *ch = th_calloc(1, sizeof(*ch));
    if (ch == NULL) {
        return TH_ENOMEM;
    }
    ch->items = th_calloc(capacity, sizeof(void *));
    if (ch->items == NULL) {
        th_free(ch);
        return TH_ENOMEM;
    }
    ch->cap = capacity;
    pthread_mutex_init(&ch->mu, NULL);
    pthread_cond_init(&ch->not_empty, NULL);
    pthread_cond_init(&ch->not_full, NULL);
    *out = ch;
    return 0;
}

void th_chan_destroy(th_chan *ch)
{
    if (ch == NULL) {
        return;
    }
    pthread_cond_destroy(&ch->not_full);
    pthread_cond_destroy(&ch->not_empty);
    pthread_mutex_destroy(&ch->mu);
    th_free(ch->items);
    th_free(ch);
}

/* Both called with mu held, when the operation can proceed. */
static void push_locked(th_chan *ch, void *item)
{
    size_t tail = ch->head + ch->len;
    if (tail >= ch->cap) {
        tail -= ch->cap;
    }
    ch->items[tail] = item;
    ch->len++;
    if (ch->recv_waiters) {
        pthread_cond_signal(&ch->not_empty);
    }
}

static void *pop_locked(th_chan *ch)
{
    void *item = ch->items[ch->head];
    ch->head = ch->head + 1 == ch->cap ? 0 : ch->head + 1;
    ch->len--;
    if (ch->send_waiters) {
        pthread_cond_signal(&ch->not_full);
    }
    return item;
}

int th_chan_send(th_ctx *ctx, th_chan *ch, void *item)
{
    th__waiter waiter;
    th__waiter_init(&waiter, &ch->mu, &ch->not_full);
    int rc = 0;
    pthread_mutex_lock(&ch->mu);
    ch->send_waiters++;
    for (;;) {
        if (ch->closed) {
            rc = TH_ECLOSED;
            break;
        }
        if (ch->len < ch->cap) {
            push_locked(ch, item);
            break;
        }
        rc = th__waiter_wait(&waiter, ctx, TH_CTX_NO_DEADLINE);
        if (rc != 0) {
            break;
        }
    }
    ch->send_waiters--;
    pthread_mutex_unlock(&ch->mu);
    th__waiter_finish(&waiter);
    return rc;
}

int th_chan_try_send(th_chan *ch, void *item)
{
    int rc = 0;
    pthread_mutex_lock(&ch->mu);
    if (ch->closed) {
        rc = TH_ECLOSED;
    } else if (ch->len == ch->cap) {
        rc = TH_EOVERLOAD;
    } else {
        push_locked(ch, item);
    }
    pthread_mutex_unlock(&ch->mu);
    return rc;
}

int th_chan_recv(th_ctx *ctx, th_chan *ch, void **item)
{
    th__waiter waiter;
    th__waiter_init(&waiter, &ch->mu, &ch->not_empty);
    int rc = 0;
    pthread_mutex_lock(&ch->mu);
    ch->recv_waiters++;
    for (;;) {
        if (ch->len > 0) {
            *item = pop_locked(ch);
            break;
        }
        if (ch->closed) {
            rc = TH_ECLOSED;
            break;
        }
        rc = th__waiter_wait(&waiter, ctx, TH_CTX_NO_DEADLINE);
        if (rc != 0) {
            break;
        }
    }
    ch->recv_waiters--;
    pthread_mutex_unlock(&ch->mu);
    th__waiter_finish(&waiter);
    return rc;
}

int th_chan_try_recv(th_chan *ch, void **item)
{
    int rc = 0;
    pthread_mutex_lock(&ch->mu);
    if (ch->len > 0) {
        *item = pop_locked(ch);
    } else {
        rc = ch->closed ? TH_ECLOSED : TH_EAGAIN;
    }
    pthread_mutex_unlock(&ch->mu);
    return rc;
}

int th_chan_close(th_chan *ch)
{
    int rc = 0;
    pthread_mutex_lock(&ch->mu);
    if (ch->closed) {
        rc = TH_ECLOSED;
    } else {
        ch->closed = true;
        pthread_cond_broadcast(&ch->not_empty);
        pthread_cond_broadcast(&ch->not_full);
    }
    pthread_mutex_unlock(&ch->mu);
    return rc;
}

size_t th_chan_len(th_chan *ch)
{
    pthread_mutex_lock(&ch->mu);
    size_t len = ch->len;
    pthread_mutex_unlock(&ch->mu);
    return len;
}

size_t th_chan_cap(const th_chan *ch)
{
    return ch->cap;
}
