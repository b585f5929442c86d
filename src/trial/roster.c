/* Roster snapshots: sorted arrays of trials, sites and patients, with every string copied into
 * the view's own arena, published through th_snapshot. Locking: `reload_mu` serialises
 * reloads; readers use the snapshot and take no lock. */
#include "trialhub/roster.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trialhub/alloc.h"

typedef struct site_entry {
    const char *trial_id;
    const char *id;
} site_entry;

struct th_roster_view {
    th_roster_trial *trials;
    size_t ntrials, trials_cap;
    site_entry *sites;
    size_t nsites, sites_cap;
    th_roster_patient *patients;
    size_t npatients, patients_cap;
    char **strings; /* every copied string, freed with the view */
    size_t nstrings, strings_cap;
    bool failed;
};

struct th_roster {
    th_store *store;
    th_snapshot *snap;
    pthread_mutex_t reload_mu;
};

static void view_free(void *arg)
{
    th_roster_view *v = arg;
    if (v == NULL) {
        return;
    }
    for (size_t i = 0; i < v->nstrings; i++) {
        th_free(v->strings[i]);
    }
    th_free(v->strings);
    th_free(v->trials);
    th_free(v->sites);
    th_free(v->patients);
    th_free(v);
}

static const char *keep(th_roster_view *v, const char *s)
{
    if (v->failed) {
        return "";
    }
    if (v->nstrings == v->strings_cap) {
        size_t cap = v->strings_cap ? v->strings_cap * 2 : 64;
        char **grown = th_realloc_array(v->strings, cap, sizeof(char *));
        if (grown == NULL) {
            v->failed = true;
            return "";
        }
        v->strings = grown;
        v->strings_cap = cap;
    }
    size_t n = strlen(s);
    char *copy = th_malloc(n + 1);
    if (copy == NULL) {
        v->failed = true;
        return "";
    }
    memcpy(copy, s, n + 1);
    v->strings[v->nstrings++] = copy;
    return copy;
}

/* Grows *arr (of elem_size) to hold one more; false on failure. */
static bool grow(void **arr, size_t *cap, size_t len, size_t elem_size)
{
    if (len < *cap) {
        return true;
    }
    size_t ncap = *cap ? *cap * 2 : 16;
    void *grown = th_realloc_array(*arr, ncap, elem_size);
    if (grown == NULL) {
        return false;
    }
    *arr = grown;
    *cap = ncap;
    return true;
}

static void parse_schedule(th_roster_trial *t)
{
    t->nschedule = 0;
    const char *p = t->schedule_json;
    while (*p && t->nschedule < sizeof(t->schedule_weeks) / sizeof(t->schedule_weeks[0])) {
        if ((*p >= '0' && *p <= '9') || *p == '-') {
            char *end;
            long week = strtol(p, &end, 10);
            t->schedule_weeks[t->nschedule++] = (int)week;
            p = end;
        } else {
            p++;
        }
    }
}

static int add_trial(void *arg, const th_trial *t)
{
    th_roster_view *v = arg;
    if (!grow((void **)&v->trials, &v->trials_cap, v->ntrials, sizeof(*v->trials))) {
        return TH_ENOMEM;
    }
    th_roster_trial *rt = &v->trials[v->ntrials++];
    memset(rt, 0, sizeof(*rt));
    rt->id = keep(v, t->id);
    rt->name = keep(v, t->name);
    rt->arms_json = keep(v, t->arms_json);
    rt->schedule_json = keep(v, t->schedule_json);
    parse_schedule(rt);
    return v->failed ? TH_ENOMEM : 0;
}

static int add_site(void *arg, const th_site *s)
{
    th_roster_view *v = arg;
    if (!grow((void **)&v->sites, &v->sites_cap, v->nsites, sizeof(*v->sites))) {
        return TH_ENOMEM;
    }
    site_entry *e = &v->sites[v->nsites++];
    e->trial_id = keep(v, s->trial_id);
    e->id = keep(v, s->id);
    return v->failed ? TH_ENOMEM : 0;
}

static int add_patient(void *arg, const th_patient *p)
{
    th_roster_view *v = arg;
    if (!grow((void **)&v->patients, &v->patients_cap, v->npatients, sizeof(*v->patients))) {
        return TH_ENOMEM;
    }
    th_roster_patient *rp = &v->patients[v->npatients++];
    rp->id = keep(v, p->id);
    rp->trial_id = keep(v, p->trial_id);
    rp->site_id = keep(v, p->site_id);
    rp->arm = keep(v, p->arm);
    rp->enrolled_on = keep(v, p->enrolled_on);
    return v->failed ? TH_ENOMEM : 0;
}

static int load_view(th_store *store, th_roster_view **out)
{
    th_roster_view *v = th_calloc(1, sizeof(*v));
    if (v == NULL) {
        return TH_ENOMEM;
    }
    /* The store returns rows ordered by id, so the arrays come out sorted for bsearch. */
    int rc = th_store_trials_each(store, add_trial, v);
    if (rc == 0) {
        rc = th_store_sites_each(store, add_site, v);
    }
    if (rc == 0) {
        rc = th_store_patients_each(store, add_patient, v);
    }
    if (rc == 0 && v->failed) {
        rc = TH_ENOMEM;
    }
    if (rc != 0) {
        view_free(v);
        return rc;
    }
    for (size_t i = 0; i < v->npatients; i++) {
        th_roster_trial *t = (th_roster_trial *)th_roster_trial_find(v, v->patients[i].trial_id);
        if (t) {
            t->npatients++;
        }
    }
    *out = v;
    return 0;
}

int th_roster_create(th_store *store, th_roster **out)
{
    th_roster *r = th_calloc(1, sizeof(*r));
    if (r == NULL) {
        return TH_ENOMEM;
    }
    r->store = store;
    pthread_mutex_init(&r->reload_mu, NULL);
    th_roster_view *v;
    int rc = load_view(store, &v);
    if (rc == 0) {
        rc = th_snapshot_create(v, view_free, &r->snap);
        if (rc != 0) {
            view_free(v);
        }
    }
    if (rc != 0) {
        pthread_mutex_destroy(&r->reload_mu);
        th_free(r);
        return rc;
    }
    *out = r;
    return 0;
}

void th_roster_destroy(th_roster *r)
{
    if (r == NULL) {
        return;
    }
    th_snapshot_destroy(r->snap);
    pthread_mutex_destroy(&r->reload_mu);
    th_free(r);
}

int th_roster_reload(th_roster *r)
{
    pthread_mutex_lock(&r->reload_mu);
    th_roster_view *v;
    int rc = load_view(r->store, &v);
    if (rc == 0) {
        rc = th_snapshot_publish(r->snap, v);
        if (rc != 0) {
            view_free(v);
        }
    }
    pthread_mutex_unlock(&r->reload_mu);
    return rc;
}

const th_roster_view *th_roster_acquire(th_roster *r, th_snapshot_guard *guard)
{
    return th_snapshot_acquire(r->snap, guard);
}

static int cmp_patient(const void *key, const void *elem)
{
    return strcmp(key, ((const th_roster_patient *)elem)->id);
}

static int cmp_trial(const void *key, const void *elem)
{
    return strcmp(key, ((const th_roster_trial *)elem)->id);
}

const th_roster_patient *th_roster_patient_find(const th_roster_view *v, const char *id)
{
    if (v->npatients == 0) {
        return NULL;
    }
    return bsearch(id, v->patients, v->npatients, sizeof(*v->patients), cmp_patient);
}

const th_roster_trial *th_roster_trial_find(const th_roster_view *v, const char *id)
{
    if (v->ntrials == 0) {
        return NULL;
    }
    return bsearch(id, v->trials, v->ntrials, sizeof(*v->trials), cmp_trial);
}

bool th_roster_site_exists(const th_roster_view *v, const char *trial_id, const char *site_id)
{
    for (size_t i = 0; i < v->nsites; i++) {
        if (strcmp(v->sites[i].trial_id, trial_id) == 0 && strcmp(v->sites[i].id, site_id) == 0) {
            return true;
        }
    }
    return false;
}

size_t th_roster_trial_count(const th_roster_view *v)
{
    return v->ntrials;
}

const th_roster_trial *th_roster_trial_at(const th_roster_view *v, size_t i)
{
    return i < v->ntrials ? &v->trials[i] : NULL;
}

int64_t th_roster_date_days(const char *date)
{
    /* Howard Hinnant's days_from_civil. */
    int y, mo, d;
    if (date == NULL || sscanf(date, "%4d-%2d-%2d", &y, &mo, &d) != 3) {
        return 0;
    }
    y -= mo <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

int th_roster_nearest_week(const th_roster_trial *trial, const char *enrolled_on,
                           int64_t authored_s)
{
    int64_t since_days = authored_s / 86400 - th_roster_date_days(enrolled_on);
    int best = -1;
    int64_t best_gap = INT64_MAX;
    for (unsigned i = 0; i < trial->nschedule; i++) {
        int64_t gap = since_days - 7 * (int64_t)trial->schedule_weeks[i];
        gap = gap < 0 ? -gap : gap;
        if (gap < best_gap || (gap == best_gap && trial->schedule_weeks[i] < best)) {
            best_gap = gap;
            best = trial->schedule_weeks[i];
        }
    }
    return best;
}
