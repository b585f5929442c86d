/* The durable task queue on a real SQLite file: enqueue, lease, finish; priorities; per-kind
 * limits; lease expiry and the exactly-once result; heartbeats; retries with backoff and dead
 * tasks; cancel; idempotency keys; enqueue inside a group-commit writer job (committed and
 * rolled back with the batch); the wake-up; eight threads and four processes (one of them
 * killed holding a lease) leasing at once, each task succeeding exactly once; open under
 * allocation failure; and the lease's query plan. Tests that need time to pass use an injected
 * clock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <fcntl.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "unit/core/test_util.h"
#include "queue/queue_int.h"
#include "trialhub/queue.h"
#include "trialhub/store.h"
#include "trialhub/writer.h"

extern char **environ;

#define BG      th_ctx_background()
#define T0      INT64_C(1800000000000) /* the injected clock's start, Unix ms */
#define LEASE   1000u
#define MAXLIVE 8

/* ---- fixture ------------------------------------------------------------------------------- */

static _Atomic int64_t fake_now_ms;

static int64_t fake_clock(void *arg)
{
    (void)arg;
    return atomic_load(&fake_now_ms);
}

static void advance(int64_t ms)
{
    atomic_fetch_add(&fake_now_ms, ms);
}

typedef struct fixture {
    char dir[64];
    char url[128];
    th_queue *q;
} fixture;

static void make_dir(fixture *f, const char *name)
{
    snprintf(f->dir, sizeof(f->dir), "/tmp/th-queue-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->url, sizeof(f->url), "sqlite://%s/%s", f->dir, name);
}

/* A queue on a fresh file; config NULL: the injected clock with small backoffs. */
static fixture *open_fixture(const th_queue_config *config)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    make_dir(f, "queue.db");
    atomic_store(&fake_now_ms, T0);
    th_queue_config fake = {.backoff_base_ms = 1000,
                            .backoff_cap_ms = 4000,
                            .poll_interval_ms = 50,
                            .now_ms = fake_clock};
    char err[256];
    int rc = th_queue_open(f->url, config ? config : &fake, &f->q, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "open: %s\n", err);
    }
    assert_int_equal(rc, 0);
    assert_string_equal(th_queue_backend(f->q), "sql");
    return f;
}

static void remove_dir(const char *dir)
{
    static const char *const names[] = {"queue.db", "queue.db-wal", "queue.db-shm",
                                        "other.db", "other.db-wal", "other.db-shm"};
    char path[160];
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        unlink(path);
    }
    for (int i = 0; i < 8; i++) {
        snprintf(path, sizeof(path), "%s/out-%d.txt", dir, i);
        unlink(path);
    }
    rmdir(dir);
}

static void close_fixture(fixture *f)
{
    th_queue_close(f->q);
    remove_dir(f->dir);
    free(f);
}

static void enqueue(th_queue *q, const char *kind, int priority, const char *payload,
                    char id[TH_TASK_ID_SIZE])
{
    th_task_spec spec = {.kind = kind, .payload = payload, .priority = priority};
    bool existed = true;
    assert_int_equal(th_queue_enqueue(BG, q, &spec, id, &existed), 0);
    assert_false(existed);
}

static th_task lease_ok(th_queue *q, const char *kind, unsigned max_running, const char *owner)
{
    th_task_kind k = {kind, max_running};
    th_task t;
    memset(&t, 0, sizeof(t));
    assert_int_equal(th_queue_lease(BG, q, &k, 1, owner, LEASE, &t), 0);
    assert_int_equal(t.state, TH_TASK_RUNNING);
    assert_string_equal(t.lease_owner, owner);
    return t;
}

static void lease_none(th_queue *q, const char *kind, unsigned max_running, const char *owner)
{
    th_task_kind k = {kind, max_running};
    th_task t;
    assert_int_equal(th_queue_lease(BG, q, &k, 1, owner, LEASE, &t), TH_EAGAIN);
}

static th_task get_ok(th_queue *q, const char *id)
{
    th_task t;
    assert_int_equal(th_queue_get(BG, q, id, &t), 0);
    return t;
}

static th_task_state state_of(th_queue *q, const char *id)
{
    th_task t = get_ok(q, id);
    th_task_free(&t);
    return t.state;
}

/* ---- basics -------------------------------------------------------------------------------- */

static void test_enqueue_lease_finish(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    char id[TH_TASK_ID_SIZE];
    enqueue(f->q, "analysis", 0, "{\"image\":\"sha256:ab\"}", id);
    assert_int_equal(strlen(id), 17);
    assert_int_equal(id[0], 't');

    th_task t = get_ok(f->q, id);
    assert_int_equal(t.state, TH_TASK_QUEUED);
    assert_string_equal(t.kind, "analysis");
    assert_string_equal(t.payload, "{\"image\":\"sha256:ab\"}");
    assert_int_equal(t.attempts, 0);
    assert_int_equal(t.max_attempts, 5);
    assert_int_equal(t.run_at_ms, T0);
    assert_int_equal(t.created_ms, T0);
    assert_null(t.result);
    assert_string_equal(t.lease_owner, "");
    th_task_free(&t);

    advance(10);
    t = lease_ok(f->q, "analysis", 0, "w1");
    assert_string_equal(t.id, id);
    assert_int_equal(t.attempts, 1);
    assert_int_equal(t.lease_expires_ms, T0 + 10 + LEASE);
    assert_string_equal(t.payload, "{\"image\":\"sha256:ab\"}");
    lease_none(f->q, "analysis", 0, "w2"); /* leased: nobody else gets it */
    assert_int_equal(th_queue_finish(BG, f->q, id, "w1", t.attempts, "{\"score\":0.93}"), 0);
    th_task_free(&t);

    t = get_ok(f->q, id);
    assert_int_equal(t.state, TH_TASK_SUCCEEDED);
    assert_string_equal(t.result, "{\"score\":0.93}");
    assert_int_equal(t.updated_ms, T0 + 10);
    th_task_free(&t);
    lease_none(f->q, "analysis", 0, "w1");

    int64_t counts[TH_TASK_NSTATES];
    assert_int_equal(th_queue_counts(BG, f->q, counts), 0);
    assert_int_equal(counts[TH_TASK_SUCCEEDED], 1);
    assert_int_equal(counts[TH_TASK_QUEUED] + counts[TH_TASK_RUNNING], 0);

    /* the metrics hook reads the same counts */
    th_metrics *metrics;
    assert_int_equal(th_metrics_create(&metrics), 0);
    assert_int_equal(th_queue_register_metrics(f->q, metrics), 0);
    th_buf text;
    th_buf_init(&text, 0);
    th_metrics_render(metrics, &text);
    assert_non_null(strstr(text.data, "trialhub_queue_tasks{state=\"succeeded\"} 1"));
    assert_non_null(strstr(text.data, "trialhub_queue_tasks{state=\"queued\"} 0"));
    th_buf_free(&text);
    th_metrics_destroy(metrics);
    close_fixture(f);
}

static void test_bad_arguments(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    char id[TH_TASK_ID_SIZE] = "unchanged";
    bool existed = false;
    th_task_spec spec = {.kind = "Analysis"};
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), TH_EINVAL);
    spec.kind = "";
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), TH_EINVAL);
    spec.kind = "analysis";
    spec.payload = "{\"a\":1,}";
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), TH_EINVAL);
    spec.payload = "{\"a\":1,\"a\":2}";
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), TH_EINVAL);
    char *big = malloc(TH_TASK_PAYLOAD_MAX + 16);
    assert_non_null(big);
    memset(big, ' ', TH_TASK_PAYLOAD_MAX + 15);
    big[0] = '1';
    big[TH_TASK_PAYLOAD_MAX + 15] = '\0';
    spec.payload = big;
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), TH_ETOOBIG);
    big[TH_TASK_PAYLOAD_MAX] = '\0'; /* exactly the limit: accepted */
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), 0);
    free(big);
    assert_string_not_equal(id, "unchanged");

    th_task t = lease_ok(f->q, "analysis", 0, "w1");
    assert_int_equal(th_queue_finish(BG, f->q, t.id, "w1", t.attempts, "not json"), TH_EINVAL);
    assert_int_equal(th_queue_finish(BG, f->q, t.id, "w 1", t.attempts, "{}"), TH_EINVAL);
    assert_int_equal(th_queue_finish(BG, f->q, t.id, "w1", 0, "{}"), TH_EINVAL);
    assert_int_equal(th_queue_heartbeat(BG, f->q, t.id, "w1", t.attempts, 0), TH_EINVAL);
    assert_int_equal(th_queue_finish(BG, f->q, t.id, "w1", t.attempts, NULL), 0);
    th_task_free(&t);

    th_task_kind k = {"analysis", 0};
    assert_int_equal(th_queue_lease(BG, f->q, &k, 1, "", LEASE, &t), TH_EINVAL);
    assert_int_equal(th_queue_lease(BG, f->q, &k, 0, "w1", LEASE, &t), TH_EINVAL);
    assert_int_equal(th_queue_lease(BG, f->q, &k, 1, "w1", 0, &t), TH_EINVAL);
    assert_int_equal(th_queue_get(BG, f->q, "t0000000000000000", &t), TH_ENOTFOUND);
    assert_int_equal(th_queue_get(BG, f->q, "../etc/passwd", &t), TH_ENOTFOUND);
    assert_int_equal(th_queue_cancel(BG, f->q, "t0000000000000000"), TH_ENOTFOUND);
    assert_int_equal(th_queue_heartbeat(BG, f->q, "t0000000000000000", "w1", 1, LEASE),
                     TH_ENOTFOUND);

    /* a done context stops a call before it touches the database */
    th_ctx *ctx;
    assert_int_equal(th_ctx_with_cancel(BG, &ctx), 0);
    th_ctx_cancel(ctx);
    assert_int_equal(th_queue_lease(ctx, f->q, &k, 1, "w1", LEASE, &t), TH_ECANCELED);
    spec.payload = NULL;
    assert_int_equal(th_queue_enqueue(ctx, f->q, &spec, id, &existed), TH_ECANCELED);
    th_ctx_release(ctx);
    close_fixture(f);
}

static void test_open_errors(void **state)
{
    (void)state;
    th_queue *q = NULL;
    char err[256];
    assert_int_equal(th_queue_open(NULL, NULL, &q, err, sizeof(err)), TH_EINVAL);
    assert_int_equal(th_queue_open("redis://x", NULL, &q, err, sizeof(err)), TH_EINVAL);
    assert_int_equal(th_queue_open("amqp://guest@localhost/", NULL, &q, err, sizeof(err)),
                     TH_EUNSUPPORTED);
    assert_int_equal(th_queue_open("sqlite://:memory:", NULL, &q, err, sizeof(err)), TH_EINVAL);
    fixture d;
    make_dir(&d, "queue.db");
    th_queue_config bad = {.backoff_base_ms = 5000, .backoff_cap_ms = 1000};
    assert_int_equal(th_queue_open(d.url, &bad, &q, err, sizeof(err)), TH_EINVAL);
    assert_null(q);
    th_queue_close(NULL);
    remove_dir(d.dir);
}

/* ---- ordering and limits ------------------------------------------------------------------- */

static void test_priorities(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    char a[TH_TASK_ID_SIZE], b[TH_TASK_ID_SIZE], c[TH_TASK_ID_SIZE], d[TH_TASK_ID_SIZE];
    char e[TH_TASK_ID_SIZE], w[TH_TASK_ID_SIZE];
    enqueue(f->q, "analysis", 0, "{}", a);
    enqueue(f->q, "analysis", 5, "{}", b);
    enqueue(f->q, "analysis", 1, "{}", c);
    enqueue(f->q, "analysis", 5, "{}", d); /* same priority as b, enqueued later */
    th_task_spec later = {.kind = "analysis", .priority = 9, .delay_ms = 500};
    bool existed;
    assert_int_equal(th_queue_enqueue(BG, f->q, &later, e, &existed), 0);
    enqueue(f->q, "webhook", 3, "{}", w);

    const char *order[] = {b, d, c, a};
    for (int i = 0; i < 4; i++) {
        th_task t = lease_ok(f->q, "analysis", 0, "w1");
        assert_string_equal(t.id, order[i]);
        th_task_free(&t);
    }
    lease_none(f->q, "analysis", 0, "w1"); /* e is delayed */
    advance(500);
    th_task t = lease_ok(f->q, "analysis", 0, "w1");
    assert_string_equal(t.id, e);
    th_task_free(&t);

    /* across kinds, the higher priority wins */
    char x[TH_TASK_ID_SIZE];
    enqueue(f->q, "analysis", 1, "{}", x);
    th_task_kind both[] = {{"analysis", 0}, {"webhook", 0}};
    assert_int_equal(th_queue_lease(BG, f->q, both, 2, "w1", LEASE, &t), 0);
    assert_string_equal(t.id, w);
    th_task_free(&t);
    assert_int_equal(th_queue_lease(BG, f->q, both, 2, "w1", LEASE, &t), 0);
    assert_string_equal(t.id, x);
    th_task_free(&t);
    close_fixture(f);
}

static void test_kind_limit(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    char ids[4][TH_TASK_ID_SIZE], hook[TH_TASK_ID_SIZE];
    for (int i = 0; i < 4; i++) {
        enqueue(f->q, "analysis", 0, "{}", ids[i]);
    }
    enqueue(f->q, "webhook", -5, "{}", hook);
    th_task t1 = lease_ok(f->q, "analysis", 2, "w1");
    th_task t2 = lease_ok(f->q, "analysis", 2, "w2");
    lease_none(f->q, "analysis", 2, "w3");            /* two running: the limit */
    th_task t3 = lease_ok(f->q, "analysis", 0, "w3"); /* a worker without the limit */
    th_task_free(&t3);

    /* the limited kind is skipped, the other is still served */
    th_task_kind kinds[] = {{"analysis", 2}, {"webhook", 0}};
    th_task t;
    assert_int_equal(th_queue_lease(BG, f->q, kinds, 2, "w4", LEASE, &t), 0);
    assert_string_equal(t.id, hook);
    th_task_free(&t);

    kinds[0].max_running = 4;
    assert_int_equal(th_queue_lease(BG, f->q, kinds, 2, "w4", LEASE, &t), 0);
    assert_string_equal(t.kind, "analysis");
    th_task_free(&t);
    kinds[0].max_running = 2;
    assert_int_equal(th_queue_finish(BG, f->q, t1.id, "w1", t1.attempts, "{}"), 0);
    assert_int_equal(th_queue_lease(BG, f->q, kinds, 2, "w5", LEASE, &t), TH_EAGAIN);
    assert_int_equal(th_queue_finish(BG, f->q, t2.id, "w2", t2.attempts, "{}"), 0);
    th_task_free(&t1);
    th_task_free(&t2);
    lease_none(f->q, "analysis", 2, "w5"); /* two still running (w3, w4), none left queued */

    /* expired leases do not hold a slot */
    char more[TH_TASK_ID_SIZE];
    enqueue(f->q, "analysis", 0, "{}", more);
    lease_none(f->q, "analysis", 2, "w5");
    advance(LEASE);
    t = lease_ok(f->q, "analysis", 2, "w5");
    th_task_free(&t);
    close_fixture(f);
}

/* ---- leases -------------------------------------------------------------------------------- */

static void test_lease_expiry_result_once(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    char id[TH_TASK_ID_SIZE];
    enqueue(f->q, "analysis", 0, "{}", id);
    th_task first = lease_ok(f->q, "analysis", 0, "w1");
    advance(LEASE - 1);
    lease_none(f->q, "analysis", 0, "w2");
    advance(1); /* w1's lease is over: w1 is presumed dead */
    th_task second = lease_ok(f->q, "analysis", 0, "w2");
    assert_string_equal(second.id, id);
    assert_int_equal(second.attempts, 2);

    /* w1 was only slow: it can no longer touch the task */
    assert_int_equal(th_queue_heartbeat(BG, f->q, id, "w1", first.attempts, LEASE), TH_ECONFLICT);
    assert_int_equal(th_queue_finish(BG, f->q, id, "w1", first.attempts, "{\"by\":1}"),
                     TH_ECONFLICT);
    assert_int_equal(th_queue_fail(BG, f->q, id, "w1", first.attempts, "late", true), TH_ECONFLICT);
    /* nor can w2 under w1's attempt number, nor w1 under w2's */
    assert_int_equal(th_queue_finish(BG, f->q, id, "w2", first.attempts, "{}"), TH_ECONFLICT);
    assert_int_equal(th_queue_finish(BG, f->q, id, "w1", second.attempts, "{}"), TH_ECONFLICT);

    assert_int_equal(th_queue_finish(BG, f->q, id, "w2", second.attempts, "{\"by\":2}"), 0);
    /* written once: not even the winner writes again */
    assert_int_equal(th_queue_finish(BG, f->q, id, "w2", second.attempts, "{\"by\":3}"),
                     TH_ECONFLICT);
    assert_int_equal(th_queue_fail(BG, f->q, id, "w2", second.attempts, "x", true), TH_ECONFLICT);
    th_task t = get_ok(f->q, id);
    assert_int_equal(t.state, TH_TASK_SUCCEEDED);
    assert_string_equal(t.result, "{\"by\":2}");
    assert_string_equal(t.lease_owner, "w2");
    th_task_free(&t);
    th_task_free(&first);
    th_task_free(&second);
    close_fixture(f);
}

static void test_heartbeat_extends(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    char id[TH_TASK_ID_SIZE];
    enqueue(f->q, "analysis", 0, "{}", id);
    th_task t = lease_ok(f->q, "analysis", 0, "w1");
    for (int i = 0; i < 3; i++) {
        advance(LEASE - 200);
        assert_int_equal(th_queue_heartbeat(BG, f->q, id, "w1", t.attempts, LEASE), 0);
        lease_none(f->q, "analysis", 0, "w2");
    }
    th_task now = get_ok(f->q, id);
    assert_int_equal(now.lease_expires_ms, T0 + 3 * (LEASE - 200) + LEASE);
    th_task_free(&now);
    advance(LEASE - 1);
    lease_none(f->q, "analysis", 0, "w2");
    /* a heartbeat after the lease ran out still holds it while nobody took it */
    advance(1);
    assert_int_equal(th_queue_heartbeat(BG, f->q, id, "w1", t.attempts, LEASE), 0);
    lease_none(f->q, "analysis", 0, "w2");
    advance(LEASE);
    th_task other = lease_ok(f->q, "analysis", 0, "w2");
    assert_int_equal(th_queue_heartbeat(BG, f->q, id, "w1", t.attempts, LEASE), TH_ECONFLICT);
    assert_int_equal(th_queue_heartbeat(BG, f->q, id, "w2", other.attempts, LEASE), 0);
    th_task_free(&other);
    th_task_free(&t);
    close_fixture(f);
}

/* ---- retries ------------------------------------------------------------------------------- */

static void test_retry_backoff_dead(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL); /* base 1 s, cap 4 s */
    th_task_spec spec = {
        .kind = "webhook", .payload = "{\"url\":\"https://x\"}", .max_attempts = 4};
    char id[TH_TASK_ID_SIZE];
    bool existed;
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), 0);
    for (int attempt = 1; attempt <= 4; attempt++) {
        th_task t = lease_ok(f->q, "webhook", 0, "w1");
        assert_int_equal(t.attempts, attempt);
        char error[32];
        snprintf(error, sizeof(error), "HTTP 503 (try %d)", attempt);
        int64_t failed_at = fake_clock(NULL);
        assert_int_equal(th_queue_fail(BG, f->q, id, "w1", attempt, error, true), 0);
        th_task_free(&t);
        t = get_ok(f->q, id);
        assert_string_equal(t.last_error, error);
        if (attempt == 4) {
            assert_int_equal(t.state, TH_TASK_DEAD);
            th_task_free(&t);
            break;
        }
        assert_int_equal(t.state, TH_TASK_FAILED);
        int64_t ceiling = 1000 << (attempt - 1);
        ceiling = ceiling > 4000 ? 4000 : ceiling;
        assert_in_range(t.run_at_ms, failed_at, failed_at + ceiling);
        if (t.run_at_ms > failed_at) {
            advance(t.run_at_ms - failed_at - 1);
            lease_none(f->q, "webhook", 0, "w1"); /* still backing off */
            advance(1);
        }
        th_task_free(&t);
    }
    advance(3600 * 1000);
    lease_none(f->q, "webhook", 0, "w1"); /* dead stays dead */

    /* not retryable: dead at once, error kept */
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), 0);
    th_task t = lease_ok(f->q, "webhook", 0, "w1");
    assert_int_equal(th_queue_fail(BG, f->q, id, "w1", t.attempts, "HTTP 410 Gone", false), 0);
    th_task_free(&t);
    t = get_ok(f->q, id);
    assert_int_equal(t.state, TH_TASK_DEAD);
    assert_int_equal(t.attempts, 1);
    assert_string_equal(t.last_error, "HTTP 410 Gone");
    th_task_free(&t);

    /* a long error is cut at a character boundary */
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), 0);
    t = lease_ok(f->q, "webhook", 0, "w1");
    char long_error[TH_TASK_ERROR_MAX + 8];
    memset(long_error, 'e', sizeof(long_error));
    memcpy(long_error + TH_TASK_ERROR_MAX - 1, "\xc3\xa9", 2); /* an é across the cut */
    long_error[sizeof(long_error) - 1] = '\0';
    assert_int_equal(th_queue_fail(BG, f->q, id, "w1", t.attempts, long_error, true), 0);
    th_task_free(&t);
    t = get_ok(f->q, id);
    assert_int_equal(strlen(t.last_error), TH_TASK_ERROR_MAX - 1);
    th_task_free(&t);
    close_fixture(f);
}

static void test_backoff_formula(void **state)
{
    (void)state;
    fixture *f = open_fixture(&(th_queue_config){0}); /* defaults: 2 s base, 1 h cap */
    for (int attempt = 1; attempt <= 20; attempt++) {
        int64_t ceiling = attempt <= 12 ? 2000LL << (attempt - 1) : 3600000;
        ceiling = ceiling > 3600000 ? 3600000 : ceiling;
        int64_t max_seen = 0;
        for (int i = 0; i < 200; i++) {
            int64_t d = th__queue_backoff_ms(f->q, attempt);
            assert_in_range(d, 0, ceiling);
            max_seen = d > max_seen ? d : max_seen;
        }
        assert_true(max_seen > ceiling / 2); /* jittered over the whole range */
    }
    close_fixture(f);
}

static void test_lost_on_last_attempt(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    th_task_spec spec = {.kind = "analysis", .max_attempts = 2};
    char id[TH_TASK_ID_SIZE];
    bool existed;
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, id, &existed), 0);
    for (int i = 0; i < 2; i++) {
        th_task t = lease_ok(f->q, "analysis", 0, "w1"); /* and the worker dies */
        th_task_free(&t);
        advance(LEASE);
    }
    lease_none(f->q, "analysis", 0, "w2");
    th_task t = get_ok(f->q, id);
    assert_int_equal(t.state, TH_TASK_DEAD);
    assert_int_equal(t.attempts, 2);
    assert_non_null(strstr(t.last_error, "lease expired"));
    th_task_free(&t);
    close_fixture(f);
}

/* ---- cancel, idempotency ------------------------------------------------------------------- */

static void test_cancel(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    char queued[TH_TASK_ID_SIZE], running[TH_TASK_ID_SIZE], done[TH_TASK_ID_SIZE];
    enqueue(f->q, "analysis", 0, "{}", queued);
    assert_int_equal(th_queue_cancel(BG, f->q, queued), 0);
    assert_int_equal(state_of(f->q, queued), TH_TASK_CANCELED);
    assert_int_equal(th_queue_cancel(BG, f->q, queued), 0); /* again: a no-op */
    lease_none(f->q, "analysis", 0, "w1");

    enqueue(f->q, "analysis", 0, "{}", running);
    th_task t = lease_ok(f->q, "analysis", 0, "w1");
    assert_int_equal(th_queue_cancel(BG, f->q, running), 0);
    assert_int_equal(state_of(f->q, running), TH_TASK_CANCELED);
    /* the worker learns it at its next call */
    assert_int_equal(th_queue_heartbeat(BG, f->q, running, "w1", t.attempts, LEASE), TH_ECANCELED);
    assert_int_equal(th_queue_finish(BG, f->q, running, "w1", t.attempts, "{}"), TH_ECANCELED);
    assert_int_equal(th_queue_fail(BG, f->q, running, "w1", t.attempts, "x", true), TH_ECANCELED);
    th_task_free(&t);
    advance(LEASE);
    lease_none(f->q, "analysis", 0, "w2"); /* never leased again */
    th_task c = get_ok(f->q, running);
    assert_int_equal(c.state, TH_TASK_CANCELED);
    assert_null(c.result);
    th_task_free(&c);

    enqueue(f->q, "analysis", 0, "{}", done);
    t = lease_ok(f->q, "analysis", 0, "w1");
    assert_int_equal(th_queue_finish(BG, f->q, done, "w1", t.attempts, "{}"), 0);
    th_task_free(&t);
    assert_int_equal(th_queue_cancel(BG, f->q, done), TH_ECONFLICT); /* too late */
    assert_int_equal(state_of(f->q, done), TH_TASK_SUCCEEDED);
    close_fixture(f);
}

static void test_idempotency_key(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    th_task_spec spec = {.kind = "analysis",
                         .payload = "{\"image\":\"a\"}",
                         .idempotency_key = "req-42",
                         .scope = "T1"};
    char first[TH_TASK_ID_SIZE], again[TH_TASK_ID_SIZE], other[TH_TASK_ID_SIZE];
    bool existed = true;
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, first, &existed), 0);
    assert_false(existed);
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, again, &existed), 0);
    assert_true(existed);
    assert_string_equal(first, again);

    /* the same key names the same task after it ran, too */
    th_task t = lease_ok(f->q, "analysis", 0, "w1");
    assert_int_equal(th_queue_finish(BG, f->q, first, "w1", t.attempts, "{}"), 0);
    th_task_free(&t);
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, again, &existed), 0);
    assert_true(existed);
    assert_string_equal(first, again);
    lease_none(f->q, "analysis", 0, "w1");

    /* the same key for other work is a conflict; nothing is written */
    spec.payload = "{\"image\":\"b\"}";
    strcpy(other, "unchanged");
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, other, &existed), TH_ECONFLICT);
    assert_string_equal(other, "unchanged");

    /* keys are per kind and per scope */
    spec.scope = "T2";
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, other, &existed), 0);
    assert_false(existed);
    assert_string_not_equal(other, first);
    spec.scope = "T1";
    spec.kind = "webhook";
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, other, &existed), 0);
    assert_false(existed);
    /* no key: every enqueue is a new task */
    spec.idempotency_key = NULL;
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, first, &existed), 0);
    assert_int_equal(th_queue_enqueue(BG, f->q, &spec, again, &existed), 0);
    assert_string_not_equal(first, again);
    close_fixture(f);
}

/* ---- inside the group-commit writer -------------------------------------------------------- */

typedef struct writer_job {
    th_queue *q;
    const char *trial_id;
    int fail_with; /* apply's result after enqueueing: TH_EIO rolls the batch back */
    int enqueue_rc;
    char id[TH_TASK_ID_SIZE];
    char id_again[TH_TASK_ID_SIZE];
    bool existed;
} writer_job;

static int analysis_apply(th_store *store, void *arg)
{
    writer_job *j = arg;
    th_trial trial = {j->trial_id, "Trial", "[\"A\"]", "[0]"};
    int rc = th_store_trial_insert(store, &trial);
    if (rc != 0) {
        return rc;
    }
    th_task_spec spec = {.kind = "analysis",
                         .payload = "{\"analysis\":1}",
                         .idempotency_key = j->trial_id,
                         .scope = "analyses"};
    bool existed;
    j->enqueue_rc = th_queue_enqueue_in(j->q, store, &spec, j->id, &existed);
    if (j->enqueue_rc != 0) {
        return j->enqueue_rc;
    }
    /* the same key twice in one transaction: the task written just now */
    j->enqueue_rc = th_queue_enqueue_in(j->q, store, &spec, j->id_again, &j->existed);
    return j->enqueue_rc != 0 ? j->enqueue_rc : j->fail_with;
}

static int count_trial(void *arg, const th_trial *t)
{
    (void)t;
    (*(int *)arg)++;
    return 0;
}

static void test_enqueue_in_writer(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    char err[256];
    th_store *store;
    assert_int_equal(th_store_open(f->url, &store, err, sizeof(err)), 0);
    th_writer_config wc = {16, 16, 0};
    th_writer *writer;
    assert_int_equal(th_writer_create(store, &wc, NULL, &writer), 0);

    /* committed with the batch: the row and its task */
    writer_job ok = {.q = f->q, .trial_id = "T1"};
    assert_int_equal(th_writer_run(BG, writer, analysis_apply, &ok), 0);
    assert_int_equal(ok.enqueue_rc, 0);
    assert_true(ok.existed);
    assert_string_equal(ok.id, ok.id_again);
    th_queue_notify(f->q); /* what the job's done() does */
    assert_int_equal(state_of(f->q, ok.id), TH_TASK_QUEUED);
    th_task t = lease_ok(f->q, "analysis", 0, "w1");
    assert_string_equal(t.id, ok.id);
    assert_string_equal(t.payload, "{\"analysis\":1}");
    th_task_free(&t);

    /* rolled back with the batch: neither the row nor the task */
    writer_job bad = {.q = f->q, .trial_id = "T2", .fail_with = TH_EIO};
    assert_int_equal(th_writer_run(BG, writer, analysis_apply, &bad), TH_EIO);
    assert_int_equal(bad.enqueue_rc, 0);
    assert_int_equal(th_queue_get(BG, f->q, bad.id, &t), TH_ENOTFOUND);
    int64_t counts[TH_TASK_NSTATES];
    assert_int_equal(th_queue_counts(BG, f->q, counts), 0);
    int64_t total = 0;
    for (int i = 0; i < TH_TASK_NSTATES; i++) {
        total += counts[i];
    }
    assert_int_equal(total, 1);
    int trials = 0;
    assert_int_equal(th_store_trials_each(store, count_trial, &trials), 0);
    assert_int_equal(trials, 1);

    /* a job-level error before the enqueue: nothing enqueued */
    writer_job dup = {.q = f->q, .trial_id = "T1"}; /* the trial exists: TH_EEXIST */
    assert_int_equal(th_writer_run(BG, writer, analysis_apply, &dup), TH_EEXIST);

    th_writer_destroy(writer);
    th_store_close(store);

    /* a queue on another file refuses the store's transaction */
    fixture other;
    snprintf(other.dir, sizeof(other.dir), "%s", f->dir);
    snprintf(other.url, sizeof(other.url), "sqlite://%s/other.db", f->dir);
    assert_int_equal(th_store_open(other.url, &store, err, sizeof(err)), 0);
    assert_int_equal(th_writer_create(store, &wc, NULL, &writer), 0);
    writer_job wrong = {.q = f->q, .trial_id = "T3"};
    assert_int_equal(th_writer_run(BG, writer, analysis_apply, &wrong), TH_EINVAL);
    assert_int_equal(wrong.enqueue_rc, TH_EINVAL);
    th_writer_destroy(writer);
    th_store_close(store);
    close_fixture(f);
}

/* ---- waiting ------------------------------------------------------------------------------- */

typedef struct waiter_arg {
    th_queue *q;
    th_ctx *ctx;
    uint32_t timeout_ms;
    int rc;
    uint64_t woke_ns;
} waiter_arg;

static void *waiter_main(void *arg)
{
    waiter_arg *w = arg;
    w->rc = th_queue_wait(w->ctx, w->q, w->timeout_ms);
    w->woke_ns = th_clock_now_ns();
    return NULL;
}

static void test_wait(void **state)
{
    (void)state;
    th_queue_config config = {.poll_interval_ms = 60000, .now_ms = fake_clock};
    fixture *f = open_fixture(&config);
    char id[TH_TASK_ID_SIZE];

    /* an enqueue in this process wakes a waiter at once */
    waiter_arg w = {.q = f->q, .ctx = BG, .timeout_ms = 30000};
    pthread_t thread = spawn(waiter_main, &w);
    sleep_ms(50);
    uint64_t sent_ns = th_clock_now_ns();
    enqueue(f->q, "analysis", 0, "{}", id);
    join(thread);
    assert_int_equal(w.rc, 0);
    assert_true(w.woke_ns - sent_ns < PROMPT_NS);

    /* a notify between a lease that found nothing and the wait is not lost */
    th_task t = lease_ok(f->q, "analysis", 0, "w1");
    th_task_free(&t);
    lease_none(f->q, "analysis", 0, "w1");
    th_queue_notify(f->q);
    uint64_t t0 = th_clock_now_ns();
    assert_int_equal(th_queue_wait(BG, f->q, 30000), 0);
    assert_true(th_clock_now_ns() - t0 < PROMPT_NS);
    /* ... and counts once: the next wait sleeps its timeout */
    t0 = th_clock_now_ns();
    assert_int_equal(th_queue_wait(BG, f->q, 100), 0);
    assert_true(th_clock_now_ns() - t0 >= MS(100));

    /* a canceled context ends the wait */
    th_ctx *ctx;
    t0 = th_clock_now_ns();
    assert_int_equal(th_ctx_with_timeout(BG, MS(80), &ctx), 0);
    w = (waiter_arg){.q = f->q, .ctx = ctx, .timeout_ms = 30000};
    thread = spawn(waiter_main, &w);
    join(thread);
    assert_int_equal(w.rc, TH_ETIMEDOUT);
    assert_true(w.woke_ns - t0 >= MS(80) && w.woke_ns - t0 < MS(80) + PROMPT_NS);
    th_ctx_release(ctx);
    close_fixture(f);

    /* other processes' work is seen by polling */
    config.poll_interval_ms = 100;
    f = open_fixture(&config);
    t0 = th_clock_now_ns();
    assert_int_equal(th_queue_wait(BG, f->q, 30000), 0);
    uint64_t waited = th_clock_now_ns() - t0;
    assert_true(waited >= MS(100) && waited < MS(100) + PROMPT_NS);
    close_fixture(f);
}

/* ---- many workers -------------------------------------------------------------------------- */

typedef struct shared_run {
    th_queue *q;
    int ntasks;
    _Atomic int *finished; /* per task number */
    _Atomic int finishes;
    atomic_bool enqueued; /* all tasks are in: an empty queue now means done */
} shared_run;

typedef struct worker_arg {
    shared_run *run;
    char owner[16];
} worker_arg;

static bool queue_drained(th_queue *q)
{
    int64_t counts[TH_TASK_NSTATES];
    if (th_queue_counts(BG, q, counts) != 0) {
        return false;
    }
    return counts[TH_TASK_QUEUED] + counts[TH_TASK_RUNNING] + counts[TH_TASK_FAILED] == 0;
}

static void *lease_worker(void *arg)
{
    worker_arg *w = arg;
    shared_run *run = w->run;
    th_task_kind kind = {"job", 0};
    for (;;) {
        th_task t;
        int rc = th_queue_lease(BG, run->q, &kind, 1, w->owner, 30000, &t);
        if (rc == TH_EAGAIN) {
            if (atomic_load(&run->enqueued) && queue_drained(run->q)) {
                break;
            }
            T_CHECK(th_queue_wait(BG, run->q, 100) == 0);
            continue;
        }
        T_CHECK(rc == 0);
        if (rc != 0) {
            break;
        }
        const char *n = strstr(t.payload, "\"n\":");
        T_CHECK(n != NULL);
        int num = n ? atoi(n + 4) : -1;
        T_CHECK(num >= 0 && num < run->ntasks);
        do {
            rc = th_queue_finish(BG, run->q, t.id, w->owner, t.attempts, "{\"ok\":true}");
        } while (rc == TH_EAGAIN);
        T_CHECK(rc == 0);
        if (rc == 0 && num >= 0 && num < run->ntasks) {
            atomic_fetch_add(&run->finished[num], 1);
            atomic_fetch_add(&run->finishes, 1);
        }
        th_task_free(&t);
    }
    return NULL;
}

static void test_threads_exactly_once(void **state)
{
    (void)state;
    th_queue_config config = {.poll_interval_ms = 20};
    fixture *f = open_fixture(&config);
    shared_run run = {.q = f->q, .ntasks = SCALED(2000)};
    run.finished = calloc((size_t)run.ntasks, sizeof(*run.finished));
    assert_non_null(run.finished);

    enum { NTHREADS = 8 };
    worker_arg workers[NTHREADS];
    pthread_t threads[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        workers[i].run = &run;
        snprintf(workers[i].owner, sizeof(workers[i].owner), "thread-%d", i);
        threads[i] = spawn(lease_worker, &workers[i]);
    }
    /* enqueued while the workers already lease: they wait, wake and contend */
    for (int i = 0; i < run.ntasks; i++) {
        char payload[32], id[TH_TASK_ID_SIZE];
        snprintf(payload, sizeof(payload), "{\"n\":%d}", i);
        enqueue(f->q, "job", i % 3, payload, id);
    }
    atomic_store(&run.enqueued, true);
    for (int i = 0; i < NTHREADS; i++) {
        join(threads[i]);
    }
    assert_int_equal(atomic_load(&run.finishes), run.ntasks);
    for (int i = 0; i < run.ntasks; i++) {
        assert_int_equal(atomic_load(&run.finished[i]), 1);
    }
    int64_t counts[TH_TASK_NSTATES];
    assert_int_equal(th_queue_counts(BG, f->q, counts), 0);
    assert_int_equal(counts[TH_TASK_SUCCEEDED], run.ntasks);
    free(run.finished);
    close_fixture(f);
}

static int cmp_id(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Four worker processes (tests/unit/queue/queue_helper.c) lease the same 2000 tasks at once,
 * and a fifth exits abruptly holding the lease of the first task it gets, as a killed worker
 * would: that task must be redone by another once the lease expires. Each task must succeed
 * exactly once, none may be lost. */
static void test_processes_exactly_once(void **state)
{
    (void)state;
    enum { NPROC = 5, NTASKS = 2000 }; /* process 0 is the one that dies */
    th_queue_config config = {0};
    fixture *f = open_fixture(&config);
    char(*ids)[TH_TASK_ID_SIZE] = calloc(NTASKS, TH_TASK_ID_SIZE);
    assert_non_null(ids);
    for (int i = 0; i < NTASKS; i++) {
        char payload[32];
        snprintf(payload, sizeof(payload), "{\"n\":%d}", i);
        enqueue(f->q, "job", 0, payload, ids[i]);
    }

    pid_t pids[NPROC];
    for (int i = 0; i < NPROC; i++) {
        char out[128], owner[16];
        snprintf(out, sizeof(out), "%s/out-%d.txt", f->dir, i);
        snprintf(owner, sizeof(owner), "proc-%d", i);
        posix_spawn_file_actions_t actions;
        assert_int_equal(posix_spawn_file_actions_init(&actions), 0);
        assert_int_equal(
            posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0600),
            0);
        char *argv[] = {TH_QUEUE_HELPER, f->url, owner, "1000", i == 0 ? "crash" : "work", NULL};
        assert_int_equal(posix_spawn(&pids[i], TH_QUEUE_HELPER, &actions, NULL, argv, environ), 0);
        posix_spawn_file_actions_destroy(&actions);
    }
    for (int i = 0; i < NPROC; i++) {
        int status;
        assert_int_equal(waitpid(pids[i], &status, 0), pids[i]);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), i == 0 ? 3 : 0);
    }

    /* every id reported finished exactly once, across the processes */
    qsort(ids, NTASKS, TH_TASK_ID_SIZE, cmp_id);
    int *seen = calloc(NTASKS, sizeof(int));
    assert_non_null(seen);
    int total = 0;
    char orphan[TH_TASK_ID_SIZE] = "";
    for (int i = 0; i < NPROC; i++) {
        char path[128], line[64];
        snprintf(path, sizeof(path), "%s/out-%d.txt", f->dir, i);
        FILE *in = fopen(path, "r");
        assert_non_null(in);
        int mine = 0;
        while (fgets(line, sizeof(line), in) != NULL) {
            line[strcspn(line, "\n")] = '\0';
            if (i == 0) { /* "leased <id>", then it died */
                assert_int_equal(strncmp(line, "leased ", 7), 0);
                assert_int_equal(strlen(line + 7), TH_TASK_ID_SIZE - 1);
                memcpy(orphan, line + 7, TH_TASK_ID_SIZE);
                continue;
            }
            char(*hit)[TH_TASK_ID_SIZE] = bsearch(line, ids, NTASKS, TH_TASK_ID_SIZE, cmp_id);
            assert_non_null(hit);
            seen[hit - ids]++;
            mine++;
        }
        fclose(in);
        print_message("proc-%d finished %d tasks\n", i, mine);
        total += mine;
    }
    assert_int_equal(total, NTASKS);
    for (int i = 0; i < NTASKS; i++) {
        assert_int_equal(seen[i], 1);
        th_task t = get_ok(f->q, ids[i]);
        assert_int_equal(t.state, TH_TASK_SUCCEEDED);
        assert_non_null(strstr(t.result, "\"by\":\"proc-"));
        th_task_free(&t);
    }
    /* the dead worker's task was redone by a live one, after its lease expired */
    assert_int_equal(strlen(orphan), TH_TASK_ID_SIZE - 1);
    th_task t = get_ok(f->q, orphan);
    assert_int_equal(t.attempts, 2);
    assert_string_not_equal(t.lease_owner, "proc-0");
    th_task_free(&t);
    free(seen);
    free(ids);
    close_fixture(f);
}

/* ---- open under allocation failure, query plans -------------------------------------------- */

static void test_open_alloc_failure(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    th_queue_close(f->q);
    f->q = NULL;
    char err[256];
    long n;
    for (n = 0; n < 10000; n++) {
        th_queue *q = NULL;
        th__fault_fail_after(n);
        int rc = th_queue_open(f->url, NULL, &q, err, sizeof(err));
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            assert_non_null(q);
            /* the queue works after a recovered failure */
            char id[TH_TASK_ID_SIZE];
            enqueue(q, "analysis", 0, "{}", id);
            th_queue_close(q);
            if (!fired) {
                break;
            }
            continue;
        }
        assert_true(fired);
        assert_true(rc == TH_ENOMEM || rc == TH_ESYS || rc == TH_EIO);
        assert_null(q);
    }
    assert_true(n > 0 && n < 10000);
    close_fixture(f);
}

static void test_lease_plan(void **state)
{
    (void)state;
    fixture *f = open_fixture(NULL);
    for (int i = 0; i < 200; i++) {
        char id[TH_TASK_ID_SIZE];
        enqueue(f->q, i % 2 ? "analysis" : "webhook", i % 7, "{}", id);
    }
    char plan[2048];
    assert_int_equal(th__queue_sql_explain(f->q, plan, sizeof(plan)), 0);
    print_message("%s", plan);
    assert_non_null(strstr(plan, "INDEX tasks_due (kind=?)"));
    assert_non_null(strstr(plan, "INDEX tasks_running (kind=? AND due_ms>?)"));
    assert_null(strstr(plan, "SCAN"));
    assert_null(strstr(plan, "TEMP B-TREE"));
    close_fixture(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_enqueue_lease_finish, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_bad_arguments, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_open_errors, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_priorities, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_kind_limit, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_lease_expiry_result_once, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_heartbeat_extends, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_retry_backoff_dead, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_backoff_formula, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_lost_on_last_attempt, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_cancel, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_idempotency_key, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_enqueue_in_writer, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_wait, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_threads_exactly_once, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_processes_exactly_once, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_open_alloc_failure, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_lease_plan, setup_reset, teardown_check),
    };
    const char *filter = getenv("TEST_FILTER"); /* e.g. TEST_FILTER=test_wait */
    if (filter != NULL) {
        cmocka_set_test_filter(filter);
    }
    return cmocka_run_group_tests(tests, NULL, NULL);
}
