/* Live events: small JSON notifications (a submission accepted, progress changed, an alert
 * raised, a task's state) fanned out to whoever listens, today the WebSocket hub. Publishing
 * never blocks and never fails the publisher: an event is built once, reference-counted, and
 * handed to every sink; a sink that cannot keep up drops it and counts the drop. Events are
 * notifications, not records: the durable state is in the store, and a client that missed
 * events re-reads it (GET /v1/trials/{id}/progress).
 *
 * Privacy: an event carries ids (resource, pseudonymous patient, trial, site), codes, counts
 * and times, never an answer or free text. */
#ifndef TRIALHUB_EVENTS_H
#define TRIALHUB_EVENTS_H

#include <stdatomic.h>
#include <stddef.h>

#include "trialhub/error.h"
#include "trialhub/metrics.h"
#include "trialhub/store.h"

typedef struct th_events th_events;

/* One published event, immutable once published. json is the whole text frame:
 * {"topic":...,"type":...,"at":"<RFC 3339>", fields...}. trial_id and site_id say who may see
 * it ("" when not scoped to one): a site-scoped key sees only its own site's events. */
typedef struct th_event {
    atomic_uint refs;
    char topic[TH_ID_MAX + 16];
    char trial_id[TH_ID_MAX + 1];
    char site_id[TH_ID_MAX + 1];
    size_t len;
    char json[]; /* NUL-terminated */
} th_event;

/* A sink gets its own reference to ev (release it with th_event_unref()). It runs on the
 * publisher's thread (the writer, the progress updater...), so it must be quick and must not
 * block: queue the event and return. */
typedef void (*th_event_sink_fn)(void *arg, th_event *ev);

/* Most sinks at once. */
#define TH_EVENTS_MAX_SINKS 8

/* Creates the hub. With metrics, registers trialhub_events_published_total{type}. Returns 0,
 * TH_ENOMEM or the metrics error. *out is the caller's (th_events_destroy()). */
TH_MUST_CHECK int th_events_create(th_metrics *metrics, th_events **out);

/* Frees the hub. No publish or subscribe may be running; sinks must be removed first. NULL is
 * a no-op. */
void th_events_destroy(th_events *events);

/* Adds a sink. Returns 0, or TH_EOVERLOAD when TH_EVENTS_MAX_SINKS are registered.
 * Thread-safe. */
TH_MUST_CHECK int th_events_subscribe(th_events *events, th_event_sink_fn fn, void *arg);

/* Removes the sink added with (fn, arg); when this returns, fn is not running and will not run
 * again for it. Thread-safe; unknown sinks are ignored. */
void th_events_unsubscribe(th_events *events, th_event_sink_fn fn, void *arg);

/* Builds the event and hands it to every sink. topic is "trial:<id>", "alerts", "tasks" or
 * "system"; type e.g. "submission.accepted"; trial_id/site_id (NULL or "" when unscoped) scope
 * it; fields_json is NULL or more members of the JSON object, already JSON, without braces
 * (`"resource":"QuestionnaireResponse/12","n":3`). Never blocks; with no sink, or out of memory,
 * the event is dropped. events may be NULL (no-op). Thread-safe. */
void th_events_publish(th_events *events, const char *topic, const char *type, const char *trial_id,
                       const char *site_id, const char *fields_json);

/* Whether any sink is registered (skip building fields nobody will read). Thread-safe. */
bool th_events_active(th_events *events);

void th_event_ref(th_event *ev);
/* Drops a reference; the last one frees the event. NULL is a no-op. */
void th_event_unref(th_event *ev);

/* Formats a wall time (ns since the epoch) as RFC 3339 UTC with milliseconds into out (at
 * least 32 bytes). */
void th_events_format_time(uint64_t wall_ns, char *out, size_t outlen);

#endif
