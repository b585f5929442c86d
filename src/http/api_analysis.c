/* Image analyses over HTTP. POST /v1/analyses streams the DICOM body into the blob store as it
 * arrives (hashed on the way, never held whole in memory) while a DICOM probe checks it; at the
 * end the blob is fsynced and renamed on the I/O pool, then the analysis task is queued through
 * the group-commit writer, and only then the answer is 202. GET and DELETE read and cancel it;
 * POST /v1/trials/{id}/webhook-secret sets the secret that signs the trial's webhooks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "http/api.h"
#include "trialhub/alloc.h"
#include "trialhub/analysis.h"
#include "trialhub/clock.h"
#include "trialhub/dicom.h"
#include "trialhub/log.h"
#include "trialhub/queue.h"

typedef struct upload {
    th_write_job job;
    th_req *req;
    th_api *api;
    bool started;
    unsigned error_status; /* decided while streaming: answered at the end */
    char error[200];
    th_blob_writer *blob;
    th_dicom_probe *probe;
    char trial_id[TH_ID_MAX + 1];
    char subject[TH_ID_MAX + 1];
    char *callback_url;
    char *idempotency_key;
    th_dicom_info info;
    char key[TH_BLOB_KEY_LEN + 1];
    uint64_t size;
    char *payload;
    char task_id[TH_TASK_ID_SIZE];
    bool existed;
    int enqueue_rc;
} upload;

static void upload_free(void *arg)
{
    upload *u = arg;
    th_blob_writer_abort(u->blob); /* NULL, or an upload that never committed: nothing kept */
    th_dicom_probe_destroy(u->probe);
    th_free(u->callback_url);
    th_free(u->idempotency_key);
    th_free(u->payload);
    th_free(u);
}

static void set_error(upload *u, unsigned status, const char *detail)
{
    if (u->error_status == 0) {
        u->error_status = status;
        snprintf(u->error, sizeof(u->error), "%s", detail);
    }
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s);
    char *c = th_malloc(n + 1);
    if (c) {
        memcpy(c, s, n + 1);
    }
    return c;
}

/* Checks the query and the key's scope before the first byte is kept. */
static void upload_begin(th_req *req, upload *u)
{
    const char *trial = th__req_query(req, "trial");
    const char *subject = th__req_query(req, "subject");
    const char *callback = th__req_query(req, "callback_url");
    const char *key = th__req_header(req, "Idempotency-Key");
    if (trial == NULL || subject == NULL) {
        set_error(u, 400, "trial and subject query parameters are required");
        return;
    }
    if (callback && !th__api_url_ok(callback)) {
        set_error(u, 400, "callback_url must be an http(s) URL of at most 2000 characters");
        return;
    }
    if (key && (strlen(key) == 0 || strlen(key) > 200)) {
        set_error(u, 400, "Idempotency-Key must be 1-200 characters");
        return;
    }
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(u->api->cfg->roster, &g);
    const th_roster_patient *p = view ? th_roster_patient_find(view, subject) : NULL;
    unsigned status = 0;
    if (view == NULL) {
        status = 503;
    } else if (p == NULL || strcmp(p->trial_id, trial) != 0) {
        status = 404;
    } else if (!(req->key.role == TH_ROLE_ADMIN ||
                 (req->key.role == TH_ROLE_INVESTIGATOR && strcmp(req->key.trial_id, trial) == 0) ||
                 (req->key.role == TH_ROLE_SITE && strcmp(req->key.trial_id, trial) == 0 &&
                  strcmp(req->key.site_id, p->site_id) == 0))) {
        status = 403;
    }
    if (view) {
        th_snapshot_release(&g);
    }
    if (status) {
        set_error(u, status,
                  status == 404   ? "subject is not a patient of this trial"
                  : status == 403 ? "this key may not upload images for this patient"
                                  : "out of memory");
        return;
    }
    snprintf(u->trial_id, sizeof(u->trial_id), "%s", trial);
    snprintf(u->subject, sizeof(u->subject), "%s", subject);
    u->callback_url = callback ? dup_str(callback) : NULL;
    u->idempotency_key = key ? dup_str(key) : NULL;
    if ((callback && u->callback_url == NULL) || (key && u->idempotency_key == NULL) ||
        th_dicom_probe_create(&u->probe) != 0) {
        set_error(u, 503, "out of memory");
        return;
    }
    int rc = th_blob_writer_open(u->api->cfg->blobs, &u->blob);
    if (rc != 0) {
        set_error(u, 503, "the image store cannot take uploads now");
    }
}

static void upload_chunk(th_req *req, const char *data, size_t len)
{
    upload *u = req->state;
    if (u == NULL) {
        u = th_calloc(1, sizeof(*u));
        if (u == NULL) {
            return; /* the handler answers 503 */
        }
        u->req = req;
        u->api = th__api_of(req);
        req->state = u;
        req->state_free = upload_free;
    }
    if (!u->started) {
        u->started = true;
        upload_begin(req, u);
    }
    if (u->error_status) {
        return; /* the rest of the body is read and dropped */
    }
    if (!th_dicom_probe_done(u->probe) && th_dicom_probe_feed(u->probe, data, len) != 0) {
        /* Not DICOM: stop writing; the reason comes from finish at the end. */
        th_blob_writer_abort(u->blob);
        u->blob = NULL;
        return;
    }
    if (u->blob) {
        int rc = th_blob_writer_write(u->blob, data, len);
        if (rc != 0) {
            th_blob_writer_abort(u->blob);
            u->blob = NULL;
            set_error(u, rc == TH_ETOOBIG ? 413 : 503,
                      rc == TH_ETOOBIG ? "the image is larger than this server takes"
                                       : "the image could not be stored");
        }
    }
    u->size += len;
}

/* ---- after the body: commit the blob, queue the task ------------------------------------ */

static int enqueue_apply(th_store *store, th_write_job *job)
{
    upload *u = (upload *)job;
    th_task_spec spec = {.kind = TH_ANALYSIS_KIND,
                         .payload = u->payload,
                         .idempotency_key = u->idempotency_key,
                         .scope = u->trial_id};
    u->enqueue_rc = th_queue_enqueue_in(u->api->cfg->queue, store, &spec, u->task_id, &u->existed);
    /* A refused spec (conflicting key) is this job's answer, not the batch's failure. */
    return u->enqueue_rc == TH_EIO ? TH_EIO : 0;
}

static void enqueue_done(th_write_job *job, int status)
{
    upload *u = (upload *)job;
    th_req *req = u->req;
    if (status == 0 && u->enqueue_rc == 0) {
        th_queue_notify(u->api->cfg->queue);
        snprintf(req->resp.location, sizeof(req->resp.location), "/v1/analyses/%s", u->task_id);
        /* A retry with the same Idempotency-Key names the same task (GET it for its state). */
        th__api_json(req, 202,
                     u->existed ? json_pack("{s:s,s:b}", "id", u->task_id, "duplicate", 1)
                                : json_pack("{s:s,s:s}", "id", u->task_id, "state", "queued"));
        if (!u->existed) {
            TH_LOG(TH_LOG_INFO, "analysis queued", TH_LOG_STR("task", u->task_id),
                   TH_LOG_STR("trial", u->trial_id), TH_LOG_INT("bytes", u->size),
                   TH_LOG_STR("modality", u->info.modality));
        }
    } else if (status == 0 && u->enqueue_rc == TH_ECONFLICT) {
        th__resp_error(req, 409, "this Idempotency-Key was used for another upload");
    } else {
        th__resp_error(req, 503, "the analysis could not be queued; retry");
        req->resp.retry_after_s = 1;
    }
    th__req_resume(req);
}

/* On the I/O pool: fsync and rename the blob (never on an HTTP thread), then the writer. */
static void commit_blob(void *arg, int pool_status)
{
    upload *u = arg;
    th_req *req = u->req;
    int rc = TH_ESHUTDOWN;
    if (pool_status == 0) {
        /* Commit ends the writer, whether it succeeds or not (then nothing is left). */
        rc = th_blob_writer_commit(th_ctx_background(), u->blob, u->key);
        u->blob = NULL;
    }
    if (rc == 0) {
        th_analysis_request ar = {u->trial_id,  u->subject,      u->key,  u->info.modality,
                                  u->info.rows, u->info.columns, u->size, u->callback_url};
        rc = th_analysis_payload(&ar, &u->payload);
    }
    if (rc == 0) {
        u->job.apply = enqueue_apply;
        u->job.done = enqueue_done;
        rc = th_writer_try_submit(u->api->cfg->writer, &u->job);
        if (rc == 0) {
            return; /* enqueue_done answers */
        }
    }
    th__resp_error(req, 503, "the image could not be stored now; retry");
    req->resp.retry_after_s = 1;
    th__req_resume(req);
}

static void analyses_post(th_req *req)
{
    upload *u = req->state;
    if (u == NULL) {
        th__resp_error(req, req->streamed ? 503 : 400,
                       req->streamed ? "out of memory" : "the body must be a DICOM file");
        return;
    }
    if (u->error_status) {
        th__resp_error(req, u->error_status, u->error);
        return;
    }
    char reason[200];
    if (th_dicom_probe_finish(u->probe, &u->info, reason, sizeof(reason)) != 0) {
        th_blob_writer_abort(u->blob); /* nothing of a non-DICOM upload is kept */
        u->blob = NULL;
        th__resp_error(req, 422, reason);
        return;
    }
    if (u->blob == NULL) {
        th__resp_error(req, 503, "the image could not be stored");
        return;
    }
    th__req_suspend(req);
    if (th_pool_try_submit(u->api->cfg->io_pool, commit_blob, u) != 0) {
        th__resp_error(req, 503, "too many uploads are being stored; retry shortly");
        req->resp.retry_after_s = 1;
        th__req_resume(req);
    }
}

/* ---- read, cancel -------------------------------------------------------------------------- */

/* Reads the task and checks the key may see it; answers and returns false otherwise. */
static bool task_visible(th_req *req, th_task *t, json_t **payload)
{
    th_queue *queue = th__api_of(req)->cfg->queue;
    int rc = queue ? th_queue_get(th_ctx_background(), queue, req->params[0], t) : TH_ENOTFOUND;
    if (rc == 0 && strcmp(t->kind, TH_ANALYSIS_KIND) != 0) {
        th_task_free(t);
        rc = TH_ENOTFOUND;
    }
    if (rc != 0) {
        th__resp_error(req, rc == TH_ENOTFOUND ? 404 : 503,
                       rc == TH_ENOTFOUND ? "no such analysis" : "the queue cannot be read now");
        return false;
    }
    *payload = json_loads(t->payload ? t->payload : "{}", 0, NULL);
    const char *trial = json_string_value(json_object_get(*payload, "trial"));
    const char *subject = json_string_value(json_object_get(*payload, "subject"));
    bool ok = req->key.role == TH_ROLE_ADMIN;
    if (!ok && trial && strcmp(req->key.trial_id, trial) == 0) {
        if (req->key.role == TH_ROLE_INVESTIGATOR) {
            ok = true;
        } else if (req->key.role == TH_ROLE_SITE && subject) {
            th_snapshot_guard g;
            const th_roster_view *view = th_roster_acquire(th__api_of(req)->cfg->roster, &g);
            const th_roster_patient *p = view ? th_roster_patient_find(view, subject) : NULL;
            ok = p && strcmp(p->site_id, req->key.site_id) == 0;
            if (view) {
                th_snapshot_release(&g);
            }
        }
    }
    if (!ok) {
        json_decref(*payload);
        th_task_free(t);
        th__resp_error(req, 403, "this key may not see this analysis");
    }
    return ok;
}

static json_t *analysis_json(const th_task *t, json_t *payload)
{
    char created[40], updated[40];
    th_events_format_time((uint64_t)t->created_ms * TH_NS_PER_MS, created, sizeof(created));
    th_events_format_time((uint64_t)t->updated_ms * TH_NS_PER_MS, updated, sizeof(updated));
    json_t *j = json_pack(
        "{s:s,s:s,s:i,s:s,s:s,s:O?,s:O?,s:O?}", "id", t->id, "state", th_task_state_name(t->state),
        "attempts", t->attempts, "created_at", created, "updated_at", updated, "trial",
        json_object_get(payload, "trial"), "subject", json_object_get(payload, "subject"),
        "modality", json_object_get(payload, "modality"));
    if (j && t->result) {
        json_object_set_new(j, "result", json_loads(t->result, 0, NULL));
    } else if (j && t->last_error) {
        json_object_set_new(j, "error", json_string(t->last_error));
    }
    return j;
}

static void analysis_get(th_req *req)
{
    th_task t;
    json_t *payload = NULL;
    if (!task_visible(req, &t, &payload)) {
        return;
    }
    th__api_json(req, 200, analysis_json(&t, payload));
    json_decref(payload);
    th_task_free(&t);
}

static void analysis_delete(th_req *req)
{
    th_task t;
    json_t *payload = NULL;
    if (!task_visible(req, &t, &payload)) {
        return;
    }
    th_api *api = th__api_of(req);
    int rc = th_queue_cancel(th_ctx_background(), api->cfg->queue, t.id);
    if (rc == TH_ECONFLICT) {
        th__resp_error(req, 409, "the analysis has already ended");
    } else if (rc != 0) {
        th__resp_error(req, 503, "the analysis could not be canceled now; retry");
    } else {
        /* A running analyzer is stopped by its worker at its next heartbeat (< 1 s). */
        th_task now;
        if (th_queue_get(th_ctx_background(), api->cfg->queue, t.id, &now) == 0) {
            th_analysis_announce(api->cfg->events, &now);
            th__api_json(req, 202, analysis_json(&now, payload));
            th_task_free(&now);
        } else {
            th__resp_static(req, 202, NULL, "");
        }
        if (th_analysis_notify(th_ctx_background(), api->cfg->queue, t.id) != 0) {
            TH_LOG(TH_LOG_WARN, "webhook not queued", TH_LOG_STR("task", t.id));
        }
    }
    json_decref(payload);
    th_task_free(&t);
}

/* ---- webhook secrets ---------------------------------------------------------------------- */

typedef struct secret_write {
    th_api_write w;
    char trial_id[TH_ID_MAX + 1];
    char secret[80];
} secret_write;

static void secret_free(void *arg)
{
    secret_write *s = arg;
    memset(s->secret, 0, sizeof(s->secret));
    th_free(s);
}

static int secret_apply(th_store *store, th_api_write *w)
{
    secret_write *s = (secret_write *)w;
    return th_store_webhook_secret_set(store, s->trial_id, s->secret);
}

static void secret_done(th_api_write *w, int status)
{
    secret_write *s = (secret_write *)w;
    if (status == TH_ENOTFOUND) {
        th__resp_error(w->req, 404, "no such trial");
    } else if (status != 0) {
        th__resp_error(w->req, 503, "the store cannot take writes now");
    } else {
        /* Shown once: the store keeps it to sign, this answer is not cached. */
        th__api_json(w->req, 201,
                     json_pack("{s:s,s:s,s:s}", "trial", s->trial_id, "secret", s->secret, "header",
                               "X-Trialhub-Signature: t=<unix time>,v1=<hex HMAC-SHA256 "
                               "of \"<t>.<body>\">"));
    }
}

static void webhook_secret_post(th_req *req)
{
    const char *trial_id = req->params[0];
    if (!(req->key.role == TH_ROLE_ADMIN ||
          (req->key.role == TH_ROLE_INVESTIGATOR && strcmp(req->key.trial_id, trial_id) == 0))) {
        th__resp_error(req, 403, "webhook secrets are for admins and the trial's investigators");
        return;
    }
    secret_write *s = th_calloc(1, sizeof(*s));
    unsigned char rnd[32];
    if (s == NULL || getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        th_free(s);
        th__resp_error(req, 503, "no secret could be made now");
        return;
    }
    req->state = s;
    req->state_free = secret_free;
    snprintf(s->trial_id, sizeof(s->trial_id), "%s", trial_id);
    int n = snprintf(s->secret, sizeof(s->secret), "whsec_");
    for (size_t i = 0; i < sizeof(rnd); i++) {
        n += snprintf(s->secret + n, sizeof(s->secret) - (size_t)n, "%02x", rnd[i]);
    }
    memset(rnd, 0, sizeof(rnd));
    s->w.apply = secret_apply;
    s->w.done = secret_done;
    th__api_write(req, &s->w);
}

static const char *const dicom_types[] = {"application/dicom", NULL};

const th_route th__analysis_routes[] = {
    {.method = "POST",
     .pattern = "/v1/analyses",
     .handler = analyses_post,
     .auth = TH_AUTH_ANY,
     .body_limit = 1, /* a body is required; its limit is the server's upload_limit */
     .content_types = dicom_types,
     .on_chunk = upload_chunk},
    {.method = "GET", .pattern = "/v1/analyses/{id}", .handler = analysis_get, .auth = TH_AUTH_ANY},
    {.method = "DELETE",
     .pattern = "/v1/analyses/{id}",
     .handler = analysis_delete,
     .auth = TH_AUTH_ANY},
    {.method = "POST",
     .pattern = "/v1/trials/{id}/webhook-secret",
     .handler = webhook_secret_post,
     .auth = TH_AUTH_ANY},
};
const size_t th__analysis_nroutes = sizeof(th__analysis_routes) / sizeof(th__analysis_routes[0]);
