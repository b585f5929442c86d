/* The hang-up watcher: while a request is suspended (a report being computed), libmicrohttpd does
 * not look at its socket, so a client that closes the page would only be noticed when the answer
 * is written. This thread watches the sockets of such requests with epoll for EPOLLRDHUP/EPOLLHUP
 * and calls the request's callback at once, which cancels the work.
 *
 * Locking: `mu` protects the slot table. The callback runs under `mu`, so th__hangup_unwatch()
 * returning means the callback is not running and will not run: the owner may then resume the
 * request (after which libmicrohttpd may close and reuse the descriptor). Epoll events carry a
 * slot index and a generation, never a pointer, so a stale event is recognised and dropped.
 * Lock order: mu -> whatever the callback takes (the report service's mutex). */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/core_int.h"
#include "http/http_int.h"
#include "trialhub/alloc.h"

#define HANGUP_SLOTS 1024

typedef struct slot {
    int fd; /* -1: free */
    uint32_t gen;
    void (*fn)(void *arg);
    void *arg;
} slot;

struct th_hangup {
    int epfd;
    int wakefd;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    slot slots[HANGUP_SLOTS]; /* under mu */
    bool stop;                /* under mu */
};

static void *hangup_main(void *arg)
{
    th_hangup *h = arg;
    struct epoll_event evs[32];
    for (;;) {
        int n = epoll_wait(h->epfd, evs, 32, -1);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        pthread_mutex_lock(&h->mu);
        if (h->stop) {
            pthread_mutex_unlock(&h->mu);
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            if (tag == UINT64_MAX) {
                continue; /* the wake-up descriptor */
            }
            uint32_t index = (uint32_t)(tag >> 32), gen = (uint32_t)tag;
            slot *s = index < HANGUP_SLOTS ? &h->slots[index] : NULL;
            if (s == NULL || s->fd < 0 || s->gen != gen) {
                continue; /* unwatched since */
            }
            /* Fire once: the slot is emptied; the owner's unwatch finds it gone. */
            (void)epoll_ctl(h->epfd, EPOLL_CTL_DEL, s->fd, NULL);
            s->fd = -1;
            s->fn(s->arg);
        }
        pthread_mutex_unlock(&h->mu);
    }
}

int th__hangup_create(th_hangup **out)
{
    th_hangup *h = th_calloc(1, sizeof(*h));
    if (h == NULL) {
        return TH_ENOMEM;
    }
    for (size_t i = 0; i < HANGUP_SLOTS; i++) {
        h->slots[i].fd = -1;
    }
    pthread_mutex_init(&h->mu, NULL);
    h->epfd = epoll_create1(EPOLL_CLOEXEC);
    h->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    int rc = h->epfd >= 0 && h->wakefd >= 0 ? 0 : TH_ESYS;
    if (rc == 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
        rc = epoll_ctl(h->epfd, EPOLL_CTL_ADD, h->wakefd, &ev) == 0 ? 0 : TH_ESYS;
    }
    if (rc == 0) {
        rc = th__thread_start(&h->thread, "th-http-hangup", hangup_main, h);
    }
    if (rc != 0) {
        th__hangup_destroy(h);
        return rc;
    }
    h->started = true;
    *out = h;
    return 0;
}

void th__hangup_destroy(th_hangup *h)
{
    if (h == NULL) {
        return;
    }
    if (h->started) {
        pthread_mutex_lock(&h->mu);
        h->stop = true;
        pthread_mutex_unlock(&h->mu);
        uint64_t one = 1;
        if (write(h->wakefd, &one, sizeof(one)) != (ssize_t)sizeof(one)) {
            /* the counter is full: the thread is awake anyway */
        }
        pthread_join(h->thread, NULL);
    }
    if (h->epfd >= 0) {
        close(h->epfd);
    }
    if (h->wakefd >= 0) {
        close(h->wakefd);
    }
    pthread_mutex_destroy(&h->mu);
    th_free(h);
}

int th__hangup_watch(th_hangup *h, int fd, void (*fn)(void *arg), void *arg, uint64_t *handle)
{
    pthread_mutex_lock(&h->mu);
    int rc = TH_EOVERLOAD;
    for (uint32_t i = 0; i < HANGUP_SLOTS; i++) {
        slot *s = &h->slots[i];
        if (s->fd >= 0) {
            continue;
        }
        s->gen++;
        struct epoll_event ev = {.events = EPOLLRDHUP | EPOLLHUP | EPOLLERR,
                                 .data.u64 = (uint64_t)i << 32 | s->gen};
        if (epoll_ctl(h->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
            rc = TH_ESYS;
            break;
        }
        s->fd = fd;
        s->fn = fn;
        s->arg = arg;
        *handle = ev.data.u64;
        rc = 0;
        break;
    }
    pthread_mutex_unlock(&h->mu);
    return rc;
}

bool th__hangup_unwatch(th_hangup *h, uint64_t handle)
{
    uint32_t index = (uint32_t)(handle >> 32), gen = (uint32_t)handle;
    pthread_mutex_lock(&h->mu);
    slot *s = index < HANGUP_SLOTS ? &h->slots[index] : NULL;
    bool removed = s && s->fd >= 0 && s->gen == gen;
    if (removed) {
        (void)epoll_ctl(h->epfd, EPOLL_CTL_DEL, s->fd, NULL);
        s->fd = -1;
    }
    pthread_mutex_unlock(&h->mu);
    return removed;
}
