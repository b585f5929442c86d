/* th_run(): posix_spawn into a new process group, a poll() loop over the child's pipes and the
 * context's descriptor, and a stop sequence (SIGTERM to the group, SIGKILL after the grace
 * period) that always ends with the child reaped. */
#include "trialhub/runner.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "trialhub/alloc.h"
#include "trialhub/buf.h"
#include "trialhub/clock.h"

void th_run_result_free(th_run_result *res)
{
    if (res) {
        th_free(res->out);
        res->out = NULL;
    }
}

static void keep_tail(th_run_result *res, const char *data, size_t n)
{
    size_t cap = sizeof(res->err_tail) - 1;
    size_t have = strlen(res->err_tail);
    if (n >= cap) {
        memcpy(res->err_tail, data + n - cap, cap);
        res->err_tail[cap] = '\0';
        return;
    }
    if (have + n > cap) {
        size_t drop = have + n - cap;
        memmove(res->err_tail, res->err_tail + drop, have - drop);
        have -= drop;
    }
    memcpy(res->err_tail + have, data, n);
    res->err_tail[have + n] = '\0';
}

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

int th_run(th_ctx *ctx, char *const argv[], const char *stdin_data, size_t stdin_len,
           const th_run_limits *limits, th_run_result *res)
{
    memset(res, 0, sizeof(*res));
    res->exit_code = -1;
    size_t max_out = limits && limits->max_stdout ? limits->max_stdout : (size_t)1 << 20;
    uint64_t grace = limits && limits->grace_ns ? limits->grace_ns : 2 * TH_NS_PER_S;
    uint64_t tick_ns = limits && limits->tick ? limits->tick_ns : 0;
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) {
        for (int i = 0; i < 2; i++) {
            close_fd(&in[i]);
            close_fd(&out[i]);
            close_fd(&err[i]);
        }
        return TH_ESYS;
    }
    /* fork + exec rather than posix_spawn: the child must die with us (PR_SET_PDEATHSIG), or a
     * worker killed with SIGKILL would leave a hanging analyzer running without a deadline.
     * Between fork and exec only async-signal-safe calls. */
    pid_t parent = getpid();
    sigset_t none;
    sigemptyset(&none);
    pid_t pid = fork();
    if (pid == 0) {
        setpgid(0, 0); /* its own group: a stop reaches whatever it starts */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) {
            _exit(127); /* the parent died before prctl */
        }
        struct sigaction dfl = {.sa_handler = SIG_DFL};
        for (int sig = 1; sig < NSIG; sig++) {
            (void)sigaction(sig, &dfl, NULL);
        }
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (dup2(in[0], 0) < 0 || dup2(out[1], 1) < 0 || dup2(err[1], 2) < 0) {
            _exit(127);
        }
        execvp(argv[0], argv);
        static const char msg[] = "cannot start the analyzer\n";
        if (write(2, msg, sizeof(msg) - 1) < 0) {
            /* nothing more to do */
        }
        _exit(127);
    }
    int spawn_rc = pid < 0 ? errno : 0;
    if (pid > 0) {
        setpgid(pid, pid); /* also from here: no race with the first kill(-pid) */
    }
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&err[1]);
    if (spawn_rc != 0) {
        close_fd(&in[1]);
        close_fd(&out[0]);
        close_fd(&err[0]);
        snprintf(res->err_tail, sizeof(res->err_tail), "cannot start %s: %s", argv[0],
                 strerror(spawn_rc));
        return TH_ESYS;
    }
    res->pid = (long)pid;
    /* A descriptor that becomes readable when the child exits (Linux 5.3+), so the loop wakes
     * at its exit instead of polling for it; without one, it looks every 20 ms. */
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    fcntl(in[1], F_SETFL, O_NONBLOCK);
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    int ctx_fd = -1;
    if (th_ctx_fd(ctx, &ctx_fd) != 0) {
        ctx_fd = -1; /* the background context never ends */
    }
    th_buf buf;
    th_buf_init(&buf, 0);
    size_t written = 0;
    if (stdin_len == 0) {
        close_fd(&in[1]);
    }
    int rc = 0;
    bool stopping = false, exited = false;
    uint64_t exited_at = 0;
    uint64_t kill_at = 0, next_tick = tick_ns ? th_clock_after_ns(tick_ns) : 0;
    int status = 0;
    while (!exited) {
        struct pollfd fds[5];
        int n = 0, i_in = -1, i_out = -1, i_err = -1, i_ctx = -1;
        if (pidfd >= 0 && exited_at == 0) {
            fds[n++] = (struct pollfd){pidfd, POLLIN, 0};
        }
        if (in[1] >= 0) {
            fds[i_in = n++] = (struct pollfd){in[1], POLLOUT, 0};
        }
        if (out[0] >= 0) {
            fds[i_out = n++] = (struct pollfd){out[0], POLLIN, 0};
        }
        if (err[0] >= 0) {
            fds[i_err = n++] = (struct pollfd){err[0], POLLIN, 0};
        }
        if (ctx_fd >= 0 && !stopping) {
            fds[i_ctx = n++] = (struct pollfd){ctx_fd, POLLIN, 0};
        }
        /* Pipes closed and no pidfd: the child is exiting; look for it every 20 ms. */
        int timeout_ms = (out[0] < 0 && err[0] < 0 && pidfd < 0) ? 20 : 100;
        if (poll(fds, (nfds_t)n, timeout_ms) < 0 && errno != EINTR) {
            break;
        }
        if (i_in >= 0 && fds[i_in].revents) {
            ssize_t w = write(in[1], stdin_data + written, stdin_len - written);
            if (w > 0) {
                written += (size_t)w;
            }
            if ((w < 0 && errno != EAGAIN) || written == stdin_len) {
                close_fd(&in[1]); /* done, or the child closed its stdin */
            }
        }
        char chunk[16384];
        /* Read until the pipe is empty: a child may write all and exit between two polls. */
        while (out[0] >= 0 && (i_out < 0 || fds[i_out].revents || exited_at)) {
            ssize_t r = read(out[0], chunk, sizeof(chunk));
            if (r > 0) {
                if (buf.len + (size_t)r > max_out) {
                    if (!stopping) {
                        rc = TH_ETOOBIG;
                        stopping = true;
                    }
                } else {
                    th_buf_append(&buf, chunk, (size_t)r);
                }
                continue;
            }
            if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close_fd(&out[0]);
            }
            break;
        }
        while (err[0] >= 0 && (i_err < 0 || fds[i_err].revents || exited_at)) {
            ssize_t r = read(err[0], chunk, sizeof(chunk));
            if (r > 0) {
                keep_tail(res, chunk, (size_t)r);
                res->err_bytes += (size_t)r;
                continue;
            }
            if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close_fd(&err[0]);
            }
            break;
        }
        if (!stopping && th_ctx_done(ctx)) {
            rc = th_ctx_err(ctx);
            stopping = true;
        }
        uint64_t now = th_clock_now_ns();
        if (!stopping && next_tick && now >= next_tick) {
            int t = limits->tick(limits->tick_arg);
            if (t != 0) {
                rc = t;
                stopping = true;
            }
            next_tick = now + tick_ns;
        }
        if (stopping && kill_at == 0) {
            kill(-pid, SIGTERM);
            kill_at = now + grace;
        } else if (stopping && now >= kill_at) {
            kill(-pid, SIGKILL);
            kill_at = UINT64_MAX;
        }
        if (exited_at == 0 && waitpid(pid, &status, WNOHANG) == pid) {
            exited_at = now ? now : 1;
        }
        /* Done once it exited and its pipes are drained to their end; a process it left
         * holding them open gets one second, then the group's SIGKILL below. */
        if (exited_at && ((out[0] < 0 && err[0] < 0) || now - exited_at > TH_NS_PER_S)) {
            exited = true;
        }
    }
    if (exited_at == 0) {
        kill(-pid, SIGKILL);
        (void)waitpid(pid, &status, 0);
    }
    if (pidfd >= 0) {
        close(pidfd);
    }
    /* Whatever else of its group is left (a grandchild), ends with it. */
    kill(-pid, SIGKILL);
    close_fd(&in[1]);
    close_fd(&out[0]);
    close_fd(&err[0]);
    if (WIFEXITED(status)) {
        res->exit_code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        res->term_signal = WTERMSIG(status);
    }
    res->stopped = stopping;
    res->out = th_buf_take(&buf, &res->out_len);
    if (res->out == NULL && rc == 0) {
        rc = TH_ENOMEM;
    }
    return rc;
}
