/* The trial progress cache: one updater thread owns a mutable model of every trial's counts and
 * publishes immutable, pre-rendered JSON documents that request threads copy out without a lock.
 *
 * Ownership and locking: the model (struct model and everything under it) is touched only by the
 * updater thread. Notes come in through `inbox` (a bounded th_chan; senders never wait). The
 * published versions (struct pview) are immutable; readers reach them through th_snapshot
 * (hazard pointers: no lock), or, in the -DTH_PROGRESS_RWLOCK=ON benchmark build, through a
 * pthread_rwlock_t, to measure what the lock costs. `sync_mu` protects `published_upto` for
 * th_progress_sync() and nothing else. Documents of trials that did not change are shared
 * between versions by reference count.
 *
 * Exactly-once counting across rebuilds: a rebuild reads the store's aggregates together with
 * the largest response id and score sequence they include (one read transaction). Notes at or
 * below those watermarks are already counted and are skipped; notes above are applied. */
#include "trialhub/progress.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "core/core_int.h"
#include "trialhub/alloc.h"
#include "trialhub/chan.h"
#include "trialhub/clock.h"
#include "trialhub/ctx.h"
#include "trialhub/log.h"
#include "trialhub/snapshot.h"

#define MAX_ARMS        16 /* the admin API allows 16 */
#define MAX_WEEKS       32 /* and 32 scheduled visits */
#define MAX_INSTRUMENTS 32 /* per trial; further ones are counted under the last slot */
#define MS_PER_DAY      INT64_C(86400000)

/* ---- published versions ------------------------------------------------------------------ */

typedef struct pdoc {
    char etag[40];
    size_t len;
    char *json;
} pdoc;

/* One trial's documents: the whole trial, and one per site (site keys). Shared by versions. */
typedef struct tdoc {
    atomic_uint refs;
    char *id;
    pdoc all;
    size_t nsites;
    char **site_ids; /* sorted, like sites */
    pdoc *sites;
} tdoc;

typedef struct pview {
    size_t ntrials;
    tdoc **trials; /* sorted by id */
} pview;

static void tdoc_unref(tdoc *d)
{
    if (d == NULL || atomic_fetch_sub_explicit(&d->refs, 1, memory_order_acq_rel) != 1) {
        return;
    }
    for (size_t i = 0; i < d->nsites; i++) {
        th_free(d->site_ids ? d->site_ids[i] : NULL);
        th_free(d->sites ? d->sites[i].json : NULL);
    }
    th_free(d->site_ids);
    th_free(d->sites);
    th_free(d->all.json);
    th_free(d->id);
    th_free(d);
}

static void pview_free(void *arg)
{
    pview *v = arg;
    if (v == NULL) {
        return;
    }
    for (size_t i = 0; i < v->ntrials; i++) {
        tdoc_unref(v->trials[i]);
    }
    th_free(v->trials);
    th_free(v);
}

/* ---- the model (updater thread only) ----------------------------------------------------- */

typedef struct mcell {
    unsigned instrument;
    int week;
    int64_t n;
    double sum;
} mcell;

typedef struct msite {
    char *id;
    char *name;
    int64_t enrolled;
    int64_t enrolled_by_arm[MAX_ARMS];
    int64_t total, today;
    int64_t instr_total[MAX_INSTRUMENTS];
    int64_t instr_today[MAX_INSTRUMENTS];
    int64_t visits_expected, visits_received;
    int64_t alerts_open;
    mcell *cells;
    size_t ncells, cells_cap;
} msite;

typedef struct mtrial {
    char *id;
    char *name;
    char *arms[MAX_ARMS];
    unsigned narms;
    int weeks[MAX_WEEKS];
    unsigned nweeks;
    char *instruments[MAX_INSTRUMENTS];
    unsigned ninstruments;
    msite *sites; /* sorted by id */
    size_t nsites, sites_cap;
    bool dirty;
} mtrial;

typedef struct mpatient {
    char *id;
    unsigned trial;
    unsigned site;
    int64_t enrolled_day; /* days since the epoch */
    uint32_t visits;      /* bit i: a response for the trial's i-th scheduled week */
} mpatient;

typedef struct model {
    mtrial *trials; /* sorted by id */
    size_t ntrials, trials_cap;
    mpatient *patients;
    size_t npatients, patients_cap;
    uint32_t *slots; /* open addressing: patient index + 1, 0 = empty */
    size_t nslots;
    int64_t day;
    int64_t max_qr_id, max_score_seq; /* what the rebuild counted */
    bool incomplete;                  /* a response of a patient the model did not know */
    bool failed;                      /* out of memory while building */
} model;

static char *dup_str(model *m, const char *s)
{
    size_t n = strlen(s);
    char *copy = th_malloc(n + 1);
    if (copy == NULL) {
        m->failed = true;
        return NULL;
    }
    memcpy(copy, s, n + 1);
    return copy;
}

static void model_free(model *m)
{
    if (m == NULL) {
        return;
    }
    for (size_t t = 0; t < m->ntrials; t++) {
        mtrial *tr = &m->trials[t];
        for (size_t s = 0; s < tr->nsites; s++) {
            th_free(tr->sites[s].id);
            th_free(tr->sites[s].name);
            th_free(tr->sites[s].cells);
        }
        th_free(tr->sites);
        for (unsigned a = 0; a < tr->narms; a++) {
            th_free(tr->arms[a]);
        }
        for (unsigned i = 0; i < tr->ninstruments; i++) {
            th_free(tr->instruments[i]);
        }
        th_free(tr->id);
        th_free(tr->name);
    }
    th_free(m->trials);
    for (size_t i = 0; i < m->npatients; i++) {
        th_free(m->patients[i].id);
    }
    th_free(m->patients);
    th_free(m->slots);
    th_free(m);
}

static bool grow(void **arr, size_t *cap, size_t len, size_t elem)
{
    if (len < *cap) {
        return true;
    }
    size_t ncap = *cap ? *cap * 2 : 16;
    void *grown = th_realloc_array(*arr, ncap, elem);
    if (grown == NULL) {
        return false;
    }
    *arr = grown;
    *cap = ncap;
    return true;
}

static mtrial *trial_find(model *m, const char *id, unsigned *index)
{
    size_t lo = 0, hi = m->ntrials;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(m->trials[mid].id, id);
        if (c == 0) {
            if (index) {
                *index = (unsigned)mid;
            }
            return &m->trials[mid];
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return NULL;
}

static msite *site_find(mtrial *t, const char *id, unsigned *index)
{
    size_t lo = 0, hi = t->nsites;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(t->sites[mid].id, id);
        if (c == 0) {
            if (index) {
                *index = (unsigned)mid;
            }
            return &t->sites[mid];
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return NULL;
}

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603u; /* FNV-1a */
    for (; *s; s++) {
        h = (h ^ (unsigned char)*s) * 1099511628211u;
    }
    return h;
}

static mpatient *patient_find(model *m, const char *id)
{
    if (m->nslots == 0) {
        return NULL;
    }
    size_t mask = m->nslots - 1;
    for (size_t i = (size_t)hash_str(id) & mask;; i = (i + 1) & mask) {
        uint32_t slot = m->slots[i];
        if (slot == 0) {
            return NULL;
        }
        if (strcmp(m->patients[slot - 1].id, id) == 0) {
            return &m->patients[slot - 1];
        }
    }
}

/* Builds the index once every patient is in (load factor <= 1/2). */
static bool index_patients(model *m)
{
    size_t n = 16;
    while (n < m->npatients * 2) {
        n *= 2;
    }
    m->slots = th_calloc(n, sizeof(uint32_t));
    if (m->slots == NULL) {
        return false;
    }
    m->nslots = n;
    for (size_t p = 0; p < m->npatients; p++) {
        size_t i = (size_t)hash_str(m->patients[p].id) & (n - 1);
        while (m->slots[i] != 0) {
            i = (i + 1) & (n - 1);
        }
        m->slots[i] = (uint32_t)(p + 1);
    }
    return true;
}

static int week_index(const mtrial *t, int week)
{
    for (unsigned i = 0; i < t->nweeks; i++) {
        if (t->weeks[i] == week) {
            return (int)i;
        }
    }
    return -1;
}

static unsigned instrument_index(model *m, mtrial *t, const char *url)
{
    for (unsigned i = 0; i < t->ninstruments; i++) {
        if (strcmp(t->instruments[i], url) == 0) {
            return i;
        }
    }
    if (t->ninstruments == MAX_INSTRUMENTS) {
        return MAX_INSTRUMENTS - 1;
    }
    char *copy = dup_str(m, url);
    if (copy == NULL) {
        return t->ninstruments ? t->ninstruments - 1 : 0;
    }
    t->instruments[t->ninstruments] = copy;
    return t->ninstruments++;
}

static mcell *cell_for(msite *s, unsigned instrument, int week)
{
    for (size_t i = 0; i < s->ncells; i++) {
        if (s->cells[i].instrument == instrument && s->cells[i].week == week) {
            return &s->cells[i];
        }
    }
    if (!grow((void **)&s->cells, &s->cells_cap, s->ncells, sizeof(mcell))) {
        return NULL;
    }
    s->cells[s->ncells] = (mcell){instrument, week, 0, 0.0};
    return &s->cells[s->ncells++];
}

static int64_t today_day(void)
{
    return (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS) / MS_PER_DAY;
}

/* Visits due by today: scheduled weeks whose day has come. */
static void count_expected(model *m)
{
    for (size_t t = 0; t < m->ntrials; t++) {
        for (size_t s = 0; s < m->trials[t].nsites; s++) {
            m->trials[t].sites[s].visits_expected = 0;
        }
    }
    for (size_t i = 0; i < m->npatients; i++) {
        mpatient *p = &m->patients[i];
        mtrial *t = &m->trials[p->trial];
        int64_t due = 0;
        for (unsigned w = 0; w < t->nweeks; w++) {
            due += p->enrolled_day + 7 * (int64_t)t->weeks[w] <= m->day;
        }
        t->sites[p->site].visits_expected += due;
    }
}

/* ---- loading a model from the store ----------------------------------------------------- */

static int load_trial(void *arg, const th_trial *tr)
{
    model *m = arg;
    if (!grow((void **)&m->trials, &m->trials_cap, m->ntrials, sizeof(mtrial))) {
        return TH_ENOMEM;
    }
    mtrial *t = &m->trials[m->ntrials++];
    memset(t, 0, sizeof(*t));
    t->id = dup_str(m, tr->id);
    t->name = dup_str(m, tr->name);
    json_t *arms = json_loads(tr->arms_json, 0, NULL);
    json_t *weeks = json_loads(tr->schedule_json, 0, NULL);
    size_t i;
    json_t *v;
    json_array_foreach(arms, i, v)
    {
        if (json_is_string(v) && t->narms < MAX_ARMS) {
            t->arms[t->narms++] = dup_str(m, json_string_value(v));
        }
    }
    json_array_foreach(weeks, i, v)
    {
        if (json_is_integer(v) && t->nweeks < MAX_WEEKS) {
            t->weeks[t->nweeks++] = (int)json_integer_value(v);
        }
    }
    json_decref(arms);
    json_decref(weeks);
    t->dirty = true;
    return m->failed ? TH_ENOMEM : 0;
}

static int load_site(void *arg, const th_site *st)
{
    model *m = arg;
    mtrial *t = trial_find(m, st->trial_id, NULL);
    if (t == NULL) {
        m->incomplete = true; /* added after the trials were read */
        return 0;
    }
    if (!grow((void **)&t->sites, &t->sites_cap, t->nsites, sizeof(msite))) {
        return TH_ENOMEM;
    }
    msite *s = &t->sites[t->nsites++];
    memset(s, 0, sizeof(*s));
    s->id = dup_str(m, st->id);
    s->name = dup_str(m, st->name);
    return m->failed ? TH_ENOMEM : 0;
}

static int load_patient(void *arg, const th_patient *pt)
{
    model *m = arg;
    unsigned ti, si;
    mtrial *t = trial_find(m, pt->trial_id, &ti);
    msite *s = t ? site_find(t, pt->site_id, &si) : NULL;
    if (s == NULL) {
        m->incomplete = true;
        return 0;
    }
    if (!grow((void **)&m->patients, &m->patients_cap, m->npatients, sizeof(mpatient))) {
        return TH_ENOMEM;
    }
    mpatient *p = &m->patients[m->npatients++];
    *p = (mpatient){.trial = ti, .site = si, .enrolled_day = th_roster_date_days(pt->enrolled_on)};
    p->id = dup_str(m, pt->id);
    s->enrolled++;
    for (unsigned a = 0; a < t->narms; a++) {
        if (strcmp(t->arms[a], pt->arm) == 0) {
            s->enrolled_by_arm[a]++;
            break;
        }
    }
    return m->failed ? TH_ENOMEM : 0;
}

/* Marks a visit received; returns whether it was new. */
static void mark_visit(mtrial *t, mpatient *p, int week)
{
    int w = week_index(t, week);
    if (w >= 0 && !(p->visits & (UINT32_C(1) << w))) {
        p->visits |= UINT32_C(1) << w;
        t->sites[p->site].visits_received++;
    }
}

static int load_cell(void *arg, const th_progress_cell *c)
{
    model *m = arg;
    mpatient *p = patient_find(m, c->patient_id);
    if (p == NULL) {
        m->incomplete = true;
        return 0;
    }
    mtrial *t = &m->trials[p->trial];
    msite *s = &t->sites[p->site];
    unsigned instr = instrument_index(m, t, c->instrument);
    s->total += c->count;
    s->today += c->today;
    s->instr_total[instr] += c->count;
    s->instr_today[instr] += c->today;
    mark_visit(t, p, c->visit_week);
    if (c->scored > 0 && c->visit_week >= 0) {
        mcell *cell = cell_for(s, instr, c->visit_week);
        if (cell == NULL) {
            return TH_ENOMEM;
        }
        cell->n += c->scored;
        cell->sum += c->score_sum;
    }
    return m->failed ? TH_ENOMEM : 0;
}

static int load_alerts(void *arg, const char *trial_id, const char *site_id, int64_t open)
{
    model *m = arg;
    mtrial *t = trial_find(m, trial_id, NULL);
    msite *s = t ? site_find(t, site_id, NULL) : NULL;
    if (s) {
        s->alerts_open += open;
    }
    return 0;
}

/* Reads a whole new model. Returns 0 (*out set), TH_EIO or TH_ENOMEM. */
static int model_load(th_store *store, model **out)
{
    model *m = th_calloc(1, sizeof(*m));
    if (m == NULL) {
        return TH_ENOMEM;
    }
    m->day = today_day();
    int rc = th_store_trials_each(store, load_trial, m);
    if (rc == 0) {
        rc = th_store_sites_each(store, load_site, m);
    }
    if (rc == 0) {
        rc = th_store_patients_each(store, load_patient, m);
    }
    if (rc == 0 && !index_patients(m)) {
        rc = TH_ENOMEM;
    }
    if (rc == 0) {
        th_progress_load load = {.today_start_ms = m->day * MS_PER_DAY,
                                 .cell = load_cell,
                                 .alerts = load_alerts,
                                 .arg = m};
        rc = th_store_progress_load(store, &load);
        m->max_qr_id = load.max_qr_id;
        m->max_score_seq = load.max_score_seq;
    }
    if (rc == 0 && m->failed) {
        rc = TH_ENOMEM;
    }
    if (rc != 0) {
        model_free(m);
        return rc == TH_ENOMEM ? TH_ENOMEM : TH_EIO;
    }
    count_expected(m);
    *out = m;
    return 0;
}

/* ---- rendering ---------------------------------------------------------------------------- */

/* Sums of the sites a document covers. */
typedef struct totals {
    int64_t enrolled, by_arm[MAX_ARMS];
    int64_t total, today, instr_total[MAX_INSTRUMENTS], instr_today[MAX_INSTRUMENTS];
    int64_t expected, received, alerts;
} totals;

static void add_site(totals *sum, const mtrial *t, const msite *s)
{
    sum->enrolled += s->enrolled;
    for (unsigned a = 0; a < t->narms; a++) {
        sum->by_arm[a] += s->enrolled_by_arm[a];
    }
    sum->total += s->total;
    sum->today += s->today;
    for (unsigned i = 0; i < t->ninstruments; i++) {
        sum->instr_total[i] += s->instr_total[i];
        sum->instr_today[i] += s->instr_today[i];
    }
    sum->expected += s->visits_expected;
    sum->received += s->visits_received;
    sum->alerts += s->alerts_open;
}

static void render_enrolled(th_buf *b, const mtrial *t, int64_t total, const int64_t *by_arm)
{
    th_buf_printf(b, "{\"total\":%lld,\"by_arm\":{", (long long)total);
    for (unsigned a = 0; a < t->narms; a++) {
        th_buf_puts(b, a ? "," : "");
        th_buf_json_str(b, t->arms[a]);
        th_buf_printf(b, ":%lld", (long long)by_arm[a]);
    }
    th_buf_puts(b, "}}");
}

static int cell_order(const void *a, const void *b)
{
    const mcell *x = a, *y = b;
    if (x->instrument != y->instrument) {
        return x->instrument < y->instrument ? -1 : 1;
    }
    return (x->week > y->week) - (x->week < y->week);
}

/* Mean score by instrument and visit week over sites [from, to). */
static void render_scores(th_buf *b, const mtrial *t, size_t from, size_t to)
{
    size_t n = 0;
    for (size_t s = from; s < to; s++) {
        n += t->sites[s].ncells;
    }
    mcell *all = n ? th_calloc(n, sizeof(mcell)) : NULL;
    size_t used = 0;
    if (all) {
        for (size_t s = from; s < to; s++) {
            for (size_t i = 0; i < t->sites[s].ncells; i++) {
                const mcell *c = &t->sites[s].cells[i];
                size_t j = 0;
                while (j < used && (all[j].instrument != c->instrument || all[j].week != c->week)) {
                    j++;
                }
                if (j == used) {
                    all[used++] = (mcell){c->instrument, c->week, 0, 0.0};
                }
                all[j].n += c->n;
                all[j].sum += c->sum;
            }
        }
        qsort(all, used, sizeof(mcell), cell_order);
    } else if (n) {
        b->failed = true;
    }
    th_buf_puts(b, "[");
    for (size_t j = 0; j < used; j++) {
        th_buf_puts(b, j ? ",{\"instrument\":" : "{\"instrument\":");
        th_buf_json_str(b, t->instruments[all[j].instrument]);
        th_buf_printf(b, ",\"week\":%d,\"n\":%lld,\"mean\":%.4g}", all[j].week, (long long)all[j].n,
                      all[j].n ? all[j].sum / (double)all[j].n : 0.0);
    }
    th_buf_puts(b, "]");
    th_free(all);
}

/* Renders the document of trial t over sites [from, to): the whole trial or one site. */
static void render(th_buf *b, const mtrial *t, size_t from, size_t to, const char *as_of)
{
    totals sum;
    memset(&sum, 0, sizeof(sum));
    for (size_t s = from; s < to; s++) {
        add_site(&sum, t, &t->sites[s]);
    }
    bool whole = from == 0 && to == t->nsites;
    th_buf_puts(b, "{\"trial\":");
    th_buf_json_str(b, t->id);
    th_buf_puts(b, ",\"name\":");
    th_buf_json_str(b, t->name);
    th_buf_printf(b, ",\"as_of\":\"%s\",\"scope\":\"%s\",\"arms\":[", as_of,
                  whole ? "trial" : "site");
    for (unsigned a = 0; a < t->narms; a++) {
        th_buf_puts(b, a ? "," : "");
        th_buf_json_str(b, t->arms[a]);
    }
    th_buf_puts(b, "],\"schedule_weeks\":[");
    for (unsigned w = 0; w < t->nweeks; w++) {
        th_buf_printf(b, w ? ",%d" : "%d", t->weeks[w]);
    }
    th_buf_puts(b, "],\"enrolled\":");
    render_enrolled(b, t, sum.enrolled, sum.by_arm);
    th_buf_printf(b, ",\"questionnaires\":{\"total\":%lld,\"today\":%lld,\"by_instrument\":[",
                  (long long)sum.total, (long long)sum.today);
    bool first = true;
    for (unsigned i = 0; i < t->ninstruments; i++) {
        if (sum.instr_total[i] == 0) {
            continue; /* another site's instrument */
        }
        th_buf_puts(b, first ? "{\"instrument\":" : ",{\"instrument\":");
        first = false;
        th_buf_json_str(b, t->instruments[i]);
        th_buf_printf(b, ",\"total\":%lld,\"today\":%lld}", (long long)sum.instr_total[i],
                      (long long)sum.instr_today[i]);
    }
    th_buf_printf(b, "]},\"visits\":{\"expected\":%lld,\"received\":%lld},\"scores\":",
                  (long long)sum.expected, (long long)sum.received);
    render_scores(b, t, from, to);
    th_buf_printf(b, ",\"alerts\":{\"open\":%lld},\"sites\":[", (long long)sum.alerts);
    for (size_t s = from; s < to; s++) {
        const msite *st = &t->sites[s];
        th_buf_puts(b, s > from ? ",{\"site\":" : "{\"site\":");
        th_buf_json_str(b, st->id);
        th_buf_puts(b, ",\"name\":");
        th_buf_json_str(b, st->name);
        th_buf_puts(b, ",\"enrolled\":");
        render_enrolled(b, t, st->enrolled, st->enrolled_by_arm);
        th_buf_printf(b,
                      ",\"questionnaires\":{\"total\":%lld,\"today\":%lld},"
                      "\"visits\":{\"expected\":%lld,\"received\":%lld},"
                      "\"alerts\":{\"open\":%lld}}",
                      (long long)st->total, (long long)st->today, (long long)st->visits_expected,
                      (long long)st->visits_received, (long long)st->alerts_open);
    }
    th_buf_puts(b, "]}");
}

/* ---- the service -------------------------------------------------------------------------- */

enum note_kind { NOTE_SUBMISSION = 1, NOTE_SCORE, NOTE_SYNC, NOTE_WAKE };

typedef struct note {
    enum note_kind kind;
    int64_t qr_id;
    int64_t score_seq;
    int visit_week;
    bool has_score;
    bool alert;
    double score;
    char patient_id[TH_ID_MAX + 1];
    char instrument[128];
} note;

struct th_progress {
    th_progress_config cfg;
    th_chan *inbox;
    th_ctx *stop; /* canceled by destroy: ends the updater's waits */
    pthread_t updater;
    bool started;
#ifdef TH_PROGRESS_RWLOCK
    pthread_rwlock_t view_lock; /* protects view */
    pview *view;
#else
    th_snapshot *snap;
#endif
    uint32_t boot_id; /* in every ETag, so that tags of an earlier run never match */
    uint64_t render_seq;
    model *model;   /* updater thread only (and create, before it starts) */
    pview *current; /* updater thread only: the version it published last */
    atomic_bool want_rebuild;
    _Atomic uint64_t sent, notes, dropped, rebuilds, versions;
    uint64_t applied; /* updater thread only: notes taken from the inbox */
    pthread_mutex_t sync_mu;
    pthread_cond_t sync_cond;
    uint64_t published_upto; /* under sync_mu: notes applied as of the last publish */
};

/* Publishes v (taken in every case). Returns false when it could not be published. */
static bool view_set(th_progress *p, pview *v)
{
#ifdef TH_PROGRESS_RWLOCK
    pthread_rwlock_wrlock(&p->view_lock);
    pview *old = p->view;
    p->view = v;
    pthread_rwlock_unlock(&p->view_lock);
    pview_free(old);
#else
    if (th_snapshot_publish(p->snap, v) != 0) {
        pview_free(v);
        return false;
    }
#endif
    p->current = v;
    atomic_fetch_add(&p->versions, 1);
    return true;
}

/* Renders one pdoc; returns false when out of memory. */
static bool render_doc(th_progress *p, pdoc *d, const mtrial *t, size_t from, size_t to,
                       const char *as_of, const char *tag)
{
    th_buf b;
    th_buf_init(&b, 0);
    render(&b, t, from, to, as_of);
    d->json = th_buf_take(&b, &d->len);
    snprintf(d->etag, sizeof(d->etag), "\"%08x.%llu%s\"", p->boot_id,
             (unsigned long long)p->render_seq, tag);
    return d->json != NULL;
}

static tdoc *render_trial(th_progress *p, const mtrial *t, const char *as_of)
{
    tdoc *d = th_calloc(1, sizeof(*d));
    if (d == NULL) {
        return NULL;
    }
    atomic_init(&d->refs, 1);
    p->render_seq++;
    d->nsites = t->nsites;
    size_t idlen = strlen(t->id);
    d->id = th_malloc(idlen + 1);
    d->site_ids = t->nsites ? th_calloc(t->nsites, sizeof(char *)) : NULL;
    d->sites = t->nsites ? th_calloc(t->nsites, sizeof(pdoc)) : NULL;
    bool ok = d->id && (t->nsites == 0 || (d->site_ids && d->sites));
    if (ok) {
        memcpy(d->id, t->id, idlen + 1);
        ok = render_doc(p, &d->all, t, 0, t->nsites, as_of, "");
    }
    for (size_t s = 0; ok && s < t->nsites; s++) {
        char tag[24];
        snprintf(tag, sizeof(tag), "s%zu", s);
        size_t n = strlen(t->sites[s].id);
        d->site_ids[s] = th_malloc(n + 1);
        ok = d->site_ids[s] != NULL && render_doc(p, &d->sites[s], t, s, s + 1, as_of, tag);
        if (d->site_ids[s]) {
            memcpy(d->site_ids[s], t->sites[s].id, n + 1);
        }
    }
    if (!ok) {
        tdoc_unref(d);
        return NULL;
    }
    return d;
}

static tdoc *current_doc(th_progress *p, const char *id)
{
    pview *v = p->current;
    for (size_t i = 0; v && i < v->ntrials; i++) {
        if (strcmp(v->trials[i]->id, id) == 0) {
            return v->trials[i];
        }
    }
    return NULL;
}

/* Publishes a new version: changed trials re-rendered, the rest shared. Announces each change
 * (progress.changed). Out of memory keeps the old version and the dirty marks. */
static void publish(th_progress *p)
{
    model *m = p->model;
    pview *v = th_calloc(1, sizeof(*v));
    if (v == NULL) {
        return;
    }
    v->trials = m->ntrials ? th_calloc(m->ntrials, sizeof(tdoc *)) : NULL;
    if (m->ntrials && v->trials == NULL) {
        th_free(v);
        return;
    }
    char as_of[40];
    th_events_format_time(th_clock_wall_ns(), as_of, sizeof(as_of));
    for (size_t i = 0; i < m->ntrials; i++) {
        mtrial *t = &m->trials[i];
        tdoc *old = current_doc(p, t->id);
        tdoc *d = NULL;
        if (!t->dirty && old) {
            d = old;
            atomic_fetch_add_explicit(&d->refs, 1, memory_order_relaxed);
        } else {
            d = render_trial(p, t, as_of);
        }
        if (d == NULL) {
            pview_free(v);
            return;
        }
        v->trials[v->ntrials++] = d;
    }
    if (!view_set(p, v)) {
        return;
    }
    for (size_t i = 0; i < m->ntrials; i++) {
        mtrial *t = &m->trials[i];
        if (t->dirty && th_events_active(p->cfg.events)) {
            char topic[TH_ID_MAX + 8], fields[TH_ID_MAX + 64];
            snprintf(topic, sizeof(topic), "trial:%s", t->id);
            th_buf b;
            th_buf_init_with(&b, fields, sizeof(fields), 0);
            th_buf_puts(&b, "\"trial\":");
            th_buf_json_str(&b, t->id);
            if (!th_buf_failed(&b)) {
                th_events_publish(p->cfg.events, topic, "progress.changed", t->id, NULL, b.data);
            }
            th_buf_free(&b);
        }
        t->dirty = false;
    }
}

static void rebuild(th_progress *p)
{
    model *m = NULL;
    atomic_store(&p->want_rebuild, false);
    int rc = model_load(p->cfg.store, &m);
    if (rc != 0) {
        TH_LOG(TH_LOG_WARN, "progress rebuild failed; counts kept",
               TH_LOG_STR("error", th_errname(rc)));
        atomic_store(&p->want_rebuild, true);
        return;
    }
    atomic_fetch_add(&p->rebuilds, 1);
    model_free(p->model);
    p->model = m;
}

static void apply(th_progress *p, const note *n)
{
    model *m = p->model;
    mpatient *pt = patient_find(m, n->patient_id);
    if (pt == NULL) {
        /* Enrolled after the last rebuild (its roster note is on the way), or a model that
         * could not be built: a rebuild will count it. */
        atomic_store(&p->want_rebuild, true);
        return;
    }
    mtrial *t = &m->trials[pt->trial];
    msite *s = &t->sites[pt->site];
    if (n->kind == NOTE_SUBMISSION) {
        if (n->qr_id <= m->max_qr_id) {
            return;
        }
        unsigned instr = instrument_index(m, t, n->instrument);
        s->total++;
        s->instr_total[instr]++;
        s->today++; /* a submission is noted right after its commit */
        s->instr_today[instr]++;
        mark_visit(t, pt, n->visit_week);
    } else {
        if (n->score_seq <= m->max_score_seq) {
            return;
        }
        if (n->has_score && n->visit_week >= 0) {
            mcell *cell = cell_for(s, instrument_index(m, t, n->instrument), n->visit_week);
            if (cell == NULL) {
                atomic_store(&p->want_rebuild, true);
                return;
            }
            cell->n++;
            cell->sum += n->score;
        }
        s->alerts_open += n->alert;
    }
    t->dirty = true;
}

/* A new day: "today" starts again at zero and more visits are due. */
static void roll_day(model *m)
{
    int64_t day = today_day();
    if (day == m->day) {
        return;
    }
    m->day = day;
    for (size_t t = 0; t < m->ntrials; t++) {
        for (size_t s = 0; s < m->trials[t].nsites; s++) {
            msite *st = &m->trials[t].sites[s];
            st->today = 0;
            memset(st->instr_today, 0, sizeof(st->instr_today));
        }
        m->trials[t].dirty = true;
    }
    count_expected(m);
}

static void mark_published(th_progress *p)
{
    pthread_mutex_lock(&p->sync_mu);
    p->published_upto = p->applied;
    pthread_cond_broadcast(&p->sync_cond);
    pthread_mutex_unlock(&p->sync_mu);
}

static bool any_dirty(const model *m)
{
    for (size_t t = 0; t < m->ntrials; t++) {
        if (m->trials[t].dirty) {
            return true;
        }
    }
    return false;
}

static void *updater_main(void *arg)
{
    th_progress *p = arg;
    const uint64_t publish_ns = p->cfg.publish_interval_ms * TH_NS_PER_MS;
    const uint64_t rebuild_ns = (uint64_t)p->cfg.rebuild_interval_s * TH_NS_PER_S;
    uint64_t last_publish = 0, last_rebuild = th_clock_now_ns();
    /* Rebuilds asked for (new patients, lost notes) are spaced by ten times the last one's
     * duration, at least 100 ms: quick on a small trial, never a storm on a big one. */
    uint64_t rebuild_gap = 100 * TH_NS_PER_MS;
    th_ctx *wait = NULL; /* reused while its deadline stands, so a busy inbox costs no timers */
    for (;;) {
        uint64_t now = th_clock_now_ns();
        bool sync_now = false;
        void *item = NULL;
        int rc = th_chan_try_recv(p->inbox, &item);
        if (rc == TH_EAGAIN) {
            /* Idle: sleep until the next publish is due (if something changed) or the next
             * housekeeping tick. */
            uint64_t deadline = now + TH_NS_PER_S;
            if (any_dirty(p->model) && last_publish + publish_ns < deadline) {
                deadline = last_publish + publish_ns;
            }
            if (atomic_load(&p->want_rebuild) && last_rebuild + rebuild_gap < deadline) {
                deadline = last_rebuild + rebuild_gap;
            }
            if (wait && (th_ctx_deadline(wait) > deadline || th_ctx_done(wait))) {
                th_ctx_release(wait);
                wait = NULL;
            }
            if (wait == NULL && deadline > now &&
                th_ctx_with_deadline(p->stop, deadline, &wait) != 0) {
                wait = NULL;
            }
            rc = deadline > now ? th_chan_recv(wait ? wait : p->stop, p->inbox, &item)
                                : TH_ETIMEDOUT;
            if (rc != 0 && th_ctx_done(p->stop)) {
                break;
            }
            if (rc == TH_ETIMEDOUT && wait) {
                th_ctx_release(wait);
                wait = NULL;
            }
        }
        if (rc == 0) {
            note *n = item;
            p->applied++;
            atomic_fetch_add_explicit(&p->notes, 1, memory_order_relaxed);
            if (n->kind == NOTE_SYNC) {
                sync_now = true;
            } else if (n->kind == NOTE_WAKE) {
                /* only wakes the updater: a rebuild is wanted */
            } else {
                apply(p, n);
            }
            th_free(n);
        } else if (rc == TH_ECLOSED) {
            break;
        }
        now = th_clock_now_ns();
        bool want = atomic_load(&p->want_rebuild);
        if ((want && now - last_rebuild >= rebuild_gap) || now - last_rebuild >= rebuild_ns) {
            rebuild(p);
            last_rebuild = th_clock_now_ns();
            uint64_t took = last_rebuild - now;
            rebuild_gap = took * 10 > 100 * TH_NS_PER_MS ? took * 10 : 100 * TH_NS_PER_MS;
        }
        roll_day(p->model);
        if (sync_now || (any_dirty(p->model) && now - last_publish >= publish_ns)) {
            publish(p);
            last_publish = now;
            mark_published(p);
        } else if (!any_dirty(p->model)) {
            mark_published(p);
        }
    }
    th_ctx_release(wait);
    return NULL;
}

/* ---- public API -------------------------------------------------------------------------- */

static void send_note(th_progress *p, note *n)
{
    if (th_chan_try_send(p->inbox, n) != 0) {
        th_free(n);
        atomic_fetch_add(&p->dropped, 1);
        atomic_store(&p->want_rebuild, true);
        return;
    }
    atomic_fetch_add(&p->sent, 1);
}

static void note_common(th_progress *p, const th_progress_note *in, enum note_kind kind)
{
    if (p == NULL) {
        return;
    }
    note *n = th_malloc(sizeof(*n));
    if (n == NULL) {
        atomic_fetch_add(&p->dropped, 1);
        atomic_store(&p->want_rebuild, true);
        return;
    }
    *n = (note){.kind = kind,
                .qr_id = in->qr_id,
                .score_seq = in->score_seq,
                .visit_week = in->visit_week,
                .has_score = in->has_score,
                .alert = in->alert,
                .score = in->score};
    snprintf(n->patient_id, sizeof(n->patient_id), "%s", in->patient_id ? in->patient_id : "");
    snprintf(n->instrument, sizeof(n->instrument), "%s", in->instrument ? in->instrument : "");
    send_note(p, n);
}

void th_progress_note_submission(th_progress *p, const th_progress_note *n)
{
    note_common(p, n, NOTE_SUBMISSION);
}

void th_progress_note_score(th_progress *p, const th_progress_note *n)
{
    note_common(p, n, NOTE_SCORE);
}

void th_progress_note_roster(th_progress *p)
{
    if (p == NULL) {
        return;
    }
    atomic_store(&p->want_rebuild, true);
    note *n = th_calloc(1, sizeof(*n));
    if (n) {
        n->kind = NOTE_WAKE;
        send_note(p, n);
    }
}

int th_progress_sync(th_progress *p, unsigned timeout_ms)
{
    note *n = th_calloc(1, sizeof(*n));
    if (n == NULL) {
        return TH_ENOMEM;
    }
    n->kind = NOTE_SYNC;
    uint64_t deadline = th_clock_after_ns(timeout_ms * TH_NS_PER_MS);
    /* The sync note itself waits for room: the caller asked to wait. */
    while (th_chan_try_send(p->inbox, n) != 0) {
        if (th_clock_now_ns() >= deadline) {
            th_free(n);
            return TH_ETIMEDOUT;
        }
        struct timespec pause = {0, 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    uint64_t target = atomic_fetch_add(&p->sent, 1) + 1;
    int rc = 0;
    pthread_mutex_lock(&p->sync_mu);
    while (p->published_upto < target && rc == 0) {
        if (th_clock_now_ns() >= deadline) {
            rc = TH_ETIMEDOUT;
            break;
        }
        th__cond_wait_until(&p->sync_cond, &p->sync_mu, deadline);
    }
    pthread_mutex_unlock(&p->sync_mu);
    return rc;
}

static const pview *view_acquire(th_progress *p, th_snapshot_guard *g)
{
#ifdef TH_PROGRESS_RWLOCK
    (void)g;
    pthread_rwlock_rdlock(&p->view_lock);
    return p->view;
#else
    return th_snapshot_acquire(p->snap, g);
#endif
}

static void view_release(th_progress *p, th_snapshot_guard *g)
{
#ifdef TH_PROGRESS_RWLOCK
    (void)g;
    pthread_rwlock_unlock(&p->view_lock);
#else
    (void)p;
    th_snapshot_release(g);
#endif
}

int th_progress_read(th_progress *p, const char *trial_id, const char *site_id,
                     const char *if_none_match, th_buf *out, char etag[40], bool *not_modified)
{
    *not_modified = false;
    th_snapshot_guard g;
    const pview *v = view_acquire(p, &g);
    if (v == NULL) {
        return TH_ENOMEM;
    }
    const tdoc *d = NULL;
    size_t lo = 0, hi = v->ntrials;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(v->trials[mid]->id, trial_id);
        if (c == 0) {
            d = v->trials[mid];
            break;
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    const pdoc *doc = d ? &d->all : NULL;
    if (d && site_id) {
        doc = NULL;
        for (size_t i = 0; i < d->nsites; i++) {
            if (strcmp(d->site_ids[i], site_id) == 0) {
                doc = &d->sites[i];
                break;
            }
        }
    }
    int rc = TH_ENOTFOUND;
    if (doc) {
        rc = 0;
        memcpy(etag, doc->etag, sizeof(doc->etag));
        if (if_none_match && strcmp(if_none_match, doc->etag) == 0) {
            *not_modified = true;
        } else {
            th_buf_append(out, doc->json, doc->len);
            rc = th_buf_failed(out) ? TH_ENOMEM : 0;
        }
    }
    view_release(p, &g);
    return rc;
}

void th_progress_get_stats(th_progress *p, th_progress_stats *out)
{
    out->versions = atomic_load(&p->versions);
    out->notes = atomic_load(&p->notes);
    out->dropped = atomic_load(&p->dropped);
    out->rebuilds = atomic_load(&p->rebuilds);
}

static void collect(void *arg, th_metric *family, th_buf *out)
{
    th_progress_stats st;
    th_progress_get_stats(arg, &st);
    th_metrics_sample(out, family, NULL, "event=\"note\"", (double)st.notes);
    th_metrics_sample(out, family, NULL, "event=\"dropped\"", (double)st.dropped);
    th_metrics_sample(out, family, NULL, "event=\"rebuild\"", (double)st.rebuilds);
    th_metrics_sample(out, family, NULL, "event=\"version\"", (double)st.versions);
}

int th_progress_create(const th_progress_config *config, th_progress **out)
{
    if (config == NULL || config->store == NULL) {
        return TH_EINVAL;
    }
    th_progress *p = th_calloc(1, sizeof(*p));
    if (p == NULL) {
        return TH_ENOMEM;
    }
    p->cfg = *config;
    if (p->cfg.publish_interval_ms == 0) {
        p->cfg.publish_interval_ms = 250;
    }
    if (p->cfg.rebuild_interval_s == 0) {
        p->cfg.rebuild_interval_s = 60;
    }
    if (p->cfg.queue_capacity == 0) {
        p->cfg.queue_capacity = 16384;
    }
    if (getrandom(&p->boot_id, sizeof(p->boot_id), 0) != sizeof(p->boot_id)) {
        p->boot_id = (uint32_t)th_clock_wall_ns();
    }
    pthread_mutex_init(&p->sync_mu, NULL);
    int rc = th__cond_init_monotonic(&p->sync_cond);
    if (rc == 0) {
        rc = th_chan_create(p->cfg.queue_capacity, &p->inbox);
    }
    if (rc == 0) {
        rc = th_ctx_with_cancel(th_ctx_background(), &p->stop);
    }
    if (rc == 0) {
        rc = model_load(p->cfg.store, &p->model);
        atomic_store(&p->rebuilds, rc == 0);
    }
    pview *first = rc == 0 ? th_calloc(1, sizeof(*first)) : NULL;
    if (rc == 0 && first == NULL) {
        rc = TH_ENOMEM;
    }
#ifdef TH_PROGRESS_RWLOCK
    if (rc == 0) {
        pthread_rwlock_init(&p->view_lock, NULL);
        p->view = first;
        p->current = first;
    }
#else
    if (rc == 0) {
        rc = th_snapshot_create(first, pview_free, &p->snap);
        if (rc != 0) {
            th_free(first);
        } else {
            p->current = first;
        }
    }
#endif
    if (rc == 0) {
        publish(p); /* the first read is already correct */
    }
    if (rc == 0 && config->metrics) {
        rc = th_metrics_collector(config->metrics, "trialhub_progress_events_total",
                                  "Progress cache: notes applied, notes dropped on a full queue "
                                  "(each triggers a rebuild), rebuilds from the store, versions "
                                  "published.",
                                  "counter", collect, p);
    }
    if (rc == 0) {
        rc = th__thread_start(&p->updater, "th-progress", updater_main, p);
    }
    if (rc != 0) {
        th_progress_destroy(p);
        return rc;
    }
    p->started = true;
    *out = p;
    return 0;
}

void th_progress_destroy(th_progress *p)
{
    if (p == NULL) {
        return;
    }
    if (p->stop) {
        th_ctx_cancel(p->stop);
    }
    if (p->started) {
        pthread_join(p->updater, NULL);
    }
    if (p->inbox) {
        void *item;
        while (th_chan_try_recv(p->inbox, &item) == 0) {
            th_free(item);
        }
        th_chan_destroy(p->inbox);
    }
#ifdef TH_PROGRESS_RWLOCK
    if (p->view) {
        pview_free(p->view);
        pthread_rwlock_destroy(&p->view_lock);
    }
#else
    th_snapshot_destroy(p->snap);
#endif
    model_free(p->model);
    th_ctx_release(p->stop);
    pthread_cond_destroy(&p->sync_cond);
    pthread_mutex_destroy(&p->sync_mu);
    th_free(p);
}
