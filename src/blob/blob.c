/* Blob store front end: picks the backend from the URL scheme, enforces the size limit and
 * hashes every blob with SHA-256 (OpenSSL EVP) on its way to the backend. */
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

#include "blob/blob_int.h"
#include "trialhub/alloc.h"

int th_blob_open(const char *url, uint64_t max_blob_bytes, th_blob_store **out, char *errbuf,
                 size_t errlen)
{
    if (url == NULL) {
        snprintf(errbuf, errlen, "no blob URL");
        return TH_EINVAL;
    }
    th_blob_store *store = NULL;
    int rc;
    if (strncmp(url, "file://", 7) == 0 && url[7] != '\0') {
        rc = th__blob_fs_open(url + 7, &store, errbuf, errlen);
    } else if (strncmp(url, "s3://", 5) == 0 || strncmp(url, "http://", 7) == 0 ||
               strncmp(url, "https://", 8) == 0) {
        snprintf(errbuf, errlen, "the S3 blob backend is not built yet (scale-out issue)");
        return TH_EUNSUPPORTED;
    } else {
        snprintf(errbuf, errlen,
                 "unknown blob URL scheme (expected file:///path or file://./path)");
        return TH_EINVAL;
    }
    if (rc != 0) {
        return rc;
    }
    store->max_bytes = max_blob_bytes ? max_blob_bytes : TH_BLOB_DEFAULT_MAX_BYTES;
    *out = store;
    return 0;
}

void th_blob_close(th_blob_store *store)
{
    if (store != NULL) {
        store->ops->close(store);
    }
}

const char *th_blob_backend(const th_blob_store *store)
{
    return store->ops->name;
}

int th_blob_writer_open(th_blob_store *store, th_blob_writer **out)
{
    /* An OpenSSL allocation like any other: fault injection may fail it. */
    EVP_MD_CTX *sha = th__fault_should_fail() ? NULL : EVP_MD_CTX_new();
    if (sha == NULL) {
        return TH_ENOMEM;
    }
    if (EVP_DigestInit_ex(sha, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(sha);
        return TH_ENOMEM;
    }
    th_blob_writer *w = NULL;
    int rc = store->ops->writer_open(store, &w);
    if (rc != 0) {
        EVP_MD_CTX_free(sha);
        return rc;
    }
    w->store = store;
    w->sha = sha;
    w->nbytes = 0;
    *out = w;
    return 0;
}

int th_blob_writer_write(th_blob_writer *w, const void *data, size_t len)
{
    if (len > w->store->max_bytes - w->nbytes) {
        return TH_ETOOBIG;
    }
    if (len == 0) {
        return 0;
    }
    int rc = w->store->ops->writer_write(w, data, len);
    if (rc != 0) {
        return rc;
    }
    if (EVP_DigestUpdate(w->sha, data, len) != 1) {
        return TH_EIO;
    }
    w->nbytes += len;
    return 0;
}

uint64_t th_blob_writer_size(const th_blob_writer *w)
{
    return w->nbytes;
}

int th_blob_writer_commit(th_ctx *ctx, th_blob_writer *w, char key_out[TH_BLOB_KEY_LEN + 1])
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    int ok = EVP_DigestFinal_ex(w->sha, digest, &dlen) == 1 && dlen == TH_BLOB_KEY_LEN / 2;
    EVP_MD_CTX_free(w->sha);
    w->sha = NULL;
    if (!ok) {
        w->store->ops->writer_abort(w);
        return TH_EIO;
    }
    char key[TH_BLOB_KEY_LEN + 1];
    static const char hex[] = "0123456789abcdef";
    for (unsigned i = 0; i < dlen; i++) {
        key[2 * i] = hex[digest[i] >> 4];
        key[2 * i + 1] = hex[digest[i] & 15];
    }
    key[TH_BLOB_KEY_LEN] = '\0';
    int rc = w->store->ops->writer_commit(ctx, w, key);
    if (rc == 0) {
        memcpy(key_out, key, sizeof(key));
    }
    return rc;
}

void th_blob_writer_abort(th_blob_writer *w)
{
    if (w == NULL) {
        return;
    }
    EVP_MD_CTX_free(w->sha);
    w->sha = NULL;
    w->store->ops->writer_abort(w);
}

bool th_blob_key_valid(const char *key)
{
    if (key == NULL) {
        return false;
    }
    size_t i = 0;
    for (; i <= TH_BLOB_KEY_LEN && key[i] != '\0'; i++) {
        if (!((key[i] >= '0' && key[i] <= '9') || (key[i] >= 'a' && key[i] <= 'f'))) {
            return false;
        }
    }
    return i == TH_BLOB_KEY_LEN;
}

int th_blob_path(th_blob_store *store, const char *key, char *path, size_t len)
{
    if (!th_blob_key_valid(key)) {
        return TH_EINVAL;
    }
    if (store->ops->path == NULL) {
        return TH_EUNSUPPORTED;
    }
    return store->ops->path(store, key, path, len);
}

int th_blob_delete(th_ctx *ctx, th_blob_store *store, const char *key)
{
    if (!th_blob_key_valid(key)) {
        return TH_EINVAL;
    }
    int rc = th_ctx_err(ctx);
    return rc != 0 ? rc : store->ops->remove(ctx, store, key);
}

int th_blob_sweep(th_blob_store *store, uint64_t min_age_s, size_t *removed)
{
    size_t count = 0;
    int rc = store->ops->sweep(store, min_age_s, &count);
    if (removed != NULL) {
        *removed = count;
    }
    return rc;
}
