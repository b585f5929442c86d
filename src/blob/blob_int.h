/* The blob store's backend vtable: each backend (fs.c now, s3.c at scale-out) fills one, and
 * blob.c dispatches the public th_blob_* calls through it. What every backend shares (the size
 * limit and the SHA-256 that names a blob) lives in blob.c, so a backend only moves bytes. */
#ifndef TRIALHUB_BLOB_INT_H
#define TRIALHUB_BLOB_INT_H

#include "trialhub/blob.h"

struct evp_md_ctx_st; /* OpenSSL's EVP_MD_CTX, used by blob.c only */

typedef struct th_blob_ops {
    const char *name;
    void (*close)(th_blob_store *store);
    /* Allocates the backend's writer, which starts with struct th_blob_writer; blob.c fills the
     * header. Returns 0, TH_EIO or TH_ENOMEM. */
    int (*writer_open)(th_blob_store *store, th_blob_writer **out);
    /* Stores len more bytes (the limit is already checked). Returns 0 or TH_EIO. */
    int (*writer_write)(th_blob_writer *w, const void *data, size_t len);
    /* Makes the bytes durable under key (64 hex digits, the SHA-256 of what was written) and
     * frees the writer, whatever the outcome. */
    int (*writer_commit)(th_ctx *ctx, th_blob_writer *w, const char *key);
    /* Drops what was written and frees the writer. */
    void (*writer_abort)(th_blob_writer *w);
    int (*path)(th_blob_store *store, const char *key, char *path, size_t len);
    int (*remove)(th_ctx *ctx, th_blob_store *store, const char *key);
    int (*sweep)(th_blob_store *store, uint64_t min_age_s, size_t *removed);
} th_blob_ops;

/* Every backend's store struct starts with this header. */
struct th_blob_store {
    const th_blob_ops *ops;
    uint64_t max_bytes;
};

/* Every backend's writer struct starts with this header. */
struct th_blob_writer {
    th_blob_store *store;
    struct evp_md_ctx_st *sha;
    uint64_t nbytes;
};

/* Backend constructors: path is the URL with the scheme removed. */
int th__blob_fs_open(const char *path, th_blob_store **out, char *errbuf, size_t errlen);

#endif
