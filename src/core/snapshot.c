/* Read-mostly snapshots on hazard pointers. Each reader thread owns one record of
 * TH_SNAPSHOT_MAX_GUARDS slots on its own cache line, found through a thread-local pointer; a
 * read publishes the version it is about to use in a slot and re-checks that it is still
 * current. A writer swaps in the new version and frees retired ones that no slot names. The
 * records form a global list that only grows; a thread's record is recycled when it exits.
 *
 * Memory order: the reader's slot store and re-load of `current`, and the writer's exchange and
 * slot scan, are all sequentially consistent, so either the writer sees the slot or the reader
 * sees the new version (the classic hazard-pointer argument).
 *
 * Locking: readers take no lock. `writer_mu` serializes publish/destroy and protects
 * `retired`. The global record list is lock-free (push-only). */
#include "trialhub/snapshot.h"

#include <assert.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "trialhub/alloc.h"

typedef struct hp_record {
    _Alignas(64) void *_Atomic slots[TH_SNAPSHOT_MAX_GUARDS];
    atomic_bool in_use; /* owned by a live thread */
    struct hp_record *next;
} hp_record;

static hp_record *_Atomic hp_records;
static _Thread_local hp_record *hp_mine;
static pthread_key_t hp_key;
static pthread_once_t hp_key_once = PTHREAD_ONCE_INIT;
static bool hp_key_ok;

struct th_snapshot {
    void *_Atomic current;
    pthread_mutex_t writer_mu;
    th_snapshot_free_fn free_fn;
    void **retired; /* under writer_mu */
    size_t nretired;
    size_t retired_cap;
    _Atomic unsigned long generation;
};

/* Thread exit: clear the record's slots and hand it to the next thread. */
static void hp_thread_exit(void *arg)
{
    hp_record *rec = arg;
    for (int i = 0; i < TH_SNAPSHOT_MAX_GUARDS; i++) {
        atomic_store(&rec->slots[i], NULL);
    }
    atomic_store(&rec->in_use, false);
}

static void hp_key_create(void)
{
    hp_key_ok = pthread_key_create(&hp_key, hp_thread_exit) == 0;
}

static hp_record *hp_record_get(void)
{
    if (hp_mine != NULL) {
        return hp_mine;
    }
    pthread_once(&hp_key_once, hp_key_create);
    if (!hp_key_ok) {
        return NULL;
    }
    hp_record *rec;
    /* Recycle a record of an exited thread. */
    for (rec = atomic_load(&hp_records); rec != NULL; rec = rec->next) {
        bool expected = false;
        if (!atomic_load_explicit(&rec->in_use, memory_order_relaxed) &&
            atomic_compare_exchange_strong(&rec->in_use, &expected, true)) {
            break;
        }
    }
    if (rec == NULL) {
        rec = th_aligned_calloc(_Alignof(hp_record), 1, sizeof(*rec));
        if (rec == NULL) {
            return NULL;
        }
        atomic_init(&rec->in_use, true);
        hp_record *head = atomic_load(&hp_records);
        do {
            rec->next = head;
        } while (!atomic_compare_exchange_weak(&hp_records, &head, rec));
    }
    if (pthread_setspecific(hp_key, rec) != 0) {
        atomic_store(&rec->in_use, false);
        return NULL;
    }
    hp_mine = rec;
    return rec;
}

int th_snapshot_create(void *initial, th_snapshot_free_fn free_fn, th_snapshot **out)
{
    if (initial == NULL) {
        return TH_EINVAL;
    }
    th_snapshot *snap = th_calloc(1, sizeof(*snap));
    if (snap == NULL) {
        return TH_ENOMEM;
    }
    atomic_init(&snap->current, initial);
    atomic_init(&snap->generation, 1);
    pthread_mutex_init(&snap->writer_mu, NULL);
    snap->free_fn = free_fn;
    *out = snap;
    return 0;
}

const void *th_snapshot_acquire(th_snapshot *snap, th_snapshot_guard *guard)
{
    hp_record *rec = hp_record_get();
    if (rec == NULL) {
        guard->slot = NULL;
        return NULL;
    }
    void *_Atomic *slot = NULL;
    for (int i = 0; i < TH_SNAPSHOT_MAX_GUARDS; i++) {
        if (atomic_load_explicit(&rec->slots[i], memory_order_relaxed) == NULL) {
            slot = &rec->slots[i];
            break;
        }
    }
    assert(slot != NULL && "more than TH_SNAPSHOT_MAX_GUARDS snapshot guards held");
    void *version = atomic_load(&snap->current);
    for (;;) {
        atomic_store(slot, version);
        void *again = atomic_load(&snap->current);
        if (again == version) {
            break;
        }
        version = again;
    }
    guard->slot = (void *)slot;
    return version;
}

void th_snapshot_release(th_snapshot_guard *guard)
{
    void *_Atomic *slot = guard->slot;
    if (slot != NULL) {
        atomic_store_explicit(slot, NULL, memory_order_release);
        guard->slot = NULL;
    }
}

static bool hp_held(const void *version)
{
    for (hp_record *rec = atomic_load(&hp_records); rec != NULL; rec = rec->next) {
        for (int i = 0; i < TH_SNAPSHOT_MAX_GUARDS; i++) {
            if (atomic_load(&rec->slots[i]) == version) {
                return true;
            }
        }
    }
    return false;
}

/* Frees every retired version no slot names. Called with writer_mu held. */
static void reclaim_locked(th_snapshot *snap)
{
    size_t kept = 0;
    for (size_t i = 0; i < snap->nretired; i++) {
        void *version = snap->retired[i];
        if (hp_held(version)) {
            snap->retired[kept++] = version;
        } else if (snap->free_fn) {
            snap->free_fn(version);
        }
    }
    snap->nretired = kept;
}

int th_snapshot_publish(th_snapshot *snap, void *version)
{
    if (version == NULL) {
        return TH_EINVAL;
    }
    pthread_mutex_lock(&snap->writer_mu);
    /* Make room first, so that a failure leaves everything as it was. */
    if (snap->nretired == snap->retired_cap) {
        reclaim_locked(snap);
        if (snap->nretired == snap->retired_cap) {
            size_t cap = snap->retired_cap ? snap->retired_cap * 2 : 8;
            void **retired = th_realloc_array(snap->retired, cap, sizeof(void *));
            if (retired == NULL) {
                pthread_mutex_unlock(&snap->writer_mu);
                return TH_ENOMEM;
            }
            snap->retired = retired;
            snap->retired_cap = cap;
        }
    }
    void *old = atomic_exchange(&snap->current, version);
    atomic_fetch_add(&snap->generation, 1);
    snap->retired[snap->nretired++] = old;
    reclaim_locked(snap);
    pthread_mutex_unlock(&snap->writer_mu);
    return 0;
}

unsigned long th_snapshot_generation(th_snapshot *snap)
{
    return atomic_load(&snap->generation);
}

void th_snapshot_destroy(th_snapshot *snap)
{
    if (snap == NULL) {
        return;
    }
    pthread_mutex_lock(&snap->writer_mu);
    if (snap->free_fn) {
        for (size_t i = 0; i < snap->nretired; i++) {
            snap->free_fn(snap->retired[i]);
        }
        snap->free_fn(atomic_load(&snap->current));
    }
    pthread_mutex_unlock(&snap->writer_mu);
    pthread_mutex_destroy(&snap->writer_mu);
    th_free(snap->retired);
    th_free(snap);
}
