/* FHIR R4 endpoints: the CapabilityStatement, the Questionnaire bundle, and the ePRO hot path,
 * POST /fhir/QuestionnaireResponse: parse and validate on the HTTP thread (microseconds), check
 * enrolment and the key's scope against the in-memory roster, then hand the row to the
 * group-commit writer and suspend; the answer (201, 200 for a retry, 409 for a reused
 * identifier with other content) is sent only after the commit. Scoring follows on the pool. */
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "http/api.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/fhir.h"
#include "trialhub/ingest.h"
#include "trialhub/progress.h"
#include "trialhub/scoring.h"

#define PROCESSING_URL "https://trialhub.dev/fhir/StructureDefinition/processing"

static const char capability[] =
    "{\"resourceType\":\"CapabilityStatement\",\"status\":\"active\",\"date\":\"2026-11-29\","
    "\"publisher\":\"trialhub\",\"kind\":\"instance\",\"software\":{\"name\":\"trialhub\","
    "\"version\":\"0.1.0\"},\"implementation\":{\"description\":\"trialhub clinical-trial data "
    "backend\"},\"fhirVersion\":\"4.0.1\",\"format\":[\"application/fhir+json\",\"json\"],"
    "\"rest\":[{\"mode\":\"server\",\"security\":{\"service\":[{\"text\":\"Bearer API key\"}],"
    "\"description\":\"Every interaction but this one needs Authorization: Bearer <key>.\"},"
    "\"resource\":[{\"type\":\"QuestionnaireResponse\",\"versioning\":\"versioned\","
    "\"conditionalCreate\":true,\"interaction\":[{\"code\":\"create\"},{\"code\":\"read\"},"
    "{\"code\":\"search-type\",\"documentation\":\"Keyset pages in id order, stable while new "
    "responses arrive: follow the next link. _count defaults to 50 and is clamped to 500. Unknown "
    "parameters are refused unless Prefer: handling=lenient.\"}],"
    "\"searchParam\":[{\"name\":\"_lastUpdated\",\"definition\":"
    "\"http://hl7.org/fhir/SearchParameter/Resource-lastUpdated\",\"type\":\"date\","
    "\"documentation\":\"When the response was received here; prefixes gt, ge, lt, le, eq; "
    "repeatable. A date without a time zone is UTC.\"},"
    "{\"name\":\"subject\",\"definition\":"
    "\"http://hl7.org/fhir/SearchParameter/QuestionnaireResponse-subject\",\"type\":"
    "\"reference\",\"documentation\":\"Patient/<id> or <id>.\"},"
    "{\"name\":\"questionnaire\",\"definition\":"
    "\"http://hl7.org/fhir/SearchParameter/QuestionnaireResponse-questionnaire\",\"type\":"
    "\"reference\",\"documentation\":\"The canonical URL exactly as submitted.\"}]},"
    "{\"type\":\"Questionnaire\",\"interaction\":[{\"code\":\"search-type\"}]}]}]}";

static void metadata(th_req *req)
{
    th__resp_static(req, 200, "application/fhir+json", capability);
}

static void questionnaires(th_req *req)
{
    const char *json;
    size_t len;
    th_qreg_bundle(th__api_of(req)->cfg->qreg, &json, &len);
    th__resp_static(req, 200, "application/fhir+json", json);
}

static void send_fhir_json(th_req *req, unsigned status, json_t *oo)
{
    char *text = oo ? json_dumps(oo, JSON_COMPACT) : NULL;
    json_decref(oo);
    if (text == NULL) {
        th__resp_error(req, 503, "out of memory");
        return;
    }
    th_buf b;
    th_buf_init(&b, 0);
    th_buf_puts(&b, text);
    free(text);
    th__resp_buf(req, status, "application/fhir+json", &b);
}

static void count(th_req *req, const char *what)
{
    const char *labels[] = {what};
    th_metric_add(th__api_of(req)->m_submissions, labels, 1);
}

/* ---- POST ---------------------------------------------------------------------------------- */

typedef struct qr_post_state {
    th_write_job job;
    th_req *req;
    th_qr *qr;
    th_qr_row row;
    char trial_id[TH_ID_MAX + 1];
    char site_id[TH_ID_MAX + 1];
    int visit_week;     /* as sent, or the nearest scheduled week */
    char *ident_system; /* from If-None-Exist, when the resource has none */
    char *ident_value;
    bool want_body;
} qr_post_state;

static void qr_post_free(void *arg)
{
    qr_post_state *st = arg;
    th_qr_destroy(st->qr);
    th_free(st->ident_system);
    th_free(st->ident_value);
    th_free(st);
}

static int qr_post_apply(th_store *store, th_write_job *job)
{
    return th_store_qr_insert(store, &((qr_post_state *)job)->row);
}

static void qr_post_done(th_write_job *job, int status)
{
    qr_post_state *st = (qr_post_state *)job;
    th_req *req = st->req;
    if (status != 0) {
        count(req, "failed");
        th__resp_error(req, 503, "the store cannot take writes now");
    } else if (st->row.conflict) {
        count(req, "conflict");
        th__resp_error(req, 409,
                       "this identifier is already stored with different content; "
                       "a new submission needs a new identifier");
    } else {
        unsigned code = st->row.duplicate ? 200 : 201;
        count(req, st->row.duplicate ? "duplicate" : "accepted");
        snprintf(req->resp.location, sizeof(req->resp.location), "/fhir/QuestionnaireResponse/%lld",
                 (long long)st->row.id);
        snprintf(req->resp.etag, sizeof(req->resp.etag), "W/\"1\"");
        if (st->want_body) {
            th_buf b;
            th_buf_init(&b, 0);
            th_buf_append(&b, st->row.body, st->row.body_len);
            th__resp_buf(req, code, "application/fhir+json", &b);
        } else {
            th__resp_static(req, code, "application/fhir+json", "");
        }
        if (!st->row.duplicate) {
            const th_server_config *cfg = th__api_of(req)->cfg;
            th_ingest_hooks hooks = {cfg->progress, cfg->events, cfg->scoring};
            th_qr *qr = st->qr;
            st->qr = NULL; /* taken */
            th_ingest_committed(&hooks, &st->row, qr);
        }
    }
    th__req_resume(req);
}

/* Parses If-None-Exist: "identifier=system|value" (the only search it supports). */
static int if_none_exist(th_req *req, qr_post_state *st)
{
    const char *h = th__req_header(req, "If-None-Exist");
    if (h == NULL) {
        return 0;
    }
    if (strncmp(h, "identifier=", 11) != 0 || strchr(h + 11, '|') == NULL) {
        th__resp_error(req, 400, "If-None-Exist supports only identifier=system|value");
        return -1;
    }
    const char *sys = h + 11;
    const char *bar = strchr(sys, '|');
    size_t slen = (size_t)(bar - sys), vlen = strlen(bar + 1);
    if (slen == 0 || vlen == 0 || slen > 1024 || vlen > 1024) {
        th__resp_error(req, 400, "If-None-Exist needs a system and a value");
        return -1;
    }
    st->ident_system = th_malloc(slen + 1);
    st->ident_value = th_malloc(vlen + 1);
    if (!st->ident_system || !st->ident_value) {
        th__resp_error(req, 503, "out of memory");
        return -1;
    }
    memcpy(st->ident_system, sys, slen);
    st->ident_system[slen] = '\0';
    memcpy(st->ident_value, bar + 1, vlen + 1);
    return 0;
}

/* Checks the key's scope for a patient. Returns 0 or 403. */
static unsigned scope_for_patient(const th_key *key, const char *patient_id, const char *trial_id,
                                  const char *site_id)
{
    switch (key->role) {
    case TH_ROLE_ADMIN:
        return 0;
    case TH_ROLE_INVESTIGATOR:
        return strcmp(key->trial_id, trial_id) == 0 ? 0 : 403;
    case TH_ROLE_SITE:
        return strcmp(key->trial_id, trial_id) == 0 && strcmp(key->site_id, site_id) == 0 ? 0 : 403;
    case TH_ROLE_PATIENT:
        return strcmp(key->trial_id, trial_id) == 0 && strcmp(key->patient_id, patient_id) == 0
                   ? 0
                   : 403;
    default:
        return 403;
    }
}

static void qr_post(th_req *req)
{
    th_api *api = th__api_of(req);
    qr_post_state *st = th_calloc(1, sizeof(*st));
    if (st == NULL) {
        th__resp_error(req, 503, "out of memory");
        return;
    }
    req->state = st;
    req->state_free = qr_post_free;
    st->req = req;
    const char *prefer = th__req_header(req, "Prefer");
    st->want_body = prefer && strstr(prefer, "return=representation") != NULL;
    if (if_none_exist(req, st) != 0) {
        return;
    }

    th_qr_options opts = {.now_unix_ns = (int64_t)th_clock_wall_ns(),
                          .max_future_skew_ns = TH_QR_DEFAULT_FUTURE_SKEW_NS};
    th_fhir_parse_error perr;
    int rc = th_qr_parse(api->cfg->qreg, req->body.data ? req->body.data : "", req->body.len, &opts,
                         &st->qr, &perr);
    if (rc == TH_EPARSE) {
        count(req, "malformed");
        json_t *oo = NULL;
        if (th_fhir_outcome_parse_error(&perr, &oo) != 0) {
            oo = NULL;
        }
        send_fhir_json(req, 400, oo);
        return;
    }
    if (rc != 0) {
        th__resp_error(req, 503, "out of memory");
        return;
    }
    const th_qr_fields *f = th_qr_get_fields(st->qr);

    /* Enrolment and scope, from the roster snapshot. */
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(api->cfg->roster, &g);
    if (view == NULL) {
        th__resp_error(req, 503, "out of memory");
        return;
    }
    const th_roster_patient *patient =
        f->patient_id ? th_roster_patient_find(view, f->patient_id) : NULL;
    st->visit_week = f->visit_week;
    if (patient && st->visit_week < 0 && f->authored) {
        const th_roster_trial *trial = th_roster_trial_find(view, patient->trial_id);
        if (trial) {
            st->visit_week =
                th_roster_nearest_week(trial, patient->enrolled_on, f->authored_unix_s);
        }
    }
    unsigned denied = 0;
    if (req->key.role == TH_ROLE_PATIENT && f->patient_id &&
        strcmp(f->patient_id, req->key.patient_id) != 0) {
        denied = 403;
    } else if (patient) {
        denied = scope_for_patient(&req->key, patient->id, patient->trial_id, patient->site_id);
        snprintf(st->trial_id, sizeof(st->trial_id), "%s", patient->trial_id);
        snprintf(st->site_id, sizeof(st->site_id), "%s", patient->site_id);
    } else if (f->patient_id) {
        if (th_fhir_issues_add(th_qr_issues(st->qr), TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_NOT_FOUND,
                               NULL, "QuestionnaireResponse.subject",
                               "subject is not a patient enrolled in any trial") != 0) {
            denied = 503;
        }
    }
    th_snapshot_release(&g);
    if (denied == 403) {
        count(req, "forbidden");
        th__resp_error(req, 403, "this key may not submit for this patient");
        return;
    }
    if (denied) {
        th__resp_error(req, 503, "out of memory");
        return;
    }
    if (!th_qr_valid(st->qr)) {
        count(req, "rejected");
        json_t *oo = NULL;
        if (th_fhir_outcome_from_issues(th_qr_issues(st->qr), &oo) != 0) {
            oo = NULL;
        }
        send_fhir_json(req, 422, oo);
        return;
    }

    /* Idempotency key: the resource's identifier, or If-None-Exist's. */
    const char *isys = f->identifier_system, *ival = f->identifier_value;
    if (st->ident_system) {
        if (ival && (strcmp(isys, st->ident_system) != 0 || strcmp(ival, st->ident_value) != 0)) {
            th__resp_error(req, 400, "If-None-Exist does not match the resource's identifier");
            return;
        }
        isys = st->ident_system;
        ival = st->ident_value;
    }

    th_qr_row *row = &st->row;
    row->trial_id = st->trial_id;
    row->site_id = st->site_id;
    row->patient_id = f->patient_id;
    row->questionnaire = f->questionnaire;
    row->instrument = th_fhir_instrument_url(f->instrument);
    row->identifier_system = isys;
    row->identifier_value = ival;
    row->status = f->status == TH_QR_STATUS_AMENDED ? "amended" : "completed";
    row->authored = f->authored;
    row->authored_s = f->authored_unix_s;
    row->visit_week = st->visit_week;
    row->body = req->body.data;
    row->body_len = req->body.len;
    SHA256((const unsigned char *)req->body.data, req->body.len, row->body_sha256);
    row->received_ms = (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);

    st->job.apply = qr_post_apply;
    st->job.done = qr_post_done;
    th__req_suspend(req);
    rc = th_writer_try_submit(api->cfg->writer, &st->job);
    if (rc != 0) {
        count(req, "overloaded");
        th__resp_error(req, 503,
                       rc == TH_EOVERLOAD ? "too many submissions right now; retry shortly"
                                          : "the store cannot take writes now");
        th__req_resume(req);
    }
}

/* ---- GET ----------------------------------------------------------------------------------- */

static json_t *processing_extension(const th_qr_stored *row)
{
    json_t *sub = json_array();
    json_array_append_new(sub,
                          json_pack("{s:s,s:s}", "url", "status", "valueCode", row->processing));
    if (row->has_score) {
        if (row->score_is_int) {
            json_array_append_new(sub, json_pack("{s:s,s:I}", "url", "score", "valueInteger",
                                                 (json_int_t)row->score));
        } else {
            json_array_append_new(
                sub, json_pack("{s:s,s:f}", "url", "score", "valueDecimal", row->score));
        }
    }
    if (row->band[0]) {
        json_array_append_new(sub, json_pack("{s:s,s:s}", "url", "band", "valueString", row->band));
    }
    if (strcmp(row->processing, "scored") == 0) {
        json_array_append_new(sub,
                              json_pack("{s:s,s:b}", "url", "alert", "valueBoolean", row->alert));
    }
    return json_pack("{s:s,s:o}", "url", PROCESSING_URL, "extension", sub);
}

static void qr_get(th_req *req)
{
    th_api *api = th__api_of(req);
    const char *id_text = req->params[0];
    char *end;
    long long id = strtoll(id_text, &end, 10);
    if (*end != '\0' || id <= 0) {
        th__resp_error(req, 404, "no such QuestionnaireResponse");
        return;
    }
    th_qr_stored row;
    int rc = th_store_qr_get(api->cfg->store, id, &row);
    if (rc == TH_ENOTFOUND) {
        th__resp_error(req, 404, "no such QuestionnaireResponse");
        return;
    }
    if (rc != 0) {
        th__resp_error(req, 503, "the store cannot be read now");
        return;
    }
    if (scope_for_patient(&req->key, row.patient_id, row.trial_id, row.site_id) != 0) {
        th_qr_stored_free(&row);
        th__resp_error(req, 403, "this key may not read this patient's data");
        return;
    }
    json_t *doc = NULL;
    rc = th__fhir_qr_resource(&row, &doc);
    snprintf(req->resp.etag, sizeof(req->resp.etag), "W/\"%d\"", row.version);
    th_qr_stored_free(&row);
    if (rc != 0) {
        th__resp_error(req, rc == TH_ENOMEM ? 503 : 500, "the stored resource cannot be read");
        return;
    }
    send_fhir_json(req, 200, doc);
}

void th__fhir_format_instant(int64_t unix_ms, char out[TH__FHIR_INSTANT_LEN])
{
    int64_t ms = unix_ms % 1000;
    if (ms < 0) {
        ms += 1000;
    }
    time_t secs = (time_t)((unix_ms - ms) / 1000);
    struct tm tm;
    char date[TH__FHIR_INSTANT_LEN];
    if (gmtime_r(&secs, &tm) == NULL ||
        strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S", &tm) == 0) {
        snprintf(date, sizeof(date), "1970-01-01T00:00:00");
    }
    snprintf(out, TH__FHIR_INSTANT_LEN, "%.32s.%03dZ", date, (int)ms);
}

int th__fhir_qr_resource(const th_qr_stored *row, json_t **out)
{
    json_error_t err;
    json_t *doc = json_loadb(row->body, row->body_len, 0, &err);
    if (!json_is_object(doc)) {
        json_decref(doc);
        return TH_EPARSE;
    }
    json_t *ext = processing_extension(row);
    json_t *list = json_object_get(doc, "extension");
    if (!json_is_array(list)) {
        list = json_array();
        if (json_object_set_new(doc, "extension", list) != 0) {
            list = NULL;
        }
    }
    json_t *meta = json_object_get(doc, "meta");
    if (!json_is_object(meta)) {
        meta = json_object();
        if (json_object_set_new(doc, "meta", meta) != 0) {
            meta = NULL;
        }
    }
    char id_str[24], version[16], updated[TH__FHIR_INSTANT_LEN];
    snprintf(id_str, sizeof(id_str), "%lld", (long long)row->id);
    snprintf(version, sizeof(version), "%d", row->version);
    th__fhir_format_instant(row->received_ms, updated);
    bool failed = ext == NULL || list == NULL || meta == NULL;
    if (failed) {
        json_decref(ext);
    } else {
        /* The _new setters take the value even when they fail. */
        failed = json_array_append_new(list, ext) != 0 ||
                 json_object_set_new(meta, "versionId", json_string(version)) != 0 ||
                 json_object_set_new(meta, "lastUpdated", json_string(updated)) != 0 ||
                 json_object_set_new(doc, "id", json_string(id_str)) != 0;
    }
    if (failed) {
        json_decref(doc);
        return TH_ENOMEM;
    }
    *out = doc;
    return 0;
}

unsigned th__fhir_scope_for_patient(const th_key *key, const char *patient_id, const char *trial_id,
                                    const char *site_id)
{
    return scope_for_patient(key, patient_id, trial_id, site_id);
}

static const char *const fhir_types[] = {"application/fhir+json", "application/json", NULL};

const th_route th__fhir_routes[] = {
    {.method = "GET", .pattern = "/fhir/metadata", .handler = metadata, .fhir = true},
    {.method = "GET",
     .pattern = "/fhir/Questionnaire",
     .handler = questionnaires,
     .auth = TH_AUTH_ANY,
     .fhir = true},
    {.method = "POST",
     .pattern = "/fhir/QuestionnaireResponse",
     .handler = qr_post,
     .auth = TH_AUTH_ANY,
     .fhir = true,
     .body_limit = 1024 * 1024,
     .content_types = fhir_types},
    {.method = "GET",
     .pattern = "/fhir/QuestionnaireResponse",
     .handler = th__fhir_qr_search,
     .auth = TH_AUTH_ANY,
     .fhir = true},
    {.method = "GET",
     .pattern = "/fhir/QuestionnaireResponse/{id}",
     .handler = qr_get,
     .auth = TH_AUTH_ANY,
     .fhir = true},
};
const size_t th__fhir_nroutes = sizeof(th__fhir_routes) / sizeof(th__fhir_routes[0]);
