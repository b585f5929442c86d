/* Liveness, readiness and Prometheus metrics, plus the collectors that expose the pool and the
 * group-commit writer. None of these need a key. */
#include <stdio.h>

#include "http/api.h"
#include "trialhub/alloc.h"

static void healthz(th_req *req)
{
    th__resp_static(req, 200, "text/plain; charset=utf-8", "ok\n");
}

static void readyz(th_req *req)
{
    th_api *api = th__api_of(req);
    th_writer_stats ws;
    th_writer_get_stats(api->cfg->writer, &ws);
    if (th__server_quiesced(req->srv)) {
        th__resp_error(req, 503, "shutting down");
    } else if (ws.fatal != 0) {
        th__resp_error(req, 503, "the store failed a commit and takes no more writes");
    } else if (th_store_ping(api->cfg->store) != 0) {
        th__resp_error(req, 503, "the store is not reachable");
    } else {
        th__resp_static(req, 200, "text/plain; charset=utf-8", "ready\n");
    }
}

static void metrics(th_req *req)
{
    th_buf b;
    th_buf_init(&b, 0);
    th_metrics_render(th__api_of(req)->cfg->metrics, &b);
    th__resp_buf(req, 200, "text/plain; version=0.0.4; charset=utf-8", &b);
}

static void collect_pool(void *arg, th_metric *family, th_buf *out)
{
    th_api *api = arg;
    th_pool_stats st;
    th_pool_get_stats(api->cfg->pool, &st);
    th_metrics_sample(out, family, NULL, "pool=\"scoring\",state=\"busy\"", st.busy);
    th_metrics_sample(out, family, NULL, "pool=\"scoring\",state=\"queued\"", (double)st.queued);
    th_metrics_sample(out, family, NULL, "pool=\"scoring\",state=\"threads\"", st.nthreads);
    th_metrics_sample(out, family, NULL, "pool=\"scoring\",state=\"capacity\"",
                      (double)st.capacity);
}

static void collect_pool_totals(void *arg, th_metric *family, th_buf *out)
{
    th_api *api = arg;
    th_pool_stats st;
    th_pool_get_stats(api->cfg->pool, &st);
    th_metrics_sample(out, family, NULL, "pool=\"scoring\",event=\"submitted\"",
                      (double)st.submitted);
    th_metrics_sample(out, family, NULL, "pool=\"scoring\",event=\"completed\"",
                      (double)st.completed);
    th_metrics_sample(out, family, NULL, "pool=\"scoring\",event=\"rejected\"",
                      (double)st.rejected);
    th_metrics_sample(out, family, NULL, "pool=\"scoring\",event=\"canceled\"",
                      (double)st.canceled);
}

static void collect_writer(void *arg, th_metric *family, th_buf *out)
{
    th_api *api = arg;
    th_writer_stats ws;
    th_writer_get_stats(api->cfg->writer, &ws);
    th_metrics_sample(out, family, NULL, NULL, (double)ws.queued);
}

int th__health_register_metrics(th_api *api)
{
    th_metrics *m = api->cfg->metrics;
    int rc = th_metrics_collector(m, "trialhub_pool_tasks",
                                  "Worker pool state: busy workers, queued tasks, threads.",
                                  "gauge", collect_pool, api);
    if (rc == 0) {
        rc = th_metrics_collector(m, "trialhub_pool_events_total",
                                  "Worker pool task events since start.", "counter",
                                  collect_pool_totals, api);
    }
    if (rc == 0) {
        rc = th_metrics_collector(m, "trialhub_writer_queue_jobs",
                                  "Jobs waiting for the group-commit writer.", "gauge",
                                  collect_writer, api);
    }
    return rc;
}

const th_route th__health_routes[] = {
    {.method = "GET", .pattern = "/healthz", .handler = healthz},
    {.method = "GET", .pattern = "/readyz", .handler = readyz},
    {.method = "GET", .pattern = "/metrics", .handler = metrics},
};
const size_t th__health_nroutes = sizeof(th__health_routes) / sizeof(th__health_routes[0]);
