/* Growable byte buffer with sticky failure. */
#include "trialhub/buf.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "trialhub/alloc.h"

void th_buf_init(th_buf *buf, size_t limit)
{
    memset(buf, 0, sizeof(*buf));
    buf->limit = limit;
}

void th_buf_init_with(th_buf *buf, char *storage, size_t cap, size_t limit)
{
    memset(buf, 0, sizeof(*buf));
    buf->data = storage;
    buf->cap = cap;
    buf->limit = limit;
    buf->external = true;
    if (cap > 0) {
        storage[0] = '\0';
    }
}

void th_buf_free(th_buf *buf)
{
    if (!buf->external) {
        th_free(buf->data);
    }
    memset(buf, 0, sizeof(*buf));
}

void th_buf_reset(th_buf *buf)
{
    buf->len = 0;
    buf->failed = false;
    if (buf->data) {
        buf->data[0] = '\0';
    }
}

static bool reserve(th_buf *buf, size_t extra)
{
    if (buf->failed) {
        return false;
    }
    if (extra > SIZE_MAX - buf->len - 1 || (buf->limit && buf->len + extra > buf->limit)) {
        buf->failed = true;
        return false;
    }
    size_t need = buf->len + extra + 1;
    if (need <= buf->cap) {
        return true;
    }
    size_t cap = buf->cap ? buf->cap : 256;
    while (cap < need) {
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    }
    char *data;
    if (buf->external) {
        data = th_malloc(cap);
        if (data != NULL && buf->len) {
            memcpy(data, buf->data, buf->len);
        }
    } else {
        data = th_realloc_array(buf->data, cap, 1);
    }
    if (data == NULL) {
        buf->failed = true;
        return false;
    }
    buf->data = data;
    buf->cap = cap;
    buf->external = false;
    return true;
}

void th_buf_append(th_buf *buf, const void *data, size_t len)
{
    if (!reserve(buf, len)) {
        return;
    }
    if (len) {
        memcpy(buf->data + buf->len, data, len);
    }
    buf->len += len;
    buf->data[buf->len] = '\0';
}

void th_buf_puts(th_buf *buf, const char *str)
{
    th_buf_append(buf, str, strlen(str));
}

void th_buf_printf(th_buf *buf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !reserve(buf, (size_t)n)) {
        if (n < 0) {
            buf->failed = true;
        }
        va_end(ap2);
        return;
    }
    vsnprintf(buf->data + buf->len, (size_t)n + 1, fmt, ap2);
    va_end(ap2);
    buf->len += (size_t)n;
}

void th_buf_json_str(th_buf *buf, const char *str)
{
    static const char hex[] = "0123456789abcdef";
    th_buf_append(buf, "\"", 1);
    const unsigned char *p = (const unsigned char *)str;
    const unsigned char *run = p;
    for (; *p; p++) {
        if (*p >= 0x20 && *p != '"' && *p != '\\') {
            continue;
        }
        th_buf_append(buf, run, (size_t)(p - run));
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t n = 2;
        switch (*p) {
        case '"':
            esc[1] = '"';
            break;
        case '\\':
            esc[1] = '\\';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[*p >> 4];
            esc[5] = hex[*p & 15];
            n = 6;
        }
        th_buf_append(buf, esc, n);
        run = p + 1;
    }
    th_buf_append(buf, run, (size_t)(p - run));
    th_buf_append(buf, "\"", 1);
}

bool th_buf_failed(const th_buf *buf)
{
    return buf->failed;
}

char *th_buf_take(th_buf *buf, size_t *len)
{
    if (buf->failed) {
        th_buf_free(buf);
        return NULL;
    }
    if (buf->external) {
        /* The caller's storage cannot be handed over: move the bytes to the heap. */
        char *copy = th_malloc(buf->len + 1);
        if (copy == NULL) {
            th_buf_free(buf);
            return NULL;
        }
        memcpy(copy, buf->data, buf->len + 1);
        buf->data = copy;
        buf->cap = buf->len + 1;
        buf->external = false;
    }
    if (!reserve(buf, 0)) {
        return NULL;
    }
    char *data = buf->data;
    if (len) {
        *len = buf->len;
    }
    size_t limit = buf->limit;
    memset(buf, 0, sizeof(*buf));
    buf->limit = limit;
    return data;
}
