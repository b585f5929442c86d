/* The steps after a response is committed, shared by POST /fhir/QuestionnaireResponse and the
 * multi-site collector. */
#include "trialhub/ingest.h"

#include <stdio.h>

#include "trialhub/buf.h"
#include "trialhub/progress.h"
#include "trialhub/scoring.h"

static void publish(th_events *events, const th_qr_row *row)
{
    char fields[512], topic[TH_ID_MAX + 8];
    th_buf b;
    th_buf_init_with(&b, fields, sizeof(fields), 0);
    th_buf_printf(&b, "\"resource\":\"QuestionnaireResponse/%lld\",\"trial\":", (long long)row->id);
    th_buf_json_str(&b, row->trial_id);
    th_buf_puts(&b, ",\"site\":");
    th_buf_json_str(&b, row->site_id);
    th_buf_puts(&b, ",\"patient\":");
    th_buf_json_str(&b, row->patient_id);
    th_buf_puts(&b, ",\"instrument\":");
    th_buf_json_str(&b, row->instrument);
    if (row->visit_week >= 0) {
        th_buf_printf(&b, ",\"visit_week\":%d", row->visit_week);
    }
    if (row->source_resource) {
        th_buf_puts(&b, ",\"collected\":true");
    }
    if (!th_buf_failed(&b)) {
        snprintf(topic, sizeof(topic), "trial:%s", row->trial_id);
        th_events_publish(events, topic, "submission.accepted", row->trial_id, row->site_id,
                          b.data);
    }
    th_buf_free(&b);
}

void th_ingest_committed(const th_ingest_hooks *hooks, const th_qr_row *row, th_qr *qr)
{
    th_progress_note note = {
        .qr_id = row->id,
        .trial_id = row->trial_id,
        .site_id = row->site_id,
        .patient_id = row->patient_id,
        .instrument = row->instrument,
        .visit_week = row->visit_week,
        .received_ms = row->received_ms,
    };
    th_progress_note_submission(hooks->progress, &note);
    if (th_events_active(hooks->events)) {
        publish(hooks->events, row);
    }
    if (hooks->scoring == NULL) {
        th_qr_destroy(qr);
        return;
    }
    th_scoring_item item = {row->id,         row->trial_id,   row->site_id,
                            row->patient_id, row->instrument, row->visit_week};
    th_scoring_submit(hooks->scoring, &item, qr);
}
