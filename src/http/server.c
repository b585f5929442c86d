/* libmicrohttpd glue: daemon start/stop, the access handler's state machine, limits, request
 * ids, logs and metrics, and the slow-client reaper.
 *
 * A request goes through the access handler several times: first with its headers (we route,
 * authenticate and check limits, but never queue an answer there, which would cost keep-alive:
 * libmicrohttpd 0.9.75 adds `Connection: close` to an answer queued on the first call), then
 * once per body chunk, then once with no data, where the handler runs. A handler that needs the
 * writer suspends the connection; the writer's completion fills the response and resumes it,
 * and the next call queues the answer. A handler may also answer 101 and take the socket over
 * (th__req_upgrade(), GET /v1/events): libmicrohttpd calls the completion only when that
 * socket is closed, the reaper leaves it alone, and th_server_stop() has the API close every
 * upgraded connection before the daemon stops, as libmicrohttpd requires.
 *
 * libmicrohttpd's own timeout counts inactivity, so a client that trickles one header byte
 * every few seconds would never be dropped. The reaper thread therefore gives every connection
 * a deadline (headers of the next request within idle_timeout_s, a whole request body within
 * request_timeout_s) and shuts the socket down when it passes; libmicrohttpd then closes it.
 *
 * Locking: `conns_mu` protects the connection list and each th_conn's links; deadlines are
 * atomics. The reaper holds conns_mu while it shuts a socket down, and libmicrohttpd's
 * close notification removes the connection under the same mutex before the descriptor is
 * closed, so the reaper never touches a reused descriptor. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/core_int.h"
#include "http/api.h"
#include "http/http_int.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/log.h"

typedef struct th_conn {
    struct th_conn *prev, *next;
    struct MHD_Connection *conn;
    _Atomic uint64_t deadline_ns; /* 0: exempt (suspended, waiting on us) */
} th_conn;

struct th_server {
    th_server_config cfg;
    struct MHD_Daemon *daemon;
    uint16_t port;
    const th_route *routes;
    size_t nroutes;
    uint32_t req_prefix;
    _Atomic uint32_t req_counter;
    atomic_bool quiesced;
    th_metric *m_requests;
    th_metric *m_duration;
    th_metric *m_reaped;
    pthread_mutex_t conns_mu;
    pthread_cond_t reaper_cond;
    th_conn *conns;
    bool reaper_stop;
    bool reaper_started;
    pthread_t reaper;
    th_api *api;
};

/* ---- connection tracking and the reaper -------------------------------------------------- */

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    th_server *srv = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        th_conn *c = th_calloc(1, sizeof(*c));
        *socket_context = c;
        if (c == NULL) {
            return; /* not tracked: only libmicrohttpd's own timeout applies */
        }
        c->conn = conn;
        atomic_init(&c->deadline_ns,
                    th_clock_after_ns((uint64_t)srv->cfg.idle_timeout_s * TH_NS_PER_S));
        pthread_mutex_lock(&srv->conns_mu);
        c->next = srv->conns;
        if (srv->conns) {
            srv->conns->prev = c;
        }
        srv->conns = c;
        pthread_mutex_unlock(&srv->conns_mu);
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        th_conn *c = *socket_context;
        if (c == NULL) {
            return;
        }
        pthread_mutex_lock(&srv->conns_mu);
        if (c->prev) {
            c->prev->next = c->next;
        } else {
            srv->conns = c->next;
        }
        if (c->next) {
            c->next->prev = c->prev;
        }
        pthread_mutex_unlock(&srv->conns_mu);
        th_free(c);
        *socket_context = NULL;
    }
}

static void *reaper_main(void *arg)
{
    th_server *srv = arg;
    pthread_mutex_lock(&srv->conns_mu);
    while (!srv->reaper_stop) {
        th__cond_wait_until(&srv->reaper_cond, &srv->conns_mu, th_clock_after_ns(TH_NS_PER_S));
        uint64_t now = th_clock_now_ns();
        for (th_conn *c = srv->conns; c; c = c->next) {
            uint64_t deadline = atomic_load(&c->deadline_ns);
            if (deadline == 0 || deadline > now) {
                continue;
            }
            const union MHD_ConnectionInfo *info =
                MHD_get_connection_info(c->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
            if (info) {
                shutdown(info->connect_fd, SHUT_RDWR);
                atomic_store(&c->deadline_ns, 0);
                th_metric_add(srv->m_reaped, NULL, 1);
            }
        }
    }
    pthread_mutex_unlock(&srv->conns_mu);
    return NULL;
}

static void conn_deadline(th_req *req, uint64_t timeout_s)
{
    if (req->tconn) {
        atomic_store(&req->tconn->deadline_ns,
                     timeout_s ? th_clock_after_ns(timeout_s * TH_NS_PER_S) : 0);
    }
}

/* ---- requests ---------------------------------------------------------------------------- */

const char *th__req_header(th_req *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, name);
}

const char *th__req_query(th_req *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, name);
}

struct query_each {
    int (*fn)(void *arg, const char *name, const char *value);
    void *arg;
    int rc;
};

static enum MHD_Result query_each_value(void *cls, enum MHD_ValueKind kind, const char *key,
                                        const char *value)
{
    (void)kind;
    struct query_each *qe = cls;
    qe->rc = qe->fn(qe->arg, key, value);
    return qe->rc == 0 ? MHD_YES : MHD_NO;
}

int th__req_query_each(th_req *req, int (*fn)(void *arg, const char *name, const char *value),
                       void *arg)
{
    struct query_each qe = {fn, arg, 0};
    (void)MHD_get_connection_values(req->conn, MHD_GET_ARGUMENT_KIND, query_each_value, &qe);
    return qe.rc;
}

void th__req_suspend(th_req *req)
{
    req->phase = TH_PH_SUSPENDED;
    conn_deadline(req, 0); /* waiting on us, not on the client */
    MHD_suspend_connection(req->conn);
}

void th__req_resume(th_req *req)
{
    atomic_store_explicit(&req->resumed, true, memory_order_release);
    MHD_resume_connection(req->conn);
}

static bool valid_request_id(const char *id)
{
    size_t n = 0;
    for (; id[n]; n++) {
        char ch = id[n];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              ch == '-' || ch == '_')) {
            return false;
        }
    }
    return n > 0 && n < 40;
}

static bool media_type_ok(const char *header, const char *const *accepted)
{
    if (header == NULL) {
        return false;
    }
    size_t len = strcspn(header, ";");
    while (len > 0 && (header[len - 1] == ' ' || header[len - 1] == '\t')) {
        len--;
    }
    for (const char *const *t = accepted; *t; t++) {
        if (strlen(*t) == len && strncasecmp(header, *t, len) == 0) {
            return true;
        }
    }
    return false;
}

/* Parses "Bearer <key>" and looks the key up. Returns 0, or the status to answer. */
static unsigned authenticate(th_req *req)
{
    const char *h = th__req_header(req, MHD_HTTP_HEADER_AUTHORIZATION);
    if (h == NULL) {
        return 401;
    }
    if (strncasecmp(h, "Bearer ", 7) != 0) {
        return 401;
    }
    const char *key = h + 7;
    while (*key == ' ') {
        key++;
    }
    size_t len = strlen(key);
    while (len > 0 && key[len - 1] == ' ') {
        len--;
    }
    if (th_keyring_check(req->srv->cfg.keyring, key, len, &req->key) != 0) {
        return 401;
    }
    req->authed = true;
    if (req->route->auth == TH_AUTH_ADMIN && req->key.role != TH_ROLE_ADMIN) {
        return 403;
    }
    return 0;
}

/* The body limit of the request's route: streamed uploads take the server's upload limit. */
static uint64_t route_limit(const th_req *req)
{
    if (req->route->on_chunk) {
        uint64_t limit = req->srv->cfg.upload_limit;
        return limit ? limit : (uint64_t)512 << 20;
    }
    return req->route->body_limit;
}

static void early_error(th_req *req, unsigned status, const char *detail)
{
    th__resp_error(req, status, detail);
    req->early_error = true;
}

/* First call: route, authenticate, check the declared body. Never queues an answer. */
static void on_headers(th_req *req, const char *method, const char *url)
{
    th_server *srv = req->srv;
    const char *allow = NULL;
    const char *id = th__req_header(req, "X-Request-Id");
    if (id && valid_request_id(id)) {
        snprintf(req->req_id, sizeof(req->req_id), "%s", id);
    } else {
        uint32_t n = atomic_fetch_add_explicit(&srv->req_counter, 1, memory_order_relaxed);
        snprintf(req->req_id, sizeof(req->req_id), "%08x%08x", srv->req_prefix, n);
    }
    const char *clen = th__req_header(req, MHD_HTTP_HEADER_CONTENT_LENGTH);
    req->has_body = (clen && strcmp(clen, "0") != 0) ||
                    th__req_header(req, MHD_HTTP_HEADER_TRANSFER_ENCODING) != NULL;
    req->route = th__route_match(srv->routes, srv->nroutes, method, url, req->path_buf,
                                 sizeof(req->path_buf), req->params, &req->nparams, &allow);
    req->fhir = req->route ? req->route->fhir : strncmp(url, "/fhir", 5) == 0;
    conn_deadline(req, srv->cfg.request_timeout_s);
    if (req->route == NULL) {
        if (allow) {
            snprintf(req->resp.allow, sizeof(req->resp.allow), "%s", allow);
            early_error(req, 405, "method not allowed on this resource");
        } else {
            early_error(req, 404, "no such resource");
        }
        return;
    }
    if (req->route->auth != TH_AUTH_NONE &&
        (req->route->auth != TH_AUTH_OPTIONAL ||
         th__req_header(req, MHD_HTTP_HEADER_AUTHORIZATION) != NULL)) {
        unsigned status = authenticate(req);
        if (status == 401) {
            early_error(req, 401, "a valid API key is required (Authorization: Bearer <key>)");
            return;
        }
        if (status == 403) {
            early_error(req, 403, "this key may not use this endpoint");
            return;
        }
    }
    if (req->has_body && req->route->body_limit == 0) {
        early_error(req, 400, "this endpoint takes no request body");
        return;
    }
    if (req->route->content_types && req->has_body &&
        !media_type_ok(th__req_header(req, MHD_HTTP_HEADER_CONTENT_TYPE),
                       req->route->content_types)) {
        early_error(req, 415, "unsupported Content-Type");
        return;
    }
    if (clen && strtoull(clen, NULL, 10) > route_limit(req)) {
        early_error(req, 413, "request body too large");
        return;
    }
    th_buf_init(&req->body, req->route->on_chunk ? 1 : req->route->body_limit);
}

int th__resp_header(th_req *req, const char *name, const char *value)
{
    th_resp *r = &req->resp;
    if (r->ndyn_headers == TH_RESP_MAX_DYN_HEADERS ||
        strlen(value) >= sizeof(r->dyn_headers[0].value)) {
        return TH_EINVAL;
    }
    r->dyn_headers[r->ndyn_headers].name = name;
    snprintf(r->dyn_headers[r->ndyn_headers].value, sizeof(r->dyn_headers[0].value), "%s", value);
    r->ndyn_headers++;
    return 0;
}

void th__req_upgrade(th_req *req, th_upgrade_fn fn)
{
    th__resp_static(req, 101, NULL, "");
    req->resp.upgrade = fn;
}

/* libmicrohttpd's upgrade callback: the 101 is sent; hand the socket to the handler's fn. */
static void on_upgrade(void *cls, struct MHD_Connection *conn, void *con_cls, const char *extra_in,
                       size_t extra_in_size, MHD_socket sock, struct MHD_UpgradeResponseHandle *urh)
{
    (void)cls;
    (void)conn;
    th_req *req = con_cls;
    req->resp.upgrade(req, extra_in, extra_in_size, sock, urh);
}

static enum MHD_Result queue_response(th_req *req)
{
    th_resp *r = &req->resp;
    struct MHD_Response *resp;
    if (r->upgrade) {
        resp = MHD_create_response_for_upgrade(on_upgrade, NULL);
        conn_deadline(req, 0); /* from now on the upgraded protocol keeps the connection alive */
    } else if (r->body_static) {
        resp = MHD_create_response_from_buffer(r->body_len, r->body, MHD_RESPMEM_PERSISTENT);
    } else {
        resp = MHD_create_response_from_buffer_with_free_callback(r->body_len, r->body, th_free);
        r->body = NULL; /* now the response's */
    }
    if (resp == NULL) {
        return MHD_NO;
    }
    if (r->content_type) {
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->content_type);
    }
    MHD_add_response_header(resp, "X-Request-Id", req->req_id);
    if (r->location[0]) {
        MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, r->location);
    }
    if (r->etag[0]) {
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, r->etag);
    }
    if (r->allow[0]) {
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, r->allow);
    }
    if (r->retry_after_s) {
        char ra[16];
        snprintf(ra, sizeof(ra), "%u", r->retry_after_s);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
    if (r->status == 401) {
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    }
    for (unsigned i = 0; i < r->ndyn_headers; i++) {
        MHD_add_response_header(resp, r->dyn_headers[i].name, r->dyn_headers[i].value);
    }
    for (const char *const *h = r->headers; h && h[0] && h[1]; h += 2) {
        MHD_add_response_header(resp, h[0], h[1]);
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL,
                            r->cache_control ? r->cache_control : "no-store");
    enum MHD_Result ret = MHD_queue_response(req->conn, r->status, resp);
    MHD_destroy_response(resp);
    req->phase = TH_PH_SENT;
    return ret;
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **con_cls)
{
    (void)version;
    th_server *srv = cls;
    th_req *req = *con_cls;
    if (req == NULL) {
        req = th_calloc(1, sizeof(*req));
        if (req == NULL) {
            return MHD_NO;
        }
        *con_cls = req;
        req->srv = srv;
        req->conn = conn;
        req->method = method;
        req->url = url;
        req->start_ns = th_clock_now_ns();
        const union MHD_ConnectionInfo *info =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        req->tconn = info ? info->socket_context : NULL;
        on_headers(req, method, url);
        if (req->early_error && req->has_body) {
            /* Refuse before reading the body: libmicrohttpd accepts an answer now or after
             * the whole body, not in between. This one costs the connection (it cannot be
             * reused with an unread body on it), which is what a refused upload deserves. */
            return queue_response(req);
        }
        return MHD_YES;
    }
    if (req->phase == TH_PH_SUSPENDED) {
        /* Resumed: the completing thread filled the response. */
        if (!atomic_load_explicit(&req->resumed, memory_order_acquire)) {
            return MHD_YES;
        }
        return queue_response(req);
    }
    if (*upload_data_size > 0) {
        if (req->phase == TH_PH_SENT) {
            *upload_data_size = 0; /* answered already; the connection closes after it */
            return MHD_YES;
        }
        if (req->early_error) {
            /* Over the limit mid-stream (a chunked body): drop the rest and answer 413 at the
             * end, but cut a client off that keeps sending far past the limit. */
            uint64_t limit = req->route ? route_limit(req) : 0;
            req->discarded += *upload_data_size;
            *upload_data_size = 0;
            return req->discarded > 2 * limit + 65536 ? MHD_NO : MHD_YES;
        }
        if (req->route->on_chunk) {
            /* Streamed: the route consumes the body as it arrives (uploads of images). */
            req->streamed += *upload_data_size;
            if (req->streamed > route_limit(req)) {
                early_error(req, 413, "request body too large");
            } else {
                req->route->on_chunk(req, upload_data, *upload_data_size);
            }
            *upload_data_size = 0;
            return MHD_YES;
        }
        th_buf_append(&req->body, upload_data, *upload_data_size);
        *upload_data_size = 0;
        if (th_buf_failed(&req->body)) {
            early_error(req, 413, "request body too large");
        }
        return MHD_YES;
    }
    if (req->phase == TH_PH_SENT) {
        return MHD_YES;
    }
    if (!req->early_error && req->phase == TH_PH_RECEIVING) {
        req->phase = TH_PH_RESPOND;
        req->route->handler(req);
        if (req->phase == TH_PH_SUSPENDED) {
            return MHD_YES;
        }
    }
    return queue_response(req);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    th_server *srv = cls;
    th_req *req = *con_cls;
    if (req == NULL) {
        return;
    }
    double seconds = (double)(th_clock_now_ns() - req->start_ns) / 1e9;
    const char *route = req->route && req->route->pattern ? req->route->pattern : "unmatched";
    unsigned status = req->phase == TH_PH_SENT ? req->resp.status : 0;
    char status_text[8];
    snprintf(status_text, sizeof(status_text), "%u", status);
    const char *labels[] = {route, req->method, status_text};
    th_metric_add(srv->m_requests, labels, 1);
    th_metric_observe(srv->m_duration, labels, seconds);
    TH_LOG(status >= 500 || status == 0 ? TH_LOG_WARN : TH_LOG_INFO, "request",
           TH_LOG_STR("method", req->method), TH_LOG_STR("route", route),
           TH_LOG_INT("status", status), TH_LOG_DBL("duration_ms", seconds * 1000.0),
           TH_LOG_STR("request_id", req->req_id),
           TH_LOG_STR("key_id", req->authed ? req->key.id : NULL),
           TH_LOG_STR("end", toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "ok" : "aborted"));
    if (req->tconn && req->resp.upgrade == NULL) {
        atomic_store(&req->tconn->deadline_ns,
                     th_clock_after_ns((uint64_t)srv->cfg.idle_timeout_s * TH_NS_PER_S));
    }
    if (req->state_free) {
        req->state_free(req->state);
    }
    if (req->resp.body && !req->resp.body_static) {
        th_free(req->resp.body);
    }
    th_buf_free(&req->body);
    th_free(req);
    *con_cls = NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof(line), fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && line[n - 1] == '\n') {
        line[--n] = '\0';
    }
    TH_LOG(TH_LOG_WARN, "libmicrohttpd", TH_LOG_STR("detail", line));
}

/* ---- life cycle -------------------------------------------------------------------------- */

static int parse_listen(const char *listen, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    const char *colon = strrchr(listen, ':');
    if (colon == NULL) {
        return TH_EINVAL;
    }
    char *end;
    unsigned long port = strtoul(colon + 1, &end, 10);
    if (*end != '\0' || port > 65535 || colon[1] == '\0') {
        return TH_EINVAL;
    }
    char host[128];
    size_t hlen = (size_t)(colon - listen);
    if (hlen >= sizeof(host)) {
        return TH_EINVAL;
    }
    memcpy(host, listen, hlen);
    host[hlen] = '\0';
    if (hlen >= 2 && host[0] == '[' && host[hlen - 1] == ']') {
        host[hlen - 1] = '\0';
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host + 1, &a6->sin6_addr) != 1) {
            return TH_EINVAL;
        }
        *len = sizeof(*a6);
        return 0;
    }
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    if (strcmp(host, "localhost") == 0) {
        snprintf(host, sizeof(host), "127.0.0.1");
    } else if (hlen == 0) {
        snprintf(host, sizeof(host), "0.0.0.0");
    }
    if (inet_pton(AF_INET, host, &a4->sin_addr) != 1) {
        return TH_EINVAL;
    }
    *len = sizeof(*a4);
    return 0;
}

int th_server_start(const th_server_config *config, th_server **out, char *errbuf, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    if (parse_listen(config->listen, &ss, &sslen) != 0) {
        snprintf(errbuf, errlen, "bad listen address (want host:port)");
        return TH_EINVAL;
    }
    th_server *srv = th_calloc(1, sizeof(*srv));
    if (srv == NULL) {
        return TH_ENOMEM;
    }
    srv->cfg = *config;
    if (srv->cfg.threads == 0) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        srv->cfg.threads = ncpu > 0 ? (unsigned)ncpu : 2;
    }
    if (getrandom(&srv->req_prefix, sizeof(srv->req_prefix), 0) != sizeof(srv->req_prefix)) {
        srv->req_prefix = (uint32_t)getpid();
    }
    pthread_mutex_init(&srv->conns_mu, NULL);
    int rc = th__cond_init_monotonic(&srv->reaper_cond);
    static const char *const req_labels[] = {"route", "method", "status"};
    static const double dur_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                        0.05,   0.1,   0.25,   0.5,   1,    2.5};
    if (rc == 0) {
        rc = th_metrics_counter(config->metrics, "trialhub_http_requests_total",
                                "HTTP requests answered, by route template, method and status.", 3,
                                req_labels, &srv->m_requests);
    }
    if (rc == 0) {
        rc = th_metrics_histogram(config->metrics, "trialhub_http_request_duration_seconds",
                                  "Time from request headers to the end of the answer.", 3,
                                  req_labels, dur_bounds, sizeof(dur_bounds) / sizeof(double),
                                  &srv->m_duration);
    }
    if (rc == 0) {
        rc = th_metrics_counter(config->metrics, "trialhub_http_slow_clients_dropped_total",
                                "Connections dropped for missing their header or body deadline.", 0,
                                NULL, &srv->m_reaped);
    }
    if (rc == 0) {
        rc = th__api_create(srv, &srv->cfg, &srv->api, &srv->routes, &srv->nroutes);
    }
    if (rc != 0) {
        snprintf(errbuf, errlen, "cannot set up the server: %s", th_strerror(rc));
        th_server_stop(srv);
        return rc;
    }
    /* poll() by default: with epoll, libmicrohttpd 0.9.75 lost the readiness of hundreds of
     * connections when ~1000 of them closed and opened at once (both workers asleep in
     * epoll_wait while 512 requests waited; reproduced with bench/ingest, and gone with poll). */
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME |
                     MHD_ALLOW_UPGRADE | MHD_USE_ERROR_LOG |
                     (config->use_epoll ? MHD_USE_EPOLL : MHD_USE_POLL);
    if (ss.ss_family == AF_INET6) {
        flags |= MHD_USE_IPv6;
    }
    srv->daemon = MHD_start_daemon(
        flags, 0, NULL, NULL, on_access, srv, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, srv,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss, MHD_OPTION_THREAD_POOL_SIZE, srv->cfg.threads,
        MHD_OPTION_CONNECTION_LIMIT, srv->cfg.conn_limit, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        srv->cfg.per_ip_limit, MHD_OPTION_CONNECTION_TIMEOUT, srv->cfg.idle_timeout_s,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)16 * 1024, MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024,
        MHD_OPTION_STRICT_FOR_CLIENT, 1, MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_NOTIFY_CONNECTION, on_connection, srv, MHD_OPTION_END);
    if (srv->daemon == NULL) {
        snprintf(errbuf, errlen, "cannot listen on %s (in use, or not an address of this host)",
                 config->listen);
        th_server_stop(srv);
        return TH_ESYS;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = info ? info->port : 0;
    if (th__thread_start(&srv->reaper, "th-http-reaper", reaper_main, srv) == 0) {
        srv->reaper_started = true;
    }
    *out = srv;
    return 0;
}

uint16_t th_server_port(const th_server *srv)
{
    return srv->port;
}

void th_server_quiesce(th_server *srv)
{
    if (!atomic_exchange(&srv->quiesced, true) && srv->daemon) {
        MHD_socket fd = MHD_quiesce_daemon(srv->daemon);
        if (fd != MHD_INVALID_SOCKET) {
            close(fd);
        }
    }
}

th_api *th__server_api(th_server *srv)
{
    return srv->api;
}

bool th__server_quiesced(th_server *srv)
{
    return atomic_load(&srv->quiesced);
}

void th_server_stop(th_server *srv)
{
    if (srv == NULL) {
        return;
    }
    if (srv->reaper_started) {
        pthread_mutex_lock(&srv->conns_mu);
        srv->reaper_stop = true;
        pthread_cond_signal(&srv->reaper_cond);
        pthread_mutex_unlock(&srv->conns_mu);
        pthread_join(srv->reaper, NULL);
    }
    /* Upgraded connections (WebSockets) must be closed before the daemon stops. */
    th__api_stop(srv->api);
    if (srv->daemon) {
        MHD_stop_daemon(srv->daemon);
    }
    th__api_destroy(srv->api);
    pthread_cond_destroy(&srv->reaper_cond);
    pthread_mutex_destroy(&srv->conns_mu);
    th_free(srv);
}
