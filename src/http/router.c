/* A small router: routes are (method, pattern) pairs whose patterns have literal segments and
 * `{name}` parameters; matching is segment by segment, first match wins. */
#include <string.h>

#include "http/http_int.h"

/* Matches pattern against path (both starting with '/'); on success points params at the
 * parameter segments, which are NUL-terminated in place in path (a private copy). */
static bool match_pattern(const char *pattern, char *path, const char **params, unsigned *nparams)
{
    unsigned n = 0;
    const char *p = pattern;
    char *s = path;
    while (*p && *s) {
        if (*p != '/' || *s != '/') {
            return false;
        }
        p++;
        s++;
        const char *pend = strchr(p, '/');
        size_t plen = pend ? (size_t)(pend - p) : strlen(p);
        char *send = strchr(s, '/');
        size_t slen = send ? (size_t)(send - s) : strlen(s);
        if (plen >= 2 && p[0] == '{' && p[plen - 1] == '}') {
            if (slen == 0 || n == TH_ROUTE_MAX_PARAMS) {
                return false;
            }
            params[n++] = s;
        } else if (plen != slen || memcmp(p, s, plen) != 0) {
            return false;
        }
        p += plen;
        s += slen;
    }
    if (*p || *s) {
        return false;
    }
    /* Terminate the parameters now that the whole path matched. */
    for (unsigned i = 0; i < n; i++) {
        char *end = strchr(params[i], '/');
        if (end) {
            *end = '\0';
        }
    }
    *nparams = n;
    return true;
}

const th_route *th__route_match(const th_route *routes, size_t nroutes, const char *method,
                                const char *path, char *path_buf, size_t path_buf_len,
                                const char **params, unsigned *nparams, const char **allow)
{
    *allow = NULL;
    size_t len = strlen(path);
    if (len == 0 || len >= path_buf_len || path[0] != '/') {
        return NULL;
    }
    /* Drop one trailing slash ("/fhir/metadata/" is "/fhir/metadata"), not the root. */
    if (len > 1 && path[len - 1] == '/') {
        len--;
    }
    static __thread char allow_buf[64];
    allow_buf[0] = '\0';
    for (size_t i = 0; i < nroutes; i++) {
        memcpy(path_buf, path, len);
        path_buf[len] = '\0';
        unsigned n = 0;
        if (!match_pattern(routes[i].pattern, path_buf, params, &n)) {
            continue;
        }
        if (strcmp(routes[i].method, method) == 0 ||
            (strcmp(method, "HEAD") == 0 && strcmp(routes[i].method, "GET") == 0)) {
            *nparams = n;
            return &routes[i];
        }
        if (strstr(allow_buf, routes[i].method) == NULL &&
            strlen(allow_buf) + strlen(routes[i].method) + 3 < sizeof(allow_buf)) {
            if (allow_buf[0]) {
                strcat(allow_buf, ", ");
            }
            strcat(allow_buf, routes[i].method);
        }
    }
    *allow = allow_buf[0] ? allow_buf : NULL;
    return NULL;
}
