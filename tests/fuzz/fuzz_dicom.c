/* libFuzzer driver for the DICOM parser: arbitrary bytes go through the streaming probe, fed
 * whole and in chunks whose sizes come from the input (the verdict, the reason and the info
 * must not depend on the chunking), then through th_dicom_read_mem() and the image statistics,
 * as an upload and the analyzer would. Seeds are in tests/fuzz/corpus/dicom/ (written by
 * `tests/data/dicom/make_images.py --corpus`). Build with -DTH_LIBFUZZER=ON and clang (target
 * fuzz_dicom), then
 *   mkdir -p work && build-fuzz/tests/fuzz_dicom -max_total_time=60 work tests/fuzz/corpus/dicom
 * Every build replays the corpus without libFuzzer (CTest fuzz_dicom_corpus). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trialhub/dicom.h"
#include "trialhub/imgstats.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

static int probe(const uint8_t *data, size_t size, size_t chunk, th_dicom_info *info, char *err)
{
    th_dicom_probe *p = NULL;
    if (th_dicom_probe_create(&p) != 0) {
        abort(); /* no allocation failures are injected here */
    }
    for (size_t off = 0; off < size; off += chunk) {
        size_t n = size - off < chunk ? size - off : chunk;
        int rc = th_dicom_probe_feed(p, data + off, n);
        if (rc != 0 && rc != TH_EPARSE) {
            abort();
        }
    }
    memset(info, 0, sizeof(*info));
    err[0] = '\0';
    int rc = th_dicom_probe_finish(p, info, err, TH_DICOM_ERRLEN);
    th_dicom_probe_destroy(p);
    return rc;
}

static bool same_info(const th_dicom_info *a, const th_dicom_info *b)
{
    return a->rows == b->rows && a->columns == b->columns && a->frames == b->frames &&
           a->samples_per_pixel == b->samples_per_pixel && a->bits_allocated == b->bits_allocated &&
           a->bits_stored == b->bits_stored && a->high_bit == b->high_bit &&
           a->pixel_representation == b->pixel_representation &&
           a->planar_configuration == b->planar_configuration &&
           strcmp(a->modality, b->modality) == 0 && strcmp(a->photometric, b->photometric) == 0 &&
           strcmp(a->transfer_syntax, b->transfer_syntax) == 0 && a->syntax == b->syntax &&
           a->has_rescale == b->has_rescale && a->rescale_slope == b->rescale_slope &&
           a->rescale_intercept == b->rescale_intercept &&
           a->pixel_data_offset == b->pixel_data_offset &&
           a->pixel_data_length == b->pixel_data_length &&
           a->pixel_data_decodable == b->pixel_data_decodable && a->undecodable == b->undecodable;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    th_dicom_info whole, split;
    char err_whole[TH_DICOM_ERRLEN], err_split[TH_DICOM_ERRLEN];
    int rc = probe(data, size, size ? size : 1, &whole, err_whole);
    size_t chunk = size > 0 ? 1 + data[size - 1] % 61u : 1;
    int rc_split = probe(data, size, chunk, &split, err_split);
    if (rc != rc_split || (rc == 0 && !same_info(&whole, &split)) ||
        (rc != 0 && strcmp(err_whole, err_split) != 0)) {
        fprintf(stderr, "chunking changed the verdict: %d \"%s\" vs %d \"%s\"\n", rc, err_whole,
                rc_split, err_split);
        abort();
    }
    if (rc != 0 && rc != TH_EPARSE) {
        abort();
    }
    if (rc == 0 && (whole.rows == 0 || whole.columns == 0 || whole.modality[0] == '\0' ||
                    whole.pixel_data_offset > size)) {
        abort();
    }

    th_dicom_image img;
    char err[TH_DICOM_ERRLEN];
    int read = th_dicom_read_mem(th_ctx_background(), data, size, &img, err, sizeof(err));
    if (rc == 0 && whole.pixel_data_decodable && read != 0 && read != TH_ETOOBIG) {
        fprintf(stderr, "probe accepted a decodable image that the reader refused: %s\n", err);
        abort();
    }
    if (read != 0) {
        return 0;
    }
    th_imgstats_params params;
    th_imgstats_defaults(NULL, &img, &params);
    th_imgstats st;
    if (th_imgstats_compute(th_ctx_background(), &img, &params, &st) != 0) {
        abort();
    }
    uint64_t total = 0;
    for (uint32_t b = 0; b < st.bins; b++) {
        total += st.counts[b];
    }
    if (total != st.samples || !(st.min <= st.max) || !isfinite(st.mean) ||
        st.mean < st.min - 1e-6 * fabs(st.min) - 1e-9 ||
        st.mean > st.max + 1e-6 * fabs(st.max) + 1e-9) {
        abort();
    }
    for (size_t w = 0; w < st.nwindows; w++) {
        if (!(st.window_fractions[w] >= 0 && st.window_fractions[w] <= 1)) {
            abort();
        }
    }
    th_imgstats_free(&st);
    th_dicom_image_free(&img);
    return 0;
}
