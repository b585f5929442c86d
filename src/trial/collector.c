/* The multi-site collector (include/trialhub/collector.h). Per collection, two threads:
 *
 *   fetcher: one libcurl multi handle drives every site's transfers (at most max_in_flight at
 *            once); each finished page is parsed, its entries are sent into the channel, and
 *            the site's `next` link (same origin only) is fetched in turn. It owns the channel
 *            and closes it once every site is finished or the collection's context ends.
 *   consumer: the one receiver; validates each resource (th_qr_parse/th_qr_valid, enrolment at
 *            that site) and writes it through the group-commit writer; when the channel is
 *            closed and every write is done, it joins the fetcher and ends the collection.
 *
 * Locking: `mu` protects the collection list, every collection's and site's state, counts and
 * reasons (read by GET while the threads write), and the running count (`idle` is signalled when
 * it drops). The fetcher and consumer take `mu` only for short updates, never while blocked.
 * Cancel: th_ctx_cancel() on the collection's context; an after-func wakes the fetcher's
 * curl_multi_poll() so every transfer is removed at once. */
#include "trialhub/collector.h"

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdatomic.h>
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
#include "trialhub/ingest.h"
#include "trialhub/log.h"
#include "trialhub/wg.h"

#define MAX_REASONS        5
#define MAX_RUNNING        8
#define MAX_SITES          1024
#define DEFAULT_TIMEOUT_NS (600 * TH_NS_PER_S)

typedef enum site_state {
    SITE_PENDING = 0,
    SITE_FETCHING,
    SITE_DONE,
    SITE_TIMED_OUT,
    SITE_FAILED,
    SITE_CANCELED,
} site_state;

static const char *const site_state_names[] = {"pending",   "fetching", "done",
                                               "timed_out", "failed",   "canceled"};

typedef enum coll_state { COLL_RUNNING = 0, COLL_DONE, COLL_CANCELED } coll_state;

typedef struct collection collection;

typedef struct site_run {
    collection *coll;
    char id[TH_ID_MAX + 1];
    char *base_url;   /* without a trailing slash */
    char *credential; /* may be NULL */
    char origin[256]; /* scheme://host[:port] of base_url: next links must stay on it */
    char *url;        /* the page being fetched */
    /* under the collector's mu */
    site_state state;
    int64_t received, accepted, duplicates, rejected;
    char reasons[MAX_REASONS][160];
    int64_t reason_count[MAX_REASONS];
    unsigned nreasons;
    long http_status;
    uint64_t start_ns, end_ns;
    unsigned pages;
    /* fetcher thread only */
    CURL *easy;
    struct curl_slist *headers;
    th_buf body;
    bool body_too_big;
    char curl_err[CURL_ERROR_SIZE];
} site_run;

struct collection {
    th_collector *c;
    char id[32];
    char trial_id[TH_ID_MAX + 1];
    char since[40];
    th_ctx *ctx;
    th_ctx_hook wake_hook;
    bool hook_set;
    CURLM *multi;
    site_run *sites;
    size_t nsites;
    th_chan *ch;
    th_wg *writes;
    pthread_t fetcher;
    bool fetcher_started;
    /* under the collector's mu */
    coll_state state;
    bool user_canceled;
    int64_t started_ms, finished_ms;
    collection *next;
};

/* One fetched resource on its way from the fetcher to the consumer. */
typedef struct entry {
    unsigned site;
    char resource_id[TH_ID_MAX + 1];
    size_t len;
    char json[];
} entry;

/* One write through the group-commit writer. */
typedef struct write_job {
    th_write_job job;
    collection *coll;
    site_run *site;
    th_qr *qr;
    th_qr_row row;
    char *body;
    char trial_id[TH_ID_MAX + 1];
    char site_id[TH_ID_MAX + 1];
    char resource_id[TH_ID_MAX + 1];
} write_job;

struct th_collector {
    th_collector_config cfg;
    pthread_mutex_t mu;
    pthread_cond_t idle;
    collection *list; /* newest first */
    size_t nkept;
    unsigned running;
    bool closing;
    th_ctx *stop; /* ends the schedule thread */
    pthread_t scheduler;
    bool scheduler_started;
    th_metric *m_sites;
    th_metric *m_records;
};

static int64_t wall_ms(void)
{
    return (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);
}

/* ---- site bookkeeping (under mu) ---------------------------------------------------------- */

/* Keeps the first MAX_REASONS distinct reasons, each with how often it was seen. */
static void add_reason_locked(site_run *s, const char *reason)
{
    for (unsigned i = 0; i < s->nreasons; i++) {
        if (strcmp(s->reasons[i], reason) == 0) {
            s->reason_count[i]++;
            return;
        }
    }
    if (s->nreasons < MAX_REASONS) {
        snprintf(s->reasons[s->nreasons], sizeof(s->reasons[0]), "%s", reason);
        s->reason_count[s->nreasons++] = 1;
    }
}

static void site_reject(site_run *s, const char *reason)
{
    th_collector *c = s->coll->c;
    pthread_mutex_lock(&c->mu);
    s->rejected++;
    add_reason_locked(s, reason);
    pthread_mutex_unlock(&c->mu);
    if (c->m_records) {
        const char *labels[] = {"rejected"};
        th_metric_add(c->m_records, labels, 1);
    }
}

static void site_finish(site_run *s, site_state state, const char *reason)
{
    th_collector *c = s->coll->c;
    pthread_mutex_lock(&c->mu);
    bool changed = s->state == SITE_PENDING || s->state == SITE_FETCHING;
    if (changed) {
        s->state = state;
        s->end_ns = th_clock_now_ns();
        if (reason) {
            add_reason_locked(s, reason);
        }
    }
    pthread_mutex_unlock(&c->mu);
    if (changed && c->m_sites) {
        const char *labels[] = {site_state_names[state]};
        th_metric_add(c->m_sites, labels, 1);
    }
}

/* ---- the fetcher ------------------------------------------------------------------------- */

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg)
{
    site_run *s = arg;
    size_t n = size * nmemb;
    size_t limit = s->coll->c->cfg.max_page_bytes;
    if (s->body.len + n > limit) {
        s->body_too_big = true;
        return 0; /* aborts the transfer: CURLE_WRITE_ERROR */
    }
    th_buf_append(&s->body, data, n);
    return th_buf_failed(&s->body) ? 0 : n;
}

/* scheme://host[:port] of url into origin; false if url is not http(s) or too long. */
static bool url_origin(const char *url, char *origin, size_t len, bool allow_http)
{
    const char *rest;
    if (strncmp(url, "https://", 8) == 0) {
        rest = url + 8;
    } else if (allow_http && strncmp(url, "http://", 7) == 0) {
        rest = url + 7;
    } else {
        return false;
    }
    size_t host_len = strcspn(rest, "/?#");
    size_t n = (size_t)(rest - url) + host_len;
    if (host_len == 0 || n >= len) {
        return false;
    }
    memcpy(origin, url, n);
    origin[n] = '\0';
    return true;
}

static int start_transfer(collection *coll, site_run *s)
{
    th_collector *c = coll->c;
    if (s->easy == NULL) {
        s->easy = curl_easy_init();
        if (s->easy == NULL) {
            return TH_ENOMEM;
        }
    } else {
        curl_easy_reset(s->easy);
    }
    th_buf_reset(&s->body);
    s->body_too_big = false;
    s->curl_err[0] = '\0';
    uint64_t spent_ms = (th_clock_now_ns() - s->start_ns) / TH_NS_PER_MS;
    long left_ms =
        spent_ms >= c->cfg.site_timeout_ms ? 1 : (long)(c->cfg.site_timeout_ms - spent_ms);
    CURL *e = s->easy;
    curl_easy_setopt(e, CURLOPT_URL, s->url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, s);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, s->curl_err);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, left_ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)c->cfg.connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L); /* no redirects to elsewhere */
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, c->cfg.allow_insecure_http ? "http,https" : "https");
    curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
    curl_easy_setopt(e, CURLOPT_USERAGENT, "trialhub-collector/1");
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, s->headers);
    if (curl_multi_add_handle(coll->multi, e) != CURLM_OK) {
        return TH_ENOMEM;
    }
    return 0;
}

/* The next page's URL from a Bundle, checked to stay on the site's origin. Returns a th_malloc
 * copy, NULL when there is none, or sets *bad. */
static char *next_link(const site_run *s, json_t *bundle, bool *bad)
{
    size_t i;
    json_t *link;
    json_array_foreach(json_object_get(bundle, "link"), i, link)
    {
        const char *rel = json_string_value(json_object_get(link, "relation"));
        const char *url = json_string_value(json_object_get(link, "url"));
        if (rel == NULL || url == NULL || strcmp(rel, "next") != 0) {
            continue;
        }
        size_t olen = strlen(s->origin);
        th_buf b;
        th_buf_init(&b, 8192);
        if (url[0] == '/') {
            th_buf_puts(&b, s->origin);
            th_buf_puts(&b, url);
        } else if (strncmp(url, s->origin, olen) == 0 &&
                   (url[olen] == '/' || url[olen] == '?' || url[olen] == '\0')) {
            th_buf_puts(&b, url);
        } else {
            *bad = true;
            th_buf_free(&b);
            return NULL;
        }
        return th_buf_take(&b, NULL);
    }
    return NULL;
}

/* Sends each entry of a page into the channel. Returns 0, or the context's error. */
static int send_entries(collection *coll, unsigned site_index, json_t *bundle)
{
    site_run *s = &coll->sites[site_index];
    size_t i;
    json_t *item;
    json_array_foreach(json_object_get(bundle, "entry"), i, item)
    {
        json_t *res = json_object_get(item, "resource");
        pthread_mutex_lock(&coll->c->mu);
        s->received++;
        pthread_mutex_unlock(&coll->c->mu);
        const char *type = json_string_value(json_object_get(res, "resourceType"));
        const char *rid = json_string_value(json_object_get(res, "id"));
        if (type == NULL || strcmp(type, "QuestionnaireResponse") != 0) {
            site_reject(s, "entry is not a QuestionnaireResponse");
            continue;
        }
        if (rid == NULL || rid[0] == '\0' || strlen(rid) > TH_ID_MAX) {
            site_reject(s, "entry has no usable resource id");
            continue;
        }
        char *text = json_dumps(res, JSON_COMPACT);
        size_t len = text ? strlen(text) : 0;
        entry *e = text ? th_malloc(sizeof(*e) + len + 1) : NULL;
        if (e == NULL) {
            free(text);
            site_reject(s, "out of memory");
            continue;
        }
        e->site = site_index;
        snprintf(e->resource_id, sizeof(e->resource_id), "%s", rid);
        e->len = len;
        memcpy(e->json, text, len + 1);
        free(text);
        int rc = th_chan_send(coll->ctx, coll->ch, e);
        if (rc != 0) {
            th_free(e);
            return rc;
        }
    }
    return 0;
}

/* A transfer ended: parse its page, hand its entries over, and fetch the next page or finish
 * the site. */
static void on_transfer_done(collection *coll, site_run *s, CURLcode result)
{
    th_collector *c = coll->c;
    unsigned index = (unsigned)(s - coll->sites);
    long status = 0;
    curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(coll->multi, s->easy);
    pthread_mutex_lock(&c->mu);
    s->http_status = status;
    s->pages++;
    unsigned pages = s->pages;
    pthread_mutex_unlock(&c->mu);
    char reason[160];
    if (result == CURLE_OPERATION_TIMEDOUT) {
        site_finish(s, SITE_TIMED_OUT, "the site did not answer within its timeout");
        return;
    }
    if (result != CURLE_OK) {
        snprintf(reason, sizeof(reason), "transfer failed: %.140s",
                 s->body_too_big  ? "page larger than the limit"
                 : s->curl_err[0] ? s->curl_err
                                  : curl_easy_strerror(result));
        site_finish(s, SITE_FAILED, reason);
        return;
    }
    if (status != 200) {
        snprintf(reason, sizeof(reason), "the site answered HTTP %ld", status);
        site_finish(s, SITE_FAILED, reason);
        return;
    }
    json_error_t jerr;
    json_t *bundle = json_loadb(s->body.data ? s->body.data : "", s->body.len, 0, &jerr);
    const char *type = json_string_value(json_object_get(bundle, "resourceType"));
    if (bundle == NULL || type == NULL || strcmp(type, "Bundle") != 0) {
        if (bundle == NULL) {
            snprintf(reason, sizeof(reason), "the site's answer is not JSON (line %d, column %d)",
                     jerr.line, jerr.column);
        } else {
            snprintf(reason, sizeof(reason), "the site's answer is not a FHIR Bundle");
        }
        json_decref(bundle);
        site_finish(s, SITE_FAILED, reason);
        return;
    }
    if (send_entries(coll, index, bundle) != 0) {
        json_decref(bundle);
        return; /* the collection ended; the caller marks the site */
    }
    bool bad = false;
    char *next = next_link(s, bundle, &bad);
    json_decref(bundle);
    if (bad) {
        site_finish(s, SITE_FAILED, "a next link leads away from the site's server");
        return;
    }
    if (next == NULL) {
        site_finish(s, SITE_DONE, NULL);
        return;
    }
    if (pages >= c->cfg.max_pages) {
        th_free(next);
        snprintf(reason, sizeof(reason), "stopped after %u pages", pages);
        site_finish(s, SITE_FAILED, reason);
        return;
    }
    th_free(s->url);
    s->url = next;
    if (start_transfer(coll, s) != 0) {
        site_finish(s, SITE_FAILED, "out of memory");
    }
}

static void wake_fetcher(void *arg)
{
    collection *coll = arg;
    curl_multi_wakeup(coll->multi);
}

static void *fetcher_main(void *arg)
{
    collection *coll = arg;
    th_collector *c = coll->c;
    size_t next_site = 0;
    int running = 0;
    int active = 0; /* sites started and not finished */
    while (!th_ctx_done(coll->ctx)) {
        /* Start sites up to the bound. */
        while (active < (int)c->cfg.max_in_flight && next_site < coll->nsites) {
            site_run *s = &coll->sites[next_site++];
            pthread_mutex_lock(&c->mu);
            s->state = SITE_FETCHING;
            s->start_ns = th_clock_now_ns();
            pthread_mutex_unlock(&c->mu);
            if (start_transfer(coll, s) != 0) {
                site_finish(s, SITE_FAILED, "out of memory");
                continue;
            }
            active++;
        }
        if (active == 0 && next_site == coll->nsites) {
            break; /* every site finished */
        }
        curl_multi_perform(coll->multi, &running);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(coll->multi, &left)) != NULL) {
            if (msg->msg != CURLMSG_DONE) {
                continue;
            }
            site_run *s = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
            on_transfer_done(coll, s, msg->data.result);
            pthread_mutex_lock(&c->mu);
            active -= s->state != SITE_FETCHING;
            pthread_mutex_unlock(&c->mu);
        }
        if (running > 0 && !th_ctx_done(coll->ctx)) {
            /* Woken at once by a cancel or deadline (wake_fetcher). */
            curl_multi_poll(coll->multi, NULL, 0, 200, NULL);
        }
    }
    /* Deadline or cancel: every transfer still open is aborted now. */
    bool user = false;
    pthread_mutex_lock(&c->mu);
    user = coll->user_canceled;
    pthread_mutex_unlock(&c->mu);
    for (size_t i = 0; i < coll->nsites; i++) {
        site_run *s = &coll->sites[i];
        if (s->easy) {
            curl_multi_remove_handle(coll->multi, s->easy);
        }
        site_finish(s, user ? SITE_CANCELED : SITE_TIMED_OUT,
                    user ? "the collection was canceled" : "the collection's deadline passed");
    }
    th_chan_close(coll->ch); /* the one owner */
    return NULL;
}

/* ---- the consumer ------------------------------------------------------------------------ */

static int write_apply(th_store *store, th_write_job *job)
{
    return th_store_qr_insert(store, &((write_job *)job)->row);
}

static void write_job_free(write_job *w)
{
    th_qr_destroy(w->qr);
    th_free(w->body);
    th_free(w);
}

static void write_done(th_write_job *job, int status)
{
    write_job *w = (write_job *)job;
    collection *coll = w->coll;
    th_collector *c = coll->c;
    const char *outcome = "accepted";
    if (status != 0) {
        site_reject(w->site, "the store could not take it");
        outcome = NULL;
    } else if (w->row.duplicate) {
        outcome = "duplicate";
    } else if (w->row.conflict) {
        site_reject(w->site, "identifier already used by different content");
        outcome = NULL;
    }
    if (outcome) {
        pthread_mutex_lock(&c->mu);
        if (w->row.duplicate) {
            w->site->duplicates++;
        } else {
            w->site->accepted++;
        }
        pthread_mutex_unlock(&c->mu);
        if (c->m_records) {
            const char *labels[] = {outcome};
            th_metric_add(c->m_records, labels, 1);
        }
    }
    if (status == 0 && !w->row.duplicate && !w->row.conflict) {
        th_ingest_hooks hooks = {c->cfg.progress, c->cfg.events, c->cfg.scoring};
        th_qr *qr = w->qr;
        w->qr = NULL;
        th_ingest_committed(&hooks, &w->row, qr);
    }
    write_job_free(w);
    th_wg_done(coll->writes);
}

/* Validates one entry like POST /fhir/QuestionnaireResponse and queues its write. */
static void consume(collection *coll, entry *e)
{
    th_collector *c = coll->c;
    site_run *s = &coll->sites[e->site];
    th_qr_options opts = {.now_unix_ns = (int64_t)th_clock_wall_ns(),
                          .max_future_skew_ns = TH_QR_DEFAULT_FUTURE_SKEW_NS};
    th_qr *qr = NULL;
    th_fhir_parse_error perr;
    int rc = th_qr_parse(c->cfg.qreg, e->json, e->len, &opts, &qr, &perr);
    if (rc != 0) {
        site_reject(s, rc == TH_EPARSE ? "the resource is not valid JSON" : "out of memory");
        return;
    }
    write_job *w = th_calloc(1, sizeof(*w));
    if (w == NULL) {
        th_qr_destroy(qr);
        site_reject(s, "out of memory");
        return;
    }
    w->coll = coll;
    w->site = s;
    w->qr = qr;
    const th_qr_fields *f = th_qr_get_fields(qr);
    /* Enrolment: the subject must be a patient of this trial at this site. */
    const char *reason = NULL;
    int visit_week = f->visit_week;
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(c->cfg.roster, &g);
    const th_roster_patient *p =
        view && f->patient_id ? th_roster_patient_find(view, f->patient_id) : NULL;
    if (view == NULL) {
        reason = "out of memory";
    } else if (f->patient_id == NULL) {
        reason = "the resource names no Patient subject";
    } else if (p == NULL || strcmp(p->trial_id, coll->trial_id) != 0) {
        reason = "the subject is not a patient of this trial";
    } else if (strcmp(p->site_id, s->id) != 0) {
        reason = "the subject is enrolled at another site";
    } else if (visit_week < 0 && f->authored) {
        const th_roster_trial *t = th_roster_trial_find(view, p->trial_id);
        visit_week = t ? th_roster_nearest_week(t, p->enrolled_on, f->authored_unix_s) : -1;
    }
    if (view) {
        th_snapshot_release(&g);
    }
    char detail[192];
    if (reason == NULL && !th_qr_valid(qr)) {
        /* Diagnostics name the rule and the linkId, never an answer's text. */
        const th_fhir_issue *issue = th_fhir_issues_get(th_qr_issues(qr), 0);
        snprintf(detail, sizeof(detail), "invalid: %s",
                 issue ? issue->diagnostics : "the resource does not validate");
        reason = detail;
    }
    if (reason) {
        site_reject(s, reason);
        write_job_free(w);
        return;
    }
    w->body = th_malloc(e->len + 1);
    if (w->body == NULL) {
        site_reject(s, "out of memory");
        write_job_free(w);
        return;
    }
    memcpy(w->body, e->json, e->len + 1);
    snprintf(w->trial_id, sizeof(w->trial_id), "%s", coll->trial_id);
    snprintf(w->site_id, sizeof(w->site_id), "%s", s->id);
    snprintf(w->resource_id, sizeof(w->resource_id), "%s", e->resource_id);
    th_qr_row *row = &w->row;
    row->trial_id = w->trial_id;
    row->site_id = w->site_id;
    row->patient_id = f->patient_id;
    row->questionnaire = f->questionnaire;
    row->instrument = th_fhir_instrument_url(f->instrument);
    row->identifier_system = f->identifier_system;
    row->identifier_value = f->identifier_value;
    row->status = f->status == TH_QR_STATUS_AMENDED ? "amended" : "completed";
    row->authored = f->authored;
    row->authored_s = f->authored_unix_s;
    row->visit_week = visit_week;
    row->body = w->body;
    row->body_len = e->len;
    SHA256((const unsigned char *)w->body, e->len, row->body_sha256);
    row->received_ms = wall_ms();
    row->source_resource = w->resource_id;
    w->job.apply = write_apply;
    w->job.done = write_done;
    if (th_wg_add(coll->writes, 1) != 0) {
        site_reject(s, "out of memory");
        write_job_free(w);
        return;
    }
    /* Waits for room in the writer's queue (backpressure up to the fetcher), until the
     * collection ends. */
    rc = th_writer_submit(coll->ctx, c->cfg.writer, &w->job);
    if (rc != 0) {
        th_wg_done(coll->writes);
        site_reject(s, rc == TH_ECANCELED || rc == TH_ETIMEDOUT ? "the collection ended first"
                                                                : "the store cannot take writes");
        write_job_free(w);
    }
}

static void *consumer_main(void *arg)
{
    collection *coll = arg;
    th_collector *c = coll->c;
    void *item;
    while (th_chan_recv(th_ctx_background(), coll->ch, &item) == 0) {
        entry *e = item;
        if (th_ctx_done(coll->ctx)) {
            site_reject(&coll->sites[e->site], "the collection ended first");
        } else {
            consume(coll, e);
        }
        th_free(e);
    }
    /* Every write queued so far completes (the writer always calls done). */
    if (th_wg_wait(th_ctx_background(), coll->writes) != 0) {
        th_log(TH_LOG_WARN, "collection: could not wait for its writes", 0, NULL);
    }
    pthread_join(coll->fetcher, NULL);
    int64_t received = 0, accepted = 0, duplicates = 0, rejected = 0;
    pthread_mutex_lock(&c->mu);
    coll->state = coll->user_canceled ? COLL_CANCELED : COLL_DONE;
    coll->finished_ms = wall_ms();
    for (size_t i = 0; i < coll->nsites; i++) {
        received += coll->sites[i].received;
        accepted += coll->sites[i].accepted;
        duplicates += coll->sites[i].duplicates;
        rejected += coll->sites[i].rejected;
    }
    pthread_mutex_unlock(&c->mu);
    TH_LOG(TH_LOG_INFO, "collection finished", TH_LOG_STR("collection", coll->id),
           TH_LOG_STR("trial", coll->trial_id), TH_LOG_INT("sites", coll->nsites),
           TH_LOG_INT("received", received), TH_LOG_INT("accepted", accepted),
           TH_LOG_INT("duplicates", duplicates), TH_LOG_INT("rejected", rejected),
           TH_LOG_STR("state", coll->user_canceled ? "canceled" : "done"));
    /* Release what only the run needed; the record stays for GET. */
    if (coll->hook_set) {
        (void)th_ctx_after_func_stop(&coll->wake_hook);
    }
    for (size_t i = 0; i < coll->nsites; i++) {
        site_run *s = &coll->sites[i];
        if (s->easy) {
            curl_easy_cleanup(s->easy);
            s->easy = NULL;
        }
        curl_slist_free_all(s->headers);
        s->headers = NULL;
        th_free(s->credential);
        s->credential = NULL;
        th_buf_free(&s->body);
    }
    curl_multi_cleanup(coll->multi);
    coll->multi = NULL;
    th_chan_destroy(coll->ch);
    coll->ch = NULL;
    th_wg_destroy(coll->writes);
    coll->writes = NULL;
    pthread_mutex_lock(&c->mu);
    c->running--;
    pthread_cond_broadcast(&c->idle);
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* ---- starting a collection --------------------------------------------------------------- */

static void collection_free(collection *coll)
{
    for (size_t i = 0; i < coll->nsites; i++) {
        site_run *s = &coll->sites[i];
        if (s->easy) {
            curl_easy_cleanup(s->easy);
        }
        curl_slist_free_all(s->headers);
        th_free(s->credential);
        th_free(s->base_url);
        th_free(s->url);
        th_buf_free(&s->body);
    }
    th_free(coll->sites);
    if (coll->multi) {
        curl_multi_cleanup(coll->multi);
    }
    th_chan_destroy(coll->ch);
    th_wg_destroy(coll->writes);
    th_ctx_release(coll->ctx);
    th_free(coll);
}

typedef struct site_pick {
    collection *coll;
    const th_collection_request *req;
    bool allow_http;
    int error;
    char *errbuf;
    size_t errlen;
    bool *named_found; /* per requested site */
} site_pick;

static bool wanted(const th_collection_request *req, const char *site_id, bool *found)
{
    if (req->sites == NULL) {
        return true;
    }
    for (size_t i = 0; req->sites[i]; i++) {
        if (strcmp(req->sites[i], site_id) == 0) {
            found[i] = true;
            return true;
        }
    }
    return false;
}

static int pick_site(void *arg, const th_site *site)
{
    site_pick *p = arg;
    collection *coll = p->coll;
    if (strcmp(site->trial_id, coll->trial_id) != 0 || !wanted(p->req, site->id, p->named_found)) {
        return 0;
    }
    bool has_url = site->fhir_base_url && site->fhir_base_url[0];
    if (!has_url) {
        if (p->req->sites) {
            snprintf(p->errbuf, p->errlen, "site %s has no FHIR base URL", site->id);
            p->error = TH_EINVAL;
            return 1;
        }
        return 0; /* not collected: only sites with a server are */
    }
    if (coll->nsites == MAX_SITES) {
        snprintf(p->errbuf, p->errlen, "more than %d sites", MAX_SITES);
        p->error = TH_EINVAL;
        return 1;
    }
    site_run *s = &coll->sites[coll->nsites];
    memset(s, 0, sizeof(*s));
    s->coll = coll;
    snprintf(s->id, sizeof(s->id), "%s", site->id);
    size_t len = strlen(site->fhir_base_url);
    while (len > 0 && site->fhir_base_url[len - 1] == '/') {
        len--;
    }
    if (!url_origin(site->fhir_base_url, s->origin, sizeof(s->origin), p->allow_http)) {
        snprintf(p->errbuf, p->errlen, "site %s: its FHIR base URL must be https%s", site->id,
                 p->allow_http ? " or http" : "");
        p->error = TH_EINVAL;
        return 1;
    }
    s->base_url = th_malloc(len + 1);
    if (s->base_url == NULL) {
        p->error = TH_ENOMEM;
        return 1;
    }
    memcpy(s->base_url, site->fhir_base_url, len);
    s->base_url[len] = '\0';
    th_buf u;
    th_buf_init(&u, 8192);
    th_buf_puts(&u, s->base_url);
    th_buf_puts(&u, "/QuestionnaireResponse?_count=100");
    if (coll->since[0]) {
        char *esc = curl_easy_escape(NULL, coll->since, 0);
        th_buf_printf(&u, "&_lastUpdated=gt%s", esc ? esc : "");
        curl_free(esc);
    }
    s->url = th_buf_take(&u, NULL);
    if (site->credential && site->credential[0]) {
        th_buf h;
        th_buf_init(&h, 8192);
        th_buf_puts(&h, "Authorization: Bearer ");
        th_buf_puts(&h, site->credential);
        char *header = th_buf_take(&h, NULL);
        s->headers = header ? curl_slist_append(NULL, header) : NULL;
        th_free(header);
    }
    struct curl_slist *accept = curl_slist_append(s->headers, "Accept: application/fhir+json");
    s->headers = accept ? accept : s->headers;
    coll->nsites++;
    if (s->url == NULL || accept == NULL) {
        p->error = TH_ENOMEM;
        return 1;
    }
    th_buf_init(&s->body, 0);
    return 0;
}

/* YYYY-MM-DD, or YYYY-MM-DDThh:mm:ss[.fraction](Z|+hh:mm|-hh:mm), with fields in range. */
static bool valid_since(const char *since)
{
    int y, mo, d, h = 0, mi = 0, sec = 0, n = 0;
    size_t len = strlen(since);
    if (len > 40 || sscanf(since, "%4d-%2d-%2d%n", &y, &mo, &d, &n) != 3 || n != 10 || mo < 1 ||
        mo > 12 || d < 1 || d > 31) {
        return false;
    }
    const char *p = since + 10;
    if (*p == '\0') {
        return true;
    }
    if (*p != 'T' || sscanf(p + 1, "%2d:%2d:%2d%n", &h, &mi, &sec, &n) != 3 || n != 8 || h > 23 ||
        mi > 59 || sec > 60) {
        return false;
    }
    p += 9;
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9') {
            p++;
        }
    }
    if (strcmp(p, "Z") == 0) {
        return true;
    }
    int oh, om;
    return (*p == '+' || *p == '-') && sscanf(p + 1, "%2d:%2d%n", &oh, &om, &n) == 2 && n == 5 &&
           p[6] == '\0' && oh <= 23 && om <= 59;
}

static void make_id(char id[32])
{
    unsigned char rnd[8];
    if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
        uint64_t t = th_clock_now_ns();
        memcpy(rnd, &t, sizeof(rnd));
    }
    snprintf(id, 32, "c%02x%02x%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2], rnd[3], rnd[4],
             rnd[5], rnd[6], rnd[7]);
}

/* Forgets the oldest finished collections beyond max_kept. Under mu. */
static void trim_locked(th_collector *c)
{
    while (c->nkept > c->cfg.max_kept) {
        collection **victim = NULL;
        for (collection **pp = &c->list; *pp; pp = &(*pp)->next) {
            if ((*pp)->state != COLL_RUNNING) {
                victim = pp; /* the last finished one is the oldest */
            }
        }
        if (victim == NULL) {
            return;
        }
        collection *old = *victim;
        *victim = old->next;
        c->nkept--;
        collection_free(old);
    }
}

int th_collector_start(th_collector *c, const th_collection_request *req, char id[32], char *errbuf,
                       size_t errlen)
{
    errbuf[0] = '\0';
    if (req->since && !valid_since(req->since)) {
        snprintf(errbuf, errlen, "since must be an RFC 3339 date-time");
        return TH_EINVAL;
    }
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(c->cfg.roster, &g);
    bool trial_known = view && th_roster_trial_find(view, req->trial_id) != NULL;
    if (view) {
        th_snapshot_release(&g);
    }
    if (!trial_known) {
        snprintf(errbuf, errlen, "no such trial");
        return TH_ENOTFOUND;
    }
    collection *coll = th_calloc(1, sizeof(*coll));
    size_t nreq = 0;
    while (req->sites && req->sites[nreq]) {
        nreq++;
    }
    bool *found = th_calloc(nreq + 1, sizeof(bool));
    if (coll == NULL || found == NULL) {
        th_free(coll);
        th_free(found);
        return TH_ENOMEM;
    }
    coll->c = c;
    make_id(coll->id);
    snprintf(coll->trial_id, sizeof(coll->trial_id), "%s", req->trial_id);
    snprintf(coll->since, sizeof(coll->since), "%s", req->since ? req->since : "");
    coll->started_ms = wall_ms();
    coll->sites = th_calloc(MAX_SITES, sizeof(site_run));
    int rc = coll->sites ? 0 : TH_ENOMEM;
    site_pick pick = {coll, req, c->cfg.allow_insecure_http, 0, errbuf, errlen, found};
    if (rc == 0) {
        rc = th_store_sites_each(c->cfg.store, pick_site, &pick);
        rc = pick.error ? pick.error : rc == 1 ? 0 : rc;
    }
    for (size_t i = 0; rc == 0 && i < nreq; i++) {
        if (!found[i]) {
            snprintf(errbuf, errlen, "site %s is not a site of this trial", req->sites[i]);
            rc = TH_ENOTFOUND;
        }
    }
    th_free(found);
    if (rc == 0 && coll->nsites == 0) {
        snprintf(errbuf, errlen, "no site of this trial has a FHIR base URL");
        rc = TH_EINVAL;
    }
    if (rc == 0) {
        /* Keep only the sites picked: the record stays in memory after the run. */
        site_run *fit = th_realloc_array(coll->sites, coll->nsites, sizeof(site_run));
        coll->sites = fit ? fit : coll->sites;
        for (size_t i = 0; i < coll->nsites; i++) {
            coll->sites[i].coll = coll;
        }
    }
    uint64_t timeout = req->timeout_ns ? req->timeout_ns : DEFAULT_TIMEOUT_NS;
    if (rc == 0) {
        rc = th_ctx_with_timeout(th_ctx_background(), timeout, &coll->ctx);
    }
    if (rc == 0) {
        rc = th_chan_create(c->cfg.channel_capacity, &coll->ch);
    }
    if (rc == 0) {
        rc = th_wg_create(&coll->writes);
    }
    if (rc == 0) {
        coll->multi = curl_multi_init();
        rc = coll->multi ? 0 : TH_ENOMEM;
    }
    if (rc == 0) {
        curl_multi_setopt(coll->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)c->cfg.max_in_flight);
        rc = th_ctx_after_func(coll->ctx, &coll->wake_hook, wake_fetcher, coll);
        coll->hook_set = rc == 0;
    }
    if (rc != 0) {
        collection_free(coll);
        return rc;
    }
    pthread_mutex_lock(&c->mu);
    if (c->closing || c->running >= MAX_RUNNING) {
        pthread_mutex_unlock(&c->mu);
        (void)th_ctx_after_func_stop(&coll->wake_hook);
        collection_free(coll);
        snprintf(errbuf, errlen, "too many collections are running");
        return TH_EOVERLOAD;
    }
    c->running++;
    coll->next = c->list;
    c->list = coll;
    c->nkept++;
    trim_locked(c);
    pthread_mutex_unlock(&c->mu);
    memcpy(id, coll->id, 32);
    /* Both threads are detached from the caller: the consumer joins the fetcher and ends the
     * run; th_collector_destroy() waits for `running` to drop to zero. */
    pthread_t consumer;
    rc = th__thread_start(&coll->fetcher, "th-collect-fetch", fetcher_main, coll);
    if (rc == 0) {
        coll->fetcher_started = true;
        rc = th__thread_start(&consumer, "th-collect-store", consumer_main, coll);
        if (rc == 0) {
            pthread_detach(consumer);
        }
    }
    if (rc != 0) {
        /* Rare (no threads left): end it as canceled, in line. */
        th_ctx_cancel(coll->ctx);
        if (coll->fetcher_started) {
            consumer_main(coll);
        } else {
            pthread_mutex_lock(&c->mu);
            coll->state = COLL_CANCELED;
            coll->finished_ms = wall_ms();
            c->running--;
            pthread_cond_broadcast(&c->idle);
            pthread_mutex_unlock(&c->mu);
        }
        snprintf(errbuf, errlen, "cannot start threads for the collection");
        return TH_ESYS;
    }
    TH_LOG(TH_LOG_INFO, "collection started", TH_LOG_STR("collection", coll->id),
           TH_LOG_STR("trial", coll->trial_id), TH_LOG_INT("sites", coll->nsites));
    return 0;
}

/* ---- reading, canceling ------------------------------------------------------------------- */

static collection *find_locked(th_collector *c, const char *id)
{
    for (collection *coll = c->list; coll; coll = coll->next) {
        if (strcmp(coll->id, id) == 0) {
            return coll;
        }
    }
    return NULL;
}

static void time_json(th_buf *b, const char *name, int64_t ms)
{
    char at[40];
    th_events_format_time((uint64_t)ms * TH_NS_PER_MS, at, sizeof(at));
    th_buf_printf(b, ",\"%s\":\"%s\"", name, at);
}

int th_collector_get(th_collector *c, const char *id, th_buf *out, char *trial_id_out)
{
    static const char *const coll_states[] = {"running", "done", "canceled"};
    pthread_mutex_lock(&c->mu);
    collection *coll = find_locked(c, id);
    if (coll == NULL) {
        pthread_mutex_unlock(&c->mu);
        return TH_ENOTFOUND;
    }
    snprintf(trial_id_out, TH_ID_MAX + 1, "%s", coll->trial_id);
    uint64_t now = th_clock_now_ns();
    th_buf_puts(out, "{\"id\":");
    th_buf_json_str(out, coll->id);
    th_buf_puts(out, ",\"trial\":");
    th_buf_json_str(out, coll->trial_id);
    th_buf_printf(out, ",\"state\":\"%s\"", coll_states[coll->state]);
    if (coll->since[0]) {
        th_buf_puts(out, ",\"since\":");
        th_buf_json_str(out, coll->since);
    }
    time_json(out, "started", coll->started_ms);
    if (coll->state != COLL_RUNNING) {
        time_json(out, "finished", coll->finished_ms);
    }
    th_buf_puts(out, ",\"sites\":[");
    for (size_t i = 0; i < coll->nsites; i++) {
        const site_run *s = &coll->sites[i];
        th_buf_puts(out, i ? ",{\"site\":" : "{\"site\":");
        th_buf_json_str(out, s->id);
        uint64_t end = s->end_ns ? s->end_ns : now;
        th_buf_printf(out,
                      ",\"state\":\"%s\",\"received\":%lld,\"accepted\":%lld,"
                      "\"duplicates\":%lld,\"rejected\":%lld,\"reasons\":[",
                      site_state_names[s->state], (long long)s->received, (long long)s->accepted,
                      (long long)s->duplicates, (long long)s->rejected);
        for (unsigned r = 0; r < s->nreasons; r++) {
            th_buf_puts(out, r ? "," : "");
            if (s->reason_count[r] > 1) {
                char counted[200];
                snprintf(counted, sizeof(counted), "%s (x%lld)", s->reasons[r],
                         (long long)s->reason_count[r]);
                th_buf_json_str(out, counted);
            } else {
                th_buf_json_str(out, s->reasons[r]);
            }
        }
        th_buf_printf(
            out, "],\"http_status\":%ld,\"duration_ms\":%llu,\"pages\":%u}", s->http_status,
            (unsigned long long)(s->start_ns ? (end - s->start_ns) / TH_NS_PER_MS : 0), s->pages);
    }
    th_buf_puts(out, "]}");
    pthread_mutex_unlock(&c->mu);
    return th_buf_failed(out) ? TH_ENOMEM : 0;
}

int th_collector_cancel(th_collector *c, const char *id, bool *was_running)
{
    pthread_mutex_lock(&c->mu);
    collection *coll = find_locked(c, id);
    if (coll == NULL) {
        pthread_mutex_unlock(&c->mu);
        return TH_ENOTFOUND;
    }
    *was_running = coll->state == COLL_RUNNING;
    if (*was_running) {
        coll->user_canceled = true;
    }
    th_ctx *ctx = *was_running ? th_ctx_ref(coll->ctx) : NULL;
    pthread_mutex_unlock(&c->mu);
    if (ctx) {
        th_ctx_cancel(ctx); /* wakes the fetcher: every transfer is removed */
        th_ctx_unref(ctx);
    }
    return 0;
}

int th_collector_wait(th_collector *c, const char *id, uint64_t timeout_ns)
{
    uint64_t deadline = th_clock_after_ns(timeout_ns);
    pthread_mutex_lock(&c->mu);
    int rc = 0;
    for (;;) {
        collection *coll = find_locked(c, id);
        if (coll == NULL) {
            rc = TH_ENOTFOUND;
            break;
        }
        if (coll->state != COLL_RUNNING) {
            break;
        }
        if (th_clock_now_ns() >= deadline) {
            rc = TH_ETIMEDOUT;
            break;
        }
        th__cond_wait_until(&c->idle, &c->mu, deadline);
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* ---- the schedule ------------------------------------------------------------------------ */

static void *scheduler_main(void *arg)
{
    th_collector *c = arg;
    while (th_ctx_sleep(c->stop, c->cfg.every_ns) == 0) {
        th_snapshot_guard g;
        const th_roster_view *view = th_roster_acquire(c->cfg.roster, &g);
        size_t n = view ? th_roster_trial_count(view) : 0;
        char(*ids)[TH_ID_MAX + 1] = n ? th_calloc(n, TH_ID_MAX + 1) : NULL;
        for (size_t i = 0; ids && i < n; i++) {
            snprintf(ids[i], TH_ID_MAX + 1, "%s", th_roster_trial_at(view, i)->id);
        }
        if (view) {
            th_snapshot_release(&g);
        }
        for (size_t i = 0; ids && i < n; i++) {
            th_collection_request req = {.trial_id = ids[i]};
            char id[32], err[160];
            int rc = th_collector_start(c, &req, id, err, sizeof(err));
            if (rc != 0 && rc != TH_ENOTFOUND) {
                TH_LOG(TH_LOG_WARN, "scheduled collection not started", TH_LOG_STR("trial", ids[i]),
                       TH_LOG_STR("error", th_errname(rc)));
            }
        }
        th_free(ids);
    }
    return NULL;
}

/* ---- life cycle --------------------------------------------------------------------------- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_result;

static void curl_init(void)
{
    curl_init_result = curl_global_init(CURL_GLOBAL_DEFAULT);
}

int th_collector_create(const th_collector_config *config, th_collector **out)
{
    if (config == NULL || config->store == NULL || config->writer == NULL ||
        config->roster == NULL || config->qreg == NULL) {
        return TH_EINVAL;
    }
    pthread_once(&curl_once, curl_init);
    if (curl_init_result != CURLE_OK) {
        return TH_ESYS;
    }
    th_collector *c = th_calloc(1, sizeof(*c));
    if (c == NULL) {
        return TH_ENOMEM;
    }
    c->cfg = *config;
    th_collector_config *k = &c->cfg;
    k->max_in_flight = k->max_in_flight ? k->max_in_flight : 16;
    k->site_timeout_ms = k->site_timeout_ms ? k->site_timeout_ms : 120000;
    k->connect_timeout_ms = k->connect_timeout_ms ? k->connect_timeout_ms : 10000;
    k->max_page_bytes = k->max_page_bytes ? k->max_page_bytes : (size_t)32 << 20;
    k->max_pages = k->max_pages ? k->max_pages : 10000;
    k->channel_capacity = k->channel_capacity ? k->channel_capacity : 1024;
    k->max_kept = k->max_kept ? k->max_kept : 256;
    pthread_mutex_init(&c->mu, NULL);
    int rc = th__cond_init_monotonic(&c->idle);
    static const char *const state_label[] = {"state"};
    static const char *const outcome_label[] = {"outcome"};
    if (rc == 0 && config->metrics) {
        rc = th_metrics_counter(config->metrics, "trialhub_collect_sites_total",
                                "Sites collected from, by how each ended.", 1, state_label,
                                &c->m_sites);
    }
    if (rc == 0 && config->metrics) {
        rc = th_metrics_counter(config->metrics, "trialhub_collect_records_total",
                                "Collected records: accepted, duplicate or rejected.", 1,
                                outcome_label, &c->m_records);
    }
    if (rc == 0) {
        rc = th_ctx_with_cancel(th_ctx_background(), &c->stop);
    }
    if (rc == 0 && k->every_ns) {
        rc = th__thread_start(&c->scheduler, "th-collect-every", scheduler_main, c);
        c->scheduler_started = rc == 0;
    }
    if (rc != 0) {
        th_collector_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

void th_collector_destroy(th_collector *c)
{
    if (c == NULL) {
        return;
    }
    if (c->stop) {
        th_ctx_cancel(c->stop);
    }
    if (c->scheduler_started) {
        pthread_join(c->scheduler, NULL);
    }
    pthread_mutex_lock(&c->mu);
    c->closing = true;
    for (collection *coll = c->list; coll; coll = coll->next) {
        if (coll->state == COLL_RUNNING) {
            coll->user_canceled = true;
            th_ctx_cancel(coll->ctx);
        }
    }
    while (c->running > 0) {
        pthread_cond_wait(&c->idle, &c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    while (c->list) {
        collection *coll = c->list;
        c->list = coll->next;
        collection_free(coll);
    }
    th_ctx_release(c->stop);
    pthread_cond_destroy(&c->idle);
    pthread_mutex_destroy(&c->mu);
    th_free(c);
}
