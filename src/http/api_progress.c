/* GET /v1/trials/{id}/progress: the trial's progress document, copied out of the progress
 * cache's current version (never waiting for the updater), with an ETag and If-None-Match.
 * Investigators see their trial, site keys their own site's rows only, admins any trial. */
#include <string.h>

#include "http/api.h"
#include "trialhub/progress.h"

static void progress_get(th_req *req)
{
    th_progress *progress = th__api_of(req)->cfg->progress;
    const char *trial_id = req->params[0];
    const char *site_id = NULL;
    switch (req->key.role) {
    case TH_ROLE_ADMIN:
        break;
    case TH_ROLE_INVESTIGATOR:
    case TH_ROLE_SITE:
        if (strcmp(req->key.trial_id, trial_id) != 0) {
            th__resp_error(req, 403, "this key may not read this trial's progress");
            return;
        }
        site_id = req->key.role == TH_ROLE_SITE ? req->key.site_id : NULL;
        break;
    default:
        th__resp_error(req, 403, "this key may not read trial progress");
        return;
    }
    if (progress == NULL) {
        th__resp_error(req, 503, "progress is not available on this node");
        return;
    }
    th_buf b;
    th_buf_init(&b, 0);
    bool not_modified = false;
    int rc = th_progress_read(progress, trial_id, site_id, th__req_header(req, "If-None-Match"), &b,
                              req->resp.etag, &not_modified);
    if (rc == TH_ENOTFOUND) {
        th_buf_free(&b);
        th__resp_error(req, 404, "no such trial");
        return;
    }
    if (rc != 0) {
        th_buf_free(&b);
        th__resp_error(req, 503, "out of memory");
        return;
    }
    req->resp.cache_control = "private, no-cache";
    if (not_modified) {
        th_buf_free(&b);
        th__resp_static(req, 304, NULL, "");
        return;
    }
    th__resp_buf(req, 200, "application/json", &b);
}

const th_route th__progress_routes[] = {
    {.method = "GET",
     .pattern = "/v1/trials/{id}/progress",
     .handler = progress_get,
     .auth = TH_AUTH_ANY},
};
const size_t th__progress_nroutes = sizeof(th__progress_routes) / sizeof(th__progress_routes[0]);
