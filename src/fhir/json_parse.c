/* A strict JSON reader for QuestionnaireResponse bodies that builds the same jansson tree as
 * json_loadb(JSON_REJECT_DUPLICATES), only faster: it scans the buffer with pointers instead of
 * jansson's one-character-at-a-time stream callback and copies each string once.
 *
 * Why trialhub has its own parser on this one path: DESIGN.md names jansson as the JSON library,
 * and jansson still builds the tree here and reads and writes JSON everywhere else (registry,
 * CodeSystems, OperationOutcomes). But parsing the POST body was ~36% of the server's CPU, and
 * most of that was jansson's lexer, not its tree. So only the lexer is replaced, and it matches
 * jansson 2.14 exactly, accepted set, trees and error line/column/position alike, which
 * tests/unit/fhir/test_fhir_json.c checks differentially against json_loadb itself. Cost is in
 * docs/internals/fhir.md.
 *
 * Error positions follow jansson's stream model: an error is reported at the end of the bytes
 * jansson had consumed, i.e. after the offending token (its one-byte lookahead given back), or
 * before a byte that is not valid UTF-8. One quirk is kept on purpose: jansson cannot give back a
 * NUL byte read as the lookahead after a number or a bare word, so it silently skips it ("[1\0]"
 * is accepted); skipping it here too keeps both parsers' answers identical. */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fhir/fhir_int.h"
#include "fhir/json_int.h"
#include "trialhub/alloc.h"

enum { T_INVALID = -1, T_EOF = 0, T_STRING = 256, T_INTEGER, T_REAL, T_TRUE, T_FALSE, T_NULL };

/* Byte classes inside a string: one table lookup decides the common case. */
enum { C_PLAIN = 0, C_QUOTE, C_BACKSLASH, C_CONTROL, C_HIGH };

#define R4(x)  x, x, x, x
#define R16(x) R4(x), R4(x), R4(x), R4(x)
static const unsigned char str_class[256] = {
    R16(C_CONTROL), R16(C_CONTROL), /* 0x00-0x1f */
    C_PLAIN,        C_PLAIN,        C_QUOTE,     C_PLAIN,
    R4(C_PLAIN),    R4(C_PLAIN),    R4(C_PLAIN), /* 0x20-0x2f */
    R16(C_PLAIN),   R16(C_PLAIN),                /* 0x30-0x4f */
    R4(C_PLAIN),    R4(C_PLAIN),    R4(C_PLAIN), C_BACKSLASH,
    C_PLAIN,        C_PLAIN,        C_PLAIN,                  /* 0x50-0x5f */
    R16(C_PLAIN),   R16(C_PLAIN),                             /* 0x60-0x7f */
    R16(C_HIGH),    R16(C_HIGH),    R16(C_HIGH), R16(C_HIGH), /* 0x80-0xbf */
    R16(C_HIGH),    R16(C_HIGH),    R16(C_HIGH), R16(C_HIGH), /* 0xc0-0xff */
};
#undef R4
#undef R16

/* A string token: either a slice of the input (no escapes) or a run of the scratch buffer,
 * named by offset because the buffer may move when it grows. */
typedef struct tok {
    int kind;
    bool in_scratch;
    const char *str; /* input slice when !in_scratch */
    size_t off;      /* scratch offset when in_scratch */
    size_t len;
    json_int_t integer;
    double real;
} tok;

#define SCRATCH_INLINE 512

typedef struct parser {
    const unsigned char *begin;
    const unsigned char *end;
    const unsigned char *p; /* next byte to read */
    size_t depth;
    int err;                        /* 0, TH_EPARSE or TH_ENOMEM; the first error wins */
    const unsigned char *err_at;    /* where jansson's stream stood at the first error */
    const char *err_msg;            /* fixed text, never input */
    const unsigned char *last_drop; /* last NUL skipped after a number or word, or NULL */
    char *scratch;                  /* decoded escaped strings; a stack of them for keys */
    size_t scratch_used, scratch_cap;
    char scratch_inline[SCRATCH_INLINE];
} parser;

static void fail(parser *ps, const unsigned char *at, const char *msg)
{
    if (ps->err == 0) {
        ps->err = TH_EPARSE;
        ps->err_at = at;
        ps->err_msg = msg;
    }
}

static void *oom(parser *ps)
{
    if (ps->err == 0) {
        ps->err = TH_ENOMEM;
    }
    return NULL;
}

/* Length of the valid UTF-8 sequence at p (2-4), or 0 when jansson would refuse to decode it:
 * a stray continuation byte, C0/C1/F5-FF, an overlong form, a surrogate, a code point above
 * U+10FFFF, or a sequence cut by the end of the input. */
static size_t utf8_seq_len(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0];
    size_t avail = (size_t)(end - p);
    if (c < 0xC2 || c > 0xF4) {
        return 0;
    }
    if (c < 0xE0) {
        return avail >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    }
    if (c < 0xF0) {
        if (avail < 3 || (p[2] & 0xC0) != 0x80) {
            return 0;
        }
        unsigned lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        return p[1] >= lo && p[1] <= hi ? 3 : 0;
    }
    if (avail < 4 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) {
        return 0;
    }
    unsigned lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    return p[1] >= lo && p[1] <= hi ? 4 : 0;
}

static bool is_digit(unsigned c)
{
    return c - '0' < 10u;
}

static bool is_alpha(unsigned c)
{
    return (c | 0x20u) - 'a' < 26u;
}

static int hex_value(unsigned c)
{
    if (is_digit(c)) {
        return (int)(c - '0');
    }
    if ((c | 0x20u) - 'a' < 6u) {
        return (int)((c | 0x20u) - 'a' + 10);
    }
    return -1;
}

/* jansson reads one byte past a number or a bare word and gives it back. Reading it decodes
 * UTF-8 (an invalid byte is an error right there); giving back a NUL loses it (see the top). */
static bool lookahead_ok(parser *ps, const unsigned char *q)
{
    if (q < ps->end) {
        if (*q >= 0x80 && utf8_seq_len(q, ps->end) == 0) {
            fail(ps, q, "invalid UTF-8 byte");
            return false;
        }
    }
    return true;
}

static const unsigned char *skip_dropped_nul(parser *ps, const unsigned char *q)
{
    if (q < ps->end && *q == 0) {
        ps->last_drop = q;
        return q + 1;
    }
    return q;
}

static bool scratch_reserve(parser *ps, size_t more)
{
    if (more <= ps->scratch_cap - ps->scratch_used) {
        return true;
    }
    size_t cap = ps->scratch_cap * 2;
    while (cap - ps->scratch_used < more) {
        cap *= 2;
    }
    char *grown;
    if (ps->scratch == ps->scratch_inline) {
        grown = th_malloc(cap);
        if (grown != NULL) {
            memcpy(grown, ps->scratch, ps->scratch_used);
        }
    } else {
        grown = th_realloc_array(ps->scratch, cap, 1);
    }
    if (grown == NULL) {
        return false;
    }
    ps->scratch = grown;
    ps->scratch_cap = cap;
    return true;
}

static size_t utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static uint32_t hex4(const unsigned char *p)
{
    return (uint32_t)(hex_value(p[0]) << 12 | hex_value(p[1]) << 8 | hex_value(p[2]) << 4 |
                      hex_value(p[3]));
}

/* Decodes the already validated body of a string with escapes (from, to) onto the scratch
 * stack. Surrogates are checked here, as jansson does in its second pass, so their errors are
 * reported after the closing quote (token_end). */
static bool decode_escapes(parser *ps, const unsigned char *from, const unsigned char *to,
                           const unsigned char *token_end, tok *t)
{
    /* Output is never longer than the source: "\n" -> 1 byte, "\uXXXX" -> <= 3, a pair -> 4. */
    if (!scratch_reserve(ps, (size_t)(to - from))) {
        oom(ps);
        return false;
    }
    char *start = ps->scratch + ps->scratch_used;
    char *o = start;
    const unsigned char *s = from;
    while (s < to) {
        const unsigned char *bs = memchr(s, '\\', (size_t)(to - s));
        if (bs == NULL) {
            bs = to;
        }
        memcpy(o, s, (size_t)(bs - s));
        o += bs - s;
        s = bs;
        if (s == to) {
            break;
        }
        unsigned e = s[1];
        s += 2;
        switch (e) {
        case 'b':
            *o++ = '\b';
            break;
        case 'f':
            *o++ = '\f';
            break;
        case 'n':
            *o++ = '\n';
            break;
        case 'r':
            *o++ = '\r';
            break;
        case 't':
            *o++ = '\t';
            break;
        case 'u': {
            uint32_t cp = hex4(s);
            s += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (to - s >= 6 && s[0] == '\\' && s[1] == 'u') {
                    uint32_t low = hex4(s + 2);
                    s += 6;
                    if (low < 0xDC00 || low > 0xDFFF) {
                        fail(ps, token_end, "invalid Unicode surrogate pair");
                        return false;
                    }
                    cp = ((cp - 0xD800) << 10) + (low - 0xDC00) + 0x10000;
                } else {
                    fail(ps, token_end, "lone Unicode surrogate");
                    return false;
                }
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                fail(ps, token_end, "lone Unicode surrogate");
                return false;
            }
            o += utf8_encode(cp, o);
            break;
        }
        default: /* '"', '\\', '/' */
            *o++ = (char)e;
            break;
        }
    }
    t->in_scratch = true;
    t->off = ps->scratch_used;
    t->len = (size_t)(o - start);
    return true;
}

/* Scans a string whose opening quote is at q[-1]. jansson's first pass: control characters,
 * bad escapes and bad UTF-8 are errors at the byte where its stream stood. */
static int lex_string(parser *ps, const unsigned char *q, tok *t)
{
    const unsigned char *end = ps->end;
    const unsigned char *from = q;
    bool escaped = false;
    for (;;) {
        while (q < end && str_class[*q] == C_PLAIN) {
            q++;
        }
        if (q == end) {
            fail(ps, q, "premature end of input");
            return T_INVALID;
        }
        switch (str_class[*q]) {
        case C_QUOTE:
            ps->p = q + 1;
            if (escaped) {
                return decode_escapes(ps, from, q, q + 1, t) ? T_STRING : T_INVALID;
            }
            t->in_scratch = false;
            t->str = (const char *)from;
            t->len = (size_t)(q - from);
            return T_STRING;
        case C_CONTROL:
            fail(ps, q, *q == '\n' ? "unexpected newline" : "control character in string");
            return T_INVALID;
        case C_HIGH: {
            size_t n = utf8_seq_len(q, end);
            if (n == 0) {
                fail(ps, q, "invalid UTF-8 byte");
                return T_INVALID;
            }
            q += n;
            break;
        }
        default: { /* C_BACKSLASH */
            escaped = true;
            q++;
            /* The byte after the backslash is read whatever it is: jansson's stream decodes
             * it (bad UTF-8 fails before it) and counts its first byte. */
            if (q == end) {
                fail(ps, q, "invalid escape");
                return T_INVALID;
            }
            unsigned e = *q;
            if (e == 'u') {
                q++;
                for (int i = 0; i < 4; i++) {
                    if (q == end) {
                        fail(ps, q, "invalid escape");
                        return T_INVALID;
                    }
                    if (hex_value(*q) < 0) {
                        if (*q >= 0x80 && utf8_seq_len(q, end) == 0) {
                            fail(ps, q, "invalid UTF-8 byte");
                        } else {
                            fail(ps, q + 1, "invalid escape");
                        }
                        return T_INVALID;
                    }
                    q++;
                }
            } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' ||
                       e == 'r' || e == 't') {
                q++;
            } else {
                if (e >= 0x80 && utf8_seq_len(q, end) == 0) {
                    fail(ps, q, "invalid UTF-8 byte");
                } else {
                    fail(ps, q + 1, "invalid escape");
                }
                return T_INVALID;
            }
            break;
        }
        }
    }
}

/* strtod needs a NUL-terminated copy. Under a locale whose decimal point is not '.', it stops
 * at the '.', and then the point is swapped for the locale's as jansson does (found with
 * snprintf like jansson, since localeconv() is not thread-safe). */
static int convert_real(parser *ps, const unsigned char *s, const unsigned char *e, tok *t)
{
    size_t n = (size_t)(e - s);
    char stack_buf[64];
    char *buf = stack_buf;
    if (n >= sizeof(stack_buf)) {
        buf = th_malloc(n + 1);
        if (buf == NULL) {
            oom(ps);
            return T_INVALID;
        }
    }
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *stop;
    errno = 0;
    double value = strtod(buf, &stop);
    char *dot = memchr(buf, '.', n);
    if (stop != buf + n && dot != NULL) {
        char point[8];
        snprintf(point, sizeof(point), "%#.0f", 1.0);
        *dot = point[1];
        errno = 0;
        value = strtod(buf, NULL);
    }
    bool overflow = (value == HUGE_VAL || value == -HUGE_VAL) && errno == ERANGE;
    if (buf != stack_buf) {
        th_free(buf);
    }
    if (overflow) {
        fail(ps, e, "real number overflow");
        return T_INVALID;
    }
    t->real = value;
    return T_REAL;
}

/* Numbers as jansson's lex_scan_number: "-"? ("0" | [1-9][0-9]*) fraction? exponent?. A bad
 * shape is an invalid token ending where jansson gave the lookahead back. */
static int lex_number(parser *ps, const unsigned char *s, tok *t)
{
    const unsigned char *end = ps->end;
    const unsigned char *q = s;
    bool negative = *q == '-';
    if (negative) {
        q++;
    }
    if (q < end && *q == '0') {
        q++;
        if (q < end && is_digit(*q)) {
            ps->p = q;
            return T_INVALID;
        }
    } else if (q < end && is_digit(*q)) {
        do {
            q++;
        } while (q < end && is_digit(*q));
    } else {
        if (!lookahead_ok(ps, q)) {
            return T_INVALID;
        }
        ps->p = q;
        return T_INVALID;
    }
    if (q == end || (*q != '.' && (*q | 0x20) != 'e')) {
        if (!lookahead_ok(ps, q)) {
            return T_INVALID;
        }
        /* strtoll semantics: out of json_int_t range is ERANGE, an error in jansson. */
        const unsigned char *d = s + negative;
        uint64_t limit = negative ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
        uint64_t v = 0;
        bool range = (size_t)(q - d) <= 19;
        for (; range && d < q; d++) {
            unsigned digit = (unsigned)(*d - '0');
            if (v > (limit - digit) / 10) {
                range = false;
            }
            v = v * 10 + digit;
        }
        if (!range) {
            fail(ps, q, negative ? "too big negative integer" : "too big integer");
            return T_INVALID;
        }
        t->integer =
            negative ? (v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(json_int_t)v) : (json_int_t)v;
        ps->p = skip_dropped_nul(ps, q);
        return T_INTEGER;
    }
    if (*q == '.') {
        q++;
        if (q == end || !is_digit(*q)) {
            if (!lookahead_ok(ps, q)) {
                return T_INVALID;
            }
            ps->p = q;
            return T_INVALID;
        }
        do {
            q++;
        } while (q < end && is_digit(*q));
    }
    if (q < end && (*q | 0x20) == 'e') {
        q++;
        if (q < end && (*q == '+' || *q == '-')) {
            q++;
        }
        if (q == end || !is_digit(*q)) {
            if (!lookahead_ok(ps, q)) {
                return T_INVALID;
            }
            ps->p = q;
            return T_INVALID;
        }
        do {
            q++;
        } while (q < end && is_digit(*q));
    }
    if (!lookahead_ok(ps, q)) {
        return T_INVALID;
    }
    int kind = convert_real(ps, s, q, t);
    if (kind == T_REAL) {
        ps->p = skip_dropped_nul(ps, q);
    }
    return kind;
}

/* Bare words: jansson reads every ASCII letter, then compares the whole word. */
static int lex_word(parser *ps, const unsigned char *s)
{
    const unsigned char *q = s + 1;
    while (q < ps->end && is_alpha(*q)) {
        q++;
    }
    if (!lookahead_ok(ps, q)) {
        return T_INVALID;
    }
    size_t n = (size_t)(q - s);
    int kind = T_INVALID;
    if (n == 4 && memcmp(s, "true", 4) == 0) {
        kind = T_TRUE;
    } else if (n == 5 && memcmp(s, "false", 5) == 0) {
        kind = T_FALSE;
    } else if (n == 4 && memcmp(s, "null", 4) == 0) {
        kind = T_NULL;
    }
    ps->p = kind != T_INVALID ? skip_dropped_nul(ps, q) : q;
    return kind;
}

/* The next token, with ps->p after it (jansson's stream position). On a lexical error the
 * error is already recorded and T_INVALID returned; T_INVALID without an error means a token
 * jansson calls invalid, reported by the caller at ps->p. */
static inline int lex_token(parser *ps, tok *t)
{
    const unsigned char *q = ps->p;
    const unsigned char *end = ps->end;
    while (q < end && (*q == ' ' || *q == '\n' || *q == '\r' || *q == '\t')) {
        q++;
    }
    if (q == end) {
        ps->p = q;
        return T_EOF;
    }
    unsigned c = *q;
    switch (c) {
    case '{':
    case '}':
    case '[':
    case ']':
    case ':':
    case ',':
        ps->p = q + 1;
        return (int)c;
    case '"':
        return lex_string(ps, q + 1, t);
    case '-':
    case '0':
    case '1':
    case '2':
    case '3':
    case '4':
    case '5':
    case '6':
    case '7':
    case '8':
    case '9':
        return lex_number(ps, q, t);
    default:
        break;
    }
    if (is_alpha(c)) {
        return lex_word(ps, q);
    }
    if (c >= 0x80) {
        size_t n = utf8_seq_len(q, end);
        if (n == 0) {
            ps->p = q;
            fail(ps, q, "invalid UTF-8 byte");
            return T_INVALID;
        }
        ps->p = q + n;
        return T_INVALID;
    }
    ps->p = q + 1;
    return T_INVALID;
}

static inline int lex(parser *ps, tok *t)
{
    t->kind = lex_token(ps, t);
    return t->kind;
}

static const char *tok_str(const parser *ps, const tok *t)
{
    return t->in_scratch ? ps->scratch + t->off : t->str;
}

static json_t *parse_value(parser *ps, tok *t);

static json_t *parse_object(parser *ps, tok *t)
{
    json_t *object = json_object();
    if (object == NULL) {
        return oom(ps);
    }
    int kind = lex(ps, t);
    if (kind == '}') {
        return object;
    }
    for (;;) {
        if (kind != T_STRING) {
            fail(ps, ps->p, "string or '}' expected");
            goto error;
        }
        /* An escaped key stays on the scratch stack while its value is parsed. */
        bool key_in_scratch = t->in_scratch;
        size_t key_off = t->off;
        const char *key_str = t->str;
        size_t key_len = t->len;
        const char *key = tok_str(ps, t);
        if (key_in_scratch) {
            ps->scratch_used += key_len;
        }
        if (key_in_scratch && memchr(key, '\0', key_len) != NULL) {
            fail(ps, ps->p, "NUL byte in object key not supported");
            goto error;
        }
        if (json_object_getn(object, key, key_len) != NULL) {
            fail(ps, ps->p, "duplicate object key");
            goto error;
        }
        if (lex(ps, t) != ':') {
            fail(ps, ps->p, "':' expected");
            goto error;
        }
        lex(ps, t);
        json_t *value = parse_value(ps, t);
        if (value == NULL) {
            goto error;
        }
        if (key_in_scratch) {
            key_str = ps->scratch + key_off;
        }
        if (json_object_setn_new_nocheck(object, key_str, key_len, value) != 0) {
            oom(ps);
            goto error;
        }
        if (key_in_scratch) {
            ps->scratch_used = key_off;
        }
        kind = lex(ps, t);
        if (kind != ',') {
            break;
        }
        kind = lex(ps, t);
    }
    if (kind != '}') {
        fail(ps, ps->p, "'}' expected");
        goto error;
    }
    return object;
error:
    json_decref(object);
    return NULL;
}

static json_t *parse_array(parser *ps, tok *t)
{
    json_t *array = json_array();
    if (array == NULL) {
        return oom(ps);
    }
    int kind = lex(ps, t);
    if (kind == ']') {
        return array;
    }
    while (kind != T_EOF) {
        json_t *elem = parse_value(ps, t);
        if (elem == NULL) {
            goto error;
        }
        if (json_array_append_new(array, elem) != 0) {
            oom(ps);
            goto error;
        }
        kind = lex(ps, t);
        if (kind != ',') {
            break;
        }
        kind = lex(ps, t);
    }
    if (kind != ']') {
        fail(ps, ps->p, "']' expected");
        goto error;
    }
    return array;
error:
    json_decref(array);
    return NULL;
}

/* t->kind holds the token already read, as in jansson's parse_value(). */
static json_t *parse_value(parser *ps, tok *t)
{
    if (ps->err != 0) {
        return NULL; /* a lexical error in the token just read */
    }
    if (++ps->depth > TH__JSON_MAX_DEPTH) {
        fail(ps, ps->p, "maximum parsing depth reached");
        return NULL;
    }
    json_t *json;
    switch (t->kind) {
    case T_STRING: {
        const char *s = tok_str(ps, t);
        /* Only an escape can put a NUL in a string: raw control bytes are errors. */
        if (t->in_scratch && memchr(s, '\0', t->len) != NULL) {
            fail(ps, ps->p, "\\u0000 is not allowed");
            return NULL;
        }
        /* UTF-8 was validated while scanning. */
        json = json_stringn_nocheck(s, t->len);
        break;
    }
    case T_INTEGER:
        json = json_integer(t->integer);
        break;
    case T_REAL:
        json = json_real(t->real);
        break;
    case T_TRUE:
        json = json_true();
        break;
    case T_FALSE:
        json = json_false();
        break;
    case T_NULL:
        json = json_null();
        break;
    case '{':
        json = parse_object(ps, t);
        break;
    case '[':
        json = parse_array(ps, t);
        break;
    case T_INVALID:
        fail(ps, ps->p, "invalid token");
        return NULL;
    default:
        fail(ps, ps->p, "unexpected token");
        return NULL;
    }
    if (json == NULL) {
        return ps->err != 0 ? NULL : oom(ps);
    }
    ps->depth--;
    return json;
}

/* jansson's line, column and position at the error: what its stream had consumed, counting a
 * column per UTF-8 lead byte and nothing for a NUL it skipped. A NUL before the last byte was
 * always skipped (a NUL jansson keeps ends the parse at once); the last byte is a skipped NUL
 * only when it was the latest one skipped. */
static void fill_error(const parser *ps, th_fhir_parse_error *perr)
{
    int line = 1, column = 0;
    size_t position = 0;
    for (const unsigned char *q = ps->begin; q < ps->err_at; q++) {
        unsigned c = *q;
        if (c == 0 && (q + 1 != ps->err_at || q == ps->last_drop)) {
            continue;
        }
        position++;
        if (c == '\n') {
            line++;
            column = 0;
        } else if (c < 0x80 || c >= 0xC0) {
            column++;
        }
    }
    perr->line = line;
    perr->column = column;
    perr->position = position;
    th__fhir_utf8_copy(perr->message, sizeof(perr->message), ps->err_msg);
}

int th__json_parse(const char *data, size_t len, json_t **out, th_fhir_parse_error *perr)
{
    if (data == NULL) {
        data = "";
        len = 0;
    }
    parser ps;
    ps.begin = (const unsigned char *)data;
    ps.end = ps.begin + len;
    ps.p = ps.begin;
    ps.depth = 0;
    ps.err = 0;
    ps.err_at = NULL;
    ps.err_msg = NULL;
    ps.last_drop = NULL;
    ps.scratch = ps.scratch_inline;
    ps.scratch_used = 0;
    ps.scratch_cap = sizeof(ps.scratch_inline);

    tok t;
    json_t *root = NULL;
    lex(&ps, &t);
    if (ps.err == 0 && t.kind != '[' && t.kind != '{') {
        fail(&ps, ps.p, "'[' or '{' expected");
    }
    if (ps.err == 0) {
        root = parse_value(&ps, &t);
    }
    if (root != NULL && lex(&ps, &t) != T_EOF) {
        fail(&ps, ps.p, "end of file expected");
        json_decref(root);
        root = NULL;
    }
    if (ps.scratch != ps.scratch_inline) {
        th_free(ps.scratch);
    }
    if (root == NULL) {
        if (ps.err == TH_EPARSE && perr != NULL) {
            fill_error(&ps, perr);
        }
        return ps.err != 0 ? ps.err : TH_ENOMEM;
    }
    *out = root;
    return 0;
}
