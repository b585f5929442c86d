/* The store: trials, sites, patients, API keys and questionnaire responses, behind one interface
 * with one implementation per backend (SQLite now, PostgreSQL at scale-out), chosen by URL like
 * curl's TLS backends or SQLite's VFS. Writes happen only inside a transaction owned by the
 * group-commit writer (writer.h); reads may come from any thread. */
#ifndef TRIALHUB_STORE_H
#define TRIALHUB_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"

typedef struct th_store th_store;

/* A trial as created by an admin. Strings are owned by whoever filled the struct. */
typedef struct th_trial {
    const char *id;
    const char *name;
    const char *arms_json;     /* JSON array of arm names, e.g. ["A","B"] */
    const char *schedule_json; /* JSON array of visit weeks, e.g. [0,2,4,8,12] */
} th_trial;

typedef struct th_site {
    const char *trial_id;
    const char *id;
    const char *name;
    const char *fhir_base_url; /* the site's FHIR server for collections; NULL/"" when none */
    const char *credential;    /* its bearer token: never returned, logged or shown in errors.
                                * On upsert NULL keeps the stored one, "" removes it. */
} th_site;

typedef struct th_patient {
    const char *trial_id;
    const char *id; /* pseudonymous patient id, unique across the store */
    const char *site_id;
    const char *arm;
    const char *enrolled_on; /* YYYY-MM-DD */
} th_patient;

/* API key roles, least to most powerful. */
typedef enum th_role {
    TH_ROLE_PATIENT = 1,
    TH_ROLE_SITE,
    TH_ROLE_INVESTIGATOR,
    TH_ROLE_ADMIN,
} th_role;

#define TH_KEY_HASH_LEN 32 /* SHA-256 */
#define TH_ID_MAX       64 /* longest id the API accepts (trial, site, patient, key) */

/* An API key as stored: never the key itself, only its hash. Scope fields are "" when unset. */
typedef struct th_key {
    char id[TH_ID_MAX + 1];
    unsigned char hash[TH_KEY_HASH_LEN];
    th_role role;
    char trial_id[TH_ID_MAX + 1];
    char site_id[TH_ID_MAX + 1];
    char patient_id[TH_ID_MAX + 1];
    int64_t created_ms;
    int64_t revoked_ms; /* 0 while active */
} th_key;

/* A questionnaire response to insert, and what the insert found. */
typedef struct th_qr_row {
    /* in */
    const char *trial_id;
    const char *site_id;
    const char *patient_id;
    const char *questionnaire;     /* canonical as sent */
    const char *instrument;        /* registry key of the matched instrument */
    const char *identifier_system; /* NULL when the resource has no identifier */
    const char *identifier_value;
    const char *status;
    const char *authored;
    int64_t authored_s;
    int visit_week; /* -1: unknown */
    const void *body;
    size_t body_len;
    unsigned char body_sha256[32];
    int64_t received_ms;
    const char *source_resource; /* collected from site_id's FHIR server: its resource id there
                                  * (NULL when posted to us). The same site and resource id, or
                                  * the same identifier, is a duplicate, never a second row. */
    /* out */
    int64_t id;     /* the new row, or the one already stored */
    bool duplicate; /* same identifier, same content: the stored one is the answer */
    bool conflict;  /* same identifier, different content: nothing stored */
} th_qr_row;

/* A stored questionnaire response as read back. The body is owned by the struct; free with
 * th_qr_stored_free(). */
typedef struct th_qr_stored {
    int64_t id;
    char trial_id[TH_ID_MAX + 1];
    char site_id[TH_ID_MAX + 1];
    char patient_id[TH_ID_MAX + 1];
    char instrument[128];
    char processing[16]; /* pending | scored */
    bool has_score;
    double score;
    bool score_is_int;
    char band[32];
    bool alert;
    int version;
    int64_t received_ms;
    int visit_week; /* -1: unknown */
    void *body;
    size_t body_len;
} th_qr_stored;

/* The result of scoring, written back by the writer. */
typedef struct th_qr_score {
    /* in */
    int64_t id;
    bool has_score;
    double score;
    bool score_is_int;
    const char *band; /* NULL when the instrument has none */
    bool alert;
    /* out */
    int64_t seq; /* the score's place in commit order (1, 2, ...), for the progress cache */
} th_qr_score;

/* One group of stored responses, as the progress rebuild reads them: every response of one
 * patient for one instrument and visit week (-1: unknown). Strings live during the callback. */
typedef struct th_progress_cell {
    const char *trial_id;
    const char *site_id;
    const char *patient_id;
    const char *instrument;
    int visit_week;
    int64_t count;  /* responses */
    int64_t today;  /* of which received since today_start_ms */
    int64_t scored; /* of which have a numeric score */
    double score_sum;
} th_progress_cell;

/* What th_store_progress_load() reads, in one consistent read transaction. */
typedef struct th_progress_load {
    /* in */
    int64_t today_start_ms;
    int (*cell)(void *arg, const th_progress_cell *cell);
    /* open safety alerts of one site */
    int (*alerts)(void *arg, const char *trial_id, const char *site_id, int64_t open);
    void *arg;
    /* out: the store's change sequence the load covers */
    int64_t max_qr_id;
    int64_t max_score_seq;
} th_progress_load;

/* Opens the store at url: `sqlite:///abs/path.db`, `sqlite://./rel/path.db` or `sqlite::memory:`
 * (tests). Creates the file and its folder if missing, verifies WAL and synchronous=FULL, and
 * applies pending schema migrations. *out is owned by the caller (th_store_close()). Returns 0,
 * TH_EINVAL (unknown scheme or bad URL), TH_EUNSUPPORTED (a known backend not built in), TH_EIO
 * (cannot open, migrate or verify durability; errbuf says why) or TH_ENOMEM. */
TH_MUST_CHECK int th_store_open(const char *url, th_store **out, char *errbuf, size_t errlen);

/* Closes the store. NULL is a no-op. No other call may be running. */
void th_store_close(th_store *store);

/* Returns "sqlite" or "postgres". */
const char *th_store_backend(const th_store *store);

/* ---- writes: only between th_store_begin() and th_store_commit()/rollback(), on the writer
 * thread. Each returns 0, TH_EEXIST/TH_ENOTFOUND where stated, or TH_EIO (the transaction must
 * then be rolled back). */

TH_MUST_CHECK int th_store_begin(th_store *store);
/* Commits durably (fsync per synchronous=FULL). TH_EIO here is fatal for the store: the caller
 * must not retry the commit (PostgreSQL's fsync lesson). */
TH_MUST_CHECK int th_store_commit(th_store *store);
void th_store_rollback(th_store *store);

/* TH_EEXIST if the id is taken. */
TH_MUST_CHECK int th_store_trial_insert(th_store *store, const th_trial *trial);
/* TH_ENOTFOUND if the trial does not exist, TH_EEXIST if the site does. */
TH_MUST_CHECK int th_store_site_insert(th_store *store, const th_site *site);
/* Creates the site or replaces its name and FHIR base URL (and its credential unless NULL).
 * TH_ENOTFOUND if the trial does not exist. Sets *created. */
TH_MUST_CHECK int th_store_site_upsert(th_store *store, const th_site *site, bool *created);
/* TH_ENOTFOUND if the trial or site does not exist, TH_EEXIST if the patient id is taken. */
TH_MUST_CHECK int th_store_patient_insert(th_store *store, const th_patient *patient);
/* TH_EEXIST if the id or hash is taken. */
TH_MUST_CHECK int th_store_key_insert(th_store *store, const th_key *key);
/* Marks the key revoked at revoked_ms; TH_ENOTFOUND if no active key has that id. */
TH_MUST_CHECK int th_store_key_revoke(th_store *store, const char *key_id, int64_t revoked_ms);
/* Inserts row unless its identifier is already stored: fills row->id and row->duplicate or
 * row->conflict (then nothing is written). */
TH_MUST_CHECK int th_store_qr_insert(th_store *store, th_qr_row *row);
/* Stores a score (and an alert row when score->alert) and fills score->seq. TH_ENOTFOUND if no
 * such response is pending (none, or scored already: a response is scored once). */
TH_MUST_CHECK int th_store_qr_set_score(th_store *store, th_qr_score *score, int64_t now_ms);

/* ---- reads: any thread, each on a connection of its own from a small internal pool. */

/* Calls fn for each trial / site / patient / key (in id order); stops at fn's first non-zero
 * return, which is returned. Returns 0, TH_EIO, or fn's code. */
TH_MUST_CHECK int th_store_trials_each(th_store *store, int (*fn)(void *arg, const th_trial *t),
                                       void *arg);
TH_MUST_CHECK int th_store_sites_each(th_store *store, int (*fn)(void *arg, const th_site *s),
                                      void *arg);
TH_MUST_CHECK int th_store_patients_each(th_store *store, int (*fn)(void *arg, const th_patient *p),
                                         void *arg);
TH_MUST_CHECK int th_store_keys_each(th_store *store, int (*fn)(void *arg, const th_key *k),
                                     void *arg);

/* Reads one response into *out (free with th_qr_stored_free()). Returns 0, TH_ENOTFOUND, TH_EIO
 * or TH_ENOMEM. */
TH_MUST_CHECK int th_store_qr_get(th_store *store, int64_t id, th_qr_stored *out);
void th_qr_stored_free(th_qr_stored *qr);

/* Calls fn with the ids of responses still pending scoring, oldest first, at most limit, with
 * id > after_id and received before received_before_ms. Returns 0, TH_EIO or fn's code. */
TH_MUST_CHECK int th_store_qr_pending(th_store *store, int64_t after_id, int64_t received_before_ms,
                                      int limit, int (*fn)(void *arg, int64_t id), void *arg);

/* Sets trial_id's webhook secret (writer thread, in a transaction). TH_ENOTFOUND if no such
 * trial. */
TH_MUST_CHECK int th_store_webhook_secret_set(th_store *store, const char *trial_id,
                                              const char *secret);

/* Reads trial_id's webhook secret into out (at least 128 bytes). Returns 0, TH_ENOTFOUND (no
 * trial, or no secret yet) or TH_EIO. Thread-safe. */
TH_MUST_CHECK int th_store_webhook_secret_get(th_store *store, const char *trial_id, char *out,
                                              size_t len);

/* Reads the aggregates the progress cache is rebuilt from, calling load->cell and load->alerts
 * per group, and fills the change sequence they cover, all in one read transaction. Returns 0,
 * TH_EIO, or a callback's non-zero code. */
TH_MUST_CHECK int th_store_progress_load(th_store *store, th_progress_load *load);

/* Calls fn for each patient of trial_id (in id order), stopping when ctx ends like
 * th_store_report_scan(). Returns 0, th_ctx_err(ctx), TH_EIO, or fn's non-zero code. */
TH_MUST_CHECK int th_store_trial_patients_each(th_ctx *ctx, th_store *store, const char *trial_id,
                                               int (*fn)(void *arg, const th_patient *p),
                                               void *arg);

/* One stored response as an interim report reads it. Strings live during the callback. */
typedef struct th_report_row {
    int64_t id;
    const char *patient_id;
    const char *site_id;
    const char *instrument;
    int visit_week; /* -1: unknown */
    bool has_score;
    double score;
    bool alert;
} th_report_row;

/* Streams every response of trial_id in id (arrival) order, calling fn per row. The query is
 * interrupted when ctx ends (checked every few thousand SQLite instructions), so it stops within
 * a millisecond or so. Returns 0, th_ctx_err(ctx), TH_EIO, or fn's non-zero code. Thread-safe. */
TH_MUST_CHECK int th_store_report_scan(th_ctx *ctx, th_store *store, const char *trial_id,
                                       int (*fn)(void *arg, const th_report_row *row), void *arg);

/* A search over the stored responses (GET /fhir/QuestionnaireResponse): a row matches when every
 * filter that is set matches. Pages are keyset pages in id order: rows with after_id < id <=
 * asof_id, so that rows stored while a client pages are neither in this search nor able to
 * shift it (a later search finds them), and no row is skipped or repeated. Strings are owned
 * by the caller. */
typedef struct th_qr_search {
    const char *trial_id;      /* NULL: every trial (set it whenever known: it picks the index) */
    const char *site_id;       /* NULL: every site */
    const char *patient_id;    /* NULL: every patient */
    const char *questionnaire; /* NULL: every one; else the canonical exactly as stored */
    int64_t received_from_ms;  /* received_ms >= this; INT64_MIN: no lower bound */
    int64_t received_until_ms; /* received_ms < this; INT64_MAX: no upper bound */
    int64_t after_id;          /* the cursor: rows with id > after_id; 0 on the first page */
    int64_t asof_id;           /* and id <= asof_id; 0: the largest id when the read starts */
    size_t limit;              /* rows to pass to fn at most; 0: none (total only) */
    bool count;                /* count every match with id <= asof_id, whatever after_id */
} th_qr_search;

/* What th_store_qr_search() found besides the rows. */
typedef struct th_qr_page {
    int64_t asof_id; /* the upper bound used: q->asof_id, or the largest id at the read */
    int64_t total;   /* matches up to asof_id when q->count, else -1 */
    int64_t last_id; /* the last row passed to fn, 0 when none: the next page's after_id */
    bool more;       /* further matches after last_id (up to asof_id): there is a next page */
} th_qr_page;

/* Runs search q in one read transaction, so that the total, the bound and the page agree: calls
 * fn for each matching row in id order, at most q->limit times, with a row (body included) that
 * lives only during the call; stops at fn's first non-zero return, which is returned. Fills
 * *page on success (and leaves it untouched on error). The query is interrupted when ctx ends,
 * like th_store_report_scan(). Returns 0, th_ctx_err(ctx), TH_EINVAL (limit too large for one
 * page: more than 100000), TH_EIO, TH_ENOMEM or fn's code. Thread-safe. */
TH_MUST_CHECK int th_store_qr_search(th_ctx *ctx, th_store *store, const th_qr_search *q,
                                     int (*fn)(void *arg, const th_qr_stored *row), void *arg,
                                     th_qr_page *page);

/* Counts the stored responses (tests, readiness). */
TH_MUST_CHECK int th_store_qr_count(th_store *store, int64_t *count);

/* Checks that the store can take a write now (readiness): 0 or TH_EIO. */
TH_MUST_CHECK int th_store_ping(th_store *store);

#endif
