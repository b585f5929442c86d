/* Queue front end: picks the backend from the URL, checks every argument once for all backends
 * (kinds, owners, JSON payloads and results, sizes), draws task ids and retry delays, keeps the
 * in-process wake-up, and dispatches through the backend's vtable.
 *
 * Locking: each queue's `wake_mu` guards only the sleep on `wake_cond`; `wake_gen` is atomic.
 * No other lock is taken while it is held except the context's (th__waiter). */
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#include "core/core_int.h"
#include "queue/queue_int.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"

#define DEFAULT_MAX_ATTEMPTS 5
#define DEFAULT_BACKOFF_BASE 2000
#define DEFAULT_BACKOFF_CAP  3600000
#define DEFAULT_POLL_MS      200
#define DEFAULT_BUSY_MS      5000
#define MAX_LEASE_MS         (24 * 3600 * 1000u)
#define MAX_ATTEMPTS_LIMIT   1000
#define ID_DRAWS             4 /* ids drawn before giving up on a collision (2^-64 each) */

static const char *const state_names[TH_TASK_NSTATES] = {
    [TH_TASK_QUEUED] = "queued", [TH_TASK_RUNNING] = "running", [TH_TASK_SUCCEEDED] = "succeeded",
    [TH_TASK_FAILED] = "failed", [TH_TASK_DEAD] = "dead",       [TH_TASK_CANCELED] = "canceled",
};

/* The generation this thread saw before its last lease, so that th_queue_wait() does not sleep
 * through a notify that came in between. One slot: a worker thread leases from one queue. */
static _Thread_local struct {
    uint64_t serial; /* of the queue; 0: none yet */
    uint64_t gen;
} last_lease;

static _Atomic uint64_t queue_serials;

const char *th_task_state_name(th_task_state state)
{
    if ((unsigned)state < TH_TASK_NSTATES) {
        return state_names[state];
    }
    return "unknown";
}

int th__task_state_parse(const char *name)
{
    for (int i = 0; i < TH_TASK_NSTATES; i++) {
        if (strcmp(name, state_names[i]) == 0) {
            return i;
        }
    }
    return -1;
}

void th_task_free(th_task *task)
{
    if (task == NULL) {
        return;
    }
    th_free(task->payload);
    th_free(task->result);
    th_free(task->last_error);
    task->payload = NULL;
    task->result = NULL;
    task->last_error = NULL;
}

/* ---- the common header --------------------------------------------------------------------- */

static int64_t wall_now_ms(void *arg)
{
    (void)arg;
    return (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);
}

int th__queue_init(th_queue *q, const th_queue_ops *ops, const th_queue_config *config)
{
    th_queue_config c = {0};
    if (config != NULL) {
        c = *config;
    }
    if (c.default_max_attempts > MAX_ATTEMPTS_LIMIT ||
        (c.backoff_cap_ms != 0 && c.backoff_cap_ms < c.backoff_base_ms)) {
        return TH_EINVAL;
    }
    c.default_max_attempts = c.default_max_attempts ? c.default_max_attempts : DEFAULT_MAX_ATTEMPTS;
    c.backoff_base_ms = c.backoff_base_ms ? c.backoff_base_ms : DEFAULT_BACKOFF_BASE;
    c.backoff_cap_ms = c.backoff_cap_ms ? c.backoff_cap_ms : DEFAULT_BACKOFF_CAP;
    if (c.backoff_cap_ms < c.backoff_base_ms) {
        return TH_EINVAL; /* a base set above the default cap */
    }
    c.poll_interval_ms = c.poll_interval_ms ? c.poll_interval_ms : DEFAULT_POLL_MS;
    c.busy_timeout_ms = c.busy_timeout_ms ? c.busy_timeout_ms : DEFAULT_BUSY_MS;
    if (c.now_ms == NULL) {
        c.now_ms = wall_now_ms;
        c.now_arg = NULL;
    }
    if (th__cond_init_monotonic(&q->wake_cond) != 0) {
        return TH_ESYS;
    }
    pthread_mutex_init(&q->wake_mu, NULL);
    q->ops = ops;
    q->config = c;
    atomic_init(&q->wake_gen, 0);
    q->serial = atomic_fetch_add(&queue_serials, 1) + 1;
    return 0;
}

void th__queue_deinit(th_queue *q)
{
    pthread_cond_destroy(&q->wake_cond);
    pthread_mutex_destroy(&q->wake_mu);
}

int64_t th__queue_now_ms(const th_queue *q)
{
    return q->config.now_ms(q->config.now_arg);
}

int64_t th__queue_backoff_ms(const th_queue *q, int attempt)
{
    uint64_t cap = q->config.backoff_cap_ms;
    uint64_t ceiling = q->config.backoff_base_ms;
    for (int i = 1; i < attempt && ceiling < cap; i++) {
        ceiling *= 2;
    }
    if (ceiling > cap) {
        ceiling = cap;
    }
    uint64_t r;
    if (getrandom(&r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        r = th_clock_now_ns(); /* no entropy: still spread, just predictably */
    }
    return (int64_t)(r % (ceiling + 1));
}

/* ---- argument checks ----------------------------------------------------------------------- */

static bool valid_kind(const char *kind)
{
    if (kind == NULL) {
        return false;
    }
    size_t n = 0;
    for (const char *p = kind; *p; p++, n++) {
        char ch = *p;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' ||
              ch == '-')) {
            return false;
        }
    }
    return n >= 1 && n <= TH_TASK_KIND_MAX;
}

static bool valid_owner(const char *owner)
{
    if (owner == NULL) {
        return false;
    }
    size_t n = 0;
    for (const char *p = owner; *p; p++, n++) {
        if (*p <= ' ' || *p > '~') {
            return false;
        }
    }
    return n >= 1 && n <= TH_TASK_OWNER_MAX;
}

/* Ids are "t" and 16 lowercase hex digits; anything else names no task. */
static bool valid_id(const char *id)
{
    if (id == NULL || id[0] != 't' || strlen(id) != TH_TASK_ID_SIZE - 1) {
        return false;
    }
    for (const char *p = id + 1; *p; p++) {
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) {
            return false;
        }
    }
    return true;
}

/* JSON text of at most max bytes: 0, TH_ETOOBIG or TH_EINVAL. */
static int check_json(const char *text, size_t max, size_t *len_out)
{
    size_t len = strnlen(text, max + 1);
    if (len > max) {
        return TH_ETOOBIG;
    }
    json_error_t jerr;
    json_t *doc = json_loadb(text, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
    if (doc == NULL) {
        return TH_EINVAL;
    }
    json_decref(doc);
    *len_out = len;
    return 0;
}

static int new_id(char id[TH_TASK_ID_SIZE])
{
    unsigned char rnd[8];
    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        return TH_ESYS;
    }
    static const char hex[] = "0123456789abcdef";
    id[0] = 't';
    for (size_t i = 0; i < sizeof(rnd); i++) {
        id[1 + 2 * i] = hex[rnd[i] >> 4];
        id[2 + 2 * i] = hex[rnd[i] & 15];
    }
    id[TH_TASK_ID_SIZE - 1] = '\0';
    return 0;
}

static int prepare_task(const th_queue *q, const th_task_spec *spec, th__task_new *t)
{
    if (spec == NULL || !valid_kind(spec->kind) || spec->max_attempts > MAX_ATTEMPTS_LIMIT) {
        return TH_EINVAL;
    }
    memset(t, 0, sizeof(*t));
    t->kind = spec->kind;
    t->scope = spec->scope ? spec->scope : "";
    if (strnlen(t->scope, TH_TASK_SCOPE_MAX + 1) > TH_TASK_SCOPE_MAX) {
        return TH_EINVAL;
    }
    t->idempotency_key = spec->idempotency_key;
    if (t->idempotency_key != NULL) {
        size_t n = strnlen(t->idempotency_key, TH_TASK_KEY_MAX + 1);
        if (n == 0 || n > TH_TASK_KEY_MAX) {
            return TH_EINVAL;
        }
    }
    t->payload = spec->payload ? spec->payload : "{}";
    int rc = check_json(t->payload, TH_TASK_PAYLOAD_MAX, &t->payload_len);
    if (rc != 0) {
        return rc;
    }
    t->priority = spec->priority;
    t->max_attempts =
        (int)(spec->max_attempts ? spec->max_attempts : q->config.default_max_attempts);
    t->now_ms = th__queue_now_ms(q);
    t->run_at_ms = t->now_ms + spec->delay_ms;
    return 0;
}

/* ---- the public calls ---------------------------------------------------------------------- */

int th_queue_open(const char *url, const th_queue_config *config, th_queue **out, char *errbuf,
                  size_t errlen)
{
    if (url == NULL) {
        snprintf(errbuf, errlen, "no queue URL");
        return TH_EINVAL;
    }
    if (strncmp(url, "sqlite://", 9) == 0 && url[9] != '\0') {
        return th__queue_sql_open(url, url + 9, config, out, errbuf, errlen);
    }
    if (strncmp(url, "amqp://", 7) == 0 || strncmp(url, "amqps://", 8) == 0) {
        snprintf(errbuf, errlen, "the RabbitMQ queue is not built yet (scale-out issue)");
        return TH_EUNSUPPORTED;
    }
    snprintf(errbuf, errlen, "unknown queue URL scheme (expected sqlite:///path)");
    return TH_EINVAL;
}

void th_queue_close(th_queue *queue)
{
    if (queue != NULL) {
        queue->ops->close(queue);
    }
}

const char *th_queue_backend(const th_queue *queue)
{
    return queue->ops->name;
}

void th_queue_notify(th_queue *q)
{
    pthread_mutex_lock(&q->wake_mu);
    atomic_fetch_add(&q->wake_gen, 1);
    pthread_cond_broadcast(&q->wake_cond);
    pthread_mutex_unlock(&q->wake_mu);
}

int th_queue_enqueue(th_ctx *ctx, th_queue *q, const th_task_spec *spec,
                     char id_out[TH_TASK_ID_SIZE], bool *existed)
{
    th__task_new t;
    int rc = prepare_task(q, spec, &t);
    for (int draw = 0; rc == 0 && draw < ID_DRAWS; draw++) {
        rc = new_id(t.id);
        rc = rc ? rc : q->ops->enqueue(ctx, q, &t, id_out, existed);
        if (rc != TH_EEXIST) {
            break;
        }
        rc = draw + 1 < ID_DRAWS ? 0 : TH_EIO;
    }
    if (rc == 0) {
        th_queue_notify(q);
    }
    return rc;
}

int th_queue_enqueue_in(th_queue *q, th_store *store, const th_task_spec *spec,
                        char id_out[TH_TASK_ID_SIZE], bool *existed)
{
    if (store == NULL) {
        return TH_EINVAL;
    }
    th__task_new t;
    int rc = prepare_task(q, spec, &t);
    for (int draw = 0; rc == 0 && draw < ID_DRAWS; draw++) {
        rc = new_id(t.id);
        rc = rc ? rc : q->ops->enqueue_in(q, store, &t, id_out, existed);
        if (rc != TH_EEXIST) {
            break;
        }
        rc = draw + 1 < ID_DRAWS ? 0 : TH_EIO;
    }
    return rc;
}

int th_queue_lease(th_ctx *ctx, th_queue *q, const th_task_kind *kinds, size_t nkinds,
                   const char *owner, uint32_t lease_ms, th_task *out)
{
    if (kinds == NULL || nkinds == 0 || !valid_owner(owner) || lease_ms == 0 ||
        lease_ms > MAX_LEASE_MS || out == NULL) {
        return TH_EINVAL;
    }
    for (size_t i = 0; i < nkinds; i++) {
        if (!valid_kind(kinds[i].kind)) {
            return TH_EINVAL;
        }
    }
    int err = th_ctx_err(ctx);
    if (err != 0) {
        return err;
    }
    /* Before looking: a notify from now on wakes this thread's next th_queue_wait(). */
    last_lease.serial = q->serial;
    last_lease.gen = atomic_load(&q->wake_gen);
    return q->ops->lease(ctx, q, kinds, nkinds, owner, th__queue_now_ms(q), lease_ms, out);
}

int th_queue_wait(th_ctx *ctx, th_queue *q, uint32_t timeout_ms)
{
    uint32_t wait_ms =
        timeout_ms < q->config.poll_interval_ms ? timeout_ms : q->config.poll_interval_ms;
    uint64_t deadline_ns = th_clock_after_ns(wait_ms * TH_NS_PER_MS);
    th__waiter waiter;
    th__waiter_init(&waiter, &q->wake_mu, &q->wake_cond);
    int err = 0;
    pthread_mutex_lock(&q->wake_mu);
    uint64_t seen = last_lease.serial == q->serial ? last_lease.gen : atomic_load(&q->wake_gen);
    while (atomic_load(&q->wake_gen) == seen && th_clock_now_ns() < deadline_ns &&
           (err = th__waiter_wait(&waiter, ctx, deadline_ns)) == 0) {
    }
    /* Until the next lease, only notifies after this point count. */
    last_lease.serial = q->serial;
    last_lease.gen = atomic_load(&q->wake_gen);
    pthread_mutex_unlock(&q->wake_mu);
    th__waiter_finish(&waiter);
    return err ? err : th_ctx_err(ctx);
}

/* Checks the (id, owner, attempt) that name a lease. */
static bool valid_lease(const char *id, const char *owner, int attempt)
{
    return valid_id(id) && valid_owner(owner) && attempt >= 1;
}

int th_queue_heartbeat(th_ctx *ctx, th_queue *q, const char *id, const char *owner, int attempt,
                       uint32_t lease_ms)
{
    if (!valid_lease(id, owner, attempt) || lease_ms == 0 || lease_ms > MAX_LEASE_MS) {
        return valid_id(id) || id == NULL ? TH_EINVAL : TH_ENOTFOUND;
    }
    int64_t now = th__queue_now_ms(q);
    return q->ops->heartbeat(ctx, q, id, owner, attempt, now, lease_ms);
}

int th_queue_finish(th_ctx *ctx, th_queue *q, const char *id, const char *owner, int attempt,
                    const char *result)
{
    if (!valid_lease(id, owner, attempt)) {
        return valid_id(id) || id == NULL ? TH_EINVAL : TH_ENOTFOUND;
    }
    result = result ? result : "null";
    size_t len;
    int rc = check_json(result, TH_TASK_RESULT_MAX, &len);
    if (rc != 0) {
        return rc;
    }
    rc = q->ops->finish(ctx, q, id, owner, attempt, result, th__queue_now_ms(q));
    if (rc == 0) {
        th_queue_notify(q); /* a per-kind slot is free */
    }
    return rc;
}

int th_queue_fail(th_ctx *ctx, th_queue *q, const char *id, const char *owner, int attempt,
                  const char *error, bool retryable)
{
    if (!valid_lease(id, owner, attempt)) {
        return valid_id(id) || id == NULL ? TH_EINVAL : TH_ENOTFOUND;
    }
    /* Cut at a UTF-8 character boundary. */
    char cut[TH_TASK_ERROR_MAX + 1];
    size_t n = strnlen(error ? error : "", TH_TASK_ERROR_MAX + 1);
    if (n > TH_TASK_ERROR_MAX) {
        n = TH_TASK_ERROR_MAX;
        while (n > 0 && ((unsigned char)error[n] & 0xC0) == 0x80) {
            n--;
        }
    }
    if (n > 0) {
        memcpy(cut, error, n);
    }
    cut[n] = '\0';
    int rc = q->ops->fail(ctx, q, id, owner, attempt, cut, retryable, th__queue_now_ms(q),
                          th__queue_backoff_ms(q, attempt));
    if (rc == 0) {
        th_queue_notify(q);
    }
    return rc;
}

int th_queue_cancel(th_ctx *ctx, th_queue *q, const char *id)
{
    if (!valid_id(id)) {
        return id == NULL ? TH_EINVAL : TH_ENOTFOUND;
    }
    int rc = q->ops->cancel(ctx, q, id, th__queue_now_ms(q));
    if (rc == 0) {
        th_queue_notify(q);
    }
    return rc;
}

int th_queue_get(th_ctx *ctx, th_queue *q, const char *id, th_task *out)
{
    if (out == NULL || !valid_id(id)) {
        return out == NULL || id == NULL ? TH_EINVAL : TH_ENOTFOUND;
    }
    return q->ops->get(ctx, q, id, out);
}

int th_queue_counts(th_ctx *ctx, th_queue *q, int64_t counts[TH_TASK_NSTATES])
{
    return q->ops->counts(ctx, q, counts);
}

/* ---- metrics ------------------------------------------------------------------------------- */

static void collect_counts(void *arg, th_metric *family, th_buf *out)
{
    int64_t counts[TH_TASK_NSTATES];
    if (th_queue_counts(th_ctx_background(), arg, counts) != 0) {
        return; /* a scrape without the family beats a wrong number */
    }
    for (int i = 0; i < TH_TASK_NSTATES; i++) {
        char labels[32];
        snprintf(labels, sizeof(labels), "state=\"%s\"", state_names[i]);
        th_metrics_sample(out, family, NULL, labels, (double)counts[i]);
    }
}

int th_queue_register_metrics(th_queue *queue, th_metrics *metrics)
{
    if (queue == NULL || metrics == NULL) {
        return TH_EINVAL;
    }
    return th_metrics_collector(metrics, "trialhub_queue_tasks", "Tasks in the queue by state.",
                                "gauge", collect_counts, queue);
}
