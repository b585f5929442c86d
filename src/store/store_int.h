/* The store's backend vtable: each backend (sqlite.c, later postgres.c) fills one of these, and
 * store.c dispatches the public th_store_* calls through it. */
#ifndef TRIALHUB_STORE_INT_H
#define TRIALHUB_STORE_INT_H

#include "trialhub/store.h"

typedef struct th_store_ops {
    const char *name;
    void (*close)(th_store *store);
    int (*begin)(th_store *store);
    int (*commit)(th_store *store);
    void (*rollback)(th_store *store);
    int (*trial_insert)(th_store *store, const th_trial *trial);
    int (*site_insert)(th_store *store, const th_site *site);
    int (*site_upsert)(th_store *store, const th_site *site, bool *created);
    int (*patient_insert)(th_store *store, const th_patient *patient);
    int (*key_insert)(th_store *store, const th_key *key);
    int (*key_revoke)(th_store *store, const char *key_id, int64_t revoked_ms);
    int (*qr_insert)(th_store *store, th_qr_row *row);
    int (*qr_set_score)(th_store *store, th_qr_score *score, int64_t now_ms);
    int (*progress_load)(th_store *store, th_progress_load *load);
    int (*webhook_secret_set)(th_store *store, const char *trial_id, const char *secret);
    int (*webhook_secret_get)(th_store *store, const char *trial_id, char *out, size_t len);
    int (*trial_patients_each)(th_ctx *ctx, th_store *store, const char *trial_id,
                               int (*fn)(void *, const th_patient *), void *arg);
    int (*report_scan)(th_ctx *ctx, th_store *store, const char *trial_id,
                       int (*fn)(void *, const th_report_row *), void *arg);
    int (*qr_search)(th_ctx *ctx, th_store *store, const th_qr_search *q,
                     int (*fn)(void *, const th_qr_stored *), void *arg, th_qr_page *page);
    int (*trials_each)(th_store *store, int (*fn)(void *, const th_trial *), void *arg);
    int (*sites_each)(th_store *store, int (*fn)(void *, const th_site *), void *arg);
    int (*patients_each)(th_store *store, int (*fn)(void *, const th_patient *), void *arg);
    int (*keys_each)(th_store *store, int (*fn)(void *, const th_key *), void *arg);
    int (*qr_get)(th_store *store, int64_t id, th_qr_stored *out);
    int (*qr_pending)(th_store *store, int64_t after_id, int64_t before_ms, int limit,
                      int (*fn)(void *, int64_t), void *arg);
    int (*qr_count)(th_store *store, int64_t *count);
    int (*ping)(th_store *store);
    /* The backend's write connection (sqlite3 *), for a sibling layer whose tables live in the
     * same database and must be written in the writer's transaction (src/queue/sql.c). Only on
     * the writer thread, between begin and commit. NULL when the backend has none. */
    void *(*write_conn)(th_store *store);
} th_store_ops;

/* Every backend's store struct starts with this header. */
struct th_store {
    const th_store_ops *ops;
};

/* store->ops->write_conn, or NULL when the backend has none. */
static inline void *th__store_write_conn(th_store *store)
{
    return store->ops->write_conn ? store->ops->write_conn(store) : NULL;
}

/* Backend constructors: path is the URL with the scheme removed. */
int th__store_sqlite_open(const char *path, th_store **out, char *errbuf, size_t errlen);

#endif
