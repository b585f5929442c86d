/* Assembles the route table from each area and holds what handlers share. */
#include "http/api.h"

#include <stdlib.h>
#include <string.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/log.h"

th_api *th__api_of(th_req *req)
{
    return th__server_api(req->srv);
}

int th__api_create(th_server *srv, const th_server_config *cfg, th_api **out,
                   const th_route **routes, size_t *nroutes)
{
    th_api *api = th_calloc(1, sizeof(*api));
    if (api == NULL) {
        return TH_ENOMEM;
    }
    api->srv = srv;
    api->cfg = cfg;
    static const struct {
        const th_route *routes;
        const size_t *nroutes;
    } areas[] = {
        {th__health_routes, &th__health_nroutes},     {th__admin_routes, &th__admin_nroutes},
        {th__fhir_routes, &th__fhir_nroutes},         {th__events_routes, &th__events_nroutes},
        {th__progress_routes, &th__progress_nroutes}, {th__report_routes, &th__report_nroutes},
        {th__collect_routes, &th__collect_nroutes},   {th__analysis_routes, &th__analysis_nroutes},
        {th__web_routes, &th__web_nroutes},
    };
    size_t n = 0;
    for (size_t i = 0; i < sizeof(areas) / sizeof(areas[0]); i++) {
        n += *areas[i].nroutes;
    }
    api->routes = th_calloc(n, sizeof(th_route));
    if (api->routes == NULL) {
        th_free(api);
        return TH_ENOMEM;
    }
    for (size_t i = 0; i < sizeof(areas) / sizeof(areas[0]); i++) {
        memcpy(api->routes + api->nroutes, areas[i].routes, *areas[i].nroutes * sizeof(th_route));
        api->nroutes += *areas[i].nroutes;
    }
    static const char *const outcome[] = {"outcome"};
    int rc = th_metrics_counter(cfg->metrics, "trialhub_submissions_total",
                                "QuestionnaireResponse submissions by outcome.", 1, outcome,
                                &api->m_submissions);
    if (rc == 0) {
        rc = th__health_register_metrics(api);
    }
    if (rc == 0) {
        rc = th__hangup_create(&api->hangup);
    }
    if (rc == 0) {
        rc = th__events_api_create(api);
    }
    if (rc != 0) {
        th__api_destroy(api);
        return rc;
    }
    *out = api;
    *routes = api->routes;
    *nroutes = api->nroutes;
    return 0;
}

void th__api_stop(th_api *api)
{
    if (api != NULL) {
        th__events_api_stop(api);
    }
}

void th__api_destroy(th_api *api)
{
    if (api == NULL) {
        return;
    }
    th__events_api_stop(api);
    th__events_api_destroy(api);
    th__hangup_destroy(api->hangup);
    th_free(api->routes);
    th_free(api);
}

json_t *th__api_json_body(th_req *req)
{
    json_error_t err;
    json_t *value = json_loadb(req->body.data ? req->body.data : "", req->body.len,
                               JSON_REJECT_DUPLICATES, &err);
    if (value == NULL) {
        char detail[200];
        snprintf(detail, sizeof(detail), "malformed JSON at line %d, column %d", err.line,
                 err.column);
        th__resp_error(req, 400, detail);
    } else if (!json_is_object(value)) {
        json_decref(value);
        th__resp_error(req, 400, "the body must be a JSON object");
        value = NULL;
    }
    return value;
}

uint64_t th__api_duration_ns(const char *text)
{
    char *end;
    unsigned long long v = strtoull(text, &end, 10);
    if (end == text || v == 0 || v > 86400000) {
        return 0;
    }
    if (strcmp(end, "ms") == 0) {
        return v * TH_NS_PER_MS;
    }
    if (*end == '\0' || strcmp(end, "s") == 0) {
        return v * TH_NS_PER_S;
    }
    if (strcmp(end, "m") == 0) {
        return v * 60 * TH_NS_PER_S;
    }
    if (strcmp(end, "h") == 0 && v <= 24) {
        return v * 3600 * TH_NS_PER_S;
    }
    return 0;
}

bool th__api_url_ok(const char *url)
{
    size_t n = strlen(url);
    if (n < 8 || n > 2000 ||
        (strncmp(url, "https://", 8) != 0 && strncmp(url, "http://", 7) != 0)) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)url[i] <= ' ' || url[i] == '"' || url[i] == '\\') {
            return false;
        }
    }
    return true;
}

void th__api_json(th_req *req, unsigned status, json_t *value)
{
    char *text = json_dumps(value, JSON_COMPACT);
    json_decref(value);
    if (text == NULL) {
        th__resp_error(req, 503, "out of memory");
        return;
    }
    th_buf b;
    th_buf_init(&b, 0);
    th_buf_puts(&b, text);
    free(text);
    th__resp_buf(req, status, "application/json", &b);
}

static int api_write_apply(th_store *store, th_write_job *job)
{
    th_api_write *w = (th_api_write *)job;
    return w->apply(store, w);
}

static void api_write_done(th_write_job *job, int status)
{
    th_api_write *w = (th_api_write *)job;
    th_req *req = w->req;
    w->done(w, status);
    th__req_resume(req);
}

bool th__api_write(th_req *req, th_api_write *w)
{
    w->req = req;
    w->job.apply = api_write_apply;
    w->job.done = api_write_done;
    th__req_suspend(req);
    int rc = th_writer_try_submit(th__api_of(req)->cfg->writer, &w->job);
    if (rc != 0) {
        th__resp_error(req, 503,
                       rc == TH_EOVERLOAD ? "the writer is busy; retry shortly"
                                          : "the store cannot take writes now");
        th__req_resume(req);
        return false;
    }
    return true;
}
