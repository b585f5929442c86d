/* Admin endpoints: trials, sites, enrolment, and API keys. Every write goes through the
 * group-commit writer (the request is suspended meanwhile), and the in-memory roster or keyring
 * is reloaded after the commit, before the answer, so that the next request sees the change. */
#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "http/api.h"
#include "trialhub/progress.h"
#include "trialhub/alloc.h"
#include "trialhub/auth.h"
#include "trialhub/clock.h"
#include "trialhub/log.h"

/* Collected validation problems for a 422 answer. */
typedef struct problems {
    th_buf list; /* JSON array items */
    unsigned n;
} problems;

static void problem(problems *p, const char *pointer, const char *detail)
{
    th_buf_puts(&p->list, p->n ? ",{\"pointer\":" : "{\"pointer\":");
    th_buf_json_str(&p->list, pointer);
    th_buf_puts(&p->list, ",\"detail\":");
    th_buf_json_str(&p->list, detail);
    th_buf_puts(&p->list, "}");
    p->n++;
}

/* Answers 422 with every problem and returns true, or returns false if there were none. */
static bool answer_problems(th_req *req, problems *p)
{
    if (p->n == 0) {
        th_buf_free(&p->list);
        return false;
    }
    th_buf b;
    th_buf_init(&b, 0);
    th_buf_puts(&b, "{\"type\":\"about:blank\",\"title\":\"Unprocessable Content\",\"status\":422,"
                    "\"detail\":\"the request body is not valid\",\"errors\":[");
    th_buf_append(&b, p->list.data, p->list.len);
    th_buf_puts(&b, "],\"request_id\":");
    th_buf_json_str(&b, req->req_id);
    th_buf_puts(&b, "}");
    th_buf_free(&p->list);
    th__resp_buf(req, 422, "application/problem+json", &b);
    return true;
}

bool th__id_valid(const char *id);

bool th__id_valid(const char *id)
{
    size_t n = 0;
    if (id == NULL) {
        return false;
    }
    for (; id[n]; n++) {
        unsigned char c = (unsigned char)id[n];
        if (!(isalnum(c) || c == '-' || c == '_' || c == '.')) {
            return false;
        }
    }
    return n >= 1 && n <= TH_ID_MAX;
}

/* Returns the string member or NULL; records a problem if present but wrong, or missing when
 * required. */
static const char *get_id(json_t *obj, const char *name, bool required, problems *p)
{
    char pointer[64];
    snprintf(pointer, sizeof(pointer), "/%s", name);
    json_t *v = json_object_get(obj, name);
    if (v == NULL || json_is_null(v)) {
        if (required) {
            problem(p, pointer, "required");
        }
        return NULL;
    }
    if (!json_is_string(v) || !th__id_valid(json_string_value(v))) {
        problem(p, pointer, "must be 1-64 characters of letters, digits, '-', '_' or '.'");
        return NULL;
    }
    return json_string_value(v);
}

static const char *get_name(json_t *obj, problems *p)
{
    json_t *v = json_object_get(obj, "name");
    if (v == NULL) {
        problem(p, "/name", "required");
        return NULL;
    }
    if (!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) > 200) {
        problem(p, "/name", "must be a string of 1-200 characters");
        return NULL;
    }
    return json_string_value(v);
}

static bool date_valid(const char *s)
{
    int y, m, d;
    char extra;
    if (s == NULL || strlen(s) != 10 || sscanf(s, "%4d-%2d-%2d%c", &y, &m, &d, &extra) != 3) {
        return false;
    }
    struct tm tm = {.tm_year = y - 1900, .tm_mon = m - 1, .tm_mday = d, .tm_hour = 12};
    time_t t = timegm(&tm);
    struct tm back;
    gmtime_r(&t, &back);
    return m >= 1 && m <= 12 && back.tm_mday == d && back.tm_mon == m - 1 && y >= 1900;
}

/* ---- state shared by the write handlers ---------------------------------------------------- */

typedef struct admin_write {
    th_api_write w;
    json_t *body; /* keeps the strings below alive */
    th_trial trial;
    th_site site;
    th_patient patient;
    th_key key;
    char key_text[TH_KEY_TEXT_MAX + 1];
    char arms[1024];
    char schedule[512];
    const char *key_id;
    int64_t now_ms;
    bool created;
} admin_write;

static void admin_write_free(void *arg)
{
    admin_write *a = arg;
    json_decref(a->body);
    memset(a->key_text, 0, sizeof(a->key_text));
    th_free(a);
}

static admin_write *admin_write_new(th_req *req, json_t *body)
{
    admin_write *a = th_calloc(1, sizeof(*a));
    if (a == NULL) {
        json_decref(body);
        th__resp_error(req, 503, "out of memory");
        return NULL;
    }
    a->body = body;
    req->state = a;
    req->state_free = admin_write_free;
    return a;
}

static void answer_write_error(th_req *req, int status, const char *what)
{
    char detail[160];
    switch (status) {
    case TH_EEXIST:
        snprintf(detail, sizeof(detail), "%s already exists", what);
        th__resp_error(req, 409, detail);
        break;
    case TH_ENOTFOUND:
        snprintf(detail, sizeof(detail), "%s refers to something that does not exist", what);
        th__resp_error(req, 404, detail);
        break;
    default:
        th__resp_error(req, 503, "the store cannot take writes now");
    }
}

/* ---- trials ------------------------------------------------------------------------------- */

static int trial_apply(th_store *store, th_api_write *w)
{
    return th_store_trial_insert(store, &((admin_write *)w)->trial);
}

static void roster_reload(th_req *req)
{
    th_progress_note_roster(th__api_of(req)->cfg->progress);
    if (th_roster_reload(th__api_of(req)->cfg->roster) != 0) {
        TH_LOG(TH_LOG_ERROR, "roster reload failed after a commit",
               TH_LOG_STR("request_id", req->req_id));
    }
}

static void trial_done(th_api_write *w, int status)
{
    admin_write *a = (admin_write *)w;
    th_req *req = w->req;
    if (status != 0) {
        answer_write_error(req, status, "trial");
        return;
    }
    roster_reload(req);
    json_t *out = json_pack("{s:s,s:s,s:O,s:O}", "id", a->trial.id, "name", a->trial.name, "arms",
                            json_object_get(a->body, "arms"), "schedule_weeks",
                            json_object_get(a->body, "schedule_weeks"));
    snprintf(req->resp.location, sizeof(req->resp.location), "/v1/trials/%s", a->trial.id);
    th__api_json(req, 201, out);
}

static void trials_post(th_req *req)
{
    json_t *body = th__api_json_body(req);
    if (body == NULL) {
        return;
    }
    problems p = {.n = 0};
    th_buf_init(&p.list, 0);
    const char *id = get_id(body, "id", true, &p);
    const char *name = get_name(body, &p);
    json_t *arms = json_object_get(body, "arms");
    size_t i;
    json_t *v;
    if (!json_is_array(arms) || json_array_size(arms) == 0 || json_array_size(arms) > 16) {
        problem(&p, "/arms", "must be an array of 1-16 arm names");
    } else {
        json_array_foreach(arms, i, v)
        {
            if (!json_is_string(v) || !th__id_valid(json_string_value(v))) {
                char pointer[32];
                snprintf(pointer, sizeof(pointer), "/arms/%zu", i);
                problem(&p, pointer, "must be an arm name (1-64 letters, digits, '-_.')");
            }
        }
    }
    json_t *weeks = json_object_get(body, "schedule_weeks");
    if (!json_is_array(weeks) || json_array_size(weeks) == 0 || json_array_size(weeks) > 32) {
        problem(&p, "/schedule_weeks", "must be an array of 1-32 visit weeks");
    } else {
        json_int_t prev = -1;
        json_array_foreach(weeks, i, v)
        {
            if (!json_is_integer(v) || json_integer_value(v) <= prev ||
                json_integer_value(v) > 520) {
                char pointer[48];
                snprintf(pointer, sizeof(pointer), "/schedule_weeks/%zu", i);
                problem(&p, pointer, "weeks must be ascending integers from 0 to 520");
                break;
            }
            prev = json_integer_value(v);
        }
    }
    if (answer_problems(req, &p)) {
        json_decref(body);
        return;
    }
    admin_write *a = admin_write_new(req, body);
    if (a == NULL) {
        return;
    }
    char *arms_text = json_dumps(arms, JSON_COMPACT);
    char *weeks_text = json_dumps(weeks, JSON_COMPACT);
    snprintf(a->arms, sizeof(a->arms), "%s", arms_text ? arms_text : "[]");
    snprintf(a->schedule, sizeof(a->schedule), "%s", weeks_text ? weeks_text : "[]");
    free(arms_text);
    free(weeks_text);
    a->trial = (th_trial){id, name, a->arms, a->schedule};
    a->w.apply = trial_apply;
    a->w.done = trial_done;
    th__api_write(req, &a->w);
}

/* Lists the trials the key may see: all of them for admin keys, the key's own trial for
 * investigator and site keys (what the dashboard offers to pick from); patient keys get 403. */
static void trials_get(th_req *req)
{
    const th_key *key = &req->key;
    if (key->role == TH_ROLE_PATIENT) {
        th__resp_error(req, 403, "this key may not list trials");
        return;
    }
    json_t *list = json_array();
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(th__api_of(req)->cfg->roster, &g);
    bool ok = list != NULL && view != NULL;
    size_t ntrials = view ? th_roster_trial_count(view) : 0;
    for (size_t i = 0; ok && i < ntrials; i++) {
        const th_roster_trial *t = th_roster_trial_at(view, i);
        if (key->role != TH_ROLE_ADMIN && strcmp(t->id, key->trial_id) != 0) {
            continue;
        }
        json_t *arms = json_loads(t->arms_json, 0, NULL);
        json_t *weeks = json_loads(t->schedule_json, 0, NULL);
        json_t *o = json_pack("{s:s,s:s,s:o*,s:o*}", "id", t->id, "name", t->name, "arms", arms,
                              "schedule_weeks", weeks);
        ok = o != NULL && json_array_append_new(list, o) == 0;
    }
    th_snapshot_release(&g);
    if (!ok) {
        json_decref(list);
        th__resp_error(req, 503, "out of memory");
        return;
    }
    th__api_json(req, 200, json_pack("{s:o}", "trials", list));
}

/* ---- sites -------------------------------------------------------------------------------- */

static int site_apply(th_store *store, th_api_write *w)
{
    return th_store_site_insert(store, &((admin_write *)w)->site);
}

static void site_done(th_api_write *w, int status)
{
    admin_write *a = (admin_write *)w;
    th_req *req = w->req;
    if (status != 0) {
        answer_write_error(req, status, status == TH_ENOTFOUND ? "the trial" : "site");
        return;
    }
    roster_reload(req);
    snprintf(req->resp.location, sizeof(req->resp.location), "/v1/trials/%s/sites/%s",
             a->site.trial_id, a->site.id);
    th__api_json(req, 201,
                 json_pack("{s:s,s:s,s:s}", "trial", a->site.trial_id, "id", a->site.id, "name",
                           a->site.name));
}

static bool trial_exists(th_req *req, const char *trial_id)
{
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(th__api_of(req)->cfg->roster, &g);
    bool exists = view && th_roster_trial_find(view, trial_id) != NULL;
    th_snapshot_release(&g);
    return exists;
}

static void sites_post(th_req *req)
{
    const char *trial_id = req->params[0];
    if (!trial_exists(req, trial_id)) {
        th__resp_error(req, 404, "no such trial");
        return;
    }
    json_t *body = th__api_json_body(req);
    if (body == NULL) {
        return;
    }
    problems p = {.n = 0};
    th_buf_init(&p.list, 0);
    const char *id = get_id(body, "id", true, &p);
    const char *name = get_name(body, &p);
    if (answer_problems(req, &p)) {
        json_decref(body);
        return;
    }
    admin_write *a = admin_write_new(req, body);
    if (a == NULL) {
        return;
    }
    a->site = (th_site){trial_id, id, name, NULL, NULL};
    a->w.apply = site_apply;
    a->w.done = site_done;
    th__api_write(req, &a->w);
}

/* PUT /v1/trials/{id}/sites/{site}: create or update a site with its FHIR server for
 * collections. The credential is write-only: stored, never echoed, logged or quoted. */
static int site_put_apply(th_store *store, th_api_write *w)
{
    admin_write *a = (admin_write *)w;
    return th_store_site_upsert(store, &a->site, &a->created);
}

static void site_put_done(th_api_write *w, int status)
{
    admin_write *a = (admin_write *)w;
    th_req *req = w->req;
    if (status != 0) {
        answer_write_error(req, status, "the trial");
        return;
    }
    th_progress_note_roster(th__api_of(req)->cfg->progress);
    roster_reload(req);
    snprintf(req->resp.location, sizeof(req->resp.location), "/v1/trials/%s/sites/%s",
             a->site.trial_id, a->site.id);
    json_t *out = json_pack("{s:s,s:s,s:s}", "trial", a->site.trial_id, "id", a->site.id, "name",
                            a->site.name);
    if (out && a->site.fhir_base_url && a->site.fhir_base_url[0]) {
        json_object_set_new(out, "fhir_base_url", json_string(a->site.fhir_base_url));
    }
    th__api_json(req, a->created ? 201 : 200, out);
}

static void site_put(th_req *req)
{
    const char *trial_id = req->params[0];
    const char *site_id = req->params[1];
    if (!trial_exists(req, trial_id)) {
        th__resp_error(req, 404, "no such trial");
        return;
    }
    json_t *body = th__api_json_body(req);
    if (body == NULL) {
        return;
    }
    problems p = {.n = 0};
    th_buf_init(&p.list, 0);
    if (!th__id_valid(site_id)) {
        problem(&p, "/id", "the site id in the path must be 1-64 letters, digits, '-', '_' or '.'");
    }
    const char *name = get_name(body, &p);
    const char *url = NULL, *credential = NULL;
    json_t *v = json_object_get(body, "fhir_base_url");
    if (v && !json_is_null(v)) {
        url = json_string_value(v);
        if (url == NULL || !th__api_url_ok(url)) {
            problem(&p, "/fhir_base_url", "must be an http(s) URL of at most 2000 characters");
        }
    }
    v = json_object_get(body, "credential");
    if (v) {
        credential = json_is_null(v) ? "" : json_string_value(v);
        if (credential == NULL || strlen(credential) > 4096 ||
            strpbrk(credential, "\r\n") != NULL) {
            /* Never quote it back. */
            problem(&p, "/credential", "must be a string of at most 4096 characters, one line");
        }
    }
    if (answer_problems(req, &p)) {
        json_decref(body);
        return;
    }
    admin_write *a = admin_write_new(req, body);
    if (a == NULL) {
        return;
    }
    a->site = (th_site){trial_id, site_id, name, url ? url : "", credential};
    a->w.apply = site_put_apply;
    a->w.done = site_put_done;
    th__api_write(req, &a->w);
}

/* ---- patients ----------------------------------------------------------------------------- */

static int patient_apply(th_store *store, th_api_write *w)
{
    return th_store_patient_insert(store, &((admin_write *)w)->patient);
}

static void patient_done(th_api_write *w, int status)
{
    admin_write *a = (admin_write *)w;
    th_req *req = w->req;
    if (status != 0) {
        answer_write_error(req, status, status == TH_ENOTFOUND ? "the site" : "patient id");
        return;
    }
    roster_reload(req);
    snprintf(req->resp.location, sizeof(req->resp.location), "/v1/trials/%s/patients/%s",
             a->patient.trial_id, a->patient.id);
    th__api_json(req, 201,
                 json_pack("{s:s,s:s,s:s,s:s,s:s}", "trial", a->patient.trial_id, "id",
                           a->patient.id, "site", a->patient.site_id, "arm", a->patient.arm,
                           "enrolled_on", a->patient.enrolled_on));
}

static bool arm_listed(const char *arms_json, const char *arm)
{
    char quoted[TH_ID_MAX + 3];
    snprintf(quoted, sizeof(quoted), "\"%s\"", arm);
    return strstr(arms_json, quoted) != NULL;
}

static void patients_post(th_req *req)
{
    const char *trial_id = req->params[0];
    json_t *body = th__api_json_body(req);
    if (body == NULL) {
        return;
    }
    problems p = {.n = 0};
    th_buf_init(&p.list, 0);
    const char *id = get_id(body, "id", true, &p);
    const char *site = get_id(body, "site", true, &p);
    const char *arm = get_id(body, "arm", true, &p);
    json_t *on = json_object_get(body, "enrolled_on");
    const char *enrolled_on = json_is_string(on) ? json_string_value(on) : NULL;
    if (!date_valid(enrolled_on)) {
        problem(&p, "/enrolled_on", "must be a date, YYYY-MM-DD");
    }
    th_snapshot_guard g;
    const th_roster_view *view = th_roster_acquire(th__api_of(req)->cfg->roster, &g);
    const th_roster_trial *trial = view ? th_roster_trial_find(view, trial_id) : NULL;
    if (trial == NULL) {
        th_snapshot_release(&g);
        json_decref(body);
        th_buf_free(&p.list);
        th__resp_error(req, 404, "no such trial");
        return;
    }
    if (site && !th_roster_site_exists(view, trial_id, site)) {
        problem(&p, "/site", "no such site in this trial");
    }
    if (arm && !arm_listed(trial->arms_json, arm)) {
        problem(&p, "/arm", "not one of the trial's arms");
    }
    th_snapshot_release(&g);
    if (answer_problems(req, &p)) {
        json_decref(body);
        return;
    }
    admin_write *a = admin_write_new(req, body);
    if (a == NULL) {
        return;
    }
    a->patient = (th_patient){trial_id, id, site, arm, enrolled_on};
    a->w.apply = patient_apply;
    a->w.done = patient_done;
    th__api_write(req, &a->w);
}

/* ---- keys --------------------------------------------------------------------------------- */

static int key_apply(th_store *store, th_api_write *w)
{
    return th_store_key_insert(store, &((admin_write *)w)->key);
}

static void keyring_reload(th_req *req)
{
    if (th_keyring_reload(th__api_of(req)->cfg->keyring) != 0) {
        TH_LOG(TH_LOG_ERROR, "keyring reload failed after a commit",
               TH_LOG_STR("request_id", req->req_id));
    }
}

static json_t *key_json(const th_key *k)
{
    json_t *o = json_pack("{s:s,s:s,s:I}", "id", k->id, "role", th_role_name(k->role), "created_ms",
                          (json_int_t)k->created_ms);
    if (o && k->trial_id[0]) {
        json_object_set_new(o, "trial", json_string(k->trial_id));
    }
    if (o && k->site_id[0]) {
        json_object_set_new(o, "site", json_string(k->site_id));
    }
    if (o && k->patient_id[0]) {
        json_object_set_new(o, "patient", json_string(k->patient_id));
    }
    if (o && k->revoked_ms) {
        json_object_set_new(o, "revoked_ms", json_integer(k->revoked_ms));
    }
    return o;
}

static void key_done(th_api_write *w, int status)
{
    admin_write *a = (admin_write *)w;
    th_req *req = w->req;
    if (status != 0) {
        answer_write_error(req, status, "key");
        return;
    }
    keyring_reload(req);
    json_t *out = key_json(&a->key);
    if (out) {
        json_object_set_new(out, "key", json_string(a->key_text));
    }
    snprintf(req->resp.location, sizeof(req->resp.location), "/v1/keys/%s", a->key.id);
    th__api_json(req, 201, out);
}

static void keys_post(th_req *req)
{
    json_t *body = th__api_json_body(req);
    if (body == NULL) {
        return;
    }
    problems p = {.n = 0};
    th_buf_init(&p.list, 0);
    json_t *role_v = json_object_get(body, "role");
    th_role role = TH_ROLE_PATIENT;
    if (!json_is_string(role_v) || th_role_parse(json_string_value(role_v), &role) != 0) {
        problem(&p, "/role", "must be patient, site, investigator or admin");
    }
    const char *trial = get_id(body, "trial", false, &p);
    const char *site = get_id(body, "site", false, &p);
    const char *patient = get_id(body, "patient", false, &p);
    if (p.n == 0) {
        th_snapshot_guard g;
        const th_roster_view *view = th_roster_acquire(th__api_of(req)->cfg->roster, &g);
        if (trial && (view == NULL || th_roster_trial_find(view, trial) == NULL)) {
            problem(&p, "/trial", "no such trial");
        }
        if (trial && site && view && !th_roster_site_exists(view, trial, site)) {
            problem(&p, "/site", "no such site in this trial");
        }
        if (trial && patient && view) {
            const th_roster_patient *rp = th_roster_patient_find(view, patient);
            if (rp == NULL || strcmp(rp->trial_id, trial) != 0) {
                problem(&p, "/patient", "no such patient in this trial");
            }
        }
        th_snapshot_release(&g);
    }
    admin_write *a = NULL;
    if (p.n == 0) {
        a = admin_write_new(req, body);
        if (a == NULL) {
            th_buf_free(&p.list);
            return;
        }
        body = NULL;
        if (th_key_generate(role, trial, site, patient, &a->key, a->key_text) != 0) {
            problem(&p, "",
                    "role and scope do not fit: patient keys need trial and patient, "
                    "site keys trial and site, investigator keys trial, admin keys none");
        }
    }
    if (answer_problems(req, &p)) {
        json_decref(body);
        return;
    }
    a->key.created_ms = (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);
    a->w.apply = key_apply;
    a->w.done = key_done;
    th__api_write(req, &a->w);
}

static int list_key(void *arg, const th_key *k)
{
    json_t *o = key_json(k);
    return o && json_array_append_new(arg, o) == 0 ? 0 : TH_ENOMEM;
}

static void keys_get(th_req *req)
{
    json_t *list = json_array();
    if (list == NULL || th_store_keys_each(th__api_of(req)->cfg->store, list_key, list) != 0) {
        json_decref(list);
        th__resp_error(req, 503, "cannot list keys now");
        return;
    }
    th__api_json(req, 200, json_pack("{s:o}", "keys", list));
}

static int key_revoke_apply(th_store *store, th_api_write *w)
{
    admin_write *a = (admin_write *)w;
    return th_store_key_revoke(store, a->key_id, a->now_ms);
}

static void key_revoke_done(th_api_write *w, int status)
{
    th_req *req = w->req;
    if (status == TH_ENOTFOUND) {
        th__resp_error(req, 404, "no active key with this id");
        return;
    }
    if (status != 0) {
        answer_write_error(req, status, "key");
        return;
    }
    keyring_reload(req);
    th__resp_static(req, 204, NULL, "");
}

static void keys_delete(th_req *req)
{
    admin_write *a = admin_write_new(req, NULL);
    if (a == NULL) {
        return;
    }
    a->key_id = req->params[0];
    a->now_ms = (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);
    a->w.apply = key_revoke_apply;
    a->w.done = key_revoke_done;
    th__api_write(req, &a->w);
}

static const char *const json_types[] = {"application/json", NULL};

const th_route th__admin_routes[] = {
    {.method = "GET", .pattern = "/v1/trials", .handler = trials_get, .auth = TH_AUTH_ANY},
    {.method = "POST",
     .pattern = "/v1/trials",
     .handler = trials_post,
     .auth = TH_AUTH_ADMIN,
     .body_limit = 64 * 1024,
     .content_types = json_types},
    {.method = "PUT",
     .pattern = "/v1/trials/{id}/sites/{site}",
     .handler = site_put,
     .auth = TH_AUTH_ADMIN,
     .body_limit = 16 * 1024,
     .content_types = json_types},
    {.method = "POST",
     .pattern = "/v1/trials/{id}/sites",
     .handler = sites_post,
     .auth = TH_AUTH_ADMIN,
     .body_limit = 64 * 1024,
     .content_types = json_types},
    {.method = "POST",
     .pattern = "/v1/trials/{id}/patients",
     .handler = patients_post,
     .auth = TH_AUTH_ADMIN,
     .body_limit = 64 * 1024,
     .content_types = json_types},
    {.method = "POST",
     .pattern = "/v1/keys",
     .handler = keys_post,
     .auth = TH_AUTH_ADMIN,
     .body_limit = 64 * 1024,
     .content_types = json_types},
    {.method = "GET", .pattern = "/v1/keys", .handler = keys_get, .auth = TH_AUTH_ADMIN},
    {.method = "DELETE", .pattern = "/v1/keys/{id}", .handler = keys_delete, .auth = TH_AUTH_ADMIN},
};
const size_t th__admin_nroutes = sizeof(th__admin_routes) / sizeof(th__admin_routes[0]);
