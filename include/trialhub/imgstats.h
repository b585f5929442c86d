/* Image statistics for the reference analyzer (`trialhub analyze`): minimum, maximum, mean, a
 * histogram that matches numpy.histogram bin for bin, and the fraction of values inside named
 * windows (CT: lung, soft tissue, bone in Hounsfield units). Values are real-world values
 * (th_dicom_image_value()); for RGB images every sample counts. */
#ifndef TRIALHUB_IMGSTATS_H
#define TRIALHUB_IMGSTATS_H

#include <stddef.h>
#include <stdint.h>

#include "trialhub/ctx.h"
#include "trialhub/dicom.h"
#include "trialhub/error.h"

#define TH_IMGSTATS_DEFAULT_BINS 64
#define TH_IMGSTATS_MAX_BINS     4096
#define TH_IMGSTATS_MAX_WINDOWS  16
#define TH_IMGSTATS_NAME_MAX     32

/* A window: the values v with min <= v <= max (both ends included). */
typedef struct th_imgstats_window {
    char name[TH_IMGSTATS_NAME_MAX + 1];
    double min;
    double max;
} th_imgstats_window;

/* What to compute. A value the caller fills (or th_imgstats_defaults() does). */
typedef struct th_imgstats_params {
    uint32_t bins; /* 1 .. TH_IMGSTATS_MAX_BINS */
    size_t nwindows;
    th_imgstats_window windows[TH_IMGSTATS_MAX_WINDOWS];
} th_imgstats_params;

/* The result; the caller embeds it and ends it with th_imgstats_free(). */
typedef struct th_imgstats {
    uint64_t pixels;  /* rows x columns x frames */
    uint64_t samples; /* values counted: pixels x samples per pixel */
    double min;
    double max;
    double mean;
    /* numpy.histogram(values, bins): equal bins from hist_min to hist_max (the data's min and
     * max, widened by 0.5 each way when they are equal); the last bin includes its right edge. */
    uint32_t bins;
    double hist_min;
    double hist_max;
    uint64_t *counts; /* bins entries, owned by the struct */
    size_t nwindows;
    th_imgstats_window windows[TH_IMGSTATS_MAX_WINDOWS];
    uint64_t window_counts[TH_IMGSTATS_MAX_WINDOWS];
    double window_fractions[TH_IMGSTATS_MAX_WINDOWS]; /* window_counts / samples */
} th_imgstats;

/* Fills *params with the defaults for modality (the image's own when NULL): 64 bins; for "CT"
 * the windows lung [-1000, -400], soft [-160, 240] and bone [300, 3000] HU; for any other
 * modality the range of values BitsStored and PixelRepresentation allow (after rescale) cut in
 * three equal windows low, mid and high (a value on a shared edge counts in both). */
void th_imgstats_defaults(const char *modality, const th_dicom_image *image,
                          th_imgstats_params *params);

/* Computes the statistics of image (two passes over its samples). On success *stats owns its
 * counts (th_imgstats_free()). Returns 0, TH_EINVAL (bins out of range, more than
 * TH_IMGSTATS_MAX_WINDOWS windows, a window with min > max or a non-finite bound, or an empty
 * image), TH_ENOMEM, or th_ctx_err(ctx) when ctx ends first (checked every million samples).
 * *stats is untouched on failure. Thread-safe (no shared state). */
TH_MUST_CHECK int th_imgstats_compute(th_ctx *ctx, const th_dicom_image *image,
                                      const th_imgstats_params *params, th_imgstats *stats);

/* Frees the counts and empties *stats. Safe on a zeroed or freed result; NULL is a no-op. */
void th_imgstats_free(th_imgstats *stats);

#endif
