/* Private interface of the WebSocket hub (websocket.c) for the live-events routes
 * (api_events.c): reserve a connection slot before answering 101, then hand the upgraded socket
 * over; plus the topic policy, kept pure so that it can be tested on its own. Design notes:
 * docs/internals/events.md. */
#ifndef TRIALHUB_HTTP_WS_INT_H
#define TRIALHUB_HTTP_WS_INT_H

#include <microhttpd.h>
#include <stdbool.h>
#include <stddef.h>

#include "trialhub/error.h"
#include "trialhub/events.h"
#include "trialhub/server.h"
#include "trialhub/store.h"

typedef struct th__ws_hub th__ws_hub;

/* Defaults for the ws_ fields of th_server_config left at 0. */
#define TH_WS_DEFAULT_MAX_CONNECTIONS 1024
#define TH_WS_DEFAULT_SEND_QUEUE      256
#define TH_WS_DEFAULT_SEND_QUEUE_B    ((size_t)1 << 20)
#define TH_WS_DEFAULT_PING_MS         20000
#define TH_WS_DEFAULT_STATS_MS        1000
#define TH_WS_DEFAULT_TICKET_TTL_S    30
#define TH_WS_DEFAULT_MAX_TICKETS     4096

/* Most topics one connection may hold, and the largest message a client may send (a bigger
 * one closes the connection with 1009). */
#define TH_WS_MAX_TOPICS  16
#define TH_WS_MAX_MESSAGE 4096

/* Creates the hub and starts its I/O thread; subscribes it to cfg->events when that is not
 * NULL. cfg must outlive the hub. With cfg->metrics, registers trialhub_ws_connections,
 * trialhub_ws_closed_total{reason} and trialhub_ws_events_dropped_total. Returns 0, TH_ENOMEM,
 * TH_ESYS (eventfd, epoll or the thread), TH_EOVERLOAD (the event hub has no room for another
 * sink) or a metrics error; on error nothing is left running. */
TH_MUST_CHECK int th__ws_hub_create(const th_server_config *cfg, th__ws_hub **out);

/* Unsubscribes from the events, sends every WebSocket a close frame (1001, "server shutting
 * down"), waits up to a second for the closing handshakes, closes every socket with
 * MHD_upgrade_action() and joins the I/O thread. Later reservations fail with TH_ESHUTDOWN and
 * sockets handed over later are closed at once. Idempotent; NULL is a no-op. Call before
 * MHD_stop_daemon(). */
void th__ws_hub_stop(th__ws_hub *hub);

/* Frees the hub, after th__ws_hub_stop() and after libmicrohttpd stopped. NULL is a no-op. */
void th__ws_hub_destroy(th__ws_hub *hub);

/* Takes one of the max-connections slots for an upgrade about to be answered. Returns 0,
 * TH_EOVERLOAD when every slot is taken, or TH_ESHUTDOWN. Thread-safe. */
TH_MUST_CHECK int th__ws_hub_reserve(th__ws_hub *hub);

/* Gives back a reserved slot whose upgrade did not happen. Thread-safe. */
void th__ws_hub_release(th__ws_hub *hub);

/* Hands an upgraded socket over to the I/O thread, which owns it from then on (the reserved slot
 * goes with it). key is the caller's identity (copied); extra_in the bytes the client sent
 * after its request (copied). Never blocks; on any failure the socket is closed through urh
 * and the slot released. Called on the libmicrohttpd thread that upgraded the connection. */
void th__ws_hub_adopt(th__ws_hub *hub, const th_key *key, const char *extra_in,
                      size_t extra_in_size, MHD_socket sock, struct MHD_UpgradeResponseHandle *urh);

/* Topic policy. Returns NULL when key may subscribe to topic, else why not (for the client):
 * admin keys may have every topic; investigator keys trial:<their trial>, alerts, tasks and
 * system; site keys trial:<their trial> and alerts; patient keys none. */
const char *th__ws_topic_refusal(const th_key *key, const char *topic);

/* Whether a connection with key sees ev (its topic aside): admin keys see everything; other
 * keys only events of their trial or of no trial, and site keys only of their site or none. */
bool th__ws_event_visible(const th_key *key, const th_event *ev);

#endif
