/* The embedded queue: tasks in a table of the store's SQLite file (migration 5 in
 * src/store/sqlite.c), leased with one short BEGIN IMMEDIATE transaction each, so that threads
 * and processes on one machine share it through SQLite's own locking (WAL, busy waits bounded by
 * busy_timeout_ms and by the caller's context). Each queue keeps a small pool of connections of
 * its own, so that it works in a `trialhub worker` process that has no store open; enqueue_in
 * borrows the store's write connection instead, to write in the group-commit writer's
 * transaction.
 *
 * Threads of one process take turns at write transactions through a token (`tx_mu`, `tx_busy`)
 * handed over on a condition variable, instead of SQLite's busy handler, which polls with
 * sleeps and lets an unlucky thread starve for seconds when eight of them contend; only the
 * wait for other processes goes through the busy handler.
 *
 * Locking: `tx_mu` protects `tx_busy`; `pool_mu` protects the idle-connection stack; neither is
 * held while the other is taken. While a thread waits for the token it holds tx_mu and then its
 * context's mutex (th__waiter). A connection is used by one thread at a time (between conn_get
 * and conn_put), which SQLITE_OPEN_NOMUTEX relies on. */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core_int.h"
#include "queue/queue_int.h"
#include "store/store_int.h"
#include "trialhub/alloc.h"
#include "trialhub/clock.h"

#define POOL_MAX 8  /* idle connections kept; more threads open (and close) their own */
#define BURY_MAX 16 /* tasks found dead (expired on their last attempt) per kind per lease */
#define LIVE     "('queued', 'failed', 'running')"
#define TASK_COLS                                                                                \
    "id, kind, scope, state, priority, attempts, max_attempts, due_ms, lease_owner, created_ms," \
    " updated_ms, payload, result, last_error"

enum {
    QS_BEGIN,
    QS_COMMIT,
    QS_ROLLBACK,
    QS_INSERT,
    QS_BY_KEY,
    QS_RUNNING,
    QS_CANDIDATE,
    QS_BURY,
    QS_TAKE,
    QS_HEARTBEAT,
    QS_FINISH,
    QS_FAIL,
    QS_CANCEL,
    QS_STATE,
    QS_GET,
    QS_COUNTS,
    QS_COUNT
};

/* due_ms is when a task may next be leased: run_at for queued and failed tasks, the end of the
 * lease for running ones. One index range over the live tasks of a kind, in priority order, thus
 * finds new work, retries whose backoff is over and leases whose worker died alike. */
static const char *const sql_text[QS_COUNT] = {
    [QS_BEGIN] = "BEGIN IMMEDIATE",
    [QS_COMMIT] = "COMMIT",
    [QS_ROLLBACK] = "ROLLBACK",
    [QS_INSERT] = "INSERT INTO tasks(id, kind, scope, idempotency_key, payload, priority, state,"
                  " max_attempts, due_ms, created_ms, updated_ms)"
                  " VALUES(?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?9, ?9)"
                  " ON CONFLICT DO NOTHING",
    [QS_BY_KEY] = "SELECT id, payload FROM tasks"
                  " WHERE kind = ?1 AND scope = ?2 AND idempotency_key = ?3",
    /* live leases of a kind: index tasks_running */
    [QS_RUNNING] = "SELECT count(*) FROM tasks WHERE kind = ?1 AND state = 'running'"
                   " AND due_ms > ?2",
    /* index tasks_due, in its order: no sort, stops at the first due task */
    [QS_CANDIDATE] = "SELECT seq, priority, due_ms, state, attempts, max_attempts FROM tasks"
                     " WHERE kind = ?1 AND state IN " LIVE " AND due_ms <= ?2"
                     " ORDER BY priority DESC, due_ms LIMIT 1",
    [QS_BURY] = "UPDATE tasks SET state = 'dead', updated_ms = ?2,"
                " last_error = 'lease expired on the last attempt (worker lost)' WHERE seq = ?1",
    [QS_TAKE] = "UPDATE tasks SET state = 'running', attempts = attempts + 1, lease_owner = ?2,"
                " due_ms = ?3, updated_ms = ?4 WHERE seq = ?1 RETURNING " TASK_COLS,
    [QS_HEARTBEAT] = "UPDATE tasks SET due_ms = ?4, updated_ms = ?5"
                     " WHERE id = ?1 AND state = 'running' AND lease_owner = ?2 AND attempts = ?3",
    [QS_FINISH] = "UPDATE tasks SET state = 'succeeded', result = ?4, updated_ms = ?5"
                  " WHERE id = ?1 AND state = 'running' AND lease_owner = ?2 AND attempts = ?3",
    [QS_FAIL] = "UPDATE tasks SET state = CASE WHEN ?4 AND attempts < max_attempts"
                " THEN 'failed' ELSE 'dead' END, due_ms = ?5, last_error = ?6, updated_ms = ?7"
                " WHERE id = ?1 AND state = 'running' AND lease_owner = ?2 AND attempts = ?3",
    [QS_CANCEL] = "UPDATE tasks SET state = 'canceled', updated_ms = ?2"
                  " WHERE id = ?1 AND state IN " LIVE,
    [QS_STATE] = "SELECT state FROM tasks WHERE id = ?1",
    [QS_GET] = "SELECT " TASK_COLS " FROM tasks WHERE id = ?1",
    [QS_COUNTS] = "SELECT state, count(*) FROM tasks GROUP BY state",
};

typedef struct sql_queue sql_queue;

typedef struct sql_conn {
    sql_queue *queue;
    sqlite3 *db;
    sqlite3_stmt *st[QS_COUNT];
    th_ctx *ctx; /* the caller's, for the busy handler */
    uint64_t busy_deadline_ns;
    uint32_t busy_timeout_ms;
    bool broken;    /* an I/O error: closed instead of pooled */
    bool has_token; /* between tx_begin and the end of its transaction */
    struct sql_conn *next;
} sql_conn;

struct sql_queue {
    th_queue base;
    char *path; /* as given in the URL */
    char *file; /* SQLite's absolute name for it, to recognise the store's connection */
    pthread_mutex_t pool_mu;
    sql_conn *idle; /* under pool_mu */
    int nidle;      /* under pool_mu */
    pthread_mutex_t tx_mu;
    pthread_cond_t tx_cond;
    bool tx_busy; /* under tx_mu: a thread of this queue is in a write transaction */
};

static const th_queue_ops sql_ops;

/* ---- connections --------------------------------------------------------------------------- */

/* Waits for the lock like sqlite3_busy_timeout(), but also gives up when the caller's context
 * ends, so a blocked call returns within a few milliseconds of a cancel. SQLite only polls, so
 * the sleeps stay short (SQLite's own go up to 100 ms): a waiting process has a fair chance at
 * the lock between the short transactions of busy ones, for a few hundred wake-ups a second. */
static int on_busy(void *arg, int count)
{
    sql_conn *c = arg;
    static const unsigned delays_ms[] = {1, 1, 2, 2, 3, 3, 5};
    uint64_t now = th_clock_now_ns();
    if (count == 0) {
        c->busy_deadline_ns = now + c->busy_timeout_ms * TH_NS_PER_MS;
    }
    if (th_ctx_done(c->ctx) || now >= c->busy_deadline_ns) {
        return 0;
    }
    size_t n = sizeof(delays_ms) / sizeof(delays_ms[0]);
    uint64_t ns = delays_ms[(size_t)count < n ? (size_t)count : n - 1] * TH_NS_PER_MS;
    if (ns > c->busy_deadline_ns - now) {
        ns = c->busy_deadline_ns - now;
    }
    (void)th_ctx_sleep(c->ctx, ns);
    return !th_ctx_done(c->ctx);
}

static void conn_close(sql_conn *c)
{
    if (c == NULL) {
        return;
    }
    for (int i = 0; i < QS_COUNT; i++) {
        sqlite3_finalize(c->st[i]);
    }
    sqlite3_close(c->db);
    th_free(c);
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

/* Opens a connection to the queue's file: the file must exist in WAL mode (the store made it
 * so); commits are durable (synchronous=FULL, verified). */
static int conn_open(sql_queue *q, sql_conn **out, char *errbuf, size_t errlen)
{
    sql_conn *c = th_calloc(1, sizeof(*c));
    if (c == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return TH_ENOMEM;
    }
    c->queue = q;
    c->ctx = th_ctx_background();
    c->busy_timeout_ms = q->base.config.busy_timeout_ms;
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX;
    if (sqlite3_open_v2(q->path, &c->db, flags, NULL) != SQLITE_OK) {
        snprintf(errbuf, errlen, "cannot open the queue database: %s",
                 c->db ? sqlite3_errmsg(c->db) : "out of memory");
        conn_close(c);
        return TH_EIO;
    }
    sqlite3_extended_result_codes(c->db, 1);
    sqlite3_busy_handler(c->db, on_busy, c);
    char mode[16], sync[16];
    if (sqlite3_exec(c->db, "PRAGMA synchronous = FULL", NULL, NULL, NULL) != SQLITE_OK ||
        pragma_text(c->db, "PRAGMA journal_mode", mode, sizeof(mode)) != 0 ||
        pragma_text(c->db, "PRAGMA synchronous", sync, sizeof(sync)) != 0) {
        snprintf(errbuf, errlen, "cannot read the queue database's settings: %s",
                 sqlite3_errmsg(c->db));
        conn_close(c);
        return TH_EIO;
    }
    if (strcmp(mode, "wal") != 0 || strcmp(sync, "2") != 0) {
        snprintf(errbuf, errlen, "the queue database is not in WAL mode with synchronous=FULL");
        conn_close(c);
        return TH_EIO;
    }
    for (int i = 0; i < QS_COUNT; i++) {
        if (sqlite3_prepare_v3(c->db, sql_text[i], -1, SQLITE_PREPARE_PERSISTENT, &c->st[i],
                               NULL) != SQLITE_OK) {
            snprintf(errbuf, errlen, "cannot prepare the queue's statements: %s",
                     sqlite3_errmsg(c->db));
            conn_close(c);
            return TH_EIO;
        }
    }
    *out = c;
    return 0;
}

static void token_release(sql_conn *c)
{
    if (c->has_token) {
        sql_queue *q = c->queue;
        c->has_token = false;
        pthread_mutex_lock(&q->tx_mu);
        q->tx_busy = false;
        /* broadcast: a waiter whose context ended leaves without taking the token */
        pthread_cond_broadcast(&q->tx_cond);
        pthread_mutex_unlock(&q->tx_mu);
    }
}

static int conn_get(sql_queue *q, th_ctx *ctx, sql_conn **out)
{
    int err = th_ctx_err(ctx);
    if (err != 0) {
        return err;
    }
    sql_conn *c = NULL;
    pthread_mutex_lock(&q->pool_mu);
    if (q->idle != NULL) {
        c = q->idle;
        q->idle = c->next;
        q->nidle--;
    }
    pthread_mutex_unlock(&q->pool_mu);
    if (c == NULL) {
        char errbuf[256];
        int rc = conn_open(q, &c, errbuf, sizeof(errbuf));
        if (rc != 0) {
            return rc;
        }
    }
    c->ctx = ctx;
    c->next = NULL;
    *out = c;
    return 0;
}

static void conn_put(sql_queue *q, sql_conn *c)
{
    c->ctx = th_ctx_background();
    if (!c->broken && !sqlite3_get_autocommit(c->db)) {
        c->broken = sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK;
    }
    token_release(c);
    if (!c->broken) {
        pthread_mutex_lock(&q->pool_mu);
        if (q->nidle < POOL_MAX) {
            c->next = q->idle;
            q->idle = c;
            q->nidle++;
            c = NULL;
        }
        pthread_mutex_unlock(&q->pool_mu);
    }
    conn_close(c);
}

/* ---- statements ---------------------------------------------------------------------------- */

/* Maps an SQLite result code to ours. Anything unexpected marks the connection broken. */
static int map_rc(sql_conn *c, th_ctx *ctx, int rc)
{
    switch (rc & 0xFF) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return th_ctx_done(ctx) ? th_ctx_err(ctx) : TH_EAGAIN;
    case SQLITE_INTERRUPT:
        return th_ctx_done(ctx) ? th_ctx_err(ctx) : TH_ECANCELED;
    case SQLITE_NOMEM:
        return TH_ENOMEM;
    case SQLITE_CONSTRAINT:
        return TH_EINVAL;
    default:
        if (c != NULL) {
            c->broken = true;
        }
        return TH_EIO;
    }
}

/* Steps st to its end (a statement without rows). */
static int step_done(sql_conn *c, sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? 0 : map_rc(c, c->ctx, rc);
}

static void bind_text(sqlite3_stmt *st, int i, const char *text)
{
    sqlite3_bind_text(st, i, text, -1, SQLITE_STATIC);
}

/* Takes this process's write token, then BEGIN IMMEDIATE (the database's write lock, waiting
 * for other processes in on_busy). */
static int tx_begin(sql_conn *c)
{
    sql_queue *q = c->queue;
    th__waiter waiter;
    th__waiter_init(&waiter, &q->tx_mu, &q->tx_cond);
    int err = 0;
    pthread_mutex_lock(&q->tx_mu);
    while (q->tx_busy && (err = th__waiter_wait(&waiter, c->ctx, TH_CTX_NO_DEADLINE)) == 0) {
    }
    if (err == 0) {
        q->tx_busy = true;
        c->has_token = true;
    }
    pthread_mutex_unlock(&q->tx_mu);
    th__waiter_finish(&waiter);
    if (err != 0) {
        return err;
    }
    int rc = step_done(c, c->st[QS_BEGIN]);
    if (rc != 0) {
        token_release(c);
    }
    return rc;
}

static int tx_commit(sql_conn *c)
{
    int rc = step_done(c, c->st[QS_COMMIT]);
    if (rc != 0 && !sqlite3_get_autocommit(c->db)) {
        (void)step_done(c, c->st[QS_ROLLBACK]);
    }
    token_release(c);
    return rc;
}

static void tx_rollback(sql_conn *c)
{
    if (!sqlite3_get_autocommit(c->db)) {
        (void)step_done(c, c->st[QS_ROLLBACK]);
    }
    token_release(c);
}

static const char *col_text(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? (const char *)t : "";
}

/* A heap copy of column i, or NULL for SQL NULL. Sets *oom when the copy fails. */
static char *col_dup(sqlite3_stmt *st, int i, bool *oom)
{
    if (sqlite3_column_type(st, i) == SQLITE_NULL) {
        return NULL;
    }
    const unsigned char *t = sqlite3_column_text(st, i);
    size_t n = (size_t)sqlite3_column_bytes(st, i);
    char *copy = t ? th_malloc(n + 1) : NULL;
    if (copy == NULL) {
        *oom = true;
        return NULL;
    }
    memcpy(copy, t, n);
    copy[n] = '\0';
    return copy;
}

/* Fills *out from a row of TASK_COLS. Returns 0 or TH_ENOMEM (then *out is untouched). */
static int row_to_task(sqlite3_stmt *st, th_task *out)
{
    th_task t;
    memset(&t, 0, sizeof(t));
    snprintf(t.id, sizeof(t.id), "%s", col_text(st, 0));
    snprintf(t.kind, sizeof(t.kind), "%s", col_text(st, 1));
    snprintf(t.scope, sizeof(t.scope), "%s", col_text(st, 2));
    int state = th__task_state_parse(col_text(st, 3));
    t.state = state < 0 ? TH_TASK_DEAD : (th_task_state)state;
    t.priority = sqlite3_column_int(st, 4);
    t.attempts = sqlite3_column_int(st, 5);
    t.max_attempts = sqlite3_column_int(st, 6);
    int64_t due_ms = sqlite3_column_int64(st, 7);
    if (t.state == TH_TASK_QUEUED || t.state == TH_TASK_FAILED) {
        t.run_at_ms = due_ms;
    } else if (t.state == TH_TASK_RUNNING) {
        t.lease_expires_ms = due_ms;
    }
    snprintf(t.lease_owner, sizeof(t.lease_owner), "%s", col_text(st, 8));
    t.created_ms = sqlite3_column_int64(st, 9);
    t.updated_ms = sqlite3_column_int64(st, 10);
    bool oom = false;
    t.payload = col_dup(st, 11, &oom);
    t.result = col_dup(st, 12, &oom);
    t.last_error = col_dup(st, 13, &oom);
    if (oom) {
        th_task_free(&t);
        return TH_ENOMEM;
    }
    *out = t;
    return 0;
}

/* Why a guarded update of task id changed nothing, read in the same transaction. */
static int why_not(sql_conn *c, const char *id)
{
    sqlite3_stmt *st = c->st[QS_STATE];
    bind_text(st, 1, id);
    int step = sqlite3_step(st);
    int rc;
    if (step == SQLITE_ROW) {
        rc = strcmp(col_text(st, 0), "canceled") == 0 ? TH_ECANCELED : TH_ECONFLICT;
    } else {
        rc = step == SQLITE_DONE ? TH_ENOTFOUND : map_rc(c, c->ctx, step);
    }
    sqlite3_reset(st);
    return rc;
}

/* ---- enqueue ------------------------------------------------------------------------------- */

/* Inserts t with ins, or finds the task its idempotency key names with by_key. Runs inside a
 * transaction on either connection. Returns 0, TH_ECONFLICT, TH_EEXIST (the id is taken) or
 * an error mapped with c (NULL on the store's connection). */
static int insert_task(sql_conn *c, sqlite3 *db, sqlite3_stmt *ins, sqlite3_stmt *by_key,
                       const th__task_new *t, char *id_out, bool *existed)
{
    th_ctx *ctx = c ? c->ctx : th_ctx_background();
    bind_text(ins, 1, t->id);
    bind_text(ins, 2, t->kind);
    bind_text(ins, 3, t->scope);
    if (t->idempotency_key != NULL) {
        bind_text(ins, 4, t->idempotency_key);
    } else {
        sqlite3_bind_null(ins, 4);
    }
    sqlite3_bind_text(ins, 5, t->payload, (int)t->payload_len, SQLITE_STATIC);
    sqlite3_bind_int(ins, 6, t->priority);
    sqlite3_bind_int(ins, 7, t->max_attempts);
    sqlite3_bind_int64(ins, 8, t->run_at_ms);
    sqlite3_bind_int64(ins, 9, t->now_ms);
    int step = sqlite3_step(ins);
    sqlite3_reset(ins);
    if (step != SQLITE_DONE) {
        return map_rc(c, ctx, step);
    }
    if (sqlite3_changes(db) == 1) {
        memcpy(id_out, t->id, TH_TASK_ID_SIZE);
        *existed = false;
        return 0;
    }
    if (t->idempotency_key == NULL) {
        return TH_EEXIST;
    }
    bind_text(by_key, 1, t->kind);
    bind_text(by_key, 2, t->scope);
    bind_text(by_key, 3, t->idempotency_key);
    step = sqlite3_step(by_key);
    int rc;
    if (step == SQLITE_ROW) {
        const void *stored = sqlite3_column_blob(by_key, 1);
        size_t n = (size_t)sqlite3_column_bytes(by_key, 1);
        if (n == t->payload_len && (n == 0 || memcmp(stored, t->payload, n) == 0)) {
            snprintf(id_out, TH_TASK_ID_SIZE, "%s", col_text(by_key, 0));
            *existed = true;
            rc = 0;
        } else {
            rc = TH_ECONFLICT; /* the same key for different work */
        }
    } else {
        rc = step == SQLITE_DONE ? TH_EEXIST : map_rc(c, ctx, step);
    }
    sqlite3_reset(by_key);
    return rc;
}

static int sq_enqueue(th_ctx *ctx, th_queue *base, const th__task_new *t, char *id_out,
                      bool *existed)
{
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, ctx, &c);
    if (rc != 0) {
        return rc;
    }
    char id[TH_TASK_ID_SIZE];
    bool found = false;
    rc = tx_begin(c);
    rc = rc ? rc : insert_task(c, c->db, c->st[QS_INSERT], c->st[QS_BY_KEY], t, id, &found);
    rc = rc ? rc : tx_commit(c);
    if (rc != 0) {
        tx_rollback(c);
    } else {
        memcpy(id_out, id, TH_TASK_ID_SIZE);
        *existed = found;
    }
    conn_put(q, c);
    return rc;
}

static int sq_enqueue_in(th_queue *base, th_store *store, const th__task_new *t, char *id_out,
                         bool *existed)
{
    sql_queue *q = (sql_queue *)base;
    if (strcmp(th_store_backend(store), "sqlite") != 0) {
        return TH_EUNSUPPORTED;
    }
    sqlite3 *db = th__store_write_conn(store);
    if (db == NULL) {
        return TH_EUNSUPPORTED;
    }
    const char *file = sqlite3_db_filename(db, "main");
    if (file == NULL || strcmp(file, q->file) != 0 || sqlite3_get_autocommit(db)) {
        return TH_EINVAL; /* another database, or outside the writer's transaction */
    }
    /* Prepared per call: the writer's connection belongs to the store, which keeps no
     * statements of ours. Cheap next to the fsync the batch is about to pay. */
    sqlite3_stmt *ins = NULL, *by_key = NULL;
    int rc = 0;
    if (sqlite3_prepare_v2(db, sql_text[QS_INSERT], -1, &ins, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db, sql_text[QS_BY_KEY], -1, &by_key, NULL) != SQLITE_OK) {
        rc = sqlite3_errcode(db) == SQLITE_NOMEM ? TH_ENOMEM : TH_EIO;
    }
    char id[TH_TASK_ID_SIZE];
    bool found = false;
    rc = rc ? rc : insert_task(NULL, db, ins, by_key, t, id, &found);
    sqlite3_finalize(ins);
    sqlite3_finalize(by_key);
    if (rc == 0) {
        memcpy(id_out, id, TH_TASK_ID_SIZE);
        *existed = found;
    }
    return rc;
}

/* ---- lease --------------------------------------------------------------------------------- */

typedef struct candidate {
    bool found;
    int64_t seq;
    int priority;
    int64_t due_ms;
} candidate;

/* The best runnable task of one kind into *best (if better than what it holds), unless the kind
 * is at its limit. Buries tasks found expired on their last attempt on the way. */
static int pick_kind(sql_conn *c, const th_task_kind *kind, int64_t now, candidate *best)
{
    if (kind->max_running > 0) {
        sqlite3_stmt *st = c->st[QS_RUNNING];
        bind_text(st, 1, kind->kind);
        sqlite3_bind_int64(st, 2, now);
        int step = sqlite3_step(st);
        int64_t running = step == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
        sqlite3_reset(st);
        if (step != SQLITE_ROW) {
            return map_rc(c, c->ctx, step);
        }
        if (running >= (int64_t)kind->max_running) {
            return 0;
        }
    }
    sqlite3_stmt *st = c->st[QS_CANDIDATE];
    for (int buried = 0; buried <= BURY_MAX; buried++) {
        bind_text(st, 1, kind->kind);
        sqlite3_bind_int64(st, 2, now);
        int step = sqlite3_step(st);
        if (step != SQLITE_ROW) {
            sqlite3_reset(st);
            return step == SQLITE_DONE ? 0 : map_rc(c, c->ctx, step);
        }
        int64_t seq = sqlite3_column_int64(st, 0);
        int priority = sqlite3_column_int(st, 1);
        int64_t due_ms = sqlite3_column_int64(st, 2);
        bool lost_last = strcmp(col_text(st, 3), "running") == 0 &&
                         sqlite3_column_int(st, 4) >= sqlite3_column_int(st, 5);
        sqlite3_reset(st);
        if (!lost_last) {
            if (!best->found || priority > best->priority ||
                (priority == best->priority && due_ms < best->due_ms)) {
                *best = (candidate){true, seq, priority, due_ms};
            }
            return 0;
        }
        /* Its worker died on the last attempt: another lease would exceed max_attempts. */
        sqlite3_stmt *bury = c->st[QS_BURY];
        sqlite3_bind_int64(bury, 1, seq);
        sqlite3_bind_int64(bury, 2, now);
        int rc = step_done(c, bury);
        if (rc != 0) {
            return rc;
        }
    }
    return 0; /* a graveyard: the next lease goes on burying */
}

static int sq_lease(th_ctx *ctx, th_queue *base, const th_task_kind *kinds, size_t nkinds,
                    const char *owner, int64_t now, int64_t lease_ms, th_task *out)
{
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, ctx, &c);
    if (rc != 0) {
        return rc;
    }
    candidate best = {0};
    rc = tx_begin(c);
    for (size_t i = 0; rc == 0 && i < nkinds; i++) {
        rc = pick_kind(c, &kinds[i], now, &best);
    }
    th_task task;
    bool taken = false;
    if (rc == 0 && best.found) {
        sqlite3_stmt *st = c->st[QS_TAKE];
        sqlite3_bind_int64(st, 1, best.seq);
        bind_text(st, 2, owner);
        sqlite3_bind_int64(st, 3, now + lease_ms);
        sqlite3_bind_int64(st, 4, now);
        int step = sqlite3_step(st);
        if (step == SQLITE_ROW) {
            rc = row_to_task(st, &task);
            taken = rc == 0;
            step = sqlite3_step(st); /* RETURNING: the update is complete at SQLITE_DONE */
        }
        sqlite3_reset(st);
        if (rc == 0 && step != SQLITE_DONE) {
            rc = map_rc(c, ctx, step);
        }
    }
    rc = rc ? rc : tx_commit(c);
    if (rc != 0) {
        tx_rollback(c);
        if (taken) {
            th_task_free(&task);
        }
    } else if (taken) {
        *out = task;
    } else {
        rc = TH_EAGAIN;
    }
    conn_put(q, c);
    return rc;
}

/* ---- the lease holder's calls -------------------------------------------------------------- */

/* Runs st, an update guarded by (id, owner, attempt) bound by the caller, in a transaction:
 * 0 if it changed the task, else why not. */
static int guarded_update(sql_queue *q, sql_conn *c, sqlite3_stmt *st, const char *id)
{
    int rc = tx_begin(c);
    rc = rc ? rc : step_done(c, st);
    if (rc == 0 && sqlite3_changes(c->db) != 1) {
        rc = why_not(c, id);
    }
    if (rc == 0) {
        rc = tx_commit(c);
    } else {
        tx_rollback(c);
    }
    conn_put(q, c);
    return rc;
}

static sqlite3_stmt *bind_lease(sql_conn *c, int which, const char *id, const char *owner,
                                int attempt)
{
    sqlite3_stmt *st = c->st[which];
    bind_text(st, 1, id);
    bind_text(st, 2, owner);
    sqlite3_bind_int(st, 3, attempt);
    return st;
}

static int sq_heartbeat(th_ctx *ctx, th_queue *base, const char *id, const char *owner, int attempt,
                        int64_t now, int64_t lease_ms)
{
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, ctx, &c);
    if (rc != 0) {
        return rc;
    }
    sqlite3_stmt *st = bind_lease(c, QS_HEARTBEAT, id, owner, attempt);
    sqlite3_bind_int64(st, 4, now + lease_ms);
    sqlite3_bind_int64(st, 5, now);
    return guarded_update(q, c, st, id);
}

static int sq_finish(th_ctx *ctx, th_queue *base, const char *id, const char *owner, int attempt,
                     const char *result, int64_t now)
{
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, ctx, &c);
    if (rc != 0) {
        return rc;
    }
    sqlite3_stmt *st = bind_lease(c, QS_FINISH, id, owner, attempt);
    bind_text(st, 4, result);
    sqlite3_bind_int64(st, 5, now);
    return guarded_update(q, c, st, id);
}

static int sq_fail(th_ctx *ctx, th_queue *base, const char *id, const char *owner, int attempt,
                   const char *error, bool retryable, int64_t now, int64_t backoff_ms)
{
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, ctx, &c);
    if (rc != 0) {
        return rc;
    }
    sqlite3_stmt *st = bind_lease(c, QS_FAIL, id, owner, attempt);
    sqlite3_bind_int(st, 4, retryable);
    sqlite3_bind_int64(st, 5, now + backoff_ms);
    bind_text(st, 6, error);
    sqlite3_bind_int64(st, 7, now);
    return guarded_update(q, c, st, id);
}

static int sq_cancel(th_ctx *ctx, th_queue *base, const char *id, int64_t now)
{
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, ctx, &c);
    if (rc != 0) {
        return rc;
    }
    sqlite3_stmt *st = c->st[QS_CANCEL];
    bind_text(st, 1, id);
    sqlite3_bind_int64(st, 2, now);
    rc = guarded_update(q, c, st, id);
    /* Already canceled is what the caller wanted; succeeded or dead is too late. */
    return rc == TH_ECANCELED ? 0 : rc;
}

/* ---- reads --------------------------------------------------------------------------------- */

static int sq_get(th_ctx *ctx, th_queue *base, const char *id, th_task *out)
{
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, ctx, &c);
    if (rc != 0) {
        return rc;
    }
    sqlite3_stmt *st = c->st[QS_GET];
    bind_text(st, 1, id);
    int step = sqlite3_step(st);
    if (step == SQLITE_ROW) {
        rc = row_to_task(st, out);
    } else {
        rc = step == SQLITE_DONE ? TH_ENOTFOUND : map_rc(c, ctx, step);
    }
    sqlite3_reset(st);
    conn_put(q, c);
    return rc;
}

static int sq_counts(th_ctx *ctx, th_queue *base, int64_t counts[TH_TASK_NSTATES])
{
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, ctx, &c);
    if (rc != 0) {
        return rc;
    }
    int64_t found[TH_TASK_NSTATES] = {0};
    sqlite3_stmt *st = c->st[QS_COUNTS];
    int step;
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        int state = th__task_state_parse(col_text(st, 0));
        if (state >= 0) {
            found[state] = sqlite3_column_int64(st, 1);
        }
    }
    sqlite3_reset(st);
    rc = step == SQLITE_DONE ? 0 : map_rc(c, ctx, step);
    if (rc == 0) {
        memcpy(counts, found, sizeof(found));
    }
    conn_put(q, c);
    return rc;
}

/* ---- open, close, explain ------------------------------------------------------------------ */

static void sq_close(th_queue *base)
{
    sql_queue *q = (sql_queue *)base;
    while (q->idle != NULL) {
        sql_conn *c = q->idle;
        q->idle = c->next;
        conn_close(c);
    }
    pthread_mutex_destroy(&q->pool_mu);
    pthread_cond_destroy(&q->tx_cond);
    pthread_mutex_destroy(&q->tx_mu);
    th__queue_deinit(&q->base);
    th_free(q->path);
    th_free(q->file);
    th_free(q);
}

static char *str_dup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *copy = th_malloc(n);
    if (copy != NULL) {
        memcpy(copy, s, n);
    }
    return copy;
}

int th__queue_sql_open(const char *url, const char *path, const th_queue_config *config,
                       th_queue **out, char *errbuf, size_t errlen)
{
    if (strcmp(path, ":memory:") == 0 || strncmp(path, "file:", 5) == 0) {
        snprintf(errbuf, errlen, "the queue needs a database file that processes can share");
        return TH_EINVAL;
    }
    sql_queue *q = th_calloc(1, sizeof(*q));
    if (q == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return TH_ENOMEM;
    }
    int rc = th__queue_init(&q->base, &sql_ops, config);
    if (rc != 0) {
        snprintf(errbuf, errlen, rc == TH_EINVAL ? "bad queue configuration" : "out of resources");
        th_free(q);
        return rc;
    }
    pthread_mutex_init(&q->pool_mu, NULL);
    pthread_mutex_init(&q->tx_mu, NULL);
    if (pthread_cond_init(&q->tx_cond, NULL) != 0) {
        snprintf(errbuf, errlen, "out of resources");
        pthread_mutex_destroy(&q->tx_mu);
        pthread_mutex_destroy(&q->pool_mu);
        th__queue_deinit(&q->base);
        th_free(q);
        return TH_ESYS;
    }
    q->path = str_dup(path);
    if (q->path == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        sq_close(&q->base);
        return TH_ENOMEM;
    }
    /* The schema is the store's: opening it applies any migration this file lacks (the tasks
     * table is migration 5), and checks WAL and synchronous=FULL. */
    th_store *store;
    rc = th_store_open(url, &store, errbuf, errlen);
    if (rc != 0) {
        sq_close(&q->base);
        return rc;
    }
    th_store_close(store);
    sql_conn *c;
    rc = conn_open(q, &c, errbuf, errlen);
    if (rc != 0) {
        sq_close(&q->base);
        return rc;
    }
    const char *file = sqlite3_db_filename(c->db, "main");
    q->file = str_dup(file ? file : "");
    if (q->file == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        conn_close(c);
        sq_close(&q->base);
        return TH_ENOMEM;
    }
    conn_put(q, c);
    *out = &q->base;
    return 0;
}

int th__queue_sql_explain(th_queue *base, char *buf, size_t len)
{
    if (base->ops != &sql_ops || len == 0) {
        return TH_EINVAL;
    }
    sql_queue *q = (sql_queue *)base;
    sql_conn *c;
    int rc = conn_get(q, th_ctx_background(), &c);
    if (rc != 0) {
        return rc;
    }
    static const int which[] = {QS_CANDIDATE, QS_RUNNING, QS_TAKE, QS_HEARTBEAT, QS_BY_KEY};
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; rc == 0 && i < sizeof(which) / sizeof(which[0]); i++) {
        char sql[1024];
        snprintf(sql, sizeof(sql), "EXPLAIN QUERY PLAN %s", sql_text[which[i]]);
        sqlite3_stmt *st;
        if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK) {
            rc = TH_EIO;
            break;
        }
        while (sqlite3_step(st) == SQLITE_ROW && used < len) {
            int n = snprintf(buf + used, len - used, "%d: %s\n", which[i], col_text(st, 3));
            used += n > 0 ? (size_t)n : 0;
        }
        sqlite3_finalize(st);
    }
    conn_put(q, c);
    return rc;
}

static const th_queue_ops sql_ops = {
    .name = "sql",
    .close = sq_close,
    .enqueue = sq_enqueue,
    .enqueue_in = sq_enqueue_in,
    .lease = sq_lease,
    .heartbeat = sq_heartbeat,
    .finish = sq_finish,
    .fail = sq_fail,
    .cancel = sq_cancel,
    .get = sq_get,
    .counts = sq_counts,
};
