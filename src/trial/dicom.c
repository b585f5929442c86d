/* DICOM Part 10 parsing: a byte-at-a-time state machine (the probe) that validates a file as it
 * streams in with a few hundred bytes of state, and a reader that runs the same probe over a
 * file's header and then decodes uncompressed pixel data. Only the attributes listed in
 * `wanted` are ever copied out of the input; everything else is skipped by length. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "trialhub/alloc.h"
#include "trialhub/dicom.h"

#define PREAMBLE_LEN  128
#define VALUE_MAX     64 /* longest value copied: a UI is at most 64 bytes */
#define MAX_DEPTH     16 /* nested undefined-length sequences and items */
#define UNDEFINED_LEN UINT32_C(0xFFFFFFFF)
#define READ_CHUNK    ((size_t)64 * 1024)
#define DECODE_CHUNK  ((size_t)1024 * 1024)
#define RESCALE_MAX   1e12 /* a larger Rescale Slope or Intercept is not a physical unit */

#define TAG(group, element) (((uint32_t)(group) << 16) | (uint32_t)(element))
#define TAG_GROUP(tag)      ((unsigned)((tag) >> 16))
#define TAG_ELEMENT(tag)    ((unsigned)((tag)&0xFFFFu))

#define TAG_TRANSFER_SYNTAX TAG(0x0002, 0x0010)
#define TAG_ITEM            TAG(0xFFFE, 0xE000)
#define TAG_ITEM_DELIM      TAG(0xFFFE, 0xE00D)
#define TAG_SEQ_DELIM       TAG(0xFFFE, 0xE0DD)
#define TAG_PIXEL_DATA      TAG(0x7FE0, 0x0010)

/* The dataset attributes the probe reads (all top level); everything else is skipped. */
enum wanted_id {
    W_MODALITY,
    W_SAMPLES,
    W_PHOTOMETRIC,
    W_PLANAR,
    W_FRAMES,
    W_ROWS,
    W_COLUMNS,
    W_BITS_ALLOCATED,
    W_BITS_STORED,
    W_HIGH_BIT,
    W_PIXEL_REPRESENTATION,
    W_RESCALE_INTERCEPT,
    W_RESCALE_SLOPE,
    W_COUNT
};

enum value_kind { V_CS, V_US, V_IS, V_DS };

static const struct wanted {
    uint32_t tag;
    enum value_kind kind;
    const char *name;
} wanted[W_COUNT] = {
    [W_MODALITY] = {TAG(0x0008, 0x0060), V_CS, "Modality"},
    [W_SAMPLES] = {TAG(0x0028, 0x0002), V_US, "SamplesPerPixel"},
    [W_PHOTOMETRIC] = {TAG(0x0028, 0x0004), V_CS, "PhotometricInterpretation"},
    [W_PLANAR] = {TAG(0x0028, 0x0006), V_US, "PlanarConfiguration"},
    [W_FRAMES] = {TAG(0x0028, 0x0008), V_IS, "NumberOfFrames"},
    [W_ROWS] = {TAG(0x0028, 0x0010), V_US, "Rows"},
    [W_COLUMNS] = {TAG(0x0028, 0x0011), V_US, "Columns"},
    [W_BITS_ALLOCATED] = {TAG(0x0028, 0x0100), V_US, "BitsAllocated"},
    [W_BITS_STORED] = {TAG(0x0028, 0x0101), V_US, "BitsStored"},
    [W_HIGH_BIT] = {TAG(0x0028, 0x0102), V_US, "HighBit"},
    [W_PIXEL_REPRESENTATION] = {TAG(0x0028, 0x0103), V_US, "PixelRepresentation"},
    [W_RESCALE_INTERCEPT] = {TAG(0x0028, 0x1052), V_DS, "RescaleIntercept"},
    [W_RESCALE_SLOPE] = {TAG(0x0028, 0x1053), V_DS, "RescaleSlope"},
};

enum phase {
    PH_PREAMBLE, /* the 128-byte preamble and "DICM" */
    PH_META,     /* group 0002, explicit VR little endian */
    PH_DATASET,  /* the dataset in the declared syntax, up to PixelData */
    PH_PIXELS,   /* skipping PixelData's value */
    PH_DONE,     /* PixelData has ended: the rest is ignored */
    PH_FAILED,
};

enum frame_kind {
    FR_SEQ,       /* an undefined-length sequence: items or a sequence delimiter come next */
    FR_ITEM,      /* an undefined-length item: elements or an item delimiter come next */
    FR_FRAGMENTS, /* top-level encapsulated PixelData: fragments, then a sequence delimiter */
};

typedef struct frame {
    unsigned char kind;
    bool implicit;   /* how elements inside are encoded */
    bool big_endian; /* an undefined-length UN holds implicit VR little endian, whatever the file */
} frame;

struct th_dicom_probe {
    enum phase phase;
    uint64_t offset;      /* bytes consumed so far */
    uint64_t elem_offset; /* where the current element's header starts */
    unsigned char hdr[12];
    size_t hdr_len;
    size_t hdr_need; /* once the tag is read: 6 (VR next), 8 or 12 */
    uint32_t tag;
    int want;          /* the wanted_id being collected, or -1 for the transfer syntax */
    size_t value_need; /* > 0 while collecting a value */
    size_t value_len;
    unsigned char value[VALUE_MAX];
    uint64_t skip; /* value bytes still to skip */
    bool have_syntax;
    bool ds_implicit;
    bool ds_big_endian;
    int depth;
    frame stack[MAX_DEPTH];
    unsigned seen; /* bit per wanted_id */
    bool have_pixels;
    th_dicom_info info;
    char err[TH_DICOM_ERRLEN];
};

/* ---- small helpers ------------------------------------------------------------------------- */

static uint16_t rd16(const unsigned char *b, bool big_endian)
{
    return big_endian ? (uint16_t)((unsigned)b[0] << 8 | b[1])
                      : (uint16_t)((unsigned)b[1] << 8 | b[0]);
}

static uint32_t rd32(const unsigned char *b, bool big_endian)
{
    return big_endian ? ((uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3])
                      : ((uint32_t)b[3] << 24 | (uint32_t)b[2] << 16 | (uint32_t)b[1] << 8 | b[0]);
}

static void put_err(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void put_err(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (errbuf == NULL || errlen == 0) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

static int fail(th_dicom_probe *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Marks the probe failed with a reason; returns TH_EPARSE. */
static int fail(th_dicom_probe *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof(p->err), fmt, ap);
    va_end(ap);
    p->phase = PH_FAILED;
    return TH_EPARSE;
}

/* The VRs whose explicit header has 2 reserved bytes and a 32-bit length (PS3.5 7.1.2). */
static bool vr_is_long(const unsigned char *vr)
{
    static const char long_vrs[][3] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                       "SV", "UC", "UR", "UT", "UN", "UV"};
    for (size_t i = 0; i < sizeof(long_vrs) / sizeof(long_vrs[0]); i++) {
        if (vr[0] == (unsigned char)long_vrs[i][0] && vr[1] == (unsigned char)long_vrs[i][1]) {
            return true;
        }
    }
    return false;
}

/* The VRs with a 16-bit length. Anything not in either list is not DICOM. */
static bool vr_is_short(const unsigned char *vr)
{
    static const char short_vrs[][3] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT",
                                        "FL", "FD", "IS", "LO", "LT", "PN", "SH",
                                        "SL", "SS", "ST", "TM", "UI", "UL", "US"};
    for (size_t i = 0; i < sizeof(short_vrs) / sizeof(short_vrs[0]); i++) {
        if (vr[0] == (unsigned char)short_vrs[i][0] && vr[1] == (unsigned char)short_vrs[i][1]) {
            return true;
        }
    }
    return false;
}

static bool vr_is(const unsigned char *vr, const char *name)
{
    return vr[0] == (unsigned char)name[0] && vr[1] == (unsigned char)name[1];
}

static int find_wanted(uint32_t tag)
{
    for (int i = 0; i < W_COUNT; i++) {
        if (wanted[i].tag == tag) {
            return i;
        }
    }
    return -1;
}

/* The encoding of the elements being read now. */
static bool cur_implicit(const th_dicom_probe *p)
{
    if (p->phase == PH_META) {
        return false;
    }
    return p->depth > 0 ? p->stack[p->depth - 1].implicit : p->ds_implicit;
}

static bool cur_big_endian(const th_dicom_probe *p)
{
    if (p->phase == PH_META) {
        return false;
    }
    return p->depth > 0 ? p->stack[p->depth - 1].big_endian : p->ds_big_endian;
}

static void probe_init(th_dicom_probe *p)
{
    memset(p, 0, sizeof(*p));
    p->phase = PH_PREAMBLE;
    p->info.frames = 1;
    p->info.samples_per_pixel = 1;
    p->info.rescale_slope = 1.0;
}

/* ---- values -------------------------------------------------------------------------------- */

/* Copies the collected value without leading and trailing spaces and NULs (DICOM padding). */
static size_t trimmed(const th_dicom_probe *p, char *out, size_t cap)
{
    size_t start = 0, end = p->value_len;
    while (start < end && (p->value[start] == ' ' || p->value[start] == '\0')) {
        start++;
    }
    while (end > start && (p->value[end - 1] == ' ' || p->value[end - 1] == '\0')) {
        end--;
    }
    size_t n = end - start;
    if (n >= cap) {
        n = cap - 1;
    }
    memcpy(out, p->value + start, n);
    out[n] = '\0';
    return end - start;
}

static int on_transfer_syntax(th_dicom_probe *p)
{
    char uid[VALUE_MAX + 1];
    size_t n = trimmed(p, uid, sizeof(uid));
    bool ok = n > 0 && n <= 64;
    for (size_t i = 0; ok && i < n; i++) {
        ok = (uid[i] >= '0' && uid[i] <= '9') || uid[i] == '.';
    }
    if (!ok) {
        return fail(p,
                    "unreadable meta header at offset %llu: malformed TransferSyntaxUID "
                    "(0002,0010)",
                    (unsigned long long)p->elem_offset);
    }
    if (strcmp(uid, "1.2.840.10008.1.2.1.99") == 0) {
        return fail(p, "deflated transfer syntax %s is not supported", uid);
    }
    memcpy(p->info.transfer_syntax, uid, n + 1);
    p->have_syntax = true;
    p->ds_implicit = false;
    p->ds_big_endian = false;
    if (strcmp(uid, "1.2.840.10008.1.2") == 0) {
        p->info.syntax = TH_DICOM_IMPLICIT_LE;
        p->ds_implicit = true;
    } else if (strcmp(uid, "1.2.840.10008.1.2.1") == 0) {
        p->info.syntax = TH_DICOM_EXPLICIT_LE;
    } else if (strcmp(uid, "1.2.840.10008.1.2.2") == 0) {
        p->info.syntax = TH_DICOM_EXPLICIT_BE;
        p->ds_big_endian = true;
    } else {
        /* Every other transfer syntax is explicit VR little endian with encapsulated pixel data
         * (PS3.5 A.4). */
        p->info.syntax = TH_DICOM_ENCAPSULATED;
    }
    return 0;
}

static bool cs_ok(const char *s)
{
    for (; *s; s++) {
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_' || *s == ' ')) {
            return false;
        }
    }
    return true;
}

static int parse_ds(const char *text, double *out)
{
    char first[VALUE_MAX + 1];
    size_t n = strcspn(text, "\\");
    memcpy(first, text, n);
    first[n] = '\0';
    char *s = first;
    while (*s == ' ') {
        s++;
    }
    size_t len = strlen(s);
    while (len > 0 && s[len - 1] == ' ') {
        s[--len] = '\0';
    }
    if (len == 0 || strspn(s, "0123456789+-.eE") != len) {
        return -1;
    }
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (*end != '\0' || errno != 0 || !isfinite(v) || fabs(v) > RESCALE_MAX) {
        return -1;
    }
    *out = v;
    return 0;
}

static int on_wanted_value(th_dicom_probe *p, int id)
{
    const struct wanted *w = &wanted[id];
    th_dicom_info *info = &p->info;
    char text[VALUE_MAX + 1];
    size_t n = trimmed(p, text, sizeof(text));
    if (w->kind != V_US && n == 0) {
        return 0; /* an empty value is an absent one */
    }
    switch (w->kind) {
    case V_CS: {
        if (n > 16 || !cs_ok(text)) {
            return fail(p, "malformed %s (%04X,%04X) at offset %llu", w->name, TAG_GROUP(w->tag),
                        TAG_ELEMENT(w->tag), (unsigned long long)p->elem_offset);
        }
        memcpy(id == W_MODALITY ? info->modality : info->photometric, text, n + 1);
        break;
    }
    case V_US: {
        if (p->value_len == 0) {
            return 0;
        }
        if (p->value_len != 2) {
            return fail(p, "malformed %s (%04X,%04X) at offset %llu: %zu bytes, expected 2",
                        w->name, TAG_GROUP(w->tag), TAG_ELEMENT(w->tag),
                        (unsigned long long)p->elem_offset, p->value_len);
        }
        uint16_t v = rd16(p->value, p->ds_big_endian);
        switch (id) {
        case W_SAMPLES:
            info->samples_per_pixel = v;
            break;
        case W_PLANAR:
            info->planar_configuration = v;
            break;
        case W_ROWS:
            info->rows = v;
            break;
        case W_COLUMNS:
            info->columns = v;
            break;
        case W_BITS_ALLOCATED:
            info->bits_allocated = v;
            break;
        case W_BITS_STORED:
            info->bits_stored = v;
            break;
        case W_HIGH_BIT:
            info->high_bit = v;
            break;
        default:
            info->pixel_representation = v;
            break;
        }
        break;
    }
    case V_IS: {
        char *end;
        const char *s = text[0] == '+' ? text + 1 : text;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (*s < '0' || *s > '9' || *end != '\0' || errno != 0 || v == 0 || v > INT32_MAX) {
            return fail(p, "malformed %s (%04X,%04X) at offset %llu", w->name, TAG_GROUP(w->tag),
                        TAG_ELEMENT(w->tag), (unsigned long long)p->elem_offset);
        }
        info->frames = (uint32_t)v;
        break;
    }
    case V_DS: {
        double v;
        if (parse_ds(text, &v) != 0) {
            return fail(p, "malformed %s (%04X,%04X) at offset %llu", w->name, TAG_GROUP(w->tag),
                        TAG_ELEMENT(w->tag), (unsigned long long)p->elem_offset);
        }
        if (id == W_RESCALE_SLOPE) {
            info->rescale_slope = v;
        } else {
            info->rescale_intercept = v;
        }
        info->has_rescale = true;
        break;
    }
    }
    p->seen |= 1u << id;
    return 0;
}

static int on_value(th_dicom_probe *p)
{
    int rc = p->want < 0 ? on_transfer_syntax(p) : on_wanted_value(p, p->want);
    p->value_need = 0;
    p->value_len = 0;
    return rc;
}

/* ---- element headers ----------------------------------------------------------------------- */

/* The first 4 bytes of a header are in: read the tag, move from the meta header to the dataset
 * at the first tag outside group 0002, and say how long the header is. */
static int on_tag(th_dicom_probe *p)
{
    if (p->phase == PH_META && rd16(p->hdr, false) != 0x0002) {
        if (!p->have_syntax) {
            return fail(p, "missing TransferSyntaxUID (0002,0010) in the meta header");
        }
        p->phase = PH_DATASET;
    }
    bool be = cur_big_endian(p);
    p->tag = TAG(rd16(p->hdr, be), rd16(p->hdr + 2, be));
    p->hdr_need = (TAG_GROUP(p->tag) == 0xFFFE || cur_implicit(p)) ? 8 : 6;
    return 0;
}

/* The VR is in (explicit encodings): decide between the short and the long header. */
static int on_vr(th_dicom_probe *p)
{
    const unsigned char *vr = p->hdr + 4;
    if (vr_is_long(vr)) {
        p->hdr_need = 12;
    } else if (vr_is_short(vr)) {
        p->hdr_need = 8;
    } else if (p->phase == PH_META) {
        return fail(p, "unreadable meta header at offset %llu: invalid VR",
                    (unsigned long long)p->elem_offset);
    } else {
        return fail(p, "invalid VR for (%04X,%04X) at offset %llu (wrong transfer syntax?)",
                    TAG_GROUP(p->tag), TAG_ELEMENT(p->tag), (unsigned long long)p->elem_offset);
    }
    return 0;
}

static int push(th_dicom_probe *p, enum frame_kind kind, bool implicit, bool big_endian)
{
    if (p->depth == MAX_DEPTH) {
        return fail(p, "sequences nested deeper than %d levels at offset %llu", MAX_DEPTH,
                    (unsigned long long)p->elem_offset);
    }
    p->stack[p->depth++] =
        (frame){.kind = (unsigned char)kind, .implicit = implicit, .big_endian = big_endian};
    return 0;
}

/* An item, item delimiter or sequence delimiter (group FFFE). */
static int on_item_tag(th_dicom_probe *p, uint32_t vlen)
{
    frame *top = p->depth > 0 ? &p->stack[p->depth - 1] : NULL;
    unsigned long long at = (unsigned long long)p->elem_offset;
    switch (p->tag) {
    case TAG_ITEM:
        if (top == NULL || top->kind == FR_ITEM) {
            return fail(p, "item (FFFE,E000) outside a sequence at offset %llu", at);
        }
        if (vlen != UNDEFINED_LEN) {
            p->skip = vlen; /* nothing inside a defined-length item is needed */
            return 0;
        }
        if (top->kind == FR_FRAGMENTS) {
            return fail(p, "pixel data fragment of undefined length at offset %llu", at);
        }
        return push(p, FR_ITEM, top->implicit, top->big_endian);
    case TAG_ITEM_DELIM:
        if (top == NULL || top->kind != FR_ITEM) {
            return fail(p, "item delimiter (FFFE,E00D) outside an item at offset %llu", at);
        }
        p->depth--;
        return 0;
    case TAG_SEQ_DELIM:
        if (top == NULL || top->kind == FR_ITEM) {
            return fail(p, "sequence delimiter (FFFE,E0DD) outside a sequence at offset %llu", at);
        }
        p->depth--;
        if (top->kind == FR_FRAGMENTS) {
            p->phase = PH_DONE;
        }
        return 0;
    default:
        return fail(p, "unknown item tag (FFFE,%04X) at offset %llu", TAG_ELEMENT(p->tag), at);
    }
}

static int on_pixel_data(th_dicom_probe *p, uint32_t vlen)
{
    unsigned long long at = (unsigned long long)p->elem_offset;
    bool encapsulated_syntax = p->info.syntax == TH_DICOM_ENCAPSULATED;
    p->have_pixels = true;
    p->info.pixel_data_offset = p->offset;
    if (vlen == UNDEFINED_LEN) {
        if (!encapsulated_syntax) {
            return fail(p,
                        "PixelData (7FE0,0010) at offset %llu is encapsulated, but the "
                        "transfer syntax is not compressed",
                        at);
        }
        p->info.pixel_data_length = 0;
        return push(p, FR_FRAGMENTS, false, false);
    }
    if (encapsulated_syntax) {
        return fail(p,
                    "PixelData (7FE0,0010) at offset %llu is not encapsulated, but the "
                    "transfer syntax is compressed",
                    at);
    }
    p->info.pixel_data_length = vlen;
    p->skip = vlen;
    p->phase = vlen > 0 ? PH_PIXELS : PH_DONE;
    return 0;
}

/* The whole header is in: decide what to do with the value. */
static int on_header(th_dicom_probe *p)
{
    bool be = cur_big_endian(p);
    bool item_tag = TAG_GROUP(p->tag) == 0xFFFE;
    const unsigned char *vr = p->hdr + 4;
    uint32_t vlen;
    if (item_tag || cur_implicit(p)) {
        vlen = rd32(p->hdr + 4, be);
    } else if (p->hdr_need == 12) {
        vlen = rd32(p->hdr + 8, be);
    } else {
        vlen = rd16(p->hdr + 6, be);
    }
    unsigned long long at = (unsigned long long)p->elem_offset;

    if (p->phase == PH_META) {
        if (item_tag || vlen == UNDEFINED_LEN) {
            return fail(p, "unreadable meta header at offset %llu: unexpected %s", at,
                        item_tag ? "item tag" : "undefined length");
        }
        if (p->tag == TAG_TRANSFER_SYNTAX) {
            if (vlen > VALUE_MAX || vlen == 0) {
                return fail(p,
                            "unreadable meta header at offset %llu: malformed "
                            "TransferSyntaxUID (0002,0010)",
                            at);
            }
            p->want = -1;
            p->value_need = vlen;
            return 0;
        }
        p->skip = vlen;
        return 0;
    }
    if (item_tag) {
        return on_item_tag(p, vlen);
    }
    if (p->depth > 0 && p->stack[p->depth - 1].kind != FR_ITEM) {
        return fail(p, "element (%04X,%04X) where an item was expected at offset %llu",
                    TAG_GROUP(p->tag), TAG_ELEMENT(p->tag), at);
    }
    if (p->depth == 0 && p->tag == TAG_PIXEL_DATA) {
        return on_pixel_data(p, vlen);
    }
    if (vlen == UNDEFINED_LEN) {
        bool implicit = cur_implicit(p);
        if (implicit || vr_is(vr, "SQ")) {
            return push(p, FR_SEQ, implicit, be);
        }
        if (vr_is(vr, "UN")) {
            return push(p, FR_SEQ, true, false); /* PS3.5 6.2.2: implicit VR little endian */
        }
        if (vr_is(vr, "OB") || vr_is(vr, "OW")) {
            return push(p, FR_SEQ, false, be); /* nested encapsulated pixel data (an icon) */
        }
        return fail(p, "undefined length on (%04X,%04X) at offset %llu", TAG_GROUP(p->tag),
                    TAG_ELEMENT(p->tag), at);
    }
    int id = p->depth == 0 ? find_wanted(p->tag) : -1;
    if (id < 0) {
        p->skip = vlen;
        return 0;
    }
    if (vlen > VALUE_MAX) {
        return fail(p, "%s (%04X,%04X) at offset %llu is too long (%lu bytes)", wanted[id].name,
                    TAG_GROUP(p->tag), TAG_ELEMENT(p->tag), at, (unsigned long)vlen);
    }
    p->want = id;
    if (vlen == 0) {
        return on_value(p);
    }
    p->value_need = vlen;
    return 0;
}

/* ---- the probe ----------------------------------------------------------------------------- */

int th_dicom_probe_create(th_dicom_probe **out)
{
    th_dicom_probe *p = th_malloc(sizeof(*p));
    if (p == NULL) {
        return TH_ENOMEM;
    }
    probe_init(p);
    *out = p;
    return 0;
}

void th_dicom_probe_destroy(th_dicom_probe *probe)
{
    th_free(probe);
}

int th_dicom_probe_feed(th_dicom_probe *p, const void *data, size_t len)
{
    const unsigned char *in = data;
    while (len > 0) {
        size_t n;
        if (p->phase == PH_FAILED) {
            return TH_EPARSE;
        }
        if (p->phase == PH_DONE) {
            p->offset += len;
            return 0;
        }
        if (p->phase == PH_PREAMBLE) {
            if (p->offset < PREAMBLE_LEN) {
                n = len < PREAMBLE_LEN - p->offset ? len : (size_t)(PREAMBLE_LEN - p->offset);
            } else {
                n = len < 4 - p->hdr_len ? len : 4 - p->hdr_len;
                memcpy(p->hdr + p->hdr_len, in, n);
                p->hdr_len += n;
                if (p->hdr_len == 4) {
                    if (memcmp(p->hdr, "DICM", 4) != 0) {
                        p->offset += n;
                        return fail(p, "not DICOM: no DICM preamble");
                    }
                    p->phase = PH_META;
                    p->hdr_len = 0;
                }
            }
        } else if (p->skip > 0) {
            n = len < p->skip ? len : (size_t)p->skip;
            p->skip -= n;
            if (p->skip == 0 && p->phase == PH_PIXELS) {
                p->phase = PH_DONE;
            }
        } else if (p->value_need > 0) {
            n = len < p->value_need - p->value_len ? len : p->value_need - p->value_len;
            memcpy(p->value + p->value_len, in, n);
            p->value_len += n;
            if (p->value_len == p->value_need) {
                p->offset += n;
                in += n;
                len -= n;
                if (on_value(p) != 0) {
                    return TH_EPARSE;
                }
                continue;
            }
        } else {
            if (p->hdr_len == 0) {
                p->elem_offset = p->offset;
            }
            size_t need = p->hdr_len < 4 ? 4 : p->hdr_need;
            n = len < need - p->hdr_len ? len : need - p->hdr_len;
            memcpy(p->hdr + p->hdr_len, in, n);
            p->hdr_len += n;
            p->offset += n;
            in += n;
            len -= n;
            if (p->hdr_len < need) {
                continue;
            }
            int rc;
            if (p->hdr_len == 4) {
                rc = on_tag(p);
            } else if (need == 6) {
                rc = on_vr(p);
            } else {
                p->hdr_len = 0;
                rc = on_header(p);
            }
            if (rc != 0) {
                return TH_EPARSE;
            }
            continue;
        }
        p->offset += n;
        in += n;
        len -= n;
    }
    return p->phase == PH_FAILED ? TH_EPARSE : 0;
}

bool th_dicom_probe_done(const th_dicom_probe *p)
{
    return p->phase == PH_DONE || p->phase == PH_FAILED;
}

static bool mul_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* Fills in the defaults and the decodability verdict. */
static void judge_decodable(th_dicom_info *info)
{
    info->pixel_data_decodable = false;
    if (info->syntax == TH_DICOM_ENCAPSULATED) {
        info->undecodable = "compressed transfer syntax";
    } else if (info->syntax == TH_DICOM_EXPLICIT_BE) {
        info->undecodable = "big-endian transfer syntax";
    } else if (info->bits_allocated != 8 && info->bits_allocated != 16) {
        info->undecodable = "BitsAllocated is not 8 or 16";
    } else if (info->samples_per_pixel != 1 && info->samples_per_pixel != 3) {
        info->undecodable = "SamplesPerPixel is not 1 or 3";
    } else if (info->samples_per_pixel == 3 && strcmp(info->photometric, "RGB") != 0) {
        info->undecodable = "3 samples per pixel that are not RGB";
    } else if (info->bits_stored == 0 || info->bits_stored > info->bits_allocated ||
               info->high_bit >= info->bits_allocated || info->high_bit + 1u < info->bits_stored) {
        info->undecodable = "BitsStored or HighBit out of range";
    } else if (info->pixel_representation > 1) {
        info->undecodable = "PixelRepresentation is not 0 or 1";
    } else if (info->samples_per_pixel == 3 && info->planar_configuration > 1) {
        info->undecodable = "PlanarConfiguration is not 0 or 1";
    } else {
        info->pixel_data_decodable = true;
        info->undecodable = NULL;
    }
}

/* Bytes of pixel data an uncompressed image needs, or UINT64_MAX when it cannot be counted. */
static uint64_t native_bytes(const th_dicom_info *info)
{
    uint64_t n = info->rows;
    if (!mul_u64(n, info->columns, &n) || !mul_u64(n, info->frames, &n) ||
        !mul_u64(n, info->samples_per_pixel, &n) || !mul_u64(n, info->bits_allocated, &n)) {
        return UINT64_MAX;
    }
    return n / 8 + (n % 8 != 0);
}

/* The verdict on what was fed. pixels_pending: PixelData's value may still be unread (the reader
 * stops feeding at its start and checks its length against the file itself). */
static int probe_result(const th_dicom_probe *p, bool pixels_pending, th_dicom_info *info,
                        char *errbuf, size_t errlen)
{
    unsigned long long off = (unsigned long long)p->offset;
    switch (p->phase) {
    case PH_FAILED:
        put_err(errbuf, errlen, "%s", p->err);
        return TH_EPARSE;
    case PH_PREAMBLE:
        put_err(errbuf, errlen, "not DICOM: no DICM preamble");
        return TH_EPARSE;
    case PH_META:
        if (p->hdr_len > 0 || p->value_need > 0 || p->skip > 0) {
            put_err(errbuf, errlen,
                    "unreadable meta header at offset %llu: the file ends at offset %llu",
                    (unsigned long long)p->elem_offset, off);
            return TH_EPARSE;
        }
        if (!p->have_syntax) {
            put_err(errbuf, errlen, "missing TransferSyntaxUID (0002,0010) in the meta header");
            return TH_EPARSE;
        }
        break; /* a meta header and an empty dataset: the checks below say what is missing */
    case PH_DATASET:
        if (p->hdr_len > 0 && p->hdr_len < 4) {
            put_err(errbuf, errlen, "truncated at offset %llu, inside an element header", off);
            return TH_EPARSE;
        }
        if (p->hdr_len > 0 || p->value_need > 0 || p->skip > 0) {
            put_err(errbuf, errlen,
                    "truncated at offset %llu: element (%04X,%04X) at offset %llu is incomplete",
                    off, TAG_GROUP(p->tag), TAG_ELEMENT(p->tag),
                    (unsigned long long)p->elem_offset);
            return TH_EPARSE;
        }
        if (p->depth > 0) {
            put_err(errbuf, errlen, "truncated at offset %llu: %s", off,
                    p->have_pixels ? "encapsulated PixelData (7FE0,0010) has no end"
                                   : "a sequence has no end");
            return TH_EPARSE;
        }
        break;
    case PH_PIXELS:
        if (!pixels_pending) {
            put_err(errbuf, errlen,
                    "truncated at offset %llu: PixelData (7FE0,0010) has %llu of its %llu bytes",
                    off, (unsigned long long)(p->info.pixel_data_length - p->skip),
                    (unsigned long long)p->info.pixel_data_length);
            return TH_EPARSE;
        }
        break;
    case PH_DONE:
        break;
    }

    static const int required[] = {W_ROWS, W_COLUMNS, W_MODALITY};
    char missing[128] = "";
    size_t used = 0;
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
        const struct wanted *w = &wanted[required[i]];
        if (!(p->seen & (1u << required[i]))) {
            int n = snprintf(missing + used, sizeof(missing) - used, "%s%s (%04X,%04X)",
                             used ? ", " : "", w->name, TAG_GROUP(w->tag), TAG_ELEMENT(w->tag));
            used += (size_t)n;
        }
    }
    if (used > 0) {
        put_err(errbuf, errlen, "missing %s", missing);
        return TH_EPARSE;
    }
    if (!p->have_pixels) {
        put_err(errbuf, errlen, "missing PixelData (7FE0,0010)");
        return TH_EPARSE;
    }
    if (p->info.rows == 0 || p->info.columns == 0) {
        put_err(errbuf, errlen, "%s is 0",
                p->info.rows == 0 ? "Rows (0028,0010)" : "Columns (0028,0011)");
        return TH_EPARSE;
    }
    th_dicom_info result = p->info;
    if (!(p->seen & (1u << W_BITS_STORED))) {
        result.bits_stored = result.bits_allocated;
    }
    if (!(p->seen & (1u << W_HIGH_BIT))) {
        result.high_bit = result.bits_stored > 0 ? (uint16_t)(result.bits_stored - 1) : 0;
    }
    if (result.syntax != TH_DICOM_ENCAPSULATED) {
        if (result.bits_allocated == 0) {
            put_err(errbuf, errlen, "missing BitsAllocated (0028,0100)");
            return TH_EPARSE;
        }
        uint64_t need = native_bytes(&result);
        if (result.pixel_data_length < need) {
            put_err(errbuf, errlen,
                    "PixelData (7FE0,0010) has %llu bytes; Rows x Columns x NumberOfFrames x "
                    "SamplesPerPixel x BitsAllocated needs %llu",
                    (unsigned long long)result.pixel_data_length, (unsigned long long)need);
            return TH_EPARSE;
        }
    }
    judge_decodable(&result);
    *info = result;
    return 0;
}

int th_dicom_probe_finish(const th_dicom_probe *p, th_dicom_info *info, char *errbuf, size_t errlen)
{
    return probe_result(p, false, info, errbuf, errlen);
}

/* ---- reading and decoding ------------------------------------------------------------------ */

/* Where the bytes come from: a file descriptor or memory. */
typedef struct source {
    int fd; /* -1 for memory */
    const unsigned char *mem;
    uint64_t size;
} source;

/* Reads up to n bytes at off; *got is 0 at the end. Returns 0 or TH_EIO. */
static int source_read(const source *s, uint64_t off, unsigned char *buf, size_t n, size_t *got)
{
    if (s->fd < 0) {
        uint64_t left = off < s->size ? s->size - off : 0;
        size_t k = n < left ? n : (size_t)left;
        if (k > 0) {
            memcpy(buf, s->mem + off, k);
        }
        *got = k;
        return 0;
    }
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(s->fd, buf + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            return TH_EIO;
        }
        if (r == 0) {
            break;
        }
        done += (size_t)r;
    }
    *got = done;
    return 0;
}

/* Where decoded sample k (in file order) goes: planar configuration 1 stores each frame as an R
 * plane, a G plane and a B plane; the image keeps R,G,B interleaved. */
static uint64_t sample_index(const th_dicom_image *img, uint64_t k)
{
    if (img->info.samples_per_pixel != 3 || img->info.planar_configuration == 0) {
        return k;
    }
    uint64_t per_frame = img->pixels / img->info.frames;
    uint64_t frame_samples = per_frame * 3;
    uint64_t frame_no = k / frame_samples, r = k % frame_samples;
    uint64_t plane = r / per_frame, pixel = r % per_frame;
    return frame_no * frame_samples + pixel * 3 + plane;
}

static int decode_pixels(th_ctx *ctx, const source *src, th_dicom_image *img, char *errbuf,
                         size_t errlen)
{
    const th_dicom_info *info = &img->info;
    size_t bytes_per_sample = info->bits_allocated / 8u;
    unsigned shift = (unsigned)(info->high_bit + 1u - info->bits_stored);
    uint32_t mask = info->bits_stored >= 32 ? UINT32_MAX : (UINT32_C(1) << info->bits_stored) - 1;
    uint32_t sign = UINT32_C(1) << (info->bits_stored - 1);
    bool is_signed = info->pixel_representation == 1;
    uint64_t total = img->samples * bytes_per_sample;

    unsigned char *chunk = NULL;
    if (src->fd >= 0) {
        chunk = th_malloc(DECODE_CHUNK);
        if (chunk == NULL) {
            return TH_ENOMEM;
        }
    }
    int rc = 0;
    uint64_t k = 0;
    for (uint64_t done = 0; done < total && rc == 0;) {
        if ((rc = th_ctx_err(ctx)) != 0) {
            put_err(errbuf, errlen, "canceled while decoding pixel data");
            break;
        }
        size_t want = total - done < DECODE_CHUNK ? (size_t)(total - done) : DECODE_CHUNK;
        const unsigned char *bytes;
        size_t got;
        uint64_t at = info->pixel_data_offset + done;
        if (src->fd < 0) {
            bytes = src->mem + at;
            got = want;
        } else {
            rc = source_read(src, at, chunk, want, &got);
            if (rc != 0) {
                put_err(errbuf, errlen, "cannot read pixel data: %s", strerror(errno));
                break;
            }
            if (got < want) {
                rc = TH_EPARSE;
                put_err(errbuf, errlen,
                        "truncated at offset %llu: PixelData (7FE0,0010) ends early",
                        (unsigned long long)(at + got));
                break;
            }
            bytes = chunk;
        }
        for (size_t i = 0; i < got; i += bytes_per_sample, k++) {
            uint32_t raw = bytes_per_sample == 1 ? bytes[i] : rd16(bytes + i, false);
            uint32_t v = (raw >> shift) & mask;
            int32_t value = (int32_t)v;
            if (is_signed && (v & sign)) {
                value = (int32_t)((int64_t)v - ((int64_t)mask + 1));
            }
            img->stored[sample_index(img, k)] = value;
        }
        done += got;
    }
    th_free(chunk);
    return rc;
}

static int read_source(th_ctx *ctx, const source *src, th_dicom_image *image, char *errbuf,
                       size_t errlen)
{
    th_dicom_probe probe;
    probe_init(&probe);
    unsigned char *chunk = NULL;
    if (src->fd >= 0) {
        chunk = th_malloc(READ_CHUNK);
        if (chunk == NULL) {
            put_err(errbuf, errlen, "out of memory");
            return TH_ENOMEM;
        }
    }
    /* Feed the header until PixelData's value starts: its bytes are read once, below. */
    uint64_t off = 0;
    int rc = 0;
    while (probe.phase != PH_PIXELS && !th_dicom_probe_done(&probe)) {
        if ((rc = th_ctx_err(ctx)) != 0) {
            put_err(errbuf, errlen, "canceled while reading the header");
            break;
        }
        size_t got;
        const unsigned char *bytes;
        if (src->fd < 0) {
            uint64_t left = src->size - off;
            got = left < READ_CHUNK ? (size_t)left : READ_CHUNK;
            bytes = src->mem + off;
        } else {
            rc = source_read(src, off, chunk, READ_CHUNK, &got);
            if (rc != 0) {
                put_err(errbuf, errlen, "cannot read the image: %s", strerror(errno));
                break;
            }
            bytes = chunk;
        }
        if (got == 0) {
            break;
        }
        off += got;
        if (th_dicom_probe_feed(&probe, bytes, got) != 0) {
            break; /* the probe keeps the reason; probe_result() reports it */
        }
    }
    th_free(chunk);
    if (rc != 0) {
        return rc;
    }
    th_dicom_image img = {.slope = 1.0};
    rc = probe_result(&probe, true, &img.info, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    const th_dicom_info *info = &img.info;
    if (!info->pixel_data_decodable) {
        put_err(errbuf, errlen, "pixel data not decodable here: %s (%s)", info->undecodable,
                info->transfer_syntax);
        return TH_EUNSUPPORTED;
    }
    img.pixels = (uint64_t)info->rows * info->columns;
    if (!mul_u64(img.pixels, info->frames, &img.pixels) ||
        !mul_u64(img.pixels, info->samples_per_pixel, &img.samples) ||
        img.samples > TH_DICOM_MAX_SAMPLES) {
        put_err(errbuf, errlen,
                "image too large: %u x %u x %u frames x %u samples; the limit is "
                "%llu samples",
                (unsigned)info->rows, (unsigned)info->columns, (unsigned)info->frames,
                (unsigned)info->samples_per_pixel, (unsigned long long)TH_DICOM_MAX_SAMPLES);
        return TH_ETOOBIG;
    }
    uint64_t need = img.samples * (info->bits_allocated / 8u);
    uint64_t size = src->size;
    if (src->fd >= 0) {
        struct stat st;
        size = fstat(src->fd, &st) == 0 ? (uint64_t)st.st_size : 0;
    }
    if (info->pixel_data_offset + need > size) {
        put_err(errbuf, errlen,
                "truncated at offset %llu: PixelData (7FE0,0010) needs %llu bytes from offset %llu",
                (unsigned long long)size, (unsigned long long)need,
                (unsigned long long)info->pixel_data_offset);
        return TH_EPARSE;
    }
    if (info->samples_per_pixel == 1 && info->has_rescale) {
        img.slope = info->rescale_slope;
        img.intercept = info->rescale_intercept;
    }
    img.stored = th_calloc((size_t)img.samples, sizeof(int32_t));
    if (img.stored == NULL) {
        put_err(errbuf, errlen, "out of memory for %llu samples", (unsigned long long)img.samples);
        return TH_ENOMEM;
    }
    rc = decode_pixels(ctx, src, &img, errbuf, errlen);
    if (rc != 0) {
        th_free(img.stored);
        return rc;
    }
    *image = img;
    return 0;
}

int th_dicom_read_file(th_ctx *ctx, const char *path, th_dicom_image *image, char *errbuf,
                       size_t errlen)
{
    if (th__fault_should_fail()) {
        put_err(errbuf, errlen, "cannot open the image: out of descriptors (injected)");
        return TH_EIO;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        put_err(errbuf, errlen, "cannot open the image: %s", strerror(err));
        return err == ENOENT ? TH_ENOTFOUND : TH_EIO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        put_err(errbuf, errlen, "cannot open the image: not a regular file");
        close(fd);
        return TH_EIO;
    }
    source src = {.fd = fd, .mem = NULL, .size = (uint64_t)st.st_size};
    int rc = read_source(ctx, &src, image, errbuf, errlen);
    close(fd);
    return rc;
}

int th_dicom_read_mem(th_ctx *ctx, const void *data, size_t len, th_dicom_image *image,
                      char *errbuf, size_t errlen)
{
    source src = {.fd = -1, .mem = data, .size = len};
    return read_source(ctx, &src, image, errbuf, errlen);
}

void th_dicom_image_free(th_dicom_image *image)
{
    if (image == NULL) {
        return;
    }
    th_free(image->stored);
    memset(image, 0, sizeof(*image));
}
