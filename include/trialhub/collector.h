/* Multi-site collection: pull QuestionnaireResponses from every site's FHIR server at once and
 * store them as if they had been posted here. Fan-out: one thread drives every site's transfers
 * with libcurl's multi interface (at most `max_in_flight` sites at a time, each with its own
 * timeout, following `next` links); fan-in: every fetched entry goes into one bounded channel,
 * closed by its one owner (that thread) when every site is finished, and drained by one consumer
 * that validates each resource with the ingestion code and writes through the group-commit
 * writer. The whole collection runs under one context: its deadline, or a DELETE, aborts every
 * transfer at once. Outcomes are kept per site; a slow or broken site affects only its own row.
 *
 * Collections are kept in memory (the data they bring is durable; a collection can always be
 * run again, and duplicates are recognised), at most `max_kept`, finished ones for a day. */
#ifndef TRIALHUB_COLLECTOR_H
#define TRIALHUB_COLLECTOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/buf.h"
#include "trialhub/error.h"
#include "trialhub/events.h"
#include "trialhub/fhir.h"
#include "trialhub/metrics.h"
#include "trialhub/roster.h"
#include "trialhub/store.h"
#include "trialhub/writer.h"

typedef struct th_collector th_collector;
typedef struct th_scoring th_scoring;
typedef struct th_progress th_progress;

typedef struct th_collector_config {
    th_store *store;
    th_writer *writer;
    th_roster *roster;
    const th_qreg *qreg;
    th_scoring *scoring;         /* may be NULL: collected responses are scored like posted ones */
    th_progress *progress;       /* may be NULL */
    th_events *events;           /* may be NULL */
    th_metrics *metrics;         /* may be NULL */
    unsigned max_in_flight;      /* sites fetched at once; 0: 16 */
    unsigned site_timeout_ms;    /* one site's whole fetch (all its pages); 0: 120000 */
    unsigned connect_timeout_ms; /* 0: 10000 */
    size_t max_page_bytes;       /* one page's body; 0: 32 MiB */
    unsigned max_pages;          /* per site, against a server that pages forever; 0: 10000 */
    size_t channel_capacity;     /* entries between fetchers and the consumer; 0: 1024 */
    unsigned max_kept;           /* collections remembered; 0: 256 */
    uint64_t every_ns;           /* run every trial's collection this often; 0: never */
    bool allow_insecure_http;    /* allow http:// site URLs (tests, loopback); https otherwise */
} th_collector_config;

typedef struct th_collection_request {
    const char *trial_id;
    const char *since;        /* RFC 3339, or NULL: everything */
    const char *const *sites; /* NULL-terminated site ids, or NULL: every site with a URL */
    uint64_t timeout_ns;      /* the whole collection; 0: 10 minutes */
} th_collection_request;

/* Starts the collector (and its schedule thread when every_ns). Returns 0, TH_EINVAL,
 * TH_ENOMEM or TH_ESYS. */
TH_MUST_CHECK int th_collector_create(const th_collector_config *config, th_collector **out);

/* Cancels every running collection, waits for them, frees. NULL is a no-op. */
void th_collector_destroy(th_collector *collector);

/* Starts a collection in the background. id (at least 32 bytes) receives its id. Returns 0,
 * TH_ENOTFOUND (no such trial, or a named site is not in it), TH_EINVAL (a named site has no
 * FHIR URL, or since is malformed), TH_EOVERLOAD (too many running) or TH_ENOMEM. errbuf says
 * which site or what (never a credential). */
TH_MUST_CHECK int th_collector_start(th_collector *collector, const th_collection_request *req,
                                     char id[32], char *errbuf, size_t errlen);

/* Appends the collection's state as JSON: {"id","trial","state":"running|done|canceled",
 * "since","started","finished","sites":[{"site","state":"pending|fetching|done|timed_out|
 * failed|canceled","received","accepted","duplicates","rejected","reasons":[...],
 * "http_status","duration_ms","pages"}]}. *trial_id_out (TH_ID_MAX + 1) receives its trial for
 * scope checks. Returns 0, TH_ENOTFOUND or TH_ENOMEM. */
TH_MUST_CHECK int th_collector_get(th_collector *collector, const char *id, th_buf *out,
                                   char *trial_id_out);

/* Cancels a running collection (every transfer aborted at once). Returns 0 with *was_running,
 * or TH_ENOTFOUND. */
TH_MUST_CHECK int th_collector_cancel(th_collector *collector, const char *id, bool *was_running);

/* Waits until the collection is no longer running (tests, CLI). Returns 0, TH_ENOTFOUND or
 * TH_ETIMEDOUT. */
TH_MUST_CHECK int th_collector_wait(th_collector *collector, const char *id, uint64_t timeout_ns);

#endif
