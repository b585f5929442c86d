/* Scoring after the commit: each accepted QuestionnaireResponse is scored on the worker pool
 * (DESIGN.md rule 1) and its score, band and safety alert are written back through the
 * group-commit writer. A full pool or writer never loses work: the response stays `pending` in
 * the store and the sweeper picks it up later (and at every start). */
#ifndef TRIALHUB_SCORING_H
#define TRIALHUB_SCORING_H

#include <stdint.h>

#include "trialhub/error.h"
#include "trialhub/events.h"
#include "trialhub/fhir.h"
#include "trialhub/metrics.h"
#include "trialhub/pool.h"
#include "trialhub/store.h"
#include "trialhub/writer.h"

typedef struct th_scoring th_scoring;
typedef struct th_progress th_progress;

typedef struct th_scoring_config {
    th_pool *pool;
    th_writer *writer;
    th_store *store;
    const th_qreg *qreg;
    th_metrics *metrics;        /* may be NULL */
    unsigned sweep_interval_ms; /* how often to look for pending rows after a rejection */
    th_progress *progress;      /* may be NULL: told of every committed score */
    th_events *events;          /* may be NULL: alert.raised events */
} th_scoring_config;

/* A stored response to score: its id and where it belongs. Strings are copied. */
typedef struct th_scoring_item {
    int64_t qr_id;
    const char *trial_id;
    const char *site_id;
    const char *patient_id;
    const char *instrument;
    int visit_week; /* -1: unknown */
} th_scoring_item;

/* Creates the service and starts its sweeper thread, which first re-queues every response left
 * pending by an earlier run. Returns 0, TH_EINVAL, TH_ENOMEM or TH_ESYS. */
TH_MUST_CHECK int th_scoring_create(const th_scoring_config *config, th_scoring **out);

/* Hands a committed response to the pool for scoring. Takes ownership of qr (parsed against the
 * registry the service uses) in every case. Never blocks; if the pool is full the row stays
 * pending and the sweeper will score it. Thread-safe. */
void th_scoring_submit(th_scoring *scoring, const th_scoring_item *item, th_qr *qr);

typedef struct th_scoring_stats {
    uint64_t scored;   /* score rows committed */
    uint64_t deferred; /* submissions left pending for the sweeper */
    uint64_t alerts;   /* safety alerts raised */
    uint64_t swept;    /* rows re-queued by the sweeper */
} th_scoring_stats;

void th_scoring_get_stats(th_scoring *scoring, th_scoring_stats *out);

/* Stops the sweeper (idempotent). Shutdown order: th_scoring_stop(), th_pool_shutdown(),
 * th_writer_stop(), th_scoring_destroy(). */
void th_scoring_stop(th_scoring *scoring);

/* Stops the sweeper if needed, waits (up to a few seconds) for tasks and score jobs still in
 * flight, and frees. NULL is a no-op. */
void th_scoring_destroy(th_scoring *scoring);

#endif
