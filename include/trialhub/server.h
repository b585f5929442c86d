/* The HTTP API server: libmicrohttpd in epoll thread-pool mode with suspend/resume, a router,
 * authentication, limits, request logs and metrics. It borrows everything it serves (store,
 * writer, pools, roster, keyring, questionnaires) from the caller, who creates them before and
 * destroys them after the server. */
#ifndef TRIALHUB_SERVER_H
#define TRIALHUB_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/auth.h"
#include "trialhub/error.h"
#include "trialhub/events.h"
#include "trialhub/metrics.h"
#include "trialhub/pool.h"
#include "trialhub/roster.h"
#include "trialhub/store.h"
#include "trialhub/writer.h"

typedef struct th_server th_server;
typedef struct th_qreg th_qreg;
typedef struct th_scoring th_scoring;
typedef struct th_progress th_progress;

typedef struct th_server_config {
    const char *listen;         /* "host:port"; port 0 picks a free one (th_server_port()) */
    unsigned threads;           /* HTTP threads; 0: one per core */
    unsigned conn_limit;        /* total connections */
    unsigned per_ip_limit;      /* connections per client address */
    unsigned idle_timeout_s;    /* keep-alive idle and header deadline */
    unsigned request_timeout_s; /* from headers to complete body */
    bool use_epoll;             /* epoll instead of poll (see docs/internals/http.md) */
    /* borrowed */
    th_store *store;
    th_writer *writer;
    th_pool *pool;
    th_metrics *metrics;
    th_roster *roster;
    th_keyring *keyring;
    th_qreg *qreg;
    th_scoring *scoring;
    th_events *events;              /* live events for GET /v1/events; NULL: only system.stats */
    th_progress *progress;          /* GET /v1/trials/{id}/progress */
    struct th_reports *reports;     /* interim reports; stopped before the server */
    struct th_collector *collector; /* multi-site collections; stopped before the server */
    struct th_queue *queue;         /* the durable task queue (image analyses) */
    struct th_blob_store *blobs;    /* uploaded images */
    th_pool *io_pool;               /* fsync and rename of uploads, off the HTTP threads */
    uint64_t upload_limit;          /* largest image upload; 0: 512 MiB */
    unsigned report_max_timeout_s;  /* largest timeout= a report may ask; 0: 120 */
    /* GET /v1/events (WebSocket) and its tickets; 0 means the default */
    unsigned ws_max_connections;   /* open WebSockets; beyond: 503 before upgrading; 1024 */
    unsigned ws_send_queue;        /* messages waiting per WebSocket before it is closed; 256 */
    size_t ws_send_queue_bytes;    /* bytes waiting per WebSocket before it is closed; 1 MiB */
    unsigned ws_ping_interval_ms;  /* ping every; silent for two intervals: dropped; 20000 */
    unsigned ws_stats_interval_ms; /* system.stats every; 1000 */
    unsigned ws_ticket_ttl_s;      /* a ticket's lifetime; 30 */
    unsigned ws_max_tickets;       /* tickets outstanding; beyond: 503; 4096 */
} th_server_config;

/* Starts listening and serving. Returns 0, TH_EINVAL (bad listen address), TH_ESYS (cannot
 * bind or start; errbuf says why) or TH_ENOMEM. */
TH_MUST_CHECK int th_server_start(const th_server_config *config, th_server **out, char *errbuf,
                                  size_t errlen);

/* Returns the bound TCP port. */
uint16_t th_server_port(const th_server *server);

/* Stops accepting new connections (existing ones finish); /readyz turns 503. */
void th_server_quiesce(th_server *server);

/* Stops the server: every suspended request must have been resumed (stop the writer first).
 * NULL is a no-op. */
void th_server_stop(th_server *server);

#endif
