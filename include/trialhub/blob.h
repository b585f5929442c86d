/* The blob store: content-addressed storage for uploaded images, behind one interface with one
 * implementation per backend (a local folder now; S3-compatible stores at scale-out), chosen by
 * URL like the store. A blob is written through a streaming writer that hashes it on the way
 * (SHA-256) and becomes visible, under the hash as its key, only once committed and durable; an
 * identical blob is stored once. Design notes: docs/internals/dicom.md (uploads). */
#ifndef TRIALHUB_BLOB_H
#define TRIALHUB_BLOB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/ctx.h"
#include "trialhub/error.h"

typedef struct th_blob_store th_blob_store;
typedef struct th_blob_writer th_blob_writer;

/* A key is the blob's SHA-256 in lowercase hex: 64 characters, plus the NUL. */
#define TH_BLOB_KEY_LEN 64

/* Where blobs go when TRIALHUB_BLOB_URL is not set. */
#define TH_DEFAULT_BLOB_URL "file://./data/blobs"

/* The largest blob th_blob_open() allows when given 0: 1 GiB. */
#define TH_BLOB_DEFAULT_MAX_BYTES (UINT64_C(1) << 30)

/* Opens the store at url: `file:///abs/path` or `file://./rel/path` (relative to the current
 * folder at open; the store keeps the absolute path). Creates the folder and its tmp/ if missing
 * (mode 0700). max_blob_bytes is the largest blob a writer accepts (0: the default). *out is
 * owned by the caller (th_blob_close()). Returns 0, TH_EINVAL (unknown scheme or bad URL),
 * TH_EUNSUPPORTED (a known backend not built in: s3://), TH_EIO (cannot create or open the
 * folder; errbuf says why) or TH_ENOMEM. Does not sweep: call th_blob_sweep() at start-up. */
TH_MUST_CHECK int th_blob_open(const char *url, uint64_t max_blob_bytes, th_blob_store **out,
                               char *errbuf, size_t errlen);

/* Closes the store. Every writer must have been committed or aborted. NULL is a no-op. */
void th_blob_close(th_blob_store *store);

/* The backend's name: "file". */
const char *th_blob_backend(const th_blob_store *store);

/* Starts a blob: for the file backend, a new temporary file in the store's tmp/ folder (O_EXCL,
 * mode 0600). *out is owned by the caller until exactly one of th_blob_writer_commit() and
 * th_blob_writer_abort() ends it. Returns 0, TH_EIO (cannot create the file, or the store failed
 * an fsync earlier) or TH_ENOMEM; *out is untouched on failure. Thread-safe: any number of
 * writers may be open at once, each used by one thread at a time. */
TH_MUST_CHECK int th_blob_writer_open(th_blob_store *store, th_blob_writer **out);

/* Appends len bytes, hashing them on the way. Returns 0; TH_ETOOBIG if the blob would exceed the
 * store's limit (nothing of data is written and the writer is unchanged: abort it, or write
 * less); TH_EIO when the write fails (then the writer can only be aborted). */
TH_MUST_CHECK int th_blob_writer_write(th_blob_writer *w, const void *data, size_t len);

/* The bytes written so far. */
uint64_t th_blob_writer_size(const th_blob_writer *w);

/* Makes the blob durable and visible under its key, written to key_out: fsyncs the file, links
 * it into `ab/cd/<sha256 hex>` and fsyncs that folder (the file backend never blocks on
 * anything but the disk; a remote backend uploads here, so ctx bounds it). If the same content is
 * already stored, that copy stays and this one is dropped: the result is the same key. Ends the
 * writer whatever the outcome, like fclose(): on failure nothing of it is left in the store.
 * Returns 0, TH_EIO (a write or fsync failed: the file backend then refuses all further writes,
 * since an fsync that failed cannot be retried safely), or th_ctx_err(ctx). */
TH_MUST_CHECK int th_blob_writer_commit(th_ctx *ctx, th_blob_writer *w,
                                        char key_out[TH_BLOB_KEY_LEN + 1]);

/* Ends the writer and removes its temporary file: nothing is left. NULL is a no-op. */
void th_blob_writer_abort(th_blob_writer *w);

/* Writes the local path of the blob with this key to path (len bytes), for an analyzer to open.
 * File backend only: a remote backend will download into a local cache instead, through a call
 * that takes a context (not built yet), and answers TH_EUNSUPPORTED here. Returns 0, TH_EINVAL
 * (not a key: 64 lowercase hex digits), TH_ENOTFOUND (no such blob), TH_ETOOBIG (path is too
 * small) or TH_EUNSUPPORTED. Thread-safe. */
TH_MUST_CHECK int th_blob_path(th_blob_store *store, const char *key, char *path, size_t len);

/* Deletes the blob with this key, durably (fsyncs its folder). Returns 0, TH_EINVAL (not a key),
 * TH_ENOTFOUND, TH_EIO, or th_ctx_err(ctx). Thread-safe. */
TH_MUST_CHECK int th_blob_delete(th_ctx *ctx, th_blob_store *store, const char *key);

/* Removes temporary files left by writers that never ended (a crash), if last modified at least
 * min_age_s seconds ago: at start-up, pass 0 when this process is the store's only user, or an
 * hour when other processes (workers, other API nodes on a shared folder) may be writing. *removed
 * (may be NULL) gets the count. Returns 0 or TH_EIO. Thread-safe. */
TH_MUST_CHECK int th_blob_sweep(th_blob_store *store, uint64_t min_age_s, size_t *removed);

/* Returns true when key is 64 lowercase hex digits. */
bool th_blob_key_valid(const char *key);

#endif
