/* The durable task queue (DESIGN.md rule 5, "shave peaks with a queue"): slow work (image
 * analysis, webhooks) becomes a task that workers, in this process or in others, lease, keep
 * alive with heartbeats, and finish or fail. Tasks run at least once (a worker that dies leaves a
 * lease that expires, and another worker redoes the task); their result is written exactly once
 * (only the current lease holder can write it). One interface with one backend per broker,
 * chosen by URL like the store: the embedded SQL queue in the store's SQLite file now, RabbitMQ
 * at scale-out. Design notes: docs/internals/queue.md. */
#ifndef TRIALHUB_QUEUE_H
#define TRIALHUB_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"
#include "trialhub/metrics.h"
#include "trialhub/store.h"

typedef struct th_queue th_queue;

#define TH_TASK_ID_SIZE     18          /* "t" + 16 hex digits + NUL */
#define TH_TASK_KIND_MAX    32          /* [a-z0-9_.-], e.g. "analysis", "webhook" */
#define TH_TASK_OWNER_MAX   64          /* a worker's name, e.g. "host:pid:thread" */
#define TH_TASK_SCOPE_MAX   64          /* the idempotency key's namespace, e.g. a trial id */
#define TH_TASK_KEY_MAX     255         /* idempotency key */
#define TH_TASK_PAYLOAD_MAX (64 * 1024) /* bytes of JSON text */
#define TH_TASK_RESULT_MAX  (64 * 1024) /* bytes of JSON text */
#define TH_TASK_ERROR_MAX   1024        /* last_error is cut to this many bytes */

/* A task's life: queued -> running -> succeeded; running -> failed (retried after a backoff)
 * -> running ...; running -> dead (not retryable, or out of attempts); queued, failed or running
 * -> canceled. A running task whose lease expired is leased again (its worker died). */
typedef enum th_task_state {
    TH_TASK_QUEUED,
    TH_TASK_RUNNING,
    TH_TASK_SUCCEEDED,
    TH_TASK_FAILED,
    TH_TASK_DEAD,
    TH_TASK_CANCELED,
} th_task_state;

#define TH_TASK_NSTATES 6

/* Returns "queued", "running", "succeeded", "failed", "dead", "canceled", or "unknown". */
const char *th_task_state_name(th_task_state state);

/* What to enqueue. Strings are the caller's and are copied. */
typedef struct th_task_spec {
    const char *kind;            /* required: 1..TH_TASK_KIND_MAX of [a-z0-9_.-] */
    const char *payload;         /* JSON text, at most TH_TASK_PAYLOAD_MAX bytes; NULL: "{}" */
    int priority;                /* higher is leased first */
    unsigned max_attempts;       /* leases before the task is dead; 0: the queue's default */
    uint32_t delay_ms;           /* not leased before now + delay_ms */
    const char *idempotency_key; /* NULL: none. The same kind, scope and key give the same task */
    const char *scope;           /* the key's namespace (e.g. the trial id); NULL: "" */
} th_task_spec;

/* A kind a worker takes, with the most tasks of that kind that may run at once across every
 * worker of every process (0: no limit). */
typedef struct th_task_kind {
    const char *kind;
    unsigned max_running;
} th_task_kind;

/* A task as read back (th_queue_get) or leased (th_queue_lease). The three strings are owned by
 * the struct: free them with th_task_free(). */
typedef struct th_task {
    char id[TH_TASK_ID_SIZE];
    char kind[TH_TASK_KIND_MAX + 1];
    char scope[TH_TASK_SCOPE_MAX + 1];
    th_task_state state;
    int priority;
    int attempts; /* leases so far; for a leased task, its attempt number (heartbeat, finish) */
    int max_attempts;
    int64_t run_at_ms;        /* queued or failed: not leased before this time; else 0 */
    int64_t lease_expires_ms; /* running: the lease's end; else 0 */
    char lease_owner[TH_TASK_OWNER_MAX + 1]; /* the last lease's owner; "" if never leased */
    int64_t created_ms;
    int64_t updated_ms;
    char *payload;    /* JSON text */
    char *result;     /* JSON text once succeeded; else NULL */
    char *last_error; /* the last fail()'s error, or why it died; NULL if none */
} th_task;

/* Frees the strings of task and sets them to NULL. NULL is a no-op. */
void th_task_free(th_task *task);

/* Times are Unix milliseconds, shared by every process on the machine. Zero fields take the
 * defaults in brackets. */
typedef struct th_queue_config {
    unsigned default_max_attempts; /* [5] */
    uint32_t backoff_base_ms;      /* [2000] retry n waits uniform(0, min(cap, base * 2^(n-1))) */
    uint32_t backoff_cap_ms;       /* [3600000] */
    uint32_t poll_interval_ms;     /* [200] th_queue_wait() looks again for other processes' work */
    uint32_t busy_timeout_ms;      /* [5000] how long a call waits for the database lock */
    /* Tests: the clock in Unix ms (NULL: CLOCK_REALTIME). Must be safe to call from any
     * thread. */
    int64_t (*now_ms)(void *arg);
    void *now_arg;
} th_queue_config;

/* Opens the queue at url. `sqlite:///abs/path.db` or `sqlite://./rel/path.db` (the store's
 * TRIALHUB_DATABASE_URL) gives the embedded queue: its tasks table lives in that SQLite file
 * (created by the store's migrations, which this applies if needed) and it opens connections of
 * its own, so any number of processes may open the same file. `amqp://` is reserved for
 * RabbitMQ. config may be NULL (defaults). *out is owned by the caller (th_queue_close()).
 * Returns 0, TH_EINVAL (bad URL or config), TH_EUNSUPPORTED (a known backend not built in),
 * TH_EIO (cannot open, migrate or verify the database; errbuf says why), TH_ESYS or TH_ENOMEM.
 * Thread-safe with respect to other queues. */
TH_MUST_CHECK int th_queue_open(const char *url, const th_queue_config *config, th_queue **out,
                                char *errbuf, size_t errlen);

/* Closes the queue. NULL is a no-op. No other call on it may be running. */
void th_queue_close(th_queue *queue);

/* Returns "sql" or "amqp". */
const char *th_queue_backend(const th_queue *queue);

/* Enqueues a task in a short transaction of its own and wakes this process's waiters. Writes
 * the task's id to id_out and sets *existed: true when the idempotency key named a task that
 * already exists (its id is returned; nothing is written). Returns 0, TH_EINVAL (bad spec),
 * TH_ETOOBIG (payload over TH_TASK_PAYLOAD_MAX), TH_ECONFLICT (the key exists with a different
 * payload), TH_EAGAIN (the database stayed locked busy_timeout_ms), th_ctx_err(ctx), TH_EIO,
 * TH_ESYS or TH_ENOMEM; on error id_out and *existed are untouched. Thread-safe. */
TH_MUST_CHECK int th_queue_enqueue(th_ctx *ctx, th_queue *queue, const th_task_spec *spec,
                                   char id_out[TH_TASK_ID_SIZE], bool *existed);

/* Like th_queue_enqueue(), but inside the transaction of a group-commit writer job: call it from
 * a th_write_job's apply() (writer.h) with the store it was given, so the task commits or rolls
 * back with the rows written beside it (an analysis and its task). store must be the database
 * the queue was opened on. Waiters are not woken (the task is not visible before the commit):
 * call th_queue_notify() from the job's done() when it succeeded. Returns what
 * th_queue_enqueue() returns, never TH_EAGAIN (the writer holds the lock), and TH_EINVAL when
 * store is another database or not inside a transaction, TH_EUNSUPPORTED when this backend
 * cannot write through that store; TH_EIO must abort the batch, as writer.h says. Writer thread
 * only. */
TH_MUST_CHECK int th_queue_enqueue_in(th_queue *queue, th_store *store, const th_task_spec *spec,
                                      char id_out[TH_TASK_ID_SIZE], bool *existed);

/* Wakes every th_queue_wait() of this queue in this process. Thread-safe; never blocks long. */
void th_queue_notify(th_queue *queue);

/* Leases the runnable task of the highest priority (then the longest due) among kinds: a queued
 * task, a failed one whose backoff is over, or a running one whose lease expired (its worker is
 * gone). Kinds whose max_running leases are live are skipped. The task becomes running under
 * owner until now + lease_ms, its attempts go up by one, and *out receives it (free with
 * th_task_free()); keep out->id, owner and out->attempts for heartbeat, finish and fail. A
 * running task found expired on its last attempt becomes dead instead ("lease expired"). One
 * short write transaction: any number of threads and processes may lease at once, and each task
 * goes to one of them. Returns 0, TH_EAGAIN (nothing runnable now, or the database stayed
 * locked: th_queue_wait() and try again), TH_EINVAL, th_ctx_err(ctx), TH_EIO or TH_ENOMEM; on
 * error *out is untouched. Thread-safe. */
TH_MUST_CHECK int th_queue_lease(th_ctx *ctx, th_queue *queue, const th_task_kind *kinds,
                                 size_t nkinds, const char *owner, uint32_t lease_ms, th_task *out);

/* Waits until work may be there: until th_queue_notify() (every enqueue, finish, fail and
 * cancel of this queue in this process calls it), or for the poll interval (other processes'
 * work is seen by looking again: poll_interval_ms, 200 by default), or timeout_ms, whichever
 * comes first. A notify that lands between this thread's last th_queue_lease() on queue and
 * this call is not missed. Returns 0 (lease again) or th_ctx_err(ctx). Thread-safe. */
TH_MUST_CHECK int th_queue_wait(th_ctx *ctx, th_queue *queue, uint32_t timeout_ms);

/* Extends the lease of task id to now + lease_ms, if owner still holds it under attempt.
 * Returns 0, TH_ECANCELED (the task was canceled: stop working on it), TH_ECONFLICT (the lease
 * was lost: it expired and the task was leased again, or it was finished), TH_ENOTFOUND,
 * TH_EINVAL, TH_EAGAIN (locked: try again), th_ctx_err(ctx) or TH_EIO. Thread-safe. */
TH_MUST_CHECK int th_queue_heartbeat(th_ctx *ctx, th_queue *queue, const char *id,
                                     const char *owner, int attempt, uint32_t lease_ms);

/* Marks task id succeeded with result (JSON text, at most TH_TASK_RESULT_MAX bytes; NULL:
 * "null"), only if it is still running under owner and attempt: a worker whose lease expired
 * and was taken by another cannot overwrite, so the result is written once. Returns 0,
 * TH_ECONFLICT (lease lost, or already finished), TH_ECANCELED, TH_ENOTFOUND, TH_EINVAL (bad
 * JSON), TH_ETOOBIG, TH_EAGAIN, th_ctx_err(ctx), TH_EIO or TH_ENOMEM. Thread-safe. */
TH_MUST_CHECK int th_queue_finish(th_ctx *ctx, th_queue *queue, const char *id, const char *owner,
                                  int attempt, const char *result);

/* Records a failed attempt of task id held by owner under attempt: with retryable and attempts
 * left it becomes failed and runnable again after the backoff (uniform random in
 * [0, min(backoff_cap_ms, backoff_base_ms * 2^(attempt-1))], "full jitter"), else dead. error
 * (cut to TH_TASK_ERROR_MAX bytes; it must never hold patient data) becomes last_error. Returns
 * what th_queue_heartbeat() returns. Thread-safe. */
TH_MUST_CHECK int th_queue_fail(th_ctx *ctx, th_queue *queue, const char *id, const char *owner,
                                int attempt, const char *error, bool retryable);

/* Cancels task id: a queued or failed task is never leased again; a running one becomes
 * canceled at once and its worker learns it from its next heartbeat, finish or fail
 * (TH_ECANCELED). Canceling a canceled task is a no-op. Returns 0, TH_ENOTFOUND, TH_ECONFLICT
 * (it already succeeded or is dead), TH_EAGAIN, th_ctx_err(ctx) or TH_EIO. Thread-safe. */
TH_MUST_CHECK int th_queue_cancel(th_ctx *ctx, th_queue *queue, const char *id);

/* Reads task id into *out (free with th_task_free()). Returns 0, TH_ENOTFOUND, TH_EAGAIN,
 * th_ctx_err(ctx), TH_EIO or TH_ENOMEM; on error *out is untouched. Thread-safe. */
TH_MUST_CHECK int th_queue_get(th_ctx *ctx, th_queue *queue, const char *id, th_task *out);

/* Counts every task by state, indexed by th_task_state (metrics, tests). Returns 0, TH_EAGAIN,
 * th_ctx_err(ctx) or TH_EIO. Thread-safe. */
TH_MUST_CHECK int th_queue_counts(th_ctx *ctx, th_queue *queue, int64_t counts[TH_TASK_NSTATES]);

/* Registers the gauge trialhub_queue_tasks{state="..."} with metrics, read with
 * th_queue_counts() at each scrape. queue must outlive metrics' last render. Returns 0,
 * TH_EINVAL or TH_ENOMEM. */
TH_MUST_CHECK int th_queue_register_metrics(th_queue *queue, th_metrics *metrics);

#endif
