/* The event hub: a fixed array of sinks and a publish that builds each event once and hands a
 * reference to every sink. Locking: `mu` protects the sink array and is held while sinks run,
 * so that unsubscribe returns only once its sink can no longer be called; sinks are quick
 * (they queue) and never call back into the hub. `nsinks` is also kept in an atomic so that
 * publishers skip all work while nobody listens. */
#include "trialhub/events.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "trialhub/alloc.h"
#include "trialhub/buf.h"
#include "trialhub/clock.h"

typedef struct sink {
    th_event_sink_fn fn;
    void *arg;
} sink;

struct th_events {
    pthread_mutex_t mu;
    sink sinks[TH_EVENTS_MAX_SINKS]; /* under mu */
    atomic_uint nsinks;              /* written under mu */
    th_metric *m_published;
};

int th_events_create(th_metrics *metrics, th_events **out)
{
    th_events *ev = th_calloc(1, sizeof(*ev));
    if (ev == NULL) {
        return TH_ENOMEM;
    }
    if (metrics) {
        static const char *const labels[] = {"type"};
        int rc = th_metrics_counter(metrics, "trialhub_events_published_total",
                                    "Live events published to at least one listener, by type.", 1,
                                    labels, &ev->m_published);
        if (rc != 0) {
            th_free(ev);
            return rc;
        }
    }
    pthread_mutex_init(&ev->mu, NULL);
    *out = ev;
    return 0;
}

void th_events_destroy(th_events *ev)
{
    if (ev == NULL) {
        return;
    }
    pthread_mutex_destroy(&ev->mu);
    th_free(ev);
}

int th_events_subscribe(th_events *ev, th_event_sink_fn fn, void *arg)
{
    pthread_mutex_lock(&ev->mu);
    unsigned n = atomic_load(&ev->nsinks);
    if (n == TH_EVENTS_MAX_SINKS) {
        pthread_mutex_unlock(&ev->mu);
        return TH_EOVERLOAD;
    }
    ev->sinks[n] = (sink){fn, arg};
    atomic_store(&ev->nsinks, n + 1);
    pthread_mutex_unlock(&ev->mu);
    return 0;
}

void th_events_unsubscribe(th_events *ev, th_event_sink_fn fn, void *arg)
{
    pthread_mutex_lock(&ev->mu);
    unsigned n = atomic_load(&ev->nsinks);
    for (unsigned i = 0; i < n; i++) {
        if (ev->sinks[i].fn == fn && ev->sinks[i].arg == arg) {
            ev->sinks[i] = ev->sinks[n - 1];
            atomic_store(&ev->nsinks, n - 1);
            break;
        }
    }
    pthread_mutex_unlock(&ev->mu);
}

bool th_events_active(th_events *ev)
{
    return ev != NULL && atomic_load_explicit(&ev->nsinks, memory_order_relaxed) > 0;
}

void th_event_ref(th_event *e)
{
    atomic_fetch_add_explicit(&e->refs, 1, memory_order_relaxed);
}

void th_event_unref(th_event *e)
{
    if (e != NULL && atomic_fetch_sub_explicit(&e->refs, 1, memory_order_acq_rel) == 1) {
        th_free(e);
    }
}

void th_events_format_time(uint64_t wall_ns, char *out, size_t outlen)
{
    time_t secs = (time_t)(wall_ns / TH_NS_PER_S);
    struct tm tm;
    gmtime_r(&secs, &tm);
    char day[24];
    if (strftime(day, sizeof(day), "%Y-%m-%dT%H:%M:%S", &tm) == 0) {
        day[0] = '\0';
    }
    snprintf(out, outlen, "%s.%03uZ", day, (unsigned)(wall_ns % TH_NS_PER_S / TH_NS_PER_MS));
}

static void copy_id(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

void th_events_publish(th_events *ev, const char *topic, const char *type, const char *trial_id,
                       const char *site_id, const char *fields_json)
{
    if (!th_events_active(ev)) {
        return;
    }
    char at[40];
    th_events_format_time(th_clock_wall_ns(), at, sizeof(at));
    char stack[512];
    th_buf b;
    th_buf_init_with(&b, stack, sizeof(stack), 0);
    th_buf_puts(&b, "{\"topic\":");
    th_buf_json_str(&b, topic);
    th_buf_puts(&b, ",\"type\":");
    th_buf_json_str(&b, type);
    th_buf_printf(&b, ",\"at\":\"%s\"", at);
    if (fields_json && fields_json[0]) {
        th_buf_puts(&b, ",");
        th_buf_puts(&b, fields_json);
    }
    th_buf_puts(&b, "}");
    th_event *e = th_buf_failed(&b) ? NULL : th_malloc(sizeof(*e) + b.len + 1);
    if (e == NULL) {
        th_buf_free(&b);
        return;
    }
    atomic_init(&e->refs, 1);
    copy_id(e->topic, sizeof(e->topic), topic);
    copy_id(e->trial_id, sizeof(e->trial_id), trial_id);
    copy_id(e->site_id, sizeof(e->site_id), site_id);
    e->len = b.len;
    memcpy(e->json, b.data, b.len + 1);
    th_buf_free(&b);

    pthread_mutex_lock(&ev->mu);
    unsigned n = atomic_load(&ev->nsinks);
    for (unsigned i = 0; i < n; i++) {
        th_event_ref(e);
        ev->sinks[i].fn(ev->sinks[i].arg, e);
    }
    pthread_mutex_unlock(&ev->mu);
    if (n > 0 && ev->m_published) {
        const char *labels[] = {type};
        th_metric_add(ev->m_published, labels, 1);
    }
    th_event_unref(e);
}
