/* `trialhub serve`: wires the store, the group-commit writer, the scoring pool, the roster,
 * the keyring and the questionnaires to the HTTP server, then waits for SIGTERM/SIGINT and
 * shuts down in the order that loses nothing: stop accepting, let in-flight requests finish,
 * drain the pool, drain the writer, stop. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cmd/cmd.h"
#include "trialhub/auth.h"
#include "trialhub/analysis.h"
#include "trialhub/blob.h"
#include "trialhub/clock.h"
#include "trialhub/collector.h"
#include "trialhub/events.h"
#include "trialhub/fhir.h"
#include "trialhub/log.h"
#include "trialhub/metrics.h"
#include "trialhub/pool.h"
#include "trialhub/progress.h"
#include "trialhub/queue.h"
#include "trialhub/reports.h"
#include "trialhub/roster.h"
#include "trialhub/scoring.h"
#include "trialhub/server.h"
#include "trialhub/writer.h"

static void usage(FILE *out)
{
    fputs("usage: trialhub serve [options]\n"
          "\n"
          "options (environment variable in brackets):\n"
          "  --listen HOST:PORT        [TRIALHUB_LISTEN] default " TH_DEFAULT_LISTEN "\n"
          "  --database URL            [TRIALHUB_DATABASE_URL] default " TH_DEFAULT_DATABASE_URL
          "\n"
          "  --questionnaires DIR      [TRIALHUB_QUESTIONNAIRES] extra Questionnaire/CodeSystem "
          "files\n"
          "  --demo                    seed a demo trial (3 sites, 1,000 patients) and print keys\n"
          "  --http-threads N          [TRIALHUB_HTTP_THREADS] default: one per core\n"
          "  --http-epoll              [TRIALHUB_HTTP_EPOLL=1] epoll instead of poll (see "
          "docs/internals/http.md)\n"
          "  --max-connections N       [TRIALHUB_MAX_CONNECTIONS] default 10000\n"
          "  --max-connections-per-ip N [TRIALHUB_MAX_CONNECTIONS_PER_IP] default 1024\n"
          "  --idle-timeout S          [TRIALHUB_IDLE_TIMEOUT] keep-alive idle and header deadline,"
          " default 30\n"
          "  --request-timeout S       [TRIALHUB_REQUEST_TIMEOUT] headers to end of body, default "
          "30\n"
          "  --writer-queue N          [TRIALHUB_WRITER_QUEUE] submissions waiting for a commit "
          "before 503, default 4096\n"
          "  --writer-batch N          [TRIALHUB_WRITER_BATCH] most rows per commit, default 512\n"
          "  --writer-wait-us N        [TRIALHUB_WRITER_WAIT_US] wait for more rows before "
          "committing, default 0\n"
          "  --pool-threads N          [TRIALHUB_POOL_THREADS] scoring workers, default 2\n"
          "  --pool-queue N            [TRIALHUB_POOL_QUEUE] scoring tasks waiting, default 8192\n"
          "  --progress-publish-ms N   [TRIALHUB_PROGRESS_PUBLISH_MS] how often the progress "
          "cache publishes changes, default 250\n"
          "  --progress-rebuild-s N    [TRIALHUB_PROGRESS_REBUILD_S] full rebuild of progress "
          "from the store, default 60\n"
          "  --ws-max-connections N    [TRIALHUB_WS_MAX_CONNECTIONS] open WebSockets (GET "
          "/v1/events) before 503, default 1024\n"
          "  --ws-send-queue N         [TRIALHUB_WS_SEND_QUEUE] messages waiting per WebSocket "
          "before it is closed as too slow, default 256\n"
          "  --ws-send-queue-bytes N   [TRIALHUB_WS_SEND_QUEUE_BYTES] the same in bytes, default "
          "1048576\n"
          "  --ws-ping-interval-ms N   [TRIALHUB_WS_PING_INTERVAL_MS] WebSocket ping interval; "
          "silent for two: dropped, default 20000\n"
          "  --ws-stats-interval-ms N  [TRIALHUB_WS_STATS_INTERVAL_MS] system.stats interval, "
          "default 1000\n"
          "  --ws-ticket-ttl-s N       [TRIALHUB_WS_TICKET_TTL_S] lifetime of a WebSocket ticket, "
          "default 30\n"
          "  --ws-max-tickets N        [TRIALHUB_WS_MAX_TICKETS] tickets outstanding before 503, "
          "default 4096\n"
          "  --report-threads N        [TRIALHUB_REPORT_THREADS] report computations at once, "
          "default 2\n"
          "  --report-queue N          [TRIALHUB_REPORT_QUEUE] reports waiting for a thread "
          "before 503, default 8\n"
          "  --report-max-timeout S    [TRIALHUB_REPORT_MAX_TIMEOUT] largest timeout= a report "
          "may ask, default 120\n"
          "  --collect-max-in-flight N [TRIALHUB_COLLECT_MAX_IN_FLIGHT] sites fetched at once, "
          "default 16\n"
          "  --collect-site-timeout-ms N [TRIALHUB_COLLECT_SITE_TIMEOUT_MS] one site's whole "
          "fetch, default 120000\n"
          "  --collect-allow-http      [TRIALHUB_COLLECT_ALLOW_HTTP=1] allow http:// site URLs "
          "(https only by default)\n"
          "  --collect-every D         [TRIALHUB_COLLECT_EVERY] collect every trial this often, "
          "e.g. 15m or 24h\n"
          "  --workers N               [TRIALHUB_WORKERS] embedded analysis workers, default 2 "
          "(0: none; run `trialhub worker`)\n"
          "  --analyzer CMD            [TRIALHUB_ANALYZER] default: trialhub analyze\n"
          "  --blobs URL               [TRIALHUB_BLOB_URL] default " TH_DEFAULT_BLOB_URL "\n"
          "  --upload-max-mb N         [TRIALHUB_UPLOAD_MAX_MB] largest image upload, default 512\n"
          "  --lease S                 [TRIALHUB_LEASE] lease of a task, default 30\n"
          "  --task-timeout S          [TRIALHUB_TASK_TIMEOUT] one analysis attempt, default 600\n"
          "  --webhook-allow-private   [TRIALHUB_WEBHOOK_ALLOW_PRIVATE=1] callbacks to private "
          "addresses (tests)\n"
          "  --log-level LEVEL         [TRIALHUB_LOG_LEVEL] debug, info, warn, error\n",
          out);
}

typedef struct serve_opts {
    const char *listen;
    const char *database;
    const char *questionnaires;
    bool demo;
    bool http_epoll;
    unsigned http_threads;
    unsigned max_conns;
    unsigned max_conns_ip;
    unsigned idle_timeout_s;
    unsigned request_timeout_s;
    unsigned writer_queue;
    unsigned writer_batch;
    unsigned writer_wait_us;
    unsigned pool_threads;
    unsigned pool_queue;
    unsigned ws_max_conns;
    unsigned ws_send_queue;
    unsigned ws_send_queue_bytes;
    unsigned ws_ping_ms;
    unsigned ws_stats_ms;
    unsigned ws_ticket_ttl_s;
    unsigned ws_max_tickets;
    unsigned progress_publish_ms;
    unsigned progress_rebuild_s;
    unsigned report_threads;
    unsigned report_queue;
    unsigned report_max_timeout_s;
    unsigned collect_max_in_flight;
    unsigned collect_site_timeout_ms;
    bool collect_allow_http;
    uint64_t collect_every_ns;
    uint64_t upload_limit;
    th_cmd_worker_opts work;
} serve_opts;

static unsigned env_number(const char *name, unsigned fallback, unsigned long min,
                           unsigned long max)
{
    const char *v = th_cmd_env(name, NULL);
    return v ? (unsigned)th_cmd_number(name, v, min, max) : fallback;
}

/* "15m", "6h", "24h", "90s": the schedule of collections; 0 if malformed or under a minute. */
static uint64_t parse_every(const char *s)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    uint64_t unit = strcmp(end, "s") == 0   ? TH_NS_PER_S
                    : strcmp(end, "m") == 0 ? 60 * TH_NS_PER_S
                    : strcmp(end, "h") == 0 ? 3600 * TH_NS_PER_S
                                            : 0;
    if (end == s || v == 0 || v > 24 * 3600 || unit == 0 || v * unit < 60 * TH_NS_PER_S) {
        return 0;
    }
    return v * unit;
}

static int parse(int argc, char **argv, serve_opts *o)
{
    o->listen = th_cmd_env("TRIALHUB_LISTEN", TH_DEFAULT_LISTEN);
    o->database = th_cmd_env("TRIALHUB_DATABASE_URL", TH_DEFAULT_DATABASE_URL);
    o->questionnaires = th_cmd_env("TRIALHUB_QUESTIONNAIRES", NULL);
    o->http_threads = env_number("TRIALHUB_HTTP_THREADS", 0, 0, 256);
    o->http_epoll = env_number("TRIALHUB_HTTP_EPOLL", 0, 0, 1) == 1;
    o->max_conns = env_number("TRIALHUB_MAX_CONNECTIONS", 10000, 1, 1000000);
    o->max_conns_ip = env_number("TRIALHUB_MAX_CONNECTIONS_PER_IP", 1024, 1, 1000000);
    o->idle_timeout_s = env_number("TRIALHUB_IDLE_TIMEOUT", 30, 1, 3600);
    o->request_timeout_s = env_number("TRIALHUB_REQUEST_TIMEOUT", 30, 1, 3600);
    o->writer_queue = env_number("TRIALHUB_WRITER_QUEUE", 4096, 1, 1000000);
    o->writer_batch = env_number("TRIALHUB_WRITER_BATCH", 512, 1, 100000);
    o->writer_wait_us = env_number("TRIALHUB_WRITER_WAIT_US", 0, 0, 1000000);
    o->pool_threads = env_number("TRIALHUB_POOL_THREADS", 2, 1, TH_POOL_MAX_THREADS);
    o->pool_queue = env_number("TRIALHUB_POOL_QUEUE", 8192, 1, 1u << 24);
    o->progress_publish_ms = env_number("TRIALHUB_PROGRESS_PUBLISH_MS", 250, 10, 60000);
    o->progress_rebuild_s = env_number("TRIALHUB_PROGRESS_REBUILD_S", 60, 1, 86400);
    o->report_threads = env_number("TRIALHUB_REPORT_THREADS", 2, 1, 64);
    o->report_queue = env_number("TRIALHUB_REPORT_QUEUE", 8, 1, 4096);
    o->report_max_timeout_s = env_number("TRIALHUB_REPORT_MAX_TIMEOUT", 120, 1, 3600);
    o->collect_max_in_flight = env_number("TRIALHUB_COLLECT_MAX_IN_FLIGHT", 16, 1, 1024);
    o->collect_site_timeout_ms =
        env_number("TRIALHUB_COLLECT_SITE_TIMEOUT_MS", 120000, 100, 86400000);
    o->collect_allow_http = env_number("TRIALHUB_COLLECT_ALLOW_HTTP", 0, 0, 1) == 1;
    const char *every = th_cmd_env("TRIALHUB_COLLECT_EVERY", NULL);
    if (every && (o->collect_every_ns = parse_every(every)) == 0) {
        fprintf(stderr, "trialhub serve: TRIALHUB_COLLECT_EVERY must be like 15m, 6h or 24h\n");
        return 2;
    }
    o->ws_max_conns = env_number("TRIALHUB_WS_MAX_CONNECTIONS", 1024, 1, 1000000);
    o->ws_send_queue = env_number("TRIALHUB_WS_SEND_QUEUE", 256, 1, 1000000);
    o->ws_send_queue_bytes = env_number("TRIALHUB_WS_SEND_QUEUE_BYTES", 1u << 20, 1024, 1u << 30);
    o->ws_ping_ms = env_number("TRIALHUB_WS_PING_INTERVAL_MS", 20000, 10, 3600000);
    o->ws_stats_ms = env_number("TRIALHUB_WS_STATS_INTERVAL_MS", 1000, 1, 3600000);
    o->ws_ticket_ttl_s = env_number("TRIALHUB_WS_TICKET_TTL_S", 30, 1, 3600);
    o->ws_max_tickets = env_number("TRIALHUB_WS_MAX_TICKETS", 4096, 1, 1000000);
    th_cmd_worker_defaults(&o->work);
    o->upload_limit = (uint64_t)env_number("TRIALHUB_UPLOAD_MAX_MB", 512, 1, 65536) << 20;
    for (int i = 1; i < argc; i++) {
        const char *v;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            exit(0);
        } else if (strcmp(argv[i], "--demo") == 0) {
            o->demo = true;
        } else if (strcmp(argv[i], "--http-epoll") == 0) {
            o->http_epoll = true;
        } else if ((v = th_cmd_flag(argc, argv, &i, "listen"))) {
            o->listen = v;
        } else if ((v = th_cmd_flag(argc, argv, &i, "database"))) {
            o->database = v;
        } else if ((v = th_cmd_flag(argc, argv, &i, "questionnaires"))) {
            o->questionnaires = v;
        } else if ((v = th_cmd_flag(argc, argv, &i, "http-threads"))) {
            o->http_threads = (unsigned)th_cmd_number("--http-threads", v, 0, 256);
        } else if ((v = th_cmd_flag(argc, argv, &i, "max-connections-per-ip"))) {
            o->max_conns_ip = (unsigned)th_cmd_number("--max-connections-per-ip", v, 1, 1000000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "max-connections"))) {
            o->max_conns = (unsigned)th_cmd_number("--max-connections", v, 1, 1000000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "idle-timeout"))) {
            o->idle_timeout_s = (unsigned)th_cmd_number("--idle-timeout", v, 1, 3600);
        } else if ((v = th_cmd_flag(argc, argv, &i, "request-timeout"))) {
            o->request_timeout_s = (unsigned)th_cmd_number("--request-timeout", v, 1, 3600);
        } else if ((v = th_cmd_flag(argc, argv, &i, "writer-queue"))) {
            o->writer_queue = (unsigned)th_cmd_number("--writer-queue", v, 1, 1000000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "writer-batch"))) {
            o->writer_batch = (unsigned)th_cmd_number("--writer-batch", v, 1, 100000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "writer-wait-us"))) {
            o->writer_wait_us = (unsigned)th_cmd_number("--writer-wait-us", v, 0, 1000000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "pool-threads"))) {
            o->pool_threads = (unsigned)th_cmd_number("--pool-threads", v, 1, TH_POOL_MAX_THREADS);
        } else if ((v = th_cmd_flag(argc, argv, &i, "pool-queue"))) {
            o->pool_queue = (unsigned)th_cmd_number("--pool-queue", v, 1, 1u << 24);
        } else if ((v = th_cmd_flag(argc, argv, &i, "progress-publish-ms"))) {
            o->progress_publish_ms = (unsigned)th_cmd_number("--progress-publish-ms", v, 10, 60000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "progress-rebuild-s"))) {
            o->progress_rebuild_s = (unsigned)th_cmd_number("--progress-rebuild-s", v, 1, 86400);
        } else if ((v = th_cmd_flag(argc, argv, &i, "ws-max-connections"))) {
            o->ws_max_conns = (unsigned)th_cmd_number("--ws-max-connections", v, 1, 1000000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "ws-send-queue-bytes"))) {
            o->ws_send_queue_bytes =
                (unsigned)th_cmd_number("--ws-send-queue-bytes", v, 1024, 1u << 30);
        } else if ((v = th_cmd_flag(argc, argv, &i, "ws-send-queue"))) {
            o->ws_send_queue = (unsigned)th_cmd_number("--ws-send-queue", v, 1, 1000000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "ws-ping-interval-ms"))) {
            o->ws_ping_ms = (unsigned)th_cmd_number("--ws-ping-interval-ms", v, 10, 3600000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "ws-stats-interval-ms"))) {
            o->ws_stats_ms = (unsigned)th_cmd_number("--ws-stats-interval-ms", v, 1, 3600000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "ws-ticket-ttl-s"))) {
            o->ws_ticket_ttl_s = (unsigned)th_cmd_number("--ws-ticket-ttl-s", v, 1, 3600);
        } else if ((v = th_cmd_flag(argc, argv, &i, "ws-max-tickets"))) {
            o->ws_max_tickets = (unsigned)th_cmd_number("--ws-max-tickets", v, 1, 1000000);
        } else if ((v = th_cmd_flag(argc, argv, &i, "report-threads"))) {
            o->report_threads = (unsigned)th_cmd_number("--report-threads", v, 1, 64);
        } else if ((v = th_cmd_flag(argc, argv, &i, "report-queue"))) {
            o->report_queue = (unsigned)th_cmd_number("--report-queue", v, 1, 4096);
        } else if ((v = th_cmd_flag(argc, argv, &i, "report-max-timeout"))) {
            o->report_max_timeout_s = (unsigned)th_cmd_number("--report-max-timeout", v, 1, 3600);
        } else if ((v = th_cmd_flag(argc, argv, &i, "collect-max-in-flight"))) {
            o->collect_max_in_flight =
                (unsigned)th_cmd_number("--collect-max-in-flight", v, 1, 1024);
        } else if ((v = th_cmd_flag(argc, argv, &i, "collect-site-timeout-ms"))) {
            o->collect_site_timeout_ms =
                (unsigned)th_cmd_number("--collect-site-timeout-ms", v, 100, 86400000);
        } else if (strcmp(argv[i], "--collect-allow-http") == 0) {
            o->collect_allow_http = true;
        } else if ((v = th_cmd_flag(argc, argv, &i, "collect-every"))) {
            if ((o->collect_every_ns = parse_every(v)) == 0) {
                fprintf(stderr, "trialhub serve: --collect-every must be like 15m, 6h or 24h\n");
                return 2;
            }
        } else if ((v = th_cmd_flag(argc, argv, &i, "upload-max-mb"))) {
            o->upload_limit = (uint64_t)th_cmd_number("--upload-max-mb", v, 1, 65536) << 20;
        } else if (th_cmd_worker_options(argc, argv, &i, &o->work)) {
            /* taken */
        } else if ((v = th_cmd_flag(argc, argv, &i, "log-level"))) {
            th_log_configure(th_log_level_parse(v), 2);
        } else {
            fprintf(stderr, "trialhub serve: unknown option '%s' (see --help)\n", argv[i]);
            return 2;
        }
    }
    return 0;
}

/* ---- demo seeding ------------------------------------------------------------------------ */

typedef struct demo_keys {
    th_key admin, investigator, patient;
    char admin_text[TH_KEY_TEXT_MAX + 1];
    char investigator_text[TH_KEY_TEXT_MAX + 1];
    char patient_text[TH_KEY_TEXT_MAX + 1];
    bool seed;
} demo_keys;

static int demo_apply(th_store *store, void *arg)
{
    demo_keys *d = arg;
    int rc = 0;
    if (d->seed) {
        th_trial trial = {"DEMO", "Demo trial: weekly PHQ-9 and GAD-7", "[\"A\",\"B\"]",
                          "[0,2,4,8,12]"};
        rc = th_store_trial_insert(store, &trial);
        static const char *const sites[][2] = {
            {"S1", "Site one"}, {"S2", "Site two"}, {"S3", "Site three"}};
        for (int i = 0; rc == 0 && i < 3; i++) {
            th_site site = {"DEMO", sites[i][0], sites[i][1], NULL, NULL};
            rc = th_store_site_insert(store, &site);
        }
        for (int i = 1; rc == 0 && i <= 1000; i++) {
            char id[16], on[16];
            snprintf(id, sizeof(id), "P%04d", i);
            snprintf(on, sizeof(on), "2026-%02d-%02d", 9 + (i % 3), 1 + (i % 28));
            th_patient p = {"DEMO", id, sites[(i - 1) % 3][0], i % 2 ? "A" : "B", on};
            rc = th_store_patient_insert(store, &p);
        }
    }
    if (rc == 0) {
        rc = th_store_key_insert(store, &d->admin);
    }
    if (rc == 0) {
        rc = th_store_key_insert(store, &d->investigator);
    }
    if (rc == 0) {
        rc = th_store_key_insert(store, &d->patient);
    }
    return rc;
}

static int seed_demo(th_writer *writer, th_roster *roster, th_keyring *keyring, const char *listen)
{
    demo_keys d;
    memset(&d, 0, sizeof(d));
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(roster, &g);
    d.seed = view && th_roster_trial_find(view, "DEMO") == NULL;
    th_snapshot_release(&g);
    int64_t now_ms = (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);
    if (th_key_generate(TH_ROLE_ADMIN, NULL, NULL, NULL, &d.admin, d.admin_text) != 0 ||
        th_key_generate(TH_ROLE_INVESTIGATOR, "DEMO", NULL, NULL, &d.investigator,
                        d.investigator_text) != 0 ||
        th_key_generate(TH_ROLE_PATIENT, "DEMO", NULL, "P0001", &d.patient, d.patient_text) != 0) {
        return TH_ESYS;
    }
    d.admin.created_ms = d.investigator.created_ms = d.patient.created_ms = now_ms;
    int rc = th_writer_run(th_ctx_background(), writer, demo_apply, &d);
    if (rc != 0) {
        return rc;
    }
    if ((rc = th_roster_reload(roster)) != 0 || (rc = th_keyring_reload(keyring)) != 0) {
        return rc;
    }
    printf("\ntrialhub demo: trial DEMO, sites S1-S3, patients P0001-P1000 %s.\n"
           "  admin key:        %s\n"
           "  investigator key: %s  (trial DEMO)\n"
           "  patient key:      %s  (patient P0001)\n\n"
           "Submit a PHQ-9 as patient P0001:\n"
           "  curl -i -X POST http://%s/fhir/QuestionnaireResponse \\\n"
           "    -H 'Authorization: Bearer %s' -H 'Content-Type: application/fhir+json' \\\n"
           "    --data-binary @examples/phq9-response.json\n\n",
           d.seed ? "created" : "already there", d.admin_text, d.investigator_text, d.patient_text,
           listen, d.patient_text);
    fflush(stdout);
    return 0;
}

/* Removes upload temp files an earlier run left (a crash mid-upload). An hour old at least: the
 * folder may be shared with other nodes still uploading. */
static int sweep_blobs(th_blob_store *blobs)
{
    size_t removed = 0;
    int rc = th_blob_sweep(blobs, 3600, &removed);
    if (rc == 0 && removed) {
        TH_LOG(TH_LOG_INFO, "stale uploads removed", TH_LOG_INT("files", removed));
    }
    return rc;
}

/* ---- run --------------------------------------------------------------------------------- */

int th_cmd_serve(int argc, char **argv)
{
    serve_opts o;
    memset(&o, 0, sizeof(o));
    th_log_configure(th_log_level_parse(th_cmd_env("TRIALHUB_LOG_LEVEL", "info")), 2);
    int rc = parse(argc, argv, &o);
    if (rc != 0) {
        return rc;
    }
    /* Signals are taken by this thread with sigtimedwait; every thread started below inherits
     * the mask, so none of them is interrupted. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    th_qreg *qreg = NULL;
    if (th_qreg_create(&qreg) != 0) {
        fprintf(stderr, "trialhub serve: out of memory\n");
        return 1;
    }
    if (o.questionnaires) {
        char err[512] = "";
        rc = th_qreg_load_dir(qreg, o.questionnaires, err, sizeof(err));
        if (rc != 0) {
            fprintf(stderr, "trialhub serve: cannot load questionnaires: %s\n", err);
            th_qreg_destroy(qreg);
            return 1;
        }
    }
    th_store *store = th_cmd_open_store(o.database);
    th_metrics *metrics = NULL;
    th_events *events = NULL;
    th_writer *writer = NULL;
    th_pool *pool = NULL;
    th_roster *roster = NULL;
    th_keyring *keyring = NULL;
    th_scoring *scoring = NULL;
    th_progress *progress = NULL;
    th_reports *reports = NULL;
    th_collector *collector = NULL;
    th_queue *queue = NULL;
    th_blob_store *blobs = NULL;
    th_pool *io_pool = NULL;
    th_workers *workers = NULL;
    th_server *server = NULL;
    char qerr[256] = "";
    const char *failed = NULL;

    th_writer_config wcfg = {o.writer_queue, o.writer_batch, o.writer_wait_us};
    th_pool_config pcfg = {"scoring", o.pool_threads, o.pool_queue};
    if ((rc = th_metrics_create(&metrics)) != 0) {
        failed = "metrics";
    } else if ((rc = th_events_create(metrics, &events)) != 0) {
        failed = "events";
    } else if ((rc = th_queue_open(o.database, NULL, &queue, qerr, sizeof(qerr))) != 0 ||
               (rc = th_queue_register_metrics(queue, metrics)) != 0) {
        failed = qerr[0] ? qerr : "queue";
    } else if ((rc = th_blob_open(o.work.blobs, o.upload_limit, &blobs, qerr, sizeof(qerr))) != 0) {
        failed = qerr[0] ? qerr : "blob store";
    } else if ((rc = sweep_blobs(blobs)) != 0) {
        failed = "blob sweep";
    } else if ((rc = th_pool_create(&(th_pool_config){"blob-io", 2, 256}, &io_pool)) != 0) {
        failed = "I/O pool";
    } else if ((rc = th_writer_create(store, &wcfg, metrics, &writer)) != 0) {
        failed = "writer";
    } else if ((rc = th_pool_create(&pcfg, &pool)) != 0) {
        failed = "pool";
    } else if ((rc = th_roster_create(store, &roster)) != 0) {
        failed = "roster";
    } else if ((rc = th_keyring_create(store, &keyring)) != 0) {
        failed = "keyring";
    } else if (o.demo && (rc = seed_demo(writer, roster, keyring, o.listen)) != 0) {
        failed = "demo seed";
    } else {
        th_progress_config pcfg_progress = {
            .store = store,
            .roster = roster,
            .events = events,
            .metrics = metrics,
            .publish_interval_ms = o.progress_publish_ms,
            .rebuild_interval_s = o.progress_rebuild_s,
        };
        th_scoring_config scfg = {pool, writer, store, qreg, metrics, 1000, NULL, events};
        th_reports_config rcfg = {.store = store,
                                  .metrics = metrics,
                                  .threads = o.report_threads,
                                  .queue = o.report_queue};
        if ((rc = th_progress_create(&pcfg_progress, &progress)) != 0) {
            failed = "progress";
        } else if ((rc = th_reports_create(&rcfg, &reports)) != 0) {
            failed = "reports";
        } else {
            scfg.progress = progress;
            th_collector_config ccfg = {
                .store = store,
                .writer = writer,
                .roster = roster,
                .qreg = qreg,
                .progress = progress,
                .events = events,
                .metrics = metrics,
                .max_in_flight = o.collect_max_in_flight,
                .site_timeout_ms = o.collect_site_timeout_ms,
                .every_ns = o.collect_every_ns,
                .allow_insecure_http = o.collect_allow_http,
            };
            if ((rc = th_scoring_create(&scfg, &scoring)) != 0) {
                failed = "scoring";
            } else if ((ccfg.scoring = scoring, rc = th_collector_create(&ccfg, &collector)) != 0) {
                failed = "collector";
            }
        }
    }
    char err[256] = "";
    if (failed == NULL) {
        th_server_config cfg = {
            .listen = o.listen,
            .threads = o.http_threads,
            .conn_limit = o.max_conns,
            .per_ip_limit = o.max_conns_ip,
            .idle_timeout_s = o.idle_timeout_s,
            .request_timeout_s = o.request_timeout_s,
            .use_epoll = o.http_epoll,
            .store = store,
            .writer = writer,
            .pool = pool,
            .metrics = metrics,
            .roster = roster,
            .keyring = keyring,
            .qreg = qreg,
            .scoring = scoring,
            .events = events,
            .progress = progress,
            .reports = reports,
            .collector = collector,
            .queue = queue,
            .blobs = blobs,
            .io_pool = io_pool,
            .upload_limit = o.upload_limit,
            .report_max_timeout_s = o.report_max_timeout_s,
            .ws_max_connections = o.ws_max_conns,
            .ws_send_queue = o.ws_send_queue,
            .ws_send_queue_bytes = o.ws_send_queue_bytes,
            .ws_ping_interval_ms = o.ws_ping_ms,
            .ws_stats_interval_ms = o.ws_stats_ms,
            .ws_ticket_ttl_s = o.ws_ticket_ttl_s,
            .ws_max_tickets = o.ws_max_tickets,
        };
        rc = th_server_start(&cfg, &server, err, sizeof(err));
        if (rc != 0) {
            failed = err;
        }
    }
    if (failed == NULL && (rc = th_cmd_workers_start(&o.work, store, queue, blobs, events, metrics,
                                                     1, &workers)) != 0) {
        failed = "workers";
    }
    if (failed == NULL) {
        char url[64];
        snprintf(url, sizeof(url), "%.*s:%u", (int)(strrchr(o.listen, ':') - o.listen), o.listen,
                 th_server_port(server));
        TH_LOG(TH_LOG_INFO, "listening", TH_LOG_STR("address", url),
               TH_LOG_STR("store", th_store_backend(store)),
               TH_LOG_INT("questionnaires", th_qreg_count(qreg)));
        if (th_keyring_active_count(keyring) == 0) {
            th_log(TH_LOG_WARN,
                   "no API keys yet: create an admin key with 'trialhub token create --role admin'",
                   0, NULL);
        }
        /* Wait for a signal; refresh keys made or revoked by the CLI every few seconds. */
        uint64_t last_refresh = th_clock_now_ns();
        for (;;) {
            struct timespec tick = {1, 0};
            int sig = sigtimedwait(&sigs, NULL, &tick);
            if (sig == SIGTERM || sig == SIGINT) {
                TH_LOG(TH_LOG_INFO, "shutting down", TH_LOG_STR("signal", strsignal(sig)));
                break;
            }
            if (th_clock_now_ns() - last_refresh > 5 * TH_NS_PER_S) {
                if (th_keyring_reload(keyring) != 0) {
                    th_log(TH_LOG_WARN, "cannot refresh API keys from the store", 0, NULL);
                }
                last_refresh = th_clock_now_ns();
            }
        }
        th_server_quiesce(server);
    } else {
        fprintf(stderr, "trialhub serve: cannot start: %s: %s\n", failed, th_strerror(rc));
    }

    /* Shutdown order: requests in flight finish (their commits complete as the writer drains),
     * scoring drains on the pool, the writer commits what is queued, then everything stops. */
    /* Embedded workers: running analyzers are stopped, their tasks go back to the queue. */
    th_workers_stop(workers);
    if (io_pool) {
        th_ctx *ctx = NULL;
        if (th_ctx_with_timeout(th_ctx_background(), 30 * TH_NS_PER_S, &ctx) == 0) {
            if (th_pool_shutdown(ctx, io_pool) != 0) { /* uploads finish their commit */
                th_log(TH_LOG_WARN, "uploads did not finish storing in time", 0, NULL);
            }
            th_ctx_release(ctx);
        }
    }
    /* Reports in flight are cancelled and answered (503) before the server stops. */
    th_reports_destroy(reports);
    /* Collections are canceled; what they already queued commits as the writer drains. */
    th_collector_destroy(collector);
    if (scoring) {
        th_scoring_stop(scoring);
    }
    if (pool) {
        th_ctx *ctx = NULL;
        if (th_ctx_with_timeout(th_ctx_background(), 10 * TH_NS_PER_S, &ctx) == 0) {
            if (th_pool_shutdown(ctx, pool) != 0) {
                th_log(TH_LOG_WARN, "scoring did not drain in time; rows stay pending", 0, NULL);
            }
            th_ctx_release(ctx);
        }
    }
    if (writer) {
        th_writer_stop(writer);
    }
    th_server_stop(server);
    th_scoring_destroy(scoring);
    th_pool_destroy(pool);
    th_writer_destroy(writer);
    th_progress_destroy(progress); /* after the writer: its completions send notes */
    th_keyring_destroy(keyring);
    th_roster_destroy(roster);
    th_pool_destroy(io_pool);
    th_blob_close(blobs);
    th_queue_close(queue);
    th_store_close(store);
    th_events_destroy(events);
    th_metrics_destroy(metrics);
    th_qreg_destroy(qreg);
    if (failed == NULL) {
        th_log(TH_LOG_INFO, "stopped", 0, NULL);
    }
    return failed == NULL ? 0 : 1;
}
