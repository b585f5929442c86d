/* bench_core: micro-benchmarks of trialhub's concurrency core, run by `make bench-core`.
 * Measures (details and recorded figures in bench/README.md):
 *   - th_pool vs GLib's GThreadPool: 2,000,000 trivial tasks (one relaxed atomic increment),
 *     2 workers, one submitting thread; 5 alternated pairs, the median ratio is the last line.
 *   - the thread-per-task anti-pattern (one pthread_create per task, 100,000 tasks) vs th_pool:
 *     throughput and peak RSS (VmHWM), each in its own forked child.
 *   - th_chan: send/recv pairs per second, one producer thread and one consumer thread.
 *   - th_snapshot vs pthread_rwlock_t: reads/s of 4 readers while 1 writer publishes a new
 *     version every ~100 us.
 * Wall-clock figures on a machine assumed shared and noisy, hence the alternation and medians.
 */
#include <errno.h>
#include <fcntl.h>
#include <glib.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "trialhub/chan.h"
#include "trialhub/clock.h"
#include "trialhub/ctx.h"
#include "trialhub/pool.h"
#include "trialhub/snapshot.h"

#define POOL_TASKS      UINT64_C(2000000)
#define POOL_THREADS    2u
#define POOL_QUEUE_CAP  4096u
#define PAIRS           5
#define SPAWN_TASKS     UINT64_C(100000)
#define CHAN_ITEMS      UINT64_C(2000000)
#define CHAN_CAP        1024u
#define SNAP_READERS    4
#define SNAP_ROUNDS     3 /* alternated windows per variant */
#define SNAP_RUN_NS     (TH_NS_PER_S / SNAP_ROUNDS)
#define SNAP_PUBLISH_NS (100 * TH_NS_PER_US)
#define MAP_ENTRIES     16
#define NS_PER_S_DOUBLE 1e9

/* ---- small helpers ------------------------------------------------------------------------ */

static uint64_t cpu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * TH_NS_PER_S + (uint64_t)ts.tv_nsec;
}

static double per_s(uint64_t count, uint64_t ns)
{
    return ns == 0 ? 0.0 : (double)count * NS_PER_S_DOUBLE / (double)ns;
}

_Noreturn static void die(const char *what, int rc)
{
    fprintf(stderr, "bench_core: %s failed (%d)\n", what, rc);
    exit(1);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n values (1 <= n <= 16); does not reorder v. */
static double median(const double *v, size_t n)
{
    double tmp[16];
    if (n > sizeof(tmp) / sizeof(tmp[0])) {
        n = sizeof(tmp) / sizeof(tmp[0]);
    }
    memcpy(tmp, v, n * sizeof(double));
    qsort(tmp, n, sizeof(double), cmp_double);
    return n % 2 ? tmp[n / 2] : (tmp[n / 2 - 1] + tmp[n / 2]) / 2.0;
}

/* A field of /proc/self/status in kB (VmRSS, VmHWM, Threads...), or -1. */
static long proc_status_kb(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL) {
        return -1;
    }
    char line[256];
    size_t len = strlen(field);
    long value = -1;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, field, len) == 0 && line[len] == ':') {
            value = strtol(line + len + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return value;
}

/* Resets VmHWM to the current RSS (Linux >= 4.0). Returns whether it worked. */
static bool reset_peak_rss(void)
{
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0) {
        return false;
    }
    bool ok = write(fd, "5", 1) == 1;
    close(fd);
    return ok;
}

static void cpu_model(char *out, size_t size)
{
    snprintf(out, size, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f == NULL) {
        return;
    }
    char line[256];
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "model name", 10) == 0) {
            const char *colon = strchr(line, ':');
            if (colon != NULL) {
                snprintf(out, size, "%s", colon + 2);
                out[strcspn(out, "\n")] = '\0';
            }
            break;
        }
    }
    fclose(f);
}

/* ---- completion gate: the task body, and how the timer learns the last task finished ------ */

typedef struct gate {
    _Atomic uint64_t count;
    uint64_t target;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool done;
} gate;

static void gate_init(gate *g, uint64_t target)
{
    atomic_init(&g->count, 0);
    g->target = target;
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cond, NULL);
    g->done = false;
}

static void gate_destroy(gate *g)
{
    pthread_cond_destroy(&g->cond);
    pthread_mutex_destroy(&g->mu);
}

/* The trivial task: one relaxed increment; the one that completes the set wakes the waiter. */
static void gate_hit(gate *g)
{
    uint64_t n = atomic_fetch_add_explicit(&g->count, 1, memory_order_relaxed) + 1;
    if (n == g->target) {
        pthread_mutex_lock(&g->mu);
        g->done = true;
        pthread_cond_signal(&g->cond);
        pthread_mutex_unlock(&g->mu);
    }
}

static void gate_wait(gate *g)
{
    pthread_mutex_lock(&g->mu);
    while (!g->done) {
        pthread_cond_wait(&g->cond, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
}

/* ---- 1-3: th_pool vs GThreadPool -------------------------------------------------------- */

typedef struct run_result {
    uint64_t wall_ns;
    uint64_t cpu_ns; /* process CPU time, every thread */
} run_result;

static void pool_task(void *arg, int status)
{
    (void)status;
    gate_hit(arg);
}

static void glib_task(gpointer data, gpointer user_data)
{
    (void)user_data;
    gate_hit(data);
}

static th_pool *pool_new(void)
{
    th_pool_config cfg = {
        .name = "bench", .nthreads = POOL_THREADS, .queue_capacity = POOL_QUEUE_CAP};
    th_pool *pool;
    int rc = th_pool_create(&cfg, &pool);
    if (rc != 0) {
        die("th_pool_create", rc);
    }
    return pool;
}

/* Submits n tasks to a started pool and waits for the last one; returns the timings. */
static run_result pool_run_on(th_pool *pool, uint64_t n)
{
    gate g;
    gate_init(&g, n);
    th_ctx *bg = th_ctx_background();
    uint64_t c0 = cpu_now_ns(), t0 = th_clock_now_ns();
    for (uint64_t i = 0; i < n; i++) {
        int rc = th_pool_submit(bg, pool, pool_task, &g);
        if (rc != 0) {
            die("th_pool_submit", rc);
        }
    }
    gate_wait(&g);
    run_result r = {.wall_ns = th_clock_now_ns() - t0, .cpu_ns = cpu_now_ns() - c0};
    gate_destroy(&g);
    return r;
}

static run_result pool_run(uint64_t n)
{
    th_pool *pool = pool_new();
    run_result r = pool_run_on(pool, n);
    int rc = th_pool_shutdown(th_ctx_background(), pool);
    if (rc != 0) {
        die("th_pool_shutdown", rc);
    }
    th_pool_destroy(pool);
    return r;
}

static run_result glib_run(uint64_t n, gboolean exclusive)
{
    GError *err = NULL;
    gate g;
    gate_init(&g, n);
    GThreadPool *gp = g_thread_pool_new(glib_task, NULL, (gint)POOL_THREADS, exclusive, &err);
    if (gp == NULL) {
        die("g_thread_pool_new", err ? err->code : -1);
    }
    uint64_t c0 = cpu_now_ns(), t0 = th_clock_now_ns();
    for (uint64_t i = 0; i < n; i++) {
        if (!g_thread_pool_push(gp, &g, &err)) {
            die("g_thread_pool_push", err ? err->code : -1);
        }
    }
    gate_wait(&g);
    run_result r = {.wall_ns = th_clock_now_ns() - t0, .cpu_ns = cpu_now_ns() - c0};
    g_thread_pool_free(gp, FALSE, TRUE);
    gate_destroy(&g);
    return r;
}

/* ---- 4: thread per task, and the pool's memory, each in a forked child -------------------- */

typedef struct child_report {
    bool ok;
    bool hwm_reset; /* VmHWM could be reset to the child's RSS at its start */
    uint64_t wall_ns;
    long rss_before_kb;
    long rss_after_kb;
    long anon_before_kb; /* RssAnon: the heap and stacks, without the code pages faulted in */
    long anon_after_kb;
    long hwm_kb;
    long vm_peak_kb; /* peak virtual size: thread stacks are reserved, mostly not touched */
    uint64_t peak_live_threads;
} child_report;

typedef struct spawn_arg {
    gate *g;
    _Atomic uint64_t *live;
} spawn_arg;

static void *spawn_task(void *arg)
{
    spawn_arg *sa = arg;
    gate_hit(sa->g);
    atomic_fetch_sub_explicit(sa->live, 1, memory_order_relaxed);
    return NULL;
}

/* One thread per task: detached (the thread-per-request server) or created and joined. */
static void spawn_child(child_report *rep, bool detach)
{
    gate g;
    gate_init(&g, SPAWN_TASKS);
    _Atomic uint64_t live;
    atomic_init(&live, 0);
    spawn_arg sa = {.g = &g, .live = &live};
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    if (detach) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    }
    uint64_t peak = 0;
    uint64_t t0 = th_clock_now_ns();
    for (uint64_t i = 0; i < SPAWN_TASKS; i++) {
        uint64_t now_live = atomic_fetch_add_explicit(&live, 1, memory_order_relaxed) + 1;
        if (now_live > peak) {
            peak = now_live;
        }
        pthread_t t;
        int rc;
        while ((rc = pthread_create(&t, &attr, spawn_task, &sa)) == EAGAIN) {
            sched_yield(); /* too many threads alive: the anti-pattern's failure mode */
        }
        if (rc != 0) {
            die("pthread_create", rc);
        }
        if (!detach) {
            pthread_join(t, NULL);
        }
    }
    gate_wait(&g);
    rep->wall_ns = th_clock_now_ns() - t0;
    /* A detached thread may still be between its last gate_hit and its exit. */
    while (atomic_load(&live) != 0) {
        sched_yield();
    }
    pthread_attr_destroy(&attr);
    rep->peak_live_threads = peak;
    rep->ok = true;
}

static void pool_child(child_report *rep)
{
    th_pool *pool = pool_new();
    rep->rss_before_kb = proc_status_kb("VmRSS");
    rep->anon_before_kb = proc_status_kb("RssAnon");
    run_result r = pool_run_on(pool, POOL_TASKS);
    rep->wall_ns = r.wall_ns;
    rep->rss_after_kb = proc_status_kb("VmRSS");
    rep->anon_after_kb = proc_status_kb("RssAnon");
    rep->hwm_kb = proc_status_kb("VmHWM");
    rep->vm_peak_kb = proc_status_kb("VmPeak");
    rep->peak_live_threads = POOL_THREADS;
    if (th_pool_shutdown(th_ctx_background(), pool) != 0) {
        return;
    }
    th_pool_destroy(pool);
    rep->ok = true;
}

enum child_kind { CHILD_POOL, CHILD_SPAWN_JOIN, CHILD_SPAWN_DETACH };

/* Runs one measurement in a fresh child process, so that VmHWM is its own. */
static child_report run_in_child(enum child_kind kind)
{
    child_report *shared =
        mmap(NULL, sizeof(*shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) {
        die("mmap", errno);
    }
    memset(shared, 0, sizeof(*shared));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        die("fork", errno);
    }
    if (pid == 0) {
        shared->hwm_reset = reset_peak_rss();
        shared->rss_before_kb = proc_status_kb("VmRSS");
        if (kind == CHILD_POOL) {
            pool_child(shared);
        } else {
            spawn_child(shared, kind == CHILD_SPAWN_DETACH);
            shared->rss_after_kb = proc_status_kb("VmRSS");
            shared->hwm_kb = proc_status_kb("VmHWM");
            shared->vm_peak_kb = proc_status_kb("VmPeak");
        }
        _exit(0);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    child_report rep = *shared;
    munmap(shared, sizeof(*shared));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        rep.ok = false;
    }
    return rep;
}

/* ---- 5: channel ------------------------------------------------------------------------- */

typedef struct chan_arg {
    th_chan *ch;
    pthread_barrier_t *start;
    uint64_t received;
} chan_arg;

static void *chan_producer(void *arg)
{
    chan_arg *ca = arg;
    th_ctx *bg = th_ctx_background();
    pthread_barrier_wait(ca->start);
    for (uint64_t i = 1; i <= CHAN_ITEMS; i++) {
        int rc = th_chan_send(bg, ca->ch, (void *)(uintptr_t)i);
        if (rc != 0) {
            die("th_chan_send", rc);
        }
    }
    (void)th_chan_close(ca->ch);
    return NULL;
}

static void *chan_consumer(void *arg)
{
    chan_arg *ca = arg;
    th_ctx *bg = th_ctx_background();
    void *item;
    uint64_t n = 0;
    pthread_barrier_wait(ca->start);
    while (th_chan_recv(bg, ca->ch, &item) == 0) {
        n++;
    }
    ca->received = n;
    return NULL;
}

static uint64_t chan_run(void)
{
    th_chan *ch;
    int rc = th_chan_create(CHAN_CAP, &ch);
    if (rc != 0) {
        die("th_chan_create", rc);
    }
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, 3);
    chan_arg ca = {.ch = ch, .start = &start, .received = 0};
    pthread_t prod, cons;
    rc = pthread_create(&prod, NULL, chan_producer, &ca);
    if (rc == 0) {
        rc = pthread_create(&cons, NULL, chan_consumer, &ca);
    }
    if (rc != 0) {
        die("pthread_create", rc);
    }
    pthread_barrier_wait(&start);
    uint64_t t0 = th_clock_now_ns();
    pthread_join(prod, NULL);
    pthread_join(cons, NULL);
    uint64_t ns = th_clock_now_ns() - t0;
    if (ca.received != CHAN_ITEMS) {
        die("channel item count", (int)(CHAN_ITEMS - ca.received));
    }
    pthread_barrier_destroy(&start);
    th_chan_destroy(ch);
    return ns;
}

/* ---- 6: snapshot vs rwlock -------------------------------------------------------------- */

typedef struct kv_map {
    uint64_t version;
    uint64_t key[MAP_ENTRIES];
    uint64_t val[MAP_ENTRIES];
} kv_map;

enum rw_kind { RW_SNAPSHOT, RW_LOCK_DEFAULT, RW_LOCK_PREFER_WRITER };

typedef struct rw_shared {
    bool use_snapshot;
    th_snapshot *snap;
    pthread_rwlock_t lock;
    kv_map map; /* the rwlock variant's map, updated in place */
    atomic_bool stop;
    pthread_barrier_t start;
} rw_shared;

typedef struct rw_reader {
    rw_shared *sh;
    uint64_t reads;
    uint64_t sink;
} rw_reader;

/* The fields a reader looks at: the version and three values. */
static uint64_t read_fields(const kv_map *m)
{
    return m->version + m->val[1] + m->val[7] + m->val[13];
}

static void *rw_reader_main(void *arg)
{
    rw_reader *r = arg;
    rw_shared *sh = r->sh;
    uint64_t n = 0, sink = 0;
    pthread_barrier_wait(&sh->start);
    if (sh->use_snapshot) {
        while (!atomic_load_explicit(&sh->stop, memory_order_relaxed)) {
            th_snapshot_guard guard;
            const kv_map *m = th_snapshot_acquire(sh->snap, &guard);
            sink += read_fields(m);
            th_snapshot_release(&guard);
            n++;
        }
    } else {
        while (!atomic_load_explicit(&sh->stop, memory_order_relaxed)) {
            pthread_rwlock_rdlock(&sh->lock);
            sink += read_fields(&sh->map);
            pthread_rwlock_unlock(&sh->lock);
            n++;
        }
    }
    r->reads = n;
    r->sink = sink;
    return NULL;
}

static void *rw_writer_main(void *arg)
{
    rw_reader *w = arg; /* reads counts publishes */
    rw_shared *sh = w->sh;
    uint64_t n = 0;
    kv_map next;
    memcpy(&next, &sh->map, sizeof(next));
    pthread_barrier_wait(&sh->start);
    struct timespec due;
    clock_gettime(CLOCK_MONOTONIC, &due);
    while (!atomic_load_explicit(&sh->stop, memory_order_relaxed)) {
        due.tv_nsec += (long)SNAP_PUBLISH_NS;
        if (due.tv_nsec >= (long)TH_NS_PER_S) {
            due.tv_nsec -= (long)TH_NS_PER_S;
            due.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &due, NULL);
        next.version++;
        next.val[n % MAP_ENTRIES] += 1;
        if (sh->use_snapshot) {
            kv_map *v = malloc(sizeof(*v));
            if (v == NULL) {
                die("malloc", ENOMEM);
            }
            memcpy(v, &next, sizeof(*v));
            int rc = th_snapshot_publish(sh->snap, v);
            if (rc != 0) {
                die("th_snapshot_publish", rc);
            }
        } else {
            pthread_rwlock_wrlock(&sh->lock);
            sh->map.version = next.version;
            sh->map.val[n % MAP_ENTRIES] = next.val[n % MAP_ENTRIES];
            pthread_rwlock_unlock(&sh->lock);
        }
        n++;
    }
    w->reads = n;
    return NULL;
}

typedef struct rw_result {
    uint64_t reads;
    uint64_t writes;
    uint64_t ns;
    uint64_t cpu_ns; /* process CPU time: normalizes for CPU taken by other processes */
} rw_result;

/* Runs one window of SNAP_RUN_NS and adds its counts to *acc. */
static void rw_run(enum rw_kind kind, rw_result *acc)
{
    rw_shared sh;
    memset(&sh, 0, sizeof(sh));
    bool use_snapshot = kind == RW_SNAPSHOT;
    sh.use_snapshot = use_snapshot;
    for (uint64_t i = 0; i < MAP_ENTRIES; i++) {
        sh.map.key[i] = i * 7919;
        sh.map.val[i] = i;
    }
    if (use_snapshot) {
        kv_map *first = malloc(sizeof(*first));
        if (first == NULL) {
            die("malloc", ENOMEM);
        }
        memcpy(first, &sh.map, sizeof(*first));
        int rc = th_snapshot_create(first, free, &sh.snap);
        if (rc != 0) {
            die("th_snapshot_create", rc);
        }
    }
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    if (kind == RW_LOCK_PREFER_WRITER) {
        /* glibc's default prefers readers, so a writer can starve under constant reads. */
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    }
    pthread_rwlock_init(&sh.lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    atomic_init(&sh.stop, false);
    pthread_barrier_init(&sh.start, NULL, SNAP_READERS + 2);
    rw_reader readers[SNAP_READERS + 1];
    pthread_t threads[SNAP_READERS + 1];
    for (int i = 0; i <= SNAP_READERS; i++) {
        readers[i] = (rw_reader){.sh = &sh, .reads = 0, .sink = 0};
        void *(*fn)(void *) = i < SNAP_READERS ? rw_reader_main : rw_writer_main;
        int rc = pthread_create(&threads[i], NULL, fn, &readers[i]);
        if (rc != 0) {
            die("pthread_create", rc);
        }
    }
    pthread_barrier_wait(&sh.start);
    uint64_t t0 = th_clock_now_ns(), c0 = cpu_now_ns();
    struct timespec run = {.tv_sec = (time_t)(SNAP_RUN_NS / TH_NS_PER_S),
                           .tv_nsec = (long)(SNAP_RUN_NS % TH_NS_PER_S)};
    while (nanosleep(&run, &run) != 0 && errno == EINTR) {
    }
    atomic_store(&sh.stop, true);
    for (int i = 0; i <= SNAP_READERS; i++) {
        pthread_join(threads[i], NULL);
    }
    acc->ns += th_clock_now_ns() - t0;
    acc->cpu_ns += cpu_now_ns() - c0;
    for (int i = 0; i < SNAP_READERS; i++) {
        acc->reads += readers[i].reads;
    }
    acc->writes += readers[SNAP_READERS].reads;
    pthread_barrier_destroy(&sh.start);
    pthread_rwlock_destroy(&sh.lock);
    th_snapshot_destroy(sh.snap);
}

/* ---- main ------------------------------------------------------------------------------- */

static void print_child(const char *what, const child_report *rep, uint64_t tasks)
{
    if (!rep->ok) {
        printf("  %-24s  FAILED\n", what);
        return;
    }
    printf("  %-24s %11.0f %8.0f %9ld %9ld %9ld %9ld %7llu\n", what, per_s(tasks, rep->wall_ns),
           (double)rep->wall_ns / (double)tasks, rep->rss_before_kb, rep->rss_after_kb, rep->hwm_kb,
           rep->vm_peak_kb / 1024, (unsigned long long)rep->peak_live_threads);
}

static void print_rw(const char *what, const rw_result *r)
{
    printf("  %-32s %13.0f %9.0f %12.1f\n", what, per_s(r->reads, r->ns), per_s(r->writes, r->ns),
           r->reads ? (double)r->cpu_ns / (double)r->reads : 0.0);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    char model[128], date[64];
    cpu_model(model, sizeof(model));
    time_t now = time(NULL);
    strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S %Z", localtime(&now));
    uint64_t bench_t0 = th_clock_now_ns();
#if defined(__clang__)
    const char *cc = "clang";
#elif defined(__GNUC__)
    const char *cc = "gcc";
#else
    const char *cc = "cc";
#endif

    printf("trialhub bench_core: concurrency core micro-benchmarks\n");
    printf("date      %s\n", date);
    printf("machine   nproc=%ld  cpu=%s\n", sysconf(_SC_NPROCESSORS_ONLN), model);
    printf("compiler  %s %s, glib %u.%u.%u\n", cc, __VERSION__, glib_major_version,
           glib_minor_version, glib_micro_version);

    /* 4 first: the children fork from a process with no extra threads and a small heap. */
    printf("\nthread per task vs th_pool, each in its own forked child (memory in kB)\n");
    printf("  %-24s %11s %8s %9s %9s %9s %9s %7s\n", "", "tasks/s", "ns/task", "RSS start",
           "RSS end", "VmHWM", "VmPeakMB", "threads");
    child_report pool_mem = run_in_child(CHILD_POOL);
    child_report spawn_join = run_in_child(CHILD_SPAWN_JOIN);
    child_report spawn_det = run_in_child(CHILD_SPAWN_DETACH);
    print_child("th_pool, 2,000,000", &pool_mem, POOL_TASKS);
    print_child("create+join, 100,000", &spawn_join, SPAWN_TASKS);
    print_child("create+detach, 100,000", &spawn_det, SPAWN_TASKS);
    if (!pool_mem.hwm_reset) {
        printf("  (VmHWM could not be reset in the children: it includes the parent's peak)\n");
    }
    printf("  th_pool: RSS start = pool created, before the first task; RssAnon %ld -> %ld kB\n",
           pool_mem.anon_before_kb, pool_mem.anon_after_kb);
    printf("  threads = most task threads alive at once (th_pool: its workers)\n");

    /* Which GThreadPool mode to compare against: the faster one, best of two runs each. */
    printf("\nGThreadPool mode, 2,000,000 tasks, best of 2 runs each\n");
    uint64_t best[2] = {UINT64_MAX, UINT64_MAX};
    for (int rep = 0; rep < 2; rep++) {
        for (int k = 0; k < 2; k++) {
            int mode = rep == 0 ? k : 1 - k;
            run_result r = glib_run(POOL_TASKS, mode ? TRUE : FALSE);
            if (r.wall_ns < best[mode]) {
                best[mode] = r.wall_ns;
            }
        }
    }
    gboolean exclusive = best[1] < best[0];
    printf("  exclusive=FALSE %12.0f tasks/s\n", per_s(POOL_TASKS, best[0]));
    printf("  exclusive=TRUE  %12.0f tasks/s\n", per_s(POOL_TASKS, best[1]));
    printf("  -> comparing against exclusive=%s\n", exclusive ? "TRUE" : "FALSE");

    printf("\nth_pool vs GThreadPool: 2,000,000 trivial tasks, %u workers, 1 submitter\n",
           POOL_THREADS);
    printf("  th_pool_submit (waits when full), queue %u | g_thread_pool_push (unbounded)\n",
           POOL_QUEUE_CAP);
    printf("  %-4s %-9s %12s %7s %7s %12s %7s %7s %6s\n", "pair", "order", "pool task/s", "wall ns",
           "cpu ns", "glib task/s", "wall ns", "cpu ns", "ratio");
    double pool_tps[PAIRS], glib_tps[PAIRS], ratios[PAIRS], cpu_ratios[PAIRS];
    double pool_wall[PAIRS], pool_cpu[PAIRS], glib_wall[PAIRS], glib_cpu[PAIRS];
    for (int i = 0; i < PAIRS; i++) {
        run_result p, g;
        if (i % 2 == 0) {
            p = pool_run(POOL_TASKS);
            g = glib_run(POOL_TASKS, exclusive);
        } else {
            g = glib_run(POOL_TASKS, exclusive);
            p = pool_run(POOL_TASKS);
        }
        pool_tps[i] = per_s(POOL_TASKS, p.wall_ns);
        glib_tps[i] = per_s(POOL_TASKS, g.wall_ns);
        ratios[i] = pool_tps[i] / glib_tps[i];
        pool_wall[i] = (double)p.wall_ns / (double)POOL_TASKS;
        pool_cpu[i] = (double)p.cpu_ns / (double)POOL_TASKS;
        glib_wall[i] = (double)g.wall_ns / (double)POOL_TASKS;
        glib_cpu[i] = (double)g.cpu_ns / (double)POOL_TASKS;
        cpu_ratios[i] = glib_cpu[i] / pool_cpu[i];
        printf("  %-4d %-9s %12.0f %7.1f %7.1f %12.0f %7.1f %7.1f %6.2f\n", i + 1,
               i % 2 == 0 ? "pool,glib" : "glib,pool", pool_tps[i], pool_wall[i], pool_cpu[i],
               glib_tps[i], glib_wall[i], glib_cpu[i], ratios[i]);
    }
    printf("  %-14s %12.0f %7.1f %7.1f %12.0f %7.1f %7.1f %6.2f\n", "median",
           median(pool_tps, PAIRS), median(pool_wall, PAIRS), median(pool_cpu, PAIRS),
           median(glib_tps, PAIRS), median(glib_wall, PAIRS), median(glib_cpu, PAIRS),
           median(ratios, PAIRS));
    printf("  wall ns = elapsed / tasks (per-task overhead); cpu ns = process CPU time of all\n"
           "  threads / tasks; timed from the first submit until the last task has run\n");

    printf("\nth_chan: 1 producer thread, 1 consumer thread, %llu items, capacity %u\n",
           (unsigned long long)CHAN_ITEMS, CHAN_CAP);
    uint64_t chan_ns = chan_run();
    double chan_ps = per_s(CHAN_ITEMS, chan_ns);
    printf("  %12.0f send/recv pairs/s  (%.1f ns per item)\n", chan_ps,
           (double)chan_ns / (double)CHAN_ITEMS);

    printf("\nth_snapshot vs pthread_rwlock_t: %d readers, 1 writer every ~%llu us, ~1 s each\n"
           "  (%d alternated windows of %llu ms per variant)\n",
           SNAP_READERS, (unsigned long long)(SNAP_PUBLISH_NS / TH_NS_PER_US), SNAP_ROUNDS,
           (unsigned long long)(SNAP_RUN_NS / TH_NS_PER_MS));
    rw_result rws[3];
    memset(rws, 0, sizeof(rws));
    for (int round = 0; round < SNAP_ROUNDS; round++) {
        for (int k = 0; k < 3; k++) {
            int kind = (k + round) % 3;
            rw_run((enum rw_kind)kind, &rws[kind]);
        }
    }
    rw_result snap = rws[RW_SNAPSHOT], rwd = rws[RW_LOCK_DEFAULT], rww = rws[RW_LOCK_PREFER_WRITER];
    double snap_rps = per_s(snap.reads, snap.ns);
    double rwd_rps = per_s(rwd.reads, rwd.ns), rww_rps = per_s(rww.reads, rww.ns);
    printf("  %-32s %13s %9s %12s\n", "", "reads/s", "writes/s", "CPU ns/read");
    print_rw("th_snapshot", &snap);
    print_rw("pthread_rwlock_t (default)", &rwd);
    print_rw("pthread_rwlock_t (prefer writer)", &rww);
    printf("  snapshot/rwlock read ratio: %.2f (default), %.2f (prefer writer)\n",
           rwd_rps > 0 ? snap_rps / rwd_rps : 0.0, rww_rps > 0 ? snap_rps / rww_rps : 0.0);
    printf("  writes/s below ~10000: the writer did not get its turn every 100 us; CPU ns/read =\n"
           "  process CPU time / reads (robust to CPU taken by other processes)\n");

    printf("\nsummary (bench took %.1f s)\n", (double)(th_clock_now_ns() - bench_t0) / 1e9);
    printf("  %-32s %13s\n", "", "per second");
    printf("  %-32s %13.0f  %.1f ns/task wall, %.1f ns CPU\n", "th_pool tasks (median)",
           median(pool_tps, PAIRS), median(pool_wall, PAIRS), median(pool_cpu, PAIRS));
    printf("  %-32s %13.0f  %.1f ns/task wall, %.1f ns CPU, exclusive=%s\n",
           "GThreadPool tasks (median)", median(glib_tps, PAIRS), median(glib_wall, PAIRS),
           median(glib_cpu, PAIRS), exclusive ? "TRUE" : "FALSE");
    printf("  %-32s %13s  RSS %ld -> %ld kB (anon %ld -> %ld) over 2M tasks\n", "th_pool memory",
           "", pool_mem.rss_before_kb, pool_mem.rss_after_kb, pool_mem.anon_before_kb,
           pool_mem.anon_after_kb);
    printf("  %-32s %13.0f  VmHWM %ld kB, %llu threads at once\n", "thread/task, create+join",
           per_s(SPAWN_TASKS, spawn_join.wall_ns), spawn_join.hwm_kb,
           (unsigned long long)spawn_join.peak_live_threads);
    printf("  %-32s %13.0f  VmHWM %ld kB, %llu threads at once\n", "thread/task, create+detach",
           per_s(SPAWN_TASKS, spawn_det.wall_ns), spawn_det.hwm_kb,
           (unsigned long long)spawn_det.peak_live_threads);
    printf("  %-32s %13.0f\n", "th_chan send/recv pairs", chan_ps);
    printf("  %-32s %13.0f  %.0f publishes/s\n", "th_snapshot reads", snap_rps,
           per_s(snap.writes, snap.ns));
    printf("  %-32s %13.0f  %.0f writes/s; snapshot/rwlock %.2f\n", "rwlock reads (default)",
           rwd_rps, per_s(rwd.writes, rwd.ns), rwd_rps > 0 ? snap_rps / rwd_rps : 0.0);
    printf("  %-32s %13.0f  %.0f writes/s; snapshot/rwlock %.2f\n", "rwlock reads (prefer writer)",
           rww_rps, per_s(rww.writes, rww.ns), rww_rps > 0 ? snap_rps / rww_rps : 0.0);
    printf("  %-32s %13s  %.2f (GLib CPU ns/task / th_pool CPU ns/task, median of pairs)\n",
           "pool/glib CPU-efficiency ratio", "", median(cpu_ratios, PAIRS));
    printf("pool/glib throughput ratio: %.2f\n", median(ratios, PAIRS));
    return 0;
}
