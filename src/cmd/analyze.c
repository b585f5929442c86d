/* `trialhub analyze`: the reference image analyzer that workers run as a child process. One JSON
 * request on stdin, one JSON result on stdout (protocol in usage() and docs/internals/dicom.md);
 * SIGTERM or SIGINT cancels the work through a context and the process exits at once. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmd/cmd.h"
#include "core/core_int.h"
#include "trialhub/buf.h"
#include "trialhub/dicom.h"
#include "trialhub/imgstats.h"

#define REQUEST_MAX   (64 * 1024)
#define TASK_ID_MAX   128
#define EXIT_REQUEST  2   /* bad request */
#define EXIT_IMAGE    3   /* unreadable or undecodable image */
#define EXIT_INTERNAL 1   /* out of memory, no thread */
#define EXIT_SIGNAL   128 /* + the signal number, as a shell reports a signal death */

static void usage(FILE *out)
{
    fputs("usage: trialhub analyze < request.json\n"
          "\n"
          "The reference analyzer, run by workers as a child process. Reads one JSON request\n"
          "on stdin:\n"
          "  {\"task\":\"<id>\",\"image\":\"<path of a DICOM file>\",\"modality\":\"CT\",\n"
          "   \"parameters\":{\"windows\":[{\"name\":\"lung\",\"min\":-1000,\"max\":-400}],"
          "\"bins\":64}}\n"
          "(modality and parameters optional; default windows: CT lung, soft and bone in HU,\n"
          "other modalities the stored value range in thirds; default bins 64) and writes one\n"
          "JSON result on stdout:\n"
          "  {\"task\":..,\"rows\":..,\"columns\":..,\"modality\":..,\"pixels\":N,\"min\":..,"
          "\"max\":..,\"mean\":..,\n"
          "   \"histogram\":{\"bins\":64,\"min\":..,\"max\":..,\"counts\":[..]},\n"
          "   \"windows\":[{\"name\":\"lung\",\"min\":..,\"max\":..,\"fraction\":0.123}]}\n"
          "Exit status: 0 done; 2 bad request and 3 unreadable image, both with {\"error\":..}\n"
          "on stdout; 1 internal error; 128+N after signal N (SIGTERM and SIGINT stop it at\n"
          "once). analyzers/ct_stats.py speaks the same protocol in Python.\n",
          out);
}

/* ---- signals ------------------------------------------------------------------------------- */

/* The watcher thread takes SIGTERM/SIGINT with sigwait and cancels the context; main stops it
 * with SIGUSR1 at the end. The signals are blocked (and their dispositions reset: a worker that
 * blocks or ignores SIGTERM passes that on through exec) before any thread starts. */
typedef struct watcher {
    pthread_t thread;
    sigset_t set;
    th_ctx *ctx;
    atomic_int signal; /* the signal that stopped us, or 0 */
} watcher;

static void *watch(void *arg)
{
    watcher *w = arg;
    int sig = 0;
    while (sigwait(&w->set, &sig) == 0 && sig != SIGUSR1) {
        if (sig == SIGTERM || sig == SIGINT) {
            atomic_store(&w->signal, sig);
            th_ctx_cancel(w->ctx);
            break;
        }
    }
    return NULL;
}

static int watcher_start(watcher *w, th_ctx *ctx)
{
    w->ctx = ctx;
    atomic_init(&w->signal, 0);
    sigemptyset(&w->set);
    sigaddset(&w->set, SIGTERM);
    sigaddset(&w->set, SIGINT);
    sigaddset(&w->set, SIGUSR1);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGUSR1, SIG_DFL);
    pthread_sigmask(SIG_BLOCK, &w->set, NULL);
    return th__thread_start(&w->thread, "th-analyze-sig", watch, w);
}

static void watcher_stop(watcher *w)
{
    pthread_kill(w->thread, SIGUSR1);
    pthread_join(w->thread, NULL);
}

/* ---- output -------------------------------------------------------------------------------- */

/* The shortest decimal that reads back as v (Python's repr), so results compare exactly. */
static void put_double(th_buf *out, double v)
{
    char text[40];
    for (int precision = 15; precision <= 17; precision++) {
        snprintf(text, sizeof(text), "%.*g", precision, v);
        if (strtod(text, NULL) == v) {
            break;
        }
    }
    th_buf_puts(out, text);
}

static int answer_error(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Writes {"error": reason} on stdout and returns status. */
static int answer_error(int status, const char *fmt, ...)
{
    char reason[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    th_buf out;
    th_buf_init(&out, 0);
    th_buf_puts(&out, "{\"error\":");
    th_buf_json_str(&out, reason);
    th_buf_puts(&out, "}\n");
    if (!th_buf_failed(&out)) {
        fwrite(out.data, 1, out.len, stdout);
    }
    fflush(stdout);
    th_buf_free(&out);
    return status;
}

static int answer(const char *task, const th_dicom_image *image, const th_imgstats *stats)
{
    th_buf out;
    th_buf_init(&out, 0);
    th_buf_puts(&out, "{\"task\":");
    th_buf_json_str(&out, task);
    th_buf_printf(
        &out, ",\"rows\":%u,\"columns\":%u,\"frames\":%u,\"modality\":", (unsigned)image->info.rows,
        (unsigned)image->info.columns, (unsigned)image->info.frames);
    th_buf_json_str(&out, image->info.modality);
    th_buf_printf(&out,
                  ",\"pixels\":%llu,\"samples\":%llu,\"min\":", (unsigned long long)stats->pixels,
                  (unsigned long long)stats->samples);
    put_double(&out, stats->min);
    th_buf_puts(&out, ",\"max\":");
    put_double(&out, stats->max);
    th_buf_puts(&out, ",\"mean\":");
    put_double(&out, stats->mean);
    th_buf_printf(&out, ",\"histogram\":{\"bins\":%u,\"min\":", (unsigned)stats->bins);
    put_double(&out, stats->hist_min);
    th_buf_puts(&out, ",\"max\":");
    put_double(&out, stats->hist_max);
    th_buf_puts(&out, ",\"counts\":[");
    for (uint32_t i = 0; i < stats->bins; i++) {
        th_buf_printf(&out, "%s%llu", i ? "," : "", (unsigned long long)stats->counts[i]);
    }
    th_buf_puts(&out, "]},\"windows\":[");
    for (size_t w = 0; w < stats->nwindows; w++) {
        th_buf_puts(&out, w ? ",{\"name\":" : "{\"name\":");
        th_buf_json_str(&out, stats->windows[w].name);
        th_buf_puts(&out, ",\"min\":");
        put_double(&out, stats->windows[w].min);
        th_buf_puts(&out, ",\"max\":");
        put_double(&out, stats->windows[w].max);
        th_buf_puts(&out, ",\"fraction\":");
        put_double(&out, stats->window_fractions[w]);
        th_buf_puts(&out, "}");
    }
    th_buf_puts(&out, "]}\n");
    if (th_buf_failed(&out)) {
        th_buf_free(&out);
        return answer_error(EXIT_INTERNAL, "out of memory");
    }
    size_t written = fwrite(out.data, 1, out.len, stdout);
    bool complete = written == out.len && fflush(stdout) == 0;
    th_buf_free(&out);
    return complete ? 0 : EXIT_INTERNAL;
}

/* ---- the request --------------------------------------------------------------------------- */

/* Reads stdin until it holds one complete JSON value (the worker may keep the pipe open) or
 * ends, waiting on the context's descriptor too. Returns 0 with *request set, or an exit
 * status after answering. */
static int read_request(th_ctx *ctx, json_t **request)
{
    int ctx_fd = -1;
    if (th_ctx_fd(ctx, &ctx_fd) != 0) {
        return answer_error(EXIT_INTERNAL, "cannot wait for the request");
    }
    static char text[REQUEST_MAX];
    size_t len = 0;
    for (;;) {
        struct pollfd fds[2] = {{.fd = STDIN_FILENO, .events = POLLIN},
                                {.fd = ctx_fd, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            return answer_error(EXIT_INTERNAL, "cannot wait for the request: %s", strerror(errno));
        }
        if (th_ctx_done(ctx)) {
            return -1; /* the caller answers for the signal */
        }
        ssize_t n = read(STDIN_FILENO, text + len, sizeof(text) - len);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
            continue;
        }
        if (n < 0) {
            return answer_error(EXIT_REQUEST, "cannot read the request: %s", strerror(errno));
        }
        len += (size_t)n;
        json_error_t jerr;
        *request = json_loadb(text, len, JSON_DISABLE_EOF_CHECK | JSON_REJECT_DUPLICATES, &jerr);
        if (*request != NULL) {
            return 0;
        }
        bool incomplete = json_error_code(&jerr) == json_error_premature_end_of_input;
        if (n == 0 || !incomplete) {
            return answer_error(EXIT_REQUEST, "malformed request: %s at line %d, column %d",
                                len == 0 ? "empty input" : jerr.text, jerr.line, jerr.column);
        }
        if (len == sizeof(text)) {
            return answer_error(EXIT_REQUEST, "request larger than %d bytes", REQUEST_MAX);
        }
    }
}

typedef struct request {
    const char *task;
    const char *image;
    const char *modality; /* NULL: the image's */
    bool has_windows;
    bool has_bins;
    th_imgstats_params params;
} request;

/* Validates the request; returns 0 or an exit status after answering. */
static int parse_request(json_t *root, request *req)
{
    memset(req, 0, sizeof(*req));
    if (!json_is_object(root)) {
        return answer_error(EXIT_REQUEST, "the request must be a JSON object");
    }
    json_t *task = json_object_get(root, "task");
    if (!json_is_string(task) || json_string_length(task) == 0 ||
        json_string_length(task) > TASK_ID_MAX ||
        strlen(json_string_value(task)) != json_string_length(task)) {
        return answer_error(EXIT_REQUEST, "task must be a string of 1 to %d characters",
                            TASK_ID_MAX);
    }
    req->task = json_string_value(task);
    json_t *image = json_object_get(root, "image");
    if (!json_is_string(image) || json_string_length(image) == 0 ||
        strlen(json_string_value(image)) != json_string_length(image)) {
        return answer_error(EXIT_REQUEST, "image must be the path of a DICOM file");
    }
    req->image = json_string_value(image);
    json_t *modality = json_object_get(root, "modality");
    if (modality != NULL && !json_is_null(modality)) {
        if (!json_is_string(modality) || json_string_length(modality) > 16) {
            return answer_error(EXIT_REQUEST, "modality must be a string of at most 16 "
                                              "characters");
        }
        req->modality = json_string_value(modality);
    }
    json_t *params = json_object_get(root, "parameters");
    if (params == NULL || json_is_null(params)) {
        return 0;
    }
    if (!json_is_object(params)) {
        return answer_error(EXIT_REQUEST, "parameters must be an object");
    }
    json_t *bins = json_object_get(params, "bins");
    if (bins != NULL && !json_is_null(bins)) {
        if (!json_is_integer(bins) || json_integer_value(bins) < 1 ||
            json_integer_value(bins) > TH_IMGSTATS_MAX_BINS) {
            return answer_error(EXIT_REQUEST, "parameters.bins must be an integer from 1 to %d",
                                TH_IMGSTATS_MAX_BINS);
        }
        req->has_bins = true;
        req->params.bins = (uint32_t)json_integer_value(bins);
    }
    json_t *windows = json_object_get(params, "windows");
    if (windows == NULL || json_is_null(windows)) {
        return 0;
    }
    if (!json_is_array(windows) || json_array_size(windows) > TH_IMGSTATS_MAX_WINDOWS) {
        return answer_error(EXIT_REQUEST,
                            "parameters.windows must be an array of at most %d "
                            "windows",
                            TH_IMGSTATS_MAX_WINDOWS);
    }
    req->has_windows = true;
    size_t i;
    json_t *w;
    json_array_foreach(windows, i, w)
    {
        json_t *name = json_object_get(w, "name");
        json_t *min = json_object_get(w, "min");
        json_t *max = json_object_get(w, "max");
        if (!json_is_object(w) || !json_is_string(name) || json_string_length(name) == 0 ||
            json_string_length(name) > TH_IMGSTATS_NAME_MAX ||
            strlen(json_string_value(name)) != json_string_length(name) || !json_is_number(min) ||
            !json_is_number(max) || json_number_value(min) > json_number_value(max)) {
            return answer_error(EXIT_REQUEST,
                                "parameters.windows[%zu] must be {\"name\": 1 to %d characters, "
                                "\"min\": number, \"max\": number not below min}",
                                i, TH_IMGSTATS_NAME_MAX);
        }
        th_imgstats_window *dst = &req->params.windows[i];
        snprintf(dst->name, sizeof(dst->name), "%s", json_string_value(name));
        dst->min = json_number_value(min);
        dst->max = json_number_value(max);
    }
    req->params.nwindows = json_array_size(windows);
    return 0;
}

/* ---- the command --------------------------------------------------------------------------- */

static int analyze(th_ctx *ctx)
{
    json_t *root = NULL;
    int status = read_request(ctx, &root);
    if (status != 0) {
        return status;
    }
    request req;
    status = parse_request(root, &req);
    if (status != 0) {
        json_decref(root);
        return status;
    }
    th_dicom_image image;
    char err[TH_DICOM_ERRLEN];
    int rc = th_dicom_read_file(ctx, req.image, &image, err, sizeof(err));
    if (rc != 0) {
        json_decref(root);
        if (rc == TH_ECANCELED || rc == TH_ETIMEDOUT) {
            return -1;
        }
        return answer_error(rc == TH_ENOMEM ? EXIT_INTERNAL : EXIT_IMAGE, "%s", err);
    }
    th_imgstats_params params;
    th_imgstats_defaults(req.modality, &image, &params);
    if (req.has_bins) {
        params.bins = req.params.bins;
    }
    if (req.has_windows) {
        params.nwindows = req.params.nwindows;
        memcpy(params.windows, req.params.windows, sizeof(params.windows));
    }
    th_imgstats stats;
    rc = th_imgstats_compute(ctx, &image, &params, &stats);
    if (rc == 0) {
        status = answer(req.task, &image, &stats);
        th_imgstats_free(&stats);
    } else if (rc == TH_ECANCELED || rc == TH_ETIMEDOUT) {
        status = -1;
    } else {
        status = answer_error(EXIT_INTERNAL, "cannot compute the statistics: %s", th_strerror(rc));
    }
    th_dicom_image_free(&image);
    json_decref(root);
    return status;
}

int th_cmd_analyze(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        fprintf(stderr, "trialhub analyze: unknown argument '%s'\n\n", argv[i]);
        usage(stderr);
        return 2;
    }
    th_ctx *ctx = NULL;
    if (th_ctx_with_cancel(th_ctx_background(), &ctx) != 0) {
        return answer_error(EXIT_INTERNAL, "out of memory");
    }
    watcher sig;
    if (watcher_start(&sig, ctx) != 0) {
        th_ctx_release(ctx);
        return answer_error(EXIT_INTERNAL, "cannot start the signal thread");
    }
    int status = analyze(ctx);
    watcher_stop(&sig);
    int signo = atomic_load(&sig.signal);
    th_ctx_release(ctx);
    if (status < 0) { /* canceled: a signal came before the answer */
        return answer_error(EXIT_SIGNAL + (signo ? signo : SIGTERM), "stopped by %s",
                            signo == SIGINT ? "SIGINT" : "SIGTERM");
    }
    return status;
}
