/* Response helpers and the one mapping from trialhub errors to HTTP status codes. Error bodies
 * are RFC 9457 problem documents on the native API and FHIR OperationOutcome on /fhir. */
#include <string.h>

#include "http/http_int.h"
#include "trialhub/alloc.h"

unsigned th__status_for(int err)
{
    switch (err) {
    case TH_OK:
        return 200;
    case TH_EINVAL:
    case TH_EPARSE:
        return 400;
    case TH_EPERM:
        return 403;
    case TH_ENOTFOUND:
        return 404;
    case TH_EEXIST:
    case TH_ECONFLICT:
        return 409;
    case TH_ETOOBIG:
        return 413;
    case TH_EUNSUPPORTED:
        return 415;
    case TH_ETIMEDOUT:
        return 504;
    case TH_EOVERLOAD:
    case TH_ENOMEM:
    case TH_ESHUTDOWN:
    case TH_EAGAIN:
        return 503;
    default:
        return 500;
    }
}

static const char *reason(unsigned status)
{
    switch (status) {
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 409:
        return "Conflict";
    case 413:
        return "Content Too Large";
    case 415:
        return "Unsupported Media Type";
    case 422:
        return "Unprocessable Content";
    case 426:
        return "Upgrade Required";
    case 429:
        return "Too Many Requests";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return status >= 500 ? "Internal Server Error" : "Error";
    }
}

/* FHIR issue type for an HTTP status. */
static const char *fhir_code(unsigned status)
{
    switch (status) {
    case 400:
        return "structure";
    case 401:
        return "login";
    case 403:
        return "forbidden";
    case 404:
        return "not-found";
    case 405:
        return "not-supported";
    case 409:
        return "duplicate";
    case 413:
        return "too-costly";
    case 415:
        return "not-supported";
    case 422:
        return "invalid";
    case 429:
    case 503:
        return "transient";
    case 504:
        return "timeout";
    default:
        return "exception";
    }
}

void th__resp_buf(th_req *req, unsigned status, const char *content_type, th_buf *body)
{
    size_t len = 0;
    char *data = th_buf_take(body, &len);
    if (data == NULL) {
        th__resp_static(req, 503, "application/problem+json",
                        "{\"type\":\"about:blank\",\"title\":\"Service Unavailable\","
                        "\"status\":503,\"detail\":\"out of memory\"}");
        req->resp.retry_after_s = 1;
        return;
    }
    if (req->resp.body && !req->resp.body_static) {
        th_free(req->resp.body);
    }
    req->resp.status = status;
    req->resp.content_type = content_type;
    req->resp.body = data;
    req->resp.body_len = len;
    req->resp.body_static = false;
}

void th__resp_static(th_req *req, unsigned status, const char *content_type, const char *body)
{
    if (req->resp.body && !req->resp.body_static) {
        th_free(req->resp.body);
    }
    req->resp.status = status;
    req->resp.content_type = content_type;
    req->resp.body = (char *)body;
    req->resp.body_len = strlen(body);
    req->resp.body_static = true;
}

void th__resp_error(th_req *req, unsigned status, const char *detail)
{
    th_buf b;
    th_buf_init(&b, 0);
    if (req->fhir) {
        th_buf_puts(&b, "{\"resourceType\":\"OperationOutcome\",\"issue\":[{\"severity\":\"");
        th_buf_puts(&b, status >= 500 ? "fatal" : "error");
        th_buf_puts(&b, "\",\"code\":\"");
        th_buf_puts(&b, fhir_code(status));
        th_buf_puts(&b, "\",\"diagnostics\":");
        th_buf_json_str(&b, detail);
        th_buf_puts(&b, "}]}");
        th__resp_buf(req, status, "application/fhir+json", &b);
    } else {
        th_buf_printf(&b, "{\"type\":\"about:blank\",\"title\":\"%s\",\"status\":%u,\"detail\":",
                      reason(status), status);
        th_buf_json_str(&b, detail);
        th_buf_puts(&b, ",\"request_id\":");
        th_buf_json_str(&b, req->req_id);
        th_buf_puts(&b, "}");
        th__resp_buf(req, status, "application/problem+json", &b);
    }
    if (status == 503 || status == 429) {
        req->resp.retry_after_s = 1;
    }
}
