/* Building an interim report: the trial, its sites and patients from the store, then one pass
 * over its responses in arrival order (the SQL query is interrupted when the context ends), then
 * the statistics of every arm x visit week x instrument cell. Rendering is render.c's.
 *
 * Memory: per instrument, one score per patient and scheduled week (NaN: none; a later response
 * to the same visit replaces an earlier one), so a report costs patients x weeks x 8 bytes per
 * instrument however many responses there are. Everything a th_report points to is owned by its
 * `priv` block and freed by th_report_destroy(). No shared state: reports build in parallel. */
#include "trialhub/report.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/events.h"
#include "trialhub/roster.h"

#define MAX_ARMS        16
#define MAX_INSTRUMENTS 32

typedef struct rpatient {
    char *id;
    unsigned site;
    int arm; /* -1: an arm the trial does not list */
    int64_t enrolled_day;
    uint32_t weeks_seen; /* any response at the i-th scheduled week */
} rpatient;

typedef struct rinstrument {
    char *url;
    double *scores;                                   /* npatients x nweeks, NaN: none */
    size_t alerts[MAX_ARMS + 1][TH_REPORT_MAX_WEEKS]; /* [arm or MAX_ARMS: unknown][week] */
} rinstrument;

/* Patient ids are copied into large chunks, freed in one go (a report of 100,000 patients
 * would otherwise make as many allocations, and as many frees when it is cancelled). */
typedef struct chunk {
    struct chunk *next;
    size_t used, cap;
    char data[];
} chunk;

/* Everything a report owns. */
typedef struct rpriv {
    chunk *chunks;
    char *trial_id, *trial_name;
    char *arm_names[MAX_ARMS];
    size_t enrolled_by_arm[MAX_ARMS];
    const char *arm_ptrs[MAX_ARMS];
    th_report_site *sites;
    char **site_strings; /* 2 per site */
    size_t sites_cap;
    rpatient *patients;
    size_t npatients, patients_cap;
    uint32_t *slots; /* open addressing over patients: index + 1 */
    size_t nslots;
    rinstrument instruments[MAX_INSTRUMENTS];
    size_t ninstruments;
    bool failed;
} rpriv;

static char *arena_str(rpriv *p, const char *s)
{
    size_t n = strlen(s) + 1;
    chunk *c = p->chunks;
    if (c == NULL || c->cap - c->used < n) {
        size_t cap = n > 60000 ? n : 60000;
        c = th_malloc(sizeof(*c) + cap);
        if (c == NULL) {
            p->failed = true;
            return NULL;
        }
        c->next = p->chunks;
        c->used = 0;
        c->cap = cap;
        p->chunks = c;
    }
    char *copy = c->data + c->used;
    memcpy(copy, s, n);
    c->used += n;
    return copy;
}

static char *dup_str(rpriv *p, const char *s)
{
    size_t n = strlen(s);
    char *copy = th_malloc(n + 1);
    if (copy == NULL) {
        p->failed = true;
        return NULL;
    }
    memcpy(copy, s, n + 1);
    return copy;
}

void th_report_destroy(th_report *r)
{
    if (r == NULL) {
        return;
    }
    rpriv *p = r->priv;
    if (p) {
        th_free(p->trial_id);
        th_free(p->trial_name);
        for (size_t i = 0; i < MAX_ARMS; i++) {
            th_free(p->arm_names[i]);
        }
        for (size_t i = 0; i < r->nsites * 2; i++) {
            th_free(p->site_strings[i]);
        }
        th_free(p->site_strings);
        th_free(p->sites);
        while (p->chunks) {
            chunk *c = p->chunks;
            p->chunks = c->next;
            th_free(c);
        }
        th_free(p->patients);
        th_free(p->slots);
        for (size_t i = 0; i < p->ninstruments; i++) {
            th_free(p->instruments[i].url);
            th_free(p->instruments[i].scores);
        }
        th_free(p);
    }
    th_free(r->cells);
    th_free(r);
}

/* ---- loading the trial, its sites and patients ------------------------------------------- */

typedef struct loader {
    th_report *r;
    rpriv *p;
    const char *trial_id;
    bool found;
} loader;

static int load_trial(void *arg, const th_trial *t)
{
    loader *l = arg;
    if (strcmp(t->id, l->trial_id) != 0) {
        return 0;
    }
    rpriv *p = l->p;
    th_report *r = l->r;
    l->found = true;
    p->trial_id = dup_str(p, t->id);
    p->trial_name = dup_str(p, t->name);
    json_t *arms = json_loads(t->arms_json, 0, NULL);
    json_t *weeks = json_loads(t->schedule_json, 0, NULL);
    size_t i;
    json_t *v;
    json_array_foreach(arms, i, v)
    {
        if (json_is_string(v) && r->narms < MAX_ARMS) {
            p->arm_names[r->narms] = dup_str(p, json_string_value(v));
            p->arm_ptrs[r->narms] = p->arm_names[r->narms];
            r->narms++;
        }
    }
    json_array_foreach(weeks, i, v)
    {
        if (json_is_integer(v) && r->nweeks < TH_REPORT_MAX_WEEKS) {
            r->weeks[r->nweeks++] = (int)json_integer_value(v);
        }
    }
    json_decref(arms);
    json_decref(weeks);
    return p->failed ? TH_ENOMEM : 1; /* found: stop */
}

static int load_site(void *arg, const th_site *s)
{
    loader *l = arg;
    if (strcmp(s->trial_id, l->trial_id) != 0) {
        return 0;
    }
    rpriv *p = l->p;
    th_report *r = l->r;
    if (r->nsites == p->sites_cap) {
        size_t cap = p->sites_cap ? p->sites_cap * 2 : 8;
        th_report_site *sites = th_realloc_array(p->sites, cap, sizeof(*sites));
        if (sites == NULL) {
            return TH_ENOMEM;
        }
        p->sites = sites;
        char **strings = th_realloc_array(p->site_strings, cap * 2, sizeof(char *));
        if (strings == NULL) {
            return TH_ENOMEM;
        }
        p->site_strings = strings;
        p->sites_cap = cap;
    }
    th_report_site *site = &p->sites[r->nsites];
    memset(site, 0, sizeof(*site));
    char **strings = &p->site_strings[r->nsites * 2];
    strings[0] = dup_str(p, s->id);
    strings[1] = dup_str(p, s->name);
    r->nsites++;
    site->id = strings[0];
    site->name = strings[1];
    r->sites = p->sites;
    return p->failed ? TH_ENOMEM : 0;
}

static int load_patient(void *arg, const th_patient *pt)
{
    loader *l = arg;
    rpriv *p = l->p;
    th_report *r = l->r;
    unsigned site = 0;
    while (site < r->nsites && strcmp(r->sites[site].id, pt->site_id) != 0) {
        site++;
    }
    if (site == r->nsites) {
        return 0; /* a site added after the sites were read */
    }
    if (p->npatients == p->patients_cap) {
        size_t cap = p->patients_cap ? p->patients_cap * 2 : 64;
        rpatient *grown = th_realloc_array(p->patients, cap, sizeof(*grown));
        if (grown == NULL) {
            return TH_ENOMEM;
        }
        p->patients = grown;
        p->patients_cap = cap;
    }
    rpatient *rp = &p->patients[p->npatients];
    *rp = (rpatient){.site = site, .arm = -1, .enrolled_day = th_roster_date_days(pt->enrolled_on)};
    rp->id = arena_str(p, pt->id);
    if (rp->id == NULL) {
        return TH_ENOMEM;
    }
    p->npatients++;
    for (size_t a = 0; a < r->narms; a++) {
        if (strcmp(r->arms[a], pt->arm) == 0) {
            rp->arm = (int)a;
            p->enrolled_by_arm[a]++;
            r->sites[site].enrolled_by_arm[a]++;
            break;
        }
    }
    r->sites[site].enrolled++;
    return 0;
}

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603u; /* FNV-1a */
    for (; *s; s++) {
        h = (h ^ (unsigned char)*s) * 1099511628211u;
    }
    return h;
}

static bool index_patients(rpriv *p)
{
    size_t n = 16;
    while (n < p->npatients * 2) {
        n *= 2;
    }
    p->slots = th_calloc(n, sizeof(uint32_t));
    if (p->slots == NULL) {
        return false;
    }
    p->nslots = n;
    for (size_t i = 0; i < p->npatients; i++) {
        size_t j = (size_t)hash_str(p->patients[i].id) & (n - 1);
        while (p->slots[j]) {
            j = (j + 1) & (n - 1);
        }
        p->slots[j] = (uint32_t)(i + 1);
    }
    return true;
}

static long patient_index(const rpriv *p, const char *id)
{
    size_t mask = p->nslots - 1;
    for (size_t j = (size_t)hash_str(id) & mask;; j = (j + 1) & mask) {
        uint32_t slot = p->slots[j];
        if (slot == 0) {
            return -1;
        }
        if (strcmp(p->patients[slot - 1].id, id) == 0) {
            return (long)slot - 1;
        }
    }
}

/* ---- the scan ----------------------------------------------------------------------------- */

typedef struct scan {
    th_ctx *ctx;
    th_report *r;
    rpriv *p;
} scan;

static rinstrument *instrument_for(rpriv *p, size_t nweeks, const char *url)
{
    for (size_t i = 0; i < p->ninstruments; i++) {
        if (strcmp(p->instruments[i].url, url) == 0) {
            return &p->instruments[i];
        }
    }
    if (p->ninstruments == MAX_INSTRUMENTS) {
        return NULL; /* beyond the limit: not reported (documented) */
    }
    rinstrument *in = &p->instruments[p->ninstruments];
    memset(in, 0, sizeof(*in));
    size_t cells = p->npatients * nweeks;
    in->scores = cells ? th_malloc(cells * sizeof(double)) : NULL;
    in->url = dup_str(p, url);
    if ((cells && in->scores == NULL) || in->url == NULL) {
        th_free(in->scores);
        th_free(in->url);
        p->failed = true;
        return NULL;
    }
    for (size_t i = 0; i < cells; i++) {
        in->scores[i] = NAN;
    }
    p->ninstruments++;
    return in;
}

static int scan_row(void *arg, const th_report_row *row)
{
    scan *sc = arg;
    th_report *r = sc->r;
    rpriv *p = sc->p;
    r->responses++;
    long pi = patient_index(p, row->patient_id);
    int w = -1;
    for (size_t i = 0; i < r->nweeks; i++) {
        if (r->weeks[i] == row->visit_week) {
            w = (int)i;
            break;
        }
    }
    if (pi < 0 || w < 0) {
        return 0; /* enrolled after the roster was read, or an unscheduled visit */
    }
    rpatient *pt = &p->patients[pi];
    pt->weeks_seen |= UINT32_C(1) << w;
    rinstrument *in = instrument_for(p, r->nweeks, row->instrument);
    if (in == NULL) {
        return p->failed ? TH_ENOMEM : 0;
    }
    if (row->has_score && isfinite(row->score)) {
        in->scores[(size_t)pi * r->nweeks + (size_t)w] = row->score; /* the latest wins */
    }
    if (row->alert) {
        in->alerts[pt->arm < 0 ? MAX_ARMS : pt->arm][w]++;
        r->sites[pt->site].alerts++;
        r->alerts++;
    }
    return 0;
}

/* ---- statistics -------------------------------------------------------------------------- */

static const char *instrument_name(const char *url)
{
    if (strcmp(url, "http://loinc.org/q/44249-1") == 0) {
        return "PHQ-9";
    }
    if (strcmp(url, "http://loinc.org/q/69737-5") == 0) {
        return "GAD-7";
    }
    return url;
}

static int url_order(const void *a, const void *b)
{
    return strcmp(((const rinstrument *)a)->url, ((const rinstrument *)b)->url);
}

static int compute(th_ctx *ctx, th_report *r, rpriv *p, int64_t today)
{
    qsort(p->instruments, p->ninstruments, sizeof(rinstrument), url_order);
    /* Visits due: per arm and week, and per site and week. */
    size_t due[MAX_ARMS][TH_REPORT_MAX_WEEKS];
    memset(due, 0, sizeof(due));
    for (size_t i = 0; i < p->npatients; i++) {
        rpatient *pt = &p->patients[i];
        th_report_site *site = &r->sites[pt->site];
        for (size_t w = 0; w < r->nweeks; w++) {
            if (pt->enrolled_day + 7 * (int64_t)r->weeks[w] <= today) {
                site->expected[w]++;
                if (pt->arm >= 0) {
                    due[pt->arm][w]++;
                }
            }
            site->received[w] += (pt->weeks_seen >> w) & 1;
        }
    }
    r->ncells = p->ninstruments * r->narms * r->nweeks;
    r->cells = r->ncells ? th_calloc(r->ncells, sizeof(th_report_cell)) : NULL;
    double *values = p->npatients ? th_malloc(p->npatients * sizeof(double)) : NULL;
    double *changes = p->npatients ? th_malloc(p->npatients * sizeof(double)) : NULL;
    int rc = 0;
    if ((r->ncells && r->cells == NULL) || (p->npatients && (values == NULL || changes == NULL))) {
        rc = TH_ENOMEM;
    }
    size_t c = 0;
    for (size_t i = 0; rc == 0 && i < p->ninstruments; i++) {
        const rinstrument *in = &p->instruments[i];
        for (size_t a = 0; rc == 0 && a < r->narms; a++) {
            for (size_t w = 0; rc == 0 && w < r->nweeks; w++) {
                if (th_ctx_done(ctx)) {
                    rc = th_ctx_err(ctx);
                    break;
                }
                size_t n = 0, nchange = 0;
                for (size_t k = 0; k < p->npatients; k++) {
                    if (p->patients[k].arm != (int)a) {
                        continue;
                    }
                    double v = in->scores[k * r->nweeks + w];
                    if (isnan(v)) {
                        continue;
                    }
                    values[n++] = v;
                    double base = in->scores[k * r->nweeks];
                    if (w > 0 && !isnan(base)) {
                        changes[nchange++] = v - base;
                    }
                }
                th_report_cell *cell = &r->cells[c++];
                cell->arm = r->arms[a];
                cell->instrument = in->url;
                cell->instrument_name = instrument_name(in->url);
                cell->week = r->weeks[w];
                cell->expected = due[a][w];
                cell->received = n;
                cell->alerts = in->alerts[a][w];
                rc = th_stats_summarize(ctx, values, n, &cell->score);
                if (rc == 0) {
                    rc = th_stats_summarize(ctx, changes, nchange, &cell->change);
                }
            }
        }
    }
    th_free(values);
    th_free(changes);
    return rc;
}

int th_report_build(th_ctx *ctx, th_store *store, const char *trial_id, th_report **out,
                    const char **stage)
{
    const char *unused = NULL;
    stage = stage ? stage : &unused;
    *stage = "query";
    th_report *r = th_calloc(1, sizeof(*r));
    rpriv *p = th_calloc(1, sizeof(*p));
    if (r == NULL || p == NULL) {
        th_free(r);
        th_free(p);
        return TH_ENOMEM;
    }
    r->priv = p;
    loader l = {r, p, trial_id, false};
    int rc = th_store_trials_each(store, load_trial, &l);
    rc = rc == 1 ? 0 : rc;
    if (rc == 0 && !l.found) {
        rc = TH_ENOTFOUND;
    }
    r->arms = p->arm_ptrs;
    r->enrolled_by_arm = p->enrolled_by_arm;
    r->trial_id = p->trial_id;
    r->trial_name = p->trial_name;
    if (rc == 0) {
        rc = th_store_sites_each(store, load_site, &l);
    }
    if (rc == 0) {
        rc = th_store_trial_patients_each(ctx, store, trial_id, load_patient, &l);
    }
    if (rc == 0 && !index_patients(p)) {
        rc = TH_ENOMEM;
    }
    r->patients = p->npatients;
    if (rc == 0 && th_ctx_done(ctx)) {
        rc = th_ctx_err(ctx);
    }
    if (rc == 0) {
        scan sc = {ctx, r, p};
        rc = th_store_report_scan(ctx, store, trial_id, scan_row, &sc);
    }
    if (rc == 0 && p->failed) {
        rc = TH_ENOMEM;
    }
    uint64_t now_ns = th_clock_wall_ns();
    if (rc == 0) {
        *stage = "statistics";
        rc = compute(ctx, r, p, (int64_t)(now_ns / TH_NS_PER_S / 86400));
    }
    if (rc != 0) {
        th_report_destroy(r);
        return rc;
    }
    th_events_format_time(now_ns, r->generated_at, sizeof(r->generated_at));
    *out = r;
    return 0;
}
