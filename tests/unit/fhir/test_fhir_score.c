/* Scoring: the MII examples score as the fixtures' README says, the built-in PHQ-9 and GAD-7
 * bands hold at every boundary, the PHQ-9 item 9 alert, partial responses, the app's own total,
 * and the other places weights and score rules can live (ordinalValue in a contained ValueSet,
 * CodeSystem properties, sum()/count() means, matches() with \d). */
#include "fhir_test_util.h"

#include <math.h>

static th_qreg *mii_reg;

static int setup(void **state)
{
    (void)state;
    mii_reg = tu_registry(true);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    th_qreg_destroy(mii_reg);
    return 0;
}

static th_fhir_score score_of(th_qr *qr)
{
    th_fhir_score sc;
    memset(&sc, 0xA5, sizeof(sc));
    assert_int_equal(th_fhir_score_compute(th_qr_get_fields(qr)->instrument, qr, &sc), TH_OK);
    return sc;
}

static th_fhir_score score_file(const char *file)
{
    char *body = tu_read(file, NULL);
    th_qr *qr = tu_parse(mii_reg, body);
    tu_assert_clean(qr);
    th_fhir_score sc = score_of(qr);
    th_qr_destroy(qr);
    free(body);
    return sc;
}

static void test_mii_scores(void **state)
{
    (void)state;
    th_fhir_score sc = score_file("mii/QuestionnaireResponse-mii-exa-pro-phq-9-response.json");
    assert_int_equal(sc.kind, TH_FHIR_SCORE_SUM);
    assert_true(sc.value == 27.0);
    assert_true(sc.is_integer);
    assert_true(sc.complete);
    assert_int_equal(sc.answered, 9);
    assert_int_equal(sc.expected, 9);
    assert_string_equal(sc.band, "severe");
    assert_true(sc.alert);
    assert_true(sc.has_app_score);
    assert_true(sc.app_score == 27.0);
    assert_true(sc.app_score_agrees);

    sc = score_file("mii/QuestionnaireResponse-mii-exa-pro-gad-7-response.json");
    assert_int_equal(sc.kind, TH_FHIR_SCORE_SUM);
    assert_true(sc.value == 7.0);
    assert_string_equal(sc.band, "mild");
    assert_false(sc.alert);
    assert_true(sc.has_app_score && sc.app_score_agrees);

    sc = score_file("mii/QuestionnaireResponse-mii-exa-pro-isr-z-response.json");
    assert_int_equal(sc.kind, TH_FHIR_SCORE_MEAN);
    assert_true(sc.value == 2.0);
    assert_true(sc.is_integer);
    assert_true(sc.complete);
    assert_int_equal(sc.answered, 3);
    assert_null(sc.band);
    assert_false(sc.alert);
    assert_true(sc.has_app_score && sc.app_score_agrees);

    sc = score_file("mii/QuestionnaireResponse-mii-exa-pro-euronet-soma-response.json");
    assert_int_equal(sc.kind, TH_FHIR_SCORE_NONE);
    assert_true(sc.value == 0.0);
    assert_false(sc.complete);
    assert_int_equal(sc.expected, 0);
    assert_null(sc.band);
    assert_false(sc.alert);
    assert_false(sc.has_app_score);
    assert_string_equal(th_fhir_score_kind_name(sc.kind), "none");
}

/* Weights summing to total, item 9 (index 8) set to item9 and the rest spread over items 1-8. */
static void spread(int n, int total, int last, int *w)
{
    int rest = total - last;
    for (int i = 0; i < n - 1; i++) {
        w[i] = rest > 3 ? 3 : rest;
        rest -= w[i];
    }
    assert_int_equal(rest, 0);
    w[n - 1] = last;
}

static th_fhir_score score_builtin(int n, const int *w)
{
    char *json = tu_response(n, w, "", "");
    th_qr *qr = tu_parse(mii_reg, json);
    tu_assert_clean(qr);
    th_fhir_score sc = score_of(qr);
    th_qr_destroy(qr);
    free(json);
    return sc;
}

static void test_phq9_bands(void **state)
{
    (void)state;
    static const struct {
        int total;
        const char *band;
    } cases[] = {{0, "minimal"},
                 {4, "minimal"},
                 {5, "mild"},
                 {9, "mild"},
                 {10, "moderate"},
                 {14, "moderate"},
                 {15, "moderately severe"},
                 {19, "moderately severe"},
                 {20, "severe"},
                 {24, "severe"},
                 {27, "severe"}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int w[9];
        int last = cases[i].total > 24 ? cases[i].total - 24 : 0;
        spread(9, cases[i].total, last, w);
        th_fhir_score sc = score_builtin(9, w);
        assert_int_equal(sc.kind, TH_FHIR_SCORE_SUM);
        assert_true(sc.value == cases[i].total);
        assert_true(sc.complete);
        if (sc.band == NULL || strcmp(sc.band, cases[i].band) != 0) {
            fail_msg("PHQ-9 total %d: band %s, expected %s", cases[i].total,
                     sc.band ? sc.band : "NULL", cases[i].band);
        }
        assert_int_equal(sc.alert, last > 0);
        assert_false(sc.has_app_score);
    }
}

static void test_phq9_alert(void **state)
{
    (void)state;
    /* Same total, item 9 at 0 or at 1..3. */
    for (int item9 = 0; item9 <= 3; item9++) {
        int w[9];
        spread(9, 12, item9, w);
        th_fhir_score sc = score_builtin(9, w);
        assert_true(sc.value == 12.0);
        assert_string_equal(sc.band, "moderate");
        assert_int_equal(sc.alert, item9 > 0);
    }
    /* Only item 9 above zero. */
    int only9[9] = {0, 0, 0, 0, 0, 0, 0, 0, 1};
    th_fhir_score sc = score_builtin(9, only9);
    assert_true(sc.alert);
    assert_string_equal(sc.band, "minimal");

    /* The MII PHQ-9 knows its item 9 by LOINC 44260-8 in item.code (linkId phq-phq2i). */
    char *body = tu_read("mii/QuestionnaireResponse-mii-exa-pro-phq-9-response.json", NULL);
    json_error_t jerr;
    json_t *doc = json_loads(body, 0, &jerr);
    assert_non_null(doc);
    json_t *items = json_object_get(doc, "item");
    for (size_t i = 0; i < json_array_size(items); i++) {
        json_t *it = json_array_get(items, i);
        const char *lid = json_string_value(json_object_get(it, "linkId"));
        json_t *coding =
            json_object_get(json_array_get(json_object_get(it, "answer"), 0), "valueCoding");
        if (strncmp(lid, "phq-phq2", 8) == 0) {
            bool nine = strcmp(lid, "phq-phq2i") == 0;
            json_object_set_new(coding, "code", json_string(nine ? "LA6568-5" : "LA6571-9"));
        }
    }
    char *edited = json_dumps(doc, 0);
    th_qr *qr = tu_parse(mii_reg, edited);
    tu_assert_clean(qr);
    sc = score_of(qr);
    assert_true(sc.value == 24.0);
    assert_string_equal(sc.band, "severe");
    assert_false(sc.alert);
    assert_true(sc.has_app_score); /* still 27 as sent */
    assert_false(sc.app_score_agrees);
    th_qr_destroy(qr);
    free(edited);
    json_decref(doc);
    free(body);
}

static void test_gad7_bands(void **state)
{
    (void)state;
    static const struct {
        int total;
        const char *band;
    } cases[] = {{0, "minimal"},   {4, "minimal"},   {5, "mild"},    {9, "mild"},
                 {10, "moderate"}, {14, "moderate"}, {15, "severe"}, {21, "severe"}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int w[7];
        int last = cases[i].total > 18 ? cases[i].total - 18 : 0;
        spread(7, cases[i].total, last, w);
        th_fhir_score sc = score_builtin(7, w);
        assert_true(sc.value == cases[i].total);
        if (sc.band == NULL || strcmp(sc.band, cases[i].band) != 0) {
            fail_msg("GAD-7 total %d: band %s, expected %s", cases[i].total,
                     sc.band ? sc.band : "NULL", cases[i].band);
        }
        assert_false(sc.alert);
        assert_int_equal(sc.expected, 7);
    }
}

static void test_partial_and_app_score(void **state)
{
    (void)state;
    /* Item 3 missing: invalid (required), and scored as partial: no band, alert still raised. */
    int w[9] = {3, 3, -1, 3, 3, 3, 3, 3, 2};
    char *json = tu_response(9, w, "", "");
    th_qr *qr = tu_parse(mii_reg, json);
    assert_false(th_qr_valid(qr));
    th_fhir_score sc = score_of(qr);
    assert_true(sc.value == 23.0);
    assert_false(sc.complete);
    assert_int_equal(sc.answered, 8);
    assert_null(sc.band);
    assert_true(sc.alert);
    th_qr_destroy(qr);
    free(json);

    /* The difficulty item is not scored; the app's total is compared. */
    int full[9] = {1, 1, 1, 1, 1, 1, 0, 0, 0};
    json = tu_response(9, full,
                       "{\"linkId\":\"69722-7\",\"answer\":[{\"valueCoding\":{\"system\":"
                       "\"http://loinc.org\",\"code\":\"LA6574-3\"}}]},"
                       "{\"linkId\":\"44261-6\",\"answer\":[{\"valueInteger\":7}]}",
                       "");
    qr = tu_parse(mii_reg, json);
    tu_assert_clean(qr);
    sc = score_of(qr);
    assert_true(sc.value == 6.0);
    assert_string_equal(sc.band, "mild");
    assert_true(sc.has_app_score);
    assert_true(sc.app_score == 7.0);
    assert_false(sc.app_score_agrees);

    /* Scoring against another instrument is refused. */
    th_fhir_score other;
    assert_int_equal(th_fhir_score_compute(th_qreg_get(mii_reg, 1), qr, &other), TH_EINVAL);
    assert_int_equal(th_fhir_score_compute(NULL, qr, &other), TH_EINVAL);
    th_qr_destroy(qr);
    free(json);

    /* A response to an unknown questionnaire has no instrument to score with. */
    qr = tu_parse(mii_reg, "{\"resourceType\":\"QuestionnaireResponse\",\"questionnaire\":"
                           "\"urn:nope\"}");
    assert_null(th_qr_get_fields(qr)->instrument);
    assert_int_equal(th_fhir_score_compute(th_qreg_get(mii_reg, 0), qr, &other), TH_EINVAL);
    th_qr_destroy(qr);
}

/* Loads q into a fresh registry (with extra, may be NULL), parses response, returns the score. */
static th_fhir_score score_custom(const char *q, const char *extra, const char *response)
{
    th_qreg *reg = tu_registry(false);
    char err[512];
    if (extra != NULL &&
        th_qreg_load_buffer(reg, "extra.json", extra, strlen(extra), err, sizeof(err)) != TH_OK) {
        fail_msg("%s", err);
    }
    if (th_qreg_load_buffer(reg, "q.json", q, strlen(q), err, sizeof(err)) != TH_OK) {
        fail_msg("%s", err);
    }
    th_qr *qr = tu_parse(reg, response);
    tu_assert_clean(qr);
    th_fhir_score sc = score_of(qr);
    th_qr_destroy(qr);
    th_qreg_destroy(reg);
    return sc;
}

#define RESPONSE_HEAD                                                                   \
    "{\"resourceType\":\"QuestionnaireResponse\",\"status\":\"completed\",\"subject\":" \
    "{\"reference\":\"Patient/p\"},\"authored\":\"2026-01-01T00:00:00Z\","

/* The HL7 SDC 2021 PHQ-9 example style: weights as ordinalValue on the codes of a contained
 * ValueSet; no variable, so the score is the default sum. */
static void test_ordinal_value_contained(void **state)
{
    (void)state;
    const char q[] =
        "{\"resourceType\":\"Questionnaire\",\"url\":\"urn:sdc:phq\",\"contained\":[{"
        "\"resourceType\":\"ValueSet\",\"id\":\"freq\",\"compose\":{\"include\":[{\"system\":"
        "\"http://loinc.org\",\"concept\":["
        "{\"extension\":[{\"url\":\"http://hl7.org/fhir/StructureDefinition/ordinalValue\","
        "\"valueDecimal\":0}],\"code\":\"LA6568-5\"},"
        "{\"extension\":[{\"url\":\"http://hl7.org/fhir/StructureDefinition/ordinalValue\","
        "\"valueDecimal\":1}],\"code\":\"LA6569-3\"},"
        "{\"extension\":[{\"url\":\"http://hl7.org/fhir/StructureDefinition/ordinalValue\","
        "\"valueDecimal\":2}],\"code\":\"LA6570-1\"},"
        "{\"extension\":[{\"url\":\"http://hl7.org/fhir/StructureDefinition/ordinalValue\","
        "\"valueDecimal\":3}],\"code\":\"LA6571-9\"}]}]}}],"
        "\"item\":[{\"linkId\":\"g\",\"type\":\"group\",\"item\":["
        "{\"linkId\":\"a\",\"type\":\"choice\",\"answerValueSet\":\"#freq\"},"
        "{\"linkId\":\"b\",\"type\":\"choice\",\"answerValueSet\":\"#freq\"}]},"
        "{\"linkId\":\"note\",\"type\":\"string\"}]}";
    const char r[] = RESPONSE_HEAD
        "\"questionnaire\":\"urn:sdc:phq\",\"item\":[{\"linkId\":\"g\",\"item\":["
        "{\"linkId\":\"a\",\"answer\":[{\"valueCoding\":{\"system\":\"http://loinc.org\","
        "\"code\":\"LA6570-1\"}}]},"
        "{\"linkId\":\"b\",\"answer\":[{\"valueCoding\":{\"system\":\"http://loinc.org\","
        "\"code\":\"LA6571-9\"}}]}]},{\"linkId\":\"note\",\"answer\":[{\"valueString\":\"x\"}]}]}";
    th_fhir_score sc = score_custom(q, NULL, r);
    assert_int_equal(sc.kind, TH_FHIR_SCORE_SUM);
    assert_true(sc.value == 5.0);
    assert_int_equal(sc.expected, 2);
    assert_true(sc.complete);
    assert_null(sc.band);
}

/* Weights from a CodeSystem's itemWeight property through a loaded ValueSet; a mean written
 * as sum()/count(); items picked with matches() and \d; decimal weights. */
static void test_codesystem_valueset_mean(void **state)
{
    (void)state;
    const char extra[] =
        "{\"resourceType\":\"Bundle\",\"entry\":["
        "{\"resource\":{\"resourceType\":\"CodeSystem\",\"url\":\"urn:cs\",\"property\":[{"
        "\"code\":\"w\",\"uri\":\"http://hl7.org/fhir/concept-properties#itemWeight\","
        "\"type\":\"decimal\"}],\"concept\":["
        "{\"code\":\"lo\",\"property\":[{\"code\":\"w\",\"valueDecimal\":0.5}]},"
        "{\"code\":\"hi\",\"property\":[{\"code\":\"w\",\"valueDecimal\":2}],\"concept\":["
        "{\"code\":\"hi-plus\",\"property\":[{\"code\":\"w\",\"valueInteger\":4}]}]}]}},"
        "{\"resource\":{\"resourceType\":\"ValueSet\",\"url\":\"urn:vs\",\"version\":\"1\","
        "\"compose\":{\"include\":[{\"system\":\"urn:cs\"}]}}}]}";
    const char q[] =
        "{\"resourceType\":\"Questionnaire\",\"url\":\"urn:q:mean\",\"extension\":[{\"url\":"
        "\"http://hl7.org/fhir/StructureDefinition/variable\",\"valueExpression\":{\"name\":"
        "\"m\",\"language\":\"text/fhirpath\",\"expression\":\"%resource.repeat(item).where("
        "linkId.matches('^q\\\\d$')).answer.value.weight().sum() / %resource.repeat(item).where("
        "linkId.matches('^q\\\\d$')).answer.count()\"}}],\"item\":["
        "{\"linkId\":\"q1\",\"type\":\"choice\",\"answerValueSet\":\"urn:vs|1\"},"
        "{\"linkId\":\"q2\",\"type\":\"choice\",\"answerValueSet\":\"urn:vs\"},"
        "{\"linkId\":\"q10\",\"type\":\"choice\",\"answerValueSet\":\"urn:vs\"},"
        "{\"linkId\":\"mean\",\"type\":\"decimal\",\"readOnly\":true,\"extension\":[{\"url\":"
        "\"http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-calculatedExpression"
        "\",\"valueExpression\":{\"language\":\"text/fhirpath\",\"expression\":\"%m\"}}]}]}";
    const char r[] = RESPONSE_HEAD
        "\"questionnaire\":\"urn:q:mean\",\"item\":["
        "{\"linkId\":\"q1\",\"answer\":[{\"valueCoding\":{\"system\":\"urn:cs\",\"code\":\"lo\"}}]}"
        ","
        "{\"linkId\":\"q2\",\"answer\":[{\"valueCoding\":{\"system\":\"urn:cs\",\"code\":"
        "\"hi-plus\"}}]},"
        "{\"linkId\":\"q10\",\"answer\":[{\"valueCoding\":{\"system\":\"urn:cs\",\"code\":\"hi\"}}]"
        "},"
        "{\"linkId\":\"mean\",\"answer\":[{\"valueDecimal\":2.25}]}]}";
    th_fhir_score sc = score_custom(q, extra, r);
    assert_int_equal(sc.kind, TH_FHIR_SCORE_MEAN);
    assert_int_equal(sc.expected, 2); /* q10 does not match ^q\d$ */
    assert_true(fabs(sc.value - 2.25) < 1e-12);
    assert_false(sc.is_integer);
    assert_true(sc.has_app_score && sc.app_score_agrees);
}

/* A sum of integer answers (no weights) when a variable says so. */
static void test_numeric_sum(void **state)
{
    (void)state;
    const char q[] =
        "{\"resourceType\":\"Questionnaire\",\"url\":\"urn:q:num\",\"extension\":[{\"url\":"
        "\"http://hl7.org/fhir/StructureDefinition/variable\",\"valueExpression\":{\"name\":"
        "\"s\",\"language\":\"text/fhirpath\",\"expression\":\"%resource.item.where(linkId = "
        "'x' or linkId = 'y').answer.value.sum()\"}}],\"item\":["
        "{\"linkId\":\"x\",\"type\":\"integer\"},{\"linkId\":\"y\",\"type\":\"decimal\"},"
        "{\"linkId\":\"z\",\"type\":\"integer\"}]}";
    const char r[] = RESPONSE_HEAD "\"questionnaire\":\"urn:q:num\",\"item\":["
                                   "{\"linkId\":\"x\",\"answer\":[{\"valueInteger\":3}]},"
                                   "{\"linkId\":\"y\",\"answer\":[{\"valueDecimal\":1.5}]},"
                                   "{\"linkId\":\"z\",\"answer\":[{\"valueInteger\":100}]}]}";
    th_fhir_score sc = score_custom(q, NULL, r);
    assert_int_equal(sc.kind, TH_FHIR_SCORE_SUM);
    assert_int_equal(sc.expected, 2);
    assert_true(sc.value == 4.5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mii_scores),
        cmocka_unit_test(test_phq9_bands),
        cmocka_unit_test(test_phq9_alert),
        cmocka_unit_test(test_gad7_bands),
        cmocka_unit_test(test_partial_and_app_score),
        cmocka_unit_test(test_ordinal_value_contained),
        cmocka_unit_test(test_codesystem_valueset_mean),
        cmocka_unit_test(test_numeric_sum),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
