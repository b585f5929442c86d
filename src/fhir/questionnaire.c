/* The Questionnaire registry: compiles FHIR Questionnaire resources (the built-in PHQ-9 and
 * GAD-7, and files loaded at start-up with their CodeSystems and ValueSets) into flat item
 * tables with allowed answers, weights and a scoring rule, so that validating and scoring a
 * response never touches the Questionnaire's JSON again. Immutable once loading is done.
 *
 * Memory: every compiled table lives in the registry's arena; strings point into the JSON
 * documents the registry keeps a reference to. A failed load rolls the arena and the arrays
 * back to where they were, so the registry is unchanged. */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <regex.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fhir/fhir_int.h"
#include "trialhub/alloc.h"

/* Embedded by cmake/th_embed_file.cmake from src/fhir/builtin/{phq9,gad7}.json. */
extern const unsigned char th__fhir_builtin_phq9[];
extern const size_t th__fhir_builtin_phq9_len;
extern const unsigned char th__fhir_builtin_gad7[];
extern const size_t th__fhir_builtin_gad7_len;

#define LOINC             "http://loinc.org"
#define EXT_ITEM_WEIGHT   "http://hl7.org/fhir/StructureDefinition/itemWeight"
#define EXT_ORDINAL_VALUE "http://hl7.org/fhir/StructureDefinition/ordinalValue"
#define EXT_CO_VALUE      "http://hl7.org/fhir/StructureDefinition/iso21090-CO-value"
#define EXT_MIN_VALUE     "http://hl7.org/fhir/StructureDefinition/minValue"
#define EXT_MAX_VALUE     "http://hl7.org/fhir/StructureDefinition/maxValue"
#define EXT_VARIABLE      "http://hl7.org/fhir/StructureDefinition/variable"
#define EXT_CALCULATED \
    "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-calculatedExpression"
#define PROP_ITEM_WEIGHT_URI "http://hl7.org/fhir/concept-properties#itemWeight"
#define MAX_ITEM_DEPTH       32
#define MAX_FILE_BYTES       (16u << 20)

/* ---- arena -------------------------------------------------------------------------------- */

typedef struct arena_chunk {
    struct arena_chunk *prev;
    size_t cap, used;
    max_align_t data[];
} arena_chunk;

typedef struct arena_mark {
    arena_chunk *head;
    size_t used;
} arena_mark;

static void *arena_alloc(arena_chunk **head, size_t size)
{
    const size_t align = alignof(max_align_t);
    size = (size + align - 1) & ~(align - 1);
    arena_chunk *c = *head;
    if (c == NULL || c->cap - c->used < size) {
        size_t cap = size > 16384 ? size : 16384;
        c = th_malloc(sizeof(*c) + cap);
        if (c == NULL) {
            return NULL;
        }
        c->prev = *head;
        c->cap = cap;
        c->used = 0;
        *head = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += size;
    memset(p, 0, size);
    return p;
}

static void arena_rollback(arena_chunk **head, arena_mark mark)
{
    while (*head != mark.head) {
        arena_chunk *prev = (*head)->prev;
        th_free(*head);
        *head = prev;
    }
    if (*head != NULL) {
        (*head)->used = mark.used;
    }
}

/* ---- registry ----------------------------------------------------------------------------- */

typedef struct cs_entry {
    json_t *json;
    const char *url;
    const char *version;
    const char *value_set; /* CodeSystem.valueSet: the value set of all its codes */
    th__option *concepts;
    size_t n;
} cs_entry;

typedef struct vs_entry {
    json_t *json;
    const char *url;
    const char *version;
    th__option *options;
    size_t n;
} vs_entry;

struct th_qreg {
    arena_chunk *arena;
    th_fhir_instrument **inst;
    size_t ninst, capinst;
    cs_entry *cs;
    size_t ncs, capcs;
    vs_entry *vs;
    size_t nvs, capvs;
    char *bundle;
    size_t bundle_len;
};

/* Where a load is: for error messages and rollback. */
typedef struct loader {
    th_qreg *reg;
    char *err;
    size_t errlen;
    const char *name; /* file (or "file#entry[i]") being compiled */
    bool builtin;
} loader;

TH_FHIR_PRINTF(3, 4)
static int fail(loader *ld, int rc, const char *fmt, ...)
{
    if (ld->err != NULL && ld->errlen > 0) {
        char msg[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        snprintf(ld->err, ld->errlen, "%s: %s", ld->name != NULL ? ld->name : "?", msg);
    }
    return rc;
}

static int grow(void **v, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap) {
        return TH_OK;
    }
    size_t ncap = *cap == 0 ? 8 : *cap * 2;
    void *nv = th_realloc_array(*v, ncap, elem);
    if (nv == NULL) {
        return TH_ENOMEM;
    }
    *v = nv;
    *cap = ncap;
    return TH_OK;
}

/* ---- JSON helpers ------------------------------------------------------------------------- */

static const char *jstr(const json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static json_t *ext_get(const json_t *elem, const char *url)
{
    json_t *exts = json_object_get(elem, "extension");
    size_t i;
    json_t *e;
    json_array_foreach(exts, i, e)
    {
        const char *u = jstr(e, "url");
        if (u != NULL && strcmp(u, url) == 0) {
            return e;
        }
    }
    return NULL;
}

/* 1 with *out set when the extension (url) has a finite valueDecimal/valueInteger, 0 when the
 * extension is absent, -1 when it is present without a usable number. */
static int ext_number(const json_t *elem, const char *url, double *out)
{
    json_t *e = ext_get(elem, url);
    if (e == NULL) {
        return 0;
    }
    json_t *v = json_object_get(e, "valueDecimal");
    if (v == NULL) {
        v = json_object_get(e, "valueInteger");
    }
    if (!json_is_number(v) || !isfinite(json_number_value(v))) {
        return -1;
    }
    *out = json_number_value(v);
    return 1;
}

/* The weight an element carries itself: itemWeight, or the older ordinalValue or
 * iso21090-CO-value. Same return convention as ext_number. */
static int elem_weight(const json_t *elem, double *out)
{
    static const char *const urls[] = {EXT_ITEM_WEIGHT, EXT_ORDINAL_VALUE, EXT_CO_VALUE};
    for (size_t i = 0; i < sizeof(urls) / sizeof(urls[0]); i++) {
        int r = ext_number(elem, urls[i], out);
        if (r != 0) {
            return r;
        }
    }
    return 0;
}

/* Splits "url|version" into the url's length and the version (NULL if none). */
static size_t canonical_split(const char *canonical, const char **version)
{
    const char *bar = strchr(canonical, '|');
    if (bar == NULL) {
        *version = NULL;
        return strlen(canonical);
    }
    *version = bar[1] != '\0' ? bar + 1 : NULL;
    return (size_t)(bar - canonical);
}

static bool same_version(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static bool url_eq(const char *url, const char *s, size_t len)
{
    return strncmp(url, s, len) == 0 && url[len] == '\0';
}

/* ---- CodeSystems and ValueSets ------------------------------------------------------------ */

static const cs_entry *find_cs(const th_qreg *reg, const char *canonical)
{
    const char *version;
    size_t len = canonical_split(canonical, &version);
    const cs_entry *any = NULL;
    for (size_t i = 0; i < reg->ncs; i++) {
        const cs_entry *cs = &reg->cs[i];
        if (url_eq(cs->url, canonical, len)) {
            if (version == NULL || (cs->version != NULL && strcmp(cs->version, version) == 0)) {
                return cs;
            }
            if (any == NULL) {
                any = cs;
            }
        }
    }
    return any;
}

static const th__option *cs_concept(const cs_entry *cs, const char *code)
{
    for (size_t i = 0; i < cs->n; i++) {
        if (strcmp(cs->concepts[i].code, code) == 0) {
            return &cs->concepts[i];
        }
    }
    return NULL;
}

/* Fills in a coding option's weight from its CodeSystem when the option carries none. */
static void weight_from_cs(const th_qreg *reg, th__option *opt)
{
    if (opt->has_weight || opt->system == NULL || opt->code == NULL) {
        return;
    }
    const cs_entry *cs = find_cs(reg, opt->system);
    const th__option *c = cs != NULL ? cs_concept(cs, opt->code) : NULL;
    if (c != NULL && c->has_weight) {
        opt->weight = c->weight;
        opt->has_weight = true;
    }
}

/* Counts the entries of a nested array (CodeSystem.concept by "concept", a ValueSet expansion
 * by "contains"), to size the flattened copy before filling it. */
static size_t count_nested(const json_t *entries, const char *child_key, int depth)
{
    size_t n = 0, i;
    json_t *c;
    if (depth > MAX_ITEM_DEPTH) {
        return 0;
    }
    json_array_foreach(entries, i, c)
    {
        n += 1 + count_nested(json_object_get(c, child_key), child_key, depth + 1);
    }
    return n;
}

/* Flattens CodeSystem.concept (nested) into cs->concepts with their weights. weight_props are
 * the property codes that mean itemWeight in this CodeSystem. */
static int flatten_concepts(loader *ld, cs_entry *cs, const json_t *concepts, int depth,
                            const char **weight_props, size_t nprops)
{
    size_t i;
    json_t *c;
    if (depth > MAX_ITEM_DEPTH) {
        return fail(ld, TH_EINVAL, "CodeSystem concepts nested deeper than %d", MAX_ITEM_DEPTH);
    }
    json_array_foreach(concepts, i, c)
    {
        const char *code = jstr(c, "code");
        if (code == NULL) {
            return fail(ld, TH_EINVAL, "CodeSystem concept without a code");
        }
        th__option *opt = &cs->concepts[cs->n++];
        opt->kind = TH__V_CODING;
        opt->system = cs->url;
        opt->code = code;
        double w;
        int r = elem_weight(c, &w);
        if (r < 0) {
            return fail(ld, TH_EINVAL, "concept '%s': weight extension without a number", code);
        }
        size_t j;
        json_t *p;
        json_array_foreach(json_object_get(c, "property"), j, p)
        {
            const char *pcode = jstr(p, "code");
            for (size_t k = 0; r == 0 && pcode != NULL && k < nprops; k++) {
                if (strcmp(pcode, weight_props[k]) != 0) {
                    continue;
                }
                json_t *v = json_object_get(p, "valueDecimal");
                if (v == NULL) {
                    v = json_object_get(p, "valueInteger");
                }
                if (!json_is_number(v) || !isfinite(json_number_value(v))) {
                    return fail(ld, TH_EINVAL, "concept '%s': property '%s' is not a number", code,
                                pcode);
                }
                w = json_number_value(v);
                r = 1;
            }
        }
        opt->weight = r > 0 ? w : 0;
        opt->has_weight = r > 0;
        int rc = flatten_concepts(ld, cs, json_object_get(c, "concept"), depth + 1, weight_props,
                                  nprops);
        if (rc != TH_OK) {
            return rc;
        }
    }
    return TH_OK;
}

static int add_codesystem(loader *ld, json_t *doc)
{
    th_qreg *reg = ld->reg;
    const char *url = jstr(doc, "url");
    if (url == NULL || url[0] == '\0') {
        return fail(ld, TH_EINVAL, "CodeSystem has no url");
    }
    const char *version = jstr(doc, "version");
    for (size_t i = 0; i < reg->ncs; i++) {
        if (strcmp(reg->cs[i].url, url) == 0 && same_version(reg->cs[i].version, version)) {
            return fail(ld, TH_EEXIST, "CodeSystem %s|%s is already loaded", url,
                        version != NULL ? version : "");
        }
    }
    /* Which property codes carry the weight: declared with the itemWeight URI, or named so. */
    const char *props[8];
    size_t nprops = 0;
    size_t i;
    json_t *p;
    json_array_foreach(json_object_get(doc, "property"), i, p)
    {
        const char *code = jstr(p, "code");
        const char *uri = jstr(p, "uri");
        if (code != NULL && nprops < 8 &&
            ((uri != NULL && strcmp(uri, PROP_ITEM_WEIGHT_URI) == 0) ||
             strcmp(code, "itemWeight") == 0)) {
            props[nprops++] = code;
        }
    }
    int rc = grow((void **)&reg->cs, &reg->capcs, reg->ncs, sizeof(*reg->cs));
    if (rc != TH_OK) {
        return rc;
    }
    cs_entry cs = {.json = doc, .url = url, .version = version, .value_set = jstr(doc, "valueSet")};
    json_t *concepts = json_object_get(doc, "concept");
    size_t total = count_nested(concepts, "concept", 0);
    cs.concepts = arena_alloc(&reg->arena, (total + 1) * sizeof(th__option));
    if (cs.concepts == NULL) {
        return TH_ENOMEM;
    }
    rc = flatten_concepts(ld, &cs, concepts, 0, props, nprops);
    if (rc != TH_OK) {
        return rc;
    }
    json_incref(doc);
    reg->cs[reg->ncs++] = cs;
    return TH_OK;
}

/* Collects expansion.contains (nested) as options. */
static int vs_expansion(loader *ld, const json_t *contains, int depth, th__option *opts, size_t *n,
                        size_t cap)
{
    size_t i;
    json_t *c;
    if (depth > MAX_ITEM_DEPTH) {
        return fail(ld, TH_EINVAL, "ValueSet expansion nested deeper than %d", MAX_ITEM_DEPTH);
    }
    json_array_foreach(contains, i, c)
    {
        const char *system = jstr(c, "system");
        const char *code = jstr(c, "code");
        if (system != NULL && code != NULL && *n < cap) {
            th__option *o = &opts[(*n)++];
            o->kind = TH__V_CODING;
            o->system = system;
            o->code = code;
            double w;
            int r = elem_weight(c, &w);
            if (r < 0) {
                return fail(ld, TH_EINVAL, "ValueSet code '%s': weight without a number", code);
            }
            o->has_weight = r > 0;
            o->weight = r > 0 ? w : 0;
            weight_from_cs(ld->reg, o);
        }
        int rc = vs_expansion(ld, json_object_get(c, "contains"), depth + 1, opts, n, cap);
        if (rc != TH_OK) {
            return rc;
        }
    }
    return TH_OK;
}

/* Compiles a ValueSet (loaded or contained) into the list of codes an answer may use: its
 * expansion when it has one, else compose.include (listed concepts; a whole CodeSystem when it
 * is loaded; "any code of the system" when it is not). Filters are not evaluated: an include
 * with a filter allows the whole system. compose.exclude is not applied. */
static int compile_valueset(loader *ld, const json_t *vs, const char *what, th__option **out,
                            size_t *nout)
{
    th_qreg *reg = ld->reg;
    json_t *expansion = json_object_get(json_object_get(vs, "expansion"), "contains");
    size_t cap = count_nested(expansion, "contains", 0);
    th__option *opts;
    size_t n = 0;
    if (cap > 0) {
        opts = arena_alloc(&reg->arena, cap * sizeof(*opts));
        if (opts == NULL) {
            return TH_ENOMEM;
        }
        int rc = vs_expansion(ld, expansion, 0, opts, &n, cap);
        if (rc != TH_OK) {
            return rc;
        }
    } else {
        json_t *includes = json_object_get(json_object_get(vs, "compose"), "include");
        size_t i;
        json_t *inc;
        json_array_foreach(includes, i, inc)
        {
            const char *system = jstr(inc, "system");
            json_t *concepts = json_object_get(inc, "concept");
            if (system == NULL) {
                return fail(ld, TH_EINVAL,
                            "%s: compose.include without a system (include of "
                            "other value sets is not supported)",
                            what);
            }
            const cs_entry *cs = find_cs(reg, system);
            if (json_array_size(concepts) > 0) {
                cap += json_array_size(concepts);
            } else {
                cap += cs != NULL ? cs->n : 1;
            }
        }
        opts = arena_alloc(&reg->arena, (cap + 1) * sizeof(*opts));
        if (opts == NULL) {
            return TH_ENOMEM;
        }
        json_array_foreach(includes, i, inc)
        {
            const char *system = jstr(inc, "system");
            json_t *concepts = json_object_get(inc, "concept");
            const cs_entry *cs = find_cs(reg, system);
            if (json_array_size(concepts) > 0) {
                size_t j;
                json_t *c;
                json_array_foreach(concepts, j, c)
                {
                    const char *code = jstr(c, "code");
                    if (code == NULL) {
                        return fail(ld, TH_EINVAL, "%s: concept without a code", what);
                    }
                    th__option *o = &opts[n++];
                    o->kind = TH__V_CODING;
                    o->system = system;
                    o->code = code;
                    double w;
                    int r = elem_weight(c, &w);
                    if (r < 0) {
                        return fail(ld, TH_EINVAL, "%s: code '%s': weight without a number", what,
                                    code);
                    }
                    o->has_weight = r > 0;
                    o->weight = r > 0 ? w : 0;
                    weight_from_cs(reg, o);
                }
            } else if (cs != NULL) {
                memcpy(&opts[n], cs->concepts, cs->n * sizeof(*opts));
                n += cs->n;
            } else {
                opts[n].kind = TH__V_CODING;
                opts[n].system = system; /* any code of a system we do not hold */
                n++;
            }
        }
    }
    if (n == 0) {
        return fail(ld, TH_EINVAL, "%s has no codes (no expansion, no compose.include)", what);
    }
    *out = opts;
    *nout = n;
    return TH_OK;
}

static int add_valueset(loader *ld, json_t *doc)
{
    th_qreg *reg = ld->reg;
    const char *url = jstr(doc, "url");
    if (url == NULL || url[0] == '\0') {
        return fail(ld, TH_EINVAL, "ValueSet has no url");
    }
    int rc = grow((void **)&reg->vs, &reg->capvs, reg->nvs, sizeof(*reg->vs));
    if (rc != TH_OK) {
        return rc;
    }
    vs_entry vs = {.json = doc, .url = url, .version = jstr(doc, "version")};
    rc = compile_valueset(ld, doc, "ValueSet", &vs.options, &vs.n);
    if (rc != TH_OK) {
        return rc;
    }
    json_incref(doc);
    reg->vs[reg->nvs++] = vs;
    return TH_OK;
}

/* ---- Questionnaire compilation ------------------------------------------------------------ */

typedef struct qbuild {
    loader *ld;
    json_t *doc;
    th_fhir_instrument *inst;
    const char **calc_expr; /* per item: calculatedExpression text, or NULL */
    uint32_t next;          /* next free item index */
} qbuild;

static int count_items(loader *ld, const json_t *items, int depth, uint32_t *n)
{
    if (items == NULL) {
        return TH_OK;
    }
    if (!json_is_array(items)) {
        return fail(ld, TH_EINVAL, "Questionnaire item must be an array");
    }
    if (depth >= MAX_ITEM_DEPTH) {
        return fail(ld, TH_EINVAL, "items nested deeper than %d levels", MAX_ITEM_DEPTH);
    }
    size_t i;
    json_t *it;
    json_array_foreach(items, i, it)
    {
        if (*n >= 100000) {
            return fail(ld, TH_EINVAL, "more than 100000 items");
        }
        (*n)++;
        int rc = count_items(ld, json_object_get(it, "item"), depth + 1, n);
        if (rc != TH_OK) {
            return rc;
        }
    }
    return TH_OK;
}

static const struct {
    const char *name;
    th__qtype type;
    unsigned accepts;
} qtypes[] = {
    {"group", TH__QT_GROUP, 0},
    {"display", TH__QT_DISPLAY, 0},
    {"question", TH__QT_QUESTION, TH__V_ANY},
    {"boolean", TH__QT_BOOLEAN, TH__V_BOOLEAN},
    {"decimal", TH__QT_DECIMAL, TH__V_DECIMAL},
    {"integer", TH__QT_INTEGER, TH__V_INTEGER},
    {"date", TH__QT_DATE, TH__V_DATE},
    {"dateTime", TH__QT_DATETIME, TH__V_DATETIME},
    {"time", TH__QT_TIME, TH__V_TIME},
    {"string", TH__QT_STRING, TH__V_STRING},
    {"text", TH__QT_TEXT, TH__V_STRING},
    {"url", TH__QT_URL, TH__V_URI},
    {"choice", TH__QT_CHOICE, 0},
    {"open-choice", TH__QT_OPEN_CHOICE, TH__V_STRING},
    {"attachment", TH__QT_ATTACHMENT, TH__V_ATTACHMENT},
    {"reference", TH__QT_REFERENCE, TH__V_REFERENCE},
    {"quantity", TH__QT_QUANTITY, TH__V_QUANTITY},
};

static int hash_insert(th_fhir_instrument *inst, uint32_t index)
{
    const th__item *it = &inst->items[index];
    uint32_t h = th__fhir_hash(it->link_id, it->link_id_len) & inst->hash_mask;
    while (inst->hash[h] != 0) {
        const th__item *other = &inst->items[inst->hash[h] - 1];
        if (other->link_id_len == it->link_id_len &&
            memcmp(other->link_id, it->link_id, it->link_id_len) == 0) {
            return TH_EEXIST;
        }
        h = (h + 1) & inst->hash_mask;
    }
    inst->hash[h] = index + 1;
    return TH_OK;
}

uint32_t th__instrument_lookup(const th_fhir_instrument *inst, const char *link_id, size_t len)
{
    uint32_t h = th__fhir_hash(link_id, len) & inst->hash_mask;
    while (inst->hash[h] != 0) {
        const th__item *it = &inst->items[inst->hash[h] - 1];
        if (it->link_id_len == len && memcmp(it->link_id, link_id, len) == 0) {
            return inst->hash[h] - 1;
        }
        h = (h + 1) & inst->hash_mask;
    }
    return TH__NO_ITEM;
}

static int get_bool(loader *ld, const json_t *item, const char *lid, const char *key, bool *out)
{
    json_t *v = json_object_get(item, key);
    if (v == NULL) {
        *out = false;
        return TH_OK;
    }
    if (!json_is_boolean(v)) {
        return fail(ld, TH_EINVAL, "item '%s': %s must be true or false", lid, key);
    }
    *out = json_is_true(v);
    return TH_OK;
}

/* Compiles item.answerOption into options. */
static int compile_answer_options(qbuild *qb, th__item *it, const json_t *aopts)
{
    loader *ld = qb->ld;
    size_t n = json_array_size(aopts);
    th__option *opts = arena_alloc(&ld->reg->arena, (n + 1) * sizeof(*opts));
    if (opts == NULL) {
        return TH_ENOMEM;
    }
    size_t i;
    json_t *ao;
    json_array_foreach(aopts, i, ao)
    {
        th__option *o = &opts[i];
        json_t *v;
        double w;
        int r = elem_weight(ao, &w);
        if ((v = json_object_get(ao, "valueCoding")) != NULL) {
            o->kind = TH__V_CODING;
            o->system = jstr(v, "system");
            o->code = jstr(v, "code");
            if (o->code == NULL) {
                return fail(ld, TH_EINVAL, "item '%s': answerOption[%zu].valueCoding has no code",
                            it->link_id, i);
            }
            if (r == 0) {
                r = elem_weight(v, &w); /* ordinalValue on the Coding itself */
            }
        } else if ((v = json_object_get(ao, "valueInteger")) != NULL && json_is_integer(v)) {
            o->kind = TH__V_INTEGER;
            o->integer = json_integer_value(v);
        } else if ((v = json_object_get(ao, "valueString")) != NULL && json_is_string(v)) {
            o->kind = TH__V_STRING;
            o->str = json_string_value(v);
        } else if ((v = json_object_get(ao, "valueDate")) != NULL && json_is_string(v)) {
            o->kind = TH__V_DATE;
            o->str = json_string_value(v);
        } else if ((v = json_object_get(ao, "valueTime")) != NULL && json_is_string(v)) {
            o->kind = TH__V_TIME;
            o->str = json_string_value(v);
        } else if ((v = json_object_get(ao, "valueReference")) != NULL && json_is_object(v)) {
            o->kind = TH__V_REFERENCE; /* references are accepted, not matched */
        } else {
            return fail(ld, TH_EINVAL, "item '%s': answerOption[%zu] has no usable value[x]",
                        it->link_id, i);
        }
        if (r < 0) {
            return fail(ld, TH_EINVAL, "item '%s': answerOption[%zu]: weight without a number",
                        it->link_id, i);
        }
        o->has_weight = r > 0;
        o->weight = r > 0 ? w : 0;
        weight_from_cs(ld->reg, o);
        it->accepts |= o->kind;
    }
    it->options = opts;
    it->noptions = n;
    return TH_OK;
}

/* Resolves item.answerValueSet: a contained ValueSet ("#id"), a loaded ValueSet, a loaded
 * CodeSystem whose valueSet is this canonical, or, failing those, the codes of every loaded
 * CodeSystem (documented in docs/internals/fhir.md). */
static int resolve_value_set(qbuild *qb, th__item *it, const char *canonical)
{
    loader *ld = qb->ld;
    th_qreg *reg = ld->reg;
    if (canonical[0] == '#') {
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(qb->doc, "contained"), i, c)
        {
            const char *rt = jstr(c, "resourceType");
            const char *id = jstr(c, "id");
            if (rt != NULL && id != NULL && strcmp(rt, "ValueSet") == 0 &&
                strcmp(id, canonical + 1) == 0) {
                char what[160];
                snprintf(what, sizeof(what), "item '%s': contained ValueSet '%s'", it->link_id, id);
                th__option *opts;
                int rc = compile_valueset(ld, c, what, &opts, &it->noptions);
                it->options = opts;
                return rc;
            }
        }
        return fail(ld, TH_EINVAL, "item '%s': answerValueSet '%s' is not contained", it->link_id,
                    canonical);
    }
    const char *version;
    size_t len = canonical_split(canonical, &version);
    const vs_entry *best = NULL;
    for (size_t i = 0; i < reg->nvs; i++) {
        const vs_entry *vs = &reg->vs[i];
        if (url_eq(vs->url, canonical, len) &&
            (best == NULL ||
             (version != NULL && vs->version != NULL && strcmp(vs->version, version) == 0))) {
            best = vs;
        }
    }
    if (best != NULL) {
        it->options = best->options;
        it->noptions = best->n;
        return TH_OK;
    }
    for (size_t i = 0; i < reg->ncs; i++) {
        if (reg->cs[i].value_set != NULL && url_eq(reg->cs[i].value_set, canonical, len)) {
            it->options = reg->cs[i].concepts;
            it->noptions = reg->cs[i].n;
            return TH_OK;
        }
    }
    size_t total = 0;
    for (size_t i = 0; i < reg->ncs; i++) {
        total += reg->cs[i].n;
    }
    if (total == 0) {
        return fail(ld, TH_EINVAL,
                    "item '%s': answerValueSet %s is not loaded (put the ValueSet or its "
                    "CodeSystem in the same directory)",
                    it->link_id, canonical);
    }
    th__option *opts = arena_alloc(&reg->arena, total * sizeof(*opts));
    if (opts == NULL) {
        return TH_ENOMEM;
    }
    size_t n = 0;
    for (size_t i = 0; i < reg->ncs; i++) {
        memcpy(&opts[n], reg->cs[i].concepts, reg->cs[i].n * sizeof(*opts));
        n += reg->cs[i].n;
    }
    it->options = opts;
    it->noptions = n;
    return TH_OK;
}

static int compile_items(qbuild *qb, const json_t *items, uint32_t parent, int depth,
                         uint32_t **children_out, uint32_t *nchildren_out)
{
    loader *ld = qb->ld;
    th_fhir_instrument *inst = qb->inst;
    size_t n = json_array_size(items);
    uint32_t *children = arena_alloc(&ld->reg->arena, (n + 1) * sizeof(uint32_t));
    if (children == NULL) {
        return TH_ENOMEM;
    }
    size_t i;
    json_t *jit;
    json_array_foreach(items, i, jit)
    {
        uint32_t index = qb->next++;
        th__item *it = &inst->items[index];
        children[i] = index;
        it->parent = parent;
        it->max_length = -1;
        json_t *lid = json_object_get(jit, "linkId");
        if (!json_is_object(jit) || !json_is_string(lid) || json_string_length(lid) == 0) {
            return fail(ld, TH_EINVAL, "item %u (depth %d) has no linkId", (unsigned)i, depth);
        }
        it->link_id = json_string_value(lid);
        it->link_id_len = json_string_length(lid);
        if (hash_insert(inst, index) != TH_OK) {
            return fail(ld, TH_EINVAL, "linkId '%s' is used by more than one item", it->link_id);
        }
        const char *type = jstr(jit, "type");
        if (type == NULL) {
            return fail(ld, TH_EINVAL, "item '%s' has no type", it->link_id);
        }
        size_t t;
        for (t = 0; t < sizeof(qtypes) / sizeof(qtypes[0]); t++) {
            if (strcmp(qtypes[t].name, type) == 0) {
                break;
            }
        }
        if (t == sizeof(qtypes) / sizeof(qtypes[0])) {
            return fail(ld, TH_EINVAL, "item '%s': unknown item type '%s'", it->link_id, type);
        }
        it->type = qtypes[t].type;
        it->accepts = qtypes[t].accepts;
        int rc;
        if ((rc = get_bool(ld, jit, it->link_id, "required", &it->required)) != TH_OK ||
            (rc = get_bool(ld, jit, it->link_id, "repeats", &it->repeats)) != TH_OK ||
            (rc = get_bool(ld, jit, it->link_id, "readOnly", &it->read_only)) != TH_OK) {
            return rc;
        }
        it->enable_when = json_object_get(jit, "enableWhen") != NULL;
        json_t *ml = json_object_get(jit, "maxLength");
        if (ml != NULL) {
            if (!json_is_integer(ml) || json_integer_value(ml) < 1) {
                return fail(ld, TH_EINVAL, "item '%s': maxLength must be a positive integer",
                            it->link_id);
            }
            it->max_length = (long)json_integer_value(ml);
        }
        int r = ext_number(jit, EXT_MIN_VALUE, &it->min_value);
        it->has_min = r > 0;
        r = ext_number(jit, EXT_MAX_VALUE, &it->max_value);
        it->has_max = r > 0;
        json_t *calc = ext_get(jit, EXT_CALCULATED);
        if (calc != NULL) {
            it->calculated = true;
            qb->calc_expr[index] = jstr(json_object_get(calc, "valueExpression"), "expression");
        }
        if (it->calculated || it->read_only) {
            if (it->type == TH__QT_DECIMAL || it->type == TH__QT_INTEGER) {
                it->accepts |= TH__V_DECIMAL | TH__V_INTEGER; /* the app's number, either way */
            }
        }
        size_t j;
        json_t *code;
        json_array_foreach(json_object_get(jit, "code"), j, code)
        {
            const char *system = jstr(code, "system");
            if (it->loinc == NULL && system != NULL && strcmp(system, LOINC) == 0) {
                it->loinc = jstr(code, "code");
            }
        }
        json_t *aopts = json_object_get(jit, "answerOption");
        const char *avs = jstr(jit, "answerValueSet");
        if (aopts != NULL) {
            if (!json_is_array(aopts) || json_array_size(aopts) == 0) {
                return fail(ld, TH_EINVAL, "item '%s': answerOption must be a non-empty array",
                            it->link_id);
            }
            if ((rc = compile_answer_options(qb, it, aopts)) != TH_OK) {
                return rc;
            }
            it->options_closed = true;
        } else if (avs != NULL) {
            if ((rc = resolve_value_set(qb, it, avs)) != TH_OK) {
                return rc;
            }
            it->accepts |= TH__V_CODING;
            it->options_closed = true;
        }
        /* A choice with no list takes any coding; open-choice also takes a coding (from the
         * list, when there is one) or free text. */
        if ((it->type == TH__QT_CHOICE && it->noptions == 0) || it->type == TH__QT_OPEN_CHOICE) {
            it->accepts |= TH__V_CODING;
        }
        json_t *sub = json_object_get(jit, "item");
        if (sub != NULL) {
            if (it->type == TH__QT_DISPLAY) {
                return fail(ld, TH_EINVAL, "display item '%s' has child items", it->link_id);
            }
            rc = compile_items(qb, sub, index, depth + 1, &it->children, &it->nchildren);
            if (rc != TH_OK) {
                return rc;
            }
        } else if (it->type == TH__QT_GROUP) {
            return fail(ld, TH_EINVAL, "group item '%s' has no items", it->link_id);
        }
    }
    *children_out = children;
    *nchildren_out = (uint32_t)n;
    return TH_OK;
}

/* ---- scoring rule ------------------------------------------------------------------------- */

/* What a Questionnaire's SDC "variable" says about a score. Supported: FHIRPath aggregates of
 * answer weights (or numeric answers) over items picked by linkId, e.g.
 *   %resource.item.where(linkId.matches('^phq-phq2[a-i]$')).answer.value.weight().sum()
 *   ... .where(linkId in ('a' | 'b')) ... .ordinal().avg()      ... .sum() / ... .count()
 * avg() or sum()/count() make a mean, sum() a sum; anything else is not a score. */
typedef struct score_var {
    const char *name;
    th_fhir_score_kind kind;
    const char *expr;
} score_var;

static th_fhir_score_kind expr_kind(const char *expr)
{
    if (expr == NULL || strstr(expr, "answer") == NULL) {
        return TH_FHIR_SCORE_NONE;
    }
    if (strstr(expr, ".avg()") != NULL) {
        return TH_FHIR_SCORE_MEAN;
    }
    if (strstr(expr, ".sum()") != NULL) {
        const char *count = strstr(expr, ".count()");
        const char *slash = strchr(expr, '/');
        if (count != NULL && slash != NULL && slash < count) {
            return TH_FHIR_SCORE_MEAN;
        }
        return TH_FHIR_SCORE_SUM;
    }
    return TH_FHIR_SCORE_NONE;
}

/* Reads the FHIRPath string literal at *p (after the opening quote) into out; returns false
 * when it does not end. Unknown escapes keep their backslash, so a regex written '\d' or
 * '\\d' both reach regcomp as \d. */
static bool read_literal(const char **p, char *out, size_t cap)
{
    size_t n = 0;
    const char *s = *p;
    while (*s != '\0' && *s != '\'') {
        char c = *s++;
        if (c == '\\' && *s != '\0') {
            char e = *s++;
            if (e == 'n' || e == 't' || e == 'r' || e == 'f') {
                c = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : '\f';
            } else if (e == '\'' || e == '"' || e == '`' || e == '\\' || e == '/') {
                c = e;
            } else {
                if (n + 1 < cap) {
                    out[n++] = '\\';
                }
                c = e;
            }
        }
        if (n + 1 < cap) {
            out[n++] = c;
        }
    }
    out[n] = '\0';
    if (*s != '\'') {
        return false;
    }
    *p = s + 1;
    return true;
}

/* Translates the regex of FHIRPath matches() (PCRE-like) to POSIX ERE: \d, \w and \s. */
static void regex_to_ere(const char *in, char *out, size_t cap)
{
    size_t n = 0;
    for (const char *s = in; *s != '\0' && n + 16 < cap; s++) {
        const char *rep = NULL;
        if (s[0] == '\\' && s[1] != '\0') {
            switch (s[1]) {
            case 'd':
                rep = "[0-9]";
                break;
            case 'w':
                rep = "[A-Za-z0-9_]";
                break;
            case 's':
                rep = "[[:space:]]";
                break;
            default:
                out[n++] = *s++;
                out[n++] = *s;
                continue;
            }
            s++;
            size_t len = strlen(rep);
            memcpy(out + n, rep, len);
            n += len;
        } else {
            out[n++] = *s;
        }
    }
    out[n] = '\0';
}

static bool is_input_item(const th__item *it)
{
    return it->type != TH__QT_GROUP && it->type != TH__QT_DISPLAY && !it->calculated &&
           !it->read_only;
}

static bool has_weights(const th__item *it)
{
    for (size_t i = 0; i < it->noptions; i++) {
        if (it->options[i].has_weight) {
            return true;
        }
    }
    return false;
}

static bool is_numeric(const th__item *it)
{
    return it->type == TH__QT_INTEGER || it->type == TH__QT_DECIMAL;
}

/* Marks in pick[] the items the variable's where() clause selects. Returns false when the
 * clause cannot be read (then every weighted input item is used). */
static bool select_items(const th_fhir_instrument *inst, const char *expr, bool *pick)
{
    const char *where = strstr(expr, "where(");
    if (where == NULL) {
        return false;
    }
    const char *p = where + 6;
    int depth = 1;
    const char *end = p;
    while (*end != '\0' && depth > 0) {
        if (*end == '\'') { /* skip literals, they may hold parentheses */
            end++;
            while (*end != '\0' && *end != '\'') {
                end += (*end == '\\' && end[1] != '\0') ? 2 : 1;
            }
            if (*end == '\0') {
                return false;
            }
        } else if (*end == '(') {
            depth++;
        } else if (*end == ')') {
            depth--;
        }
        end++;
    }
    if (depth != 0) {
        return false;
    }
    char lit[512];
    const char *matches = strstr(p, "matches(");
    if (matches != NULL && matches < end) {
        const char *q = strchr(matches, '\'');
        if (q == NULL || q > end || !read_literal(&(const char *){q + 1}, lit, sizeof(lit))) {
            return false;
        }
        char ere[1024];
        regex_to_ere(lit, ere, sizeof(ere));
        regex_t re;
        if (regcomp(&re, ere, REG_EXTENDED | REG_NOSUB) != 0) {
            return false;
        }
        for (uint32_t i = 0; i < inst->nitems; i++) {
            pick[i] = regexec(&re, inst->items[i].link_id, 0, NULL, 0) == 0;
        }
        regfree(&re);
        return true;
    }
    bool any = false;
    for (const char *q = p; q < end; q++) {
        if (*q != '\'') {
            continue;
        }
        const char *after = q + 1;
        if (!read_literal(&after, lit, sizeof(lit))) {
            return false;
        }
        uint32_t idx = th__instrument_lookup(inst, lit, strlen(lit));
        if (idx != TH__NO_ITEM) {
            pick[idx] = true;
            any = true;
        }
        q = after - 1;
    }
    return any;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int analyse_scoring(qbuild *qb)
{
    th_fhir_instrument *inst = qb->inst;
    th_qreg *reg = qb->ld->reg;
    score_var vars[16];
    size_t nvars = 0;
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(qb->doc, "extension"), i, e)
    {
        const char *url = jstr(e, "url");
        json_t *ve = json_object_get(e, "valueExpression");
        if (url == NULL || strcmp(url, EXT_VARIABLE) != 0 || nvars == 16) {
            continue;
        }
        const char *lang = jstr(ve, "language");
        score_var v = {jstr(ve, "name"), TH_FHIR_SCORE_NONE, jstr(ve, "expression")};
        if (v.name != NULL && lang != NULL && strcmp(lang, "text/fhirpath") == 0 &&
            (v.kind = expr_kind(v.expr)) != TH_FHIR_SCORE_NONE) {
            vars[nvars++] = v;
        }
    }
    /* The score is the variable an item's calculatedExpression is exactly "%name" of: that
     * item is where the app puts its own total. Else the first aggregate variable. */
    const score_var *chosen = NULL;
    inst->app_score_item = TH__NO_ITEM;
    for (uint32_t k = 0; k < inst->nitems && chosen == NULL; k++) {
        const char *ce = qb->calc_expr[k];
        if (ce == NULL) {
            continue;
        }
        while (isspace((unsigned char)*ce)) {
            ce++;
        }
        if (*ce != '%') {
            continue;
        }
        ce++;
        size_t len = 0;
        while (isalnum((unsigned char)ce[len]) || ce[len] == '_') {
            len++;
        }
        for (size_t v = 0; v < nvars; v++) {
            if (strlen(vars[v].name) == len && strncmp(vars[v].name, ce, len) == 0) {
                chosen = &vars[v];
                inst->app_score_item = k;
                break;
            }
        }
    }
    if (chosen == NULL && nvars > 0) {
        chosen = &vars[0];
    }
    if (inst->app_score_item == TH__NO_ITEM) {
        for (uint32_t k = 0; k < inst->nitems; k++) {
            const th__item *it = &inst->items[k];
            if ((it->calculated || it->read_only) && is_numeric(it) &&
                (ends_with(it->link_id, "score-total") || ends_with(it->link_id, "score-mean") ||
                 ends_with(it->link_id, "-score"))) {
                inst->app_score_item = k;
                break;
            }
        }
    }

    bool *pick = th_calloc(inst->nitems + 1, sizeof(bool));
    if (pick == NULL) {
        return TH_ENOMEM;
    }
    bool selected = chosen != NULL && select_items(inst, chosen->expr, pick);
    inst->score_kind = chosen != NULL ? chosen->kind : TH_FHIR_SCORE_SUM;
    uint32_t n = 0;
    for (int attempt = 0; attempt < 2 && n == 0; attempt++) {
        /* A where() clause that selects no usable item falls back to every weighted item. */
        selected = selected && attempt == 0;
        for (uint32_t k = 0; k < inst->nitems; k++) {
            const th__item *it = &inst->items[k];
            bool use =
                is_input_item(it) &&
                (selected ? pick[k] && (has_weights(it) || is_numeric(it)) : has_weights(it));
            pick[k] = use;
            n += use;
        }
    }
    inst->scored = arena_alloc(&reg->arena, (n + 1) * sizeof(uint32_t));
    if (inst->scored == NULL) {
        th_free(pick);
        return TH_ENOMEM;
    }
    for (uint32_t k = 0; k < inst->nitems; k++) {
        if (pick[k]) {
            inst->scored[inst->nscored++] = k;
        }
    }
    th_free(pick);
    if (inst->nscored == 0) {
        inst->score_kind = TH_FHIR_SCORE_NONE;
    }

    inst->alert_item = TH__NO_ITEM;
    if (inst->scale == TH_FHIR_SCALE_PHQ9) {
        for (uint32_t k = 0; k < inst->nscored; k++) {
            const th__item *it = &inst->items[inst->scored[k]];
            if ((it->loinc != NULL && strcmp(it->loinc, "44260-8") == 0) ||
                strcmp(it->link_id, "44260-8") == 0) {
                inst->alert_item = inst->scored[k];
            }
        }
        if (inst->alert_item == TH__NO_ITEM && inst->nscored == 9) {
            inst->alert_item = inst->scored[8];
        }
    }
    return TH_OK;
}

static th_fhir_scale detect_scale(const json_t *doc, const char *url)
{
    if (strcmp(url, "http://loinc.org/q/44249-1") == 0) {
        return TH_FHIR_SCALE_PHQ9;
    }
    if (strcmp(url, "http://loinc.org/q/69737-5") == 0) {
        return TH_FHIR_SCALE_GAD7;
    }
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(doc, "code"), i, c)
    {
        const char *system = jstr(c, "system");
        const char *code = jstr(c, "code");
        if (system == NULL || code == NULL || strcmp(system, LOINC) != 0) {
            continue;
        }
        if (strcmp(code, "44249-1") == 0) {
            return TH_FHIR_SCALE_PHQ9;
        }
        if (strcmp(code, "69737-5") == 0) {
            return TH_FHIR_SCALE_GAD7;
        }
    }
    return TH_FHIR_SCALE_OTHER;
}

static int add_questionnaire(loader *ld, json_t *doc)
{
    th_qreg *reg = ld->reg;
    const char *url = jstr(doc, "url");
    if (url == NULL || url[0] == '\0' || strchr(url, '|') != NULL) {
        return fail(ld, TH_EINVAL, "Questionnaire has no url (or one with '|')");
    }
    const char *version = jstr(doc, "version");
    const char *id = jstr(doc, "id");
    for (size_t i = 0; i < reg->ninst; i++) {
        const th_fhir_instrument *o = reg->inst[i];
        if (strcmp(o->url, url) == 0 && same_version(o->version, version)) {
            return fail(ld, TH_EEXIST, "Questionnaire %s%s%s is already loaded", url,
                        version != NULL ? "|" : "", version != NULL ? version : "");
        }
        if (id != NULL && o->id != NULL && strcmp(o->id, id) == 0) {
            return fail(ld, TH_EEXIST, "Questionnaire id '%s' is already used by %s", id, o->url);
        }
    }
    json_t *items = json_object_get(doc, "item");
    uint32_t nitems = 0;
    int rc = count_items(ld, items, 0, &nitems);
    if (rc != TH_OK) {
        return rc;
    }
    rc = grow((void **)&reg->inst, &reg->capinst, reg->ninst, sizeof(*reg->inst));
    if (rc != TH_OK) {
        return rc;
    }
    th_fhir_instrument *inst = arena_alloc(&reg->arena, sizeof(*inst));
    uint32_t hsize = 8;
    while (hsize < 2 * nitems) {
        hsize *= 2;
    }
    qbuild qb = {.ld = ld, .doc = doc, .inst = inst};
    if (inst == NULL ||
        (inst->items = arena_alloc(&reg->arena, (nitems + 1) * sizeof(th__item))) == NULL ||
        (inst->hash = arena_alloc(&reg->arena, hsize * sizeof(uint32_t))) == NULL) {
        return TH_ENOMEM;
    }
    qb.calc_expr = th_calloc(nitems + 1, sizeof(*qb.calc_expr));
    if (qb.calc_expr == NULL) {
        return TH_ENOMEM;
    }
    inst->json = doc;
    inst->url = url;
    inst->url_len = strlen(url);
    inst->version = version;
    inst->id = id;
    inst->title = jstr(doc, "title") != NULL ? jstr(doc, "title") : jstr(doc, "name");
    inst->builtin = ld->builtin;
    inst->scale = detect_scale(doc, url);
    inst->nitems = nitems;
    inst->hash_mask = hsize - 1;
    rc = compile_items(&qb, items, TH__NO_ITEM, 0, &inst->roots, &inst->nroots);
    if (rc == TH_OK) {
        rc = analyse_scoring(&qb);
    }
    th_free(qb.calc_expr);
    if (rc != TH_OK) {
        return rc;
    }
    json_incref(doc);
    reg->inst[reg->ninst++] = inst;
    return TH_OK;
}

/* ---- loading ------------------------------------------------------------------------------ */

typedef struct pending {
    json_t *doc; /* borrowed from its file's document */
    char name[320];
} pending;

typedef struct batch {
    pending *v;
    size_t n, cap;
} batch;

static int batch_add(loader *ld, batch *b, json_t *doc, const char *name)
{
    const char *rt = jstr(doc, "resourceType");
    ld->name = name;
    if (!json_is_object(doc) || rt == NULL) {
        return fail(ld, TH_EINVAL, "not a FHIR resource (no resourceType)");
    }
    if (strcmp(rt, "Bundle") == 0) {
        size_t i;
        json_t *entry;
        json_array_foreach(json_object_get(doc, "entry"), i, entry)
        {
            char sub[320];
            snprintf(sub, sizeof(sub), "%s#entry[%zu]", name, i);
            json_t *res = json_object_get(entry, "resource");
            const char *sub_rt = jstr(res, "resourceType");
            if (res == NULL || (sub_rt != NULL && strcmp(sub_rt, "Bundle") == 0)) {
                return fail(ld, TH_EINVAL, "Bundle entry[%zu] has no resource (or a Bundle)", i);
            }
            int rc = batch_add(ld, b, res, sub);
            ld->name = name; /* sub dies with this iteration */
            if (rc != TH_OK) {
                return rc;
            }
        }
        return TH_OK;
    }
    if (strcmp(rt, "Questionnaire") != 0 && strcmp(rt, "CodeSystem") != 0 &&
        strcmp(rt, "ValueSet") != 0) {
        /* Other resources (example QuestionnaireResponses next to their Questionnaires, as
         * in published guides) define nothing trialhub uses: skip them. */
        return TH_OK;
    }
    int rc = grow((void **)&b->v, &b->cap, b->n, sizeof(*b->v));
    if (rc != TH_OK) {
        return rc;
    }
    b->v[b->n].doc = doc;
    snprintf(b->v[b->n].name, sizeof(b->v[b->n].name), "%s", name);
    b->n++;
    return TH_OK;
}

static int render_bundle(th_qreg *reg, char **out, size_t *outlen)
{
    json_t *bundle = json_object();
    json_t *entries = json_array();
    int rc = TH_ENOMEM;
    if (bundle == NULL || entries == NULL ||
        json_object_set_new(bundle, "resourceType", json_string("Bundle")) != 0 ||
        json_object_set_new(bundle, "type", json_string("searchset")) != 0 ||
        json_object_set_new(bundle, "total", json_integer((json_int_t)reg->ninst)) != 0 ||
        json_object_set(bundle, "entry", entries) != 0) {
        goto done;
    }
    for (size_t i = 0; i < reg->ninst; i++) {
        json_t *entry =
            json_pack("{sOs{ss}}", "resource", reg->inst[i]->json, "search", "mode", "match");
        if (entry == NULL || json_array_append_new(entries, entry) != 0) {
            goto done;
        }
    }
    size_t len = json_dumpb(bundle, NULL, 0, JSON_COMPACT);
    char *buf = th_malloc(len + 1);
    if (len == 0 || buf == NULL) {
        th_free(buf);
        goto done;
    }
    json_dumpb(bundle, buf, len, JSON_COMPACT);
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    rc = TH_OK;
done:
    json_decref(entries);
    json_decref(bundle);
    return rc;
}

/* Loads a set of parsed documents (owned by the caller) as one all-or-nothing step. */
static int load_docs(loader *ld, json_t **docs, const char **names, size_t ndocs)
{
    th_qreg *reg = ld->reg;
    size_t ninst = reg->ninst, ncs = reg->ncs, nvs = reg->nvs;
    arena_mark mark = {reg->arena, reg->arena != NULL ? reg->arena->used : 0};
    batch b = {0};
    int rc = TH_OK;
    for (size_t i = 0; i < ndocs && rc == TH_OK; i++) {
        rc = batch_add(ld, &b, docs[i], names[i]);
    }
    /* CodeSystems first, then ValueSets, then Questionnaires, so that references resolve
     * whatever the file order. */
    static const char *const order[] = {"CodeSystem", "ValueSet", "Questionnaire"};
    for (size_t pass = 0; pass < 3 && rc == TH_OK; pass++) {
        for (size_t i = 0; i < b.n && rc == TH_OK; i++) {
            if (strcmp(jstr(b.v[i].doc, "resourceType"), order[pass]) != 0) {
                continue;
            }
            ld->name = b.v[i].name;
            rc = pass == 0   ? add_codesystem(ld, b.v[i].doc)
                 : pass == 1 ? add_valueset(ld, b.v[i].doc)
                             : add_questionnaire(ld, b.v[i].doc);
        }
    }
    char *bundle = NULL;
    size_t bundle_len = 0;
    if (rc == TH_OK) {
        rc = render_bundle(reg, &bundle, &bundle_len);
    }
    if (rc == TH_ENOMEM) {
        fail(ld, rc, "out of memory"); /* before b.v goes: ld->name may point into it */
    }
    ld->name = NULL;
    th_free(b.v);
    if (rc != TH_OK) {
        for (size_t i = ninst; i < reg->ninst; i++) {
            json_decref(reg->inst[i]->json);
        }
        for (size_t i = ncs; i < reg->ncs; i++) {
            json_decref(reg->cs[i].json);
        }
        for (size_t i = nvs; i < reg->nvs; i++) {
            json_decref(reg->vs[i].json);
        }
        reg->ninst = ninst, reg->ncs = ncs, reg->nvs = nvs;
        arena_rollback(&reg->arena, mark);
        return rc;
    }
    th_free(reg->bundle);
    reg->bundle = bundle;
    reg->bundle_len = bundle_len;
    return TH_OK;
}

static int parse_doc(loader *ld, const char *name, const char *data, size_t len, json_t **out)
{
    json_error_t jerr;
    json_t *doc = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (doc == NULL) {
        ld->name = name;
        if (json_error_code(&jerr) == json_error_out_of_memory) {
            return fail(ld, TH_ENOMEM, "out of memory");
        }
        return fail(ld, TH_EPARSE, "line %d, column %d: malformed JSON: %s", jerr.line, jerr.column,
                    jerr.text);
    }
    *out = doc;
    return TH_OK;
}

int th_qreg_load_buffer(th_qreg *reg, const char *name, const char *data, size_t len, char *err,
                        size_t errlen)
{
    loader ld = {.reg = reg, .err = err, .errlen = errlen, .name = name};
    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    if (reg == NULL || data == NULL) {
        return fail(&ld, TH_EINVAL, "invalid argument");
    }
    if (name == NULL) {
        ld.name = name = "<buffer>";
    }
    json_t *doc;
    int rc = parse_doc(&ld, name, data, len, &doc);
    if (rc != TH_OK) {
        return rc;
    }
    rc = load_docs(&ld, &doc, &name, 1);
    json_decref(doc);
    return rc;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int read_file(loader *ld, const char *path, char **data, size_t *len)
{
    ld->name = path;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return fail(ld, errno == ENOENT ? TH_ENOTFOUND : TH_EIO, "cannot open: %s",
                    strerror(errno));
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode) ||
        (unsigned long long)st.st_size > MAX_FILE_BYTES) {
        fclose(f);
        return fail(ld, TH_EIO, "not a regular file of at most %u bytes", MAX_FILE_BYTES);
    }
    size_t size = (size_t)st.st_size;
    char *buf = th_malloc(size + 1);
    if (buf == NULL) {
        fclose(f);
        return fail(ld, TH_ENOMEM, "out of memory");
    }
    size_t got = fread(buf, 1, size, f);
    bool bad = ferror(f) != 0 || got != size;
    fclose(f);
    if (bad) {
        th_free(buf);
        return fail(ld, TH_EIO, "read error");
    }
    *data = buf;
    *len = size;
    return TH_OK;
}

int th_qreg_load_dir(th_qreg *reg, const char *dir, char *err, size_t errlen)
{
    loader ld = {.reg = reg, .err = err, .errlen = errlen, .name = dir};
    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    if (reg == NULL || dir == NULL) {
        return fail(&ld, TH_EINVAL, "invalid argument");
    }
    DIR *d = opendir(dir);
    if (d == NULL) {
        return fail(&ld, errno == ENOENT ? TH_ENOTFOUND : TH_EIO, "cannot open directory: %s",
                    strerror(errno));
    }
    char **paths = NULL;
    size_t npaths = 0, cap = 0;
    json_t **docs = NULL;
    int rc = TH_OK;
    struct dirent *de;
    while (rc == TH_OK && (de = readdir(d)) != NULL) {
        size_t nlen = strlen(de->d_name);
        if (de->d_name[0] == '.' || nlen < 6 || strcmp(de->d_name + nlen - 5, ".json") != 0) {
            continue;
        }
        rc = grow((void **)&paths, &cap, npaths, sizeof(*paths));
        size_t plen = strlen(dir) + 1 + nlen + 1;
        char *path = rc == TH_OK ? th_malloc(plen) : NULL;
        if (path == NULL) {
            rc = fail(&ld, TH_ENOMEM, "out of memory");
            break;
        }
        snprintf(path, plen, "%s/%s", dir, de->d_name);
        paths[npaths++] = path;
    }
    closedir(d);
    if (rc == TH_OK && npaths > 0) {
        qsort(paths, npaths, sizeof(*paths), cmp_names);
        docs = th_calloc(npaths, sizeof(*docs));
        if (docs == NULL) {
            rc = fail(&ld, TH_ENOMEM, "out of memory");
        }
    }
    for (size_t i = 0; rc == TH_OK && i < npaths; i++) {
        char *data = NULL;
        size_t len = 0;
        rc = read_file(&ld, paths[i], &data, &len);
        if (rc == TH_OK) {
            rc = parse_doc(&ld, paths[i], data, len, &docs[i]);
            th_free(data);
        }
    }
    if (rc == TH_OK && npaths > 0) {
        rc = load_docs(&ld, docs, (const char **)paths, npaths);
    }
    for (size_t i = 0; i < npaths; i++) {
        if (docs != NULL) {
            json_decref(docs[i]);
        }
        th_free(paths[i]);
    }
    th_free(docs);
    th_free(paths);
    return rc;
}

/* ---- public API --------------------------------------------------------------------------- */

int th_qreg_create(th_qreg **out)
{
    if (out == NULL) {
        return TH_EINVAL;
    }
    /* jansson seeds its hash on first use; doing it here, before threads, keeps that
     * one-time initialisation off the request path. */
    json_object_seed(0);
    th_qreg *reg = th_calloc(1, sizeof(*reg));
    if (reg == NULL) {
        return TH_ENOMEM;
    }
    static const char *const names[] = {"builtin/phq9.json", "builtin/gad7.json"};
    const unsigned char *data[] = {th__fhir_builtin_phq9, th__fhir_builtin_gad7};
    size_t lens[] = {th__fhir_builtin_phq9_len, th__fhir_builtin_gad7_len};
    json_t *docs[2] = {NULL, NULL};
    char err[256];
    loader ld = {.reg = reg, .err = err, .errlen = sizeof(err), .builtin = true};
    int rc = TH_OK;
    for (size_t i = 0; i < 2 && rc == TH_OK; i++) {
        rc = parse_doc(&ld, names[i], (const char *)data[i], lens[i], &docs[i]);
    }
    if (rc == TH_OK) {
        rc = load_docs(&ld, docs, (const char **)names, 2);
    }
    json_decref(docs[0]);
    json_decref(docs[1]);
    if (rc != TH_OK) {
        /* The built-ins are tested; only allocation can fail here. */
        th_qreg_destroy(reg);
        return rc == TH_ENOMEM ? TH_ENOMEM : TH_EINVAL;
    }
    *out = reg;
    return TH_OK;
}

void th_qreg_destroy(th_qreg *reg)
{
    if (reg == NULL) {
        return;
    }
    for (size_t i = 0; i < reg->ninst; i++) {
        json_decref(reg->inst[i]->json);
    }
    for (size_t i = 0; i < reg->ncs; i++) {
        json_decref(reg->cs[i].json);
    }
    for (size_t i = 0; i < reg->nvs; i++) {
        json_decref(reg->vs[i].json);
    }
    arena_rollback(&reg->arena, (arena_mark){NULL, 0});
    th_free(reg->inst);
    th_free(reg->cs);
    th_free(reg->vs);
    th_free(reg->bundle);
    th_free(reg);
}

int th_qreg_find(const th_qreg *reg, const char *canonical, const th_fhir_instrument **out)
{
    if (reg == NULL || canonical == NULL || out == NULL) {
        return TH_EINVAL;
    }
    const char *version;
    size_t len = canonical_split(canonical, &version);
    const th_fhir_instrument *any = NULL;
    for (size_t i = 0; i < reg->ninst; i++) {
        const th_fhir_instrument *inst = reg->inst[i];
        if (inst->url_len != len || memcmp(inst->url, canonical, len) != 0) {
            continue;
        }
        if (version == NULL || (inst->version != NULL && strcmp(inst->version, version) == 0)) {
            *out = inst;
            return TH_OK;
        }
        if (any == NULL) {
            any = inst;
        }
    }
    if (any == NULL) {
        return TH_ENOTFOUND;
    }
    *out = any;
    return TH_OK;
}

size_t th_qreg_count(const th_qreg *reg)
{
    return reg != NULL ? reg->ninst : 0;
}

const th_fhir_instrument *th_qreg_get(const th_qreg *reg, size_t i)
{
    return reg != NULL && i < reg->ninst ? reg->inst[i] : NULL;
}

void th_qreg_bundle(const th_qreg *reg, const char **json, size_t *len)
{
    *json = reg != NULL ? reg->bundle : NULL;
    *len = reg != NULL ? reg->bundle_len : 0;
}

const char *th_fhir_instrument_url(const th_fhir_instrument *inst)
{
    return inst->url;
}

const char *th_fhir_instrument_version(const th_fhir_instrument *inst)
{
    return inst->version;
}

const char *th_fhir_instrument_id(const th_fhir_instrument *inst)
{
    return inst->id;
}

const char *th_fhir_instrument_title(const th_fhir_instrument *inst)
{
    return inst->title;
}

bool th_fhir_instrument_builtin(const th_fhir_instrument *inst)
{
    return inst->builtin;
}

th_fhir_scale th_fhir_instrument_scale(const th_fhir_instrument *inst)
{
    return inst->scale;
}

th_fhir_score_kind th_fhir_instrument_score_kind(const th_fhir_instrument *inst)
{
    return inst->score_kind;
}

size_t th_fhir_instrument_scored_items(const th_fhir_instrument *inst)
{
    return inst->nscored;
}
