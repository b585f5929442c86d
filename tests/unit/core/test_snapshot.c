/* Unit tests for th_snapshot: argument checks, visibility of published versions, deferred
 * freeing while guards (on this or other threads, nested) hold a version, generation counting,
 * recycling of exited reader threads' records, and behaviour under injected allocation failure. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/error.h"
#include "trialhub/snapshot.h"

/* ---- versions that record their own freeing ------------------------------------------------ */

#define MAX_VERSIONS 512
#define PAYLOAD_LEN  8

typedef struct version {
    int id;
    int payload[PAYLOAD_LEN]; /* id * 1000 + i: checked on every read and at free time */
} version;

/* Free calls per version id; bad_frees counts frees of a version whose payload was damaged. */
static atomic_int free_count[MAX_VERSIONS];
static atomic_int bad_frees;

static version *version_new(int id)
{
    assert_true(id >= 0 && id < MAX_VERSIONS);
    version *v = malloc(sizeof(*v));
    assert_non_null(v);
    v->id = id;
    for (int i = 0; i < PAYLOAD_LEN; i++) {
        v->payload[i] = id * 1000 + i;
    }
    atomic_store(&free_count[id], 0);
    return v;
}

static bool version_intact(const version *v)
{
    for (int i = 0; i < PAYLOAD_LEN; i++) {
        if (v->payload[i] != v->id * 1000 + i) {
            return false;
        }
    }
    return true;
}

static void version_free(void *arg)
{
    version *v = arg;
    if (v->id < 0 || v->id >= MAX_VERSIONS || !version_intact(v)) {
        atomic_fetch_add(&bad_frees, 1);
        return;
    }
    atomic_fetch_add(&free_count[v->id], 1);
    memset(v, 0xa5, sizeof(*v)); /* a later read of it shows up as damage */
    free(v);
}

static int frees(int id)
{
    return atomic_load(&free_count[id]);
}

static void assert_frees(int id, int want)
{
    int got = frees(id);
    if (got != want) {
        fail_msg("version %d was freed %d times, want %d", id, got, want);
    }
}

static th_snapshot *make_snapshot(version *initial)
{
    th_snapshot *snap = NULL;
    assert_int_equal(th_snapshot_create(initial, version_free, &snap), 0);
    assert_non_null(snap);
    return snap;
}

static const version *acquire(th_snapshot *snap, th_snapshot_guard *guard)
{
    const version *v = th_snapshot_acquire(snap, guard);
    assert_non_null(v);
    assert_true(version_intact(v));
    return v;
}

static void publish(th_snapshot *snap, int id)
{
    assert_int_equal(th_snapshot_publish(snap, version_new(id)), 0);
}

static int reset(void **state)
{
    (void)state;
    for (int i = 0; i < MAX_VERSIONS; i++) {
        atomic_store(&free_count[i], 0);
    }
    atomic_store(&bad_frees, 0);
    return 0;
}

static int check_no_bad_frees(void **state)
{
    (void)state;
    return atomic_load(&bad_frees) == 0 ? 0 : -1;
}

/* ---- thread helpers ------------------------------------------------------------------------ */

typedef struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    long count;
} gate;

static void gate_init(gate *g)
{
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cond, NULL);
    g->count = 0;
}

static void gate_add(gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->count++;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->mu);
}

/* Waits until the count reaches n. */
static void gate_wait(gate *g, long n)
{
    pthread_mutex_lock(&g->mu);
    while (g->count < n) {
        pthread_cond_wait(&g->cond, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
}

static void gate_destroy(gate *g)
{
    pthread_cond_destroy(&g->cond);
    pthread_mutex_destroy(&g->mu);
}

/* ---- basics -------------------------------------------------------------------------------- */

static char sentinel_byte;
#define SENTINEL_SNAP ((th_snapshot *)(void *)&sentinel_byte)

static void test_create_rejects_null_initial(void **state)
{
    (void)state;
    th_snapshot *snap = SENTINEL_SNAP;
    assert_int_equal(th_snapshot_create(NULL, version_free, &snap), TH_EINVAL);
    assert_ptr_equal(snap, SENTINEL_SNAP);
    assert_int_equal(th_snapshot_create(NULL, NULL, &snap), TH_EINVAL);
    assert_ptr_equal(snap, SENTINEL_SNAP);
}

static void test_acquire_returns_initial(void **state)
{
    (void)state;
    version *v0 = version_new(0);
    th_snapshot *snap = make_snapshot(v0);
    assert_int_equal(th_snapshot_generation(snap), 1);
    for (int i = 0; i < 3; i++) {
        th_snapshot_guard guard;
        const version *v = acquire(snap, &guard);
        assert_ptr_equal(v, v0);
        th_snapshot_release(&guard);
    }
    assert_frees(0, 0);
    th_snapshot_destroy(snap);
    assert_frees(0, 1);
}

static void test_publish_makes_new_version_visible(void **state)
{
    (void)state;
    th_snapshot *snap = make_snapshot(version_new(0));
    for (int id = 1; id <= 20; id++) {
        version *next = version_new(id);
        assert_int_equal(th_snapshot_publish(snap, next), 0);
        assert_int_equal(th_snapshot_generation(snap), (unsigned long)id + 1);
        th_snapshot_guard guard;
        const version *v = acquire(snap, &guard);
        assert_ptr_equal(v, next);
        assert_int_equal(v->id, id);
        th_snapshot_release(&guard);
        assert_frees(id, 0); /* the current version is never freed */
    }
    /* Unheld old versions do not pile up: all but a few are already gone. */
    int freed = 0;
    for (int id = 0; id < 20; id++) {
        assert_true(frees(id) <= 1);
        freed += frees(id);
    }
    assert_true(freed >= 20 - 2);
    th_snapshot_destroy(snap);
    for (int id = 0; id <= 20; id++) {
        assert_frees(id, 1);
    }
}

static void test_publish_rejects_null(void **state)
{
    (void)state;
    version *v0 = version_new(0);
    th_snapshot *snap = make_snapshot(v0);
    assert_int_equal(th_snapshot_publish(snap, NULL), TH_EINVAL);
    assert_int_equal(th_snapshot_generation(snap), 1);
    th_snapshot_guard guard;
    assert_ptr_equal(acquire(snap, &guard), v0);
    th_snapshot_release(&guard);
    assert_frees(0, 0);
    th_snapshot_destroy(snap);
    assert_frees(0, 1);
}

static void test_generation_counts_publishes(void **state)
{
    (void)state;
    th_snapshot *snap = make_snapshot(version_new(0));
    assert_int_equal(th_snapshot_generation(snap), 1);
    for (int id = 1; id < 100; id++) {
        publish(snap, id);
        assert_int_equal(th_snapshot_generation(snap), (unsigned long)id + 1);
    }
    assert_int_equal(th_snapshot_publish(snap, NULL), TH_EINVAL);
    assert_int_equal(th_snapshot_generation(snap), 100);
    th_snapshot_destroy(snap);
}

/* ---- guards delay freeing ------------------------------------------------------------------ */

static void test_guard_delays_free_until_later_publish(void **state)
{
    (void)state;
    version *v0 = version_new(0);
    th_snapshot *snap = make_snapshot(v0);
    th_snapshot_guard guard;
    const version *held = acquire(snap, &guard);
    assert_ptr_equal(held, v0);

    publish(snap, 1);
    publish(snap, 2);
    assert_frees(0, 0);
    assert_true(version_intact(held)); /* still readable: ASan would see a use after free */

    th_snapshot_release(&guard);
    publish(snap, 3); /* a later publish frees what no guard holds */
    assert_frees(0, 1);
    assert_frees(3, 0);
    th_snapshot_destroy(snap);
    for (int id = 0; id <= 3; id++) {
        assert_frees(id, 1);
    }
}

static void test_guard_delays_free_until_destroy(void **state)
{
    (void)state;
    th_snapshot *snap = make_snapshot(version_new(0));
    th_snapshot_guard guard;
    const version *held = acquire(snap, &guard);
    publish(snap, 1);
    assert_frees(0, 0);
    assert_true(version_intact(held));
    th_snapshot_release(&guard);
    th_snapshot_destroy(snap);
    assert_frees(0, 1);
    assert_frees(1, 1);
}

/* Up to TH_SNAPSHOT_MAX_GUARDS guards at once, each on a different version (and across two
 * snapshots, since the limit is per thread): each held version survives until its own release,
 * and the slots are reusable afterwards. */
static void test_nested_guards(void **state)
{
    (void)state;
    enum { N = TH_SNAPSHOT_MAX_GUARDS };
    th_snapshot *snap = make_snapshot(version_new(0));
    th_snapshot_guard guards[N];
    const version *held[N];
    for (int i = 0; i < N; i++) {
        held[i] = acquire(snap, &guards[i]);
        assert_int_equal(held[i]->id, i);
        publish(snap, i + 1);
    }
    publish(snap, N + 1);
    for (int i = 0; i < N; i++) {
        assert_frees(i, 0);
        assert_true(version_intact(held[i]));
    }

    /* Release out of order; each release lets exactly that version go at the next publish. */
    const int order[] = {2, 0, 3, 1};
    int next_id = N + 2;
    for (size_t k = 0; k < sizeof(order) / sizeof(order[0]); k++) {
        int i = order[k];
        th_snapshot_release(&guards[i]);
        publish(snap, next_id++);
        assert_frees(i, 1);
        for (size_t later = k + 1; later < sizeof(order) / sizeof(order[0]); later++) {
            assert_frees(order[later], 0);
            assert_true(version_intact(held[order[later]]));
        }
    }

    /* The same version twice: it stays held until both guards are gone. */
    th_snapshot_guard a, b;
    const version *va = acquire(snap, &a);
    const version *vb = acquire(snap, &b);
    assert_ptr_equal(va, vb);
    int shared_id = va->id;
    publish(snap, next_id++);
    th_snapshot_release(&a);
    publish(snap, next_id++);
    assert_frees(shared_id, 0);
    assert_true(version_intact(vb));
    th_snapshot_release(&b);
    publish(snap, next_id++);
    assert_frees(shared_id, 1);

    /* Two snapshots share this thread's guard slots. */
    th_snapshot *other = make_snapshot(version_new(100));
    th_snapshot_guard g0, g1, g2, g3;
    const version *o0 = acquire(other, &g0);
    const version *s1 = acquire(snap, &g1);
    const version *o2 = acquire(other, &g2);
    const version *s3 = acquire(snap, &g3);
    assert_int_equal(o0->id, 100);
    assert_ptr_equal(o0, o2);
    assert_ptr_equal(s1, s3);
    assert_int_equal(th_snapshot_publish(other, version_new(101)), 0);
    publish(snap, next_id++);
    assert_frees(100, 0);
    assert_frees(s1->id, 0);
    th_snapshot_release(&g3);
    th_snapshot_release(&g2);
    th_snapshot_release(&g1);
    th_snapshot_release(&g0);
    th_snapshot_destroy(other);
    assert_frees(100, 1);
    assert_frees(101, 1);

    int last_id = next_id - 1;
    th_snapshot_destroy(snap);
    for (int id = 0; id <= last_id; id++) {
        assert_frees(id, 1);
    }
}

static void test_free_fn_null_for_static_versions(void **state)
{
    (void)state;
    static const int values[3] = {10, 20, 30};
    th_snapshot *snap = NULL;
    assert_int_equal(th_snapshot_create((void *)&values[0], NULL, &snap), 0);
    for (int i = 1; i < 3; i++) {
        th_snapshot_guard guard;
        const int *held = th_snapshot_acquire(snap, &guard);
        assert_non_null(held);
        assert_int_equal(*held, values[i - 1]);
        assert_int_equal(th_snapshot_publish(snap, (void *)&values[i]), 0);
        assert_int_equal(*held, values[i - 1]);
        th_snapshot_release(&guard);
    }
    th_snapshot_guard guard;
    assert_ptr_equal(th_snapshot_acquire(snap, &guard), &values[2]);
    th_snapshot_release(&guard);
    th_snapshot_destroy(snap);
}

static void test_destroy_null(void **state)
{
    (void)state;
    th_snapshot_destroy(NULL);
}

/* ---- other threads ------------------------------------------------------------------------- */

typedef struct holder {
    th_snapshot *snap;
    gate acquired;
    gate checked;
    gate may_check;   /* main bumps it: check the held version is intact */
    gate may_release; /* main bumps it: release and exit */
    const version *held;
    atomic_bool intact;
} holder;

static void *holder_main(void *arg)
{
    holder *h = arg;
    th_snapshot_guard guard;
    h->held = th_snapshot_acquire(h->snap, &guard);
    gate_add(&h->acquired);
    gate_wait(&h->may_check, 1);
    atomic_store(&h->intact, h->held != NULL && version_intact(h->held));
    gate_add(&h->checked);
    gate_wait(&h->may_release, 1);
    th_snapshot_release(&guard);
    return NULL;
}

/* A version held by another thread's guard survives any number of publishes and stays intact;
 * once that thread releases it and exits, the next publish frees it. */
static void test_guard_on_other_thread_delays_free(void **state)
{
    (void)state;
    th_snapshot *snap = make_snapshot(version_new(0));
    holder *h = calloc(1, sizeof(*h));
    assert_non_null(h);
    h->snap = snap;
    gate_init(&h->acquired);
    gate_init(&h->checked);
    gate_init(&h->may_check);
    gate_init(&h->may_release);
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, holder_main, h), 0);
    gate_wait(&h->acquired, 1);
    assert_non_null(h->held);
    assert_int_equal(h->held->id, 0);

    for (int id = 1; id <= 50; id++) {
        publish(snap, id);
    }
    assert_frees(0, 0);
    for (int id = 1; id < 50; id++) {
        assert_true(frees(id) <= 1);
    }
    gate_add(&h->may_check);
    gate_wait(&h->checked, 1);
    assert_true(atomic_load(&h->intact));
    assert_frees(0, 0);

    gate_add(&h->may_release);
    assert_int_equal(pthread_join(thread, NULL), 0);
    publish(snap, 51);
    assert_frees(0, 1);
    th_snapshot_destroy(snap);
    for (int id = 0; id <= 51; id++) {
        assert_frees(id, 1);
    }
    gate_destroy(&h->acquired);
    gate_destroy(&h->checked);
    gate_destroy(&h->may_check);
    gate_destroy(&h->may_release);
    free(h);
}

/* Short-lived reader threads, K alive at a time. */
typedef struct reader_round {
    th_snapshot *snap;
    gate arrived;
    long parties;
    atomic_int null_reads;
    atomic_int bad_reads;
} reader_round;

static void *short_reader_main(void *arg)
{
    reader_round *r = arg;
    th_snapshot_guard guard;
    const version *v = th_snapshot_acquire(r->snap, &guard);
    if (v == NULL) {
        atomic_fetch_add(&r->null_reads, 1);
    } else if (!version_intact(v)) {
        atomic_fetch_add(&r->bad_reads, 1);
    }
    /* Every reader of the round is alive (and holds its record) at the same time. */
    gate_add(&r->arrived);
    gate_wait(&r->arrived, r->parties);
    if (v != NULL) {
        th_snapshot_release(&guard);
    }
    return NULL;
}

static void run_reader_round(th_snapshot *snap, long parties, int *null_reads, int *bad_reads)
{
    reader_round *r = calloc(1, sizeof(*r));
    assert_non_null(r);
    r->snap = snap;
    r->parties = parties;
    gate_init(&r->arrived);
    pthread_t threads[64];
    assert_true(parties <= 64);
    for (long i = 0; i < parties; i++) {
        assert_int_equal(pthread_create(&threads[i], NULL, short_reader_main, r), 0);
    }
    for (long i = 0; i < parties; i++) {
        assert_int_equal(pthread_join(threads[i], NULL), 0);
    }
    *null_reads = atomic_load(&r->null_reads);
    *bad_reads = atomic_load(&r->bad_reads);
    gate_destroy(&r->arrived);
    free(r);
}

/* A reader thread that exits gives its record back: after one round of K concurrent readers,
 * later rounds of K readers need no allocation at all (every allocation is made to fail and
 * none is attempted), so the set of records does not grow with the number of threads. */
static void test_exited_reader_threads_recycle_records(void **state)
{
    (void)state;
    enum { K = 4, ROUNDS = 60 };
    th_snapshot *snap = make_snapshot(version_new(0));
    int null_reads, bad_reads;
    run_reader_round(snap, K, &null_reads, &bad_reads);
    assert_int_equal(null_reads, 0);
    assert_int_equal(bad_reads, 0);

    for (int round = 0; round < ROUNDS; round++) {
        th__fault_fail_after(0);
        run_reader_round(snap, K, &null_reads, &bad_reads);
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (fired || null_reads != 0) {
            fail_msg("round %d: %d of %d new reader threads needed a new record", round, null_reads,
                     K);
        }
        assert_int_equal(bad_reads, 0);
        /* Versions published between rounds are seen and freed as usual. */
        publish(snap, round + 1);
    }
    th_snapshot_destroy(snap);
    for (int id = 0; id <= ROUNDS; id++) {
        assert_frees(id, 1);
    }
}

/* ---- allocation failure -------------------------------------------------------------------- */

typedef struct oom_reader {
    th_snapshot *snap;
    const void *first; /* acquire with every allocation failing */
    bool fired;
    const void *second; /* acquire again with injection off */
    bool guard_empty;
} oom_reader;

static void *oom_reader_main(void *arg)
{
    oom_reader *r = arg;
    th_snapshot_guard guard;
    memset(&guard, 0xff, sizeof(guard));
    th__fault_fail_after(0);
    r->first = th_snapshot_acquire(r->snap, &guard);
    r->fired = th__fault_fired();
    th__fault_fail_after(-1);
    if (r->first == NULL) {
        th_snapshot_release(&guard); /* must be a no-op */
    }
    r->second = th_snapshot_acquire(r->snap, &guard);
    if (r->second != NULL) {
        th_snapshot_release(&guard);
    }
    return NULL;
}

typedef struct holders {
    th_snapshot *snap;
    gate arrived;
    gate leave;
    atomic_int null_reads;
} holders;

static void *record_holder_main(void *arg)
{
    holders *h = arg;
    th_snapshot_guard guard;
    const void *v = th_snapshot_acquire(h->snap, &guard);
    if (v == NULL) {
        atomic_fetch_add(&h->null_reads, 1);
    }
    gate_add(&h->arrived);
    gate_wait(&h->leave, 1);
    if (v != NULL) {
        th_snapshot_release(&guard);
    }
    return NULL;
}

/* A new reader thread whose record cannot be allocated gets NULL and needs no release; its next
 * acquire (memory available again) works. Every recyclable record is first taken by threads
 * that stay alive, so the new thread must allocate. */
static void test_acquire_without_memory_returns_null(void **state)
{
    (void)state;
    enum { NHOLDERS = 32 };
    version *v0 = version_new(0);
    th_snapshot *snap = make_snapshot(v0);
    holders *h = calloc(1, sizeof(*h));
    assert_non_null(h);
    h->snap = snap;
    gate_init(&h->arrived);
    gate_init(&h->leave);
    pthread_t threads[NHOLDERS];
    for (int i = 0; i < NHOLDERS; i++) {
        assert_int_equal(pthread_create(&threads[i], NULL, record_holder_main, h), 0);
    }
    gate_wait(&h->arrived, NHOLDERS);
    assert_int_equal(atomic_load(&h->null_reads), 0);

    oom_reader r = {.snap = snap};
    pthread_t thread;
    assert_int_equal(pthread_create(&thread, NULL, oom_reader_main, &r), 0);
    assert_int_equal(pthread_join(thread, NULL), 0);
    assert_null(r.first);
    assert_true(r.fired);
    assert_ptr_equal(r.second, v0);

    gate_add(&h->leave);
    for (int i = 0; i < NHOLDERS; i++) {
        assert_int_equal(pthread_join(threads[i], NULL), 0);
    }
    th_snapshot_destroy(snap);
    assert_frees(0, 1);
    gate_destroy(&h->arrived);
    gate_destroy(&h->leave);
    free(h);
}

/* Fails the Nth allocation for increasing N until create succeeds: each failure is TH_ENOMEM
 * with *out untouched and the initial version still the caller's (not freed). */
static void test_create_under_injected_failures(void **state)
{
    (void)state;
    version *v0 = version_new(0);
    th_snapshot *snap = SENTINEL_SNAP;
    long n;
    for (n = 0; n < 100; n++) {
        snap = SENTINEL_SNAP;
        th__fault_fail_after(n);
        int rc = th_snapshot_create(v0, version_free, &snap);
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            assert_false(fired);
            break;
        }
        assert_true(fired);
        assert_int_equal(rc, TH_ENOMEM);
        assert_ptr_equal(snap, SENTINEL_SNAP);
        assert_frees(0, 0);
        assert_true(version_intact(v0));
    }
    assert_true(n >= 1 && n < 100);
    th_snapshot_guard guard;
    assert_ptr_equal(acquire(snap, &guard), v0);
    th_snapshot_release(&guard);
    th_snapshot_destroy(snap);
    assert_frees(0, 1);
}

/* Publish under allocation failure: each failure is TH_ENOMEM and leaves everything as it was
 * (the version stays the caller's, the current version and generation are unchanged). Covers
 * the first publish and one made while guards on this thread and another hold old versions. */
static void check_publish_failures(th_snapshot *snap, int id, const version *current)
{
    version *next = version_new(id);
    unsigned long generation = th_snapshot_generation(snap);
    long n;
    for (n = 0; n < 100; n++) {
        th__fault_fail_after(n);
        int rc = th_snapshot_publish(snap, next);
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            assert_false(fired);
            break;
        }
        assert_true(fired);
        assert_int_equal(rc, TH_ENOMEM);
        assert_frees(id, 0);
        assert_true(version_intact(next));
        assert_int_equal(th_snapshot_generation(snap), generation);
        th_snapshot_guard guard;
        assert_ptr_equal(acquire(snap, &guard), current);
        th_snapshot_release(&guard);
    }
    assert_true(n < 100);
    assert_int_equal(th_snapshot_generation(snap), generation + 1);
    th_snapshot_guard guard;
    assert_ptr_equal(acquire(snap, &guard), next);
    th_snapshot_release(&guard);
}

/* A thread that holds the then-current version until told to let go. */
typedef struct pin {
    th_snapshot *snap;
    gate acquired;
    gate leave;
    const version *held;
    pthread_t thread;
} pin;

static void *pin_main(void *arg)
{
    pin *p = arg;
    th_snapshot_guard guard;
    p->held = th_snapshot_acquire(p->snap, &guard);
    gate_add(&p->acquired);
    gate_wait(&p->leave, 1);
    if (p->held != NULL) {
        th_snapshot_release(&guard);
    }
    return NULL;
}

static pin *pin_start(th_snapshot *snap)
{
    pin *p = calloc(1, sizeof(*p));
    assert_non_null(p);
    p->snap = snap;
    gate_init(&p->acquired);
    gate_init(&p->leave);
    assert_int_equal(pthread_create(&p->thread, NULL, pin_main, p), 0);
    gate_wait(&p->acquired, 1);
    assert_non_null(p->held);
    return p;
}

static void pin_stop(pin *p)
{
    gate_add(&p->leave);
    assert_int_equal(pthread_join(p->thread, NULL), 0);
    gate_destroy(&p->acquired);
    gate_destroy(&p->leave);
    free(p);
}

static void test_publish_under_injected_failures(void **state)
{
    (void)state;
    enum { NPINS = 12, NMORE = 12 };
    version *v0 = version_new(0);
    th_snapshot *snap = make_snapshot(v0);
    check_publish_failures(snap, 1, v0);

    /* Other threads hold old versions so that they pile up as retired ones and the retired list
     * has to grow while publishing under injection. */
    pin *pins[NPINS];
    int id = 2;
    th_snapshot_guard guard;
    for (int i = 0; i < NPINS; i++) {
        pins[i] = pin_start(snap);
        const version *current = acquire(snap, &guard);
        th_snapshot_release(&guard);
        check_publish_failures(snap, id++, current);
    }
    for (int i = 0; i < NPINS; i++) {
        assert_frees(pins[i]->held->id, 0);
        assert_true(version_intact(pins[i]->held));
    }
    for (int i = 0; i < NPINS; i++) {
        pin_stop(pins[i]);
    }
    for (int k = 0; k < NMORE; k++) {
        const version *current = acquire(snap, &guard);
        th_snapshot_release(&guard);
        check_publish_failures(snap, id++, current);
    }
    th_snapshot_destroy(snap);
    for (int k = 0; k < id; k++) {
        assert_frees(k, 1);
    }
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, reset, check_no_bad_frees)
    const struct CMUnitTest tests[] = {
        T(test_create_rejects_null_initial),         T(test_acquire_returns_initial),
        T(test_publish_makes_new_version_visible),   T(test_publish_rejects_null),
        T(test_generation_counts_publishes),         T(test_guard_delays_free_until_later_publish),
        T(test_guard_delays_free_until_destroy),     T(test_nested_guards),
        T(test_free_fn_null_for_static_versions),    T(test_destroy_null),
        T(test_guard_on_other_thread_delays_free),   T(test_exited_reader_threads_recycle_records),
        T(test_acquire_without_memory_returns_null), T(test_create_under_injected_failures),
        T(test_publish_under_injected_failures),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
