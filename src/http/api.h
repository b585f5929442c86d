/* The API's route table and the state its handlers share (counters, borrowed services). One
 * file per area: api_health.c, api_admin.c, api_fhir.c, api_events.c, api_web.c. */
#ifndef TRIALHUB_HTTP_API_H
#define TRIALHUB_HTTP_API_H

#include <jansson.h>

#include "http/http_int.h"
#include "trialhub/metrics.h"
#include "trialhub/server.h"

struct th__ws_hub;
struct th__ws_tickets;

typedef struct th_api {
    th_server *srv;
    const th_server_config *cfg;
    th_metric *m_submissions; /* outcome = accepted|duplicate|conflict|rejected|overloaded */
    th_route *routes;
    size_t nroutes;
    struct th__ws_hub *ws;          /* GET /v1/events: the WebSocket hub (websocket.c) */
    struct th__ws_tickets *tickets; /* POST /v1/events/ticket (api_events.c) */
    th_hangup *hangup;              /* watches suspended report requests for clients that leave */
} th_api;

int th__api_create(th_server *srv, const th_server_config *cfg, th_api **out,
                   const th_route **routes, size_t *nroutes);
/* Ends what must end before libmicrohttpd stops: every WebSocket is closed. NULL is a no-op. */
void th__api_stop(th_api *api);
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
extern const th_route th__events_routes[];
extern const size_t th__events_nroutes;

/* The live-events area (api_events.c): the ticket store and the WebSocket hub. create returns
 * 0, TH_ENOMEM, TH_ESYS or a metrics error; stop closes every WebSocket and joins the hub's
 * thread (idempotent); destroy frees, after stop and after libmicrohttpd stopped. */
int th__events_api_create(th_api *api);
void th__events_api_stop(th_api *api);
void th__events_api_destroy(th_api *api);
extern const th_route th__progress_routes[];
extern const size_t th__progress_nroutes;
extern const th_route th__report_routes[];
extern const size_t th__report_nroutes;
extern const th_route th__collect_routes[];
extern const size_t th__collect_nroutes;
extern const th_route th__analysis_routes[];
extern const size_t th__analysis_nroutes;
extern const th_route th__web_routes[];
extern const size_t th__web_nroutes;

/* Metrics collectors for the pool and the writer (api_health.c). */
int th__health_register_metrics(th_api *api);

/* Parses a JSON request body strictly (duplicate keys rejected); on failure answers 400 with
 * line and column and returns NULL. */
json_t *th__api_json_body(th_req *req);
/* A duration as clients write it: "500ms", "20s", "10m", "2h" (at most 24) or plain seconds.
 * Returns nanoseconds, 0 when malformed. */
uint64_t th__api_duration_ns(const char *text);
/* Whether url is an http(s) URL of at most 2000 characters without spaces, quotes or
 * backslashes (callback and site URLs; where it resolves is checked when it is used). */
bool th__api_url_ok(const char *url);
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

/* ---- FHIR helpers shared by api_fhir.c and api_fhir_search.c */

/* The stored response as served: its body with `id`, `meta.versionId`, `meta.lastUpdated` (the
 * time it was received) and the processing extension added. *out is the caller's (json_decref).
 * Returns 0, TH_EPARSE (the stored body is not a JSON object) or TH_ENOMEM. */
int th__fhir_qr_resource(const th_qr_stored *row, json_t **out);
/* Formats unix_ms as an RFC 3339 instant in UTC with milliseconds: 2026-11-29T21:12:48.344Z. */
#define TH__FHIR_INSTANT_LEN 48
void th__fhir_format_instant(int64_t unix_ms, char out[TH__FHIR_INSTANT_LEN]);
/* The scope rule of every read and write of a patient's data: 0 when key may, else 403. */
unsigned th__fhir_scope_for_patient(const th_key *key, const char *patient_id, const char *trial_id,
                                    const char *site_id);
/* GET /fhir/QuestionnaireResponse: the FHIR search (api_fhir_search.c). */
void th__fhir_qr_search(th_req *req);

#endif
