/* Webhook delivery (notify.c), shared with the workers (analysis.c). */
#ifndef TRIALHUB_TRIAL_NOTIFY_INT_H
#define TRIALHUB_TRIAL_NOTIFY_INT_H

#include <stdbool.h>
#include <stddef.h>

#include "trialhub/ctx.h"
#include "trialhub/queue.h"
#include "trialhub/store.h"

/* Delivers the webhook task t (payload {"task","trial","url","state"}): reads the analysis it
 * is about, signs the body with the trial's secret, checks that the URL's host does not resolve
 * to a loopback, private or link-local address (unless allow_private) and pins that address,
 * and POSTs it. Returns 0 on a 2xx answer; otherwise an error with a reason (no secrets, no
 * patient data) and *retryable (timeouts, 408, 429, 5xx, transport errors) set. */
int th__notify_deliver(th_ctx *ctx, th_queue *queue, th_store *store, const th_task *t,
                       bool allow_private, unsigned timeout_ms, char *reason, size_t len,
                       bool *retryable);

/* HMAC-SHA256 of "<t>.<body>" with secret, as the X-Trialhub-Signature value
 * "t=<t>,v1=<hex>" into out (at least 96 bytes). */
void th__notify_sign(const char *secret, long long t, const char *body, size_t body_len, char *out,
                     size_t len);

#endif
