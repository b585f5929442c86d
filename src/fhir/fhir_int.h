/* Internals shared by the FHIR module's files: the compiled form of a Questionnaire (built by
 * questionnaire.c, read by qr.c and score.c), the parsed response with its per-item answer
 * state (built by qr.c, read by score.c), and the issue list's body (outcome.c). */
#ifndef TRIALHUB_FHIR_INT_H
#define TRIALHUB_FHIR_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/fhir.h"

/* Questionnaire.item.type (R4). */
typedef enum th__qtype {
    TH__QT_GROUP,
    TH__QT_DISPLAY,
    TH__QT_QUESTION, /* abstract in R4; any answer type accepted */
    TH__QT_BOOLEAN,
    TH__QT_DECIMAL,
    TH__QT_INTEGER,
    TH__QT_DATE,
    TH__QT_DATETIME,
    TH__QT_TIME,
    TH__QT_STRING,
    TH__QT_TEXT,
    TH__QT_URL,
    TH__QT_CHOICE,
    TH__QT_OPEN_CHOICE,
    TH__QT_ATTACHMENT,
    TH__QT_REFERENCE,
    TH__QT_QUANTITY
} th__qtype;

/* Answer value[x] kinds, as bits so an item can accept several. */
enum {
    TH__V_BOOLEAN = 1u << 0,
    TH__V_DECIMAL = 1u << 1,
    TH__V_INTEGER = 1u << 2,
    TH__V_DATE = 1u << 3,
    TH__V_DATETIME = 1u << 4,
    TH__V_TIME = 1u << 5,
    TH__V_STRING = 1u << 6,
    TH__V_URI = 1u << 7,
    TH__V_ATTACHMENT = 1u << 8,
    TH__V_CODING = 1u << 9,
    TH__V_QUANTITY = 1u << 10,
    TH__V_REFERENCE = 1u << 11,
    TH__V_ANY = (1u << 12) - 1
};

/* One allowed answer: an answerOption, or a code of the item's answerValueSet. For codings,
 * system NULL matches any system and code NULL any code of the system (a ValueSet that
 * includes a whole code system trialhub does not hold). */
typedef struct th__option {
    unsigned kind; /* one TH__V_* bit */
    const char *system;
    const char *code;
    const char *str; /* valueString, valueDate, valueTime */
    json_int_t integer;
    double weight;
    bool has_weight;
} th__option;

#define TH__NO_ITEM UINT32_MAX

typedef struct th__item {
    const char *link_id; /* points into the Questionnaire JSON */
    size_t link_id_len;
    const char *loinc; /* first item.code with system http://loinc.org, or NULL */
    th__qtype type;
    unsigned accepts;   /* TH__V_* bits an answer may use */
    uint32_t parent;    /* index of the parent item, TH__NO_ITEM at the top level */
    uint32_t *children; /* indexes of the child items, in order */
    uint32_t nchildren;
    bool required;
    bool repeats;
    bool read_only;
    bool calculated;  /* has an SDC calculatedExpression: the app computes it */
    bool enable_when; /* conditional: never reported as missing */
    bool has_min, has_max;
    double min_value, max_value; /* minValue/maxValue extensions (integer, decimal) */
    long max_length;             /* item.maxLength, -1 when none */
    const th__option *options;   /* answerOption, or the resolved answerValueSet */
    size_t noptions;
    bool options_closed; /* an answer must match one of options */
} th__item;

struct th_fhir_instrument {
    json_t *json; /* the Questionnaire; strings below point into it */
    const char *url;
    size_t url_len;
    const char *version;
    const char *id;
    const char *title;
    bool builtin;
    th_fhir_scale scale;
    th__item *items; /* every item, depth first */
    uint32_t nitems;
    uint32_t *roots; /* top-level items */
    uint32_t nroots;
    uint32_t *hash; /* linkId -> item index + 1; open addressing, 0 is empty */
    uint32_t hash_mask;
    th_fhir_score_kind score_kind;
    uint32_t *scored; /* the items whose weights make the score */
    uint32_t nscored;
    uint32_t alert_item;     /* PHQ-9 item 9, TH__NO_ITEM when none */
    uint32_t app_score_item; /* the app's own total, TH__NO_ITEM when none */
};

/* Returns the item index for a linkId, or TH__NO_ITEM. */
uint32_t th__instrument_lookup(const th_fhir_instrument *inst, const char *link_id, size_t len);

/* FNV-1a, shared by the registry's table builder and the lookup. */
static inline uint32_t th__fhir_hash(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return h;
}

/* What one response did to one Questionnaire item. */
typedef struct th__item_state {
    uint32_t seen_serial;     /* instance of the parent where the item last appeared */
    uint32_t answered_serial; /* instance of the parent where it last had an answer */
    uint32_t nweights;        /* weighted answers counted */
    bool has_number;
    double weight_sum;
    double number; /* last valueInteger/valueDecimal, for the app's total */
} th__item_state;

struct th_fhir_issues {
    th_fhir_issue *v;
    size_t n, cap;
    size_t nerrors;
    size_t omitted;
};

/* Frees what an embedded issue list owns and empties it. */
void th__fhir_issues_clear(th_fhir_issues *issues);

#define TH__QR_INLINE_STATES 24

struct th_qr {
    json_t *root;
    th_qr_fields fields;
    th_fhir_issues issues;
    th__item_state *state; /* instrument->nitems entries, or NULL without instrument */
    th__item_state inline_state[TH__QR_INLINE_STATES];
};

/* Builds FHIR-safe text: copies at most cap-1 bytes of src into dst, cutting at a UTF-8
 * boundary and replacing invalid bytes by '?'. Returns the length written. */
size_t th__fhir_utf8_copy(char *dst, size_t cap, const char *src);

#endif
