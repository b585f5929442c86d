/* The live-events routes. POST /v1/events/ticket gives a key's holder a single-use ticket for
 * GET /v1/events?ticket=..., because browsers cannot set headers on a WebSocket. GET /v1/events
 * checks the key or the ticket and the RFC 6455 handshake, answers 101 and hands the socket to
 * the hub (websocket.c), or answers 401/400/426/503 through the normal response path.
 *
 * Tickets live in memory only, bounded, for a short time: like keys they are stored as their
 * SHA-256, so the table never holds a usable ticket, and they are never logged (the request log
 * names the route template, never the query). Locking: the ticket store's `mu` protects its
 * buckets, its expiry list and its count; nothing else is taken while it is held. */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include "http/api.h"
#include "http/ws_int.h"
#include "trialhub/alloc.h"
#include "trialhub/auth.h"
#include "trialhub/clock.h"

/* ---- tickets ----------------------------------------------------------------------------- */

#define TICKET_PREFIX     "tkt_"
#define TICKET_SECRET_LEN 32       /* bytes of entropy */
#define TICKET_TEXT_LEN   (4 + 43) /* prefix + base64url of 32 bytes, no padding */
#define TICKET_BUCKETS    1024     /* power of two */

typedef struct ticket_rec {
    struct ticket_rec *chain;         /* next in its bucket */
    struct ticket_rec *older, *newer; /* issue order = expiry order (one lifetime for all) */
    unsigned char hash[TH_KEY_HASH_LEN];
    uint64_t expires_ns;
    th_key key; /* whose identity and scope the ticket carries */
} ticket_rec;

typedef struct th__ws_tickets {
    pthread_mutex_t mu;
    ticket_rec *buckets[TICKET_BUCKETS]; /* under mu */
    ticket_rec *oldest, *newest;         /* under mu */
    size_t count;                        /* under mu */
    size_t max;
    uint64_t ttl_ns;
} th__ws_tickets;

static size_t bucket_of(const unsigned char *hash)
{
    return ((size_t)hash[0] << 8 | hash[1]) & (TICKET_BUCKETS - 1);
}

/* Removes t from its bucket and from the expiry list; the caller frees it. Under mu. */
static void ticket_unlink(th__ws_tickets *ts, ticket_rec *t)
{
    ticket_rec **link = &ts->buckets[bucket_of(t->hash)];
    while (*link != t) {
        link = &(*link)->chain;
    }
    *link = t->chain;
    if (t->older) {
        t->older->newer = t->newer;
    } else {
        ts->oldest = t->newer;
    }
    if (t->newer) {
        t->newer->older = t->older;
    } else {
        ts->newest = t->older;
    }
    ts->count--;
}

static void ticket_free(ticket_rec *t)
{
    OPENSSL_cleanse(t, sizeof(*t));
    th_free(t);
}

/* Under mu. */
static void purge_expired(th__ws_tickets *ts, uint64_t now)
{
    while (ts->oldest && ts->oldest->expires_ns <= now) {
        ticket_rec *t = ts->oldest;
        ticket_unlink(ts, t);
        ticket_free(t);
    }
}

static int tickets_create(size_t max, unsigned ttl_s, th__ws_tickets **out)
{
    th__ws_tickets *ts = th_calloc(1, sizeof(*ts));
    if (ts == NULL) {
        return TH_ENOMEM;
    }
    pthread_mutex_init(&ts->mu, NULL);
    ts->max = max;
    ts->ttl_ns = (uint64_t)ttl_s * TH_NS_PER_S;
    *out = ts;
    return 0;
}

static void tickets_destroy(th__ws_tickets *ts)
{
    if (ts == NULL) {
        return;
    }
    while (ts->oldest) {
        ticket_rec *t = ts->oldest;
        ticket_unlink(ts, t);
        ticket_free(t);
    }
    pthread_mutex_destroy(&ts->mu);
    th_free(ts);
}

static void base64url(const unsigned char *in, size_t len, char *out)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    unsigned bits = 0, nbits = 0;
    for (size_t i = 0; i < len; i++) {
        bits = (bits << 8) | in[i];
        nbits += 8;
        while (nbits >= 6) {
            *out++ = alphabet[(bits >> (nbits - 6)) & 63];
            nbits -= 6;
        }
    }
    if (nbits > 0) {
        *out++ = alphabet[(bits << (6 - nbits)) & 63];
    }
    *out = '\0';
}

/* Issues a ticket for key into text. Returns 0, TH_EOVERLOAD when max tickets are outstanding,
 * TH_ESYS (no randomness) or TH_ENOMEM. Thread-safe. */
static int tickets_issue(th__ws_tickets *ts, const th_key *key, char text[TICKET_TEXT_LEN + 1])
{
    unsigned char secret[TICKET_SECRET_LEN];
    if (getrandom(secret, sizeof(secret), 0) != (ssize_t)sizeof(secret)) {
        return TH_ESYS;
    }
    memcpy(text, TICKET_PREFIX, 4);
    base64url(secret, sizeof(secret), text + 4);
    OPENSSL_cleanse(secret, sizeof(secret));
    ticket_rec *t = th_calloc(1, sizeof(*t));
    if (t == NULL) {
        return TH_ENOMEM;
    }
    th_key_hash(text, TICKET_TEXT_LEN, t->hash);
    t->key = *key;
    uint64_t now = th_clock_now_ns();
    t->expires_ns = now + ts->ttl_ns;
    pthread_mutex_lock(&ts->mu);
    purge_expired(ts, now);
    if (ts->count >= ts->max) {
        pthread_mutex_unlock(&ts->mu);
        ticket_free(t);
        return TH_EOVERLOAD;
    }
    size_t b = bucket_of(t->hash);
    t->chain = ts->buckets[b];
    ts->buckets[b] = t;
    t->older = ts->newest;
    if (ts->newest) {
        ts->newest->newer = t;
    } else {
        ts->oldest = t;
    }
    ts->newest = t;
    ts->count++;
    pthread_mutex_unlock(&ts->mu);
    return 0;
}

/* Redeems a ticket: on success copies the identity it carries into *key and forgets the ticket.
 * Returns 0, or TH_EPERM for an unknown, used or expired one. Thread-safe. */
static int tickets_redeem(th__ws_tickets *ts, const char *text, th_key *key)
{
    size_t len = strlen(text);
    if (len != TICKET_TEXT_LEN || strncmp(text, TICKET_PREFIX, 4) != 0) {
        return TH_EPERM;
    }
    unsigned char hash[TH_KEY_HASH_LEN];
    th_key_hash(text, len, hash);
    pthread_mutex_lock(&ts->mu);
    purge_expired(ts, th_clock_now_ns());
    ticket_rec *t = ts->buckets[bucket_of(hash)];
    while (t && CRYPTO_memcmp(t->hash, hash, sizeof(hash)) != 0) {
        t = t->chain;
    }
    if (t) {
        ticket_unlink(ts, t);
    }
    pthread_mutex_unlock(&ts->mu);
    if (t == NULL) {
        return TH_EPERM;
    }
    *key = t->key;
    ticket_free(t);
    return 0;
}

/* ---- POST /v1/events/ticket -------------------------------------------------------------- */

static void ticket_post(th_req *req)
{
    th_api *api = th__api_of(req);
    char text[TICKET_TEXT_LEN + 1];
    int rc = tickets_issue(api->tickets, &req->key, text);
    if (rc != 0) {
        th__resp_error(req, 503,
                       rc == TH_EOVERLOAD ? "too many tickets outstanding; retry shortly"
                                          : "cannot issue a ticket now");
        return;
    }
    th_buf b;
    th_buf_init(&b, 0);
    th_buf_printf(&b, "{\"ticket\":\"%s\",\"expires_in_s\":%llu}", text,
                  (unsigned long long)(api->tickets->ttl_ns / TH_NS_PER_S));
    OPENSSL_cleanse(text, sizeof(text));
    th__resp_buf(req, 201, "application/json", &b);
}

/* ---- GET /v1/events ---------------------------------------------------------------------- */

/* Whether the comma-separated header value list holds token (case-insensitive). */
static bool has_token(const char *list, const char *token)
{
    size_t tlen = strlen(token);
    for (const char *p = list; p && *p;) {
        while (*p == ' ' || *p == '\t' || *p == ',') {
            p++;
        }
        size_t n = strcspn(p, ",");
        size_t end = n;
        while (end > 0 && (p[end - 1] == ' ' || p[end - 1] == '\t')) {
            end--;
        }
        if (end == tlen && strncasecmp(p, token, tlen) == 0) {
            return true;
        }
        p += n;
    }
    return false;
}

static bool key_valid(const char *key)
{
    /* base64 of 16 bytes: 22 characters of the alphabet, then "==". */
    if (key == NULL || strlen(key) != 24 || strcmp(key + 22, "==") != 0) {
        return false;
    }
    for (int i = 0; i < 22; i++) {
        char ch = key[i];
        if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
              ch == '+' || ch == '/')) {
            return false;
        }
    }
    return true;
}

/* The first subprotocol the client offers (an RFC 9110 token), or "" when it offers none.
 * Returns false for a malformed offer. */
static bool first_protocol(const char *offer, char out[64])
{
    out[0] = '\0';
    if (offer == NULL) {
        return true;
    }
    while (*offer == ' ' || *offer == '\t') {
        offer++;
    }
    size_t n = 0;
    for (; offer[n] && offer[n] != ',' && offer[n] != ' ' && offer[n] != '\t'; n++) {
        char ch = offer[n];
        if (ch <= 32 || ch >= 127 || strchr("\"(),/:;<=>?@[\\]{}", ch) || n == 63) {
            return false;
        }
    }
    memcpy(out, offer, n);
    out[n] = '\0';
    return n > 0;
}

/* Checks the RFC 6455 handshake and computes Sec-WebSocket-Accept. On failure sets the answer
 * (400 or 426) and returns false. */
static bool handshake(th_req *req, char accept[32], char protocol[64])
{
    const char *upgrade = th__req_header(req, MHD_HTTP_HEADER_UPGRADE);
    const char *connection = th__req_header(req, MHD_HTTP_HEADER_CONNECTION);
    const char *version = th__req_header(req, "Sec-WebSocket-Version");
    const char *key = th__req_header(req, "Sec-WebSocket-Key");
    if (!has_token(upgrade, "websocket")) {
        (void)th__resp_header(req, MHD_HTTP_HEADER_UPGRADE, "websocket");
        th__resp_error(req, 426, "this endpoint speaks WebSocket only (Upgrade: websocket)");
        return false;
    }
    if (!has_token(connection, "upgrade")) {
        th__resp_error(req, 400, "a WebSocket handshake needs Connection: Upgrade");
        return false;
    }
    if (version == NULL || strcmp(version, "13") != 0) {
        (void)th__resp_header(req, MHD_HTTP_HEADER_UPGRADE, "websocket");
        (void)th__resp_header(req, "Sec-WebSocket-Version", "13");
        th__resp_error(req, 426, "only WebSocket version 13 (RFC 6455) is spoken here");
        return false;
    }
    if (!key_valid(key)) {
        th__resp_error(req, 400, "Sec-WebSocket-Key is missing or malformed");
        return false;
    }
    if (!first_protocol(th__req_header(req, "Sec-WebSocket-Protocol"), protocol)) {
        th__resp_error(req, 400, "Sec-WebSocket-Protocol is malformed");
        return false;
    }
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    char joined[24 + sizeof(guid)];
    memcpy(joined, key, 24);
    memcpy(joined + 24, guid, sizeof(guid));
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((const unsigned char *)joined, 24 + sizeof(guid) - 1, digest);
    EVP_EncodeBlock((unsigned char *)accept, digest, SHA_DIGEST_LENGTH); /* 28 characters */
    return true;
}

/* What an upgrade under way holds until libmicrohttpd hands the socket over. */
typedef struct upgrade_state {
    th__ws_hub *hub;
    bool adopted;
} upgrade_state;

static void upgrade_state_free(void *arg)
{
    upgrade_state *st = arg;
    if (!st->adopted) {
        th__ws_hub_release(st->hub); /* the client went away before the 101 was sent */
    }
    th_free(st);
}

static void on_upgraded(th_req *req, const char *extra_in, size_t extra_in_size, MHD_socket sock,
                        struct MHD_UpgradeResponseHandle *urh)
{
    upgrade_state *st = req->state;
    st->adopted = true;
    th__ws_hub_adopt(st->hub, &req->key, extra_in, extra_in_size, sock, urh);
}

static void events_get(th_req *req)
{
    th_api *api = th__api_of(req);
    const char *ticket = req->authed ? NULL : th__req_query(req, "ticket");
    if (!req->authed && (ticket == NULL || ticket[0] == '\0')) {
        th__resp_error(req, 401,
                       "a valid API key (Authorization: Bearer <key>) or a ticket (?ticket=, "
                       "from POST /v1/events/ticket) is required");
        return;
    }
    char accept[32], protocol[64];
    if (!handshake(req, accept, protocol)) {
        return;
    }
    int rc = th__ws_hub_reserve(api->ws);
    if (rc != 0) {
        th__resp_error(req, 503,
                       rc == TH_EOVERLOAD ? "too many live-event connections; retry later"
                                          : "shutting down");
        return;
    }
    /* Redeemed only now, so that a refused handshake or a full server does not use it up. */
    if (ticket && tickets_redeem(api->tickets, ticket, &req->key) != 0) {
        th__ws_hub_release(api->ws);
        th__resp_error(req, 401, "the ticket is unknown, used or expired");
        return;
    }
    req->authed = true;
    upgrade_state *st = th_calloc(1, sizeof(*st));
    if (st == NULL) {
        th__ws_hub_release(api->ws);
        th__resp_error(req, 503, "out of memory");
        return;
    }
    st->hub = api->ws;
    req->state = st;
    req->state_free = upgrade_state_free;
    (void)th__resp_header(req, MHD_HTTP_HEADER_UPGRADE, "websocket");
    (void)th__resp_header(req, "Sec-WebSocket-Accept", accept);
    if (protocol[0]) {
        (void)th__resp_header(req, "Sec-WebSocket-Protocol", protocol);
    }
    th__req_upgrade(req, on_upgraded);
}

/* ---- the area ---------------------------------------------------------------------------- */

int th__events_api_create(th_api *api)
{
    const th_server_config *cfg = api->cfg;
    int rc = tickets_create(
        cfg->ws_max_tickets ? cfg->ws_max_tickets : TH_WS_DEFAULT_MAX_TICKETS,
        cfg->ws_ticket_ttl_s ? cfg->ws_ticket_ttl_s : TH_WS_DEFAULT_TICKET_TTL_S, &api->tickets);
    if (rc == 0) {
        rc = th__ws_hub_create(cfg, &api->ws);
    }
    return rc; /* on error th__api_destroy() frees what was made */
}

void th__events_api_stop(th_api *api)
{
    th__ws_hub_stop(api->ws);
}

void th__events_api_destroy(th_api *api)
{
    th__ws_hub_destroy(api->ws);
    api->ws = NULL;
    tickets_destroy(api->tickets);
    api->tickets = NULL;
}

const th_route th__events_routes[] = {
    {.method = "GET", .pattern = "/v1/events", .handler = events_get, .auth = TH_AUTH_OPTIONAL},
    {.method = "POST", .pattern = "/v1/events/ticket", .handler = ticket_post, .auth = TH_AUTH_ANY},
};
const size_t th__events_nroutes = sizeof(th__events_routes) / sizeof(th__events_routes[0]);
