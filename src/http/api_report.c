/* Interim reports over HTTP. GET /v1/trials/{id}/report suspends the request, hands the work to
 * the report service (its own pool), and watches the client's socket while it waits: a client
 * that goes away cancels the computation at once (th__hangup_*), a deadline answers 504 with the
 * stage that was running. POST /v1/trials/{id}/reports starts the same computation as a job;
 * GET/DELETE /v1/reports/{id} read, fetch and cancel it.
 *
 * Synchronisation of one request: `mu` makes the completion wait until the handler has finished
 * setting up (start, watch), so the completion never races the watch registration. The hang-up
 * callback does not take `mu`: it only calls th_reports_abandon(), which says whether it won
 * (then it answers) or the completion did (then it does nothing). */
#include <microhttpd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/api.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/events.h"
#include "trialhub/reports.h"

typedef struct report_req {
    th_req *req;
    th_reports *reports;
    th_hangup *hangup;
    pthread_mutex_t mu;
    th_report_waiter *waiter;
    th_report_format format;
    uint64_t watch;
    bool watched;
} report_req;

static void report_req_free(void *arg)
{
    report_req *rr = arg;
    pthread_mutex_destroy(&rr->mu);
    th_free(rr);
}

/* Investigators of the trial and admins. Returns false after answering 403/404. */
static bool may_read_trial(th_req *req, const char *trial_id)
{
    if (req->key.role != TH_ROLE_ADMIN &&
        !(req->key.role == TH_ROLE_INVESTIGATOR && strcmp(req->key.trial_id, trial_id) == 0)) {
        th__resp_error(req, 403, "reports are for the trial's investigators and admins");
        return false;
    }
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(th__api_of(req)->cfg->roster, &g);
    bool found = view && th_roster_trial_find(view, trial_id) != NULL;
    if (view) {
        th_snapshot_release(&g);
    }
    if (!found) {
        th__resp_error(req, 404, "no such trial");
    }
    return found;
}

static bool parse_format(const char *s, th_report_format *out)
{
    static const char *const names[] = {"json", "csv", "pdf", "png", "svg"};
    for (unsigned i = 0; i < 5; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (th_report_format)i;
            return true;
        }
    }
    return false;
}

static bool parse_chart(const char *s, th_report_chart *out)
{
    static const char *const names[] = {"scores", "enrolment", "completion"};
    for (unsigned i = 0; i < 3; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (th_report_chart)i;
            return true;
        }
    }
    return false;
}

/* Reads format, chart and timeout; answers 400 and returns false on a bad one. */
static bool parse_request(th_req *req, const char *format, const char *chart, const char *timeout,
                          th_report_key *key, uint64_t *timeout_ns)
{
    const th_server_config *cfg = th__api_of(req)->cfg;
    key->format = TH_REPORT_JSON;
    key->chart = TH_CHART_SCORES;
    if (format && !parse_format(format, &key->format)) {
        th__resp_error(req, 400, "format must be json, csv, pdf, png or svg");
        return false;
    }
    if (chart && !parse_chart(chart, &key->chart)) {
        th__resp_error(req, 400, "chart must be scores, enrolment or completion");
        return false;
    }
    if (chart && key->format != TH_REPORT_PNG && key->format != TH_REPORT_SVG) {
        th__resp_error(req, 400, "chart applies to format=png and format=svg only");
        return false;
    }
    uint64_t max_ns =
        (uint64_t)(cfg->report_max_timeout_s ? cfg->report_max_timeout_s : 120) * TH_NS_PER_S;
    *timeout_ns = 20 * TH_NS_PER_S;
    if (timeout) {
        *timeout_ns = th__api_duration_ns(timeout);
        if (*timeout_ns == 0 || *timeout_ns > max_ns) {
            char detail[128];
            snprintf(detail, sizeof(detail),
                     "timeout must be a duration such as 500ms, 20s or 2m, at most %llus",
                     (unsigned long long)(max_ns / TH_NS_PER_S));
            th__resp_error(req, 400, detail);
            return false;
        }
    }
    if (*timeout_ns > max_ns) {
        *timeout_ns = max_ns;
    }
    return true;
}

static void answer_error(th_req *req, int status, const char *stage)
{
    char detail[160];
    switch (status) {
    case TH_ETIMEDOUT:
        snprintf(detail, sizeof(detail),
                 "the report did not finish within its deadline (stage running: %s)", stage);
        th__resp_error(req, 504, detail);
        break;
    case TH_ENOTFOUND:
        th__resp_error(req, 404, "no such trial");
        break;
    case TH_ETOOBIG:
        th__resp_error(req, 500, "the report is larger than this server renders");
        break;
    case TH_EOVERLOAD:
        th__resp_error(req, 503, "too many reports are being computed; retry shortly");
        req->resp.retry_after_s = 2;
        break;
    case TH_ECANCELED:
    case TH_ESHUTDOWN:
        th__resp_error(req, 503, "the server is shutting down");
        break;
    default:
        th__resp_error(req, th__status_for(status), "the report could not be computed");
        break;
    }
}

static void set_disposition(th_req *req, const char *trial_id, th_report_format format)
{
    static const char *const ext[] = {NULL, "csv", "pdf", "png", "svg"};
    if ((unsigned)format < 5 && ext[format]) {
        char value[64];
        int n = snprintf(value, sizeof(value), "attachment; filename=\"%s-report.%s\"", trial_id,
                         ext[format]);
        if (n < 0 || (size_t)n >= sizeof(value)) {
            snprintf(value, sizeof(value), "attachment; filename=\"report.%s\"", ext[format]);
        }
        (void)th__resp_header(req, "Content-Disposition", value);
    }
}

/* Completion, on a report thread. */
static void report_done(void *arg, int status, const char *stage, const char *media_type,
                        const void *data, size_t len)
{
    report_req *rr = arg;
    th_req *req = rr->req;
    pthread_mutex_lock(&rr->mu); /* the handler has finished setting up */
    if (rr->watched) {
        (void)th__hangup_unwatch(rr->hangup, rr->watch);
    }
    if (status == 0) {
        th_buf b;
        th_buf_init(&b, 0);
        th_buf_append(&b, data, len);
        th__resp_buf(req, 200, media_type, &b);
        set_disposition(req, req->params[0], rr->format);
    } else {
        answer_error(req, status, stage);
    }
    pthread_mutex_unlock(&rr->mu);
    th__req_resume(req);
}

/* The client closed its connection while the report was being computed. Runs under the
 * watcher's mutex. */
static void report_hangup(void *arg)
{
    report_req *rr = arg;
    if (th_reports_abandon(rr->reports, rr->waiter)) {
        /* Never seen by anyone: the connection is gone. */
        th__resp_error(rr->req, 503, "the client closed the connection");
        th__req_resume(rr->req);
    }
}

static int request_fd(th_req *req)
{
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(req->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    return info ? info->connect_fd : -1;
}

static void report_get(th_req *req)
{
    const char *trial_id = req->params[0];
    th_api *api = th__api_of(req);
    if (!may_read_trial(req, trial_id)) {
        return;
    }
    th_report_key key = {.trial_id = trial_id};
    uint64_t timeout_ns;
    if (!parse_request(req, th__req_query(req, "format"), th__req_query(req, "chart"),
                       th__req_query(req, "timeout"), &key, &timeout_ns)) {
        return;
    }
    if (api->cfg->reports == NULL) {
        th__resp_error(req, 503, "reports are not available on this node");
        return;
    }
    report_req *rr = th_calloc(1, sizeof(*rr));
    if (rr == NULL) {
        th__resp_error(req, 503, "out of memory");
        return;
    }
    rr->req = req;
    rr->reports = api->cfg->reports;
    rr->hangup = api->hangup;
    pthread_mutex_init(&rr->mu, NULL);
    rr->format = key.format;
    req->state = rr;
    req->state_free = report_req_free;

    pthread_mutex_lock(&rr->mu);
    th__req_suspend(req);
    int rc = th_reports_start(rr->reports, &key, th_clock_after_ns(timeout_ns), report_done, rr,
                              &rr->waiter);
    if (rc != 0) {
        pthread_mutex_unlock(&rr->mu);
        answer_error(req, rc, "queue");
        th__req_resume(req);
        return;
    }
    int fd = request_fd(req);
    rr->watched = fd >= 0 && th__hangup_watch(rr->hangup, fd, report_hangup, rr, &rr->watch) == 0;
    pthread_mutex_unlock(&rr->mu);
}

/* ---- asynchronous jobs ------------------------------------------------------------------ */

static json_t *job_json(const th_report_job_info *info)
{
    static const char *const formats[] = {"json", "csv", "pdf", "png", "svg"};
    static const char *const charts[] = {"scores", "enrolment", "completion"};
    char created[40], finished[40], location[96];
    th_events_format_time((uint64_t)info->created_ms * TH_NS_PER_MS, created, sizeof(created));
    snprintf(location, sizeof(location), "/v1/reports/%s", info->id);
    json_t *j =
        json_pack("{s:s,s:s,s:s,s:s,s:s,s:s}", "id", info->id, "trial", info->trial_id, "format",
                  formats[info->format], "state", th_report_job_state_name(info->state), "created",
                  created, "self", location);
    if (j == NULL) {
        return NULL;
    }
    if (info->format == TH_REPORT_PNG || info->format == TH_REPORT_SVG) {
        json_object_set_new(j, "chart", json_string(charts[info->chart]));
    }
    if (info->state != TH_JOB_RUNNING) {
        th_events_format_time((uint64_t)info->finished_ms * TH_NS_PER_MS, finished,
                              sizeof(finished));
        json_object_set_new(j, "finished", json_string(finished));
    }
    if (info->state == TH_JOB_DONE) {
        strncat(location, "/file", sizeof(location) - strlen(location) - 1);
        json_object_set_new(j, "file", json_string(location));
        json_object_set_new(j, "size", json_integer((json_int_t)info->size));
    } else if (info->state != TH_JOB_RUNNING) {
        json_object_set_new(j, "stage", json_string(info->stage));
        if (info->state == TH_JOB_FAILED) {
            json_object_set_new(j, "error", json_string(th_errname(info->error)));
        }
    }
    return j;
}

static void jobs_post(th_req *req)
{
    const char *trial_id = req->params[0];
    th_api *api = th__api_of(req);
    if (!may_read_trial(req, trial_id)) {
        return;
    }
    const char *format = NULL, *chart = NULL, *timeout = NULL;
    json_t *body = NULL;
    if (req->body.len > 0) {
        body = th__api_json_body(req);
        if (body == NULL) {
            return;
        }
        const char *key;
        json_t *v;
        json_object_foreach(body, key, v)
        {
            const char **slot = strcmp(key, "format") == 0    ? &format
                                : strcmp(key, "chart") == 0   ? &chart
                                : strcmp(key, "timeout") == 0 ? &timeout
                                                              : NULL;
            if (slot == NULL || !json_is_string(v)) {
                json_decref(body);
                th__resp_error(req, 400,
                               "the body may hold only format, chart and timeout, as strings");
                return;
            }
            *slot = json_string_value(v);
        }
    }
    th_report_key key = {.trial_id = trial_id};
    uint64_t timeout_ns;
    bool ok = parse_request(req, format, chart, timeout, &key, &timeout_ns);
    json_decref(body);
    if (!ok) {
        return;
    }
    if (api->cfg->reports == NULL) {
        th__resp_error(req, 503, "reports are not available on this node");
        return;
    }
    th_report_job_info info;
    int rc = th_reports_job_start(api->cfg->reports, &key, timeout_ns, &info);
    if (rc != 0) {
        th__resp_error(
            req, 503, rc == TH_EOVERLOAD ? "too many report jobs; retry shortly" : "out of memory");
        req->resp.retry_after_s = 2;
        return;
    }
    snprintf(req->resp.location, sizeof(req->resp.location), "/v1/reports/%s", info.id);
    th__api_json(req, 202, job_json(&info));
}

/* Finds the job and checks the key may see it; answers 404/403 and returns false otherwise. */
static bool job_visible(th_req *req, th_report_job_info *info)
{
    th_reports *reports = th__api_of(req)->cfg->reports;
    if (reports == NULL || th_reports_job_get(reports, req->params[0], info) != 0) {
        th__resp_error(req, 404, "no such report job (finished jobs are kept for an hour)");
        return false;
    }
    if (req->key.role != TH_ROLE_ADMIN && !(req->key.role == TH_ROLE_INVESTIGATOR &&
                                            strcmp(req->key.trial_id, info->trial_id) == 0)) {
        th__resp_error(req, 403, "this key may not see this report job");
        return false;
    }
    return true;
}

static void job_get(th_req *req)
{
    th_report_job_info info;
    if (job_visible(req, &info)) {
        th__api_json(req, 200, job_json(&info));
    }
}

static void job_file(th_req *req)
{
    th_report_job_info info;
    if (!job_visible(req, &info)) {
        return;
    }
    th_buf b;
    th_buf_init(&b, 0);
    const char *media = NULL;
    int rc = th_reports_job_file(th__api_of(req)->cfg->reports, info.id, &b, &media);
    if (rc == 0) {
        set_disposition(req, info.trial_id, info.format);
        th__resp_buf(req, 200, media, &b);
        return;
    }
    th_buf_free(&b);
    if (rc == TH_EAGAIN) {
        th__resp_error(req, 409,
                       info.state == TH_JOB_RUNNING
                           ? "the report is still being computed"
                           : "the report has no file: see the job's state");
        req->resp.retry_after_s = info.state == TH_JOB_RUNNING ? 1 : 0;
    } else {
        th__resp_error(req, rc == TH_ENOTFOUND ? 404 : 503,
                       rc == TH_ENOTFOUND ? "no such report job" : "out of memory");
    }
}

static void job_delete(th_req *req)
{
    th_report_job_info info;
    if (!job_visible(req, &info)) {
        return;
    }
    bool was_running = false;
    if (th_reports_job_delete(th__api_of(req)->cfg->reports, info.id, &was_running) != 0) {
        th__resp_error(req, 404, "no such report job");
        return;
    }
    if (was_running) {
        th_report_job_info now;
        if (th_reports_job_get(th__api_of(req)->cfg->reports, info.id, &now) == 0) {
            th__api_json(req, 202, job_json(&now));
            return;
        }
    }
    th__resp_static(req, 204, NULL, "");
}

static const char *const json_types[] = {"application/json", NULL};

const th_route th__report_routes[] = {
    {.method = "GET",
     .pattern = "/v1/trials/{id}/report",
     .handler = report_get,
     .auth = TH_AUTH_ANY},
    {.method = "POST",
     .pattern = "/v1/trials/{id}/reports",
     .handler = jobs_post,
     .auth = TH_AUTH_ANY,
     .body_limit = 4096,
     .content_types = json_types},
    {.method = "GET", .pattern = "/v1/reports/{id}", .handler = job_get, .auth = TH_AUTH_ANY},
    {.method = "DELETE", .pattern = "/v1/reports/{id}", .handler = job_delete, .auth = TH_AUTH_ANY},
    {.method = "GET", .pattern = "/v1/reports/{id}/file", .handler = job_file, .auth = TH_AUTH_ANY},
};
const size_t th__report_nroutes = sizeof(th__report_routes) / sizeof(th__report_routes[0]);
