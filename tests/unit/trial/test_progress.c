/* The progress cache on a real SQLite file: counts from notes and from rebuilds agree and never
 * double count, a restart reads the same numbers, ETags change with content, site scope, and a
 * stress run where eight readers check that every document they copy is internally consistent
 * (totals equal the sum of their parts) while the updater runs flat out. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unit/core/test_util.h"
#include "trialhub/progress.h"
#include "trialhub/roster.h"
#include "trialhub/store.h"
#include "trialhub/writer.h"

#define PHQ9 "http://loinc.org/q/44249-1"
#define GAD7 "http://loinc.org/q/69737-5"

typedef struct fixture {
    char dir[64];
    char url[128];
    th_store *store;
    th_writer *writer;
    th_roster *roster;
    th_progress *progress;
} fixture;

static int seed_apply(th_store *store, void *arg)
{
    (void)arg;
    th_trial t1 = {"T1", "Trial one", "[\"A\",\"B\"]", "[0,2,4]"};
    th_trial t2 = {"T2", "Trial two", "[\"X\"]", "[0]"};
    int rc = th_store_trial_insert(store, &t1);
    rc = rc ? rc : th_store_trial_insert(store, &t2);
    static const char *const sites[] = {"S1", "S2", "S3"};
    for (int i = 0; rc == 0 && i < 3; i++) {
        th_site s = {"T1", sites[i], sites[i], NULL, NULL};
        rc = th_store_site_insert(store, &s);
    }
    th_site s9 = {"T2", "S9", "Site nine", NULL, NULL};
    rc = rc ? rc : th_store_site_insert(store, &s9);
    for (int i = 0; rc == 0 && i < 30; i++) {
        char id[16];
        snprintf(id, sizeof(id), "P%02d", i);
        /* enrolled long ago: every scheduled visit is due */
        th_patient p = {"T1", id, sites[i % 3], i % 2 ? "A" : "B", "2020-01-01"};
        rc = th_store_patient_insert(store, &p);
    }
    th_patient q = {"T2", "Q1", "S9", "X", "2020-01-01"};
    return rc ? rc : th_store_patient_insert(store, &q);
}

static fixture *open_fixture(const char *dir, unsigned publish_ms, size_t queue)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "%s", dir);
    snprintf(f->url, sizeof(f->url), "sqlite://%s/progress.db", f->dir);
    char err[256];
    assert_int_equal(th_store_open(f->url, &f->store, err, sizeof(err)), 0);
    th_writer_config wc = {1024, 256, 0};
    assert_int_equal(th_writer_create(f->store, &wc, NULL, &f->writer), 0);
    assert_int_equal(th_roster_create(f->store, &f->roster), 0);
    th_progress_config pc = {.store = f->store,
                             .roster = f->roster,
                             .publish_interval_ms = publish_ms,
                             .queue_capacity = queue};
    assert_int_equal(th_progress_create(&pc, &f->progress), 0);
    return f;
}

static fixture *new_fixture(unsigned publish_ms, size_t queue)
{
    char tmpl[] = "/tmp/th-progress-XXXXXX";
    assert_non_null(mkdtemp(tmpl));
    char url[128];
    snprintf(url, sizeof(url), "sqlite://%s/progress.db", tmpl);
    char err[256];
    th_store *store;
    assert_int_equal(th_store_open(url, &store, err, sizeof(err)), 0);
    th_writer_config wc = {64, 64, 0};
    th_writer *w;
    assert_int_equal(th_writer_create(store, &wc, NULL, &w), 0);
    assert_int_equal(th_writer_run(th_ctx_background(), w, seed_apply, NULL), 0);
    th_writer_destroy(w);
    th_store_close(store);
    return open_fixture(tmpl, publish_ms, queue);
}

static void close_fixture(fixture *f, bool remove_files)
{
    th_writer_destroy(f->writer); /* first: its completions note progress */
    th_progress_destroy(f->progress);
    th_roster_destroy(f->roster);
    th_store_close(f->store);
    if (remove_files) {
        char path[160];
        static const char *const suffix[] = {"", "-wal", "-shm"};
        for (int i = 0; i < 3; i++) {
            snprintf(path, sizeof(path), "%s/progress.db%s", f->dir, suffix[i]);
            unlink(path);
        }
        rmdir(f->dir);
    }
    free(f);
}

/* A response stored through the writer, then noted, as the API does. */
typedef struct submit_job {
    th_qr_row row;
    char ident[32];
} submit_job;

static int submit_apply(th_store *store, void *arg)
{
    return th_store_qr_insert(store, &((submit_job *)arg)->row);
}

static int64_t submit(fixture *f, const char *patient, const char *site, const char *instrument,
                      int week, bool note)
{
    static int counter;
    submit_job j;
    memset(&j, 0, sizeof(j));
    snprintf(j.ident, sizeof(j.ident), "id-%d", ++counter);
    j.row = (th_qr_row){.trial_id = "T1",
                        .site_id = site,
                        .patient_id = patient,
                        .questionnaire = instrument,
                        .instrument = instrument,
                        .identifier_system = "urn:test",
                        .identifier_value = j.ident,
                        .status = "completed",
                        .authored = "2026-01-01T00:00:00Z",
                        .authored_s = 1767225600,
                        .visit_week = week,
                        .body = "{}",
                        .body_len = 2,
                        .received_ms = (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS)};
    assert_int_equal(th_writer_run(th_ctx_background(), f->writer, submit_apply, &j), 0);
    if (note) {
        th_progress_note n = {.qr_id = j.row.id,
                              .trial_id = "T1",
                              .site_id = site,
                              .patient_id = patient,
                              .instrument = instrument,
                              .visit_week = week};
        th_progress_note_submission(f->progress, &n);
    }
    return j.row.id;
}

typedef struct score_job {
    th_qr_score score;
} score_job;

static int score_apply(th_store *store, void *arg)
{
    return th_store_qr_set_score(store, &((score_job *)arg)->score, 1);
}

static void score(fixture *f, int64_t id, const char *patient, const char *site, int week,
                  double value, bool alert, bool note)
{
    score_job j = {.score = {.id = id, .has_score = true, .score = value, .alert = alert}};
    assert_int_equal(th_writer_run(th_ctx_background(), f->writer, score_apply, &j), 0);
    assert_true(j.score.seq > 0);
    if (note) {
        th_progress_note n = {.qr_id = id,
                              .score_seq = j.score.seq,
                              .trial_id = "T1",
                              .site_id = site,
                              .patient_id = patient,
                              .instrument = PHQ9,
                              .visit_week = week,
                              .has_score = true,
                              .score = value,
                              .alert = alert};
        th_progress_note_score(f->progress, &n);
    }
}

static json_t *read_doc(fixture *f, const char *trial, const char *site, char etag[40])
{
    th_buf b;
    th_buf_init(&b, 0);
    bool nm;
    char tag[40];
    int rc = th_progress_read(f->progress, trial, site, NULL, &b, etag ? etag : tag, &nm);
    if (rc != 0) {
        th_buf_free(&b);
        return NULL;
    }
    json_error_t err;
    json_t *doc = json_loadb(b.data, b.len, 0, &err);
    th_buf_free(&b);
    assert_non_null(doc);
    return doc;
}

static json_int_t get_int(json_t *doc, const char *a, const char *b)
{
    json_t *v = json_object_get(json_object_get(doc, a), b);
    assert_true(json_is_integer(v));
    return json_integer_value(v);
}

/* Totals equal the sum of their parts. Returns false (without asserting: readers call it from
 * other threads) when the document is inconsistent. */
static bool consistent(json_t *doc)
{
    json_t *sites = json_object_get(doc, "sites");
    json_int_t enrolled = 0, total = 0, today = 0, expected = 0, received = 0, alerts = 0;
    size_t i;
    json_t *s;
    json_array_foreach(sites, i, s)
    {
        enrolled += json_integer_value(json_object_get(json_object_get(s, "enrolled"), "total"));
        total += json_integer_value(json_object_get(json_object_get(s, "questionnaires"), "total"));
        today += json_integer_value(json_object_get(json_object_get(s, "questionnaires"), "today"));
        expected += json_integer_value(json_object_get(json_object_get(s, "visits"), "expected"));
        received += json_integer_value(json_object_get(json_object_get(s, "visits"), "received"));
        alerts += json_integer_value(json_object_get(json_object_get(s, "alerts"), "open"));
    }
    json_int_t by_instr = 0, by_arm = 0;
    json_t *v;
    json_array_foreach(json_object_get(json_object_get(doc, "questionnaires"), "by_instrument"), i,
                       v)
    {
        by_instr += json_integer_value(json_object_get(v, "total"));
    }
    const char *arm;
    json_object_foreach(json_object_get(json_object_get(doc, "enrolled"), "by_arm"), arm, v)
    {
        by_arm += json_integer_value(v);
    }
    json_t *q = json_object_get(doc, "questionnaires");
    return enrolled ==
               json_integer_value(json_object_get(json_object_get(doc, "enrolled"), "total")) &&
           by_arm == enrolled && total == json_integer_value(json_object_get(q, "total")) &&
           by_instr == total && today == json_integer_value(json_object_get(q, "today")) &&
           expected ==
               json_integer_value(json_object_get(json_object_get(doc, "visits"), "expected")) &&
           received ==
               json_integer_value(json_object_get(json_object_get(doc, "visits"), "received")) &&
           alerts == json_integer_value(json_object_get(json_object_get(doc, "alerts"), "open"));
}

static void test_counts_from_notes(void **state)
{
    (void)state;
    fixture *f = new_fixture(20, 0);
    json_t *doc = read_doc(f, "T1", NULL, NULL);
    assert_int_equal(get_int(doc, "enrolled", "total"), 30);
    assert_int_equal(get_int(doc, "questionnaires", "total"), 0);
    assert_int_equal(get_int(doc, "visits", "expected"), 90); /* 30 patients x 3 weeks due */
    assert_true(consistent(doc));
    json_decref(doc);

    int64_t a = submit(f, "P00", "S1", PHQ9, 0, true);
    submit(f, "P00", "S1", GAD7, 0, true); /* same visit: still one visit received */
    submit(f, "P01", "S2", PHQ9, 2, true);
    submit(f, "P01", "S2", PHQ9, 7, true); /* an unscheduled week: counted, not a visit */
    score(f, a, "P00", "S1", 0, 21, true, true);
    assert_int_equal(th_progress_sync(f->progress, 5000), 0);

    doc = read_doc(f, "T1", NULL, NULL);
    assert_true(consistent(doc));
    assert_int_equal(get_int(doc, "questionnaires", "total"), 4);
    assert_int_equal(get_int(doc, "questionnaires", "today"), 4);
    assert_int_equal(get_int(doc, "visits", "received"), 2);
    assert_int_equal(get_int(doc, "alerts", "open"), 1);
    json_t *scores = json_object_get(doc, "scores");
    assert_int_equal(json_array_size(scores), 1);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(scores, 0), "week")), 0);
    assert_true(json_real_value(json_object_get(json_array_get(scores, 0), "mean")) == 21.0 ||
                json_integer_value(json_object_get(json_array_get(scores, 0), "mean")) == 21);
    json_decref(doc);

    /* Site scope: S2's rows only, and its totals are its own. */
    doc = read_doc(f, "T1", "S2", NULL);
    assert_string_equal(json_string_value(json_object_get(doc, "scope")), "site");
    assert_int_equal(json_array_size(json_object_get(doc, "sites")), 1);
    assert_int_equal(get_int(doc, "questionnaires", "total"), 2);
    assert_int_equal(get_int(doc, "alerts", "open"), 0);
    assert_true(consistent(doc));
    json_decref(doc);

    /* Unknown trial and unknown site. */
    th_buf b;
    th_buf_init(&b, 0);
    char tag[40];
    bool nm;
    assert_int_equal(th_progress_read(f->progress, "NOPE", NULL, NULL, &b, tag, &nm), TH_ENOTFOUND);
    assert_int_equal(th_progress_read(f->progress, "T1", "S9", NULL, &b, tag, &nm), TH_ENOTFOUND);
    th_buf_free(&b);
    close_fixture(f, true);
}

static void test_etag_and_not_modified(void **state)
{
    (void)state;
    fixture *f = new_fixture(20, 0);
    char tag1[40], tag2[40], tag3[40];
    json_decref(read_doc(f, "T1", NULL, tag1));
    th_buf b;
    th_buf_init(&b, 0);
    bool nm = false;
    assert_int_equal(th_progress_read(f->progress, "T1", NULL, tag1, &b, tag2, &nm), 0);
    assert_true(nm);
    assert_int_equal(b.len, 0);
    assert_string_equal(tag1, tag2);
    /* Another trial's change leaves T1's document and tag alone. */
    json_decref(read_doc(f, "T2", NULL, tag3));
    submit(f, "P03", "S1", PHQ9, 0, true);
    assert_int_equal(th_progress_sync(f->progress, 5000), 0);
    assert_int_equal(th_progress_read(f->progress, "T1", NULL, tag1, &b, tag2, &nm), 0);
    assert_false(nm);
    assert_string_not_equal(tag1, tag2);
    char tag4[40];
    json_decref(read_doc(f, "T2", NULL, tag4));
    assert_string_equal(tag3, tag4);
    th_buf_free(&b);
    close_fixture(f, true);
}

/* Rows committed but never noted (a lost note), rows noted after a rebuild counted them, and a
 * restart: the counts converge and nothing is counted twice. */
static void test_rebuild_never_double_counts(void **state)
{
    (void)state;
    fixture *f = new_fixture(20, 0);
    int64_t a = submit(f, "P00", "S1", PHQ9, 0, false); /* the note was lost */
    int64_t b = submit(f, "P01", "S2", PHQ9, 2, false);
    score(f, a, "P00", "S1", 0, 10, true, false);
    th_progress_note_roster(f->progress); /* asks for a rebuild (within a second) */
    th_progress_stats st;
    for (int i = 0; i < 300; i++) {
        th_progress_get_stats(f->progress, &st);
        if (st.rebuilds >= 2) { /* one at create, one asked for */
            break;
        }
        sleep_ms(10);
    }
    th_progress_get_stats(f->progress, &st);
    assert_true(st.rebuilds >= 2);
    /* Now the late notes of what the rebuild counted arrive: they must be ignored. */
    th_progress_note n = {.qr_id = a,
                          .trial_id = "T1",
                          .site_id = "S1",
                          .patient_id = "P00",
                          .instrument = PHQ9,
                          .visit_week = 0};
    th_progress_note_submission(f->progress, &n);
    n.qr_id = b;
    n.patient_id = "P01";
    th_progress_note_submission(f->progress, &n);
    score(f, b, "P01", "S2", 2, 5, false, true); /* new: after the rebuild */
    assert_int_equal(th_progress_sync(f->progress, 5000), 0);
    json_t *doc = read_doc(f, "T1", NULL, NULL);
    assert_true(consistent(doc));
    assert_int_equal(get_int(doc, "questionnaires", "total"), 2);
    assert_int_equal(get_int(doc, "alerts", "open"), 1);
    assert_int_equal(json_array_size(json_object_get(doc, "scores")), 2);
    char *before = json_dumps(json_object_get(doc, "sites"), JSON_SORT_KEYS);
    json_decref(doc);

    /* Restart: the first read is already right. */
    char dir[64];
    snprintf(dir, sizeof(dir), "%s", f->dir);
    close_fixture(f, false);
    f = open_fixture(dir, 20, 0);
    doc = read_doc(f, "T1", NULL, NULL);
    char *after = json_dumps(json_object_get(doc, "sites"), JSON_SORT_KEYS);
    assert_string_equal(before, after);
    free(before);
    free(after);
    json_decref(doc);
    close_fixture(f, true);
}

/* ---- stress: readers never see a torn document ------------------------------------------ */

typedef struct stress {
    fixture *f;
    atomic_bool stop;
    atomic_long reads;
    atomic_long inconsistent;
} stress;

static void *reader_main(void *arg)
{
    stress *s = arg;
    while (!atomic_load(&s->stop)) {
        th_buf b;
        th_buf_init(&b, 0);
        char tag[40];
        bool nm;
        const char *site = (atomic_load(&s->reads) & 3) == 3 ? "S2" : NULL;
        T_CHECK(th_progress_read(s->f->progress, "T1", site, NULL, &b, tag, &nm) == 0);
        json_t *doc = json_loadb(b.data, b.len, 0, NULL);
        T_CHECK(doc != NULL);
        if (doc && !consistent(doc)) {
            atomic_fetch_add(&s->inconsistent, 1);
        }
        json_decref(doc);
        th_buf_free(&b);
        atomic_fetch_add(&s->reads, 1);
    }
    return NULL;
}

static void test_stress_readers_consistent(void **state)
{
    (void)state;
    /* Publish as often as possible, and a queue big enough that no note is dropped (a drop
     * would trigger a rebuild from the store, which does not have these synthetic rows). */
    fixture *f = new_fixture(1, 1 << 20);
    stress s = {.f = f};
    pthread_t readers[8];
    for (int i = 0; i < 8; i++) {
        readers[i] = spawn(reader_main, &s);
    }
    const long n = SCALED(200000);
    static const char *const sites[] = {"S1", "S2", "S3"};
    for (long i = 0; i < n; i++) {
        char patient[8];
        snprintf(patient, sizeof(patient), "P%02ld", i % 30);
        th_progress_note note = {.qr_id = 1000000 + i,
                                 .score_seq = 1000000 + i,
                                 .trial_id = "T1",
                                 .site_id = sites[(i % 30) % 3],
                                 .patient_id = patient,
                                 .instrument = i % 2 ? PHQ9 : GAD7,
                                 .visit_week =
                                     (int)((i / 30) % 5) * 2, /* 0,2,4 scheduled; 6,8 not */
                                 .has_score = true,
                                 .score = (double)(i % 27),
                                 .alert = i % 1000 == 0};
        th_progress_note_submission(f->progress, &note);
        th_progress_note_score(f->progress, &note);
    }
    assert_int_equal(th_progress_sync(f->progress, 60000), 0);
    sleep_ms(50);
    atomic_store(&s.stop, true);
    for (int i = 0; i < 8; i++) {
        join(readers[i]);
    }
    th_progress_stats st;
    th_progress_get_stats(f->progress, &st);
    assert_int_equal(st.dropped, 0);
    assert_true(st.versions > 2);
    json_t *doc = read_doc(f, "T1", NULL, NULL);
    assert_true(consistent(doc));
    assert_int_equal(get_int(doc, "questionnaires", "total"), n);
    assert_int_equal(get_int(doc, "alerts", "open"), (n + 999) / 1000);
    assert_int_equal(get_int(doc, "visits", "received"), 90);
    json_decref(doc);
    fprintf(stderr, "stress: %ld notes x2, %ld reads, %llu versions\n", n, atomic_load(&s.reads),
            (unsigned long long)st.versions);
    assert_true(atomic_load(&s.reads) > 8);
    assert_int_equal(atomic_load(&s.inconsistent), 0);
    close_fixture(f, true);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_counts_from_notes, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_etag_and_not_modified, setup_reset, teardown_check),
        cmocka_unit_test_setup_teardown(test_rebuild_never_double_counts, setup_reset,
                                        teardown_check),
        cmocka_unit_test_setup_teardown(test_stress_readers_consistent, setup_reset,
                                        teardown_check),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
