/* Multi-site collections over HTTP: POST /v1/trials/{id}/collections starts one (202),
 * GET /v1/collections/{id} shows it per site, DELETE cancels it. Admins and the trial's
 * investigators. Errors never quote a site's credential (the collector never has it in a
 * message). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/api.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/collector.h"

#define MAX_NAMED_SITES 256

static bool may_collect(th_req *req, const char *trial_id)
{
    if (req->key.role == TH_ROLE_ADMIN ||
        (req->key.role == TH_ROLE_INVESTIGATOR && strcmp(req->key.trial_id, trial_id) == 0)) {
        return true;
    }
    th__resp_error(req, 403, "collections are for admins and the trial's investigators");
    return false;
}

static void collections_post(th_req *req)
{
    const char *trial_id = req->params[0];
    th_collector *collector = th__api_of(req)->cfg->collector;
    if (!may_collect(req, trial_id)) {
        return;
    }
    if (collector == NULL) {
        th__resp_error(req, 503, "collections are not available on this node");
        return;
    }
    th_collection_request creq = {.trial_id = trial_id, .since = th__req_query(req, "since")};
    const char *timeout = th__req_query(req, "timeout");
    if (timeout) {
        creq.timeout_ns = th__api_duration_ns(timeout);
        if (creq.timeout_ns == 0) {
            th__resp_error(req, 400, "timeout must be a duration such as 30s, 10m or 2h (max 24h)");
            return;
        }
    }
    const char *sites = th__req_query(req, "sites");
    char *copy = NULL;
    const char *named[MAX_NAMED_SITES + 1];
    if (sites) {
        size_t n = strlen(sites);
        copy = th_malloc(n + 1);
        if (copy == NULL) {
            th__resp_error(req, 503, "out of memory");
            return;
        }
        memcpy(copy, sites, n + 1);
        size_t count = 0;
        char *save = NULL;
        for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            if (count == MAX_NAMED_SITES) {
                th_free(copy);
                th__resp_error(req, 400, "at most 256 sites may be named");
                return;
            }
            named[count++] = tok;
        }
        named[count] = NULL;
        if (count == 0) {
            th_free(copy);
            th__resp_error(req, 400, "sites must list site ids separated by commas");
            return;
        }
        creq.sites = named;
    }
    char id[32], err[200];
    int rc = th_collector_start(collector, &creq, id, err, sizeof(err));
    th_free(copy);
    if (rc != 0) {
        unsigned status = rc == TH_EINVAL ? 400 : th__status_for(rc);
        th__resp_error(req, status, err[0] ? err : "the collection could not start");
        if (status == 503) {
            req->resp.retry_after_s = 5;
        }
        return;
    }
    snprintf(req->resp.location, sizeof(req->resp.location), "/v1/collections/%s", id);
    th__api_json(
        req, 202,
        json_pack("{s:s,s:s,s:s}", "id", id, "state", "running", "self", req->resp.location));
}

/* Reads the collection into b and checks the key may see it; answers and returns false if
 * not. */
static bool collection_visible(th_req *req, th_buf *b)
{
    th_collector *collector = th__api_of(req)->cfg->collector;
    char trial_id[TH_ID_MAX + 1];
    int rc = collector ? th_collector_get(collector, req->params[0], b, trial_id) : TH_ENOTFOUND;
    if (rc != 0) {
        th__resp_error(req, rc == TH_ENOTFOUND ? 404 : 503,
                       rc == TH_ENOTFOUND ? "no such collection" : "out of memory");
        return false;
    }
    return may_collect(req, trial_id);
}

static void collection_get(th_req *req)
{
    th_buf b;
    th_buf_init(&b, 0);
    if (!collection_visible(req, &b)) {
        th_buf_free(&b);
        return;
    }
    th__resp_buf(req, 200, "application/json", &b);
}

static void collection_delete(th_req *req)
{
    th_buf b;
    th_buf_init(&b, 0);
    bool visible = collection_visible(req, &b);
    th_buf_free(&b);
    if (!visible) {
        return;
    }
    bool was_running = false;
    th_collector *collector = th__api_of(req)->cfg->collector;
    if (th_collector_cancel(collector, req->params[0], &was_running) != 0) {
        th__resp_error(req, 404, "no such collection");
        return;
    }
    /* Answer with its state now, without waiting: every transfer is being removed and the
     * state turns canceled within moments (GET it). */
    th_buf_init(&b, 0);
    char trial_id[TH_ID_MAX + 1];
    if (th_collector_get(collector, req->params[0], &b, trial_id) != 0) {
        th_buf_free(&b);
        th__resp_error(req, 404, "no such collection");
        return;
    }
    th__resp_buf(req, was_running ? 202 : 200, "application/json", &b);
}

const th_route th__collect_routes[] = {
    {.method = "POST",
     .pattern = "/v1/trials/{id}/collections",
     .handler = collections_post,
     .auth = TH_AUTH_ANY},
    {.method = "GET",
     .pattern = "/v1/collections/{id}",
     .handler = collection_get,
     .auth = TH_AUTH_ANY},
    {.method = "DELETE",
     .pattern = "/v1/collections/{id}",
     .handler = collection_delete,
     .auth = TH_AUTH_ANY},
};
const size_t th__collect_nroutes = sizeof(th__collect_routes) / sizeof(th__collect_routes[0]);
