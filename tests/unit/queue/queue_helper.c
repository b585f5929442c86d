/* A worker process for test_queue's multi-process test: opens the queue by URL, leases "job"
 * tasks until none is left, heartbeats and finishes each, and prints the id of every task it
 * finished (finish returned 0) on its own line of stdout. In "crash" mode it prints
 * "leased <id>" for the first task it leases and exits abruptly (status 3) holding the lease,
 * as a killed worker would.
 *
 * usage: queue_helper URL OWNER LEASE_MS work|crash */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "trialhub/queue.h"

static int drained(th_queue *q, bool *out)
{
    int64_t counts[TH_TASK_NSTATES];
    int rc = th_queue_counts(th_ctx_background(), q, counts);
    if (rc == 0) {
        *out = counts[TH_TASK_QUEUED] + counts[TH_TASK_RUNNING] + counts[TH_TASK_FAILED] == 0;
    }
    return rc;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: queue_helper URL OWNER LEASE_MS work|crash\n");
        return 2;
    }
    const char *url = argv[1], *owner = argv[2];
    uint32_t lease_ms = (uint32_t)strtoul(argv[3], NULL, 10);
    bool crash = strcmp(argv[4], "crash") == 0;
    th_ctx *bg = th_ctx_background();
    th_queue *q;
    char err[256];
    int rc = th_queue_open(url, NULL, &q, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "%s: open: %s (%s)\n", owner, th_errname(rc), err);
        return 2;
    }
    th_task_kind kind = {"job", 0};
    for (;;) {
        th_task t;
        rc = th_queue_lease(bg, q, &kind, 1, owner, lease_ms, &t);
        if (rc == TH_EAGAIN) {
            bool done = false;
            if (drained(q, &done) == 0 && done) {
                break;
            }
            if (th_queue_wait(bg, q, 1000) != 0) {
                return 2; /* the background context never ends */
            }
            continue;
        }
        if (rc != 0) {
            fprintf(stderr, "%s: lease: %s\n", owner, th_errname(rc));
            return 2;
        }
        if (crash) {
            dprintf(STDOUT_FILENO, "leased %s\n", t.id);
            _exit(3); /* no finish, no close: the lease must expire */
        }
        /* TH_EAGAIN: the database stayed locked past busy_timeout_ms; try again */
        while ((rc = th_queue_heartbeat(bg, q, t.id, owner, t.attempts, lease_ms)) == TH_EAGAIN) {
        }
        if (rc == 0) {
            char result[96];
            snprintf(result, sizeof(result), "{\"by\":\"%s\"}", owner);
            while ((rc = th_queue_finish(bg, q, t.id, owner, t.attempts, result)) == TH_EAGAIN) {
            }
        }
        if (rc == 0) {
            /* unbuffered: the parent reads what was written even after an abrupt exit */
            dprintf(STDOUT_FILENO, "%s\n", t.id);
        } else if (rc != TH_ECONFLICT) { /* a lease lost to a slow commit is allowed */
            fprintf(stderr, "%s: heartbeat/finish: %s\n", owner, th_errname(rc));
            th_task_free(&t);
            return 2;
        }
        th_task_free(&t);
    }
    th_queue_close(q);
    return 0;
}
