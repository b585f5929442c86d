/* Trial progress: per trial, patients enrolled (by site and arm), questionnaires received
 * (total, today, by instrument), visit completion by site (visits due so far by the schedule
 * vs visits with data), mean score by instrument and visit week, and open safety alerts,
 * served from an immutable in-memory snapshot (th_snapshot) as pre-rendered JSON.
 *
 * Many readers, one writer: request threads read the current version without taking any lock
 * the updater can hold; one updater thread owns every mutable count. Committed writes reach it
 * as notes through a bounded channel (never blocking the writer thread that sends them); it
 * applies them and publishes a new version at most every publish_interval_ms. A periodic full
 * rebuild from the store (and one at start, before create returns) corrects any drift: a note
 * lost to a full channel triggers one at once. Notes carry the store's change sequence
 * (response id, score sequence) so that a rebuild never counts a change twice. */
#ifndef TRIALHUB_PROGRESS_H
#define TRIALHUB_PROGRESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/buf.h"
#include "trialhub/error.h"
#include "trialhub/events.h"
#include "trialhub/metrics.h"
#include "trialhub/roster.h"
#include "trialhub/store.h"

typedef struct th_progress th_progress;

typedef struct th_progress_config {
    th_store *store;
    th_roster *roster;
    th_events *events;            /* may be NULL: progress.changed events, per trial */
    th_metrics *metrics;          /* may be NULL */
    unsigned publish_interval_ms; /* 0: 200 */
    unsigned rebuild_interval_s;  /* 0: 60 */
    size_t queue_capacity;        /* notes waiting for the updater; 0: 16384 */
} th_progress_config;

/* A committed change, as the writer's completion sees it. Strings are copied. */
typedef struct th_progress_note {
    int64_t qr_id;
    int64_t score_seq; /* scores: the store's score sequence (th_qr_score.seq) */
    const char *trial_id;
    const char *site_id;
    const char *patient_id;
    const char *instrument;
    int visit_week; /* -1: unknown */
    int64_t received_ms;
    bool has_score;
    double score;
    bool alert;
} th_progress_note;

/* Builds the first version from the store and roster, then starts the updater thread. Returns
 * 0, TH_EINVAL, TH_EIO, TH_ENOMEM or TH_ESYS. *out is the caller's (th_progress_destroy()). */
TH_MUST_CHECK int th_progress_create(const th_progress_config *config, th_progress **out);

/* Stops the updater and frees everything. No reader may hold a version. NULL is a no-op. */
void th_progress_destroy(th_progress *progress);

/* Notes a newly stored response / a committed score. Never blocks: when the updater's queue is
 * full the note is dropped and a rebuild is requested, so the counts still converge. Thread-safe
 * (the writer thread's completions call these). */
void th_progress_note_submission(th_progress *progress, const th_progress_note *note);
void th_progress_note_score(th_progress *progress, const th_progress_note *note);

/* Asks for a rebuild soon (at most one a second): the roster changed (trial, site or patient
 * added). Thread-safe, never blocks. */
void th_progress_note_roster(th_progress *progress);

/* Copies the progress document of trial_id into out (appended), restricted to site_id's rows
 * when site_id is not NULL, and its entity tag (quoted, at most 40 bytes with the NUL) into
 * etag. When if_none_match equals that tag, copies nothing and sets *not_modified. Returns 0,
 * TH_ENOTFOUND (no such trial, or no such site in it) or TH_ENOMEM. Lock-free for the caller:
 * never waits for the updater. Thread-safe. */
TH_MUST_CHECK int th_progress_read(th_progress *progress, const char *trial_id, const char *site_id,
                                   const char *if_none_match, th_buf *out, char etag[40],
                                   bool *not_modified);

typedef struct th_progress_stats {
    uint64_t versions; /* versions published */
    uint64_t notes;    /* notes applied */
    uint64_t dropped;  /* notes dropped on a full queue */
    uint64_t rebuilds; /* full rebuilds from the store */
} th_progress_stats;

void th_progress_get_stats(th_progress *progress, th_progress_stats *out);

/* Waits until every note sent before the call is applied and published (tests, benchmarks).
 * Returns 0 or TH_ETIMEDOUT after timeout_ms. */
TH_MUST_CHECK int th_progress_sync(th_progress *progress, unsigned timeout_ms);

#endif
