/* Structured logs: one JSON object per line on stderr, written with a single write(2) so lines
 * from different threads never interleave. Privacy rule: never log a patient's answers, names
 * or any free text from a resource; log ids, codes, counts and durations. */
#ifndef TRIALHUB_LOG_H
#define TRIALHUB_LOG_H

#include <stddef.h>

typedef enum th_log_level {
    TH_LOG_DEBUG = 0,
    TH_LOG_INFO,
    TH_LOG_WARN,
    TH_LOG_ERROR,
} th_log_level;

typedef enum th_log_type { TH_LOG_T_STR, TH_LOG_T_INT, TH_LOG_T_DBL } th_log_type;

typedef struct th_log_field {
    const char *key;
    th_log_type type;
    const char *str;
    long long num;
    double dbl;
} th_log_field;

#define TH_LOG_STR(k, v) ((th_log_field){.key = (k), .type = TH_LOG_T_STR, .str = (v)})
#define TH_LOG_INT(k, v) ((th_log_field){.key = (k), .type = TH_LOG_T_INT, .num = (long long)(v)})
#define TH_LOG_DBL(k, v) ((th_log_field){.key = (k), .type = TH_LOG_T_DBL, .dbl = (double)(v)})

/* Sets the lowest level written (default TH_LOG_INFO) and the descriptor (default 2). Call
 * before starting threads. */
void th_log_configure(th_log_level min_level, int fd);

/* Parses "debug", "info", "warn", "error"; returns TH_LOG_INFO for anything else. */
th_log_level th_log_level_parse(const char *name);

/* Writes {"ts":...,"level":...,"msg":msg, fields...}. NULL string fields are written as null.
 * Thread-safe; never fails the caller (a line that cannot be built is dropped). */
void th_log(th_log_level level, const char *msg, size_t nfields, const th_log_field *fields);

#define TH_LOG(level, msg, ...)                                                          \
    th_log((level), (msg), sizeof((th_log_field[]){__VA_ARGS__}) / sizeof(th_log_field), \
           (th_log_field[]){__VA_ARGS__})

#endif
