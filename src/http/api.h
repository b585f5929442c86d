/* The API's route table and the state its handlers share (counters, borrowed services). One
 * file per area: api_health.c, api_admin.c, api_fhir.c. */
#ifndef TRIALHUB_HTTP_API_H
#define TRIALHUB_HTTP_API_H

#include <jansson.h>

#include "http/http_int.h"
#include "trialhub/metrics.h"
#include "trialhub/server.h"

typedef struct th_api {
    th_server *srv;
    const th_server_config *cfg;
    th_metric *m_submissions; /* outcome = accepted|duplicate|conflict|rejected|overloaded */
    th_route *routes;
    size_t nroutes;
} th_api;

int th__api_create(th_server *srv, const th_server_config *cfg, th_api **out,
                   const th_route **routes, size_t *nroutes);
void th__api_destroy(th_api *api);

/* The api of a request. */
th_api *th__api_of(th_req *req);
bool th__server_quiesced(th_server *srv);
th_api *th__server_api(th_server *srv);

/* Route tables of each area, appended by th__api_create(). */
extern const th_route th__health_routes[];
extern const size_t th__health_nroutes;
extern const th_route th__admin_routes[];
extern const size_t th__admin_nroutes;
extern const th_route th__fhir_routes[];
extern const size_t th__fhir_nroutes;

/* Metrics collectors for the pool and the writer (api_health.c). */
int th__health_register_metrics(th_api *api);

/* Parses a JSON request body strictly (duplicate keys rejected); on failure answers 400 with
 * line and column and returns NULL. */
json_t *th__api_json_body(th_req *req);
/* Answers status with a JSON value (consumed). */
void th__api_json(th_req *req, unsigned status, json_t *value);

/* Runs apply on the writer thread inside a batch, then done on the writer thread; the request
 * is suspended meanwhile. If the writer refuses, answers 503 and returns false. */
typedef struct th_api_write {
    th_write_job job;
    th_req *req;
    int (*apply)(th_store *store, struct th_api_write *w);
    void (*done)(struct th_api_write *w, int status);
} th_api_write;
bool th__api_write(th_req *req, th_api_write *w);

#endif
