/* Descriptive statistics for interim reports (include/trialhub/stats.h): compensated two-pass
 * mean and standard deviation over values scaled by a power of two, quartiles by selecting only
 * the order statistics they need (introselect, O(n) worst case, no allocation), and Student's t
 * quantile from the exact finite series of the t distribution for integer degrees of freedom.
 *
 * Every loop over the data works in chunks and looks at the context between them, so a report
 * nobody waits for stops within one chunk's worth of work. */
#include "trialhub/stats.h"

#include <assert.h>
#include <float.h>
#include <math.h>
#include <stdint.h>

/* Loops work in chunks of at most CHUNK elements and look at the context once CHUNK elements of
 * work have accumulated, so fewer than 2 * CHUNK (32k, within the promised 64k) pass between two
 * looks. */
#define CHUNK ((size_t)16384)

/* Ranges this small are insertion sorted instead of partitioned. */
#define SMALL_RANGE ((size_t)16)

/* Quickselect with ninther pivots may partition BUDGET_FACTOR * n elements in total; after that,
 * ranges larger than what is left of the budget take a median-of-medians pivot, which guarantees
 * that a range shrinks to 7/10 per partition. The up to six ranks of the quartiles cost about 4n
 * on random data (at most 5.4n in 6000 trials of 200 to 10,000 values; 3.3n to 3.8n on sorted,
 * reversed, organ-pipe and 28-valued data), so only inputs built against the pivot rule reach the
 * fallback, and for them the total stays linear: at most BUDGET_FACTOR * n plus a geometric
 * series per rank. */
#define BUDGET_FACTOR ((size_t)8)

/* Student's t quantiles for df above this come from the Cornish-Fisher expansion (its error is
 * below 1e-13 there); up to it, from the exact series, O(df) per evaluation. */
#define T_SERIES_MAX_DF ((size_t)1000)

/* The 97.5% quantile of the standard normal distribution. */
#define Z975 1.959963984540054

#define PI 3.14159265358979323846

typedef struct select_state {
    th_ctx *ctx;      /* may be NULL */
    size_t unchecked; /* elements of work since the last look at ctx */
    size_t budget;    /* elements quickselect may still partition around a ninther */
} select_state;

/* Counts work elements of work; once a chunk's worth has accumulated, returns the context's
 * error (0 while it is live). */
static int tick(select_state *st, size_t work)
{
    st->unchecked += work;
    if (st->unchecked < CHUNK) {
        return 0;
    }
    st->unchecked = 0;
    return st->ctx != NULL ? th_ctx_err(st->ctx) : 0;
}

/* ---- mean and standard deviation --------------------------------------------------------- */

/* Neumaier's compensated sum: the running rounding error is kept in comp and added at the end,
 * so the result does not depend on the order or the number of terms (to first order). */
typedef struct csum {
    double sum;
    double comp;
} csum;

static inline void csum_add(csum *cs, double x)
{
    double t = cs->sum + x;
    if (fabs(cs->sum) >= fabs(x)) {
        cs->comp += (cs->sum - t) + x;
    } else {
        cs->comp += (x - t) + cs->sum;
    }
    cs->sum = t;
}

/* Sets *max_abs to the largest magnitude in v[0..n) and *finite to whether all are finite
 * (stopping at the first chunk with a NaN or an infinity). */
static int scan_values(select_state *st, const double *v, size_t n, double *max_abs, bool *finite)
{
    double max = 0.0;
    for (size_t lo = 0; lo < n; lo += CHUNK) {
        size_t hi = n - lo < CHUNK ? n : lo + CHUNK;
        bool chunk_finite = true;
        for (size_t i = lo; i < hi; i++) {
            double a = fabs(v[i]);
            chunk_finite &= a <= DBL_MAX; /* false for NaN and infinities */
            max = a > max ? a : max;
        }
        if (!chunk_finite) {
            *finite = false;
            return 0;
        }
        int err = tick(st, hi - lo);
        if (err != 0) {
            return err;
        }
    }
    *max_abs = max;
    *finite = true;
    return 0;
}

/* Sets *mean and *sd (NaN when n < 2) of v[0..n), n >= 1. The sums run over v[i] * scale, a power
 * of two that brings the largest magnitude into [0.5, 1): exact, and it keeps squares of
 * deviations from overflowing (values near DBL_MAX) or underflowing (values near 1e-200). The
 * variance is the corrected two-pass formula (Chan, Golub and LeVeque): sum((x - mean)^2) minus
 * (sum(x - mean))^2 / n, which also removes the first-order effect of rounding in the mean, so a
 * large offset (1e9 + small spread) costs no accuracy. */
static int mean_sd(select_state *st, const double *v, size_t n, double max_abs, double *mean,
                   double *sd)
{
    int exp2 = 0;
    if (max_abs > 0.0) {
        (void)frexp(max_abs, &exp2);
    }
    exp2 = exp2 > 1000 ? 1000 : exp2 < -1000 ? -1000 : exp2; /* keep both factors normal */
    double scale = ldexp(1.0, -exp2);
    double unscale = ldexp(1.0, exp2);

    csum total = {0.0, 0.0};
    for (size_t lo = 0; lo < n; lo += CHUNK) {
        size_t hi = n - lo < CHUNK ? n : lo + CHUNK;
        for (size_t i = lo; i < hi; i++) {
            csum_add(&total, v[i] * scale);
        }
        int err = tick(st, hi - lo);
        if (err != 0) {
            return err;
        }
    }
    double scaled_mean = (total.sum + total.comp) / (double)n;
    *mean = scaled_mean * unscale;
    if (n < 2) {
        *sd = NAN;
        return 0;
    }

    double dev_sum = 0.0;
    csum sq = {0.0, 0.0};
    for (size_t lo = 0; lo < n; lo += CHUNK) {
        size_t hi = n - lo < CHUNK ? n : lo + CHUNK;
        for (size_t i = lo; i < hi; i++) {
            double dev = v[i] * scale - scaled_mean;
            dev_sum += dev;
            csum_add(&sq, dev * dev);
        }
        int err = tick(st, hi - lo);
        if (err != 0) {
            return err;
        }
    }
    double ss = (sq.sum + sq.comp) - dev_sum * dev_sum / (double)n;
    *sd = sqrt(ss > 0.0 ? ss / (double)(n - 1) : 0.0) * unscale;
    return 0;
}

/* ---- selection --------------------------------------------------------------------------- */

static void insertion_sort(double *a, size_t lo, size_t hi)
{
    for (size_t i = lo + 1; i < hi; i++) {
        double x = a[i];
        size_t j = i;
        while (j > lo && a[j - 1] > x) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = x;
    }
}

static double median3(double a, double b, double c)
{
    if (a < b) {
        if (b < c) {
            return b;
        }
        return a < c ? c : a;
    }
    if (a < c) {
        return a;
    }
    return b < c ? c : b;
}

/* Tukey's ninther of a[lo..hi) (median of three for short ranges): sorted, reversed and
 * organ-pipe inputs get a pivot close to the median. */
static double ninther(const double *a, size_t lo, size_t hi)
{
    size_t n = hi - lo;
    size_t mid = lo + n / 2;
    if (n < 128) {
        return median3(a[lo], a[mid], a[hi - 1]);
    }
    size_t d = n / 8;
    return median3(median3(a[lo], a[lo + d], a[lo + 2 * d]),
                   median3(a[mid - d], a[mid], a[mid + d]),
                   median3(a[hi - 1 - 2 * d], a[hi - 1 - d], a[hi - 1]));
}

/* Dijkstra's three-way partition of a[lo..hi) around pivot: afterwards a[lo..*eq_lo) < pivot,
 * a[*eq_lo..*eq_hi) == pivot, a[*eq_hi..hi) > pivot. The equal band is what keeps many
 * duplicates (a 0-27 score has only 28 values) from degrading the selection. */
static int partition3(select_state *st, double *a, size_t lo, size_t hi, double pivot,
                      size_t *eq_lo, size_t *eq_hi)
{
    size_t lt = lo, i = lo, gt = hi;
    while (i < gt) {
        size_t steps = gt - i < CHUNK ? gt - i : CHUNK;
        /* Each step takes one element out of the unclassified a[i..gt). */
        for (size_t step = 0; step < steps; step++) {
            double x = a[i];
            if (x < pivot) {
                a[i] = a[lt];
                a[lt] = x;
                lt++;
                i++;
            } else if (x > pivot) {
                gt--;
                a[i] = a[gt];
                a[gt] = x;
            } else {
                i++;
            }
        }
        int err = tick(st, steps);
        if (err != 0) {
            return err;
        }
    }
    *eq_lo = lt;
    *eq_hi = gt;
    return 0;
}

static int select_ranks(select_state *st, double *a, size_t lo, size_t hi, const size_t *ranks,
                        size_t nranks);

/* The median of the medians of groups of five of a[lo..hi), hi - lo > SMALL_RANGE: at least 3/10
 * of the range is <= it and at least 3/10 is >= it. The medians are gathered at the front of the
 * range and selected among recursively. */
static int mom_pivot(select_state *st, double *a, size_t lo, size_t hi, double *pivot)
{
    size_t nmedians = 0;
    for (size_t group = lo; hi - group >= 5; group += 5) {
        insertion_sort(a, group, group + 5);
        double median = a[group + 2];
        a[group + 2] = a[lo + nmedians];
        a[lo + nmedians] = median;
        nmedians++;
        int err = tick(st, 5);
        if (err != 0) {
            return err;
        }
    }
    size_t rank = lo + nmedians / 2;
    int err = select_ranks(st, a, lo, lo + nmedians, &rank, 1);
    if (err != 0) {
        return err;
    }
    *pivot = a[rank];
    return 0;
}

/* Places the order statistics ranks[0..nranks) (ascending, distinct, within [lo, hi)) of
 * a[lo..hi) at their sorted positions, with no greater value before and no smaller value after
 * each. Recursion only where the ranks split across both sides, so its depth is bounded by the
 * number of ranks (and by log5(n) in the median-of-medians pivots). */
static int select_ranks(select_state *st, double *a, size_t lo, size_t hi, const size_t *ranks,
                        size_t nranks)
{
    while (nranks > 0) {
        assert(lo <= ranks[0] && ranks[nranks - 1] < hi);
        size_t n = hi - lo;
        if (n <= SMALL_RANGE) {
            insertion_sort(a, lo, hi);
            return tick(st, n);
        }
        double pivot;
        if (st->budget >= n) {
            st->budget -= n;
            pivot = ninther(a, lo, hi);
        } else {
            int err = mom_pivot(st, a, lo, hi, &pivot);
            if (err != 0) {
                return err;
            }
        }
        size_t eq_lo, eq_hi;
        int err = partition3(st, a, lo, hi, pivot, &eq_lo, &eq_hi);
        if (err != 0) {
            return err;
        }
        /* The pivot is a value of the range, so the equal band is not empty and both sides are
         * strictly shorter than n. Ranks inside the band are placed. */
        size_t nleft = 0;
        while (nleft < nranks && ranks[nleft] < eq_lo) {
            nleft++;
        }
        size_t first_right = nleft;
        while (first_right < nranks && ranks[first_right] < eq_hi) {
            first_right++;
        }
        if (first_right == nranks) { /* nothing right of the band: continue left */
            hi = eq_lo;
            nranks = nleft;
            continue;
        }
        if (nleft > 0) {
            err = select_ranks(st, a, lo, eq_lo, ranks, nleft);
            if (err != 0) {
                return err;
            }
        }
        lo = eq_hi;
        ranks += first_right;
        nranks -= first_right;
    }
    return 0;
}

static size_t select_budget(size_t n)
{
    return n <= SIZE_MAX / BUDGET_FACTOR ? n * BUDGET_FACTOR : SIZE_MAX;
}

int th__stats_select(th_ctx *ctx, double *values, size_t n, size_t k, bool fallback_only)
{
    if (k >= n) {
        return TH_EINVAL;
    }
    select_state st = {.ctx = ctx, .budget = fallback_only ? 0 : select_budget(n)};
    int err = ctx != NULL ? th_ctx_err(ctx) : 0;
    return err != 0 ? err : select_ranks(&st, values, 0, n, &k, 1);
}

/* ---- quartiles --------------------------------------------------------------------------- */

/* The position (n - 1) * quarters / 4 of R's type 7 as rank + fraction4 / 4, in integers. */
typedef struct quartile_pos {
    size_t rank;
    unsigned fraction4;
} quartile_pos;

static quartile_pos quartile_at(size_t n, unsigned quarters)
{
    size_t last = n - 1;
    size_t rem = last % 4 * quarters; /* < 12 */
    return (quartile_pos){.rank = last / 4 * quarters + rem / 4, .fraction4 = (unsigned)(rem % 4)};
}

/* a[pos.rank] interpolated towards a[pos.rank + 1]; both are in place. The difference form keeps
 * duplicates exact (lo + f * 0 == lo); the weighted form is the fallback when hi - lo overflows
 * (values of opposite sign near DBL_MAX). */
static double quartile_value(const double *a, quartile_pos pos)
{
    double lo = a[pos.rank];
    if (pos.fraction4 == 0) {
        return lo;
    }
    double hi = a[pos.rank + 1];
    double f = (double)pos.fraction4 / 4.0;
    double diff = hi - lo;
    return isfinite(diff) ? lo + f * diff : lo * (1.0 - f) + hi * f;
}

int th_stats_summarize(th_ctx *ctx, double *values, size_t n, th_stats *out)
{
    assert(out != NULL);
    assert(values != NULL || n == 0);
    select_state st = {.ctx = ctx, .budget = select_budget(n)};
    int err = ctx != NULL ? th_ctx_err(ctx) : 0;
    if (err != 0) {
        return err;
    }
    th_stats stats = {.n = n,
                      .mean = NAN,
                      .sd = NAN,
                      .median = NAN,
                      .q1 = NAN,
                      .q3 = NAN,
                      .ci_low = NAN,
                      .ci_high = NAN};
    if (n == 0) {
        *out = stats;
        return 0;
    }

    /* Values are validated before anything is moved, so a rejected call leaves them as given. */
    double max_abs = 0.0;
    bool finite = true;
    err = scan_values(&st, values, n, &max_abs, &finite);
    if (err != 0) {
        return err;
    }
    if (!finite) {
        return TH_EINVAL;
    }
    err = mean_sd(&st, values, n, max_abs, &stats.mean, &stats.sd);
    if (err != 0) {
        return err;
    }

    /* Up to six ranks: each quartile's and the next one when it interpolates. */
    quartile_pos pos[3] = {quartile_at(n, 1), quartile_at(n, 2), quartile_at(n, 3)};
    size_t ranks[6];
    size_t nranks = 0;
    for (size_t q = 0; q < 3; q++) {
        for (size_t r = pos[q].rank; r <= pos[q].rank + (pos[q].fraction4 != 0); r++) {
            if (nranks == 0 || ranks[nranks - 1] < r) { /* positions ascend with q */
                ranks[nranks++] = r;
            }
        }
    }
    err = select_ranks(&st, values, 0, n, ranks, nranks);
    if (err != 0) {
        return err;
    }
    stats.q1 = quartile_value(values, pos[0]);
    stats.median = quartile_value(values, pos[1]);
    stats.q3 = quartile_value(values, pos[2]);

    if (n >= 2) {
        double half_width = th_stats_t975(n - 1) * (stats.sd / sqrt((double)n));
        stats.ci_low = stats.mean - half_width;
        stats.ci_high = stats.mean + half_width;
    }
    *out = stats;
    return 0;
}

/* ---- Student's t ------------------------------------------------------------------------- */

/* P(|T| <= t) for Student's t with df degrees of freedom, t >= 0, from the finite series for
 * integer df (Abramowitz and Stegun 26.7.3 and 26.7.4), with theta = atan(t / sqrt(df)):
 *   df = 1:    2 theta / pi
 *   df odd:    2 / pi * (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... to cos^(df-3)))
 *   df even:   sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... to cos^(df-2))
 * All terms are positive, so the sum is accurate to about df ulps. */
static double t_central_prob(double t, size_t df)
{
    double nu = (double)df;
    double r = sqrt(nu + t * t);
    double theta = atan2(t, sqrt(nu));
    if (df == 1) {
        return 2.0 * theta / PI;
    }
    double sin_theta = t / r;
    double cos_theta = sqrt(nu) / r;
    double cos2 = nu / (nu + t * t);
    double sum = 1.0, term = 1.0;
    if (df % 2 == 1) {
        for (size_t k = 1; 2 * k + 3 <= df; k++) {
            term *= cos2 * (double)(2 * k) / (double)(2 * k + 1);
            sum += term;
        }
        return 2.0 / PI * (theta + sin_theta * cos_theta * sum);
    }
    for (size_t k = 1; 2 * k + 2 <= df; k++) {
        term *= cos2 * (double)(2 * k - 1) / (double)(2 * k);
        sum += term;
    }
    return sin_theta * sum;
}

double th_stats_t975(size_t df)
{
    if (df == 0) {
        return NAN;
    }
    if (df > T_SERIES_MAX_DF) {
        /* Cornish-Fisher expansion of the t quantile around the normal one (Abramowitz and
         * Stegun 26.7.5); the first omitted term is of order z^11 / df^5. */
        double z = Z975, z2 = z * z;
        double g1 = z * (z2 + 1.0) / 4.0;
        double g2 = z * ((5.0 * z2 + 16.0) * z2 + 3.0) / 96.0;
        double g3 = z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / 384.0;
        double g4 =
            z * ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) / 92160.0;
        double inv = 1.0 / (double)df;
        return z + inv * (g1 + inv * (g2 + inv * (g3 + inv * g4)));
    }
    /* Bisection on the monotone P(|T| <= t) = 0.95 between the normal quantile (the limit, from
     * below) and 13 (above t975(1) = 12.706), until the bracket cannot shrink. */
    double lo = Z975, hi = 13.0;
    for (;;) {
        double mid = 0.5 * (lo + hi);
        if (mid <= lo || mid >= hi) {
            break;
        }
        if (t_central_prob(mid, df) < 0.95) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return 0.5 * (lo + hi);
}
