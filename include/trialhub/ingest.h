/* What follows a newly stored QuestionnaireResponse, whichever way it came in (posted by an
 * app, or collected from a site): the progress cache hears of it, the live event
 * submission.accepted is published (ids, instrument and visit; never an answer), and the
 * response is handed to scoring. Called on the writer thread after the commit. */
#ifndef TRIALHUB_INGEST_H
#define TRIALHUB_INGEST_H

#include "trialhub/events.h"
#include "trialhub/fhir.h"
#include "trialhub/store.h"

typedef struct th_progress th_progress;
typedef struct th_scoring th_scoring;

typedef struct th_ingest_hooks {
    th_progress *progress; /* each may be NULL */
    th_events *events;
    th_scoring *scoring;
} th_ingest_hooks;

/* row is the committed row (not a duplicate); qr its parsed resource, taken in every case.
 * Never blocks. */
void th_ingest_committed(const th_ingest_hooks *hooks, const th_qr_row *row, th_qr *qr);

#endif
