/* Image statistics for the reference analyzer. The histogram copies numpy.histogram's rules
 * (numpy/lib/histograms.py, equal-width bins: edges from linspace, an index estimate corrected
 * against the edges) so that counts agree exactly with `numpy.histogram(values, bins)` on the
 * same doubles; tests/unit/trial/test_dicom.c and tests/integration/test_analyze.py hold it to
 * that. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "trialhub/alloc.h"
#include "trialhub/imgstats.h"

#define CHECK_EVERY (UINT64_C(1) << 20) /* samples between two looks at the context */

static void set_window(th_imgstats_window *w, const char *name, double min, double max)
{
    snprintf(w->name, sizeof(w->name), "%s", name);
    w->min = min;
    w->max = max;
}

void th_imgstats_defaults(const char *modality, const th_dicom_image *image,
                          th_imgstats_params *params)
{
    memset(params, 0, sizeof(*params));
    params->bins = TH_IMGSTATS_DEFAULT_BINS;
    if (modality == NULL) {
        modality = image->info.modality;
    }
    if (strcmp(modality, "CT") == 0) {
        set_window(&params->windows[0], "lung", -1000, -400);
        set_window(&params->windows[1], "soft", -160, 240);
        set_window(&params->windows[2], "bone", 300, 3000);
        params->nwindows = 3;
        return;
    }
    /* The stored range BitsStored allows, through the rescale. */
    unsigned bits =
        image->info.bits_stored > 0 && image->info.bits_stored <= 32 ? image->info.bits_stored : 16;
    double span = ldexp(1.0, (int)bits); /* 2^bits */
    double lo_stored = image->info.pixel_representation == 1 ? -span / 2 : 0;
    double hi_stored = lo_stored + span - 1;
    double lo_scaled = lo_stored * image->slope, hi_scaled = hi_stored * image->slope;
    double lo = lo_scaled + image->intercept, hi = hi_scaled + image->intercept;
    if (lo > hi) {
        double swap = lo;
        lo = hi;
        hi = swap;
    }
    double third = (hi - lo) / 3;
    double edge1 = lo + third, edge2 = lo + 2 * third;
    set_window(&params->windows[0], "low", lo, edge1);
    set_window(&params->windows[1], "mid", edge1, edge2);
    set_window(&params->windows[2], "high", edge2, hi);
    params->nwindows = 3;
}

/* numpy.linspace(first, last, bins + 1)[i]. */
typedef struct edges {
    double first;
    double last;
    double step;
    double delta;
    uint32_t bins;
    bool step_zero;
} edges;

static double edge_at(const edges *e, uint32_t i)
{
    if (i == e->bins) {
        return e->last;
    }
    double y;
    if (e->step_zero) {
        double frac = (double)i / e->bins;
        y = frac * e->delta;
    } else {
        y = (double)i * e->step;
    }
    return y + e->first;
}

int th_imgstats_compute(th_ctx *ctx, const th_dicom_image *image, const th_imgstats_params *params,
                        th_imgstats *stats)
{
    if (params->bins < 1 || params->bins > TH_IMGSTATS_MAX_BINS ||
        params->nwindows > TH_IMGSTATS_MAX_WINDOWS || image->samples == 0 ||
        image->stored == NULL) {
        return TH_EINVAL;
    }
    for (size_t w = 0; w < params->nwindows; w++) {
        const th_imgstats_window *win = &params->windows[w];
        if (!isfinite(win->min) || !isfinite(win->max) || win->min > win->max) {
            return TH_EINVAL;
        }
    }
    th_imgstats out;
    memset(&out, 0, sizeof(out));
    out.pixels = image->pixels;
    out.samples = image->samples;
    out.bins = params->bins;
    out.nwindows = params->nwindows;
    memcpy(out.windows, params->windows, sizeof(out.windows));

    /* Pass 1: the stored extremes and an exact sum (|stored| < 2^16, at most 2^26 samples). */
    int32_t smin = image->stored[0], smax = image->stored[0];
    int64_t sum = 0;
    for (uint64_t i = 0; i < image->samples; i++) {
        if (i % CHECK_EVERY == 0 && th_ctx_err(ctx) != 0) {
            return th_ctx_err(ctx);
        }
        int32_t s = image->stored[i];
        smin = s < smin ? s : smin;
        smax = s > smax ? s : smax;
        sum += s;
    }
    /* fl(fl(s * slope) + intercept) is monotonic in s, so the extremes map to the extremes. */
    th_dicom_image one = *image;
    int32_t pair[2] = {smin, smax};
    one.stored = pair;
    double vmin = th_dicom_image_value(&one, 0), vmax = th_dicom_image_value(&one, 1);
    if (vmin > vmax) {
        double swap = vmin;
        vmin = vmax;
        vmax = swap;
    }
    out.min = vmin;
    out.max = vmax;
    double mean_stored = (double)sum / (double)image->samples;
    double mean_scaled = mean_stored * image->slope;
    out.mean = mean_scaled + image->intercept;

    /* numpy's _get_outer_edges() and linspace(). */
    edges e = {.first = vmin, .last = vmax, .bins = params->bins};
    if (e.first == e.last) {
        e.first -= 0.5;
        e.last += 0.5;
    }
    e.delta = e.last - e.first;
    e.step = e.delta / params->bins;
    e.step_zero = e.step == 0;
    out.hist_min = e.first;
    out.hist_max = e.last;
    double norm = params->bins / e.delta;

    out.counts = th_calloc(params->bins, sizeof(uint64_t));
    if (out.counts == NULL) {
        return TH_ENOMEM;
    }
    /* Pass 2: bins and windows. */
    uint32_t last_bin = params->bins - 1;
    for (uint64_t i = 0; i < image->samples; i++) {
        if (i % CHECK_EVERY == 0 && th_ctx_err(ctx) != 0) {
            th_free(out.counts);
            return th_ctx_err(ctx);
        }
        double v = th_dicom_image_value(image, i);
        uint32_t idx = 0;
        if (e.delta > 0 && isfinite(norm)) {
            double f = (v - e.first) * norm;
            idx = f >= (double)last_bin ? last_bin : (uint32_t)f;
            if (idx > 0 && v < edge_at(&e, idx)) {
                idx--;
            }
            if (idx != last_bin && v >= edge_at(&e, idx + 1)) {
                idx++;
            }
        }
        out.counts[idx]++;
        for (size_t w = 0; w < out.nwindows; w++) {
            if (v >= out.windows[w].min && v <= out.windows[w].max) {
                out.window_counts[w]++;
            }
        }
    }
    for (size_t w = 0; w < out.nwindows; w++) {
        out.window_fractions[w] = (double)out.window_counts[w] / (double)out.samples;
    }
    *stats = out;
    return 0;
}

void th_imgstats_free(th_imgstats *stats)
{
    if (stats == NULL) {
        return;
    }
    th_free(stats->counts);
    memset(stats, 0, sizeof(*stats));
}
