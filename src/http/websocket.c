/* The WebSocket hub behind GET /v1/events: one I/O thread owns every upgraded socket (epoll),
 * frames them with wslay, fans live events out to the connections subscribed to their topic and
 * allowed to see them, sends system.stats while anyone listens, keeps connections alive with
 * pings, and closes a connection that cannot keep up instead of waiting for it.
 *
 * Ownership: a ws_conn is allocated on the libmicrohttpd thread that upgraded the connection and
 * handed to the I/O thread through `adopt` (a bounded th_chan); from then on only the I/O thread
 * touches it, its wslay context and its socket. Events come in through `inbox` (a bounded th_chan
 * of th_event references) from the publishers' threads, which only try-send and never wait: a
 * full inbox drops the event and counts it. Both channels wake the I/O thread through one
 * eventfd. The hub takes no lock of its own (the channels lock inside); `reserved`, `open`,
 * `stopping` and `wake_pending` are atomics shared with the HTTP and publisher threads.
 * Design notes: docs/internals/events.md. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <wslay/wslay.h>

#include "core/core_int.h"
#include "http/ws_int.h"
#include "trialhub/alloc.h"
#include "trialhub/buf.h"
#include "trialhub/chan.h"
#include "trialhub/clock.h"
#include "trialhub/log.h"

#define INBOX_CAPACITY 8192                /* events waiting for the I/O thread */
#define INBOX_BATCH    1024                /* events delivered per loop turn before flushing */
#define RECV_BUDGET    (64 * 1024)         /* bytes read from one socket per loop turn */
#define SNDBUF_BYTES   (64 * 1024)         /* kernel send buffer per socket (Linux doubles it) */
#define CLOSE_TIMEOUT  (5 * TH_NS_PER_S)   /* for the peer's half of a closing handshake */
#define SHUTDOWN_GRACE (1 * TH_NS_PER_S)   /* for every closing handshake at shutdown */
#define TOPIC_MAX      (TH_ID_MAX + 16)    /* as th_event.topic */
#define EVENTFD_TAG    ((void *)&eventfd_) /* epoll data of the eventfd */

static const char eventfd_ = 0;

typedef struct ws_conn {
    struct ws_conn *prev, *next;
    th__ws_hub *hub;
    int fd;
    struct MHD_UpgradeResponseHandle *urh;
    wslay_event_context_ptr ws;
    th_key key;
    char *extra_in; /* bytes libmicrohttpd read past the request: wslay reads them first */
    size_t extra_len, extra_off;
    uint64_t opened_ns;
    uint64_t last_rx_ns;        /* any byte from the peer counts as alive */
    uint64_t close_deadline_ns; /* 0 while open */
    uint32_t epoll_mask;        /* interest registered with epoll */
    size_t recv_budget;
    const char *reason; /* why it ends (metric label), set once; NULL while open */
    bool in_recv;       /* inside wslay_event_recv(): no wslay_event_send() from callbacks */
    bool eof;
    bool dead; /* close the socket at the next check, without more ado */
    bool system;
    unsigned ntopics;
    char topics[TH_WS_MAX_TOPICS][TOPIC_MAX];
} ws_conn;

struct th__ws_hub {
    /* settings, fixed at creation */
    unsigned max_conns;
    unsigned queue_max;
    size_t queue_max_bytes;
    uint64_t ping_ns;
    uint64_t stats_ns;
    th_events *events;
    th_pool *pool;
    th_writer *writer;
    th_metric *m_closed;
    th_metric *m_dropped;
    /* shared */
    int efd;
    int epfd;
    th_chan *inbox;       /* th_event *, one reference each */
    th_chan *adopt;       /* ws_conn *, new connections */
    atomic_uint reserved; /* slots taken: adopted connections and upgrades under way */
    atomic_uint open;     /* connections the I/O thread holds */
    atomic_bool wake_pending;
    atomic_bool stopping;
    bool subscribed;
    bool started;
    bool stopped;
    pthread_t thread;
    /* I/O thread only */
    ws_conn *conns;
    unsigned nsystem; /* connections subscribed to system */
    uint64_t next_ping_ns;
    uint64_t next_stats_ns;
};

static void count_closed(th__ws_hub *hub, const char *reason)
{
    if (hub->m_closed) {
        const char *labels[] = {reason};
        th_metric_add(hub->m_closed, labels, 1);
    }
}

/* ---- topic policy ------------------------------------------------------------------------ */

static bool id_valid(const char *id)
{
    size_t n = 0;
    for (; id[n]; n++) {
        char ch = id[n];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              ch == '-' || ch == '_' || ch == '.')) {
            return false;
        }
    }
    return n > 0 && n <= TH_ID_MAX;
}

const char *th__ws_topic_refusal(const th_key *key, const char *topic)
{
    static const char *const not_allowed = "not allowed for this key";
    bool trial_topic = strncmp(topic, "trial:", 6) == 0;
    if (trial_topic ? !id_valid(topic + 6)
                    : strcmp(topic, "alerts") != 0 && strcmp(topic, "tasks") != 0 &&
                          strcmp(topic, "system") != 0) {
        return "unknown topic";
    }
    switch (key->role) {
    case TH_ROLE_ADMIN:
        return NULL;
    case TH_ROLE_INVESTIGATOR:
        return trial_topic && strcmp(topic + 6, key->trial_id) != 0 ? not_allowed : NULL;
    case TH_ROLE_SITE:
        if (trial_topic) {
            return strcmp(topic + 6, key->trial_id) != 0 ? not_allowed : NULL;
        }
        return strcmp(topic, "alerts") == 0 ? NULL : not_allowed;
    default:
        return not_allowed;
    }
}

bool th__ws_event_visible(const th_key *key, const th_event *ev)
{
    switch (key->role) {
    case TH_ROLE_ADMIN:
        return true;
    case TH_ROLE_INVESTIGATOR:
        return ev->trial_id[0] == '\0' || strcmp(ev->trial_id, key->trial_id) == 0;
    case TH_ROLE_SITE:
        return (ev->trial_id[0] == '\0' || strcmp(ev->trial_id, key->trial_id) == 0) &&
               (ev->site_id[0] == '\0' || strcmp(ev->site_id, key->site_id) == 0);
    default:
        return false;
    }
}

static bool conn_has_topic(const ws_conn *c, const char *topic)
{
    for (unsigned i = 0; i < c->ntopics; i++) {
        if (strcmp(c->topics[i], topic) == 0) {
            return true;
        }
    }
    return false;
}

/* ---- wslay glue ---------------------------------------------------------------------------- */

static ssize_t ws_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
                       void *user_data)
{
    (void)flags;
    ws_conn *c = user_data;
    if (c->extra_off < c->extra_len) {
        size_t n = c->extra_len - c->extra_off < len ? c->extra_len - c->extra_off : len;
        memcpy(buf, c->extra_in + c->extra_off, n);
        c->extra_off += n;
        c->last_rx_ns = th_clock_now_ns();
        return (ssize_t)n;
    }
    if (c->recv_budget == 0) {
        /* Level-triggered epoll calls again: the other connections get their turn first. */
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    ssize_t n;
    do {
        n = recv(c->fd, buf, len < c->recv_budget ? len : c->recv_budget, 0);
    } while (n < 0 && errno == EINTR);
    if (n > 0) {
        c->recv_budget -= (size_t)n;
        c->last_rx_ns = th_clock_now_ns();
        return n;
    }
    if (n == 0) {
        c->eof = true;
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
    } else {
        wslay_event_set_error(ctx, errno == EAGAIN || errno == EWOULDBLOCK
                                       ? WSLAY_ERR_WOULDBLOCK
                                       : WSLAY_ERR_CALLBACK_FAILURE);
    }
    return -1;
}

static ssize_t ws_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *user_data)
{
    (void)flags; /* no MSG_MORE: a send that then blocks would leave its bytes corked */
    ws_conn *c = user_data;
    ssize_t n;
    do {
        n = send(c->fd, data, len, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        wslay_event_set_error(ctx, errno == EAGAIN || errno == EWOULDBLOCK
                                       ? WSLAY_ERR_WOULDBLOCK
                                       : WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return n;
}

/* Starts closing: a close frame (code 0: none) behind whatever frame is being written, nothing
 * more queued after it, and a deadline for the peer's answer. The first reason counts. */
static void conn_fail(ws_conn *c, const char *reason, uint16_t code, const char *text)
{
    if (c->reason == NULL) {
        c->reason = reason;
        count_closed(c->hub, reason);
    }
    if (code != 0 && !wslay_event_get_close_sent(c->ws)) {
        (void)wslay_event_queue_close(c->ws, code, (const uint8_t *)text, strlen(text));
    }
    if (c->close_deadline_ns == 0) {
        c->close_deadline_ns = th_clock_after_ns(CLOSE_TIMEOUT);
    }
}

static bool conn_room(ws_conn *c, size_t len)
{
    th__ws_hub *hub = c->hub;
    return wslay_event_get_queued_msg_count(c->ws) < hub->queue_max &&
           wslay_event_get_queued_msg_length(c->ws) + len <= hub->queue_max_bytes;
}

/* Queues one text message within the connection's bounds. Over them, first tries to hand what
 * is queued to the kernel (not from inside a wslay callback); if that does not make room the
 * client is too slow: it gets a close frame and nothing more. */
static void conn_queue_text(ws_conn *c, const char *data, size_t len)
{
    if (c->reason != NULL || c->dead) {
        return;
    }
    if (!conn_room(c, len) && !c->in_recv && wslay_event_send(c->ws) != 0) {
        c->dead = true;
        return;
    }
    if (!conn_room(c, len)) {
        conn_fail(c, "slow", WSLAY_CODE_POLICY_VIOLATION, "send queue overflow");
        return;
    }
    struct wslay_event_msg msg = {WSLAY_TEXT_FRAME, (const uint8_t *)data, len};
    if (wslay_event_queue_msg(c->ws, &msg) != 0) {
        conn_fail(c, "error", WSLAY_CODE_INTERNAL_SERVER_ERROR, "out of memory");
    }
}

static void conn_queue_buf(ws_conn *c, th_buf *b)
{
    if (th_buf_failed(b)) {
        conn_fail(c, "error", WSLAY_CODE_INTERNAL_SERVER_ERROR, "out of memory");
    } else {
        conn_queue_text(c, b->data, b->len);
    }
    th_buf_free(b);
}

static void reply_error(ws_conn *c, const char *topic, const char *reason)
{
    char stack[256];
    th_buf b;
    th_buf_init_with(&b, stack, sizeof(stack), 0);
    th_buf_puts(&b, "{\"error\":{");
    if (topic) {
        th_buf_puts(&b, "\"topic\":");
        th_buf_json_str(&b, topic);
        th_buf_puts(&b, ",");
    }
    th_buf_puts(&b, "\"reason\":");
    th_buf_json_str(&b, reason);
    th_buf_puts(&b, "}}");
    conn_queue_buf(c, &b);
}

static void topic_remove(ws_conn *c, const char *topic)
{
    for (unsigned i = 0; i < c->ntopics; i++) {
        if (strcmp(c->topics[i], topic) == 0) {
            if (strcmp(topic, "system") == 0) {
                c->system = false;
                c->hub->nsystem--;
            }
            c->ntopics--;
            if (i != c->ntopics) {
                memcpy(c->topics[i], c->topics[c->ntopics], TOPIC_MAX);
            }
            return;
        }
    }
}

/* Adds an allowed topic. Returns false when the connection already holds TH_WS_MAX_TOPICS. */
static bool topic_add(ws_conn *c, const char *topic)
{
    if (conn_has_topic(c, topic)) {
        return true;
    }
    if (c->ntopics == TH_WS_MAX_TOPICS) {
        return false;
    }
    snprintf(c->topics[c->ntopics++], TOPIC_MAX, "%s", topic);
    if (strcmp(topic, "system") == 0) {
        c->system = true;
        if (c->hub->nsystem++ == 0) {
            c->hub->next_stats_ns = th_clock_now_ns(); /* the first listener gets one at once */
        }
    }
    return true;
}

/* Checks that member is an array of at most TH_WS_MAX_TOPICS strings. */
static const char *topics_problem(json_t *member)
{
    if (!json_is_array(member)) {
        return "subscribe and unsubscribe take an array of topic strings";
    }
    size_t i;
    json_t *item;
    json_array_foreach(member, i, item)
    {
        if (!json_is_string(item)) {
            return "subscribe and unsubscribe take an array of topic strings";
        }
    }
    return NULL;
}

/* A client message: {"subscribe":[topics]} and/or {"unsubscribe":[topics]}. Answers one error
 * frame per refused topic, then {"subscribed":[...]} (and {"unsubscribed":[...]}): always one
 * per message that had the member, so a client can wait for it. */
static void handle_text(ws_conn *c, const uint8_t *data, size_t len)
{
    json_error_t jerr;
    json_t *root = json_loadb((const char *)data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL || !json_is_object(root)) {
        reply_error(c, NULL, "malformed message: want {\"subscribe\":[\"topic\",...]}");
        json_decref(root);
        return;
    }
    json_t *sub = json_object_get(root, "subscribe");
    json_t *unsub = json_object_get(root, "unsubscribe");
    const char *problem = NULL;
    if ((sub == NULL && unsub == NULL) ||
        json_object_size(root) != (size_t)(sub != NULL) + (size_t)(unsub != NULL)) {
        problem = "malformed message: the members are subscribe and unsubscribe";
    } else if ((sub && (problem = topics_problem(sub)) != NULL) ||
               (unsub && (problem = topics_problem(unsub)) != NULL)) {
        /* problem set */
    }
    if (problem) {
        reply_error(c, NULL, problem);
        json_decref(root);
        return;
    }
    if ((sub && json_array_size(sub) > TH_WS_MAX_TOPICS) ||
        (unsub && json_array_size(unsub) > TH_WS_MAX_TOPICS)) {
        conn_fail(c, "policy", WSLAY_CODE_POLICY_VIOLATION, "too many topics");
        json_decref(root);
        return;
    }
    size_t i;
    json_t *item;
    if (unsub) {
        th_buf b;
        th_buf_init(&b, 0);
        th_buf_puts(&b, "{\"unsubscribed\":[");
        json_array_foreach(unsub, i, item)
        {
            topic_remove(c, json_string_value(item));
            th_buf_puts(&b, i ? "," : "");
            th_buf_json_str(&b, json_string_value(item));
        }
        th_buf_puts(&b, "]}");
        conn_queue_buf(c, &b);
    }
    if (sub) {
        th_buf b;
        th_buf_init(&b, 0);
        th_buf_puts(&b, "{\"subscribed\":[");
        bool first = true;
        json_array_foreach(sub, i, item)
        {
            const char *topic = json_string_value(item);
            const char *refusal =
                strlen(topic) >= TOPIC_MAX ? "unknown topic" : th__ws_topic_refusal(&c->key, topic);
            if (refusal) {
                reply_error(c, topic, refusal);
                continue;
            }
            if (!topic_add(c, topic)) {
                conn_fail(c, "policy", WSLAY_CODE_POLICY_VIOLATION, "too many topics");
                break;
            }
            th_buf_puts(&b, first ? "" : ",");
            th_buf_json_str(&b, topic);
            first = false;
        }
        th_buf_puts(&b, "]}");
        conn_queue_buf(c, &b);
    }
    json_decref(root);
}

static void ws_on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                      void *user_data)
{
    (void)ctx;
    ws_conn *c = user_data;
    if (c->reason != NULL) {
        return; /* closing: only the peer's close frame matters now */
    }
    if (arg->opcode == WSLAY_TEXT_FRAME) {
        handle_text(c, arg->msg, arg->msg_length);
    } else if (arg->opcode == WSLAY_BINARY_FRAME) {
        conn_fail(c, "policy", WSLAY_CODE_UNSUPPORTED_DATA, "binary frames are not accepted");
    }
    /* A peer that sends (pings, subscriptions) faster than it reads our answers. */
    if (c->reason == NULL && wslay_event_get_queued_msg_count(c->ws) > 2 * c->hub->queue_max) {
        conn_fail(c, "slow", WSLAY_CODE_POLICY_VIOLATION, "send queue overflow");
    }
}

/* ---- connections (I/O thread) ------------------------------------------------------------ */

static void conn_free(th__ws_hub *hub, ws_conn *c)
{
    if (c->ws) {
        wslay_event_context_free(c->ws);
    }
    th_free(c->extra_in);
    th_free(c);
    atomic_fetch_sub(&hub->reserved, 1);
}

/* Closes the socket (through libmicrohttpd, which owns the descriptor) and frees everything. */
static void conn_finish(th__ws_hub *hub, ws_conn *c)
{
    epoll_ctl(hub->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->reason == NULL) {
        c->reason = c->eof || wslay_event_get_close_received(c->ws) ? "client" : "error";
        count_closed(hub, c->reason);
    }
    if (strcmp(c->reason, "slow") == 0 || strcmp(c->reason, "timeout") == 0 ||
        strcmp(c->reason, "policy") == 0) {
        TH_LOG(TH_LOG_INFO, "websocket closed", TH_LOG_STR("key_id", c->key.id),
               TH_LOG_STR("reason", c->reason),
               TH_LOG_INT("code", wslay_event_get_status_code_sent(c->ws)),
               TH_LOG_DBL("open_s", (double)(th_clock_now_ns() - c->opened_ns) / 1e9));
    }
    MHD_upgrade_action(c->urh, MHD_UPGRADE_ACTION_CLOSE);
    if (c->prev) {
        c->prev->next = c->next;
    } else {
        hub->conns = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    if (c->system) {
        hub->nsystem--;
    }
    atomic_fetch_sub(&hub->open, 1);
    conn_free(hub, c);
}

/* After anything happened to c: writes what wslay has queued, updates the epoll interest, and
 * finishes the connection when both directions are done. Returns true if c was freed. */
static bool conn_settle(th__ws_hub *hub, ws_conn *c)
{
    if (!c->dead && wslay_event_want_write(c->ws) && wslay_event_send(c->ws) != 0) {
        c->dead = true;
    }
    bool want_read = wslay_event_want_read(c->ws), want_write = wslay_event_want_write(c->ws);
    if (c->dead || (!want_read && !want_write)) {
        conn_finish(hub, c);
        return true;
    }
    if (c->close_deadline_ns == 0 && wslay_event_get_close_received(c->ws)) {
        c->close_deadline_ns = th_clock_after_ns(CLOSE_TIMEOUT); /* our answer may not get out */
    }
    uint32_t mask = (want_read ? EPOLLIN : 0) | (want_write ? EPOLLOUT : 0);
    if (mask != c->epoll_mask) {
        struct epoll_event ev = {.events = mask, .data.ptr = c};
        if (epoll_ctl(hub->epfd, EPOLL_CTL_MOD, c->fd, &ev) != 0) {
            conn_finish(hub, c);
            return true;
        }
        c->epoll_mask = mask;
    }
    return false;
}

static void conn_read(ws_conn *c)
{
    c->recv_budget = RECV_BUDGET;
    c->in_recv = true;
    int rc = wslay_event_recv(c->ws);
    c->in_recv = false;
    if (rc != 0) {
        c->dead = true;
    }
}

static void conn_io(th__ws_hub *hub, ws_conn *c, uint32_t events)
{
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        if (wslay_event_want_read(c->ws)) {
            conn_read(c);
        } else if (events & (EPOLLHUP | EPOLLERR)) {
            c->dead = true;
        }
    }
    conn_settle(hub, c);
}

static void conn_adopt(th__ws_hub *hub, ws_conn *c)
{
    static const struct wslay_event_callbacks callbacks = {
        .recv_callback = ws_recv,
        .send_callback = ws_send,
        .on_msg_recv_callback = ws_on_msg,
    };
    int flags = fcntl(c->fd, F_GETFL);
    int one = 1;
    if (flags < 0 || fcntl(c->fd, F_SETFL, flags | O_NONBLOCK) != 0 ||
        wslay_event_context_server_init(&c->ws, &callbacks, c) != 0) {
        count_closed(hub, "error");
        MHD_upgrade_action(c->urh, MHD_UPGRADE_ACTION_CLOSE);
        conn_free(hub, c);
        return;
    }
    /* libmicrohttpd leaves Nagle on after the 101; events are small and should go at once. A
     * fixed kernel send buffer keeps TCP autotuning from hiding megabytes behind a client that
     * stopped reading: what waits for a client is bounded by this plus the send queue. */
    int sndbuf = SNDBUF_BYTES;
    (void)setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    (void)setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    wslay_event_config_set_max_recv_msg_length(c->ws, TH_WS_MAX_MESSAGE);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(hub->epfd, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        count_closed(hub, "error");
        MHD_upgrade_action(c->urh, MHD_UPGRADE_ACTION_CLOSE);
        conn_free(hub, c);
        return;
    }
    c->epoll_mask = EPOLLIN;
    c->opened_ns = c->last_rx_ns = th_clock_now_ns();
    c->next = hub->conns;
    if (hub->conns) {
        hub->conns->prev = c;
    } else {
        hub->next_ping_ns = th_clock_after_ns(hub->ping_ns);
    }
    hub->conns = c;
    atomic_fetch_add(&hub->open, 1);
    if (c->extra_len > 0) {
        conn_read(c);
    }
    conn_settle(hub, c);
}

/* ---- the I/O thread ---------------------------------------------------------------------- */

static void wake(th__ws_hub *hub)
{
    if (!atomic_exchange(&hub->wake_pending, true)) {
        uint64_t one = 1;
        ssize_t n = write(hub->efd, &one, sizeof(one));
        (void)n; /* only fails when the counter is saturated, which still wakes the thread */
    }
}

static void sink(void *arg, th_event *ev)
{
    th__ws_hub *hub = arg;
    if (th_chan_try_send(hub->inbox, ev) != 0) {
        th_event_unref(ev);
        if (hub->m_dropped) {
            th_metric_add(hub->m_dropped, NULL, 1);
        }
        return;
    }
    wake(hub);
}

static void deliver(th__ws_hub *hub, th_event *ev)
{
    for (ws_conn *c = hub->conns; c; c = c->next) {
        if (c->reason == NULL && conn_has_topic(c, ev->topic) &&
            th__ws_event_visible(&c->key, ev)) {
            conn_queue_text(c, ev->json, ev->len);
        }
    }
}

static void send_stats(th__ws_hub *hub)
{
    char at[40], stack[512];
    th_events_format_time(th_clock_wall_ns(), at, sizeof(at));
    th_buf b;
    th_buf_init_with(&b, stack, sizeof(stack), 0);
    th_buf_printf(&b, "{\"topic\":\"system\",\"type\":\"system.stats\",\"at\":\"%s\"", at);
    if (hub->pool) {
        th_pool_stats ps;
        th_pool_get_stats(hub->pool, &ps);
        th_buf_printf(&b, ",\"pool\":{\"threads\":%u,\"busy\":%u,\"queued\":%zu,\"rejected\":%llu}",
                      ps.nthreads, ps.busy, ps.queued, (unsigned long long)ps.rejected);
    }
    if (hub->writer) {
        th_writer_stats ws;
        th_writer_get_stats(hub->writer, &ws);
        th_buf_printf(&b, ",\"writer\":{\"queued\":%zu,\"batches\":%llu,\"commit_ms\":%.3f}",
                      ws.queued, (unsigned long long)ws.batches,
                      (double)ws.last_commit_ns / (double)TH_NS_PER_MS);
    }
    th_buf_printf(&b, ",\"ws\":{\"connections\":%u}}", atomic_load(&hub->open));
    if (!th_buf_failed(&b)) {
        for (ws_conn *c = hub->conns; c; c = c->next) {
            if (c->system) {
                conn_queue_text(c, b.data, b.len);
            }
        }
    }
    th_buf_free(&b);
}

/* Pings, system.stats and deadlines, whichever is due. */
static void housekeeping(th__ws_hub *hub, uint64_t now)
{
    if (hub->conns && now >= hub->next_ping_ns) {
        for (ws_conn *c = hub->conns; c; c = c->next) {
            if (c->reason != NULL || c->dead) {
                continue;
            }
            if (now - c->last_rx_ns > 2 * hub->ping_ns) {
                /* Silent for two intervals: one try at a close frame, then the socket goes. */
                conn_fail(c, "timeout", WSLAY_CODE_GOING_AWAY, "ping timeout");
                (void)wslay_event_send(c->ws);
                c->dead = true;
                continue;
            }
            struct wslay_event_msg ping = {WSLAY_PING, NULL, 0};
            if (wslay_event_queue_msg(c->ws, &ping) != 0) {
                c->dead = true;
            }
        }
        hub->next_ping_ns = now + hub->ping_ns;
    }
    if (hub->nsystem > 0 && now >= hub->next_stats_ns) {
        send_stats(hub);
        hub->next_stats_ns = now + hub->stats_ns;
    }
    for (ws_conn *c = hub->conns; c; c = c->next) {
        if (c->close_deadline_ns != 0 && now >= c->close_deadline_ns) {
            c->dead = true;
        }
    }
}

static void settle_all(th__ws_hub *hub)
{
    for (ws_conn *c = hub->conns, *next; c; c = next) {
        next = c->next;
        conn_settle(hub, c);
    }
}

/* Milliseconds until the next timed work, -1 for none. */
static int next_timeout_ms(th__ws_hub *hub, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    if (hub->conns) {
        next = hub->next_ping_ns;
    }
    if (hub->nsystem > 0 && hub->next_stats_ns < next) {
        next = hub->next_stats_ns;
    }
    for (ws_conn *c = hub->conns; c; c = c->next) {
        if (c->close_deadline_ns != 0 && c->close_deadline_ns < next) {
            next = c->close_deadline_ns;
        }
    }
    if (next == UINT64_MAX) {
        return -1;
    }
    if (next <= now) {
        return 0;
    }
    uint64_t ms = (next - now + TH_NS_PER_MS - 1) / TH_NS_PER_MS;
    return ms > 60000 ? 60000 : (int)ms;
}

/* Runs one epoll round (at most timeout_ms) and the I/O it reports. */
static void poll_once(th__ws_hub *hub, int timeout_ms)
{
    struct epoll_event evs[64];
    int n = epoll_wait(hub->epfd, evs, 64, timeout_ms);
    for (int i = 0; i < n; i++) {
        if (evs[i].data.ptr == EVENTFD_TAG) {
            uint64_t count;
            ssize_t r = read(hub->efd, &count, sizeof(count));
            (void)r;
            /* Cleared before the channels are drained: a later send wakes us again. */
            atomic_store(&hub->wake_pending, false);
        } else {
            conn_io(hub, evs[i].data.ptr, evs[i].events);
        }
    }
}

/* Takes new connections and queued events. Returns true if events are left for another turn. */
static bool drain(th__ws_hub *hub)
{
    void *item;
    while (th_chan_try_recv(hub->adopt, &item) == 0) {
        conn_adopt(hub, item);
    }
    for (int i = 0; i < INBOX_BATCH; i++) {
        if (th_chan_try_recv(hub->inbox, &item) != 0) {
            return false;
        }
        deliver(hub, item);
        th_event_unref(item);
    }
    return true;
}

static void shutdown_all(th__ws_hub *hub)
{
    void *item;
    th_chan_close(hub->adopt);
    while (th_chan_try_recv(hub->adopt, &item) == 0) {
        conn_adopt(hub, item);
    }
    for (ws_conn *c = hub->conns; c; c = c->next) {
        conn_fail(c, "shutdown", WSLAY_CODE_GOING_AWAY, "server shutting down");
    }
    uint64_t deadline = th_clock_after_ns(SHUTDOWN_GRACE);
    settle_all(hub);
    for (uint64_t now = th_clock_now_ns(); hub->conns && now < deadline; now = th_clock_now_ns()) {
        uint64_t ms = (deadline - now + TH_NS_PER_MS - 1) / TH_NS_PER_MS;
        poll_once(hub, (int)ms);
    }
    while (hub->conns) {
        hub->conns->dead = true;
        conn_finish(hub, hub->conns);
    }
    while (th_chan_try_recv(hub->inbox, &item) == 0) {
        th_event_unref(item);
    }
}

static void *io_main(void *arg)
{
    th__ws_hub *hub = arg;
    bool more = false;
    while (!atomic_load(&hub->stopping)) {
        uint64_t now = th_clock_now_ns();
        poll_once(hub, more ? 0 : next_timeout_ms(hub, now));
        if (atomic_load(&hub->stopping)) {
            break;
        }
        more = drain(hub);
        housekeeping(hub, th_clock_now_ns());
        settle_all(hub);
    }
    shutdown_all(hub);
    return NULL;
}

/* ---- life cycle -------------------------------------------------------------------------- */

static void collect_open(void *arg, th_metric *family, th_buf *out)
{
    th__ws_hub *hub = arg;
    th_metrics_sample(out, family, NULL, NULL, (double)atomic_load(&hub->open));
}

static int register_metrics(th__ws_hub *hub, th_metrics *metrics)
{
    static const char *const reason[] = {"reason"};
    int rc = th_metrics_collector(metrics, "trialhub_ws_connections",
                                  "Open WebSocket connections (GET /v1/events).", "gauge",
                                  collect_open, hub);
    if (rc == 0) {
        rc = th_metrics_counter(metrics, "trialhub_ws_closed_total",
                                "WebSocket connections closed, by reason: client, slow (send "
                                "queue overflow), timeout (no pong), policy, error, shutdown.",
                                1, reason, &hub->m_closed);
    }
    if (rc == 0) {
        rc = th_metrics_counter(metrics, "trialhub_ws_events_dropped_total",
                                "Live events dropped because the WebSocket hub's inbox was full.",
                                0, NULL, &hub->m_dropped);
    }
    return rc;
}

int th__ws_hub_create(const th_server_config *cfg, th__ws_hub **out)
{
    th__ws_hub *hub = th_calloc(1, sizeof(*hub));
    if (hub == NULL) {
        return TH_ENOMEM;
    }
    hub->max_conns =
        cfg->ws_max_connections ? cfg->ws_max_connections : TH_WS_DEFAULT_MAX_CONNECTIONS;
    hub->queue_max = cfg->ws_send_queue ? cfg->ws_send_queue : TH_WS_DEFAULT_SEND_QUEUE;
    hub->queue_max_bytes =
        cfg->ws_send_queue_bytes ? cfg->ws_send_queue_bytes : TH_WS_DEFAULT_SEND_QUEUE_B;
    hub->ping_ns =
        (uint64_t)(cfg->ws_ping_interval_ms ? cfg->ws_ping_interval_ms : TH_WS_DEFAULT_PING_MS) *
        TH_NS_PER_MS;
    hub->stats_ns =
        (uint64_t)(cfg->ws_stats_interval_ms ? cfg->ws_stats_interval_ms : TH_WS_DEFAULT_STATS_MS) *
        TH_NS_PER_MS;
    hub->events = cfg->events;
    hub->pool = cfg->pool;
    hub->writer = cfg->writer;
    hub->efd = hub->epfd = -1;
    hub->stopped = true; /* until the thread runs, stop has nothing to do */
    int rc = cfg->metrics ? register_metrics(hub, cfg->metrics) : 0;
    if (rc == 0) {
        rc = th_chan_create(INBOX_CAPACITY, &hub->inbox);
    }
    if (rc == 0) {
        rc = th_chan_create(hub->max_conns, &hub->adopt);
    }
    if (rc == 0) {
        hub->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        hub->epfd = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = EVENTFD_TAG};
        if (hub->efd < 0 || hub->epfd < 0 || epoll_ctl(hub->epfd, EPOLL_CTL_ADD, hub->efd, &ev)) {
            rc = TH_ESYS;
        }
    }
    if (rc == 0) {
        rc = th__thread_start(&hub->thread, "th-ws", io_main, hub);
    }
    if (rc == 0) {
        hub->started = true;
        hub->stopped = false;
        if (hub->events) {
            rc = th_events_subscribe(hub->events, sink, hub);
            hub->subscribed = rc == 0;
        }
    }
    if (rc != 0) {
        th__ws_hub_stop(hub);
        th__ws_hub_destroy(hub);
        return rc;
    }
    *out = hub;
    return 0;
}

void th__ws_hub_stop(th__ws_hub *hub)
{
    if (hub == NULL) {
        return;
    }
    if (hub->stopped) {
        atomic_store(&hub->stopping, true);
        return;
    }
    hub->stopped = true;
    if (hub->subscribed) {
        th_events_unsubscribe(hub->events, sink, hub); /* no sink call runs after this */
        hub->subscribed = false;
    }
    atomic_store(&hub->stopping, true);
    uint64_t one = 1;
    ssize_t n = write(hub->efd, &one, sizeof(one));
    (void)n;
    pthread_join(hub->thread, NULL);
}

void th__ws_hub_destroy(th__ws_hub *hub)
{
    if (hub == NULL) {
        return;
    }
    void *item;
    if (hub->adopt) {
        /* Handed over after the I/O thread ended (cannot happen once the channel is closed,
         * but a hub that never started has an open one). */
        while (th_chan_try_recv(hub->adopt, &item) == 0) {
            ws_conn *c = item;
            MHD_upgrade_action(c->urh, MHD_UPGRADE_ACTION_CLOSE);
            conn_free(hub, c);
        }
    }
    if (hub->inbox) {
        while (th_chan_try_recv(hub->inbox, &item) == 0) {
            th_event_unref(item);
        }
    }
    th_chan_destroy(hub->inbox);
    th_chan_destroy(hub->adopt);
    if (hub->efd >= 0) {
        close(hub->efd);
    }
    if (hub->epfd >= 0) {
        close(hub->epfd);
    }
    th_free(hub);
}

int th__ws_hub_reserve(th__ws_hub *hub)
{
    if (atomic_load(&hub->stopping)) {
        return TH_ESHUTDOWN;
    }
    if (atomic_fetch_add(&hub->reserved, 1) >= hub->max_conns) {
        atomic_fetch_sub(&hub->reserved, 1);
        return TH_EOVERLOAD;
    }
    return 0;
}

void th__ws_hub_release(th__ws_hub *hub)
{
    atomic_fetch_sub(&hub->reserved, 1);
}

void th__ws_hub_adopt(th__ws_hub *hub, const th_key *key, const char *extra_in,
                      size_t extra_in_size, MHD_socket sock, struct MHD_UpgradeResponseHandle *urh)
{
    ws_conn *c = th_calloc(1, sizeof(*c));
    if (c && extra_in_size > 0) {
        c->extra_in = th_malloc(extra_in_size);
        if (c->extra_in == NULL) {
            th_free(c);
            c = NULL;
        } else {
            memcpy(c->extra_in, extra_in, extra_in_size);
            c->extra_len = extra_in_size;
        }
    }
    if (c == NULL) {
        count_closed(hub, "error");
        MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
        th__ws_hub_release(hub);
        return;
    }
    c->hub = hub;
    c->fd = sock;
    c->urh = urh;
    c->key = *key;
    if (th_chan_try_send(hub->adopt, c) != 0) {
        /* The hub has stopped (the channel holds every reserved slot, so it is never full). */
        count_closed(hub, "shutdown");
        MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
        conn_free(hub, c);
        return;
    }
    wake(hub);
}
