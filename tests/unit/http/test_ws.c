/* The WebSocket hub's pure parts and life cycle: the topic policy and the event scope for every
 * role, the connection slots, and create/stop/destroy under allocation and thread-creation
 * failure with events flowing (no socket needed). The wire is tested end to end by
 * tests/integration/test_events.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "http/ws_int.h"
#include "trialhub/alloc.h"

static th_key key_of(th_role role, const char *trial, const char *site)
{
    th_key k;
    memset(&k, 0, sizeof(k));
    k.role = role;
    snprintf(k.id, sizeof(k.id), "key_test");
    snprintf(k.trial_id, sizeof(k.trial_id), "%s", trial ? trial : "");
    snprintf(k.site_id, sizeof(k.site_id), "%s", site ? site : "");
    return k;
}

static void test_topic_policy(void **state)
{
    (void)state;
    th_key admin = key_of(TH_ROLE_ADMIN, NULL, NULL);
    th_key inv = key_of(TH_ROLE_INVESTIGATOR, "T1", NULL);
    th_key site = key_of(TH_ROLE_SITE, "T1", "S1");
    th_key patient = key_of(TH_ROLE_PATIENT, "T1", NULL);
    static const struct {
        const char *topic;
        bool admin, inv, site, patient;
    } cases[] = {
        {"trial:T1", true, true, true, false},  {"trial:T2", true, false, false, false},
        {"alerts", true, true, true, false},    {"tasks", true, true, false, false},
        {"system", true, true, false, false},   {"weather", false, false, false, false},
        {"trial:", false, false, false, false}, {"trial:T 1", false, false, false, false},
        {"Alerts", false, false, false, false}, {"trial:T1.x-y_z", true, false, false, false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(th__ws_topic_refusal(&admin, cases[i].topic) == NULL, cases[i].admin);
        assert_int_equal(th__ws_topic_refusal(&inv, cases[i].topic) == NULL, cases[i].inv);
        assert_int_equal(th__ws_topic_refusal(&site, cases[i].topic) == NULL, cases[i].site);
        assert_int_equal(th__ws_topic_refusal(&patient, cases[i].topic) == NULL, cases[i].patient);
    }
    assert_string_equal(th__ws_topic_refusal(&inv, "weather"), "unknown topic");
    assert_string_equal(th__ws_topic_refusal(&inv, "trial:T2"), "not allowed for this key");
    char long_trial[TH_ID_MAX + 16];
    memset(long_trial, 'a', sizeof(long_trial));
    memcpy(long_trial, "trial:", 6);
    long_trial[6 + TH_ID_MAX + 1] = '\0'; /* one character over the id limit */
    assert_string_equal(th__ws_topic_refusal(&admin, long_trial), "unknown topic");
}

static th_event *event_of(const char *trial, const char *site)
{
    th_event *ev = th_calloc(1, sizeof(*ev) + 3);
    assert_non_null(ev);
    atomic_init(&ev->refs, 1);
    snprintf(ev->topic, sizeof(ev->topic), "alerts");
    snprintf(ev->trial_id, sizeof(ev->trial_id), "%s", trial);
    snprintf(ev->site_id, sizeof(ev->site_id), "%s", site);
    memcpy(ev->json, "{}", 3);
    ev->len = 2;
    return ev;
}

static void test_event_scope(void **state)
{
    (void)state;
    th_key admin = key_of(TH_ROLE_ADMIN, NULL, NULL);
    th_key inv = key_of(TH_ROLE_INVESTIGATOR, "T1", NULL);
    th_key site = key_of(TH_ROLE_SITE, "T1", "S1");
    th_key patient = key_of(TH_ROLE_PATIENT, "T1", NULL);
    static const struct {
        const char *trial, *site;
        bool admin, inv, site_key;
    } cases[] = {
        {"", "", true, true, true},     {"T1", "", true, true, true},
        {"T1", "S1", true, true, true}, {"T1", "S2", true, true, false},
        {"T2", "", true, false, false}, {"T2", "S1", true, false, false},
        {"", "S2", true, true, false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        th_event *ev = event_of(cases[i].trial, cases[i].site);
        assert_int_equal(th__ws_event_visible(&admin, ev), cases[i].admin);
        assert_int_equal(th__ws_event_visible(&inv, ev), cases[i].inv);
        assert_int_equal(th__ws_event_visible(&site, ev), cases[i].site_key);
        assert_false(th__ws_event_visible(&patient, ev));
        th_event_unref(ev);
    }
}

static void test_slots(void **state)
{
    (void)state;
    th_server_config cfg = {.ws_max_connections = 2};
    th__ws_hub *hub = NULL;
    assert_int_equal(th__ws_hub_create(&cfg, &hub), 0);
    assert_int_equal(th__ws_hub_reserve(hub), 0);
    assert_int_equal(th__ws_hub_reserve(hub), 0);
    assert_int_equal(th__ws_hub_reserve(hub), TH_EOVERLOAD);
    th__ws_hub_release(hub);
    assert_int_equal(th__ws_hub_reserve(hub), 0);
    th__ws_hub_release(hub);
    th__ws_hub_release(hub);
    th__ws_hub_stop(hub);
    assert_int_equal(th__ws_hub_reserve(hub), TH_ESHUTDOWN);
    th__ws_hub_stop(hub); /* idempotent */
    th__ws_hub_destroy(hub);
    th__ws_hub_stop(NULL);
    th__ws_hub_destroy(NULL);
}

/* Fails the Nth allocation (or thread start) for increasing N until create succeeds: every
 * failure is clean (ASan finds leaks), and a hub that did start takes events until stopped. */
static void test_create_under_failure(void **state)
{
    (void)state;
    bool created = false;
    for (long n = 0; n < 200 && !created; n++) {
        th_metrics *metrics = NULL;
        th_events *events = NULL;
        assert_int_equal(th_metrics_create(&metrics), 0);
        assert_int_equal(th_events_create(metrics, &events), 0);
        th_server_config cfg = {.metrics = metrics, .events = events};
        th__ws_hub *hub = (th__ws_hub *)1;
        th__fault_fail_after(n);
        int rc = th__ws_hub_create(&cfg, &hub);
        bool fired = th__fault_fired();
        th__fault_fail_after(-1);
        if (rc == 0) {
            created = true;
            assert_true(th_events_active(events));
            for (int i = 0; i < 1000; i++) {
                th_events_publish(events, "trial:T1", "test.event", "T1", "S1", "\"n\":1");
            }
            th__ws_hub_stop(hub);
            assert_false(th_events_active(events)); /* the sink is gone */
            th_events_publish(events, "trial:T1", "test.event", "T1", "S1", NULL);
            th__ws_hub_destroy(hub);
        } else {
            assert_true(fired);
            assert_true(rc == TH_ENOMEM || rc == TH_ESYS);
            assert_ptr_equal(hub, (th__ws_hub *)1);
            assert_false(th_events_active(events));
        }
        th_events_destroy(events);
        th_metrics_destroy(metrics);
    }
    assert_true(created);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_topic_policy),
        cmocka_unit_test(test_event_scope),
        cmocka_unit_test(test_slots),
        cmocka_unit_test(test_create_under_failure),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
