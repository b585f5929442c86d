/* `trialhub worker`: analysis and webhook workers only, sharing the queue in the database with
 * the API nodes (several may run on one machine). Also the settings they share with the workers
 * that `trialhub serve` embeds. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cmd/cmd.h"
#include "trialhub/analysis.h"
#include "trialhub/blob.h"
#include "trialhub/log.h"
#include "trialhub/queue.h"

/* Splits TRIALHUB_ANALYZER on spaces (no shell); default: this binary's `analyze`. */
static int th_cmd_analyzer_argv(const char *command, char ***argv_out)
{
    static char self[4096];
    char **argv = calloc(34, sizeof(char *));
    if (argv == NULL) {
        return -1;
    }
    if (command == NULL || command[0] == '\0') {
        ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
        if (n <= 0) {
            free(argv);
            return -1;
        }
        self[n] = '\0';
        argv[0] = strdup(self);
        argv[1] = strdup("analyze");
        *argv_out = argv;
        return argv[0] && argv[1] ? 0 : -1;
    }
    char *copy = strdup(command);
    size_t n = 0;
    char *save = NULL;
    for (char *tok = copy ? strtok_r(copy, " \t", &save) : NULL; tok && n < 32;
         tok = strtok_r(NULL, " \t", &save)) {
        argv[n++] = strdup(tok);
    }
    free(copy);
    *argv_out = argv;
    return n > 0 ? 0 : -1;
}

static void th_cmd_analyzer_free(char **argv)
{
    for (size_t i = 0; argv && argv[i]; i++) {
        free(argv[i]);
    }
    free(argv);
}

static void usage(FILE *out)
{
    fputs(
        "usage: trialhub worker [options]\n"
        "\n"
        "Runs image-analysis and webhook workers against the queue in the database.\n"
        "\n"
        "options (environment variable in brackets):\n"
        "  --database URL            [TRIALHUB_DATABASE_URL] default " TH_DEFAULT_DATABASE_URL "\n"
        "  --blobs URL               [TRIALHUB_BLOB_URL] default " TH_DEFAULT_BLOB_URL "\n"
        "  --workers N               [TRIALHUB_WORKERS] analyses at once, default 2\n"
        "  --analyzer CMD            [TRIALHUB_ANALYZER] default: trialhub analyze\n"
        "  --lease S                 [TRIALHUB_LEASE] lease of a task, default 30\n"
        "  --task-timeout S          [TRIALHUB_TASK_TIMEOUT] one attempt's deadline, default 600\n"
        "  --webhook-allow-private   [TRIALHUB_WEBHOOK_ALLOW_PRIVATE=1] callbacks to private or\n"
        "                            loopback addresses (tests only)\n"
        "  --log-level LEVEL         [TRIALHUB_LOG_LEVEL]\n",
        out);
}

int th_cmd_worker_options(int argc, char **argv, int *i, th_cmd_worker_opts *o)
{
    const char *v;
    if ((v = th_cmd_flag(argc, argv, i, "workers"))) {
        o->workers = (unsigned)th_cmd_number("--workers", v, 0, 256);
    } else if ((v = th_cmd_flag(argc, argv, i, "analyzer"))) {
        o->analyzer = v;
    } else if ((v = th_cmd_flag(argc, argv, i, "blobs"))) {
        o->blobs = v;
    } else if ((v = th_cmd_flag(argc, argv, i, "lease"))) {
        o->lease_s = (unsigned)th_cmd_number("--lease", v, 1, 3600);
    } else if ((v = th_cmd_flag(argc, argv, i, "task-timeout"))) {
        o->task_timeout_s = (unsigned)th_cmd_number("--task-timeout", v, 1, 86400);
    } else if (strcmp(argv[*i], "--webhook-allow-private") == 0) {
        o->webhook_allow_private = true;
    } else {
        return 0;
    }
    return 1;
}

void th_cmd_worker_defaults(th_cmd_worker_opts *o)
{
    o->workers =
        (unsigned)th_cmd_number("TRIALHUB_WORKERS", th_cmd_env("TRIALHUB_WORKERS", "2"), 0, 256);
    o->analyzer = th_cmd_env("TRIALHUB_ANALYZER", NULL);
    o->blobs = th_cmd_env("TRIALHUB_BLOB_URL", TH_DEFAULT_BLOB_URL);
    o->lease_s =
        (unsigned)th_cmd_number("TRIALHUB_LEASE", th_cmd_env("TRIALHUB_LEASE", "30"), 1, 3600);
    o->task_timeout_s = (unsigned)th_cmd_number(
        "TRIALHUB_TASK_TIMEOUT", th_cmd_env("TRIALHUB_TASK_TIMEOUT", "600"), 1, 86400);
    o->webhook_allow_private = strcmp(th_cmd_env("TRIALHUB_WEBHOOK_ALLOW_PRIVATE", "0"), "1") == 0;
}

int th_cmd_workers_start(const th_cmd_worker_opts *o, th_store *store, th_queue *queue,
                         th_blob_store *blobs, th_events *events, th_metrics *metrics,
                         unsigned webhook_threads, th_workers **out)
{
    char **argv = NULL;
    if (th_cmd_analyzer_argv(o->analyzer, &argv) != 0) {
        th_cmd_analyzer_free(argv);
        fprintf(stderr, "trialhub: cannot make the analyzer command\n");
        return TH_EINVAL;
    }
    th_workers_config wc = {
        .queue = queue,
        .store = store,
        .blobs = blobs,
        .events = events,
        .metrics = metrics,
        .threads = o->workers,
        .webhook_threads = webhook_threads,
        .analyzer = argv,
        .lease_ms = o->lease_s * 1000u,
        .task_timeout_ms = o->task_timeout_s * 1000u,
        .webhook_allow_private = o->webhook_allow_private,
    };
    int rc = th_workers_start(&wc, out);
    th_cmd_analyzer_free(argv);
    return rc;
}

int th_cmd_worker(int argc, char **argv)
{
    th_log_configure(th_log_level_parse(th_cmd_env("TRIALHUB_LOG_LEVEL", "info")), 2);
    const char *database = th_cmd_env("TRIALHUB_DATABASE_URL", TH_DEFAULT_DATABASE_URL);
    th_cmd_worker_opts o;
    th_cmd_worker_defaults(&o);
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else if ((v = th_cmd_flag(argc, argv, &i, "database"))) {
            database = v;
        } else if ((v = th_cmd_flag(argc, argv, &i, "log-level"))) {
            th_log_configure(th_log_level_parse(v), 2);
        } else if (!th_cmd_worker_options(argc, argv, &i, &o)) {
            fprintf(stderr, "trialhub worker: unknown option '%s' (see --help)\n", argv[i]);
            return 2;
        }
    }
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    th_store *store = th_cmd_open_store(database);
    char err[256] = "";
    th_queue *queue = NULL;
    th_blob_store *blobs = NULL;
    th_workers *workers = NULL;
    int rc = th_queue_open(database, NULL, &queue, err, sizeof(err));
    if (rc == 0) {
        rc = th_blob_open(o.blobs, 0, &blobs, err, sizeof(err));
    }
    if (rc == 0) {
        rc = th_cmd_workers_start(&o, store, queue, blobs, NULL, NULL, 1, &workers);
    }
    if (rc != 0) {
        fprintf(stderr, "trialhub worker: cannot start: %s%s%s\n", th_strerror(rc),
                err[0] ? ": " : "", err);
    } else {
        TH_LOG(TH_LOG_INFO, "worker started", TH_LOG_INT("analysis_threads", o.workers),
               TH_LOG_INT("pid", getpid()));
        int sig;
        while (sigwait(&sigs, &sig) != 0) {
        }
        TH_LOG(TH_LOG_INFO, "worker stopping", TH_LOG_STR("signal", strsignal(sig)));
    }
    th_workers_stop(workers);
    th_blob_close(blobs);
    th_queue_close(queue);
    th_store_close(store);
    return rc == 0 ? 0 : 1;
}
