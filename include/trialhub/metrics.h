/* Prometheus metrics: counter and histogram families with labels, plus callback families for
 * values that live elsewhere (pool and writer stats), rendered in the text exposition format
 * (version 0.0.4). Updating a series is lock-free once the series exists; a new label
 * combination is added under a mutex. Label values must never carry patient data. */
#ifndef TRIALHUB_METRICS_H
#define TRIALHUB_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "trialhub/buf.h"
#include "trialhub/error.h"

typedef struct th_metrics th_metrics;
typedef struct th_metric th_metric; /* one family */

#define TH_METRIC_MAX_LABELS 4

/* Callback families render their own samples with th_metrics_sample(). */
typedef void (*th_metric_collect_fn)(void *arg, th_metric *family, th_buf *out);

TH_MUST_CHECK int th_metrics_create(th_metrics **out);
void th_metrics_destroy(th_metrics *metrics);

/* Registers a counter family. label_names has nlabels entries (<= TH_METRIC_MAX_LABELS).
 * Strings must outlive the registry (string literals). Returns 0, TH_EINVAL or TH_ENOMEM. */
TH_MUST_CHECK int th_metrics_counter(th_metrics *metrics, const char *name, const char *help,
                                     unsigned nlabels, const char *const *label_names,
                                     th_metric **out);

/* Registers a histogram family with nbounds ascending upper bounds (the +Inf bucket is added). */
TH_MUST_CHECK int th_metrics_histogram(th_metrics *metrics, const char *name, const char *help,
                                       unsigned nlabels, const char *const *label_names,
                                       const double *bounds, unsigned nbounds, th_metric **out);

/* Registers a family whose samples come from fn at render time. type is "gauge" or
 * "counter". */
TH_MUST_CHECK int th_metrics_collector(th_metrics *metrics, const char *name, const char *help,
                                       const char *type, th_metric_collect_fn fn, void *arg);

/* Adds n to the series with these label values (nlabels of them, as registered). Thread-safe;
 * if a new series cannot be allocated the increment is dropped. */
void th_metric_add(th_metric *counter, const char *const *label_values, uint64_t n);

/* Records one observation. Thread-safe. */
void th_metric_observe(th_metric *histogram, const char *const *label_values, double value);

/* For collectors: writes one sample line `name{labels} value`. labels is NULL or a string like
 * `pool="scoring"` (already escaped); suffix is NULL or e.g. "_total". */
void th_metrics_sample(th_buf *out, th_metric *family, const char *suffix, const char *labels,
                       double value);

/* Renders every family into out. Thread-safe. */
void th_metrics_render(th_metrics *metrics, th_buf *out);

#endif
