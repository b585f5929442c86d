/* Webhooks: the body, its signature, the address check against server-side request forgery,
 * and one POST with libcurl. Retries are the queue's business (the delivery is a task). */
#include "trial/notify_int.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <jansson.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "trialhub/clock.h"
#include "trialhub/events.h"

void th__notify_sign(const char *secret, long long t, const char *body, size_t body_len, char *out,
                     size_t len)
{
    char prefix[32];
    int plen = snprintf(prefix, sizeof(prefix), "%lld.", t);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    /* HMAC over prefix || body without copying the body. */
    EVP_MAC *m = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *c = m ? EVP_MAC_CTX_new(m) : NULL;
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0),
                           OSSL_PARAM_construct_end()};
    size_t outl = 0;
    if (c && EVP_MAC_init(c, (const unsigned char *)secret, strlen(secret), params) == 1 &&
        EVP_MAC_update(c, (const unsigned char *)prefix, (size_t)plen) == 1 &&
        EVP_MAC_update(c, (const unsigned char *)body, body_len) == 1 &&
        EVP_MAC_final(c, mac, &outl, sizeof(mac)) == 1) {
        mac_len = (unsigned)outl;
    }
    EVP_MAC_CTX_free(c);
    EVP_MAC_free(m);
    int n = snprintf(out, len, "t=%lld,v1=", t);
    for (unsigned i = 0; i < mac_len && n > 0 && (size_t)n + 2 < len; i++) {
        n += snprintf(out + n, len - (size_t)n, "%02x", mac[i]);
    }
}

/* Whether addr is loopback, private, link-local, unspecified, multicast or otherwise not a
 * public unicast address. */
static bool private_address(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET) {
        uint32_t a = ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr);
        return (a >> 24) == 127 || (a >> 24) == 10 || (a >> 24) == 0 ||
               (a >> 20) == (172 << 4 | 1) || (a >> 16) == (192u << 8 | 168) ||
               (a >> 16) == (169u << 8 | 254) || (a >> 22) == (100u << 2 | 1) || (a >> 28) >= 14;
    }
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a) || IN6_IS_ADDR_UNSPECIFIED(a) || IN6_IS_ADDR_LINKLOCAL(a) ||
               IN6_IS_ADDR_SITELOCAL(a) || IN6_IS_ADDR_MULTICAST(a) || IN6_IS_ADDR_V4MAPPED(a) ||
               (a->s6_addr[0] & 0xfe) == 0xfc; /* unique local fc00::/7 */
    }
    return true;
}

/* Resolves url's host, refuses private addresses unless allowed, and builds the CURLOPT_RESOLVE
 * entry that pins the checked address ("host:port:addr") into pin. */
static bool check_url(const char *url, bool allow_private, char *pin, size_t pinlen, char *reason,
                      size_t len)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL;
    bool ok = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
              curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
              curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
              curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK;
    if (!ok || (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0)) {
        snprintf(reason, len, "the callback URL is not an http(s) URL");
        ok = false;
    }
    if (ok) {
        /* IPv6 literals come back in brackets. */
        char name[256];
        size_t hl = strlen(host);
        if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
            snprintf(name, sizeof(name), "%.*s", (int)(hl - 2), host + 1);
        } else {
            snprintf(name, sizeof(name), "%s", host);
        }
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
        if (getaddrinfo(name, port, &hints, &res) != 0 || res == NULL) {
            snprintf(reason, len, "the callback host does not resolve");
            ok = false;
        } else {
            for (struct addrinfo *ai = res; ok && ai; ai = ai->ai_next) {
                if (!allow_private && private_address(ai->ai_addr)) {
                    snprintf(reason, len,
                             "the callback host resolves to a loopback or private address");
                    ok = false;
                }
            }
            char addr[INET6_ADDRSTRLEN] = "";
            if (ok && res->ai_family == AF_INET) {
                inet_ntop(AF_INET, &((struct sockaddr_in *)res->ai_addr)->sin_addr, addr,
                          sizeof(addr));
            } else if (ok) {
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)res->ai_addr)->sin6_addr, addr,
                          sizeof(addr));
            }
            snprintf(pin, pinlen, "%s:%s:%s%s%s", host, port, res->ai_family == AF_INET6 ? "[" : "",
                     addr, res->ai_family == AF_INET6 ? "]" : "");
            freeaddrinfo(res);
        }
    }
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return ok;
}

static size_t discard(char *data, size_t size, size_t nmemb, void *arg)
{
    (void)data;
    (void)arg;
    return size * nmemb;
}

static int progress_cb(void *arg, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d)
{
    (void)a;
    (void)b;
    (void)c;
    (void)d;
    return th_ctx_done(arg); /* abort when the worker stops */
}

int th__notify_deliver(th_ctx *ctx, th_queue *queue, th_store *store, const th_task *t,
                       bool allow_private, unsigned timeout_ms, char *reason, size_t len,
                       bool *retryable)
{
    *retryable = true;
    json_t *p = json_loads(t->payload ? t->payload : "{}", 0, NULL);
    const char *task_id = json_string_value(json_object_get(p, "task"));
    const char *trial = json_string_value(json_object_get(p, "trial"));
    const char *url = json_string_value(json_object_get(p, "url"));
    if (task_id == NULL || trial == NULL || url == NULL) {
        json_decref(p);
        snprintf(reason, len, "malformed webhook task");
        *retryable = false;
        return TH_EINVAL;
    }
    th_task a;
    int rc = th_queue_get(ctx, queue, task_id, &a);
    if (rc != 0) {
        json_decref(p);
        snprintf(reason, len, "the analysis cannot be read: %s", th_errname(rc));
        *retryable = rc != TH_ENOTFOUND;
        return rc;
    }
    json_t *ap = json_loads(a.payload ? a.payload : "{}", 0, NULL);
    char updated[40];
    th_events_format_time((uint64_t)a.updated_ms * TH_NS_PER_MS, updated, sizeof(updated));
    json_t *body =
        json_pack("{s:s,s:s,s:s,s:O?,s:i,s:s}", "id", a.id, "state", th_task_state_name(a.state),
                  "trial", trial, "subject", json_object_get(ap, "subject"), "attempts", a.attempts,
                  "updated_at", updated);
    if (body && a.result) {
        json_object_set_new(body, "result", json_loads(a.result, 0, NULL));
    } else if (body && a.last_error) {
        json_object_set_new(body, "error", json_string(a.last_error));
    }
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    json_decref(ap);
    th_task_free(&a);
    char secret[128];
    char pin[512];
    rc = 0;
    if (text == NULL) {
        snprintf(reason, len, "out of memory");
        rc = TH_ENOMEM;
    } else if (th_store_webhook_secret_get(store, trial, secret, sizeof(secret)) != 0) {
        snprintf(reason, len,
                 "the trial has no webhook secret (POST /v1/trials/{id}/webhook-secret)");
        rc = TH_ENOTFOUND;
    } else if (!check_url(url, allow_private, pin, sizeof(pin), reason, len)) {
        *retryable = false;
        rc = TH_EPERM;
    }
    if (rc == 0) {
        char signature[160], header[200];
        th__notify_sign(secret, (long long)(th_clock_wall_ns() / TH_NS_PER_S), text, strlen(text),
                        signature, sizeof(signature));
        snprintf(header, sizeof(header), "X-Trialhub-Signature: %s", signature);
        char event[64], delivery[64];
        snprintf(event, sizeof(event), "X-Trialhub-Event: task.%s",
                 json_string_value(json_object_get(p, "state")));
        snprintf(delivery, sizeof(delivery), "X-Trialhub-Delivery: %s", t->id);
        struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
        h = h ? curl_slist_append(h, header) : NULL;
        h = h ? curl_slist_append(h, event) : NULL;
        h = h ? curl_slist_append(h, delivery) : NULL;
        struct curl_slist *resolve = curl_slist_append(NULL, pin);
        CURL *e = curl_easy_init();
        if (e == NULL || h == NULL || resolve == NULL) {
            snprintf(reason, len, "out of memory");
            rc = TH_ENOMEM;
        } else {
            curl_easy_setopt(e, CURLOPT_URL, url);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, text);
            curl_easy_setopt(e, CURLOPT_HTTPHEADER, h);
            curl_easy_setopt(e, CURLOPT_RESOLVE, resolve);
            curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
            curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
            curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
            curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
            curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
            curl_easy_setopt(e, CURLOPT_USERAGENT, "trialhub-webhook/1");
            curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, progress_cb);
            curl_easy_setopt(e, CURLOPT_XFERINFODATA, ctx);
            curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
            CURLcode cr = curl_easy_perform(e);
            long status = 0;
            curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
            if (cr != CURLE_OK) {
                snprintf(reason, len, "delivery failed: %s", curl_easy_strerror(cr));
                rc = TH_EIO;
            } else if (status < 200 || status > 299) {
                snprintf(reason, len, "the receiver answered HTTP %ld", status);
                *retryable = status == 408 || status == 429 || status >= 500;
                rc = TH_EIO;
            }
        }
        curl_easy_cleanup(e);
        curl_slist_free_all(h);
        curl_slist_free_all(resolve);
    }
    memset(secret, 0, sizeof(secret));
    free(text);
    json_decref(p);
    return rc;
}
