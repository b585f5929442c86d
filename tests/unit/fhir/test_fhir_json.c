/* The request-body JSON parser (src/fhir/json_parse.c) checked differentially against jansson's
 * json_loadb(JSON_REJECT_DUPLICATES): hand-written edge cases, every fixture, and thousands of
 * seeded mutations of them must get the same accept/reject answer, json_equal() trees, and the
 * same error line, column and position. Also: messages never quote the input, allocation
 * failure is clean, and deep nesting is an error rather than a crash. */
#include "fhir_test_util.h"

#include <dirent.h>

#include "fhir/json_int.h"
#include "trialhub/alloc.h"

#define MARK "Xq7Secret"

static size_t ncompared, naccepted;

/* Parses data with both parsers and fails the test, naming the case, on any difference. */
static void diff_check(const char *data, size_t len, const char *what)
{
    json_error_t jerr;
    json_t *want = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    json_t *got = NULL;
    th_fhir_parse_error perr;
    memset(&perr, 0, sizeof(perr));
    int rc = th__json_parse(data, len, &got, &perr);
    ncompared++;
    if (want != NULL) {
        if (rc != TH_OK) {
            fail_msg("%s: jansson accepts, th__json_parse says %d (%s at %d:%d)", what, rc,
                     perr.message, perr.line, perr.column);
        }
        if (!json_equal(want, got)) {
            fail_msg("%s: trees differ", what);
        }
        /* Members in the same order: qr.c's walk depends on insertion order. */
        if (json_is_object(want)) {
            void *a = json_object_iter(want), *b = json_object_iter(got);
            for (; a != NULL && b != NULL;
                 a = json_object_iter_next(want, a), b = json_object_iter_next(got, b)) {
                assert_string_equal(json_object_iter_key(a), json_object_iter_key(b));
            }
            assert_true(a == NULL && b == NULL);
        }
        naccepted++;
        json_decref(want);
        json_decref(got);
        return;
    }
    assert_int_not_equal(json_error_code(&jerr), json_error_out_of_memory);
    if (rc != TH_EPARSE) {
        fail_msg("%s: jansson rejects (%s at %d:%d), th__json_parse says %d", what, jerr.text,
                 jerr.line, jerr.column, rc);
    }
    assert_null(got);
    int want_line = jerr.line > 0 ? jerr.line : 0;
    int want_col = jerr.column > 0 ? jerr.column : 0;
    size_t want_pos = jerr.position > 0 ? (size_t)jerr.position : 0;
    if (perr.line != want_line || perr.column != want_col || perr.position != want_pos) {
        fail_msg("%s: jansson '%s' at %d:%d pos %zu, th__json_parse '%s' at %d:%d pos %zu", what,
                 jerr.text, want_line, want_col, want_pos, perr.message, perr.line, perr.column,
                 perr.position);
    }
    assert_true(perr.message[0] != '\0');
}

#define CHECK_LIT(lit) diff_check(lit, sizeof(lit) - 1, #lit)

static void test_edge_cases(void **state)
{
    (void)state;
    static const char *const cases[] = {
        /* top level */
        "",
        " ",
        "\n\n",
        "{}",
        "[]",
        " {} ",
        "\t[\r\n]\n",
        "1",
        "-1",
        "\"s\"",
        "true",
        "null",
        "false",
        "nul",
        "tru",
        "1.5",
        "{",
        "[",
        "}",
        "]",
        ":",
        ",",
        "{}}",
        "[]]",
        "{} {}",
        "{}x",
        "{} x",
        "{}\n\n  ,",
        "[] 1",
        "[]\"",
        "{}true",
        /* objects and arrays */
        "{\"a\":1}",
        "{\"a\":1,}",
        "{\"a\":1,,}",
        "{,}",
        "[,]",
        "[1,]",
        "[1,,2]",
        "[1 2]",
        "{\"a\" 1}",
        "{\"a\":}",
        "{\"a\"}",
        "{\"a\":1 \"b\":2}",
        "{1:2}",
        "{a:1}",
        "{\"a\":1",
        "{\"a\":",
        "{\"a\"",
        "{\"a",
        "[1",
        "[1,",
        "[\"",
        "{\"a\":[1,{\"b\":[]}],\"c\":{}}",
        "[[],[[]],{},{\"\":{}}]",
        "{\"\":1}",
        "{\"\":1,\"\":2}",
        "[{}, {} ,{ } ]",
        "{\"a\":1,\"b\":2,\"a\":3}",
        "{\"x\":{\"a\":1,\"a\":1}}",
        "[{\"a\":[{\"k\":1,\"k\":2}]}]",
        "{\"a\":1,\"A\":2}",
        "{\"a\\u0062\":1,\"ab\":2}",
        "{\"\\/\":1,\"/\":2}",
        "{\"ab\":1,\"a\\u0062\":2}",
        /* literals */
        "[true,false,null]",
        "[truefalse]",
        "[true1]",
        "[True]",
        "[nulll]",
        "[t]",
        "[n]",
        "[trUe]",
        "[true false]",
        "[true,]",
        "[-true]",
        /* numbers */
        "[0]",
        "[-0]",
        "[-0.0]",
        "[0.0]",
        "[01]",
        "[-01]",
        "[00]",
        "[1.]",
        "[.5]",
        "[1.e5]",
        "[1e]",
        "[1e+]",
        "[1e-]",
        "[1E5]",
        "[1e05]",
        "[1.5e-3]",
        "[-]",
        "[--1]",
        "[+1]",
        "[1e400]",
        "[-1e400]",
        "[1e-400]",
        "[1.7976931348623157e308]",
        "[1.8e308]",
        "[9223372036854775807]",
        "[9223372036854775808]",
        "[-9223372036854775808]",
        "[-9223372036854775809]",
        "[18446744073709551616]",
        "[99999999999999999999999]",
        "[-99999999999999999999999]",
        "[10000000000000000000]",
        "[9223372036854775807.0]",
        "[0x10]",
        "[1x]",
        "[1 ]",
        "[1\n]",
        "[1\r\n,2]",
        "[1,2,3]",
        "[0e0]",
        "[0.e1]",
        "[123abc]",
        "[1.5x]",
        "[1e5x]",
        "[12345678901234567890123456789012345678901234567890."
        "12345678901234567890123456789012345678901234567890]",
        "[1.000000000000000000000000000000000000000000000000000000000000000000000000000001]",
        "[-",
        "[0",
        "[1.",
        "[1e",
        "[1e+",
        "{\"a\":-}",
        "{\"a\":1.}",
        /* strings and escapes */
        "[\"\"]",
        "[\"abc\"]",
        "[\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"]",
        "[\"\\x\"]",
        "[\"\\'\"]",
        "[\"\\u0041\"]",
        "[\"\\u00e9\\u00E9\"]",
        "[\"\\u20AC\"]",
        "[\"\\uD83D\\uDE00\"]",
        "[\"\\ud83d\\ude00x\"]",
        "[\"\\uD83D\"]",
        "[\"\\uD83Dx\"]",
        "[\"\\uD83D\\u0041\"]",
        "[\"\\uD83D\\uD83D\"]",
        "[\"\\uDE00\"]",
        "[\"a\\uDE00b\"]",
        "[\"\\uD83D\\n\"]",
        "[\"\\u12\"]",
        "[\"\\u12G4\"]",
        "[\"\\u\"]",
        "[\"\\u123\"]",
        "[\"\\uzzzz\"]",
        "[\"\\u0000\"]",
        "{\"\\u0000\":1}",
        "{\"a\\u0000b\":1}",
        "[\"a\\u0000\"]",
        "[\"\\",
        "[\"\\u",
        "[\"\\u12",
        "[\"abc",
        "[\"a\nb\"]",
        "[\"a\tb\"]",
        "[\"a\rb\"]",
        "[\"\x1f\"]",
        "[\"\x7f\"]",
        "[\"\\\n\"]",
        "[\"\\\t\"]",
        "{\"a\nb\":1}",
        "[\"\\uDBFF\\uDFFF\"]",
        "[\"\\uDC00\\uD800\"]",
        "[\"\\uD800\\uDBFF\"]",
        "[\"\\u0080\\u07FF\\u0800\\uFFFF\"]",
        /* UTF-8 */
        "[\"\xc3\xa9\"]",
        "[\"\xe2\x82\xac\"]",
        "[\"\xf0\x9f\x98\x80\"]",
        "[\"\xf4\x8f\xbf\xbf\"]",
        "[\"\xf4\x90\x80\x80\"]",
        "[\"\xc0\xaf\"]",
        "[\"\xc1\xbf\"]",
        "[\"\xe0\x80\xaf\"]",
        "[\"\xe0\x9f\xbf\"]",
        "[\"\xf0\x80\x80\xaf\"]",
        "[\"\xf0\x8f\xbf\xbf\"]",
        "[\"\xed\xa0\x80\"]",
        "[\"\xed\xbf\xbf\"]",
        "[\"\xed\x9f\xbf\"]",
        "[\"\xf8\x88\x80\x80\x80\"]",
        "[\"\xfc\x84\x80\x80\x80\x80\"]",
        "[\"\xfe\"]",
        "[\"\xff\"]",
        "[\"\x80\"]",
        "[\"\xbf\"]",
        "[\"\xc3\"]",
        "[\"\xc3",
        "[\"\xe2\x82\"]",
        "[\"\xe2\x82",
        "[\"\xf0\x9f\x98\"]",
        "[\"\xc3(\"]",
        "[\"\xe2(\xa1\"]",
        "[\"\\\xc3\xa9\"]",
        "[\"\\u\xc3\xa9\"]",
        "[\"\\\xff\"]",
        "[\"\\u1\xff\"]",
        "\xc3\xa9",
        "[\xc3\xa9]",
        "[\xff]",
        "[1\xff]",
        "[true\xff]",
        "[tru\xff]",
        "[-\xff]",
        "[0\xff]",
        "[1.\xff]",
        "[1e\xff]",
        "[1e+\xff]",
        "{}\xff",
        "{} \xe2\x82\xac",
        "{\"\xc3\xa9\xc3\xa9\":[\"\xe2\x82\xac\", x]}",
        "\xef\xbb\xbf{}",
        "[1\xc3\xa9]",
        "[\"\xc3\xa9\xc3\xa9\" x]",
        /* whitespace and line counting */
        "{\n\"a\":1,\n\"a\":2}",
        "{\r\n\"a\":1,\r\n\"a\":2}",
        "{\r\"a\":1,\r\"a\":2}",
        "\n\n\n  [1,\n  2,\n  x]",
        "[\f]",
        "[\v]",
        "[\n\t \r1\n\t \r]",
        "[1\n\n",
        "\n\n",
        "[\n\"\xc3\xa9\xc3\xa9\", \"\\uD800\"]",
        "\xc3\xa9\n\xc3\xa9",
        /* keys */
        "{\"a\":1,\"b\":{\"a\":1,\"b\":[{\"a\":1,\"a\":2}]}}",
        "{\"a\":{},\"a\":{}}",
        "{\"a\":1,\"b\":2,\"c\":3,\"d\":4,\"e\":5,\"f\":6,\"g\":7,\"h\":8,\"i\":9,\"j\":10,"
        "\"k\":11,\"a\":12}",
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        diff_check(cases[i], strlen(cases[i]), cases[i]);
    }

    /* NUL bytes: jansson cannot give back a NUL read after a number or a word and skips it. */
    CHECK_LIT("[1\0]");
    CHECK_LIT("[1\0,2\0]");
    CHECK_LIT("[true\0]");
    CHECK_LIT("[1\0");
    CHECK_LIT("[1\0 ");
    CHECK_LIT("[1\0\0]");
    CHECK_LIT("[\0]");
    CHECK_LIT("{}\0");
    CHECK_LIT("\0{}");
    CHECK_LIT("[\"a\0\"]");
    CHECK_LIT("[\"\\\0\"]");
    CHECK_LIT("[\"\\u12\0\"]");
    CHECK_LIT("[-\0]");
    CHECK_LIT("[1.\0]");
    CHECK_LIT("[1e\0]");
    CHECK_LIT("[tru\0e]");
    CHECK_LIT("[1\0\n\0x]");
    CHECK_LIT("{\"a\":1\0,\"b\":null\0}");
    CHECK_LIT("[1.5\0 ,\n2\0\n,\0]");
    CHECK_LIT("[99999999999999999999\0]");

    /* A long escaped key and value overflow the inline scratch buffer. */
    char big[16384];
    size_t n = 0;
    n += (size_t)snprintf(big + n, sizeof(big) - n, "{\"");
    for (int i = 0; i < 300; i++) {
        n += (size_t)snprintf(big + n, sizeof(big) - n, "\\u00e9\\n");
    }
    n += (size_t)snprintf(big + n, sizeof(big) - n, "\":{\"k\":\"");
    for (int i = 0; i < 300; i++) {
        n += (size_t)snprintf(big + n, sizeof(big) - n, "\\t\\uD83D\\uDE00");
    }
    n += (size_t)snprintf(big + n, sizeof(big) - n, "\"}}");
    diff_check(big, n, "long escaped key and value");
}

/* [[[...]]] with `levels` brackets, optionally a scalar in the innermost one. */
static void nested(size_t levels, const char *inner, const char *open, const char *close)
{
    size_t cap = levels * (strlen(open) + strlen(close)) + strlen(inner) + 1;
    char *s = malloc(cap);
    assert_non_null(s);
    size_t n = 0;
    for (size_t i = 0; i < levels; i++) {
        memcpy(s + n, open, strlen(open));
        n += strlen(open);
    }
    memcpy(s + n, inner, strlen(inner));
    n += strlen(inner);
    for (size_t i = 0; i < levels; i++) {
        memcpy(s + n, close, strlen(close));
        n += strlen(close);
    }
    char what[64];
    snprintf(what, sizeof(what), "%zu levels of %s with '%s'", levels, open, inner);
    diff_check(s, n, what);
    free(s);
}

static void test_depth(void **state)
{
    (void)state;
    static const size_t levels[] = {2046, 2047, 2048, 2049, 2050, 5000, 100000};
    for (size_t i = 0; i < sizeof(levels) / sizeof(levels[0]); i++) {
        nested(levels[i], "", "[", "]");
        nested(levels[i], "1", "[", "]");
        nested(levels[i], "\"s\"", "[", "]");
        nested(levels[i], "x", "[", "]");
        nested(levels[i], "{}", "{\"a\":", "}");
        nested(levels[i], "0", "{\"a\":[", "]}");
    }
    /* Unclosed: the error comes at the depth limit, not at the end. */
    char *open = malloc(3000);
    assert_non_null(open);
    memset(open, '[', 3000);
    diff_check(open, 3000, "3000 unclosed brackets");
    diff_check(open, 2048, "2048 unclosed brackets");
    free(open);
}

/* Every file of a fixture directory, NUL-free by construction (read with its length). */
typedef struct corpus {
    char **data;
    size_t *len;
    size_t n;
} corpus;

static void corpus_add_dir(corpus *c, const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        fail_msg("cannot open %s", dir);
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') {
            continue;
        }
        char path[1024];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        FILE *f = fopen(path, "rb");
        assert_non_null(f);
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *buf = malloc((size_t)size + 1);
        assert_non_null(buf);
        assert_int_equal(fread(buf, 1, (size_t)size, f), (size_t)size);
        fclose(f);
        c->data = realloc(c->data, (c->n + 1) * sizeof(*c->data));
        c->len = realloc(c->len, (c->n + 1) * sizeof(*c->len));
        assert_non_null(c->data);
        assert_non_null(c->len);
        c->data[c->n] = buf;
        c->len[c->n] = (size_t)size;
        c->n++;
    }
    closedir(d);
}

static void corpus_load(corpus *c)
{
    memset(c, 0, sizeof(*c));
    corpus_add_dir(c, TH_TEST_FHIR_DATA "/mii");
    corpus_add_dir(c, TH_TEST_FHIR_DATA "/../../fuzz/corpus/qr");
    assert_true(c->n >= 15);
}

static void corpus_free(corpus *c)
{
    for (size_t i = 0; i < c->n; i++) {
        free(c->data[i]);
    }
    free(c->data);
    free(c->len);
}

static void test_corpus(void **state)
{
    (void)state;
    corpus c;
    corpus_load(&c);
    size_t before = naccepted;
    for (size_t i = 0; i < c.n; i++) {
        diff_check(c.data[i], c.len[i], "corpus file");
        /* Every prefix of the start of the file: truncation in each token state. */
        size_t upto = c.len[i] < 600 ? c.len[i] : 600;
        for (size_t k = 0; k < upto; k++) {
            diff_check(c.data[i], k, "corpus prefix");
        }
    }
    assert_true(naccepted - before >= 10);
    corpus_free(&c);
}

/* xorshift64*: a fixed seed keeps failures reproducible. */
static uint64_t rng_state = 0x9E3779B97F4A7C15u;

static uint64_t rng(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717u;
}

/* Bytes that steer the mutations towards the lexer's decision points. */
static const char interesting[] = "\"\\{}[],:0123456789-+.eEtfnu \n\r\t\x00\x1f\x7f\x80\xbf\xc0"
                                  "\xc3\xe2\xed\xf0\xf4\xf5\xff/aA";

static void test_mutations(void **state)
{
    (void)state;
    corpus c;
    corpus_load(&c);
    char *buf = malloc(1 << 17);
    assert_non_null(buf);
    size_t accepted_before = naccepted;
    for (int iter = 0; iter < 6000; iter++) {
        size_t f = (size_t)(rng() % c.n);
        if (c.len[f] + 64 > (1 << 17)) {
            continue;
        }
        size_t len = c.len[f];
        memcpy(buf, c.data[f], len);
        int nmut = 1 + (int)(rng() % 3);
        for (int m = 0; m < nmut && len > 0; m++) {
            size_t at = (size_t)(rng() % len);
            unsigned op = (unsigned)(rng() % 4);
            char byte = rng() % 2 ? interesting[rng() % (sizeof(interesting) - 1)] : (char)rng();
            if (op == 0) { /* flip */
                buf[at] = byte;
            } else if (op == 1) { /* insert */
                memmove(buf + at + 1, buf + at, len - at);
                buf[at] = byte;
                len++;
            } else if (op == 2) { /* delete */
                memmove(buf + at, buf + at + 1, len - at - 1);
                len--;
            } else { /* truncate */
                len = at;
            }
        }
        diff_check(buf, len, "mutation");
    }
    /* Single-byte flips keep most documents valid: both branches are exercised. */
    assert_true(naccepted > accepted_before);
    free(buf);
    corpus_free(&c);
}

static void test_message_never_quotes_input(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "{\"" MARK "\" " MARK "}",
        "[" MARK "]",
        "{\"a\":\"" MARK "\\q\"}",
        "[\"" MARK "\n\"]",
        "{\"" MARK "\":1,\"" MARK "\":2}",
        "[\"" MARK "\\uDE00\"]",
        "[99999999999999999999" MARK "]",
        "[1e999]" MARK,
        "[\"" MARK "\xff\"]",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        json_t *out = NULL;
        th_fhir_parse_error perr;
        assert_int_equal(th__json_parse(bad[i], strlen(bad[i]), &out, &perr), TH_EPARSE);
        assert_null(out);
        assert_null(strstr(perr.message, MARK));
        assert_null(strstr(perr.message, "Xq7"));
        assert_true(perr.line >= 1);
    }
    /* NULL perr is allowed; NULL data with no length is the empty body. */
    json_t *out = NULL;
    assert_int_equal(th__json_parse("[", 1, &out, NULL), TH_EPARSE);
    assert_int_equal(th__json_parse(NULL, 0, &out, NULL), TH_EPARSE);
    assert_null(out);
}

/* The parser's own allocations (scratch growth for long escaped strings, long reals) fail
 * cleanly; jansson's own allocations are not routed through th_malloc. */
static void test_oom(void **state)
{
    (void)state;
    char doc[8192];
    size_t n = 0;
    n += (size_t)snprintf(doc + n, sizeof(doc) - n, "{\"");
    for (int i = 0; i < 200; i++) {
        n += (size_t)snprintf(doc + n, sizeof(doc) - n, "\\n\\u00e9");
    }
    n += (size_t)snprintf(doc + n, sizeof(doc) - n, "\":[1.");
    for (int i = 0; i < 100; i++) {
        doc[n++] = '5';
    }
    n += (size_t)snprintf(doc + n, sizeof(doc) - n, ",\"");
    for (int i = 0; i < 400; i++) {
        n += (size_t)snprintf(doc + n, sizeof(doc) - n, "\\t");
    }
    n += (size_t)snprintf(doc + n, sizeof(doc) - n, "\"]}");
    int rc = TH_ENOMEM;
    long k;
    for (k = 0; k < 100; k++) {
        json_t *out = NULL;
        th__fault_fail_after(k);
        rc = th__json_parse(doc, n, &out, NULL);
        th__fault_fail_after(-1);
        if (rc == TH_OK) {
            json_decref(out);
            break;
        }
        assert_int_equal(rc, TH_ENOMEM);
        assert_null(out);
    }
    assert_int_equal(rc, TH_OK);
    assert_true(k >= 2);
    diff_check(doc, n, "oom document");
}

static int report_counts(void **state)
{
    (void)state;
    print_message("  %zu inputs compared with jansson, %zu accepted by both\n", ncompared,
                  naccepted);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edge_cases),
        cmocka_unit_test(test_depth),
        cmocka_unit_test(test_corpus),
        cmocka_unit_test(test_mutations),
        cmocka_unit_test(test_message_never_quotes_input),
        cmocka_unit_test(test_oom),
    };
    return cmocka_run_group_tests(tests, NULL, report_counts);
}
