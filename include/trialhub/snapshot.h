/* Read-mostly snapshot (RCU-style): many readers get the current immutable version of a value
 * without taking any lock a writer can hold; one writer at a time publishes a new version, and
 * old versions are freed once no reader holds them (hazard pointers). Readers never wait for
 * writers; a read costs two loads and a store to the reader thread's own cache line. This is what
 * the trial progress cache is built on. See docs/internals/snapshot.md. */
#ifndef TRIALHUB_SNAPSHOT_H
#define TRIALHUB_SNAPSHOT_H

#include "trialhub/error.h"

typedef struct th_snapshot th_snapshot;

/* Frees one version; called by the writer thread (publish or destroy), never by a reader. */
typedef void (*th_snapshot_free_fn)(void *version);

/* A reader's hold on one version: stack storage, fields private. */
typedef struct th_snapshot_guard {
    void *slot;
} th_snapshot_guard;

/* Most versions one thread may hold at once (nested guards, across all snapshots). */
#define TH_SNAPSHOT_MAX_GUARDS 4

/* Creates a snapshot whose first version is initial (not NULL), freed later with free_fn
 * (NULL: versions are not freed, for static data). Takes ownership of initial on success only.
 * Returns 0, TH_EINVAL or TH_ENOMEM (*out untouched). */
TH_MUST_CHECK int th_snapshot_create(void *initial, th_snapshot_free_fn free_fn, th_snapshot **out);

/* Returns the current version and holds it in *guard until th_snapshot_release(guard): it will
 * not be freed meanwhile, and it must be treated as read-only. Never blocks, takes no lock.
 * Returns NULL only when this thread's reader record could not be allocated (out of memory);
 * then guard needs no release. Holding more than TH_SNAPSHOT_MAX_GUARDS at once asserts.
 * Thread-safe. */
const void *th_snapshot_acquire(th_snapshot *snap, th_snapshot_guard *guard);

/* Ends a hold taken with th_snapshot_acquire(). Must be called on the thread that acquired. */
void th_snapshot_release(th_snapshot_guard *guard);

/* Publishes version (not NULL) as the new current one; takes ownership of it. Readers that
 * started before keep the old version until they release it; it is freed by a later publish or
 * by destroy, once no guard holds it. Writers are serialized by an internal mutex that readers
 * never touch. Returns 0 or TH_EINVAL (NULL version) or TH_ENOMEM; on error version stays the
 * caller's. */
TH_MUST_CHECK int th_snapshot_publish(th_snapshot *snap, void *version);

/* Returns the number of published versions, 1 after create; for tests and metrics. */
unsigned long th_snapshot_generation(th_snapshot *snap);

/* Frees the current version and every retired one. No reader may hold a guard on snap.
 * NULL is a no-op. */
void th_snapshot_destroy(th_snapshot *snap);

#endif
