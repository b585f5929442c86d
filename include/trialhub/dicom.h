/* DICOM Part 10 files: a streaming validator for uploads (th_dicom_probe: bounded memory, fed
 * chunks of any size) and a reader that decodes uncompressed pixel data for analysis
 * (th_dicom_read_file). Only the attributes an analyzer needs are read into memory; everything
 * else, patient identifiers included, is skipped by its length and never copied, so no patient
 * data can reach a log line or an error message through this module. Design notes:
 * docs/internals/dicom.md. */
#ifndef TRIALHUB_DICOM_H
#define TRIALHUB_DICOM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"

/* A buffer of this size holds every reason the module writes (they are cut to fit otherwise). */
#define TH_DICOM_ERRLEN 192

/* The most samples (rows x columns x frames x samples per pixel) th_dicom_read_file() decodes:
 * 64 Mi samples, 256 MiB of int32. Larger images fail with TH_ETOOBIG. */
#define TH_DICOM_MAX_SAMPLES (UINT64_C(1) << 26)

/* How the dataset after the File Meta Information is encoded. */
typedef enum th_dicom_syntax {
    TH_DICOM_IMPLICIT_LE = 1, /* 1.2.840.10008.1.2 */
    TH_DICOM_EXPLICIT_LE,     /* 1.2.840.10008.1.2.1 */
    TH_DICOM_EXPLICIT_BE,     /* 1.2.840.10008.1.2.2 (retired): validated, not decoded */
    TH_DICOM_ENCAPSULATED,    /* any other syntax (JPEG, JPEG-LS, JPEG 2000, RLE...): explicit
                               * VR little endian with compressed, encapsulated pixel data:
                               * validated, not decoded */
} th_dicom_syntax;

/* What a probe or a read found. Holds no patient data: only image geometry, encoding and the
 * modality. Strings are NUL-terminated, without DICOM padding, and contain only characters that
 * DICOM allows in them (CS: A-Z, 0-9, '_' and space; UI: digits and '.'), so they are safe to put
 * in logs and JSON. */
typedef struct th_dicom_info {
    uint32_t rows;                 /* (0028,0010), > 0 */
    uint32_t columns;              /* (0028,0011), > 0 */
    uint32_t frames;               /* (0028,0008) NumberOfFrames; 1 when absent */
    uint16_t samples_per_pixel;    /* (0028,0002); 1 when absent */
    uint16_t planar_configuration; /* (0028,0006); 0: R,G,B interleaved, 1: one plane each */
    uint16_t bits_allocated;       /* (0028,0100); 0 when absent (then not decodable) */
    uint16_t bits_stored;          /* (0028,0101); bits_allocated when absent */
    uint16_t high_bit;             /* (0028,0102); bits_stored - 1 when absent */
    uint16_t pixel_representation; /* (0028,0103): 0 unsigned, 1 two's complement */
    char modality[17];             /* (0008,0060), e.g. "CT" */
    char photometric[17];          /* (0028,0004), e.g. "MONOCHROME2"; "" when absent */
    char transfer_syntax[65];      /* (0002,0010) */
    th_dicom_syntax syntax;
    bool has_rescale;           /* (0028,1052) or (0028,1053) present */
    double rescale_slope;       /* (0028,1053); 1 when absent. |value| <= 1e12 */
    double rescale_intercept;   /* (0028,1052); 0 when absent. |value| <= 1e12 */
    uint64_t pixel_data_offset; /* file offset of the first byte of PixelData's value */
    uint64_t pixel_data_length; /* its length in bytes; 0 when encapsulated (fragments) */
    bool pixel_data_decodable;  /* th_dicom_read_file() can decode it */
    const char *undecodable;    /* when not decodable: a static reason ("compressed transfer
                                 * syntax", ...); NULL otherwise */
} th_dicom_info;

/* ---- streaming validation ------------------------------------------------------------------ */

typedef struct th_dicom_probe th_dicom_probe;

/* Creates a probe at the start of a file. It holds a few hundred bytes whatever it is fed: values
 * it does not need are skipped by length across chunk boundaries, and undefined-length sequences
 * are walked item by item (nesting up to 16 levels). *out is owned by the caller
 * (th_dicom_probe_destroy()). Returns 0 or TH_ENOMEM (then *out is untouched). A probe has one
 * owner: not thread-safe. */
TH_MUST_CHECK int th_dicom_probe_create(th_dicom_probe **out);

/* Frees the probe. NULL is a no-op. */
void th_dicom_probe_destroy(th_dicom_probe *probe);

/* Feeds the next len bytes of the file (any split is fine, len 0 too). Checks the 128-byte
 * preamble and "DICM", reads the File Meta Information group (explicit VR little endian) for the
 * TransferSyntaxUID, then the dataset in that syntax up to the end of PixelData (7FE0,0010);
 * bytes after it are counted and ignored. Allocates nothing. Returns 0, or TH_EPARSE once the
 * bytes cannot be DICOM (the probe then ignores further input and th_dicom_probe_finish() gives
 * the reason). */
TH_MUST_CHECK int th_dicom_probe_feed(th_dicom_probe *probe, const void *data, size_t len);

/* Returns true once the probe needs no more input: it failed, or it has seen the end of the
 * pixel data. */
bool th_dicom_probe_done(const th_dicom_probe *probe);

/* Judges the input fed so far as a whole file. Returns 0 and fills *info when it is a DICOM
 * image with Rows, Columns, Modality and complete PixelData (for uncompressed syntaxes, at least
 * Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated/8 bytes of it). Otherwise
 * returns TH_EPARSE and writes a reason fit for a 422 to errbuf ("not DICOM: no DICM preamble",
 * "missing Rows (0028,0010)", "unreadable meta header at offset 140: ...", "truncated at offset
 * N ..."): it names tags and offsets, never values. *info is untouched on failure. May be called
 * more than once; does not change the probe. */
TH_MUST_CHECK int th_dicom_probe_finish(const th_dicom_probe *probe, th_dicom_info *info,
                                        char *errbuf, size_t errlen);

/* ---- decoding ------------------------------------------------------------------------------ */

/* A decoded image: the caller embeds it and ends it with th_dicom_image_free(). stored holds
 * `samples` stored values (frame by frame, row by row, left to right; for 3 samples per pixel
 * R,G,B interleaved whatever the file's PlanarConfiguration), already masked to BitsStored and
 * sign-extended when PixelRepresentation is 1. The real-world value of sample i is
 * th_dicom_image_value(image, i): stored * slope + intercept, where slope and intercept are the
 * file's Rescale Slope/Intercept for single-sample images and 1 and 0 otherwise. */
typedef struct th_dicom_image {
    th_dicom_info info;
    uint64_t pixels;  /* rows * columns * frames */
    uint64_t samples; /* pixels * samples_per_pixel */
    int32_t *stored;  /* owned by the struct */
    double slope;
    double intercept;
} th_dicom_image;

/* Reads the DICOM file at path and decodes its pixel data: uncompressed little-endian syntaxes,
 * 8 or 16 bits allocated, unsigned or signed, 1 or 3 (RGB) samples per pixel, any number of
 * frames. The header is read through a probe (the same checks as an upload), then only the pixel
 * data's bytes. On success *image owns its samples (th_dicom_image_free()). Returns 0,
 * TH_ENOTFOUND (no such file), TH_EIO (cannot open or read it), TH_EPARSE (not a valid DICOM
 * image), TH_EUNSUPPORTED (compressed or big-endian syntax, other bit depths, other sample
 * counts), TH_ETOOBIG (more than TH_DICOM_MAX_SAMPLES samples), TH_ENOMEM, or th_ctx_err(ctx)
 * when ctx ends first (checked every 64 KiB read and every million samples decoded); errbuf
 * says why, without patient data or the path. *image is untouched on failure. Thread-safe (no
 * shared state). */
TH_MUST_CHECK int th_dicom_read_file(th_ctx *ctx, const char *path, th_dicom_image *image,
                                     char *errbuf, size_t errlen);

/* Like th_dicom_read_file() on a file already in memory (len bytes at data, which must stay
 * valid during the call). */
TH_MUST_CHECK int th_dicom_read_mem(th_ctx *ctx, const void *data, size_t len,
                                    th_dicom_image *image, char *errbuf, size_t errlen);

/* Frees the samples and empties *image. Safe on a zeroed or already freed image; NULL is a
 * no-op. */
void th_dicom_image_free(th_dicom_image *image);

/* The real-world value of sample i (i < image->samples). The multiplication and the addition are
 * two separate roundings (no fused multiply-add), as numpy computes `stored * slope + intercept`,
 * so results compare exactly. */
static inline double th_dicom_image_value(const th_dicom_image *image, uint64_t i)
{
    double scaled = (double)image->stored[i] * image->slope;
    return scaled + image->intercept;
}

#endif
