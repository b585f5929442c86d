/* Tests the DICOM parser (include/trialhub/dicom.h) and the image statistics (imgstats.h):
 * real files written at test time by pydicom and dcmtk's img2dcm (tests/data/dicom/
 * make_images.py, a CTest fixture) are probed whole, one byte at a time, split at every offset
 * and in random chunks, and must give the same verdict each time; decoded values and statistics
 * must match what numpy computed from pydicom's pixel_array; hand-built files check every
 * rejection reason, sequences, masking and limits; no reason ever carries patient data; the probe
 * allocates nothing while fed; constructors are run under allocation failure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unit/core/test_util.h"
#include "trialhub/dicom.h"
#include "trialhub/imgstats.h"

#ifndef TH_TEST_DICOM_DIR
#define TH_TEST_DICOM_DIR "tests/dicom"
#endif

/* ---- helpers ----------------------------------------------------------------------------- */

typedef struct blob {
    unsigned char *data;
    size_t len;
    size_t cap;
} blob;

static void blob_put(blob *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        b->cap = (b->len + len) * 2 + 64;
        b->data = realloc(b->data, b->cap);
        assert_non_null(b->data);
    }
    if (len > 0) {
        memcpy(b->data + b->len, data, len);
    }
    b->len += len;
}

static void put16(blob *b, uint16_t v)
{
    unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    blob_put(b, x, 2);
}

static void put32(blob *b, uint32_t v)
{
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    blob_put(b, x, 4);
}

static bool long_vr(const char *vr)
{
    return strstr("OB OD OF OL OV OW SQ SV UC UR UT UN UV", vr) != NULL;
}

/* An explicit VR little endian element. len UINT32_MAX writes an undefined length and no value. */
static void el(blob *b, uint16_t g, uint16_t e, const char *vr, const void *val, uint32_t len)
{
    put16(b, g);
    put16(b, e);
    blob_put(b, vr, 2);
    if (long_vr(vr)) {
        put16(b, 0);
        put32(b, len);
    } else {
        put16(b, (uint16_t)len);
    }
    if (len != UINT32_MAX) {
        blob_put(b, val, len);
    }
}

/* Only the header of an explicit VR little endian element (its value follows separately). */
static void el_header(blob *b, uint16_t g, uint16_t e, const char *vr, uint32_t len)
{
    put16(b, g);
    put16(b, e);
    blob_put(b, vr, 2);
    if (long_vr(vr)) {
        put16(b, 0);
        put32(b, len);
    } else {
        put16(b, (uint16_t)len);
    }
}

/* An implicit VR little endian element. */
static void iel(blob *b, uint16_t g, uint16_t e, const void *val, uint32_t len)
{
    put16(b, g);
    put16(b, e);
    put32(b, len);
    if (len != UINT32_MAX) {
        blob_put(b, val, len);
    }
}

static void el_str(blob *b, uint16_t g, uint16_t e, const char *vr, const char *s)
{
    char padded[256];
    size_t n = strlen(s);
    memcpy(padded, s, n);
    if (n % 2) {
        padded[n++] = strcmp(vr, "UI") == 0 ? '\0' : ' ';
    }
    el(b, g, e, vr, padded, (uint32_t)n);
}

static void el_us(blob *b, uint16_t g, uint16_t e, uint16_t v)
{
    unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    el(b, g, e, "US", x, 2);
}

static void delim(blob *b, uint16_t e, uint32_t len)
{
    put16(b, 0xFFFE);
    put16(b, e);
    put32(b, len);
}

#define ITEM(b, len) delim(b, 0xE000, len)
#define ITEM_END(b)  delim(b, 0xE00D, 0)
#define SEQ_END(b)   delim(b, 0xE0DD, 0)
#define UNDEF        UINT32_MAX

static void preamble_meta(blob *b, const char *syntax)
{
    unsigned char zeros[128] = {0};
    blob_put(b, zeros, sizeof(zeros));
    blob_put(b, "DICM", 4);
    unsigned char version[2] = {0, 1};
    el(b, 0x0002, 0x0001, "OB", version, 2);
    el_str(b, 0x0002, 0x0002, "UI", "1.2.840.10008.5.1.4.1.1.7");
    if (syntax != NULL) {
        el_str(b, 0x0002, 0x0010, "UI", syntax);
    }
}

/* Options for a hand-built explicit VR little endian image. */
typedef struct spec {
    bool no_rows, no_columns, no_modality, no_pixels;
    uint16_t rows, columns, bits_allocated, bits_stored, high_bit, pixel_representation;
    const char *slope;
    uint32_t pixel_len; /* 0: exactly what the image needs */
} spec;

static void image_elements(blob *b, const spec *s)
{
    if (!s->no_modality) {
        el_str(b, 0x0008, 0x0060, "CS", "CT");
    }
    el_str(b, 0x0010, 0x0010, "PN", "Doe^Jane");
    el_us(b, 0x0028, 0x0002, 1);
    el_str(b, 0x0028, 0x0004, "CS", "MONOCHROME2");
    if (!s->no_rows) {
        el_us(b, 0x0028, 0x0010, s->rows);
    }
    if (!s->no_columns) {
        el_us(b, 0x0028, 0x0011, s->columns);
    }
    el_us(b, 0x0028, 0x0100, s->bits_allocated);
    el_us(b, 0x0028, 0x0101, s->bits_stored);
    el_us(b, 0x0028, 0x0102, s->high_bit);
    el_us(b, 0x0028, 0x0103, s->pixel_representation);
    if (s->slope != NULL) {
        el_str(b, 0x0028, 0x1053, "DS", s->slope);
    }
}

static void pixels(blob *b, const spec *s, const void *data)
{
    if (s->no_pixels) {
        return;
    }
    uint32_t need = (uint32_t)s->rows * s->columns * (s->bits_allocated / 8u);
    uint32_t len = s->pixel_len ? s->pixel_len : need;
    el_header(b, 0x7FE0, 0x0010, s->bits_allocated == 16 ? "OW" : "OB", len);
    if (data != NULL) {
        blob_put(b, data, len < need ? len : need);
    } else {
        for (uint32_t i = 0; i < len; i++) {
            unsigned char byte = (unsigned char)(i * 7);
            blob_put(b, &byte, 1);
        }
    }
}

static spec basic_spec(void)
{
    return (spec){.rows = 4,
                  .columns = 3,
                  .bits_allocated = 16,
                  .bits_stored = 16,
                  .high_bit = 15,
                  .pixel_representation = 1};
}

static blob build(const spec *s, const void *data)
{
    blob b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    image_elements(&b, s);
    pixels(&b, s, data);
    return b;
}

/* Probes data split into chunks of the given sizes (cycled); returns the finish code. */
static int probe_chunks(const unsigned char *data, size_t len, const size_t *sizes, size_t nsizes,
                        th_dicom_info *info, char *err)
{
    th_dicom_probe *p = NULL;
    assert_int_equal(th_dicom_probe_create(&p), 0);
    size_t off = 0;
    for (size_t i = 0; off < len; i++) {
        size_t n = sizes[i % nsizes];
        if (n > len - off) {
            n = len - off;
        }
        int rc = th_dicom_probe_feed(p, data + off, n);
        assert_true(rc == 0 || rc == TH_EPARSE);
        off += n;
    }
    err[0] = '\0';
    int rc = th_dicom_probe_finish(p, info, err, TH_DICOM_ERRLEN);
    th_dicom_probe_destroy(p);
    return rc;
}

static int probe_whole(const unsigned char *data, size_t len, th_dicom_info *info, char *err)
{
    size_t all = len ? len : 1;
    return probe_chunks(data, len, &all, 1, info, err);
}

static void assert_same_info(const th_dicom_info *a, const th_dicom_info *b)
{
    assert_int_equal(a->rows, b->rows);
    assert_int_equal(a->columns, b->columns);
    assert_int_equal(a->frames, b->frames);
    assert_int_equal(a->samples_per_pixel, b->samples_per_pixel);
    assert_int_equal(a->planar_configuration, b->planar_configuration);
    assert_int_equal(a->bits_allocated, b->bits_allocated);
    assert_int_equal(a->bits_stored, b->bits_stored);
    assert_int_equal(a->high_bit, b->high_bit);
    assert_int_equal(a->pixel_representation, b->pixel_representation);
    assert_string_equal(a->modality, b->modality);
    assert_string_equal(a->photometric, b->photometric);
    assert_string_equal(a->transfer_syntax, b->transfer_syntax);
    assert_int_equal(a->syntax, b->syntax);
    assert_int_equal(a->has_rescale, b->has_rescale);
    assert_true(a->rescale_slope == b->rescale_slope);
    assert_true(a->rescale_intercept == b->rescale_intercept);
    assert_int_equal(a->pixel_data_offset, b->pixel_data_offset);
    assert_int_equal(a->pixel_data_length, b->pixel_data_length);
    assert_int_equal(a->pixel_data_decodable, b->pixel_data_decodable);
    assert_ptr_equal(a->undecodable, b->undecodable);
}

static void expect_reject(const blob *b, const char *reason)
{
    th_dicom_info info;
    char err[TH_DICOM_ERRLEN];
    int rc = probe_whole(b->data, b->len, &info, err);
    if (rc != TH_EPARSE || strstr(err, reason) == NULL) {
        fail_msg("expected a rejection with \"%s\", got %d \"%s\"", reason, rc, err);
    }
    assert_null(strstr(err, "Doe")); /* the patient name the builder puts in every file */
}

static void expect_accept(const blob *b, th_dicom_info *info)
{
    char err[TH_DICOM_ERRLEN];
    int rc = probe_whole(b->data, b->len, info, err);
    if (rc != 0) {
        fail_msg("expected acceptance, got %d \"%s\"", rc, err);
    }
}

/* ---- the generated files ------------------------------------------------------------------ */

static json_t *manifest;

static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fail_msg("cannot open %s (did the dicom_images fixture run?)", path);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc((size_t)n + 1);
    assert_non_null(data);
    assert_int_equal(fread(data, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return data;
}

static void file_path(const char *name, char *path, size_t len)
{
    snprintf(path, len, "%s/%s", TH_TEST_DICOM_DIR, name);
}

static int setup_manifest(void **state)
{
    (void)state;
    json_error_t jerr;
    manifest = json_load_file(TH_TEST_DICOM_DIR "/manifest.json", 0, &jerr);
    if (manifest == NULL) {
        fprintf(stderr, "cannot read %s/manifest.json: %s (run the dicom_images fixture)\n",
                TH_TEST_DICOM_DIR, jerr.text);
        return -1;
    }
    return 0;
}

static int teardown_manifest(void **state)
{
    (void)state;
    json_decref(manifest);
    return 0;
}

static json_t *manifest_files(void)
{
    json_t *files = json_object_get(manifest, "files");
    assert_true(json_is_array(files) && json_array_size(files) >= 10);
    return files;
}

static const char *str_of(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    assert_true(json_is_string(v));
    return json_string_value(v);
}

static double num_of(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    assert_true(json_is_number(v));
    return json_number_value(v);
}

static void check_probe_verdict(const char *name, const char *want, int rc, const char *err)
{
    if (strcmp(want, "ok") == 0) {
        if (rc != 0) {
            fail_msg("%s: expected ok, got \"%s\"", name, err);
        }
    } else if (rc != TH_EPARSE || strstr(err, want) == NULL) {
        fail_msg("%s: expected \"%s\", got %d \"%s\"", name, want, rc, err);
    }
}

/* Every file, fed whole: the verdict the manifest expects. */
static void test_files_probe_verdicts(void **state)
{
    (void)state;
    size_t i;
    json_t *f;
    json_array_foreach(manifest_files(), i, f)
    {
        char path[512];
        size_t len;
        file_path(str_of(f, "file"), path, sizeof(path));
        unsigned char *data = read_all(path, &len);
        th_dicom_info info;
        char err[TH_DICOM_ERRLEN];
        int rc = probe_whole(data, len, &info, err);
        check_probe_verdict(str_of(f, "file"), str_of(f, "probe"), rc, err);
        if (rc == 0) {
            const char *read = str_of(f, "read");
            assert_int_equal(info.pixel_data_decodable, strcmp(read, "ok") == 0);
            assert_true(info.pixel_data_offset + info.pixel_data_length <= len);
        }
        free(data);
    }
}

/* The same verdict and the same info whatever the chunking: one byte at a time, two pieces split
 * at every offset, and random chunk sizes. */
static void test_files_every_split(void **state)
{
    (void)state;
    size_t i;
    json_t *f;
    uint64_t seed = 0x9E3779B97F4A7C15u;
    json_array_foreach(manifest_files(), i, f)
    {
        char path[512];
        size_t len;
        file_path(str_of(f, "file"), path, sizeof(path));
        unsigned char *data = read_all(path, &len);
        th_dicom_info whole, other;
        char err_whole[TH_DICOM_ERRLEN], err_other[TH_DICOM_ERRLEN];
        memset(&whole, 0, sizeof(whole));
        int rc_whole = probe_whole(data, len, &whole, err_whole);

        size_t one = 1;
        memset(&other, 0, sizeof(other));
        assert_int_equal(probe_chunks(data, len, &one, 1, &other, err_other), rc_whole);
        if (rc_whole == 0) {
            assert_same_info(&whole, &other);
        } else {
            assert_string_equal(err_whole, err_other);
        }
        for (size_t cut = 0; cut <= len; cut++) {
            th_dicom_probe *p = NULL;
            assert_int_equal(th_dicom_probe_create(&p), 0);
            int rc1 = th_dicom_probe_feed(p, data, cut);
            int rc2 = th_dicom_probe_feed(p, data + cut, len - cut);
            assert_true(rc1 == 0 || rc1 == TH_EPARSE);
            assert_true(rc2 == 0 || rc2 == TH_EPARSE);
            memset(&other, 0, sizeof(other));
            int rc = th_dicom_probe_finish(p, &other, err_other, sizeof(err_other));
            th_dicom_probe_destroy(p);
            assert_int_equal(rc, rc_whole);
            if (rc == 0) {
                assert_same_info(&whole, &other);
            } else {
                assert_string_equal(err_whole, err_other);
            }
        }
        for (int round = 0; round < 200; round++) {
            size_t sizes[16];
            for (size_t k = 0; k < 16; k++) {
                seed = seed * 6364136223846793005u + 1442695040888963407u;
                sizes[k] = 1 + (size_t)((seed >> 33) % (round % 2 ? 17 : 700));
            }
            memset(&other, 0, sizeof(other));
            assert_int_equal(probe_chunks(data, len, sizes, 16, &other, err_other), rc_whole);
            if (rc_whole == 0) {
                assert_same_info(&whole, &other);
            } else {
                assert_string_equal(err_whole, err_other);
            }
        }
        free(data);
    }
}

/* Every strict prefix of a valid file is rejected, with a reason that names no patient data. */
static void test_files_every_truncation(void **state)
{
    (void)state;
    json_t *patient = json_object_get(manifest, "patient");
    size_t i;
    json_t *f;
    json_array_foreach(manifest_files(), i, f)
    {
        if (strcmp(str_of(f, "probe"), "ok") != 0) {
            continue;
        }
        char path[512];
        size_t len;
        file_path(str_of(f, "file"), path, sizeof(path));
        unsigned char *data = read_all(path, &len);
        th_dicom_info whole;
        char err[TH_DICOM_ERRLEN];
        assert_int_equal(probe_whole(data, len, &whole, err), 0);
        /* Bytes after the pixel data (a trailing pad item) may go; nothing before it. */
        size_t end = whole.syntax == TH_DICOM_ENCAPSULATED
                         ? len
                         : (size_t)(whole.pixel_data_offset + whole.pixel_data_length);
        for (size_t cut = 0; cut < end; cut++) {
            th_dicom_info info;
            int rc = probe_whole(data, cut, &info, err);
            if (rc != TH_EPARSE) {
                fail_msg("%s cut at %zu: accepted", str_of(f, "file"), cut);
            }
            const char *key;
            json_t *value;
            json_object_foreach(patient, key, value)
            {
                assert_null(strstr(err, json_string_value(value)));
            }
            assert_null(strstr(err, "Doe"));
            assert_null(strstr(err, "private remark"));
        }
        free(data);
    }
}

/* Decoded values and statistics agree with numpy on pydicom's pixel_array. */
static void test_files_match_numpy(void **state)
{
    (void)state;
    size_t i;
    json_t *f;
    int decoded = 0;
    json_array_foreach(manifest_files(), i, f)
    {
        const char *name = str_of(f, "file");
        const char *read = str_of(f, "read");
        char path[512];
        file_path(name, path, sizeof(path));
        th_dicom_image img;
        char err[TH_DICOM_ERRLEN] = "";
        int rc = th_dicom_read_file(th_ctx_background(), path, &img, err, sizeof(err));
        if (strcmp(read, "unsupported") == 0) {
            assert_int_equal(rc, TH_EUNSUPPORTED);
            assert_non_null(strstr(err, "not decodable"));
            continue;
        }
        if (strcmp(read, "parse") == 0) {
            assert_int_equal(rc, TH_EPARSE);
            continue;
        }
        if (rc != 0) {
            fail_msg("%s: %s", name, err);
        }
        decoded++;
        json_t *exp = json_object_get(f, "expected");
        assert_int_equal(img.info.rows, (uint32_t)num_of(exp, "rows"));
        assert_int_equal(img.info.columns, (uint32_t)num_of(exp, "columns"));
        assert_int_equal(img.info.frames, (uint32_t)num_of(exp, "frames"));
        assert_int_equal(img.info.samples_per_pixel, (uint16_t)num_of(exp, "samples_per_pixel"));
        assert_int_equal(img.info.bits_allocated, (uint16_t)num_of(exp, "bits_allocated"));
        assert_int_equal(img.info.bits_stored, (uint16_t)num_of(exp, "bits_stored"));
        assert_string_equal(img.info.modality, str_of(exp, "modality"));
        assert_string_equal(img.info.photometric, str_of(exp, "photometric"));
        assert_string_equal(img.info.transfer_syntax, str_of(exp, "transfer_syntax"));
        assert_true(img.slope == num_of(exp, "slope"));
        assert_true(img.intercept == num_of(exp, "intercept"));
        assert_int_equal(img.pixels, (uint64_t)num_of(exp, "pixels"));
        assert_int_equal(img.samples, (uint64_t)num_of(exp, "samples"));
        /* Every stored value in the reader's order, through a position-weighted sum. */
        int64_t checksum = 0;
        for (uint64_t k = 0; k < img.samples; k++) {
            checksum += (int64_t)img.stored[k] * (int64_t)(k % 1000 + 1);
        }
        assert_int_equal(checksum, json_integer_value(json_object_get(exp, "checksum")));

        th_imgstats_params params;
        th_imgstats_defaults(NULL, &img, &params);
        th_imgstats st;
        assert_int_equal(th_imgstats_compute(th_ctx_background(), &img, &params, &st), 0);
        assert_true(st.min == num_of(exp, "min"));
        assert_true(st.max == num_of(exp, "max"));
        double mean = num_of(exp, "mean");
        assert_true(fabs(st.mean - mean) <= 1e-12 * fmax(1.0, fabs(mean)));
        json_t *hist = json_object_get(exp, "histogram");
        assert_int_equal(st.bins, (uint32_t)num_of(hist, "bins"));
        assert_true(st.hist_min == num_of(hist, "min"));
        assert_true(st.hist_max == num_of(hist, "max"));
        json_t *counts = json_object_get(hist, "counts");
        assert_int_equal(json_array_size(counts), st.bins);
        for (uint32_t b = 0; b < st.bins; b++) {
            if ((json_int_t)st.counts[b] != json_integer_value(json_array_get(counts, b))) {
                fail_msg("%s: bin %u: %llu, numpy %lld", name, b, (unsigned long long)st.counts[b],
                         (long long)json_integer_value(json_array_get(counts, b)));
            }
        }
        json_t *windows = json_object_get(exp, "windows");
        assert_int_equal(json_array_size(windows), st.nwindows);
        for (size_t w = 0; w < st.nwindows; w++) {
            json_t *ew = json_array_get(windows, w);
            assert_string_equal(st.windows[w].name, str_of(ew, "name"));
            assert_true(st.windows[w].min == num_of(ew, "min"));
            assert_true(st.windows[w].max == num_of(ew, "max"));
            assert_int_equal(st.window_counts[w], (uint64_t)num_of(ew, "count"));
            assert_true(st.window_fractions[w] == num_of(ew, "fraction"));
        }
        th_imgstats_free(&st);
        th_dicom_image_free(&img);
    }
    assert_true(decoded >= 7);
}

/* The probe allocates nothing while it is fed, however large the skipped values: memory stays
 * bounded, and patient data is never copied (only the wanted attributes are). */
static void test_probe_allocates_nothing_when_fed(void **state)
{
    (void)state;
    blob b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    el_str(&b, 0x0008, 0x0060, "CS", "CT");
    /* A 100 kB PatientName: far beyond anything the probe could hold. */
    size_t n = 100000;
    char *name = malloc(n);
    assert_non_null(name);
    memset(name, 'N', n);
    el(&b, 0x0010, 0x0010, "UT", name, (uint32_t)n); /* UT: a 32-bit length */
    free(name);
    spec s = basic_spec();
    s.no_modality = true;
    image_elements(&b, &s);
    pixels(&b, &s, NULL);

    th_dicom_probe *p = NULL;
    assert_int_equal(th_dicom_probe_create(&p), 0);
    th__fault_fail_after(0); /* the next allocation anywhere fails */
    for (size_t off = 0; off < b.len; off += 4093) {
        size_t k = b.len - off < 4093 ? b.len - off : 4093;
        assert_int_equal(th_dicom_probe_feed(p, b.data + off, k), 0);
    }
    th_dicom_info info;
    char err[TH_DICOM_ERRLEN];
    assert_int_equal(th_dicom_probe_finish(p, &info, err, sizeof(err)), 0);
    assert_false(th__fault_fired());
    th__fault_fail_after(-1);
    assert_true(th_dicom_probe_done(p));
    th_dicom_probe_destroy(p);
    assert_string_equal(info.modality, "CT");
    free(b.data);
}

/* ---- rejections, on hand-built files ------------------------------------------------------ */

static void test_reject_not_dicom(void **state)
{
    (void)state;
    blob b = {0};
    expect_reject(&b, "not DICOM: no DICM preamble");
    blob_put(&b, "{\"resourceType\":\"Patient\"}", 26);
    expect_reject(&b, "not DICOM: no DICM preamble");
    free(b.data);

    spec s = basic_spec();
    blob good = build(&s, NULL);
    memcpy(good.data + 128, "DICN", 4);
    expect_reject(&good, "not DICOM: no DICM preamble");
    /* Without its preamble (a raw dataset) it is not a Part 10 file either. */
    memcpy(good.data + 128, "DICM", 4);
    blob raw = {0};
    blob_put(&raw, good.data + 132, good.len - 132);
    expect_reject(&raw, "not DICOM");
    free(raw.data);
    free(good.data);
}

static void test_reject_missing_attributes(void **state)
{
    (void)state;
    spec s = basic_spec();
    s.no_rows = true;
    blob b = build(&s, NULL);
    expect_reject(&b, "missing Rows (0028,0010)");
    free(b.data);

    s = basic_spec();
    s.no_columns = true;
    s.no_modality = true;
    b = build(&s, NULL);
    expect_reject(&b, "missing Columns (0028,0011), Modality (0008,0060)");
    free(b.data);

    s = basic_spec();
    s.no_pixels = true;
    b = build(&s, NULL);
    expect_reject(&b, "missing PixelData (7FE0,0010)");
    free(b.data);

    s = basic_spec();
    s.rows = 0;
    b = build(&s, NULL);
    expect_reject(&b, "Rows (0028,0010) is 0");
    free(b.data);

    /* No transfer syntax in the meta header. */
    b = (blob){0};
    preamble_meta(&b, NULL);
    s = basic_spec();
    image_elements(&b, &s);
    pixels(&b, &s, NULL);
    expect_reject(&b, "missing TransferSyntaxUID (0002,0010)");
    free(b.data);

    /* A meta header and nothing else. */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    expect_reject(&b, "missing Rows (0028,0010), Columns (0028,0011), Modality (0008,0060)");
    free(b.data);
}

static void test_reject_malformed(void **state)
{
    (void)state;
    /* Pixel data shorter than the geometry needs. */
    spec s = basic_spec();
    s.pixel_len = 20; /* 4 x 3 x 2 = 24 needed */
    blob b = build(&s, NULL);
    expect_reject(&b, "PixelData (7FE0,0010) has 20 bytes");
    free(b.data);

    /* Pixel data promised but cut short. */
    s = basic_spec();
    b = build(&s, NULL);
    b.len -= 3;
    expect_reject(&b, "truncated at offset");
    expect_reject(&b, "has 21 of its 24 bytes");
    free(b.data);

    /* A truncated meta header. */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    b.len -= 5;
    expect_reject(&b, "unreadable meta header at offset");
    free(b.data);

    /* Garbage in the meta header. */
    b = (blob){0};
    preamble_meta(&b, NULL);
    char want[TH_DICOM_ERRLEN];
    snprintf(want, sizeof(want), "unreadable meta header at offset %zu: invalid VR", b.len);
    blob_put(&b, "\x02\x00\x10\x00xx\x04\x00", 8);
    expect_reject(&b, want);
    free(b.data);

    /* A non-numeric transfer syntax. */
    b = (blob){0};
    preamble_meta(&b, "Doe^Jane");
    expect_reject(&b, "malformed TransferSyntaxUID"); /* and the value is not echoed */
    free(b.data);

    /* Deflate is not supported. */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1.99");
    expect_reject(&b, "deflated transfer syntax");
    free(b.data);

    /* A bad VR in the dataset (implicit data in an explicit file). */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    iel(&b, 0x0008, 0x0060, "CT", 2);
    expect_reject(&b, "invalid VR for (0008,0060)");
    free(b.data);

    /* Values that are not what they claim. */
    s = basic_spec();
    s.slope = "abc";
    b = build(&s, NULL);
    expect_reject(&b, "malformed RescaleSlope (0028,1053)");
    free(b.data);
    s.slope = "1e300";
    b = build(&s, NULL);
    expect_reject(&b, "malformed RescaleSlope (0028,1053)");
    free(b.data);
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    el_str(&b, 0x0008, 0x0060, "CS", "ct<script>");
    expect_reject(&b, "malformed Modality (0008,0060)");
    free(b.data);
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    unsigned char four[4] = {1, 0, 0, 0};
    el(&b, 0x0028, 0x0010, "UL", four, 4);
    expect_reject(&b, "malformed Rows (0028,0010) at offset");
    free(b.data);
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    el_str(&b, 0x0008, 0x0060, "LO",
           "A VERY LONG MODALITY VALUE INDEED THAT GOES ON AND ON AND ON");
    expect_reject(&b, "malformed Modality");
    free(b.data);

    /* Delimiters where they do not belong. */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    ITEM_END(&b);
    expect_reject(&b, "item delimiter (FFFE,E00D) outside an item");
    free(b.data);
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    el(&b, 0x0040, 0x0275, "SQ", NULL, UNDEF);
    el_str(&b, 0x0008, 0x0060, "CS", "CT");
    expect_reject(&b, "element (0008,0060) where an item was expected");
    free(b.data);
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    el(&b, 0x0010, 0x4000, "UT", NULL, UNDEF); /* only SQ, UN, OB and OW may */
    expect_reject(&b, "undefined length on (0010,4000)");
    free(b.data);

    /* An unterminated sequence at the end. */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    el(&b, 0x0040, 0x0275, "SQ", NULL, UNDEF);
    ITEM(&b, UNDEF);
    expect_reject(&b, "a sequence has no end");
    free(b.data);

    /* Nesting deeper than the probe follows. */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    for (int depth = 0; depth < 20; depth++) {
        el(&b, 0x0040, 0x0275, "SQ", NULL, UNDEF);
        ITEM(&b, UNDEF);
    }
    expect_reject(&b, "sequences nested deeper than 16 levels");
    free(b.data);
}

/* Sequences of every shape are walked to the pixel data; nothing inside them is taken for a
 * top-level attribute. */
static void test_sequences_walked(void **state)
{
    (void)state;
    spec s = basic_spec();
    blob b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    el_str(&b, 0x0008, 0x0060, "CS", "CT");
    /* Undefined-length sequence, undefined-length item holding Rows = 999 (not top level), a
     * nested undefined-length sequence with an empty item and a defined-length item. */
    el(&b, 0x0008, 0x1140, "SQ", NULL, UNDEF);
    ITEM(&b, UNDEF);
    el_us(&b, 0x0028, 0x0010, 999);
    el(&b, 0x0008, 0x1150, "SQ", NULL, UNDEF);
    ITEM(&b, UNDEF);
    ITEM_END(&b);
    ITEM(&b, 10);
    el_str(&b, 0x0008, 0x0060, "CS", "MR");
    SEQ_END(&b);
    ITEM_END(&b);
    ITEM(&b, 0);
    SEQ_END(&b);
    /* A defined-length sequence: skipped whole. */
    blob inner = {0};
    ITEM(&inner, 10);
    el_us(&inner, 0x0028, 0x0011, 777);
    el(&b, 0x0008, 0x1155, "SQ", inner.data, (uint32_t)inner.len);
    free(inner.data);
    /* An undefined-length UN: implicit VR little endian inside (PS3.5 6.2.2). */
    el(&b, 0x0009, 0x1010, "UN", NULL, UNDEF);
    ITEM(&b, UNDEF);
    iel(&b, 0x0009, 0x1011, "ab", 2);
    iel(&b, 0x0009, 0x1012, NULL, UNDEF); /* an implicit sequence */
    ITEM(&b, UNDEF);
    iel(&b, 0x0028, 0x0010, "\x01\x00", 2);
    ITEM_END(&b);
    SEQ_END(&b);
    ITEM_END(&b);
    SEQ_END(&b);
    /* An icon: nested encapsulated pixel data, items of defined length. */
    el(&b, 0x0088, 0x0200, "SQ", NULL, UNDEF);
    ITEM(&b, UNDEF);
    el(&b, 0x7FE0, 0x0010, "OB", NULL, UNDEF);
    ITEM(&b, 0);
    ITEM(&b, 4);
    blob_put(&b, "\xff\xd8\xff\xd9", 4);
    SEQ_END(&b);
    ITEM_END(&b);
    SEQ_END(&b);
    s.no_modality = true;
    image_elements(&b, &s);
    pixels(&b, &s, NULL);
    /* After the pixel data: ignored, even if garbage. */
    blob_put(&b, "\xFC\xFF\xFC\xFFOB\0\0garbage!", 16);
    th_dicom_info info;
    expect_accept(&b, &info);
    assert_int_equal(info.rows, 4);
    assert_int_equal(info.columns, 3);
    assert_string_equal(info.modality, "CT");
    assert_true(info.pixel_data_decodable);
    assert_int_equal(info.pixel_data_length, 24);
    free(b.data);
}

/* An encapsulated (JPEG) file: fragments are walked, the pixel data is reported as not
 * decodable; and inconsistent encodings are refused. */
static void test_encapsulated(void **state)
{
    (void)state;
    spec s = basic_spec();
    s.bits_allocated = 8;
    s.bits_stored = 8;
    s.high_bit = 7;
    blob b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2.4.50");
    image_elements(&b, &s);
    el(&b, 0x7FE0, 0x0010, "OB", NULL, UNDEF);
    ITEM(&b, 0); /* the basic offset table */
    ITEM(&b, 6);
    blob_put(&b, "\xff\xd8\x01\x02\xff\xd9", 6);
    SEQ_END(&b);
    th_dicom_info info;
    expect_accept(&b, &info);
    assert_int_equal(info.syntax, TH_DICOM_ENCAPSULATED);
    assert_false(info.pixel_data_decodable);
    assert_string_equal(info.undecodable, "compressed transfer syntax");
    th_dicom_image img;
    char err[TH_DICOM_ERRLEN];
    assert_int_equal(th_dicom_read_mem(th_ctx_background(), b.data, b.len, &img, err, sizeof(err)),
                     TH_EUNSUPPORTED);
    /* Without its sequence delimiter it is truncated. */
    b.len -= 8;
    expect_reject(&b, "encapsulated PixelData (7FE0,0010) has no end");
    free(b.data);

    /* Fragments of undefined length. */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.4.50");
    image_elements(&b, &s);
    el(&b, 0x7FE0, 0x0010, "OB", NULL, UNDEF);
    ITEM(&b, UNDEF);
    expect_reject(&b, "pixel data fragment of undefined length");
    free(b.data);

    /* Native pixel data in a compressed syntax, and the reverse. */
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.4.50");
    image_elements(&b, &s);
    pixels(&b, &s, NULL);
    expect_reject(&b, "is not encapsulated, but the transfer syntax is compressed");
    free(b.data);
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    image_elements(&b, &s);
    el(&b, 0x7FE0, 0x0010, "OB", NULL, UNDEF);
    expect_reject(&b, "is encapsulated, but the transfer syntax is not compressed");
    free(b.data);
}

/* ---- decoding ----------------------------------------------------------------------------- */

/* Bits outside BitsStored are masked off; signed values are sign-extended from BitsStored;
 * HighBit shifts. */
static void test_decode_masks_and_signs(void **state)
{
    (void)state;
    struct {
        uint16_t stored, high, repr;
        uint16_t raw;
        int32_t want;
    } cases[] = {
        {12, 11, 0, 0xF123, 0x123}, {12, 11, 1, 0x0800, -2048},  {12, 11, 1, 0xF7FF, 2047},
        {12, 11, 1, 0x0FFF, -1},    {16, 15, 1, 0x8000, -32768}, {16, 15, 0, 0xFFFF, 65535},
        {12, 15, 0, 0x1230, 0x123}, {1, 0, 0, 0xFFFF, 1},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        spec s = basic_spec();
        s.rows = 1;
        s.columns = 2;
        s.bits_stored = cases[c].stored;
        s.high_bit = cases[c].high;
        s.pixel_representation = cases[c].repr;
        unsigned char px[4] = {(unsigned char)cases[c].raw, (unsigned char)(cases[c].raw >> 8), 0,
                               0};
        blob b = build(&s, px);
        th_dicom_image img;
        char err[TH_DICOM_ERRLEN];
        int rc = th_dicom_read_mem(th_ctx_background(), b.data, b.len, &img, err, sizeof(err));
        if (rc != 0) {
            fail_msg("case %zu: %s", c, err);
        }
        assert_int_equal(img.samples, 2);
        if (img.stored[0] != cases[c].want) {
            fail_msg("case %zu: raw 0x%04x gave %d, want %d", c, cases[c].raw, img.stored[0],
                     cases[c].want);
        }
        assert_int_equal(img.stored[1], 0);
        th_dicom_image_free(&img);
        free(b.data);
    }
}

static void test_decode_limits_and_errors(void **state)
{
    (void)state;
    th_dicom_image img;
    char err[TH_DICOM_ERRLEN];
    assert_int_equal(
        th_dicom_read_file(th_ctx_background(), "/nonexistent/image.dcm", &img, err, sizeof(err)),
        TH_ENOTFOUND);
    assert_null(strstr(err, "/nonexistent")); /* the path is not in the reason */

    /* 10000 x 10000 x 8 bits (over TH_DICOM_MAX_SAMPLES), with a length that claims it all:
     * refused before anything is allocated or read. */
    spec s = basic_spec();
    s.rows = 10000;
    s.columns = 10000;
    s.bits_allocated = 8;
    s.bits_stored = 8;
    s.high_bit = 7;
    blob b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    image_elements(&b, &s);
    el_header(&b, 0x7FE0, 0x0010, "OB", 100000000u);
    blob_put(&b, "\0\0\0\0", 4);
    assert_int_equal(th_dicom_read_mem(th_ctx_background(), b.data, b.len, &img, err, sizeof(err)),
                     TH_ETOOBIG);
    assert_non_null(strstr(err, "image too large"));
    free(b.data);

    /* Under the limit, but the bytes are not there. */
    s = basic_spec();
    s.rows = 300;
    s.columns = 300;
    b = (blob){0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    image_elements(&b, &s);
    el_header(&b, 0x7FE0, 0x0010, "OW", 180000);
    blob_put(&b, "\0\0\0\0", 4);
    assert_int_equal(th_dicom_read_mem(th_ctx_background(), b.data, b.len, &img, err, sizeof(err)),
                     TH_EPARSE);
    assert_non_null(strstr(err, "truncated"));
    free(b.data);

    /* BitsAllocated 32 is valid DICOM, not decoded here. */
    s = basic_spec();
    s.bits_allocated = 32;
    s.bits_stored = 32;
    s.high_bit = 31;
    b = build(&s, NULL);
    th_dicom_info info;
    expect_accept(&b, &info);
    assert_false(info.pixel_data_decodable);
    assert_int_equal(th_dicom_read_mem(th_ctx_background(), b.data, b.len, &img, err, sizeof(err)),
                     TH_EUNSUPPORTED);
    assert_non_null(strstr(err, "BitsAllocated"));
    free(b.data);
}

static void test_decode_canceled(void **state)
{
    (void)state;
    char path[512];
    file_path("ct_explicit_signed.dcm", path, sizeof(path));
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    th_ctx_cancel(ctx);
    th_dicom_image img;
    char err[TH_DICOM_ERRLEN];
    assert_int_equal(th_dicom_read_file(ctx, path, &img, err, sizeof(err)), TH_ECANCELED);

    assert_int_equal(th_dicom_read_file(th_ctx_background(), path, &img, err, sizeof(err)), 0);
    th_imgstats_params params;
    th_imgstats_defaults(NULL, &img, &params);
    th_imgstats st;
    assert_int_equal(th_imgstats_compute(ctx, &img, &params, &st), TH_ECANCELED);
    th_dicom_image_free(&img);
    th_ctx_release(ctx);
}

/* Constructors under allocation failure: fail the Nth acquisition until the call succeeds. */
static void test_allocation_failures(void **state)
{
    (void)state;
    th_dicom_probe *p = NULL;
    th__fault_fail_after(0);
    assert_int_equal(th_dicom_probe_create(&p), TH_ENOMEM);
    assert_null(p);
    th__fault_fail_after(-1);

    char path[512];
    file_path("mr_multiframe.dcm", path, sizeof(path));
    int rc = -1;
    long n;
    for (n = 0; n < 100 && rc != 0; n++) {
        th_dicom_image img;
        memset(&img, 0xAB, sizeof(img));
        char err[TH_DICOM_ERRLEN];
        th__fault_fail_after(n);
        rc = th_dicom_read_file(th_ctx_background(), path, &img, err, sizeof(err));
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            assert_false(fired);
            assert_int_equal(img.samples, 3 * 20 * 24);
            th_dicom_image_free(&img);
        } else {
            assert_true(fired);
            assert_true(rc == TH_ENOMEM || rc == TH_EIO);
            assert_int_equal(img.samples, 0xABABABABABABABABu); /* untouched */
        }
    }
    assert_true(n > 1);

    /* The statistics too. */
    th_dicom_image img;
    char err[TH_DICOM_ERRLEN];
    assert_int_equal(th_dicom_read_file(th_ctx_background(), path, &img, err, sizeof(err)), 0);
    th_imgstats_params params;
    th_imgstats_defaults(NULL, &img, &params);
    rc = -1;
    for (n = 0; n < 10 && rc != 0; n++) {
        th_imgstats st;
        th__fault_fail_after(n);
        rc = th_imgstats_compute(th_ctx_background(), &img, &params, &st);
        th__fault_fail_after(-1);
        if (rc == 0) {
            th_imgstats_free(&st);
        } else {
            assert_int_equal(rc, TH_ENOMEM);
        }
    }
    assert_int_equal(rc, 0);
    th_dicom_image_free(&img);
}

/* ---- statistics --------------------------------------------------------------------------- */

static th_dicom_image image_of(int32_t *values, size_t n, double slope, double intercept)
{
    th_dicom_image img;
    memset(&img, 0, sizeof(img));
    img.info.bits_stored = 12;
    snprintf(img.info.modality, sizeof(img.info.modality), "MR");
    img.pixels = n;
    img.samples = n;
    img.stored = values;
    img.slope = slope;
    img.intercept = intercept;
    return img;
}

static void test_stats_edge_cases(void **state)
{
    (void)state;
    /* A constant image: numpy widens the range by 0.5 each way; the value sits on the middle
     * edge, so it lands in bin 32 of 64. */
    int32_t same[5] = {7, 7, 7, 7, 7};
    th_dicom_image img = image_of(same, 5, 1, 0);
    th_imgstats_params params;
    th_imgstats_defaults(NULL, &img, &params);
    th_imgstats st;
    assert_int_equal(th_imgstats_compute(th_ctx_background(), &img, &params, &st), 0);
    assert_true(st.hist_min == 6.5 && st.hist_max == 7.5);
    assert_int_equal(st.counts[32], 5);
    assert_true(st.min == 7 && st.max == 7 && st.mean == 7);
    th_imgstats_free(&st);

    /* numpy.histogram([0, 1, 2, 3, 10], bins=3) == [4, 0, 1]; a negative slope swaps min and
     * max. */
    int32_t v[5] = {0, -1, -2, -3, -10};
    img = image_of(v, 5, -1, 0);
    params.bins = 3;
    params.nwindows = 1;
    snprintf(params.windows[0].name, sizeof(params.windows[0].name), "w");
    params.windows[0].min = 1;
    params.windows[0].max = 3;
    assert_int_equal(th_imgstats_compute(th_ctx_background(), &img, &params, &st), 0);
    assert_true(st.min == 0 && st.max == 10);
    assert_int_equal(st.counts[0], 4);
    assert_int_equal(st.counts[1], 0);
    assert_int_equal(st.counts[2], 1);
    assert_int_equal(st.window_counts[0], 3);
    assert_true(st.window_fractions[0] == 0.6);
    th_imgstats_free(&st);

    /* Defaults: CT windows by name; thirds of the stored range otherwise. */
    th_imgstats_defaults("CT", &img, &params);
    assert_int_equal(params.nwindows, 3);
    assert_string_equal(params.windows[0].name, "lung");
    assert_true(params.windows[2].min == 300 && params.windows[2].max == 3000);
    img.slope = 1;
    th_imgstats_defaults("MR", &img, &params);
    assert_string_equal(params.windows[1].name, "mid");
    assert_true(params.windows[0].min == 0 && params.windows[2].max == 4095);
    assert_true(params.windows[0].max == 1365 && params.windows[1].max == 2730);

    /* Bad parameters. */
    params.bins = 0;
    assert_int_equal(th_imgstats_compute(th_ctx_background(), &img, &params, &st), TH_EINVAL);
    params.bins = TH_IMGSTATS_MAX_BINS + 1;
    assert_int_equal(th_imgstats_compute(th_ctx_background(), &img, &params, &st), TH_EINVAL);
    params.bins = 8;
    params.windows[0].min = 5;
    params.windows[0].max = 4;
    assert_int_equal(th_imgstats_compute(th_ctx_background(), &img, &params, &st), TH_EINVAL);
    params.windows[0].max = INFINITY;
    assert_int_equal(th_imgstats_compute(th_ctx_background(), &img, &params, &st), TH_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_files_probe_verdicts, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_files_every_split, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_files_every_truncation, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_files_match_numpy, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_probe_allocates_nothing_when_fed, setup_reset,
                                        teardown_check),
        cmocka_unit_test_setup_teardown(test_reject_not_dicom, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_reject_missing_attributes, setup_reset,
                                        teardown_check),
        cmocka_unit_test_setup_teardown(test_reject_malformed, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_sequences_walked, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_encapsulated, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_decode_masks_and_signs, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_decode_limits_and_errors, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_decode_canceled, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_allocation_failures, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_stats_edge_cases, setup_reset, teardown_check),
    };
    return cmocka_run_group_tests(tests, setup_manifest, teardown_manifest);
}
