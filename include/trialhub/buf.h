/* Growable byte buffer for building responses, log lines and metrics text. A value the caller
 * embeds: th_buf_init() / th_buf_free(). After an allocation failure the buffer is marked
 * failed, later appends do nothing, and th_buf_failed() says so: callers check once at the
 * end instead of after every append. Not thread-safe (one owner). */
#ifndef TRIALHUB_BUF_H
#define TRIALHUB_BUF_H

#include <stdbool.h>
#include <stddef.h>

#include "trialhub/error.h"

typedef struct th_buf {
    char *data; /* NUL-terminated while not failed */
    size_t len;
    size_t cap;
    size_t limit; /* most bytes it may hold; 0: no limit */
    bool failed;
    bool external; /* data is the caller's storage (th_buf_init_with), not to be freed */
} th_buf;

void th_buf_init(th_buf *buf, size_t limit);
/* Starts in the caller's storage (a stack array of cap bytes) and moves to the heap only if it
 * outgrows it; th_buf_free() then frees only what it allocated. */
void th_buf_init_with(th_buf *buf, char *storage, size_t cap, size_t limit);
void th_buf_free(th_buf *buf);
void th_buf_reset(th_buf *buf);

void th_buf_append(th_buf *buf, const void *data, size_t len);
void th_buf_puts(th_buf *buf, const char *str);
void th_buf_printf(th_buf *buf, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends str as a JSON string literal, quotes included. */
void th_buf_json_str(th_buf *buf, const char *str);

bool th_buf_failed(const th_buf *buf);

/* Hands the data over to the caller (free with th_free()), leaving buf empty. Returns NULL if
 * the buffer failed. */
char *th_buf_take(th_buf *buf, size_t *len);

#endif
