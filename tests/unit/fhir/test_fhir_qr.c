/* QuestionnaireResponse parsing and validation: the MII examples and built-in responses are
 * valid and give the store its fields; every rule produces its issue at the right linkId and
 * FHIRPath, all problems are listed, malformed JSON is located, no diagnostics echo the
 * patient's answers; plus allocation failure, concurrency and a cost measurement. */
#include "fhir_test_util.h"

#include <pthread.h>
#include <time.h>

#include "trialhub/alloc.h"

#define PHQ9_OK                   \
    {                             \
        1, 0, 2, 3, 0, 1, 2, 0, 0 \
    }

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

/* Parses a built-in response with one substitution: `from` (must occur once) becomes `to`. */
static th_qr *parse_edited(const char *json, const char *from, const char *to)
{
    const char *at = strstr(json, from);
    if (at == NULL || strstr(at + 1, from) != NULL) {
        fail_msg("'%s' must occur once", from);
    }
    size_t cap = strlen(json) + strlen(to) + 1;
    char *edited = malloc(cap);
    assert_non_null(edited);
    snprintf(edited, cap, "%.*s%s%s", (int)(at - json), json, to, at + strlen(from));
    th_qr *qr = tu_parse(mii_reg, edited);
    free(edited);
    return qr;
}

/* ---- valid responses --------------------------------------------------------------------- */

static const struct {
    const char *file;
    const char *canonical;
    const char *authored;
    int64_t authored_s;
} fixtures[] = {
    {"mii/QuestionnaireResponse-mii-exa-pro-phq-9-response.json",
     "https://www.medizininformatik-initiative.de/fhir/ext/modul-pro/Questionnaire/"
     "mii-qst-pro-phq-9|2027.0.0-ballot.1",
     "2023-10-01T12:00:00Z", INT64_C(1696161600)},
    {"mii/QuestionnaireResponse-mii-exa-pro-gad-7-response.json",
     "https://www.medizininformatik-initiative.de/fhir/ext/modul-pro/Questionnaire/"
     "mii-qst-pro-gad-7|2027.0.0-ballot.rc3",
     "2026-09-02T10:00:00Z", INT64_C(1788343200)},
    {"mii/QuestionnaireResponse-mii-exa-pro-isr-z-response.json",
     "https://www.medizininformatik-initiative.de/fhir/ext/modul-pro/Questionnaire/"
     "mii-qst-pro-isr-z|2027.0.0-ballot.1",
     "2026-08-28T09:30:00Z", INT64_C(1787909400)},
    {"mii/QuestionnaireResponse-mii-exa-pro-euronet-soma-response.json",
     "https://www.medizininformatik-initiative.de/fhir/ext/modul-pro/Questionnaire/"
     "mii-qst-pro-euronet-soma|2027.0.0-ballot.1",
     "2026-08-28T09:45:00Z", INT64_C(1787910300)},
};

static void test_mii_fixtures_valid(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(fixtures) / sizeof(fixtures[0]); i++) {
        size_t len;
        char *body = tu_read(fixtures[i].file, &len);
        th_qr *qr = NULL;
        th_qr_options o = tu_opts();
        assert_int_equal(th_qr_parse(mii_reg, body, len, &o, &qr, NULL), TH_OK);
        tu_assert_clean(qr);
        const th_qr_fields *f = th_qr_get_fields(qr);
        assert_string_equal(f->questionnaire, fixtures[i].canonical);
        assert_non_null(f->instrument);
        assert_int_equal(strncmp(th_fhir_instrument_url(f->instrument), fixtures[i].canonical,
                                 strlen(th_fhir_instrument_url(f->instrument))),
                         0);
        assert_string_equal(f->patient_id, "mii-exa-pro-patient");
        assert_string_equal(f->authored, fixtures[i].authored);
        assert_int_equal(f->authored_unix_s, fixtures[i].authored_s);
        assert_int_equal(f->authored_nsec, 0);
        assert_int_equal(f->status, TH_QR_STATUS_COMPLETED);
        assert_int_equal(f->visit_week, -1);
        assert_null(f->identifier_system);
        assert_null(f->identifier_value);
        th_qr_destroy(qr);

        /* Also with the real clock (no options). */
        assert_int_equal(th_qr_parse(mii_reg, body, len, NULL, &qr, NULL), TH_OK);
        tu_assert_clean(qr);
        th_qr_destroy(qr);
        free(body);
    }
}

static void test_builtin_valid_and_fields(void **state)
{
    (void)state;
    int w[9] = PHQ9_OK;
    char *json = tu_response(
        9, w,
        "{\"linkId\":\"intro\",\"text\":\"Over the last 2 weeks\"},"
        "{\"linkId\":\"69722-7\",\"answer\":[{\"valueCoding\":{\"system\":\"http://loinc.org\","
        "\"code\":\"LA6573-5\",\"display\":\"Somewhat difficult\"}}]},"
        "{\"linkId\":\"44261-6\",\"answer\":[{\"valueInteger\":9}]}",
        ",\"identifier\":{\"system\":\"urn:app:phone\",\"value\":\"sub-0042\"},"
        "\"extension\":[{\"url\":\"https://trialhub.dev/fhir/StructureDefinition/visit-week\","
        "\"valueInteger\":4},{\"url\":\"urn:other\",\"valueString\":\"x\"}]");
    th_qr *qr = tu_parse(mii_reg, json);
    tu_assert_clean(qr);
    const th_qr_fields *f = th_qr_get_fields(qr);
    assert_string_equal(f->questionnaire, "http://loinc.org/q/44249-1");
    assert_ptr_equal(f->instrument, th_qreg_get(mii_reg, 0));
    assert_string_equal(f->patient_id, "P001");
    assert_string_equal(f->identifier_system, "urn:app:phone");
    assert_string_equal(f->identifier_value, "sub-0042");
    assert_string_equal(f->authored, "2026-11-02T09:30:00+01:00");
    assert_int_equal(f->authored_unix_s, INT64_C(1793608200)); /* 08:30:00Z */
    assert_int_equal(f->visit_week, 4);
    assert_non_null(th_qr_json(qr));
    th_qr_destroy(qr);
    free(json);

    int g[7] = {0, 1, 2, 3, 0, 1, 2};
    json = tu_response(7, g, "", "");
    qr = parse_edited(json, "\"completed\"", "\"amended\"");
    tu_assert_clean(qr);
    assert_int_equal(th_qr_get_fields(qr)->status, TH_QR_STATUS_AMENDED);
    th_qr_destroy(qr);
    free(json);
}

static void test_authored_forms(void **state)
{
    (void)state;
    int w[9] = PHQ9_OK;
    char *json = tu_response(9, w, "", "");
    static const struct {
        const char *authored;
        int64_t s;
        uint32_t ns;
    } ok[] = {
        {"2026-11-02T09:30:00Z", INT64_C(1793611800), 0},
        {"2026-11-02T09:30:00.5Z", INT64_C(1793611800), 500000000},
        {"2026-11-02T09:30:00.123456789-05:30", INT64_C(1793631600), 123456789},
        {"2024-02-29T23:59:60+14:00", INT64_C(1709200800), 0},
        {"1969-12-31T23:59:59Z", INT64_C(-1), 0},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        char to[80];
        snprintf(to, sizeof(to), "\"%s\"", ok[i].authored);
        th_qr *qr = parse_edited(json, "\"2026-11-02T09:30:00+01:00\"", to);
        tu_assert_clean(qr);
        assert_int_equal(th_qr_get_fields(qr)->authored_unix_s, ok[i].s);
        assert_int_equal(th_qr_get_fields(qr)->authored_nsec, ok[i].ns);
        th_qr_destroy(qr);
    }
    static const char *const bad[] = {
        "2026-11-02",
        "2026-11-02T09:30:00",
        "2026-11-02T09:30Z",
        "2026-02-29T09:30:00Z",
        "2026-13-01T00:00:00Z",
        "2026-11-02T24:00:00Z",
        "2026-11-02 09:30:00Z",
        "2026-11-02T09:30:00+1",
        "2026-11-02T09:30:00.Z",
        "2026-11-02T09:30:00+14:30",
        "0000-01-01T00:00:00Z",
        "26-11-02T09:30:00Z",
        "2026-11-02T09:30:00Zjunk",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char to[80];
        snprintf(to, sizeof(to), "\"%s\"", bad[i]);
        th_qr *qr = parse_edited(json, "\"2026-11-02T09:30:00+01:00\"", to);
        tu_expect(qr, TH_FHIR_ISSUE_VALUE, NULL, "QuestionnaireResponse.authored");
        assert_null(th_qr_get_fields(qr)->authored);
        th_qr_destroy(qr);
    }
    free(json);
}

/* ---- each rule --------------------------------------------------------------------------- */

static void test_header_rules(void **state)
{
    (void)state;
    int w[9] = PHQ9_OK;
    char *json = tu_response(9, w, "", "");
    th_qr *qr;

    qr = parse_edited(json, "\"resourceType\":\"QuestionnaireResponse\"",
                      "\"resourceType\":\"Observation\"");
    tu_expect(qr, TH_FHIR_ISSUE_INVALID, NULL, "QuestionnaireResponse.resourceType");
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"resourceType\":\"QuestionnaireResponse\",", "");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.resourceType");
    th_qr_destroy(qr);

    qr = parse_edited(json, "\"http://loinc.org/q/44249-1\"", "\"http://loinc.org/q/12345-6\"");
    tu_expect(qr, TH_FHIR_ISSUE_NOT_FOUND, NULL, "QuestionnaireResponse.questionnaire");
    assert_null(th_qr_get_fields(qr)->instrument);
    assert_int_equal(th_fhir_issues_count(th_qr_issues(qr)), 1); /* items are not judged */
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"questionnaire\":\"http://loinc.org/q/44249-1\",", "");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.questionnaire");
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"http://loinc.org/q/44249-1\"", "42");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.questionnaire");
    th_qr_destroy(qr);

    qr = parse_edited(json, "\"completed\"", "\"in-progress\"");
    tu_expect(qr, TH_FHIR_ISSUE_BUSINESS_RULE, NULL, "QuestionnaireResponse.status");
    assert_int_equal(th_qr_get_fields(qr)->status, TH_QR_STATUS_IN_PROGRESS);
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"completed\"", "\"entered-in-error\"");
    tu_expect(qr, TH_FHIR_ISSUE_BUSINESS_RULE, NULL, "QuestionnaireResponse.status");
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"completed\"", "\"done\"");
    tu_expect(qr, TH_FHIR_ISSUE_VALUE, NULL, "QuestionnaireResponse.status");
    assert_int_equal(th_qr_get_fields(qr)->status, TH_QR_STATUS_UNKNOWN);
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"status\":\"completed\",", "");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.status");
    th_qr_destroy(qr);

    static const char *const bad_refs[] = {
        "\"Group/P001\"",
        "\"Patient/\"",
        "\"Patient/P 001\"",
        "\"https://x.org/fhir/Patient/P1\"",
        "\"patient/P001\"",
        "\"Patient/P001/_history/1\"",
        "\"\"",
        "\"Patient/0123456789012345678901234567890123456789012345678901234567890123456789\"",
    };
    for (size_t i = 0; i < sizeof(bad_refs) / sizeof(bad_refs[0]); i++) {
        qr = parse_edited(json, "\"Patient/P001\"", bad_refs[i]);
        if (tu_find(qr, TH_FHIR_ISSUE_INVALID, NULL, "QuestionnaireResponse.subject.reference") ==
                NULL &&
            tu_find(qr, TH_FHIR_ISSUE_VALUE, NULL, "QuestionnaireResponse.subject.reference") ==
                NULL) {
            tu_print_issues(qr);
            fail_msg("reference %s accepted", bad_refs[i]);
        }
        assert_null(th_qr_get_fields(qr)->patient_id);
        th_qr_destroy(qr);
    }
    qr = parse_edited(json, "\"subject\":{\"reference\":\"Patient/P001\"},", "");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.subject");
    th_qr_destroy(qr);
    qr = parse_edited(json, "{\"reference\":\"Patient/P001\"}", "{\"display\":\"x\"}");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.subject.reference");
    th_qr_destroy(qr);
    qr = parse_edited(json, "{\"reference\":\"Patient/P001\"}", "\"Patient/P001\"");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.subject");
    th_qr_destroy(qr);

    qr = parse_edited(json, ",\"authored\":\"2026-11-02T09:30:00+01:00\"", "");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.authored");
    th_qr_destroy(qr);
    /* In the future: after now (2026-12-01T00:00:00Z) with no skew allowed. */
    qr = parse_edited(json, "\"2026-11-02T09:30:00+01:00\"", "\"2026-12-01T00:00:00.000000001Z\"");
    tu_expect(qr, TH_FHIR_ISSUE_BUSINESS_RULE, NULL, "QuestionnaireResponse.authored");
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"2026-11-02T09:30:00+01:00\"", "\"2026-12-01T00:00:00Z\"");
    tu_assert_clean(qr);
    th_qr_destroy(qr);
    {
        /* The skew is honoured. */
        char *future = malloc(strlen(json) + 8);
        const char *at = strstr(json, "2026-11-02T09:30:00+01:00");
        sprintf(future, "%.*s2026-12-01T00:04:00Z%s", (int)(at - json), json,
                at + strlen("2026-11-02T09:30:00+01:00"));
        th_qr_options o = tu_opts();
        o.max_future_skew_ns = INT64_C(300) * 1000000000;
        assert_int_equal(th_qr_parse(mii_reg, future, strlen(future), &o, &qr, NULL), TH_OK);
        tu_assert_clean(qr);
        th_qr_destroy(qr);
        o.max_future_skew_ns = INT64_C(60) * 1000000000;
        assert_int_equal(th_qr_parse(mii_reg, future, strlen(future), &o, &qr, NULL), TH_OK);
        tu_expect(qr, TH_FHIR_ISSUE_BUSINESS_RULE, NULL, "QuestionnaireResponse.authored");
        th_qr_destroy(qr);
        free(future);
    }
    free(json);

    /* identifier: system and value required when present; one object, not an array. */
    json = tu_response(9, w, "", ",\"identifier\":{\"value\":\"v1\"}");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.identifier.system");
    assert_null(th_qr_get_fields(qr)->identifier_value);
    th_qr_destroy(qr);
    free(json);
    json = tu_response(9, w, "", ",\"identifier\":{\"system\":\"urn:s\",\"value\":\"\"}");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_VALUE, NULL, "QuestionnaireResponse.identifier.value");
    th_qr_destroy(qr);
    free(json);
    json = tu_response(9, w, "", ",\"identifier\":[{\"system\":\"urn:s\",\"value\":\"v\"}]");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.identifier");
    th_qr_destroy(qr);
    free(json);

    /* visit-week: an integer 0..1040, once. */
    static const struct {
        const char *ext;
        th_fhir_issue_type code;
        const char *expr;
    } vw[] = {
        {"{\"url\":\"https://trialhub.dev/fhir/StructureDefinition/visit-week\","
         "\"valueString\":\"4\"}",
         TH_FHIR_ISSUE_VALUE, "QuestionnaireResponse.extension[0].valueInteger"},
        {"{\"url\":\"https://trialhub.dev/fhir/StructureDefinition/visit-week\","
         "\"valueInteger\":-1}",
         TH_FHIR_ISSUE_VALUE, "QuestionnaireResponse.extension[0].valueInteger"},
        {"{\"url\":\"https://trialhub.dev/fhir/StructureDefinition/visit-week\","
         "\"valueInteger\":2},{\"url\":\"https://trialhub.dev/fhir/StructureDefinition/"
         "visit-week\",\"valueInteger\":3}",
         TH_FHIR_ISSUE_STRUCTURE, "QuestionnaireResponse.extension[1]"},
    };
    for (size_t i = 0; i < sizeof(vw) / sizeof(vw[0]); i++) {
        char top[512];
        snprintf(top, sizeof(top), ",\"extension\":[%s]", vw[i].ext);
        json = tu_response(9, w, "", top);
        qr = tu_parse(mii_reg, json);
        tu_expect(qr, vw[i].code, NULL, vw[i].expr);
        th_qr_destroy(qr);
        free(json);
    }
    json = tu_response(9, w, "", ",\"extension\":{}");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.extension");
    th_qr_destroy(qr);
    free(json);
}

static void test_item_rules(void **state)
{
    (void)state;
    th_qr *qr;
    char *json;

    /* Required item missing (item 9). */
    int missing[9] = {1, 0, 2, 3, 0, 1, 2, 0, -1};
    json = tu_response(9, missing, "", "");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, "44260-8", "QuestionnaireResponse.item");
    assert_int_equal(th_fhir_issues_count(th_qr_issues(qr)), 1);
    th_qr_destroy(qr);
    free(json);

    /* An item present without an answer is not answered. */
    json = tu_response(9, missing, "{\"linkId\":\"44260-8\"}", "");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, "44260-8", "QuestionnaireResponse.item");
    th_qr_destroy(qr);
    free(json);

    /* The same item twice. */
    int w[9] = PHQ9_OK;
    json = tu_response(9, w,
                       "{\"linkId\":\"44250-9\",\"answer\":[{\"valueCoding\":{\"system\":"
                       "\"http://loinc.org\",\"code\":\"LA6568-5\"}}]}",
                       "");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, "44250-9", "QuestionnaireResponse.item[9]");
    th_qr_destroy(qr);
    free(json);

    /* Answered more than once. */
    json = tu_response(9, w, "", "");
#define ITEM0 "{\"linkId\":\"44250-9\",\"answer\":["
#define ANS0  "{\"valueCoding\":{\"system\":\"http://loinc.org\",\"code\":\"LA6569-3\"}}"
    qr = parse_edited(json, ITEM0 ANS0 "]",
                      ITEM0 ANS0 ",{\"valueCoding\":{\"system\":\"http://loinc.org\",\"code\":"
                                 "\"LA6568-5\"}}]");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, "44250-9", "QuestionnaireResponse.item[0].answer");
    th_qr_destroy(qr);

    /* Code not allowed; right code, wrong or missing system. */
    qr = parse_edited(json, ITEM0 ANS0,
                      ITEM0 "{\"valueCoding\":{\"system\":\"http://loinc.org\",\"code\":"
                            "\"LA9999-9\"}}");
    tu_expect(qr, TH_FHIR_ISSUE_CODE_INVALID, "44250-9",
              "QuestionnaireResponse.item[0].answer[0].valueCoding");
    th_qr_destroy(qr);
    qr = parse_edited(json, ITEM0 ANS0,
                      ITEM0 "{\"valueCoding\":{\"system\":\"http://snomed.info/sct\","
                            "\"code\":\"LA6569-3\"}}");
    tu_expect(qr, TH_FHIR_ISSUE_CODE_INVALID, "44250-9",
              "QuestionnaireResponse.item[0].answer[0].valueCoding");
    th_qr_destroy(qr);
    qr = parse_edited(json, ITEM0 ANS0, ITEM0 "{\"valueCoding\":{\"code\":\"LA6569-3\"}}");
    tu_expect(qr, TH_FHIR_ISSUE_CODE_INVALID, "44250-9",
              "QuestionnaireResponse.item[0].answer[0].valueCoding");
    th_qr_destroy(qr);
    qr =
        parse_edited(json, ITEM0 ANS0, ITEM0 "{\"valueCoding\":{\"system\":\"http://loinc.org\"}}");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, "44250-9",
              "QuestionnaireResponse.item[0].answer[0].valueCoding");
    th_qr_destroy(qr);

    /* Wrong answer type; no value; two values. */
    qr = parse_edited(json, ITEM0 ANS0, ITEM0 "{\"valueString\":\"several days\"}");
    tu_expect(qr, TH_FHIR_ISSUE_VALUE, "44250-9",
              "QuestionnaireResponse.item[0].answer[0].valueString");
    th_qr_destroy(qr);
    qr = parse_edited(json, ITEM0 ANS0, ITEM0 "{}");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, "44250-9", "QuestionnaireResponse.item[0].answer[0]");
    th_qr_destroy(qr);
    qr = parse_edited(json, ITEM0 ANS0,
                      ITEM0 "{\"valueCoding\":{\"system\":\"http://loinc.org\",\"code\":"
                            "\"LA6569-3\"},\"valueInteger\":1}");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, "44250-9", "QuestionnaireResponse.item[0].answer[0]");
    th_qr_destroy(qr);
    qr = parse_edited(json, ITEM0 ANS0 "]", ITEM0 "]");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, "44250-9", "QuestionnaireResponse.item[0].answer");
    th_qr_destroy(qr);

    /* Unknown linkId; item without linkId; item that is not an object. */
    qr = parse_edited(json, "\"linkId\":\"44255-8\"", "\"linkId\":\"99999-9\"");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.item[1].linkId");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, "44255-8", "QuestionnaireResponse.item");
    assert_null(tu_find(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.item[1].linkId")
                    ->link_id);
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"linkId\":\"44255-8\",", "");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.item[1].linkId");
    th_qr_destroy(qr);
    qr = parse_edited(json, "\"item\":[", "\"item\":[42,");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.item[0]");
    th_qr_destroy(qr);
    free(json);

    /* Display items are ignored, the difficulty item is optional. */
    json = tu_response(9, w, "{\"linkId\":\"intro\",\"text\":\"anything\",\"answer\":[1]}", "");
    qr = tu_parse(mii_reg, json);
    tu_assert_clean(qr);
    th_qr_destroy(qr);
    free(json);

    /* Calculated total: either integer or decimal, but a number. */
    json = tu_response(9, w, "{\"linkId\":\"44261-6\",\"answer\":[{\"valueDecimal\":9.0}]}", "");
    qr = tu_parse(mii_reg, json);
    tu_assert_clean(qr);
    th_qr_destroy(qr);
    free(json);
    json = tu_response(9, w, "{\"linkId\":\"44261-6\",\"answer\":[{\"valueInteger\":\"9\"}]}", "");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, "44261-6",
              "QuestionnaireResponse.item[9].answer[0].valueInteger");
    th_qr_destroy(qr);
    free(json);

    /* No items at all: every required item is reported. */
    int none[9] = {-1, -1, -1, -1, -1, -1, -1, -1, -1};
    json = tu_response(9, none, "", "");
    qr = tu_parse(mii_reg, json);
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.item");
    size_t nreq = 0;
    for (size_t i = 0; i < th_fhir_issues_count(th_qr_issues(qr)); i++) {
        nreq += th_fhir_issues_get(th_qr_issues(qr), i)->code == TH_FHIR_ISSUE_REQUIRED;
    }
    assert_int_equal(nreq, 9);
    th_qr_destroy(qr);
    free(json);
    json = tu_response(9, none, "", "");
    qr = parse_edited(json, ",\"item\":[]", ",\"item\":{}");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.item");
    th_qr_destroy(qr);
    free(json);
}

static void test_integer_range_soma(void **state)
{
    (void)state;
    char *body = tu_read("mii/QuestionnaireResponse-mii-exa-pro-euronet-soma-response.json", NULL);
    static const struct {
        const char *to;
        th_fhir_issue_type code;
    } cases[] = {
        {"\"valueInteger\": 11", TH_FHIR_ISSUE_VALUE},
        {"\"valueInteger\": -1", TH_FHIR_ISSUE_VALUE},
        {"\"valueInteger\": 6.5", TH_FHIR_ISSUE_STRUCTURE},
        {"\"valueInteger\": \"6\"", TH_FHIR_ISSUE_STRUCTURE},
        {"\"valueDecimal\": 6", TH_FHIR_ISSUE_VALUE},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        th_qr *qr = parse_edited(body, "\"valueInteger\" : 6", cases[i].to);
        const char *expr = strstr(cases[i].to, "Decimal") != NULL
                               ? "QuestionnaireResponse.item[0].answer[0].valueDecimal"
                               : "QuestionnaireResponse.item[0].answer[0].valueInteger";
        tu_expect(qr, cases[i].code, "euronet-soma-q01", expr);
        assert_int_equal(th_fhir_issues_count(th_qr_issues(qr)), 1);
        th_qr_destroy(qr);
    }
    /* The bounds themselves are allowed. */
    th_qr *qr = parse_edited(body, "\"valueInteger\" : 6", "\"valueInteger\": 10");
    tu_assert_clean(qr);
    th_qr_destroy(qr);
    qr = parse_edited(body, "\"valueInteger\" : 5", "\"valueInteger\": 0");
    tu_assert_clean(qr);
    th_qr_destroy(qr);
    free(body);
}

static void test_isrz_codes(void **state)
{
    (void)state;
    char *body = tu_read("mii/QuestionnaireResponse-mii-exa-pro-isr-z-response.json", NULL);
    th_qr *qr = parse_edited(body, "\"trifft-kaum-zu\"", "\"trifft-gar-nicht-zu\"");
    tu_expect(qr, TH_FHIR_ISSUE_CODE_INVALID, "isr-z-q02",
              "QuestionnaireResponse.item[1].answer[0].valueCoding");
    th_qr_destroy(qr);
    qr = parse_edited(body, "\"trifft-deutlich-zu\"", "\"trifft-extrem-zu\"");
    tu_assert_clean(qr);
    th_qr_destroy(qr);
    free(body);
}

/* A Questionnaire with groups, nested questions, answer.item, a repeating group and a
 * contained ValueSet. */
static const char nested_q[] =
    "{\"resourceType\":\"Questionnaire\",\"id\":\"nested\",\"url\":\"urn:test:nested\","
    "\"contained\":[{\"resourceType\":\"ValueSet\",\"id\":\"yn\",\"compose\":{\"include\":[{"
    "\"system\":\"urn:yn\",\"concept\":[{\"code\":\"y\"},{\"code\":\"n\"}]}]}}],"
    "\"item\":["
    " {\"linkId\":\"g1\",\"type\":\"group\",\"required\":true,\"item\":["
    "   {\"linkId\":\"g1.d\",\"type\":\"display\",\"text\":\"intro\"},"
    "   {\"linkId\":\"g1.q1\",\"type\":\"integer\",\"required\":true},"
    "   {\"linkId\":\"g1.q2\",\"type\":\"string\",\"maxLength\":5},"
    "   {\"linkId\":\"g1.g2\",\"type\":\"group\",\"item\":["
    "     {\"linkId\":\"g1.g2.q3\",\"type\":\"boolean\",\"required\":true}]}]},"
    " {\"linkId\":\"q4\",\"type\":\"choice\",\"answerValueSet\":\"#yn\",\"item\":["
    "   {\"linkId\":\"q4.why\",\"type\":\"text\",\"required\":true}]},"
    " {\"linkId\":\"rg\",\"type\":\"group\",\"repeats\":true,\"item\":["
    "   {\"linkId\":\"rg.med\",\"type\":\"string\",\"required\":true},"
    "   {\"linkId\":\"rg.when\",\"type\":\"date\"},"
    "   {\"linkId\":\"rg.tags\",\"type\":\"open-choice\",\"repeats\":true,\"answerOption\":["
    "     {\"valueCoding\":{\"system\":\"urn:t\",\"code\":\"a\"}}]}]},"
    " {\"linkId\":\"c\",\"type\":\"choice\",\"enableWhen\":[{\"question\":\"q4\","
    "  \"operator\":\"=\",\"answerCoding\":{\"system\":\"urn:yn\",\"code\":\"y\"}}],"
    "  \"required\":true,\"answerOption\":[{\"valueInteger\":1},{\"valueInteger\":2}]}]}";

static const char nested_ok[] =
    "{\"resourceType\":\"QuestionnaireResponse\",\"questionnaire\":\"urn:test:nested\","
    "\"status\":\"completed\",\"subject\":{\"reference\":\"Patient/p-1\"},"
    "\"authored\":\"2026-11-02T09:30:00Z\",\"item\":["
    " {\"linkId\":\"g1\",\"item\":["
    "   {\"linkId\":\"g1.q1\",\"answer\":[{\"valueInteger\":3}]},"
    "   {\"linkId\":\"g1.q2\",\"answer\":[{\"valueString\":\"abcd\\u00e9\"}]},"
    "   {\"linkId\":\"g1.g2\",\"item\":[{\"linkId\":\"g1.g2.q3\",\"answer\":[{\"valueBoolean\":"
    "false}]}]}]},"
    " {\"linkId\":\"q4\",\"answer\":[{\"valueCoding\":{\"system\":\"urn:yn\",\"code\":\"y\"},"
    "   \"item\":[{\"linkId\":\"q4.why\",\"answer\":[{\"valueString\":\"because\"}]}]}]},"
    " {\"linkId\":\"rg\",\"item\":[{\"linkId\":\"rg.med\",\"answer\":[{\"valueString\":\"m1\"}]},"
    "   {\"linkId\":\"rg.when\",\"answer\":[{\"valueDate\":\"2026-10\"}]},"
    "   {\"linkId\":\"rg.tags\",\"answer\":[{\"valueString\":\"free\"},{\"valueCoding\":"
    "{\"system\":\"urn:t\",\"code\":\"a\"}}]}]},"
    " {\"linkId\":\"rg\",\"item\":[{\"linkId\":\"rg.med\",\"answer\":[{\"valueString\":\"m2\"}]}]}"
    "]}";

static void test_nested(void **state)
{
    (void)state;
    th_qreg *reg = tu_registry(false);
    char err[256];
    int rc = th_qreg_load_buffer(reg, "nested.json", nested_q, strlen(nested_q), err, sizeof(err));
    if (rc != TH_OK) {
        fail_msg("%s", err);
    }
    th_qr_options o = tu_opts();
    th_qr *qr;
    assert_int_equal(th_qr_parse(reg, nested_ok, strlen(nested_ok), &o, &qr, NULL), TH_OK);
    tu_assert_clean(qr);
    th_qr_destroy(qr);

    static const struct {
        const char *from, *to;
        th_fhir_issue_type code;
        const char *link_id, *expr;
    } cases[] = {
        /* nested required missing, reported at the group instance */
        {"{\"linkId\":\"g1.q1\",\"answer\":[{\"valueInteger\":3}]},", "", TH_FHIR_ISSUE_REQUIRED,
         "g1.q1", "QuestionnaireResponse.item[0].item"},
        {"{\"linkId\":\"g1.g2.q3\",\"answer\":[{\"valueBoolean\":false}]}",
         "{\"linkId\":\"g1.g2.q3\"}", TH_FHIR_ISSUE_REQUIRED, "g1.g2.q3",
         "QuestionnaireResponse.item[0].item[2].item"},
        /* under answer.item */
        {"\"answer\":[{\"valueString\":\"because\"}]", "\"answer\":[{\"valueInteger\":1}]",
         TH_FHIR_ISSUE_VALUE, "q4.why",
         "QuestionnaireResponse.item[1].answer[0].item[0].answer[0].valueInteger"},
        {"{\"linkId\":\"q4.why\",\"answer\":[{\"valueString\":\"because\"}]}",
         "{\"linkId\":\"rg.when\"}", TH_FHIR_ISSUE_STRUCTURE, "rg.when",
         "QuestionnaireResponse.item[1].answer[0].item[0]"},
        /* a nested item at the top level, a top-level item nested */
        {"{\"linkId\":\"q4\",", "{\"linkId\":\"g1.q2\",", TH_FHIR_ISSUE_STRUCTURE, "g1.q2",
         "QuestionnaireResponse.item[1]"},
        {"{\"linkId\":\"g1.q1\",", "{\"linkId\":\"q4\",", TH_FHIR_ISSUE_STRUCTURE, "q4",
         "QuestionnaireResponse.item[0].item[0]"},
        /* required group missing */
        {"{\"linkId\":\"g1\",", "{\"linkId\":\"g1x\",", TH_FHIR_ISSUE_REQUIRED, "g1",
         "QuestionnaireResponse.item"},
        /* a group with answers */
        {"{\"linkId\":\"g1.g2\",\"item\"", "{\"linkId\":\"g1.g2\",\"answer\":[],\"item\"",
         TH_FHIR_ISSUE_STRUCTURE, "g1.g2", "QuestionnaireResponse.item[0].item[2].answer"},
        /* maxLength counts characters, not bytes */
        {"abcd\\u00e9", "abcdef", TH_FHIR_ISSUE_TOO_LONG, "g1.q2",
         "QuestionnaireResponse.item[0].item[1].answer[0].valueString"},
        /* contained ValueSet */
        {"\"code\":\"y\"}", "\"code\":\"maybe\"}", TH_FHIR_ISSUE_CODE_INVALID, "q4",
         "QuestionnaireResponse.item[1].answer[0].valueCoding"},
        /* open-choice: free text is fine, a coding must be listed */
        {"\"urn:t\",\"code\":\"a\"", "\"urn:t\",\"code\":\"b\"", TH_FHIR_ISSUE_CODE_INVALID,
         "rg.tags", "QuestionnaireResponse.item[2].item[2].answer[1].valueCoding"},
        /* date format */
        {"\"2026-10\"", "\"2026-10-32\"", TH_FHIR_ISSUE_VALUE, "rg.when",
         "QuestionnaireResponse.item[2].item[1].answer[0].valueDate"},
        /* required inside the second instance of a repeating group */
        {"{\"linkId\":\"rg\",\"item\":[{\"linkId\":\"rg.med\",\"answer\":[{\"valueString\":"
         "\"m2\"}]}]}",
         "{\"linkId\":\"rg\",\"item\":[{\"linkId\":\"rg.when\",\"answer\":[{\"valueDate\":"
         "\"2026\"}]}]}",
         TH_FHIR_ISSUE_REQUIRED, "rg.med", "QuestionnaireResponse.item[3].item"},
        /* a non-repeating item twice inside one group instance */
        {"{\"linkId\":\"g1.q2\",\"answer\":[{\"valueString\":\"abcd\\u00e9\"}]},",
         "{\"linkId\":\"g1.q2\",\"answer\":[{\"valueString\":\"x\"}]},{\"linkId\":\"g1.q2\"},",
         TH_FHIR_ISSUE_STRUCTURE, "g1.q2", "QuestionnaireResponse.item[0].item[2]"},
        /* children under a question without children */
        {"{\"linkId\":\"g1.q1\",\"answer\":[{\"valueInteger\":3}]}",
         "{\"linkId\":\"g1.q1\",\"answer\":[{\"valueInteger\":3}],\"item\":[{\"linkId\":\"x\"}]}",
         TH_FHIR_ISSUE_STRUCTURE, "g1.q1", "QuestionnaireResponse.item[0].item[0].item"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *at = strstr(nested_ok, cases[i].from);
        if (at == NULL) {
            fail_msg("case %zu: '%s' not found", i, cases[i].from);
        }
        char body[4096];
        snprintf(body, sizeof(body), "%.*s%s%s", (int)(at - nested_ok), nested_ok, cases[i].to,
                 at + strlen(cases[i].from));
        assert_int_equal(th_qr_parse(reg, body, strlen(body), &o, &qr, NULL), TH_OK);
        if (tu_find(qr, cases[i].code, cases[i].link_id, cases[i].expr) == NULL) {
            tu_print_issues(qr);
            fail_msg("case %zu: no %s issue for %s at %s", i,
                     th_fhir_issue_type_name(cases[i].code), cases[i].link_id, cases[i].expr);
        }
        th_qr_destroy(qr);
    }
    th_qreg_destroy(reg);
}

/* ---- everything at once, privacy, JSON errors --------------------------------------------- */

static void test_many_problems_listed(void **state)
{
    (void)state;
    const char body[] =
        "{\"resourceType\":\"QuestionnaireResponse\",\"questionnaire\":"
        "\"http://loinc.org/q/44249-1\",\"status\":\"in-progress\",\"subject\":{\"reference\":"
        "\"Group/1\"},\"authored\":\"yesterday\",\"identifier\":{\"system\":\"urn:s\"},\"item\":["
        "{\"linkId\":\"44250-9\",\"answer\":[{\"valueCoding\":{\"system\":\"http://loinc.org\","
        "\"code\":\"LA0000-0\"}}]},"
        "{\"linkId\":\"44255-8\",\"answer\":[{\"valueString\":\"often\"}]},"
        "{\"linkId\":\"nope\"},"
        "{\"linkId\":\"44259-0\",\"answer\":[{\"valueCoding\":{\"system\":\"http://loinc.org\","
        "\"code\":\"LA6568-5\"}},{\"valueCoding\":{\"system\":\"http://loinc.org\",\"code\":"
        "\"LA6568-5\"}}]},"
        "{\"linkId\":\"44259-0\",\"answer\":[{\"valueCoding\":{\"system\":\"http://loinc.org\","
        "\"code\":\"LA6568-5\"}}]}]}";
    th_qr *qr = tu_parse(mii_reg, body);
    tu_expect(qr, TH_FHIR_ISSUE_BUSINESS_RULE, NULL, "QuestionnaireResponse.status");
    tu_expect(qr, TH_FHIR_ISSUE_INVALID, NULL, "QuestionnaireResponse.subject.reference");
    tu_expect(qr, TH_FHIR_ISSUE_VALUE, NULL, "QuestionnaireResponse.authored");
    tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, NULL, "QuestionnaireResponse.identifier.value");
    tu_expect(qr, TH_FHIR_ISSUE_CODE_INVALID, "44250-9",
              "QuestionnaireResponse.item[0].answer[0].valueCoding");
    tu_expect(qr, TH_FHIR_ISSUE_VALUE, "44255-8",
              "QuestionnaireResponse.item[1].answer[0].valueString");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse.item[2].linkId");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, "44259-0", "QuestionnaireResponse.item[3].answer");
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, "44259-0", "QuestionnaireResponse.item[4]");
    for (int i = 3; i < 9; i++) {
        tu_expect(qr, TH_FHIR_ISSUE_REQUIRED, tu_phq9_links[i], "QuestionnaireResponse.item");
    }
    assert_int_equal(th_fhir_issues_count(th_qr_issues(qr)), 15);
    assert_int_equal(th_fhir_issues_errors(th_qr_issues(qr)), 15);

    /* The caller adds the enrolment check's verdict. */
    th_fhir_issues *is = th_qr_issues(qr);
    assert_int_equal(th_fhir_issues_add(is, TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_NOT_FOUND, NULL,
                                        "QuestionnaireResponse.subject",
                                        "the patient is not enrolled in this trial"),
                     TH_OK);
    assert_int_equal(th_fhir_issues_count(is), 16);
    json_t *oo;
    assert_int_equal(th_fhir_outcome_from_issues(is, &oo), TH_OK);
    assert_int_equal(json_array_size(json_object_get(oo, "issue")), 16);
    json_decref(oo);
    th_qr_destroy(qr);

    /* The caller's issue alone makes a valid response invalid. */
    int w[9] = PHQ9_OK;
    char *json = tu_response(9, w, "", "");
    qr = tu_parse(mii_reg, json);
    assert_true(th_qr_valid(qr));
    assert_int_equal(th_fhir_issues_add(th_qr_issues(qr), TH_FHIR_SEV_WARNING,
                                        TH_FHIR_ISSUE_INFORMATIONAL, NULL, NULL, "note"),
                     TH_OK);
    assert_true(th_qr_valid(qr));
    assert_int_equal(th_fhir_issues_add(th_qr_issues(qr), TH_FHIR_SEV_ERROR,
                                        TH_FHIR_ISSUE_NOT_FOUND, NULL, NULL, "not enrolled"),
                     TH_OK);
    assert_false(th_qr_valid(qr));
    th_qr_destroy(qr);
    free(json);
}

static void test_issue_cap(void **state)
{
    (void)state;
    int w[9] = PHQ9_OK;
    size_t cap = 300 * 24 + 1;
    char *items = malloc(cap);
    size_t n = 0;
    for (int i = 0; i < 300; i++) {
        n += (size_t)snprintf(items + n, cap - n, "%s{\"linkId\":\"x%03d\"}", i ? "," : "", i);
    }
    char *json = tu_response(9, w, items, "");
    th_qr *qr = tu_parse(mii_reg, json);
    assert_int_equal(th_fhir_issues_count(th_qr_issues(qr)), TH_FHIR_MAX_ISSUES);
    assert_int_equal(th_fhir_issues_omitted(th_qr_issues(qr)), 300 - TH_FHIR_MAX_ISSUES);
    assert_int_equal(th_fhir_issues_errors(th_qr_issues(qr)), 300);
    th_qr_destroy(qr);
    free(json);
    free(items);
}

#define MARK "ZQXSECRETQZ"

static void assert_no_marker(th_qr *qr)
{
    th_fhir_issues *is = th_qr_issues(qr);
    assert_true(th_fhir_issues_count(is) > 0);
    for (size_t i = 0; i < th_fhir_issues_count(is); i++) {
        const th_fhir_issue *x = th_fhir_issues_get(is, i);
        if (strstr(x->diagnostics, MARK) || (x->expression && strstr(x->expression, MARK)) ||
            (x->link_id && strstr(x->link_id, MARK))) {
            tu_print_issues(qr);
            fail_msg("issue %zu echoes the marker", i);
        }
    }
    json_t *oo;
    assert_int_equal(th_fhir_outcome_from_issues(is, &oo), TH_OK);
    char *dump = json_dumps(oo, 0);
    assert_null(strstr(dump, MARK));
    free(dump);
    json_decref(oo);
}

static void test_diagnostics_never_echo_answers(void **state)
{
    (void)state;
    /* Every string the patient or app controls carries the marker, and every one of them is
     * also made wrong so that an issue is written about it. */
    const char body[] =
        "{\"resourceType\":\"QuestionnaireResponse" MARK "\",\"id\":\"" MARK "\","
        "\"questionnaire\":\"http://loinc.org/q/44249-1\",\"status\":\"" MARK "\","
        "\"subject\":{\"reference\":\"Patient/" MARK " Smith\",\"display\":\"" MARK "\"},"
        "\"authored\":\"" MARK "\",\"identifier\":{\"system\":\"" MARK "\"},"
        "\"extension\":[{\"url\":\"https://trialhub.dev/fhir/StructureDefinition/visit-week\","
        "\"valueString\":\"" MARK "\"}],"
        "\"item\":["
        "{\"linkId\":\"44250-9\",\"text\":\"" MARK "\",\"answer\":[{\"valueCoding\":{\"system\":"
        "\"http://loinc.org\",\"code\":\"" MARK "\",\"display\":\"" MARK "\"}}]},"
        "{\"linkId\":\"44255-8\",\"answer\":[{\"valueString\":\"" MARK "\"}]},"
        "{\"linkId\":\"44259-0\",\"answer\":[{\"valueCoding\":{\"system\":\"" MARK "\",\"code\":"
        "\"LA6568-5\",\"display\":\"" MARK "\"}}]},"
        "{\"linkId\":\"44254-1\",\"answer\":[{\"value" MARK "\":1}]},"
        "{\"linkId\":\"" MARK "\",\"answer\":[{\"valueString\":\"" MARK "\"}]},"
        "{\"linkId\":\"44261-6\",\"answer\":[{\"valueString\":\"" MARK "\"}]}"
        "]}";
    th_qr *qr = tu_parse(mii_reg, body);
    assert_true(th_fhir_issues_count(th_qr_issues(qr)) >= 10);
    assert_no_marker(qr);
    th_qr_destroy(qr);

    /* The same for an MII response, edited through jansson: the marker as the display of
     * one answer (not judged, so no issue) and as code and display of another. */
    char *mii = tu_read("mii/QuestionnaireResponse-mii-exa-pro-gad-7-response.json", NULL);
    json_error_t jerr;
    json_t *doc = json_loads(mii, 0, &jerr);
    assert_non_null(doc);
    json_t *items = json_object_get(doc, "item");
    json_t *c0 = json_object_get(
        json_array_get(json_object_get(json_array_get(items, 0), "answer"), 0), "valueCoding");
    json_t *c3 = json_object_get(
        json_array_get(json_object_get(json_array_get(items, 3), "answer"), 0), "valueCoding");
    assert_int_equal(json_object_set_new(c0, "display", json_string(MARK)), 0);
    assert_int_equal(json_object_set_new(c3, "code", json_string(MARK)), 0);
    assert_int_equal(json_object_set_new(c3, "display", json_string(MARK)), 0);
    char *edited = json_dumps(doc, 0);
    qr = tu_parse(mii_reg, edited);
    tu_expect(qr, TH_FHIR_ISSUE_CODE_INVALID, "phq-phq5d",
              "QuestionnaireResponse.item[3].answer[0].valueCoding");
    assert_int_equal(th_fhir_issues_count(th_qr_issues(qr)), 1);
    assert_no_marker(qr);
    th_qr_destroy(qr);
    free(edited);
    json_decref(doc);
    free(mii);

    /* Malformed JSON: the message does not quote the token. */
    const char bad[] = "{\"item\": [{\"text\": \"" MARK "\" " MARK "}]}";
    th_fhir_parse_error perr;
    assert_int_equal(th_qr_parse(mii_reg, bad, strlen(bad), NULL, &qr, &perr), TH_EPARSE);
    assert_null(strstr(perr.message, MARK));
    json_t *oo;
    assert_int_equal(th_fhir_outcome_parse_error(&perr, &oo), TH_OK);
    char *dump = json_dumps(oo, 0);
    assert_null(strstr(dump, MARK));
    free(dump);
    json_decref(oo);
}

static void test_malformed_json(void **state)
{
    (void)state;
    th_qr *qr = NULL;
    th_fhir_parse_error perr;

    const char dup[] = "{\"resourceType\":\"QuestionnaireResponse\",\n"
                       " \"status\":\"completed\",\n"
                       " \"status\":\"amended\"}";
    assert_int_equal(th_qr_parse(mii_reg, dup, strlen(dup), NULL, &qr, &perr), TH_EPARSE);
    assert_null(qr);
    assert_int_equal(perr.line, 3);
    assert_true(perr.column > 0);
    assert_non_null(strstr(perr.message, "duplicate"));

    /* A duplicate deep inside an answer is rejected too. */
    const char dup2[] = "{\"item\":[{\"linkId\":\"a\",\"answer\":[{\"valueCoding\":"
                        "{\"code\":\"x\",\"code\":\"y\"}}]}]}";
    assert_int_equal(th_qr_parse(mii_reg, dup2, strlen(dup2), NULL, &qr, &perr), TH_EPARSE);
    assert_int_equal(perr.line, 1);

    const char trunc[] = "{\r\n  \"resourceType\": \"QuestionnaireResponse\",\r\n  \"item\": [\r\n";
    assert_int_equal(th_qr_parse(mii_reg, trunc, strlen(trunc), NULL, &qr, &perr), TH_EPARSE);
    assert_true(perr.line >= 3);

    const char token[] = "{\n  \"status\": completed\n}";
    assert_int_equal(th_qr_parse(mii_reg, token, strlen(token), NULL, &qr, &perr), TH_EPARSE);
    assert_int_equal(perr.line, 2);
    assert_true(perr.column >= 12);
    json_t *oo;
    assert_int_equal(th_fhir_outcome_parse_error(&perr, &oo), TH_OK);
    const char *diag = json_string_value(
        json_object_get(json_array_get(json_object_get(oo, "issue"), 0), "diagnostics"));
    assert_non_null(strstr(diag, "line 2, column"));
    json_decref(oo);

    static const char *const bad[] = {
        "",         " ",    "nul\n", "{\"a\":\"\\u0000\"}", "{\"a\":1e999}", "{\"a\":\"\xff\"}",
        "\"text\"", "{} {}"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(th_qr_parse(mii_reg, bad[i], strlen(bad[i]), NULL, &qr, &perr), TH_EPARSE);
    }
    /* Not NUL-terminated: only len bytes count. */
    const char prefix[] = "{\"resourceType\":\"QuestionnaireResponse\"}garbage";
    assert_int_equal(th_qr_parse(mii_reg, prefix, strlen(prefix) - 7, NULL, &qr, &perr), TH_OK);
    th_qr_destroy(qr);

    /* JSON, but not an object: a 422 with one issue. */
    assert_int_equal(th_qr_parse(mii_reg, "[1,2]", 5, NULL, &qr, &perr), TH_OK);
    assert_int_equal(th_fhir_issues_count(th_qr_issues(qr)), 1);
    tu_expect(qr, TH_FHIR_ISSUE_STRUCTURE, NULL, "QuestionnaireResponse");
    th_qr_destroy(qr);

    assert_int_equal(th_qr_parse(NULL, "{}", 2, NULL, &qr, &perr), TH_EINVAL);
    assert_int_equal(th_qr_parse(mii_reg, NULL, 2, NULL, &qr, &perr), TH_EINVAL);
    assert_int_equal(th_qr_parse(mii_reg, "{}", 2, NULL, NULL, &perr), TH_EINVAL);
    th_qr_destroy(NULL);
}

static void test_parse_oom(void **state)
{
    (void)state;
    /* Two problems so that issue storage is exercised as well. */
    int w[9] = {1, 0, 2, 3, 0, 1, 2, 0, -1};
    char *json = tu_response(9, w, "{\"linkId\":\"bad\"}", "");
    th_qr_options o = tu_opts();
    int rc = TH_ENOMEM;
    long n;
    for (n = 0; n < 1000; n++) {
        th_qr *qr = NULL;
        th__fault_fail_after(n);
        rc = th_qr_parse(mii_reg, json, strlen(json), &o, &qr, NULL);
        th__fault_fail_after(-1);
        if (rc == TH_OK) {
            assert_int_equal(th_fhir_issues_count(th_qr_issues(qr)), 2);
            th_qr_destroy(qr);
            break;
        }
        assert_int_equal(rc, TH_ENOMEM);
        assert_null(qr);
    }
    assert_int_equal(rc, TH_OK);
    assert_true(n >= 2);
    free(json);
}

/* ---- concurrency and cost ----------------------------------------------------------------- */

typedef struct worker_arg {
    const char *body;
    size_t len;
    int iterations;
    int failures;
} worker_arg;

static void *worker(void *p)
{
    worker_arg *a = p;
    th_qr_options o = tu_opts();
    for (int i = 0; i < a->iterations; i++) {
        th_qr *qr = NULL;
        if (th_qr_parse(mii_reg, a->body, a->len, &o, &qr, NULL) != TH_OK || !th_qr_valid(qr)) {
            a->failures++;
        } else {
            th_fhir_score sc;
            if (th_fhir_score_compute(th_qr_get_fields(qr)->instrument, qr, &sc) != TH_OK) {
                a->failures++;
            }
        }
        const th_fhir_instrument *inst;
        const char *bundle;
        size_t blen;
        th_qreg_bundle(mii_reg, &bundle, &blen);
        if (th_qreg_find(mii_reg, "http://loinc.org/q/69737-5", &inst) != TH_OK || blen == 0) {
            a->failures++;
        }
        th_qr_destroy(qr);
    }
    return NULL;
}

static void test_concurrent_parse(void **state)
{
    (void)state;
    int w[9] = PHQ9_OK;
    char *phq = tu_response(9, w, "", "");
    char *mii = tu_read("mii/QuestionnaireResponse-mii-exa-pro-isr-z-response.json", NULL);
    worker_arg args[4];
    pthread_t threads[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (worker_arg){i % 2 ? phq : mii, strlen(i % 2 ? phq : mii), 200, 0};
        assert_int_equal(pthread_create(&threads[i], NULL, worker, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(threads[i], NULL);
        assert_int_equal(args[i].failures, 0);
    }
    free(phq);
    free(mii);
}

static double bench_ns(const char *body, size_t len, int iterations)
{
    th_qr_options o = tu_opts();
    struct timespec t0, t1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    for (int i = 0; i < iterations; i++) {
        th_qr *qr = NULL;
        assert_int_equal(th_qr_parse(mii_reg, body, len, &o, &qr, NULL), TH_OK);
        assert_true(th_qr_valid(qr));
        th_qr_destroy(qr);
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    return ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / iterations;
}

static double bench_jansson_ns(const char *body, size_t len, int iterations)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    for (int i = 0; i < iterations; i++) {
        json_error_t jerr;
        json_t *j = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
        assert_non_null(j);
        json_decref(j);
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    return ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / iterations;
}

/* Not an assertion on time: prints what validation costs (see the note atop src/fhir/qr.c).
 * Thread CPU time, so that other jobs on a shared machine do not count. */
static void test_cost(void **state)
{
    (void)state;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    const int iterations = 200;
#else
    const int iterations = 10000;
#endif
    int w[9] = PHQ9_OK;
    char *phq = tu_response(
        9, w,
        "{\"linkId\":\"69722-7\",\"answer\":[{\"valueCoding\":{\"system\":\"http://loinc.org\","
        "\"code\":\"LA6573-5\",\"display\":\"Somewhat difficult\"}}]},"
        "{\"linkId\":\"44261-6\",\"answer\":[{\"valueInteger\":9}]}",
        ",\"id\":\"7f1c2d9e-5b8a-4e0f-9c3d-2a1b0e9f8d7c\",\"meta\":{\"profile\":[\"http://hl7.org/"
        "fhir/uv/sdc/StructureDefinition/sdc-questionnaireresponse\"]},\"identifier\":{"
        "\"system\":\"urn:trialhub:app\",\"value\":\"0b8e6f5a-2c3d-4e1f-8a9b-7c6d5e4f3a2b\"},"
        "\"extension\":[{\"url\":\"https://trialhub.dev/fhir/StructureDefinition/visit-week\","
        "\"valueInteger\":4}]");
    size_t plen = strlen(phq);
    double ns = bench_ns(phq, plen, iterations);
    double js = bench_jansson_ns(phq, plen, iterations);
    print_message("  cost: built-in PHQ-9 response, %zu bytes: %.0f ns per parse+validate "
                  "(jansson parse alone %.0f ns)\n",
                  plen, ns, js);
    size_t mlen;
    char *mii = tu_read("mii/QuestionnaireResponse-mii-exa-pro-phq-9-response.json", &mlen);
    ns = bench_ns(mii, mlen, iterations / 40);
    js = bench_jansson_ns(mii, mlen, iterations / 40);
    print_message("  cost: MII PHQ-9 example, %zu bytes: %.0f ns per parse+validate (jansson "
                  "parse alone %.0f ns)\n",
                  mlen, ns, js);
    free(phq);
    free(mii);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mii_fixtures_valid),
        cmocka_unit_test(test_builtin_valid_and_fields),
        cmocka_unit_test(test_authored_forms),
        cmocka_unit_test(test_header_rules),
        cmocka_unit_test(test_item_rules),
        cmocka_unit_test(test_integer_range_soma),
        cmocka_unit_test(test_isrz_codes),
        cmocka_unit_test(test_nested),
        cmocka_unit_test(test_many_problems_listed),
        cmocka_unit_test(test_issue_cap),
        cmocka_unit_test(test_diagnostics_never_echo_answers),
        cmocka_unit_test(test_malformed_json),
        cmocka_unit_test(test_parse_oom),
        cmocka_unit_test(test_concurrent_parse),
        cmocka_unit_test(test_cost),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
