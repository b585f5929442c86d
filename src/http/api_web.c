/* The dashboard page: web/index.html, app.js and style.css, embedded into the binary at build
 * time (cmake/th_embed_file.cmake) and served without a key, since the page holds no data: it
 * asks for a key and calls the API with it. A strict Content-Security-Policy allows scripts,
 * styles and connections to this origin only, so nothing injected into the page could run or
 * send the key anywhere else. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "http/api.h"

extern const unsigned char th__web_index_html[];
extern const size_t th__web_index_html_len;
extern const unsigned char th__web_app_js[];
extern const size_t th__web_app_js_len;
extern const unsigned char th__web_style_css[];
extern const size_t th__web_style_css_len;

typedef struct web_asset {
    const char *content_type;
    const unsigned char *data;
    const size_t *len;
    char etag[24]; /* "<16 hex digits>", set once by web_etags_init() */
} web_asset;

enum { WEB_INDEX, WEB_APP_JS, WEB_STYLE_CSS, WEB_NASSETS };

static web_asset web_assets[WEB_NASSETS] = {
    [WEB_INDEX] = {"text/html; charset=utf-8", th__web_index_html, &th__web_index_html_len, ""},
    [WEB_APP_JS] = {"text/javascript; charset=utf-8", th__web_app_js, &th__web_app_js_len, ""},
    [WEB_STYLE_CSS] = {"text/css; charset=utf-8", th__web_style_css, &th__web_style_css_len, ""},
};

/* connect-src 'self' also covers ws: to this host and port in browsers that follow CSP Level 3
 * (Chromium 111 and later, Firefox, Safari 15.4+); tests/browser checks the live WebSocket. */
static const char *const web_headers[] = {
    "Content-Security-Policy",
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options",
    "nosniff",
    "Referrer-Policy",
    "no-referrer",
    NULL,
};

static pthread_once_t web_etags_once = PTHREAD_ONCE_INIT;

/* The entity tags are FNV-1a 64 hashes of the bytes, computed once: the assets never change
 * while the binary runs. */
static void web_etags_init(void)
{
    for (size_t i = 0; i < WEB_NASSETS; i++) {
        uint64_t hash = 0xcbf29ce484222325u;
        for (size_t j = 0; j < *web_assets[i].len; j++) {
            hash = (hash ^ web_assets[i].data[j]) * 0x100000001b3u;
        }
        snprintf(web_assets[i].etag, sizeof(web_assets[i].etag), "\"%016llx\"",
                 (unsigned long long)hash);
    }
}

/* Whether an If-None-Match list ("a", W/"b", or *) names etag (weak comparison, RFC 9110). */
static bool etag_listed(const char *list, const char *etag)
{
    size_t etag_len = strlen(etag);
    const char *p = list;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',') {
            p++;
        }
        if (*p == '*') {
            return true;
        }
        if (p[0] == 'W' && p[1] == '/') {
            p += 2;
        }
        size_t len = strcspn(p, ",");
        while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t')) {
            len--;
        }
        if (len == etag_len && memcmp(p, etag, len) == 0) {
            return true;
        }
        p += strcspn(p, ",");
    }
    return false;
}

static void serve_asset(th_req *req, size_t which)
{
    pthread_once(&web_etags_once, web_etags_init);
    const web_asset *asset = &web_assets[which];
    snprintf(req->resp.etag, sizeof(req->resp.etag), "%s", asset->etag);
    req->resp.cache_control = "no-cache";
    req->resp.headers = web_headers;
    const char *if_none_match = th__req_header(req, "If-None-Match");
    if (if_none_match && etag_listed(if_none_match, asset->etag)) {
        th__resp_static(req, 304, NULL, "");
        return;
    }
    th__resp_static(req, 200, asset->content_type, (const char *)asset->data);
    req->resp.body_len = *asset->len;
}

static void web_index(th_req *req)
{
    serve_asset(req, WEB_INDEX);
}

static void web_app_js(th_req *req)
{
    serve_asset(req, WEB_APP_JS);
}

static void web_style_css(th_req *req)
{
    serve_asset(req, WEB_STYLE_CSS);
}

const th_route th__web_routes[] = {
    {.method = "GET", .pattern = "/", .handler = web_index},
    {.method = "GET", .pattern = "/app.js", .handler = web_app_js},
    {.method = "GET", .pattern = "/style.css", .handler = web_style_css},
};
const size_t th__web_nroutes = sizeof(th__web_routes) / sizeof(th__web_routes[0]);
