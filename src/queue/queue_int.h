/* The queue's backend vtable: each backend (sql.c, later amqp.c) fills one of these, and queue.c
 * validates every call, fills in ids, clocks and backoffs, and dispatches through it. */
#ifndef TRIALHUB_QUEUE_INT_H
#define TRIALHUB_QUEUE_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include "trialhub/queue.h"

/* A validated spec, as backends receive it: every field set, the id generated, times resolved. */
typedef struct th__task_new {
    char id[TH_TASK_ID_SIZE];
    const char *kind;
    const char *scope;           /* "" when none */
    const char *idempotency_key; /* NULL when none */
    const char *payload;
    size_t payload_len;
    int priority;
    int max_attempts;
    int64_t run_at_ms;
    int64_t now_ms;
} th__task_new;

/* Backend calls get validated arguments and the time from queue.c. Each returns what the public
 * call documents; enqueue and enqueue_in return TH_EEXIST when the generated id is taken (then
 * queue.c draws another). */
typedef struct th_queue_ops {
    const char *name;
    void (*close)(th_queue *queue);
    int (*enqueue)(th_ctx *ctx, th_queue *queue, const th__task_new *task, char *id_out,
                   bool *existed);
    int (*enqueue_in)(th_queue *queue, th_store *store, const th__task_new *task, char *id_out,
                      bool *existed);
    int (*lease)(th_ctx *ctx, th_queue *queue, const th_task_kind *kinds, size_t nkinds,
                 const char *owner, int64_t now_ms, int64_t lease_ms, th_task *out);
    int (*heartbeat)(th_ctx *ctx, th_queue *queue, const char *id, const char *owner, int attempt,
                     int64_t now_ms, int64_t lease_ms);
    int (*finish)(th_ctx *ctx, th_queue *queue, const char *id, const char *owner, int attempt,
                  const char *result, int64_t now_ms);
    int (*fail)(th_ctx *ctx, th_queue *queue, const char *id, const char *owner, int attempt,
                const char *error, bool retryable, int64_t now_ms, int64_t backoff_ms);
    int (*cancel)(th_ctx *ctx, th_queue *queue, const char *id, int64_t now_ms);
    int (*get)(th_ctx *ctx, th_queue *queue, const char *id, th_task *out);
    int (*counts)(th_ctx *ctx, th_queue *queue, int64_t counts[TH_TASK_NSTATES]);
} th_queue_ops;

/* Every backend's queue struct starts with this header. `wake_mu` guards nothing but the
 * condition variable's sleep: wake_gen is atomic so that lease can read it without the lock. */
struct th_queue {
    const th_queue_ops *ops;
    th_queue_config config; /* defaults filled in */
    pthread_mutex_t wake_mu;
    pthread_cond_t wake_cond;
    _Atomic uint64_t wake_gen; /* bumped by every notify */
    uint64_t serial;           /* unique in the process, unlike the address of a closed queue */
};

/* Fills the header: config with defaults (config may be NULL). Returns 0, TH_EINVAL or
 * TH_ESYS; on error nothing needs undoing. */
int th__queue_init(th_queue *queue, const th_queue_ops *ops, const th_queue_config *config);

/* Undoes th__queue_init(). */
void th__queue_deinit(th_queue *queue);

/* The current time in Unix ms by the queue's clock. */
int64_t th__queue_now_ms(const th_queue *queue);

/* The delay before retry `attempt` (1 for the first failure): uniform in
 * [0, min(cap, base * 2^(attempt-1))]. */
int64_t th__queue_backoff_ms(const th_queue *queue, int attempt);

/* Returns th_task_state for a state name, or -1. */
int th__task_state_parse(const char *name);

/* Backend constructors: path is the URL with the scheme removed. */
int th__queue_sql_open(const char *url, const char *path, const th_queue_config *config,
                       th_queue **out, char *errbuf, size_t errlen);

/* Tests: writes EXPLAIN QUERY PLAN of the SQL queue's lease statements into buf, one line per
 * plan step. Returns 0, TH_EINVAL (not the SQL backend) or TH_EIO. */
int th__queue_sql_explain(th_queue *queue, char *buf, size_t len);

#endif
