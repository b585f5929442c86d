/* JSON-lines logger on a file descriptor; each line goes out in one write(2). */
#include "trialhub/log.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "trialhub/buf.h"

static _Atomic int log_min = TH_LOG_INFO;
static _Atomic int log_fd = 2;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void th_log_configure(th_log_level min_level, int fd)
{
    atomic_store(&log_min, (int)min_level);
    atomic_store(&log_fd, fd);
}

th_log_level th_log_level_parse(const char *name)
{
    for (int i = 0; name && i < 4; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            return (th_log_level)i;
        }
    }
    return TH_LOG_INFO;
}

void th_log(th_log_level level, const char *msg, size_t nfields, const th_log_field *fields)
{
    if ((int)level < atomic_load(&log_min)) {
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[40];
    size_t n = strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(stamp + n, sizeof(stamp) - n, ".%03ldZ", ts.tv_nsec / 1000000);

    /* Most lines fit the stack buffer; th_buf moves to the heap only past it. */
    char stack[1024];
    th_buf buf;
    th_buf_init_with(&buf, stack, sizeof(stack), 64 * 1024);
    th_buf_printf(&buf, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":", stamp, level_names[level]);
    th_buf_json_str(&buf, msg);
    for (size_t i = 0; i < nfields; i++) {
        th_buf_puts(&buf, ",");
        th_buf_json_str(&buf, fields[i].key);
        th_buf_puts(&buf, ":");
        switch (fields[i].type) {
        case TH_LOG_T_STR:
            if (fields[i].str) {
                th_buf_json_str(&buf, fields[i].str);
            } else {
                th_buf_puts(&buf, "null");
            }
            break;
        case TH_LOG_T_INT:
            th_buf_printf(&buf, "%lld", fields[i].num);
            break;
        case TH_LOG_T_DBL:
            if (isfinite(fields[i].dbl)) {
                th_buf_printf(&buf, "%.3f", fields[i].dbl);
            } else {
                th_buf_puts(&buf, "null");
            }
            break;
        }
    }
    th_buf_puts(&buf, "}\n");
    if (!th_buf_failed(&buf)) {
        ssize_t w = write(atomic_load(&log_fd), buf.data, buf.len);
        (void)w;
    }
    th_buf_free(&buf);
}
