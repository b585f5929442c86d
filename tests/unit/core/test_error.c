/* Tests the error enum and its strings (include/trialhub/error.h): the ABI values are pinned,
 * every code has its own name and message, and unknown codes map to "TH_UNKNOWN" /
 * "unknown error". */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <string.h>

#include "trialhub/error.h"

typedef struct err_entry {
    int code;
    const char *name;
    const char *msg;
} err_entry;

#define ENTRY(name, value, msg) {TH_##name, "TH_" #name, msg},
static const err_entry entries[] = {TH_ERRNO_MAP(ENTRY)};
#undef ENTRY

#define N_ENTRIES (sizeof(entries) / sizeof(entries[0]))

static void test_ok_is_zero_with_its_own_strings(void **state)
{
    (void)state;
    assert_int_equal(TH_OK, 0);
    assert_string_equal(th_errname(TH_OK), "TH_OK");
    assert_string_equal(th_strerror(TH_OK), "success");
    assert_string_equal(th_errname(0), "TH_OK");
}

/* The values are part of the ABI and of logs: a renumbering must fail here. */
static void test_abi_values_are_pinned(void **state)
{
    (void)state;
    assert_int_equal(TH_ENOMEM, -1);
    assert_int_equal(TH_EINVAL, -2);
    assert_int_equal(TH_EOVERLOAD, -3);
    assert_int_equal(TH_ECANCELED, -4);
    assert_int_equal(TH_ETIMEDOUT, -5);
    assert_int_equal(TH_ECLOSED, -6);
    assert_int_equal(TH_ESHUTDOWN, -7);
    assert_int_equal(TH_EAGAIN, -8);
    assert_int_equal(TH_ESYS, -9);
    assert_int_equal(TH_EIO, -10);
    assert_int_equal(TH_ENOTFOUND, -11);
    assert_int_equal(TH_EEXIST, -12);
    assert_int_equal(TH_ECONFLICT, -13);
    assert_int_equal(TH_ETOOBIG, -14);
    assert_int_equal(TH_EPARSE, -15);
    assert_int_equal(TH_EUNSUPPORTED, -16);
    assert_int_equal(TH_EPERM, -17);
    assert_true(N_ENTRIES >= 17);
}

static void test_spot_check_names_and_messages(void **state)
{
    (void)state;
    assert_string_equal(th_errname(TH_ENOMEM), "TH_ENOMEM");
    assert_string_equal(th_strerror(TH_ENOMEM), "out of memory");
    assert_string_equal(th_errname(TH_EOVERLOAD), "TH_EOVERLOAD");
    assert_string_equal(th_strerror(TH_EOVERLOAD), "overloaded: queue full");
    assert_string_equal(th_errname(TH_ECANCELED), "TH_ECANCELED");
    assert_string_equal(th_strerror(TH_ECANCELED), "operation canceled");
    assert_string_equal(th_errname(TH_ETIMEDOUT), "TH_ETIMEDOUT");
    assert_string_equal(th_strerror(TH_ETIMEDOUT), "deadline exceeded");
    assert_string_equal(th_errname(TH_ECLOSED), "TH_ECLOSED");
    assert_string_equal(th_errname(TH_EPERM), "TH_EPERM");
    assert_string_equal(th_strerror(TH_EPERM), "permission denied");
}

static void test_every_code_maps_to_its_name_and_message(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_ENTRIES; i++) {
        assert_true(entries[i].code < 0);
        assert_string_equal(th_errname(entries[i].code), entries[i].name);
        assert_string_equal(th_strerror(entries[i].code), entries[i].msg);
        assert_string_not_equal(th_errname(entries[i].code), "TH_UNKNOWN");
        assert_string_not_equal(th_strerror(entries[i].code), "unknown error");
        assert_string_not_equal(th_errname(entries[i].code), "TH_OK");
        assert_string_not_equal(th_strerror(entries[i].code), "success");
        assert_true(strlen(th_strerror(entries[i].code)) > 0);
    }
}

/* Pairwise over every code, TH_OK and an unknown code: no two share a value, name or message. */
static void test_codes_names_and_messages_are_distinct(void **state)
{
    (void)state;
    int codes[N_ENTRIES + 2];
    for (size_t i = 0; i < N_ENTRIES; i++) {
        codes[i] = entries[i].code;
    }
    codes[N_ENTRIES] = TH_OK;
    codes[N_ENTRIES + 1] = 12345; /* unknown */
    size_t n = N_ENTRIES + 2;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = i + 1; j < n; j++) {
            assert_int_not_equal(codes[i], codes[j]);
            assert_string_not_equal(th_errname(codes[i]), th_errname(codes[j]));
            assert_string_not_equal(th_strerror(codes[i]), th_strerror(codes[j]));
        }
    }
}

/* Values are append-only from -1 down, so they must be exactly -1..-N with no gap. */
static void test_codes_are_contiguous(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_ENTRIES; i++) {
        assert_int_equal(entries[i].code, -(int)(i + 1));
    }
}

static void test_unknown_codes(void **state)
{
    (void)state;
    const int unknown[] = {1, 2, 100, INT_MAX, INT_MIN, -(int)N_ENTRIES - 1, -1000};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
        assert_string_equal(th_errname(unknown[i]), "TH_UNKNOWN");
        assert_string_equal(th_strerror(unknown[i]), "unknown error");
    }
}

/* The strings are static: the same pointer every time, usable after any other call. */
static void test_strings_are_static(void **state)
{
    (void)state;
    const char *name = th_errname(TH_EIO);
    const char *msg = th_strerror(TH_EIO);
    (void)th_errname(TH_EPARSE);
    (void)th_strerror(TH_EPARSE);
    assert_ptr_equal(th_errname(TH_EIO), name);
    assert_ptr_equal(th_strerror(TH_EIO), msg);
    assert_string_equal(name, "TH_EIO");
    assert_string_equal(msg, "input/output error");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ok_is_zero_with_its_own_strings),
        cmocka_unit_test(test_abi_values_are_pinned),
        cmocka_unit_test(test_spot_check_names_and_messages),
        cmocka_unit_test(test_every_code_maps_to_its_name_and_message),
        cmocka_unit_test(test_codes_names_and_messages_are_distinct),
        cmocka_unit_test(test_codes_are_contiguous),
        cmocka_unit_test(test_unknown_codes),
        cmocka_unit_test(test_strings_are_static),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
