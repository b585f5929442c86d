/* Shared by the subcommands: settings from flags and the environment, and opening the store. */
#ifndef TRIALHUB_CMD_H
#define TRIALHUB_CMD_H

#include <stdbool.h>

#include "trialhub/store.h"

#define TRIALHUB_VERSION        "0.1.0"
#define TH_DEFAULT_DATABASE_URL "sqlite://./data/trialhub.db"
#define TH_DEFAULT_LISTEN       "127.0.0.1:8080"

/* Returns the value of --name=value or --name value at argv[*i] (advancing *i), or NULL when
 * argv[*i] is not that flag. Exits with status 2 and a message if the value is missing. */
const char *th_cmd_flag(int argc, char **argv, int *i, const char *name);

/* Returns getenv(name) if set and not empty, else fallback. */
const char *th_cmd_env(const char *name, const char *fallback);

/* Parses an unsigned number for a setting; exits with status 2 and a message if it is not one
 * or is outside [min, max]. */
unsigned long th_cmd_number(const char *setting, const char *text, unsigned long min,
                            unsigned long max);

/* Opens the store at url or exits with status 1 and the reason. */
th_store *th_cmd_open_store(const char *url);

int th_cmd_serve(int argc, char **argv);
int th_cmd_token(int argc, char **argv);
int th_cmd_analyze(int argc, char **argv);
int th_cmd_worker(int argc, char **argv);

/* Worker settings shared by `serve` (embedded workers) and `worker` (worker.c). */
typedef struct th_cmd_worker_opts {
    unsigned workers; /* analysis threads; 0: none */
    const char *analyzer;
    const char *blobs;
    unsigned lease_s;
    unsigned task_timeout_s;
    bool webhook_allow_private;
} th_cmd_worker_opts;

struct th_queue;
struct th_blob_store;
struct th_events;
struct th_metrics;
struct th_workers;
/* Fills o from the environment. */
void th_cmd_worker_defaults(th_cmd_worker_opts *o);
/* Takes argv[*i] (and its value) if it is a worker option; returns 1 if it did. */
int th_cmd_worker_options(int argc, char **argv, int *i, th_cmd_worker_opts *o);
/* Starts the workers o describes. Returns 0 or an error (printed). */
int th_cmd_workers_start(const th_cmd_worker_opts *o, th_store *store, struct th_queue *queue,
                         struct th_blob_store *blobs, struct th_events *events,
                         struct th_metrics *metrics, unsigned webhook_threads,
                         struct th_workers **out);

#endif
