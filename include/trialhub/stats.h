/* Descriptive statistics for interim reports: n, mean, standard deviation, median, quartiles
 * and the 95% confidence interval of the mean (Student's t), computed on arrays of doubles.
 * Long computations check a context, so a report nobody waits for stops within milliseconds. */
#ifndef TRIALHUB_STATS_H
#define TRIALHUB_STATS_H

#include <stdbool.h>
#include <stddef.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"

typedef struct th_stats {
    size_t n;
    double mean;   /* NaN when n == 0 */
    double sd;     /* sample standard deviation (n - 1); NaN when n < 2 */
    double median; /* NaN when n == 0 */
    double q1, q3; /* quartiles, linear interpolation between closest ranks (R type 7,
                    * Python statistics.quantiles(method="inclusive")); NaN when n == 0 */
    double ci_low; /* mean -/+ t(0.975, n - 1) * sd / sqrt(n); NaN when n < 2 */
    double ci_high;
} th_stats;

/* Summarises values[0..n) (values may be NULL when n == 0), reordering them in place: the order
 * statistics the quartiles need end up at their sorted positions, the rest only partitioned
 * around them (no full sort: O(n) worst case). ctx may be NULL; otherwise it is checked at least
 * every 64k elements of work. Returns 0; TH_EINVAL if a value is NaN or infinite, with values and
 * *out untouched; or th_ctx_err(ctx) (TH_ECANCELED, TH_ETIMEDOUT) with *out untouched and the
 * order of values unspecified. Allocates nothing. Thread-safe (no shared state). */
TH_MUST_CHECK int th_stats_summarize(th_ctx *ctx, double *values, size_t n, th_stats *out);

/* The two-sided 97.5% quantile of Student's t distribution with df degrees of freedom (df >= 1):
 * 12.706 for 1, 2.228 for 10, tending to 1.960; within 1e-9 of the exact value. NaN when
 * df == 0. Thread-safe. */
double th_stats_t975(size_t df);

/* Test hook: places the k-th smallest of values[0..n) (k < n) at values[k], with no greater value
 * before it and no smaller one after it. With fallback_only, every pivot is a median of medians
 * (the worst-case path th_stats_summarize takes after too much quickselect work). Returns 0,
 * TH_EINVAL (k >= n) or th_ctx_err(ctx). */
TH_MUST_CHECK int th__stats_select(th_ctx *ctx, double *values, size_t n, size_t k,
                                   bool fallback_only);

#endif
