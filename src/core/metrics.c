/* Metrics registry. Each family keeps an append-only, lock-free-readable list of series (one
 * per label combination); a series holds atomic counters. Lookup walks the short list and
 * compares label values; inserts take the family's mutex and re-check.
 *
 * Locking: `mu` (per family) serialises series inserts; readers and updaters traverse the list
 * through atomic `next` pointers without it. The registry's family list is built before the
 * server starts and then only read. */
#include "trialhub/metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "trialhub/alloc.h"

enum kind { K_COUNTER, K_HISTOGRAM, K_COLLECTOR };

typedef struct series {
    struct series *_Atomic next;
    char *values[TH_METRIC_MAX_LABELS];
    _Atomic uint64_t count;     /* counter value, or histogram observation count */
    _Atomic uint64_t sum_bits;  /* histogram sum as double bits */
    _Atomic uint64_t buckets[]; /* histogram: nbounds entries (cumulative at render) */
} series;

struct th_metric {
    th_metric *next;
    enum kind kind;
    const char *name;
    const char *help;
    const char *type;
    unsigned nlabels;
    const char *labels[TH_METRIC_MAX_LABELS];
    double *bounds;
    unsigned nbounds;
    th_metric_collect_fn fn;
    void *arg;
    pthread_mutex_t mu;
    series *_Atomic head;
};

struct th_metrics {
    pthread_mutex_t mu;
    th_metric *first;
    th_metric *last;
};

int th_metrics_create(th_metrics **out)
{
    th_metrics *m = th_calloc(1, sizeof(*m));
    if (m == NULL) {
        return TH_ENOMEM;
    }
    pthread_mutex_init(&m->mu, NULL);
    *out = m;
    return 0;
}

static void series_free(series *s, unsigned nlabels)
{
    for (unsigned i = 0; i < nlabels; i++) {
        th_free(s->values[i]);
    }
    th_free(s);
}

void th_metrics_destroy(th_metrics *m)
{
    if (m == NULL) {
        return;
    }
    th_metric *f = m->first;
    while (f) {
        th_metric *next = f->next;
        series *s = atomic_load(&f->head);
        while (s) {
            series *sn = atomic_load(&s->next);
            series_free(s, f->nlabels);
            s = sn;
        }
        pthread_mutex_destroy(&f->mu);
        th_free(f->bounds);
        th_free(f);
        f = next;
    }
    pthread_mutex_destroy(&m->mu);
    th_free(m);
}

static int family_new(th_metrics *m, enum kind kind, const char *name, const char *help,
                      unsigned nlabels, const char *const *label_names, th_metric **out)
{
    if (name == NULL || help == NULL || nlabels > TH_METRIC_MAX_LABELS) {
        return TH_EINVAL;
    }
    th_metric *f = th_calloc(1, sizeof(*f));
    if (f == NULL) {
        return TH_ENOMEM;
    }
    f->kind = kind;
    f->name = name;
    f->help = help;
    f->nlabels = nlabels;
    for (unsigned i = 0; i < nlabels; i++) {
        f->labels[i] = label_names[i];
    }
    pthread_mutex_init(&f->mu, NULL);
    pthread_mutex_lock(&m->mu);
    if (m->last) {
        m->last->next = f;
    } else {
        m->first = f;
    }
    m->last = f;
    pthread_mutex_unlock(&m->mu);
    *out = f;
    return 0;
}

int th_metrics_counter(th_metrics *m, const char *name, const char *help, unsigned nlabels,
                       const char *const *label_names, th_metric **out)
{
    int rc = family_new(m, K_COUNTER, name, help, nlabels, label_names, out);
    if (rc == 0) {
        (*out)->type = "counter";
    }
    return rc;
}

int th_metrics_histogram(th_metrics *m, const char *name, const char *help, unsigned nlabels,
                         const char *const *label_names, const double *bounds, unsigned nbounds,
                         th_metric **out)
{
    if (nbounds == 0 || bounds == NULL) {
        return TH_EINVAL;
    }
    for (unsigned i = 1; i < nbounds; i++) {
        if (!(bounds[i] > bounds[i - 1])) {
            return TH_EINVAL;
        }
    }
    double *copy = th_calloc(nbounds, sizeof(double));
    if (copy == NULL) {
        return TH_ENOMEM;
    }
    memcpy(copy, bounds, nbounds * sizeof(double));
    th_metric *f;
    int rc = family_new(m, K_HISTOGRAM, name, help, nlabels, label_names, &f);
    if (rc != 0) {
        th_free(copy);
        return rc;
    }
    f->type = "histogram";
    f->bounds = copy;
    f->nbounds = nbounds;
    *out = f;
    return 0;
}

int th_metrics_collector(th_metrics *m, const char *name, const char *help, const char *type,
                         th_metric_collect_fn fn, void *arg)
{
    th_metric *f;
    int rc = family_new(m, K_COLLECTOR, name, help, 0, NULL, &f);
    if (rc == 0) {
        f->type = type;
        f->fn = fn;
        f->arg = arg;
    }
    return rc;
}

static bool series_matches(const series *s, unsigned nlabels, const char *const *values)
{
    for (unsigned i = 0; i < nlabels; i++) {
        if (strcmp(s->values[i], values[i]) != 0) {
            return false;
        }
    }
    return true;
}

static series *series_get(th_metric *f, const char *const *values)
{
    for (series *s = atomic_load_explicit(&f->head, memory_order_acquire); s;
         s = atomic_load_explicit(&s->next, memory_order_acquire)) {
        if (series_matches(s, f->nlabels, values)) {
            return s;
        }
    }
    pthread_mutex_lock(&f->mu);
    series *s;
    for (s = atomic_load(&f->head); s; s = atomic_load(&s->next)) {
        if (series_matches(s, f->nlabels, values)) {
            pthread_mutex_unlock(&f->mu);
            return s;
        }
    }
    size_t nbuckets = f->kind == K_HISTOGRAM ? f->nbounds : 0;
    s = th_calloc(1, sizeof(*s) + nbuckets * sizeof(_Atomic uint64_t));
    bool ok = s != NULL;
    for (unsigned i = 0; ok && i < f->nlabels; i++) {
        size_t n = strlen(values[i]);
        s->values[i] = th_malloc(n + 1);
        ok = s->values[i] != NULL;
        if (ok) {
            memcpy(s->values[i], values[i], n + 1);
        }
    }
    if (!ok) {
        if (s) {
            series_free(s, f->nlabels);
        }
        pthread_mutex_unlock(&f->mu);
        return NULL;
    }
    atomic_store(&s->next, atomic_load(&f->head));
    atomic_store_explicit(&f->head, s, memory_order_release);
    pthread_mutex_unlock(&f->mu);
    return s;
}

void th_metric_add(th_metric *f, const char *const *values, uint64_t n)
{
    series *s = series_get(f, values);
    if (s) {
        atomic_fetch_add_explicit(&s->count, n, memory_order_relaxed);
    }
}

void th_metric_observe(th_metric *f, const char *const *values, double value)
{
    series *s = series_get(f, values);
    if (s == NULL) {
        return;
    }
    for (unsigned i = 0; i < f->nbounds; i++) {
        if (value <= f->bounds[i]) {
            atomic_fetch_add_explicit(&s->buckets[i], 1, memory_order_relaxed);
            break;
        }
    }
    atomic_fetch_add_explicit(&s->count, 1, memory_order_relaxed);
    uint64_t old = atomic_load_explicit(&s->sum_bits, memory_order_relaxed);
    for (;;) {
        double sum;
        memcpy(&sum, &old, sizeof(sum));
        sum += value;
        uint64_t bits;
        memcpy(&bits, &sum, sizeof(bits));
        if (atomic_compare_exchange_weak_explicit(&s->sum_bits, &old, bits, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            break;
        }
    }
}

static void put_label_value(th_buf *out, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"') {
            th_buf_append(out, "\\", 1);
            th_buf_append(out, v, 1);
        } else if (*v == '\n') {
            th_buf_puts(out, "\\n");
        } else {
            th_buf_append(out, v, 1);
        }
    }
}

static void put_value(th_buf *out, double value)
{
    if (isnan(value)) {
        th_buf_puts(out, "NaN");
    } else if (isinf(value)) {
        th_buf_puts(out, value > 0 ? "+Inf" : "-Inf");
    } else if (value == (double)(int64_t)value && fabs(value) < 1e15) {
        th_buf_printf(out, "%lld", (long long)value);
    } else {
        th_buf_printf(out, "%.9g", value);
    }
}

void th_metrics_sample(th_buf *out, th_metric *f, const char *suffix, const char *labels,
                       double value)
{
    th_buf_puts(out, f->name);
    if (suffix) {
        th_buf_puts(out, suffix);
    }
    if (labels && *labels) {
        th_buf_printf(out, "{%s}", labels);
    }
    th_buf_puts(out, " ");
    put_value(out, value);
    th_buf_puts(out, "\n");
}

/* Writes {a="x",b="y"[,le="..."]}; `le` is NULL except for buckets. */
static void put_labels(th_buf *out, th_metric *f, const series *s, const char *le)
{
    if (f->nlabels == 0 && le == NULL) {
        return;
    }
    th_buf_puts(out, "{");
    for (unsigned i = 0; i < f->nlabels; i++) {
        th_buf_printf(out, "%s%s=\"", i ? "," : "", f->labels[i]);
        put_label_value(out, s->values[i]);
        th_buf_puts(out, "\"");
    }
    if (le) {
        th_buf_printf(out, "%sle=\"%s\"", f->nlabels ? "," : "", le);
    }
    th_buf_puts(out, "}");
}

void th_metrics_render(th_metrics *m, th_buf *out)
{
    pthread_mutex_lock(&m->mu);
    th_metric *first = m->first;
    pthread_mutex_unlock(&m->mu);
    for (th_metric *f = first; f; f = f->next) {
        th_buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", f->name, f->help, f->name, f->type);
        if (f->kind == K_COLLECTOR) {
            f->fn(f->arg, f, out);
            continue;
        }
        for (series *s = atomic_load(&f->head); s; s = atomic_load(&s->next)) {
            if (f->kind == K_COUNTER) {
                th_buf_puts(out, f->name);
                put_labels(out, f, s, NULL);
                th_buf_printf(out, " %llu\n", (unsigned long long)atomic_load(&s->count));
                continue;
            }
            uint64_t cumulative = 0;
            for (unsigned i = 0; i < f->nbounds; i++) {
                cumulative += atomic_load(&s->buckets[i]);
                char le[32];
                snprintf(le, sizeof(le), "%g", f->bounds[i]);
                th_buf_printf(out, "%s_bucket", f->name);
                put_labels(out, f, s, le);
                th_buf_printf(out, " %llu\n", (unsigned long long)cumulative);
            }
            uint64_t count = atomic_load(&s->count);
            th_buf_printf(out, "%s_bucket", f->name);
            put_labels(out, f, s, "+Inf");
            th_buf_printf(out, " %llu\n", (unsigned long long)count);
            uint64_t bits = atomic_load(&s->sum_bits);
            double sum;
            memcpy(&sum, &bits, sizeof(sum));
            th_buf_printf(out, "%s_sum", f->name);
            put_labels(out, f, s, NULL);
            th_buf_puts(out, " ");
            put_value(out, sum);
            th_buf_printf(out, "\n%s_count", f->name);
            put_labels(out, f, s, NULL);
            th_buf_printf(out, " %llu\n", (unsigned long long)count);
        }
    }
}
