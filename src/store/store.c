/* Store front end: picks the backend from the URL scheme and dispatches through its vtable. */
#include <stdio.h>
#include <string.h>

#include "store/store_int.h"
#include "trialhub/alloc.h"

int th_store_open(const char *url, th_store **out, char *errbuf, size_t errlen)
{
    if (url == NULL) {
        snprintf(errbuf, errlen, "no database URL");
        return TH_EINVAL;
    }
    if (strncmp(url, "sqlite://", 9) == 0 && url[9] != '\0') {
        return th__store_sqlite_open(url + 9, out, errbuf, errlen);
    }
    if (strncmp(url, "postgres://", 11) == 0 || strncmp(url, "postgresql://", 13) == 0) {
        snprintf(errbuf, errlen, "the PostgreSQL backend is not built yet (scale-out issue)");
        return TH_EUNSUPPORTED;
    }
    snprintf(errbuf, errlen, "unknown database URL scheme (expected sqlite:///path)");
    return TH_EINVAL;
}

void th_store_close(th_store *store)
{
    if (store != NULL) {
        store->ops->close(store);
    }
}

const char *th_store_backend(const th_store *store)
{
    return store->ops->name;
}

int th_store_begin(th_store *s)
{
    return s->ops->begin(s);
}

int th_store_commit(th_store *s)
{
    return s->ops->commit(s);
}

void th_store_rollback(th_store *s)
{
    s->ops->rollback(s);
}

int th_store_trial_insert(th_store *s, const th_trial *t)
{
    return s->ops->trial_insert(s, t);
}

int th_store_site_insert(th_store *s, const th_site *site)
{
    return s->ops->site_insert(s, site);
}

int th_store_site_upsert(th_store *s, const th_site *site, bool *created)
{
    return s->ops->site_upsert(s, site, created);
}

int th_store_patient_insert(th_store *s, const th_patient *p)
{
    return s->ops->patient_insert(s, p);
}

int th_store_key_insert(th_store *s, const th_key *k)
{
    return s->ops->key_insert(s, k);
}

int th_store_key_revoke(th_store *s, const char *key_id, int64_t revoked_ms)
{
    return s->ops->key_revoke(s, key_id, revoked_ms);
}

int th_store_qr_insert(th_store *s, th_qr_row *row)
{
    return s->ops->qr_insert(s, row);
}

int th_store_qr_set_score(th_store *s, th_qr_score *score, int64_t now_ms)
{
    return s->ops->qr_set_score(s, score, now_ms);
}

int th_store_trials_each(th_store *s, int (*fn)(void *, const th_trial *), void *arg)
{
    return s->ops->trials_each(s, fn, arg);
}

int th_store_sites_each(th_store *s, int (*fn)(void *, const th_site *), void *arg)
{
    return s->ops->sites_each(s, fn, arg);
}

int th_store_patients_each(th_store *s, int (*fn)(void *, const th_patient *), void *arg)
{
    return s->ops->patients_each(s, fn, arg);
}

int th_store_keys_each(th_store *s, int (*fn)(void *, const th_key *), void *arg)
{
    return s->ops->keys_each(s, fn, arg);
}

int th_store_qr_get(th_store *s, int64_t id, th_qr_stored *out)
{
    return s->ops->qr_get(s, id, out);
}

void th_qr_stored_free(th_qr_stored *qr)
{
    if (qr != NULL) {
        th_free(qr->body);
        qr->body = NULL;
        qr->body_len = 0;
    }
}

int th_store_qr_pending(th_store *s, int64_t after_id, int64_t received_before_ms, int limit,
                        int (*fn)(void *, int64_t), void *arg)
{
    return s->ops->qr_pending(s, after_id, received_before_ms, limit, fn, arg);
}

int th_store_progress_load(th_store *s, th_progress_load *load)
{
    return s->ops->progress_load(s, load);
}

int th_store_trial_patients_each(th_ctx *ctx, th_store *s, const char *trial_id,
                                 int (*fn)(void *, const th_patient *), void *arg)
{
    return s->ops->trial_patients_each(ctx, s, trial_id, fn, arg);
}

int th_store_report_scan(th_ctx *ctx, th_store *s, const char *trial_id,
                         int (*fn)(void *, const th_report_row *), void *arg)
{
    return s->ops->report_scan(ctx, s, trial_id, fn, arg);
}

int th_store_qr_search(th_ctx *ctx, th_store *s, const th_qr_search *q,
                       int (*fn)(void *, const th_qr_stored *), void *arg, th_qr_page *page)
{
    return s->ops->qr_search(ctx, s, q, fn, arg, page);
}

int th_store_webhook_secret_set(th_store *s, const char *trial_id, const char *secret)
{
    return s->ops->webhook_secret_set(s, trial_id, secret);
}

int th_store_webhook_secret_get(th_store *s, const char *trial_id, char *out, size_t len)
{
    return s->ops->webhook_secret_get(s, trial_id, out, len);
}

int th_store_qr_count(th_store *s, int64_t *count)
{
    return s->ops->qr_count(s, count);
}

int th_store_ping(th_store *s)
{
    return s->ops->ping(s);
}
