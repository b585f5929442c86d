/* Questionnaire registry: built-ins, loading the MII instruments, canonical lookup with and
 * without versions, clear errors for bad files with all-or-nothing loads, the Bundle, and
 * construction under allocation failure. */
#include "fhir_test_util.h"

#include <unistd.h>

#include "trialhub/alloc.h"

#define MII_BASE "https://www.medizininformatik-initiative.de/fhir/ext/modul-pro/Questionnaire/"

static const th_fhir_instrument *must_find(const th_qreg *reg, const char *canonical)
{
    const th_fhir_instrument *inst = NULL;
    int rc = th_qreg_find(reg, canonical, &inst);
    if (rc != TH_OK) {
        fail_msg("find %s: %s", canonical, th_errname(rc));
    }
    assert_non_null(inst);
    return inst;
}

static void test_builtins(void **state)
{
    (void)state;
    th_qreg *reg = tu_registry(false);
    assert_int_equal(th_qreg_count(reg), 2);

    const th_fhir_instrument *phq = must_find(reg, "http://loinc.org/q/44249-1");
    assert_true(th_fhir_instrument_builtin(phq));
    assert_int_equal(th_fhir_instrument_scale(phq), TH_FHIR_SCALE_PHQ9);
    assert_int_equal(th_fhir_instrument_score_kind(phq), TH_FHIR_SCORE_SUM);
    assert_int_equal(th_fhir_instrument_scored_items(phq), 9);
    assert_string_equal(th_fhir_instrument_id(phq), "phq-9");
    assert_string_equal(th_fhir_instrument_version(phq), "1.0.0");
    assert_non_null(th_fhir_instrument_title(phq));
    assert_ptr_equal(th_qreg_get(reg, 0), phq);

    const th_fhir_instrument *gad = must_find(reg, "http://loinc.org/q/69737-5");
    assert_int_equal(th_fhir_instrument_scale(gad), TH_FHIR_SCALE_GAD7);
    assert_int_equal(th_fhir_instrument_score_kind(gad), TH_FHIR_SCORE_SUM);
    assert_int_equal(th_fhir_instrument_scored_items(gad), 7);
    assert_string_equal(th_fhir_instrument_url(gad), "http://loinc.org/q/69737-5");

    /* With a version, exact or not, and with an empty version. */
    assert_ptr_equal(must_find(reg, "http://loinc.org/q/44249-1|1.0.0"), phq);
    assert_ptr_equal(must_find(reg, "http://loinc.org/q/44249-1|2.72"), phq);
    assert_ptr_equal(must_find(reg, "http://loinc.org/q/44249-1|"), phq);

    const th_fhir_instrument *none = NULL;
    assert_int_equal(th_qreg_find(reg, "http://loinc.org/q/44249", &none), TH_ENOTFOUND);
    assert_int_equal(th_qreg_find(reg, "http://loinc.org/q/44249-10", &none), TH_ENOTFOUND);
    assert_int_equal(th_qreg_find(reg, "", &none), TH_ENOTFOUND);
    assert_null(none);
    assert_int_equal(th_qreg_find(reg, NULL, &none), TH_EINVAL);
    assert_null(th_qreg_get(reg, 2));
    th_qreg_destroy(reg);
    th_qreg_destroy(NULL);
}

static void test_load_mii(void **state)
{
    (void)state;
    th_qreg *reg = tu_registry(true);
    assert_int_equal(th_qreg_count(reg), 6);

    const th_fhir_instrument *phq = must_find(reg, MII_BASE "mii-qst-pro-phq-9|2027.0.0-ballot.1");
    assert_false(th_fhir_instrument_builtin(phq));
    assert_int_equal(th_fhir_instrument_scale(phq), TH_FHIR_SCALE_PHQ9);
    assert_int_equal(th_fhir_instrument_score_kind(phq), TH_FHIR_SCORE_SUM);
    assert_int_equal(th_fhir_instrument_scored_items(phq), 9);

    /* The GAD-7 response pins rc3; the saved Questionnaire is ballot.1. */
    const th_fhir_instrument *gad =
        must_find(reg, MII_BASE "mii-qst-pro-gad-7|2027.0.0-ballot.rc3");
    assert_string_equal(th_fhir_instrument_version(gad), "2027.0.0-ballot.1");
    assert_int_equal(th_fhir_instrument_scale(gad), TH_FHIR_SCALE_GAD7);
    assert_int_equal(th_fhir_instrument_scored_items(gad), 7);

    const th_fhir_instrument *isrz = must_find(reg, MII_BASE "mii-qst-pro-isr-z");
    assert_int_equal(th_fhir_instrument_scale(isrz), TH_FHIR_SCALE_OTHER);
    assert_int_equal(th_fhir_instrument_score_kind(isrz), TH_FHIR_SCORE_MEAN);
    assert_int_equal(th_fhir_instrument_scored_items(isrz), 3);

    const th_fhir_instrument *soma =
        must_find(reg, MII_BASE "mii-qst-pro-euronet-soma|2027.0.0-ballot.1");
    assert_int_equal(th_fhir_instrument_score_kind(soma), TH_FHIR_SCORE_NONE);
    assert_int_equal(th_fhir_instrument_scored_items(soma), 0);

    /* The built-ins stay first and unchanged. */
    assert_true(th_fhir_instrument_builtin(th_qreg_get(reg, 0)));
    assert_true(th_fhir_instrument_builtin(th_qreg_get(reg, 1)));
    th_qreg_destroy(reg);
}

static void test_bundle(void **state)
{
    (void)state;
    th_qreg *reg = tu_registry(true);
    const char *body;
    size_t len;
    th_qreg_bundle(reg, &body, &len);
    assert_non_null(body);
    assert_int_equal(strlen(body), len);
    json_error_t jerr;
    json_t *b = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    assert_non_null(b);
    assert_string_equal(json_string_value(json_object_get(b, "resourceType")), "Bundle");
    assert_string_equal(json_string_value(json_object_get(b, "type")), "searchset");
    assert_int_equal(json_integer_value(json_object_get(b, "total")), 6);
    json_t *entries = json_object_get(b, "entry");
    assert_int_equal(json_array_size(entries), 6);
    for (size_t i = 0; i < 6; i++) {
        json_t *e = json_array_get(entries, i);
        json_t *res = json_object_get(e, "resource");
        assert_string_equal(json_string_value(json_object_get(res, "resourceType")),
                            "Questionnaire");
        assert_string_equal(json_string_value(json_object_get(res, "url")),
                            th_fhir_instrument_url(th_qreg_get(reg, i)));
        assert_string_equal(
            json_string_value(json_object_get(json_object_get(e, "search"), "mode")), "match");
    }
    json_decref(b);

    /* A registry with only the built-ins has a Bundle of two. */
    th_qreg *small = tu_registry(false);
    th_qreg_bundle(small, &body, &len);
    b = json_loadb(body, len, 0, &jerr);
    assert_non_null(b);
    assert_int_equal(json_array_size(json_object_get(b, "entry")), 2);
    json_decref(b);
    th_qreg_destroy(small);
    th_qreg_destroy(reg);
}

/* A fresh directory under /tmp with the given files (name, content pairs, NULL-ended). */
static char *make_dir(const char *const *files)
{
    char tmpl[] = "/tmp/th_fhir_test_XXXXXX";
    char *dir = mkdtemp(tmpl);
    assert_non_null(dir);
    dir = strdup(dir);
    for (size_t i = 0; files[i] != NULL; i += 2) {
        char path[512];
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        fputs(files[i + 1], f);
        fclose(f);
    }
    return dir;
}

static void remove_dir(char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    free(dir);
}

static const char good_q[] =
    "{\"resourceType\":\"Questionnaire\",\"id\":\"t1\",\"url\":\"urn:test:q1\",\"status\":"
    "\"active\",\"item\":[{\"linkId\":\"a\",\"type\":\"integer\"}]}";

/* Loads one file with the given content into a fresh registry; expects rc and that the error
 * names the file and contains `needle`. The registry keeps only its built-ins. */
static void expect_bad(const char *content, int rc_expected, const char *needle)
{
    const char *files[] = {"good.json", good_q, "zz-bad.json", content, NULL};
    char *dir = make_dir(files);
    th_qreg *reg = tu_registry(false);
    char err[512];
    int rc = th_qreg_load_dir(reg, dir, err, sizeof(err));
    if (rc != rc_expected || strstr(err, "zz-bad.json") == NULL || strstr(err, needle) == NULL) {
        fail_msg("got %s \"%s\", expected %s with \"%s\"", th_errname(rc), err,
                 th_errname(rc_expected), needle);
    }
    /* All or nothing: good.json was not added either. */
    assert_int_equal(th_qreg_count(reg), 2);
    const th_fhir_instrument *inst;
    assert_int_equal(th_qreg_find(reg, "urn:test:q1", &inst), TH_ENOTFOUND);
    const char *body;
    size_t len;
    th_qreg_bundle(reg, &body, &len);
    assert_null(strstr(body, "urn:test:q1"));
    th_qreg_destroy(reg);
    remove_dir(dir);
}

static void test_bad_files(void **state)
{
    (void)state;
    expect_bad("{\"resourceType\": \"Questionnaire\",\n \"url\": }", TH_EPARSE, "line 2");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"u\",\"url\":\"v\"}", TH_EPARSE,
               "duplicate");
    expect_bad("[1,2]", TH_EINVAL, "no resourceType");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"item\":[]}", TH_EINVAL, "no url");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"linkId\":\"x\",\"type\":\"string\"},{\"linkId\":\"x\",\"type\":\"string\"}]}",
               TH_EINVAL, "linkId 'x' is used by more than one item");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"linkId\":\"x\",\"type\":\"slider\"}]}",
               TH_EINVAL, "item 'x': unknown item type 'slider'");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"type\":\"string\"}]}",
               TH_EINVAL, "has no linkId");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"linkId\":\"x\",\"type\":\"choice\",\"answerOption\":[{\"valueCoding\":"
               "{\"system\":\"s\"}}]}]}",
               TH_EINVAL, "answerOption[0].valueCoding has no code");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"linkId\":\"x\",\"type\":\"choice\",\"answerOption\":[{\"extension\":[{\"url\":"
               "\"http://hl7.org/fhir/StructureDefinition/itemWeight\",\"valueString\":\"1\"}],"
               "\"valueCoding\":{\"system\":\"s\",\"code\":\"c\"}}]}]}",
               TH_EINVAL, "weight without a number");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"linkId\":\"x\",\"type\":\"choice\",\"answerValueSet\":\"http://x/vs\"}]}",
               TH_EINVAL, "answerValueSet http://x/vs is not loaded");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"linkId\":\"x\",\"type\":\"choice\",\"answerValueSet\":\"#nope\"}]}",
               TH_EINVAL, "'#nope' is not contained");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"linkId\":\"g\",\"type\":\"group\"}]}",
               TH_EINVAL, "group item 'g' has no items");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:b\",\"item\":["
               "{\"linkId\":\"x\",\"type\":\"string\",\"required\":\"yes\"}]}",
               TH_EINVAL, "required must be true or false");
    expect_bad("{\"resourceType\":\"CodeSystem\",\"concept\":[]}", TH_EINVAL,
               "CodeSystem has no url");
    expect_bad("{\"resourceType\":\"ValueSet\",\"url\":\"urn:vs\"}", TH_EINVAL, "has no codes");
    /* The same url|version twice: the second is refused. */
    expect_bad("{\"resourceType\":\"Questionnaire\",\"url\":\"urn:test:q1\",\"item\":["
               "{\"linkId\":\"a\",\"type\":\"integer\"}]}",
               TH_EEXIST, "already loaded");
    expect_bad("{\"resourceType\":\"Questionnaire\",\"id\":\"phq-9\",\"url\":\"urn:x\"}", TH_EEXIST,
               "id 'phq-9' is already used");
}

static void test_load_errors(void **state)
{
    (void)state;
    th_qreg *reg = tu_registry(true);
    char err[512];
    /* Loading the same directory again: every Questionnaire is already there. */
    assert_int_equal(th_qreg_load_dir(reg, TU_MII_DIR, err, sizeof(err)), TH_EEXIST);
    assert_non_null(strstr(err, "CodeSystem-mii-cs-pro-isr-z-answers.json"));
    assert_int_equal(th_qreg_count(reg), 6);
    assert_int_equal(th_qreg_load_dir(reg, "/nonexistent/dir", err, sizeof(err)), TH_ENOTFOUND);
    assert_non_null(strstr(err, "/nonexistent/dir"));
    assert_int_equal(th_qreg_load_dir(NULL, "/tmp", err, sizeof(err)), TH_EINVAL);
    assert_int_equal(th_qreg_load_buffer(reg, "x", NULL, 0, NULL, 0), TH_EINVAL);
    /* A NULL error buffer is allowed. */
    assert_int_equal(th_qreg_load_buffer(reg, "x", "{", 1, NULL, 0), TH_EPARSE);
    /* An empty directory (or one with only other files) loads nothing, successfully. */
    const char *files[] = {"README.md", "# not json", ".hidden.json", "{", NULL};
    char *dir = make_dir(files);
    assert_int_equal(th_qreg_load_dir(reg, dir, err, sizeof(err)), TH_OK);
    assert_int_equal(th_qreg_count(reg), 6);
    remove_dir(dir);
    th_qreg_destroy(reg);
}

/* The ISR-Z Questionnaire sorts before its CodeSystem here: references still resolve. */
static void test_load_order(void **state)
{
    (void)state;
    char *q = tu_read("mii/Questionnaire-mii-qst-pro-isr-z.json", NULL);
    char *cs = tu_read("mii/CodeSystem-mii-cs-pro-isr-z-answers.json", NULL);
    const char *files[] = {"a-questionnaire.json", q, "z-codesystem.json", cs, NULL};
    char *dir = make_dir(files);
    th_qreg *reg = tu_registry(false);
    char err[512];
    assert_int_equal(th_qreg_load_dir(reg, dir, err, sizeof(err)), TH_OK);
    assert_int_equal(th_qreg_count(reg), 3);
    const th_fhir_instrument *isrz = must_find(reg, MII_BASE "mii-qst-pro-isr-z");
    assert_int_equal(th_fhir_instrument_score_kind(isrz), TH_FHIR_SCORE_MEAN);
    th_qreg_destroy(reg);
    remove_dir(dir);
    free(q);
    free(cs);
}

/* A Bundle of resources, and the exact version preferred over an earlier-loaded one. */
static void test_bundle_file_and_versions(void **state)
{
    (void)state;
    th_qreg *reg = tu_registry(false);
    const char bundle[] =
        "{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":["
        "{\"resource\":{\"resourceType\":\"Questionnaire\",\"id\":\"v1\",\"url\":\"urn:v\","
        "\"version\":\"1\",\"item\":[{\"linkId\":\"a\",\"type\":\"integer\"}]}},"
        "{\"resource\":{\"resourceType\":\"Questionnaire\",\"id\":\"v2\",\"url\":\"urn:v\","
        "\"version\":\"2\",\"item\":[{\"linkId\":\"a\",\"type\":\"integer\"}]}},"
        "{\"resource\":{\"resourceType\":\"Patient\",\"id\":\"ignored\"}}]}";
    char err[256];
    assert_int_equal(
        th_qreg_load_buffer(reg, "bundle.json", bundle, strlen(bundle), err, sizeof(err)), TH_OK);
    assert_int_equal(th_qreg_count(reg), 4);
    assert_string_equal(th_fhir_instrument_id(must_find(reg, "urn:v|2")), "v2");
    assert_string_equal(th_fhir_instrument_id(must_find(reg, "urn:v|1")), "v1");
    assert_string_equal(th_fhir_instrument_id(must_find(reg, "urn:v|3")), "v1");
    assert_string_equal(th_fhir_instrument_id(must_find(reg, "urn:v")), "v1");
    /* A bad entry names the file and the entry. */
    const char bad[] = "{\"resourceType\":\"Bundle\",\"entry\":[{\"resource\":"
                       "{\"resourceType\":\"Questionnaire\"}}]}";
    assert_int_equal(th_qreg_load_buffer(reg, "b2.json", bad, strlen(bad), err, sizeof(err)),
                     TH_EINVAL);
    assert_non_null(strstr(err, "b2.json#entry[0]: Questionnaire has no url"));
    th_qreg_destroy(reg);
}

static void test_create_oom(void **state)
{
    (void)state;
    int rc = TH_ENOMEM;
    long n;
    for (n = 0; n < 10000; n++) {
        th_qreg *reg = NULL;
        th__fault_fail_after(n);
        rc = th_qreg_create(&reg);
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == TH_OK) {
            assert_false(fired);
            th_qreg_destroy(reg);
            break;
        }
        assert_int_equal(rc, TH_ENOMEM);
        assert_null(reg);
    }
    assert_int_equal(rc, TH_OK);
    assert_true(n > 3);
}

static void test_load_dir_oom(void **state)
{
    (void)state;
    th_qreg *reg = tu_registry(false);
    int rc = TH_ENOMEM;
    for (long n = 0; n < 10000; n++) {
        char err[256];
        th__fault_fail_after(n);
        rc = th_qreg_load_dir(reg, TU_MII_DIR, err, sizeof(err));
        th__fault_fail_after(-1);
        if (rc == TH_OK) {
            break;
        }
        assert_int_equal(rc, TH_ENOMEM);
        assert_int_equal(th_qreg_count(reg), 2); /* unchanged */
    }
    assert_int_equal(rc, TH_OK);
    assert_int_equal(th_qreg_count(reg), 6);
    th_qreg_destroy(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_builtins),
        cmocka_unit_test(test_load_mii),
        cmocka_unit_test(test_bundle),
        cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_load_order),
        cmocka_unit_test(test_bundle_file_and_versions),
        cmocka_unit_test(test_create_oom),
        cmocka_unit_test(test_load_dir_oom),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
