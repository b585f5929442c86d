/* SQLite backend: one write connection used only by the writer thread (prepared statements kept
 * for the hot inserts), and a small pool of read connections for any thread. WAL mode with
 * synchronous=FULL, both verified at open: a commit returns only once the WAL is fsynced.
 *
 * Locking: `read_mu` protects the idle read-connection stack. The write connection needs no
 * lock: only the writer thread uses it, between begin and commit. */
#include <errno.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "core/core_int.h"
#include "store/store_int.h"
#include "trialhub/alloc.h"

#define READ_POOL_MAX   16
#define BUSY_TIMEOUT_MS 5000

enum {
    ST_BEGIN,
    ST_COMMIT,
    ST_ROLLBACK,
    ST_QR_INSERT,
    ST_QR_BY_IDENT,
    ST_QR_SCORE,
    ST_ALERT_INSERT,
    ST_COLLECTED_GET,
    ST_COLLECTED_PUT,
    ST_COUNT
};

static const char *const write_sql[ST_COUNT] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_QR_INSERT] =
        "INSERT INTO questionnaire_responses(trial_id, site_id, patient_id, questionnaire,"
        " instrument, identifier_system, identifier_value, status, authored, authored_s,"
        " visit_week, body, body_sha256, received_ms) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT(identifier_system, identifier_value) DO NOTHING",
    [ST_QR_BY_IDENT] = "SELECT id, body_sha256 FROM questionnaire_responses"
                       " WHERE identifier_system = ? AND identifier_value = ?",
    /* Only a pending row takes a score: a response is scored once, even when the sweeper and
     * the post-commit task race for it. */
    [ST_QR_SCORE] = "UPDATE questionnaire_responses SET processing = 'scored', score = ?,"
                    " score_is_int = ?, band = ?, alert = ?, score_seq = ?"
                    " WHERE id = ? AND processing = 'pending'",
    [ST_ALERT_INSERT] = "INSERT INTO alerts(qr_id, trial_id, site_id, patient_id, kind,"
                        " created_ms) SELECT id, trial_id, site_id, patient_id, 'safety', ?"
                        " FROM questionnaire_responses WHERE id = ?"
                        " ON CONFLICT(qr_id) DO NOTHING",
    [ST_COLLECTED_GET] = "SELECT qr_id FROM collected WHERE trial_id = ? AND site_id = ?"
                         " AND resource_id = ?",
    [ST_COLLECTED_PUT] = "INSERT INTO collected(trial_id, site_id, resource_id, qr_id)"
                         " VALUES(?,?,?,?) ON CONFLICT DO NOTHING",
};

/* Schema migrations: append only; each runs once, in its own transaction. */
static const char *const migrations[] = {
    /* 1: the ingestion schema */
    "CREATE TABLE trials(id TEXT PRIMARY KEY, name TEXT NOT NULL, arms TEXT NOT NULL,"
    "  schedule_weeks TEXT NOT NULL, created_ms INTEGER NOT NULL);"
    "CREATE TABLE sites(trial_id TEXT NOT NULL REFERENCES trials(id), id TEXT NOT NULL,"
    "  name TEXT NOT NULL, PRIMARY KEY(trial_id, id));"
    "CREATE TABLE patients(id TEXT PRIMARY KEY, trial_id TEXT NOT NULL, site_id TEXT NOT NULL,"
    "  arm TEXT NOT NULL, enrolled_on TEXT NOT NULL,"
    "  FOREIGN KEY(trial_id, site_id) REFERENCES sites(trial_id, id));"
    "CREATE TABLE api_keys(id TEXT PRIMARY KEY, hash BLOB NOT NULL UNIQUE, role INTEGER NOT NULL,"
    "  trial_id TEXT NOT NULL DEFAULT '', site_id TEXT NOT NULL DEFAULT '',"
    "  patient_id TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL,"
    "  revoked_ms INTEGER NOT NULL DEFAULT 0);"
    "CREATE TABLE questionnaire_responses(id INTEGER PRIMARY KEY,"
    "  trial_id TEXT NOT NULL, site_id TEXT NOT NULL, patient_id TEXT NOT NULL,"
    "  questionnaire TEXT NOT NULL, instrument TEXT NOT NULL,"
    "  identifier_system TEXT, identifier_value TEXT, status TEXT NOT NULL,"
    "  authored TEXT NOT NULL, authored_s INTEGER NOT NULL, visit_week INTEGER,"
    "  body BLOB NOT NULL, body_sha256 BLOB NOT NULL, received_ms INTEGER NOT NULL,"
    "  processing TEXT NOT NULL DEFAULT 'pending', score REAL, score_is_int INTEGER,"
    "  band TEXT, alert INTEGER, version INTEGER NOT NULL DEFAULT 1);"
    "CREATE UNIQUE INDEX qr_identifier ON questionnaire_responses("
    "  identifier_system, identifier_value);"
    "CREATE INDEX qr_pending ON questionnaire_responses(id) WHERE processing = 'pending';"
    /* By trial in arrival order: inserts append at the end of each trial's range instead of
     * touching a random leaf per patient, which kept every commit rewriting dozens of pages. */
    "CREATE INDEX qr_trial ON questionnaire_responses(trial_id, id);"
    "CREATE TABLE alerts(id INTEGER PRIMARY KEY, qr_id INTEGER NOT NULL UNIQUE,"
    "  trial_id TEXT NOT NULL, site_id TEXT NOT NULL, patient_id TEXT NOT NULL,"
    "  kind TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'open', created_ms INTEGER NOT NULL);",
    /* 2: the order in which scores were committed, so that the progress cache can tell which
     * scores a rebuild from the store already counted (th_progress_note.score_seq) */
    "ALTER TABLE questionnaire_responses ADD COLUMN score_seq INTEGER;",
    /* 3: a trial's patients without reading every trial's (reports) */
    "CREATE INDEX patients_trial ON patients(trial_id, id);",
    /* 4: multi-site collection: each site's FHIR server, and what was collected from where */
    "ALTER TABLE sites ADD COLUMN fhir_base_url TEXT;"
    "ALTER TABLE sites ADD COLUMN credential TEXT;"
    "CREATE TABLE collected(trial_id TEXT NOT NULL, site_id TEXT NOT NULL,"
    "  resource_id TEXT NOT NULL, qr_id INTEGER NOT NULL,"
    "  PRIMARY KEY(trial_id, site_id, resource_id)) WITHOUT ROWID;",
    /* 5: the durable task queue (src/queue/sql.c, docs/internals/queue.md). due_ms is when a
     * task may next be leased: run_at for queued and failed tasks, the lease's end for running
     * ones, so that one range of tasks_due finds every runnable task. The large columns come
     * last: reading a row's state never walks its payload's overflow pages. */
    "CREATE TABLE tasks(seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,"
    "  state TEXT NOT NULL CHECK(state IN ('queued', 'running', 'succeeded', 'failed', 'dead',"
    "  'canceled')), priority INTEGER NOT NULL, due_ms INTEGER NOT NULL,"
    "  attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL, lease_owner TEXT,"
    "  scope TEXT NOT NULL DEFAULT '', idempotency_key TEXT, created_ms INTEGER NOT NULL,"
    "  updated_ms INTEGER NOT NULL, last_error TEXT, payload TEXT NOT NULL, result TEXT);"
    "CREATE INDEX tasks_due ON tasks(kind, priority DESC, due_ms)"
    "  WHERE state IN ('queued', 'failed', 'running');"
    "CREATE INDEX tasks_running ON tasks(kind, due_ms) WHERE state = 'running';"
    "CREATE UNIQUE INDEX tasks_idempotency ON tasks(kind, scope, idempotency_key)"
    "  WHERE idempotency_key IS NOT NULL;"
    "CREATE INDEX tasks_state ON tasks(state);",
    /* 6: FHIR search: a trial's responses in id order with the columns that scope and
     * _lastUpdated filter on, so that a search checks them in the index and reads only the rows
     * it returns (a site's or a patient's search walks the trial's range; with rows 1-2 KiB
     * wide, reading each one made a site's page of 1M rows take seconds). It starts with
     * qr_trial's columns and serves its queries, so qr_trial goes: one index appended to per
     * commit, not two. */
    "CREATE INDEX qr_trial_scope ON questionnaire_responses(trial_id, id, site_id, patient_id,"
    "  received_ms);"
    "DROP INDEX qr_trial;",
    /* 7: each trial's webhook secret (HMAC key of X-Trialhub-Signature) */
    "ALTER TABLE trials ADD COLUMN webhook_secret TEXT;",
};

typedef struct sqlite_store {
    th_store base;
    char *path;
    sqlite3 *wdb;
    sqlite3_stmt *wst[ST_COUNT];
    pthread_mutex_t read_mu;
    sqlite3 *read_idle[READ_POOL_MAX];
    int nread_idle;
    /* Checkpoints run on their own thread and connection, never inside a commit. */
    pthread_mutex_t ckpt_mu;
    pthread_cond_t ckpt_cond;
    bool ckpt_wanted; /* under ckpt_mu */
    bool ckpt_stop;   /* under ckpt_mu */
    bool ckpt_started;
    pthread_t ckpt_thread;
    sqlite3 *ckpt_db;
    int64_t last_score_seq; /* writer thread only: the latest score_seq handed out */
} sqlite_store;

/* WAL frames after which the checkpointer is woken (SQLite's own default is 1000). */
#define CHECKPOINT_FRAMES 1000

static const th_store_ops sqlite_ops;

static int set_err(char *errbuf, size_t errlen, const char *what, sqlite3 *db)
{
    snprintf(errbuf, errlen, "%s: %s", what, db ? sqlite3_errmsg(db) : "out of memory");
    return TH_EIO;
}

/* Creates the parent folder of path if missing (one level, like ./data). */
static void make_parent_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (slash == NULL || slash == path) {
        return;
    }
    char dir[4096];
    size_t n = (size_t)(slash - path);
    if (n >= sizeof(dir)) {
        return;
    }
    memcpy(dir, path, n);
    dir[n] = '\0';
    (void)mkdir(dir, 0700);
}

static int open_conn(const char *path, sqlite3 **out, char *errbuf, size_t errlen)
{
    sqlite3 *db = NULL;
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    if (sqlite3_open_v2(path, &db, flags, NULL) != SQLITE_OK) {
        int rc = set_err(errbuf, errlen, "cannot open database", db);
        sqlite3_close(db);
        return rc;
    }
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, BUSY_TIMEOUT_MS);
    if (sqlite3_exec(db, "PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;", NULL, NULL,
                     NULL) != SQLITE_OK) {
        int rc = set_err(errbuf, errlen, "cannot set pragmas", db);
        sqlite3_close(db);
        return rc;
    }
    *out = db;
    return 0;
}

static int pragma_text(sqlite3 *db, const char *sql, char *buf, size_t len)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
        return TH_EIO;
    }
    int rc = TH_EIO;
    if (sqlite3_step(st) == SQLITE_ROW) {
        const unsigned char *text = sqlite3_column_text(st, 0);
        snprintf(buf, len, "%s", text ? (const char *)text : "");
        rc = 0;
    }
    sqlite3_finalize(st);
    return rc;
}

static int migrate(sqlite3 *db, char *errbuf, size_t errlen)
{
    if (sqlite3_exec(db,
                     "CREATE TABLE IF NOT EXISTS schema_migrations(version INTEGER PRIMARY KEY,"
                     " applied_ms INTEGER NOT NULL)",
                     NULL, NULL, NULL) != SQLITE_OK) {
        return set_err(errbuf, errlen, "cannot create schema_migrations", db);
    }
    char buf[32];
    if (pragma_text(db, "SELECT coalesce(max(version), 0) FROM schema_migrations", buf,
                    sizeof(buf)) != 0) {
        return set_err(errbuf, errlen, "cannot read schema version", db);
    }
    long have = strtol(buf, NULL, 10);
    long want = (long)(sizeof(migrations) / sizeof(migrations[0]));
    if (have > want) {
        snprintf(errbuf, errlen, "database schema version %ld is newer than this binary (%ld)",
                 have, want);
        return TH_EIO;
    }
    for (long i = have; i < want; i++) {
        long v = i + 1; /* version numbers start at 1 */
        char record[128];
        snprintf(record, sizeof(record),
                 "INSERT INTO schema_migrations VALUES(%ld,"
                 " CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))",
                 v);
        if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK ||
            sqlite3_exec(db, migrations[i], NULL, NULL, NULL) != SQLITE_OK ||
            sqlite3_exec(db, record, NULL, NULL, NULL) != SQLITE_OK ||
            sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
            int rc = set_err(errbuf, errlen, "migration failed", db);
            sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            return rc;
        }
    }
    return 0;
}

/* Called by SQLite on the writer thread after each commit, instead of its auto-checkpoint. */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int nframes)
{
    (void)db;
    (void)name;
    sqlite_store *s = arg;
    if (nframes >= CHECKPOINT_FRAMES) {
        pthread_mutex_lock(&s->ckpt_mu);
        s->ckpt_wanted = true;
        pthread_cond_signal(&s->ckpt_cond);
        pthread_mutex_unlock(&s->ckpt_mu);
    }
    return SQLITE_OK;
}

static void *checkpointer_main(void *arg)
{
    sqlite_store *s = arg;
    pthread_mutex_lock(&s->ckpt_mu);
    while (!s->ckpt_stop) {
        if (!s->ckpt_wanted) {
            pthread_cond_wait(&s->ckpt_cond, &s->ckpt_mu);
            continue;
        }
        s->ckpt_wanted = false;
        pthread_mutex_unlock(&s->ckpt_mu);
        /* PASSIVE: copies what it can without blocking the writer or readers. */
        (void)sqlite3_wal_checkpoint_v2(s->ckpt_db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_lock(&s->ckpt_mu);
    }
    pthread_mutex_unlock(&s->ckpt_mu);
    return NULL;
}

int th__store_sqlite_open(const char *path, th_store **out, char *errbuf, size_t errlen)
{
    sqlite_store *s = th_calloc(1, sizeof(*s));
    if (s == NULL) {
        return TH_ENOMEM;
    }
    s->base.ops = &sqlite_ops;
    pthread_mutex_init(&s->read_mu, NULL);
    pthread_mutex_init(&s->ckpt_mu, NULL);
    pthread_cond_init(&s->ckpt_cond, NULL);
    size_t plen = strlen(path);
    s->path = th_malloc(plen + 1);
    if (s->path == NULL) {
        sqlite_ops.close(&s->base);
        return TH_ENOMEM;
    }
    memcpy(s->path, path, plen + 1);
    make_parent_dir(s->path);

    int rc = open_conn(s->path, &s->wdb, errbuf, errlen);
    if (rc != 0) {
        sqlite_ops.close(&s->base);
        return rc;
    }
    char mode[16], sync[16];
    if (pragma_text(s->wdb, "PRAGMA journal_mode = WAL", mode, sizeof(mode)) != 0 ||
        strcmp(mode, "wal") != 0) {
        snprintf(errbuf, errlen, "cannot switch the database to WAL mode");
        sqlite_ops.close(&s->base);
        return TH_EIO;
    }
    if (pragma_text(s->wdb, "PRAGMA synchronous", sync, sizeof(sync)) != 0 ||
        strcmp(sync, "2") != 0) {
        snprintf(errbuf, errlen, "synchronous=FULL did not take effect");
        sqlite_ops.close(&s->base);
        return TH_EIO;
    }
    rc = migrate(s->wdb, errbuf, errlen);
    if (rc != 0) {
        sqlite_ops.close(&s->base);
        return rc;
    }
    char seq[32];
    if (pragma_text(s->wdb, "SELECT coalesce(max(score_seq), 0) FROM questionnaire_responses", seq,
                    sizeof(seq)) != 0) {
        set_err(errbuf, errlen, "cannot read the score sequence", s->wdb);
        sqlite_ops.close(&s->base);
        return TH_EIO;
    }
    s->last_score_seq = strtoll(seq, NULL, 10);
    for (int i = 0; i < ST_COUNT; i++) {
        if (sqlite3_prepare_v3(s->wdb, write_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->wst[i],
                               NULL) != SQLITE_OK) {
            rc = set_err(errbuf, errlen, "cannot prepare statement", s->wdb);
            sqlite_ops.close(&s->base);
            return rc;
        }
    }
    rc = open_conn(s->path, &s->ckpt_db, errbuf, errlen);
    if (rc == 0 && th__thread_start(&s->ckpt_thread, "th-checkpoint", checkpointer_main, s) != 0) {
        snprintf(errbuf, errlen, "cannot start the checkpoint thread");
        rc = TH_ESYS;
    }
    if (rc != 0) {
        sqlite_ops.close(&s->base);
        return rc;
    }
    s->ckpt_started = true;
    sqlite3_wal_hook(s->wdb, wal_hook, s);
    *out = &s->base;
    return 0;
}

static void sq_close(th_store *store)
{
    sqlite_store *s = (sqlite_store *)store;
    if (s->ckpt_started) {
        pthread_mutex_lock(&s->ckpt_mu);
        s->ckpt_stop = true;
        pthread_cond_signal(&s->ckpt_cond);
        pthread_mutex_unlock(&s->ckpt_mu);
        pthread_join(s->ckpt_thread, NULL);
    }
    if (s->ckpt_db) {
        sqlite3_close(s->ckpt_db);
    }
    for (int i = 0; i < ST_COUNT; i++) {
        sqlite3_finalize(s->wst[i]);
    }
    if (s->wdb) {
        sqlite3_close(s->wdb);
    }
    for (int i = 0; i < s->nread_idle; i++) {
        sqlite3_close(s->read_idle[i]);
    }
    pthread_cond_destroy(&s->ckpt_cond);
    pthread_mutex_destroy(&s->ckpt_mu);
    pthread_mutex_destroy(&s->read_mu);
    th_free(s->path);
    th_free(s);
}

/* ---- read connections -------------------------------------------------------------------- */

static sqlite3 *read_conn_get(sqlite_store *s)
{
    sqlite3 *db = NULL;
    pthread_mutex_lock(&s->read_mu);
    if (s->nread_idle > 0) {
        db = s->read_idle[--s->nread_idle];
    }
    pthread_mutex_unlock(&s->read_mu);
    if (db == NULL) {
        char err[128];
        if (open_conn(s->path, &db, err, sizeof(err)) != 0) {
            return NULL;
        }
    }
    return db;
}

static void read_conn_put(sqlite_store *s, sqlite3 *db)
{
    pthread_mutex_lock(&s->read_mu);
    if (s->nread_idle < READ_POOL_MAX) {
        s->read_idle[s->nread_idle++] = db;
        db = NULL;
    }
    pthread_mutex_unlock(&s->read_mu);
    if (db != NULL) {
        sqlite3_close(db);
    }
}

/* ---- writes ------------------------------------------------------------------------------ */

static int step_done(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE ? 0 : rc;
}

static int sq_begin(th_store *store)
{
    sqlite_store *s = (sqlite_store *)store;
    return step_done(s->wst[ST_BEGIN]) == 0 ? 0 : TH_EIO;
}

static int sq_commit(th_store *store)
{
    sqlite_store *s = (sqlite_store *)store;
    return step_done(s->wst[ST_COMMIT]) == 0 ? 0 : TH_EIO;
}

static void sq_rollback(th_store *store)
{
    sqlite_store *s = (sqlite_store *)store;
    if (!sqlite3_get_autocommit(s->wdb)) {
        (void)step_done(s->wst[ST_ROLLBACK]);
    }
}

static void bind_text(sqlite3_stmt *st, int i, const char *text)
{
    if (text == NULL) {
        sqlite3_bind_null(st, i);
    } else {
        sqlite3_bind_text(st, i, text, -1, SQLITE_STATIC);
    }
}

/* Runs a one-off write on the write connection; constraint failures map to TH_EEXIST (unique)
 * or TH_ENOTFOUND (foreign key). */
static int exec_write(sqlite_store *s, const char *sql, const char *const *texts, int ntexts,
                      const int64_t *ints, int nints)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(s->wdb, sql, -1, &st, NULL) != SQLITE_OK) {
        return TH_EIO;
    }
    for (int i = 0; i < ntexts; i++) {
        bind_text(st, i + 1, texts[i]);
    }
    for (int i = 0; i < nints; i++) {
        sqlite3_bind_int64(st, ntexts + i + 1, ints[i]);
    }
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    switch (rc) {
    case SQLITE_DONE:
        return 0;
    case SQLITE_CONSTRAINT_PRIMARYKEY:
    case SQLITE_CONSTRAINT_UNIQUE:
        return TH_EEXIST;
    case SQLITE_CONSTRAINT_FOREIGNKEY:
        return TH_ENOTFOUND;
    default:
        return TH_EIO;
    }
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int sq_trial_insert(th_store *store, const th_trial *t)
{
    const char *texts[] = {t->id, t->name, t->arms_json, t->schedule_json};
    int64_t now = wall_ms();
    return exec_write((sqlite_store *)store,
                      "INSERT INTO trials(id, name, arms, schedule_weeks, created_ms)"
                      " VALUES(?,?,?,?,?)",
                      texts, 4, &now, 1);
}

static int sq_site_insert(th_store *store, const th_site *site)
{
    const char *texts[] = {site->trial_id, site->id, site->name};
    return exec_write((sqlite_store *)store, "INSERT INTO sites(trial_id, id, name) VALUES(?,?,?)",
                      texts, 3, NULL, 0);
}

static int sq_site_upsert(th_store *store, const th_site *site, bool *created)
{
    sqlite_store *s = (sqlite_store *)store;
    sqlite3_stmt *st = NULL;
    /* In the writer's transaction: whether it exists, then the upsert, see the same state. */
    if (sqlite3_prepare_v2(s->wdb, "SELECT count(*) FROM sites WHERE trial_id = ? AND id = ?", -1,
                           &st, NULL) != SQLITE_OK) {
        return TH_EIO;
    }
    bind_text(st, 1, site->trial_id);
    bind_text(st, 2, site->id);
    int rc = sqlite3_step(st);
    bool exists = rc == SQLITE_ROW && sqlite3_column_int(st, 0) > 0;
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW) {
        return TH_EIO;
    }
    if (sqlite3_prepare_v2(s->wdb,
                           "INSERT INTO sites(trial_id, id, name, fhir_base_url, credential)"
                           " VALUES(?1, ?2, ?3, nullif(?4, ''), nullif(?5, ''))"
                           " ON CONFLICT(trial_id, id) DO UPDATE SET name = excluded.name,"
                           " fhir_base_url = excluded.fhir_base_url,"
                           " credential = CASE WHEN ?5 IS NULL THEN credential"
                           " ELSE excluded.credential END",
                           -1, &st, NULL) != SQLITE_OK) {
        return TH_EIO;
    }
    bind_text(st, 1, site->trial_id);
    bind_text(st, 2, site->id);
    bind_text(st, 3, site->name);
    bind_text(st, 4, site->fhir_base_url);
    bind_text(st, 5, site->credential);
    rc = sqlite3_step(st);
    int ext = sqlite3_extended_errcode(s->wdb);
    sqlite3_finalize(st);
    if (rc == SQLITE_DONE) {
        *created = !exists;
        return 0;
    }
    return ext == SQLITE_CONSTRAINT_FOREIGNKEY ? TH_ENOTFOUND : TH_EIO;
}

static int sq_patient_insert(th_store *store, const th_patient *p)
{
    const char *texts[] = {p->id, p->trial_id, p->site_id, p->arm, p->enrolled_on};
    return exec_write((sqlite_store *)store,
                      "INSERT INTO patients(id, trial_id, site_id, arm, enrolled_on)"
                      " VALUES(?,?,?,?,?)",
                      texts, 5, NULL, 0);
}

static int sq_key_insert(th_store *store, const th_key *k)
{
    sqlite_store *s = (sqlite_store *)store;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(s->wdb,
                           "INSERT INTO api_keys(id, hash, role, trial_id, site_id, patient_id,"
                           " created_ms) VALUES(?,?,?,?,?,?,?)",
                           -1, &st, NULL) != SQLITE_OK) {
        return TH_EIO;
    }
    bind_text(st, 1, k->id);
    sqlite3_bind_blob(st, 2, k->hash, TH_KEY_HASH_LEN, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, (int)k->role);
    bind_text(st, 4, k->trial_id);
    bind_text(st, 5, k->site_id);
    bind_text(st, 6, k->patient_id);
    sqlite3_bind_int64(st, 7, k->created_ms);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc == SQLITE_DONE) {
        return 0;
    }
    return (rc & 0xff) == SQLITE_CONSTRAINT ? TH_EEXIST : TH_EIO;
}

static int sq_key_revoke(th_store *store, const char *key_id, int64_t revoked_ms)
{
    sqlite_store *s = (sqlite_store *)store;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(s->wdb,
                           "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms = 0", -1,
                           &st, NULL) != SQLITE_OK) {
        return TH_EIO;
    }
    sqlite3_bind_int64(st, 1, revoked_ms);
    bind_text(st, 2, key_id);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        return TH_EIO;
    }
    return sqlite3_changes(s->wdb) == 1 ? 0 : TH_ENOTFOUND;
}

/* Remembers where a collected row came from. */
static int collected_put(sqlite_store *s, const th_qr_row *row)
{
    sqlite3_stmt *st = s->wst[ST_COLLECTED_PUT];
    bind_text(st, 1, row->trial_id);
    bind_text(st, 2, row->site_id);
    bind_text(st, 3, row->source_resource);
    sqlite3_bind_int64(st, 4, row->id);
    return step_done(st) == 0 ? 0 : TH_EIO;
}

static int qr_insert_row(sqlite_store *s, th_qr_row *row);

static int sq_qr_insert(th_store *store, th_qr_row *row)
{
    sqlite_store *s = (sqlite_store *)store;
    row->duplicate = row->conflict = false;
    if (row->source_resource == NULL) {
        return qr_insert_row(s, row);
    }
    /* Collected: the same site's same resource again is a duplicate. */
    sqlite3_stmt *q = s->wst[ST_COLLECTED_GET];
    bind_text(q, 1, row->trial_id);
    bind_text(q, 2, row->site_id);
    bind_text(q, 3, row->source_resource);
    int step = sqlite3_step(q);
    if (step == SQLITE_ROW) {
        row->id = sqlite3_column_int64(q, 0);
        row->duplicate = true;
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (step == SQLITE_ROW) {
        return 0;
    }
    if (step != SQLITE_DONE) {
        return TH_EIO;
    }
    int rc = qr_insert_row(s, row);
    if (rc == 0 && row->conflict) {
        /* The identifier is stored already: the site's copy carries its own id and meta, so
         * the bytes differ, but it is the same response. */
        row->conflict = false;
        row->duplicate = true;
    }
    return rc == 0 ? collected_put(s, row) : rc;
}

static int qr_insert_row(sqlite_store *s, th_qr_row *row)
{
    sqlite3_stmt *st = s->wst[ST_QR_INSERT];
    bind_text(st, 1, row->trial_id);
    bind_text(st, 2, row->site_id);
    bind_text(st, 3, row->patient_id);
    bind_text(st, 4, row->questionnaire);
    bind_text(st, 5, row->instrument);
    bind_text(st, 6, row->identifier_system);
    bind_text(st, 7, row->identifier_value);
    bind_text(st, 8, row->status);
    bind_text(st, 9, row->authored);
    sqlite3_bind_int64(st, 10, row->authored_s);
    if (row->visit_week >= 0) {
        sqlite3_bind_int(st, 11, row->visit_week);
    } else {
        sqlite3_bind_null(st, 11);
    }
    sqlite3_bind_blob64(st, 12, row->body, row->body_len, SQLITE_STATIC);
    sqlite3_bind_blob(st, 13, row->body_sha256, 32, SQLITE_STATIC);
    sqlite3_bind_int64(st, 14, row->received_ms);
    if (step_done(st) != 0) {
        return TH_EIO;
    }
    if (sqlite3_changes(s->wdb) == 1) {
        row->id = sqlite3_last_insert_rowid(s->wdb);
        return 0;
    }
    /* The identifier is taken: same content is a retry, different content a conflict. */
    sqlite3_stmt *q = s->wst[ST_QR_BY_IDENT];
    bind_text(q, 1, row->identifier_system);
    bind_text(q, 2, row->identifier_value);
    int rc = sqlite3_step(q);
    if (rc == SQLITE_ROW) {
        row->id = sqlite3_column_int64(q, 0);
        const void *sha = sqlite3_column_blob(q, 1);
        bool same = sqlite3_column_bytes(q, 1) == 32 && memcmp(sha, row->body_sha256, 32) == 0;
        row->duplicate = same;
        row->conflict = !same;
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return rc == SQLITE_ROW ? 0 : TH_EIO;
}

static int sq_qr_set_score(th_store *store, th_qr_score *sc, int64_t now_ms)
{
    sqlite_store *s = (sqlite_store *)store;
    sqlite3_stmt *st = s->wst[ST_QR_SCORE];
    if (sc->has_score) {
        sqlite3_bind_double(st, 1, sc->score);
        sqlite3_bind_int(st, 2, sc->score_is_int);
    } else {
        sqlite3_bind_null(st, 1);
        sqlite3_bind_null(st, 2);
    }
    bind_text(st, 3, sc->band);
    sqlite3_bind_int(st, 4, sc->alert);
    /* Single writer thread: sequence numbers are handed out in commit order. One lost to a
     * rolled-back batch leaves a gap, which is harmless. */
    int64_t seq = s->last_score_seq + 1;
    sqlite3_bind_int64(st, 5, seq);
    sqlite3_bind_int64(st, 6, sc->id);
    if (step_done(st) != 0) {
        return TH_EIO;
    }
    if (sqlite3_changes(s->wdb) != 1) {
        return TH_ENOTFOUND; /* no such row, or already scored */
    }
    s->last_score_seq = seq;
    sc->seq = seq;
    if (sc->alert) {
        st = s->wst[ST_ALERT_INSERT];
        sqlite3_bind_int64(st, 1, now_ms);
        sqlite3_bind_int64(st, 2, sc->id);
        if (step_done(st) != 0) {
            return TH_EIO;
        }
    }
    return 0;
}

/* ---- reads ------------------------------------------------------------------------------- */

typedef int (*row_fn)(void *arg, sqlite3_stmt *st);

/* Steps a prepared read statement to its end, calling fn per row. */
static int step_rows(sqlite3_stmt *st, row_fn fn, void *arg)
{
    int rc = 0, step;
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        rc = fn(arg, st);
        if (rc != 0) {
            break;
        }
    }
    if (rc == 0 && step != SQLITE_DONE) {
        rc = TH_EIO;
    }
    sqlite3_reset(st);
    return rc;
}

/* Runs sql on a pooled read connection, calling fn per row. */
static int read_rows(sqlite_store *s, const char *sql, const int64_t *ints, int nints, row_fn fn,
                     void *arg)
{
    sqlite3 *db = read_conn_get(s);
    if (db == NULL) {
        return TH_EIO;
    }
    sqlite3_stmt *st;
    int rc = 0;
    if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK) {
        read_conn_put(s, db);
        return TH_EIO;
    }
    for (int i = 0; i < nints; i++) {
        sqlite3_bind_int64(st, i + 1, ints[i]);
    }
    rc = step_rows(st, fn, arg);
    sqlite3_finalize(st);
    read_conn_put(s, db);
    return rc;
}

static const char *col_text(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? (const char *)t : "";
}

static void copy_id(char *dst, const char *src)
{
    snprintf(dst, TH_ID_MAX + 1, "%s", src);
}

struct each_ctx {
    union {
        int (*trial)(void *, const th_trial *);
        int (*site)(void *, const th_site *);
        int (*patient)(void *, const th_patient *);
        int (*key)(void *, const th_key *);
    } fn;
    void *arg;
};

static int trial_row(void *arg, sqlite3_stmt *st)
{
    struct each_ctx *e = arg;
    th_trial t = {col_text(st, 0), col_text(st, 1), col_text(st, 2), col_text(st, 3)};
    return e->fn.trial(e->arg, &t);
}

static int sq_trials_each(th_store *store, int (*fn)(void *, const th_trial *), void *arg)
{
    struct each_ctx e = {.fn.trial = fn, .arg = arg};
    return read_rows((sqlite_store *)store,
                     "SELECT id, name, arms, schedule_weeks FROM trials ORDER BY id", NULL, 0,
                     trial_row, &e);
}

static int site_row(void *arg, sqlite3_stmt *st)
{
    struct each_ctx *e = arg;
    th_site site = {col_text(st, 0), col_text(st, 1), col_text(st, 2), col_text(st, 3),
                    col_text(st, 4)};
    return e->fn.site(e->arg, &site);
}

static int sq_sites_each(th_store *store, int (*fn)(void *, const th_site *), void *arg)
{
    struct each_ctx e = {.fn.site = fn, .arg = arg};
    return read_rows((sqlite_store *)store,
                     "SELECT trial_id, id, name, coalesce(fhir_base_url, ''),"
                     " coalesce(credential, '') FROM sites ORDER BY trial_id, id",
                     NULL, 0, site_row, &e);
}

static int patient_row(void *arg, sqlite3_stmt *st)
{
    struct each_ctx *e = arg;
    th_patient p = {col_text(st, 0), col_text(st, 1), col_text(st, 2), col_text(st, 3),
                    col_text(st, 4)};
    return e->fn.patient(e->arg, &p);
}

static int sq_patients_each(th_store *store, int (*fn)(void *, const th_patient *), void *arg)
{
    struct each_ctx e = {.fn.patient = fn, .arg = arg};
    return read_rows((sqlite_store *)store,
                     "SELECT trial_id, id, site_id, arm, enrolled_on FROM patients ORDER BY id",
                     NULL, 0, patient_row, &e);
}

static int key_row(void *arg, sqlite3_stmt *st)
{
    struct each_ctx *e = arg;
    th_key k;
    memset(&k, 0, sizeof(k));
    copy_id(k.id, col_text(st, 0));
    if (sqlite3_column_bytes(st, 1) == TH_KEY_HASH_LEN) {
        memcpy(k.hash, sqlite3_column_blob(st, 1), TH_KEY_HASH_LEN);
    }
    k.role = (th_role)sqlite3_column_int(st, 2);
    copy_id(k.trial_id, col_text(st, 3));
    copy_id(k.site_id, col_text(st, 4));
    copy_id(k.patient_id, col_text(st, 5));
    k.created_ms = sqlite3_column_int64(st, 6);
    k.revoked_ms = sqlite3_column_int64(st, 7);
    return e->fn.key(e->arg, &k);
}

static int sq_keys_each(th_store *store, int (*fn)(void *, const th_key *), void *arg)
{
    struct each_ctx e = {.fn.key = fn, .arg = arg};
    return read_rows((sqlite_store *)store,
                     "SELECT id, hash, role, trial_id, site_id, patient_id, created_ms,"
                     " revoked_ms FROM api_keys ORDER BY created_ms, id",
                     NULL, 0, key_row, &e);
}

static int qr_row(void *arg, sqlite3_stmt *st)
{
    th_qr_stored *q = arg;
    q->id = sqlite3_column_int64(st, 0);
    copy_id(q->trial_id, col_text(st, 1));
    copy_id(q->site_id, col_text(st, 2));
    copy_id(q->patient_id, col_text(st, 3));
    snprintf(q->instrument, sizeof(q->instrument), "%s", col_text(st, 4));
    snprintf(q->processing, sizeof(q->processing), "%s", col_text(st, 5));
    q->has_score = sqlite3_column_type(st, 6) != SQLITE_NULL;
    q->score = sqlite3_column_double(st, 6);
    q->score_is_int = sqlite3_column_int(st, 7) != 0;
    snprintf(q->band, sizeof(q->band), "%s", col_text(st, 8));
    q->alert = sqlite3_column_int(st, 9) != 0;
    q->version = sqlite3_column_int(st, 10);
    q->received_ms = sqlite3_column_int64(st, 11);
    q->visit_week = sqlite3_column_type(st, 13) == SQLITE_NULL ? -1 : sqlite3_column_int(st, 13);
    int n = sqlite3_column_bytes(st, 12);
    q->body = th_malloc((size_t)n + 1);
    if (q->body == NULL) {
        return TH_ENOMEM;
    }
    memcpy(q->body, sqlite3_column_blob(st, 12), (size_t)n);
    ((char *)q->body)[n] = '\0';
    q->body_len = (size_t)n;
    return 1; /* found: stop */
}

static int sq_qr_get(th_store *store, int64_t id, th_qr_stored *out)
{
    memset(out, 0, sizeof(*out));
    int rc = read_rows((sqlite_store *)store,
                       "SELECT id, trial_id, site_id, patient_id, instrument, processing, score,"
                       " score_is_int, band, alert, version, received_ms, body, visit_week"
                       " FROM questionnaire_responses WHERE id = ?",
                       &id, 1, qr_row, out);
    if (rc == 1) {
        return 0;
    }
    return rc == 0 ? TH_ENOTFOUND : rc;
}

struct pending_ctx {
    int (*fn)(void *, int64_t);
    void *arg;
};

static int pending_row(void *arg, sqlite3_stmt *st)
{
    struct pending_ctx *p = arg;
    return p->fn(p->arg, sqlite3_column_int64(st, 0));
}

static int sq_qr_pending(th_store *store, int64_t after_id, int64_t before_ms, int limit,
                         int (*fn)(void *, int64_t), void *arg)
{
    struct pending_ctx p = {fn, arg};
    int64_t params[3] = {after_id, before_ms, limit};
    return read_rows((sqlite_store *)store,
                     "SELECT id FROM questionnaire_responses WHERE processing = 'pending'"
                     " AND id > ? AND received_ms < ? ORDER BY id LIMIT ?",
                     params, 3, pending_row, &p);
}

static int count_row(void *arg, sqlite3_stmt *st)
{
    *(int64_t *)arg = sqlite3_column_int64(st, 0);
    return 0;
}

static int sq_qr_count(th_store *store, int64_t *count)
{
    return read_rows((sqlite_store *)store, "SELECT count(*) FROM questionnaire_responses", NULL, 0,
                     count_row, count);
}

static int watermark_row(void *arg, sqlite3_stmt *st)
{
    th_progress_load *load = arg;
    load->max_qr_id = sqlite3_column_int64(st, 0);
    load->max_score_seq = sqlite3_column_int64(st, 1);
    return 0;
}

static int cell_row(void *arg, sqlite3_stmt *st)
{
    th_progress_load *load = arg;
    th_progress_cell c = {
        .trial_id = col_text(st, 0),
        .site_id = col_text(st, 1),
        .patient_id = col_text(st, 2),
        .instrument = col_text(st, 3),
        .visit_week = sqlite3_column_type(st, 4) == SQLITE_NULL ? -1 : sqlite3_column_int(st, 4),
        .count = sqlite3_column_int64(st, 5),
        .today = sqlite3_column_int64(st, 6),
        .scored = sqlite3_column_int64(st, 7),
        .score_sum = sqlite3_column_double(st, 8),
    };
    return load->cell(load->arg, &c);
}

static int alert_row(void *arg, sqlite3_stmt *st)
{
    th_progress_load *load = arg;
    return load->alerts(load->arg, col_text(st, 0), col_text(st, 1), sqlite3_column_int64(st, 2));
}

/* One read transaction, so that the groups and the watermarks describe the same state. */
static int sq_progress_load(th_store *store, th_progress_load *load)
{
    static const char *const sql[3] = {
        "SELECT coalesce(max(id), 0), coalesce(max(score_seq), 0) FROM questionnaire_responses",
        "SELECT trial_id, site_id, patient_id, instrument, visit_week, count(*),"
        " sum(received_ms >= ?1), count(score), total(score) FROM questionnaire_responses"
        " GROUP BY trial_id, site_id, patient_id, instrument, visit_week",
        "SELECT trial_id, site_id, count(*) FROM alerts WHERE state = 'open'"
        " GROUP BY trial_id, site_id",
    };
    static const row_fn fns[3] = {watermark_row, cell_row, alert_row};
    sqlite_store *s = (sqlite_store *)store;
    sqlite3 *db = read_conn_get(s);
    if (db == NULL) {
        return TH_EIO;
    }
    int rc = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) == SQLITE_OK ? 0 : TH_EIO;
    for (int i = 0; rc == 0 && i < 3; i++) {
        sqlite3_stmt *st;
        if (sqlite3_prepare_v3(db, sql[i], -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK) {
            rc = TH_EIO;
            break;
        }
        if (i == 1) {
            sqlite3_bind_int64(st, 1, load->today_start_ms);
        }
        rc = step_rows(st, fns[i], load);
        sqlite3_finalize(st);
    }
    (void)sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    read_conn_put(s, db);
    return rc;
}

/* SQLite's progress handler: a non-zero return interrupts the statement (SQLITE_INTERRUPT). */
static int ctx_interrupt(void *arg)
{
    return th_ctx_done(arg);
}

/* Runs sql (one text parameter) on a pooled read connection, calling fn per row, interrupted
 * when ctx ends. Returns 0, th_ctx_err(ctx), TH_EIO or fn's code. */
static int read_rows_ctx(sqlite_store *s, th_ctx *ctx, const char *sql, const char *param,
                         row_fn fn, void *arg)
{
    if (th_ctx_done(ctx)) {
        return th_ctx_err(ctx);
    }
    sqlite3 *db = read_conn_get(s);
    if (db == NULL) {
        return TH_EIO;
    }
    /* About 0.1 ms of work between checks on this machine. */
    sqlite3_progress_handler(db, 2000, ctx_interrupt, ctx);
    sqlite3_stmt *st;
    int rc = 0;
    if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK) {
        rc = th_ctx_done(ctx) ? th_ctx_err(ctx) : TH_EIO;
    } else {
        sqlite3_bind_text(st, 1, param, -1, SQLITE_STATIC);
        rc = step_rows(st, fn, arg);
        if (rc == TH_EIO && th_ctx_done(ctx)) {
            rc = th_ctx_err(ctx); /* interrupted by the progress handler */
        }
        sqlite3_finalize(st);
    }
    sqlite3_progress_handler(db, 0, NULL, NULL);
    read_conn_put(s, db);
    return rc;
}

struct report_ctx {
    int (*fn)(void *, const th_report_row *);
    void *arg;
};

static int report_row(void *arg, sqlite3_stmt *st)
{
    struct report_ctx *r = arg;
    th_report_row row = {
        .id = sqlite3_column_int64(st, 0),
        .patient_id = col_text(st, 1),
        .site_id = col_text(st, 2),
        .instrument = col_text(st, 3),
        .visit_week = sqlite3_column_type(st, 4) == SQLITE_NULL ? -1 : sqlite3_column_int(st, 4),
        .has_score = sqlite3_column_type(st, 5) != SQLITE_NULL,
        .score = sqlite3_column_double(st, 5),
        .alert = sqlite3_column_int(st, 6) != 0,
    };
    return r->fn(r->arg, &row);
}

static int sq_report_scan(th_ctx *ctx, th_store *store, const char *trial_id,
                          int (*fn)(void *, const th_report_row *), void *arg)
{
    struct report_ctx r = {fn, arg};
    return read_rows_ctx((sqlite_store *)store, ctx,
                         "SELECT id, patient_id, site_id, instrument, visit_week, score, alert"
                         " FROM questionnaire_responses WHERE trial_id = ? ORDER BY id",
                         trial_id, report_row, &r);
}

static int sq_trial_patients_each(th_ctx *ctx, th_store *store, const char *trial_id,
                                  int (*fn)(void *, const th_patient *), void *arg)
{
    struct each_ctx e = {.fn.patient = fn, .arg = arg};
    return read_rows_ctx((sqlite_store *)store, ctx,
                         "SELECT trial_id, id, site_id, arm, enrolled_on FROM patients"
                         " WHERE trial_id = ? ORDER BY id",
                         trial_id, patient_row, &e);
}

/* ---- search ------------------------------------------------------------------------------ */

#define SEARCH_LIMIT_MAX 100000

/* The parameters of every search statement, numbered alike in each. */
enum {
    SP_TRIAL = 1,
    SP_SITE,
    SP_PATIENT,
    SP_QUESTIONNAIRE,
    SP_FROM,
    SP_UNTIL,
    SP_AFTER,
    SP_ASOF,
    SP_LIMIT
};

/* The filters of q as SQL, made of fixed fragments only (every value is bound): one statement per
 * combination of filters, so that SQLite plans each with the index that fits instead of one
 * plan for `(? IS NULL OR column = ?)`, which can use none. */
static void search_where(const th_qr_search *q, char *sql, size_t len)
{
    snprintf(sql, len, " FROM questionnaire_responses WHERE id <= ?8%s%s%s%s%s%s",
             q->trial_id ? " AND trial_id = ?1" : "", q->site_id ? " AND site_id = ?2" : "",
             q->patient_id ? " AND patient_id = ?3" : "",
             q->questionnaire ? " AND questionnaire = ?4" : "",
             q->received_from_ms != INT64_MIN ? " AND received_ms >= ?5" : "",
             q->received_until_ms != INT64_MAX ? " AND received_ms < ?6" : "");
}

/* Prepares sql on db and binds every search parameter it uses. */
static int search_prepare(sqlite3 *db, const char *sql, const th_qr_search *q, int64_t asof_id,
                          sqlite3_stmt **out)
{
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
        return TH_EIO;
    }
    /* A statement without some of the parameters answers SQLITE_RANGE for them: harmless. */
    bind_text(st, SP_TRIAL, q->trial_id);
    bind_text(st, SP_SITE, q->site_id);
    bind_text(st, SP_PATIENT, q->patient_id);
    bind_text(st, SP_QUESTIONNAIRE, q->questionnaire);
    sqlite3_bind_int64(st, SP_FROM, q->received_from_ms);
    sqlite3_bind_int64(st, SP_UNTIL, q->received_until_ms);
    sqlite3_bind_int64(st, SP_AFTER, q->after_id);
    sqlite3_bind_int64(st, SP_ASOF, asof_id);
    /* One more than the page: whether it comes back says if there is a next page. */
    sqlite3_bind_int64(st, SP_LIMIT, (int64_t)q->limit + 1);
    *out = st;
    return 0;
}

/* Steps st to its end calling fn per row, and finalizes it. Returns 0, th_ctx_err(ctx) when the
 * statement was interrupted because ctx ended, TH_EIO or fn's code. */
static int search_step(th_ctx *ctx, sqlite3_stmt *st, row_fn fn, void *arg)
{
    int rc = 0, step;
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        rc = fn(arg, st);
        if (rc != 0) {
            break;
        }
    }
    if (rc == 0 && step != SQLITE_DONE) {
        rc = step == SQLITE_INTERRUPT && th_ctx_done(ctx) ? th_ctx_err(ctx) : TH_EIO;
    }
    sqlite3_finalize(st);
    return rc;
}

struct search_ctx {
    const th_qr_search *q;
    int (*fn)(void *, const th_qr_stored *);
    void *arg;
    th_qr_page *page;
    size_t rows;
};

static int search_row(void *arg, sqlite3_stmt *st)
{
    struct search_ctx *sc = arg;
    if (sc->rows == sc->q->limit) {
        sc->page->more = true; /* the extra row: there is a next page */
        return 0;
    }
    th_qr_stored row;
    memset(&row, 0, sizeof(row));
    if (qr_row(&row, st) != 1) {
        return TH_ENOMEM;
    }
    int rc = sc->fn(sc->arg, &row);
    th_qr_stored_free(&row);
    sc->rows++;
    sc->page->last_id = sqlite3_column_int64(st, 0);
    return rc;
}

static int search_asof_row(void *arg, sqlite3_stmt *st)
{
    th_qr_page *page = arg;
    page->asof_id = sqlite3_column_int64(st, 0);
    return 0;
}

static int search_count_row(void *arg, sqlite3_stmt *st)
{
    th_qr_page *page = arg;
    page->total = sqlite3_column_int64(st, 0);
    return 0;
}

static int sq_qr_search(th_ctx *ctx, th_store *store, const th_qr_search *q,
                        int (*fn)(void *, const th_qr_stored *), void *arg, th_qr_page *page_out)
{
    if (q->limit > SEARCH_LIMIT_MAX) {
        return TH_EINVAL;
    }
    if (th_ctx_done(ctx)) {
        return th_ctx_err(ctx);
    }
    sqlite_store *s = (sqlite_store *)store;
    sqlite3 *db = read_conn_get(s);
    if (db == NULL) {
        return TH_EIO;
    }
    sqlite3_progress_handler(db, 2000, ctx_interrupt, ctx);
    char where[256], sql[512];
    search_where(q, where, sizeof(where));
    th_qr_page page = {.asof_id = q->asof_id, .total = -1};
    sqlite3_stmt *st = NULL;
    /* One read transaction: the bound, the total and the page see the same snapshot. */
    int rc = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) == SQLITE_OK ? 0 : TH_EIO;
    if (rc == 0 && page.asof_id == 0) {
        rc = search_prepare(db, "SELECT coalesce(max(id), 0) FROM questionnaire_responses", q, 0,
                            &st);
        rc = rc ? rc : search_step(ctx, st, search_asof_row, &page);
    }
    struct search_ctx sc = {q, fn, arg, &page, 0};
    if (rc == 0 && q->limit > 0) {
        snprintf(sql, sizeof(sql),
                 "SELECT id, trial_id, site_id, patient_id, instrument, processing, score,"
                 " score_is_int, band, alert, version, received_ms, body, visit_week%s"
                 " AND id > ?7 ORDER BY id LIMIT ?9",
                 where);
        rc = search_prepare(db, sql, q, page.asof_id, &st);
        rc = rc ? rc : search_step(ctx, st, search_row, &sc);
    }
    if (rc == 0 && q->count) {
        if (q->after_id == 0 && q->limit > 0 && !page.more) {
            page.total = (int64_t)sc.rows; /* the first page held every match: no second pass */
        } else {
            snprintf(sql, sizeof(sql), "SELECT count(*)%s", where);
            rc = search_prepare(db, sql, q, page.asof_id, &st);
            rc = rc ? rc : search_step(ctx, st, search_count_row, &page);
        }
    }
    (void)sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    sqlite3_progress_handler(db, 0, NULL, NULL);
    read_conn_put(s, db);
    if (rc == 0) {
        *page_out = page;
    }
    return rc;
}

static int sq_webhook_secret_set(th_store *store, const char *trial_id, const char *secret)
{
    sqlite_store *s = (sqlite_store *)store;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(s->wdb, "UPDATE trials SET webhook_secret = ? WHERE id = ?", -1, &st,
                           NULL) != SQLITE_OK) {
        return TH_EIO;
    }
    bind_text(st, 1, secret);
    bind_text(st, 2, trial_id);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) {
        return TH_EIO;
    }
    return sqlite3_changes(s->wdb) == 1 ? 0 : TH_ENOTFOUND;
}

struct secret_out {
    char *out;
    size_t len;
    bool found;
};

static int secret_row(void *arg, sqlite3_stmt *st)
{
    struct secret_out *o = arg;
    if (sqlite3_column_type(st, 0) != SQLITE_NULL) {
        snprintf(o->out, o->len, "%s", col_text(st, 0));
        o->found = true;
    }
    return 0;
}

static int sq_webhook_secret_get(th_store *store, const char *trial_id, char *out, size_t len)
{
    struct secret_out o = {out, len, false};
    int rc =
        read_rows_ctx((sqlite_store *)store, th_ctx_background(),
                      "SELECT webhook_secret FROM trials WHERE id = ?", trial_id, secret_row, &o);
    return rc != 0 ? rc : o.found ? 0 : TH_ENOTFOUND;
}

static int sq_ping(th_store *store)
{
    sqlite_store *s = (sqlite_store *)store;
    sqlite3 *db = read_conn_get(s);
    if (db == NULL) {
        return TH_EIO;
    }
    /* A read of the schema proves the file is there and readable; writability is proven by
     * the writer's last commit, which the caller checks. */
    int rc = sqlite3_exec(db, "SELECT 1 FROM schema_migrations LIMIT 1", NULL, NULL, NULL);
    read_conn_put(s, db);
    return rc == SQLITE_OK ? 0 : TH_EIO;
}

/* For tables that live beside the store's and must be written in the writer's transaction (the
 * queue's tasks, src/queue/sql.c). */
static void *sq_write_conn(th_store *store)
{
    return ((sqlite_store *)store)->wdb;
}

static const th_store_ops sqlite_ops = {
    .name = "sqlite",
    .close = sq_close,
    .begin = sq_begin,
    .commit = sq_commit,
    .rollback = sq_rollback,
    .trial_insert = sq_trial_insert,
    .site_insert = sq_site_insert,
    .site_upsert = sq_site_upsert,
    .patient_insert = sq_patient_insert,
    .key_insert = sq_key_insert,
    .key_revoke = sq_key_revoke,
    .qr_insert = sq_qr_insert,
    .qr_set_score = sq_qr_set_score,
    .progress_load = sq_progress_load,
    .webhook_secret_set = sq_webhook_secret_set,
    .webhook_secret_get = sq_webhook_secret_get,
    .trial_patients_each = sq_trial_patients_each,
    .report_scan = sq_report_scan,
    .qr_search = sq_qr_search,
    .trials_each = sq_trials_each,
    .sites_each = sq_sites_each,
    .patients_each = sq_patients_each,
    .keys_each = sq_keys_each,
    .qr_get = sq_qr_get,
    .qr_pending = sq_qr_pending,
    .qr_count = sq_qr_count,
    .ping = sq_ping,
    .write_conn = sq_write_conn,
};
