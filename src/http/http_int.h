/* Private interface of the HTTP layer: the request object that handlers see, the router, and
 * the response helpers. Handlers run on libmicrohttpd's threads and never wait on the disk: a
 * handler that needs the writer suspends its request and the writer's completion resumes it. */
#ifndef TRIALHUB_HTTP_INT_H
#define TRIALHUB_HTTP_INT_H

#include <microhttpd.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/buf.h"
#include "trialhub/server.h"
#include "trialhub/store.h"

typedef struct th_req th_req;
typedef struct th_route th_route;

/* Called on the libmicrohttpd thread once a 101 answer is on the wire (th__req_upgrade()): the
 * socket is now the callee's, to be closed only with MHD_upgrade_action(urh,
 * MHD_UPGRADE_ACTION_CLOSE). extra_in holds bytes the client sent after its request; they are
 * valid only during the call. req is still valid during the call. */
typedef void (*th_upgrade_fn)(th_req *req, const char *extra_in, size_t extra_in_size,
                              MHD_socket sock, struct MHD_UpgradeResponseHandle *urh);

/* A response header with a value made per request (WebSocket handshake, 426 answers). */
typedef struct th_resp_header {
    const char *name; /* a string literal */
    char value[64];
} th_resp_header;

#define TH_RESP_MAX_DYN_HEADERS 4

/* What a handler answers. Body is owned (th_malloc) unless body_static. */
typedef struct th_resp {
    unsigned status;
    const char *content_type;
    char *body;
    size_t body_len;
    bool body_static;
    char location[96];
    char etag[40];
    unsigned retry_after_s; /* 0: no header */
    char allow[64];
    const char *cache_control;
    const char *const *headers; /* more headers: static name, value pairs, NULL-terminated */
    th_resp_header dyn_headers[TH_RESP_MAX_DYN_HEADERS]; /* th__resp_header() */
    unsigned ndyn_headers;
    th_upgrade_fn upgrade; /* set by th__req_upgrade(): answer 101 and hand the socket over */
} th_resp;

#define TH_ROUTE_MAX_PARAMS 3

typedef enum th_auth_need {
    TH_AUTH_NONE = 0, /* public: health, metrics, metadata */
    TH_AUTH_ANY,      /* any valid key; the handler checks the scope */
    TH_AUTH_ADMIN,    /* admin keys only */
    TH_AUTH_OPTIONAL, /* a key if one is sent (401 if invalid); without one the handler decides
                       * (GET /v1/events takes a single-use ticket instead) */
} th_auth_need;

typedef void (*th_handler_fn)(th_req *req);

struct th_route {
    const char *method;
    const char *pattern; /* "/fhir/QuestionnaireResponse/{id}" */
    th_handler_fn handler;
    th_auth_need auth;
    bool fhir;         /* errors as OperationOutcome */
    size_t body_limit; /* 0: no body accepted */
    /* When set, the body is not buffered: each chunk is handed to on_chunk as it arrives (on
     * the libmicrohttpd thread), then the handler runs at its end as usual. */
    void (*on_chunk)(th_req *req, const char *data, size_t len);
    const char *const *content_types; /* NULL-terminated accepted media types, or NULL */
};

enum th_req_phase {
    TH_PH_RECEIVING = 0, /* headers seen, body arriving */
    TH_PH_SUSPENDED,     /* waiting for the writer (or another thread) */
    TH_PH_RESPOND,       /* response ready to queue */
    TH_PH_SENT,
};

struct th_conn;

struct th_req {
    th_server *srv;
    struct MHD_Connection *conn;
    struct th_conn *tconn;
    const char *method;
    const char *url;
    const th_route *route;
    bool fhir; /* errors as OperationOutcome: a /fhir route, or /fhir without a route */
    char path_buf[256];
    const char *params[TH_ROUTE_MAX_PARAMS];
    unsigned nparams;
    char req_id[40];
    uint64_t start_ns;
    th_buf body;
    bool has_body;    /* the request declares a body (Content-Length > 0 or chunked) */
    size_t discarded; /* body bytes dropped after an early error */
    size_t streamed;  /* body bytes handed to the route's on_chunk */
    bool early_error; /* a response was decided before the body arrived */
    enum th_req_phase phase;
    atomic_bool resumed; /* set by the completing thread after the response is ready */
    th_key key;          /* the caller's key, when authenticated */
    bool authed;
    th_resp resp;
    /* handler-owned state, freed with the request */
    void *state;
    void (*state_free)(void *state);
};

/* ---- router (router.c) */

/* Finds the route for method and path. Returns it and fills params (pointing into path_buf);
 * or NULL with *allow set to the methods that exist for the path (405) or NULL (404). */
const th_route *th__route_match(const th_route *routes, size_t nroutes, const char *method,
                                const char *path, char *path_buf, size_t path_buf_len,
                                const char **params, unsigned *nparams, const char **allow);

/* ---- responses (respond.c) */

/* Sets a JSON response from a th_buf (taken) or fails over to 503 when the buffer failed. */
void th__resp_buf(th_req *req, unsigned status, const char *content_type, th_buf *body);
/* Sets a static body. */
void th__resp_static(th_req *req, unsigned status, const char *content_type, const char *body);
/* An error answer in the route's style: RFC 9457 problem+json on /v1, OperationOutcome on
 * /fhir. detail must not contain patient data. */
void th__resp_error(th_req *req, unsigned status, const char *detail);
/* Maps a trialhub error code to an HTTP status (the one place that does so). */
unsigned th__status_for(int err);

/* ---- suspension (server.c) */

/* Suspends the request (from its handler, on the MHD thread) until th__req_resume(). */
void th__req_suspend(th_req *req);
/* From any thread, once req->resp is set: resumes a suspended request. */
void th__req_resume(th_req *req);

/* Adds a response header whose value is made per request (name a string literal, value at most
 * 63 bytes, copied). Returns 0, or TH_EINVAL when the value does not fit or
 * TH_RESP_MAX_DYN_HEADERS are set. */
int th__resp_header(th_req *req, const char *name, const char *value);

/* From the handler: answers 101 Switching Protocols with the headers added by th__resp_header()
 * (the caller adds Upgrade and the protocol's own), and calls fn with the socket once the answer
 * is sent. If the client goes away first, fn is never called. The connection is exempt from
 * the reaper from now on: the callee owns its liveness. */
void th__req_upgrade(th_req *req, th_upgrade_fn fn);

/* ---- hang-up watcher (hangup.c): notices clients that close while their request waits */

typedef struct th_hangup th_hangup;
int th__hangup_create(th_hangup **out);
void th__hangup_destroy(th_hangup *hangup);
/* Calls fn(arg) once, on the watcher thread under its lock, when the peer of fd hangs up. The
 * caller must unwatch before the descriptor can be closed (before resuming the request).
 * Returns 0 with *handle set, TH_EOVERLOAD (too many watched) or TH_ESYS. */
int th__hangup_watch(th_hangup *hangup, int fd, void (*fn)(void *arg), void *arg, uint64_t *handle);
/* Stops watching; when it returns fn is not running and will not run. Returns whether the
 * watch was still armed (false: fn has run). */
bool th__hangup_unwatch(th_hangup *hangup, uint64_t handle);

/* Returns the request header value or NULL. */
const char *th__req_header(th_req *req, const char *name);
/* Returns the query argument or NULL. */
const char *th__req_query(th_req *req, const char *name);
/* Calls fn for every query argument in the order sent, repeated names included; value is NULL
 * for an argument without '=' (both are percent-decoded and live as long as the request). Stops
 * at fn's first non-zero return and returns it; 0 when fn never stopped it. */
int th__req_query_each(th_req *req, int (*fn)(void *arg, const char *name, const char *value),
                       void *arg);

#endif
