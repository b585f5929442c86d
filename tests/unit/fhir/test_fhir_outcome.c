/* Issue lists and OperationOutcome: shape of the resource, the single-issue and parse-error
 * helpers, the cap on stored issues, UTF-8 safety of caller text, allocation failure. */
#include "fhir_test_util.h"

#include "trialhub/alloc.h"

static void test_names(void **state)
{
    (void)state;
    assert_string_equal(th_fhir_severity_name(TH_FHIR_SEV_FATAL), "fatal");
    assert_string_equal(th_fhir_severity_name(TH_FHIR_SEV_ERROR), "error");
    assert_string_equal(th_fhir_severity_name(TH_FHIR_SEV_WARNING), "warning");
    assert_string_equal(th_fhir_severity_name(TH_FHIR_SEV_INFORMATION), "information");
    assert_string_equal(th_fhir_severity_name((th_fhir_severity)42), "unknown");
    assert_string_equal(th_fhir_issue_type_name(TH_FHIR_ISSUE_CODE_INVALID), "code-invalid");
    assert_string_equal(th_fhir_issue_type_name(TH_FHIR_ISSUE_BUSINESS_RULE), "business-rule");
    assert_string_equal(th_fhir_issue_type_name(TH_FHIR_ISSUE_NOT_FOUND), "not-found");
    assert_string_equal(th_fhir_issue_type_name(TH_FHIR_ISSUE_TOO_COSTLY), "too-costly");
    assert_string_equal(th_fhir_issue_type_name((th_fhir_issue_type)999), "unknown");
    assert_string_equal(th_fhir_score_kind_name(TH_FHIR_SCORE_SUM), "sum");
    assert_string_equal(th_fhir_score_kind_name(TH_FHIR_SCORE_MEAN), "mean");
}

static void test_issues_and_outcome(void **state)
{
    (void)state;
    th_fhir_issues *is = NULL;
    assert_int_equal(th_fhir_issues_create(&is), TH_OK);
    assert_int_equal(th_fhir_issues_count(is), 0);
    assert_null(th_fhir_issues_get(is, 0));

    /* An empty list still makes a valid OperationOutcome (issue is 1..*). */
    json_t *oo;
    assert_int_equal(th_fhir_outcome_from_issues(is, &oo), TH_OK);
    json_t *arr = json_object_get(oo, "issue");
    assert_int_equal(json_array_size(arr), 1);
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "code")),
                        "informational");
    json_decref(oo);

    assert_int_equal(th_fhir_issues_add(is, TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_REQUIRED, "q1",
                                        "QuestionnaireResponse.item", "required item '%s' is %s",
                                        "q1", "not answered"),
                     TH_OK);
    assert_int_equal(th_fhir_issues_add(is, TH_FHIR_SEV_WARNING, TH_FHIR_ISSUE_VALUE, NULL, NULL,
                                        "just %d warning", 1),
                     TH_OK);
    assert_int_equal(th_fhir_issues_count(is), 2);
    assert_int_equal(th_fhir_issues_errors(is), 1);
    const th_fhir_issue *x = th_fhir_issues_get(is, 0);
    assert_int_equal(x->severity, TH_FHIR_SEV_ERROR);
    assert_int_equal(x->code, TH_FHIR_ISSUE_REQUIRED);
    assert_string_equal(x->diagnostics, "required item 'q1' is not answered");
    assert_string_equal(x->expression, "QuestionnaireResponse.item");
    assert_string_equal(x->link_id, "q1");
    x = th_fhir_issues_get(is, 1);
    assert_null(x->expression);
    assert_null(x->link_id);

    assert_int_equal(th_fhir_outcome_from_issues(is, &oo), TH_OK);
    assert_string_equal(json_string_value(json_object_get(oo, "resourceType")), "OperationOutcome");
    arr = json_object_get(oo, "issue");
    assert_int_equal(json_array_size(arr), 2);
    json_t *first = json_array_get(arr, 0);
    assert_string_equal(json_string_value(json_object_get(first, "severity")), "error");
    assert_string_equal(json_string_value(json_object_get(first, "code")), "required");
    assert_string_equal(json_string_value(json_object_get(first, "diagnostics")),
                        "required item 'q1' is not answered");
    json_t *expr = json_object_get(first, "expression");
    assert_true(json_is_array(expr));
    assert_string_equal(json_string_value(json_array_get(expr, 0)), "QuestionnaireResponse.item");
    json_t *second = json_array_get(arr, 1);
    assert_string_equal(json_string_value(json_object_get(second, "severity")), "warning");
    assert_null(json_object_get(second, "expression"));
    json_decref(oo);

    assert_int_equal(
        th_fhir_issues_add(NULL, TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_VALUE, NULL, NULL, "x"),
        TH_EINVAL);
    assert_int_equal(th_fhir_outcome_from_issues(NULL, &oo), TH_EINVAL);
    th_fhir_issues_destroy(is);
    th_fhir_issues_destroy(NULL);
}

static void test_single_and_parse_error(void **state)
{
    (void)state;
    json_t *oo;
    assert_int_equal(th_fhir_outcome_single(TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_TOO_COSTLY,
                                            "body larger than 1 MiB", NULL, &oo),
                     TH_OK);
    char *dump = json_dumps(oo, JSON_COMPACT | JSON_SORT_KEYS);
    assert_string_equal(dump, "{\"issue\":[{\"code\":\"too-costly\",\"diagnostics\":\"body larger "
                              "than 1 MiB\",\"severity\":\"error\"}],\"resourceType\":"
                              "\"OperationOutcome\"}");
    free(dump);
    json_decref(oo);

    assert_int_equal(th_fhir_outcome_single(TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_DUPLICATE,
                                            "identifier already used",
                                            "QuestionnaireResponse.identifier", &oo),
                     TH_OK);
    json_t *issue = json_array_get(json_object_get(oo, "issue"), 0);
    assert_string_equal(json_string_value(json_array_get(json_object_get(issue, "expression"), 0)),
                        "QuestionnaireResponse.identifier");
    json_decref(oo);
    assert_int_equal(
        th_fhir_outcome_single(TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_VALUE, NULL, NULL, &oo), TH_EINVAL);

    th_fhir_parse_error perr = {.line = 3, .column = 14, .position = 40};
    snprintf(perr.message, sizeof(perr.message), "duplicate object key");
    assert_int_equal(th_fhir_outcome_parse_error(&perr, &oo), TH_OK);
    issue = json_array_get(json_object_get(oo, "issue"), 0);
    assert_string_equal(json_string_value(json_object_get(issue, "diagnostics")),
                        "malformed JSON at line 3, column 14: duplicate object key");
    assert_string_equal(json_string_value(json_object_get(issue, "code")), "structure");
    json_decref(oo);
}

static void test_cap_and_utf8(void **state)
{
    (void)state;
    th_fhir_issues *is;
    assert_int_equal(th_fhir_issues_create(&is), TH_OK);
    for (int i = 0; i < 150; i++) {
        assert_int_equal(th_fhir_issues_add(is, TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_VALUE, NULL, NULL,
                                            "issue %d", i),
                         TH_OK);
    }
    assert_int_equal(th_fhir_issues_count(is), TH_FHIR_MAX_ISSUES);
    assert_int_equal(th_fhir_issues_omitted(is), 50);
    assert_int_equal(th_fhir_issues_errors(is), 150);
    json_t *oo;
    assert_int_equal(th_fhir_outcome_from_issues(is, &oo), TH_OK);
    json_t *arr = json_object_get(oo, "issue");
    assert_int_equal(json_array_size(arr), TH_FHIR_MAX_ISSUES + 1);
    assert_string_equal(
        json_string_value(json_object_get(json_array_get(arr, TH_FHIR_MAX_ISSUES), "diagnostics")),
        "50 more issues were found but are not listed");
    json_decref(oo);
    th_fhir_issues_destroy(is);

    /* Invalid UTF-8 from a caller becomes '?', long text is cut on a character boundary. */
    assert_int_equal(th_fhir_issues_create(&is), TH_OK);
    assert_int_equal(th_fhir_issues_add(is, TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_VALUE, "l\xff",
                                        "e\xc3", "bad \xc3\x28 byte"),
                     TH_OK);
    const th_fhir_issue *x = th_fhir_issues_get(is, 0);
    assert_string_equal(x->diagnostics, "bad ?( byte");
    assert_string_equal(x->link_id, "l?");
    assert_string_equal(x->expression, "e?");
    char longtext[1200];
    for (size_t i = 0; i + 2 < sizeof(longtext); i += 2) {
        longtext[i] = '\xc3';
        longtext[i + 1] = '\xa9'; /* é */
    }
    longtext[sizeof(longtext) - 2] = '\0';
    assert_int_equal(
        th_fhir_issues_add(is, TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_VALUE, NULL, NULL, "%s", longtext),
        TH_OK);
    x = th_fhir_issues_get(is, 1);
    assert_true(strlen(x->diagnostics) <= 480);
    assert_int_equal(th_fhir_outcome_from_issues(is, &oo), TH_OK); /* jansson accepts it */
    const char *d = json_string_value(
        json_object_get(json_array_get(json_object_get(oo, "issue"), 1), "diagnostics"));
    assert_non_null(d);
    json_decref(oo);
    th_fhir_issues_destroy(is);
}

static void test_add_oom(void **state)
{
    (void)state;
    th_fhir_issues *is;
    assert_int_equal(th_fhir_issues_create(&is), TH_OK);
    for (long n = 0; n < 2; n++) {
        th__fault_fail_after(n);
        int rc = th_fhir_issues_add(is, TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_VALUE, "a", "b", "c");
        th__fault_fail_after(-1);
        assert_int_equal(rc, TH_ENOMEM);
        assert_int_equal(th_fhir_issues_count(is), 0);
        assert_int_equal(th_fhir_issues_errors(is), 0);
    }
    assert_int_equal(th_fhir_issues_add(is, TH_FHIR_SEV_ERROR, TH_FHIR_ISSUE_VALUE, "a", "b", "c"),
                     TH_OK);
    assert_int_equal(th_fhir_issues_count(is), 1);
    th_fhir_issues_destroy(is);

    th__fault_fail_after(0);
    is = NULL;
    assert_int_equal(th_fhir_issues_create(&is), TH_ENOMEM);
    th__fault_fail_after(-1);
    assert_null(is);
    assert_int_equal(th_fhir_issues_create(NULL), TH_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_issues_and_outcome),
        cmocka_unit_test(test_single_and_parse_error),
        cmocka_unit_test(test_cap_and_utf8),
        cmocka_unit_test(test_add_oom),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
