/* Bounded multi-producer multi-consumer channel of pointers (DESIGN.md rule 3: a pipe, not a
 * warehouse). One owner closes it when the producers are done; receivers drain what is left and
 * then see TH_ECLOSED. Misuse (send after close, second close) is an error code, never a crash.
 * Fan-out/fan-in is the standard shape: N producers, a th_wg, one closer, one consumer. */
#ifndef TRIALHUB_CHAN_H
#define TRIALHUB_CHAN_H

#include <stddef.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"

typedef struct th_chan th_chan;

/* Creates a channel that holds up to capacity items (>= 1). *out is owned by the caller and
 * ended with th_chan_destroy(). Returns 0, TH_EINVAL or TH_ENOMEM (*out untouched). */
TH_MUST_CHECK int th_chan_create(size_t capacity, th_chan **out);

/* Sends item, waiting for room. Returns 0 (the item now belongs to the receiver), TH_ECLOSED if
 * the channel is or becomes closed while waiting, or th_ctx_err(ctx) when ctx ends first; on
 * error the item stays the caller's. Thread-safe. */
TH_MUST_CHECK int th_chan_send(th_ctx *ctx, th_chan *ch, void *item);

/* Sends without waiting. Returns 0, TH_EOVERLOAD when full, or TH_ECLOSED. Thread-safe. */
TH_MUST_CHECK int th_chan_try_send(th_chan *ch, void *item);

/* Receives the oldest item into *item, waiting for one. Returns 0, TH_ECLOSED once the channel
 * is closed and empty, or th_ctx_err(ctx); on error *item is untouched. Thread-safe. */
TH_MUST_CHECK int th_chan_recv(th_ctx *ctx, th_chan *ch, void **item);

/* Receives without waiting. Returns 0, TH_EAGAIN when empty but open, or TH_ECLOSED when closed
 * and empty. Thread-safe. */
TH_MUST_CHECK int th_chan_try_recv(th_chan *ch, void **item);

/* Closes the channel: blocked senders get TH_ECLOSED, blocked receivers drain what is left and
 * then get TH_ECLOSED. Returns 0, or TH_ECLOSED if it was already closed. Thread-safe. */
int th_chan_close(th_chan *ch);

/* Returns the number of items buffered right now (a snapshot). Thread-safe. */
size_t th_chan_len(th_chan *ch);

/* Returns the capacity given at creation. */
size_t th_chan_cap(const th_chan *ch);

/* Frees the channel. Items still buffered are not freed (drain first if they own memory). No
 * thread may be blocked in or about to call a function on ch. NULL is a no-op. */
void th_chan_destroy(th_chan *ch);

#endif
