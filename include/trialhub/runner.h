/* Running an external program (an image analyzer) under a context: its own process group, a
 * request on stdin, its stdout captured up to a bound, the tail of its stderr kept for the log,
 * and when the context ends (deadline, cancel, shutdown) SIGTERM to the whole group, then
 * SIGKILL after a grace period. Nothing of the child outlives the call. */
#ifndef TRIALHUB_RUNNER_H
#define TRIALHUB_RUNNER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"

typedef struct th_run_limits {
    size_t max_stdout; /* more output fails the run (TH_ETOOBIG); 0: 1 MiB */
    uint64_t grace_ns; /* SIGTERM to SIGKILL; 0: 2 s */
    uint64_t tick_ns;  /* how often tick() is called while the child runs; 0: never */
    /* Called on the caller's thread every tick_ns; a non-zero return stops the child as a
     * cancel would (the task was canceled elsewhere, its lease was lost...). */
    int (*tick)(void *arg);
    void *tick_arg;
} th_run_limits;

typedef struct th_run_result {
    int exit_code;   /* when it exited; -1 otherwise */
    int term_signal; /* when a signal ended it; 0 otherwise */
    bool stopped;    /* we stopped it (context ended, tick asked, output too large) */
    char *out;       /* stdout, NUL-terminated (th_free); NULL on error */
    size_t out_len;
    char err_tail[512]; /* the last bytes of stderr, NUL-terminated (may hold anything the
                         * program printed: never log it) */
    size_t err_bytes;   /* bytes it wrote to stderr */
    long pid;           /* the child's pid (tests check it is gone) */
} th_run_result;

/* Runs argv[0] (a path, or a name looked up in PATH) with argv, writes stdin_data to its stdin
 * and closes it, and waits for it to exit. Returns 0 when it ran to its end (see exit_code /
 * term_signal), th_ctx_err(ctx) when the context ended first, the tick's code when tick asked
 * to stop, TH_ETOOBIG when stdout passed the limit (in those three cases the process group got
 * SIGTERM, then SIGKILL after the grace period, and is reaped), TH_ESYS when it could not be
 * started, or TH_ENOMEM. *res is filled in every case except TH_ENOMEM before the start; free it
 * with th_run_result_free(). Thread-safe. SIGPIPE must be ignored by the process. */
TH_MUST_CHECK int th_run(th_ctx *ctx, char *const argv[], const char *stdin_data, size_t stdin_len,
                         const th_run_limits *limits, th_run_result *res);

void th_run_result_free(th_run_result *res);

#endif
