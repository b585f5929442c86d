/* The file backend of the blob store: a folder with tmp/ for blobs being written and
 * ab/cd/<sha256 hex> for committed ones. A blob is written to a private temporary file, fsynced,
 * then hard-linked under its key and its folder fsynced: a key that exists names a complete,
 * durable blob, and a crash leaves at most a temporary file that th_blob_sweep() removes.
 *
 * Concurrency: the store's fields are set at open and only read afterwards, except `failed`
 * (atomic); every path is resolved relative to descriptors opened at open (root_fd, tmp_fd) with
 * the *at() calls, so writers on different threads share nothing else and take no lock. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blob/blob_int.h"
#include "trialhub/alloc.h"

#define TMP_DIR      "tmp"
#define TMP_SUFFIX   ".tmp"
#define TMP_NAME_LEN (16 + sizeof(TMP_SUFFIX) - 1) /* 16 hex digits + ".tmp" */

typedef struct fs_store {
    th_blob_store base;
    char *root; /* absolute path of the folder */
    int root_fd;
    int tmp_fd;
    atomic_bool failed; /* an fsync failed: no more writes (STYLE.md: never retry an fsync) */
} fs_store;

typedef struct fs_writer {
    th_blob_writer base;
    int fd;
    bool io_failed;
    char tmp_name[TMP_NAME_LEN + 1];
} fs_writer;

static const th_blob_ops fs_ops;

static fs_store *store_of(th_blob_store *store)
{
    return (fs_store *)store;
}

/* open() through fault injection: a descriptor is a fallible acquisition like an allocation. */
static int open_at(int dirfd, const char *path, int flags, mode_t mode)
{
    if (th__fault_should_fail()) {
        errno = EMFILE;
        return -1;
    }
    return openat(dirfd, path, flags | O_CLOEXEC, mode);
}

static int open_dir(int dirfd, const char *path)
{
    return open_at(dirfd, path, O_RDONLY | O_DIRECTORY, 0);
}

/* mkdir -p with mode 0700 for the parts that do not exist. */
static int make_dirs(const char *path)
{
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof(buf)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == '\0') {
            char saved = buf[i];
            buf[i] = '\0';
            if (mkdir(buf, 0700) != 0 && errno != EEXIST) {
                return -1;
            }
            buf[i] = saved;
        }
    }
    return 0;
}

static void fs_close(th_blob_store *store)
{
    fs_store *s = store_of(store);
    if (s->tmp_fd >= 0) {
        close(s->tmp_fd);
    }
    if (s->root_fd >= 0) {
        close(s->root_fd);
    }
    th_free(s->root);
    th_free(s);
}

int th__blob_fs_open(const char *path, th_blob_store **out, char *errbuf, size_t errlen)
{
    if (path[0] == '\0') {
        snprintf(errbuf, errlen, "empty blob folder in the URL");
        return TH_EINVAL;
    }
    fs_store *s = th_calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        return TH_ENOMEM;
    }
    s->base.ops = &fs_ops;
    s->root_fd = -1;
    s->tmp_fd = -1;
    atomic_init(&s->failed, false);
    char abs[PATH_MAX];
    if (make_dirs(path) != 0 || realpath(path, abs) == NULL) {
        snprintf(errbuf, errlen, "cannot create the blob folder %s: %s", path, strerror(errno));
        fs_close(&s->base);
        return TH_EIO;
    }
    size_t n = strlen(abs);
    s->root = th_malloc(n + 1);
    if (s->root == NULL) {
        snprintf(errbuf, errlen, "out of memory");
        fs_close(&s->base);
        return TH_ENOMEM;
    }
    memcpy(s->root, abs, n + 1);
    s->root_fd = open_dir(AT_FDCWD, s->root);
    if (s->root_fd < 0 || (mkdirat(s->root_fd, TMP_DIR, 0700) != 0 && errno != EEXIST) ||
        (s->tmp_fd = open_dir(s->root_fd, TMP_DIR)) < 0) {
        snprintf(errbuf, errlen, "cannot open the blob folder %s: %s", s->root, strerror(errno));
        fs_close(&s->base);
        return TH_EIO;
    }
    *out = &s->base;
    return 0;
}

/* 16 random hex digits + ".tmp". */
static void temp_name(char name[TMP_NAME_LEN + 1])
{
    static atomic_uint_fast64_t counter;
    uint64_t bits;
    if (getrandom(&bits, sizeof(bits), GRND_NONBLOCK) != (ssize_t)sizeof(bits)) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        bits = ((uint64_t)getpid() << 40) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^
               (uint64_t)atomic_fetch_add(&counter, 1);
    }
    snprintf(name, TMP_NAME_LEN + 1, "%016llx" TMP_SUFFIX, (unsigned long long)bits);
}

static int fs_writer_open(th_blob_store *store, th_blob_writer **out)
{
    fs_store *s = store_of(store);
    if (atomic_load(&s->failed)) {
        return TH_EIO;
    }
    fs_writer *w = th_calloc(1, sizeof(*w));
    if (w == NULL) {
        return TH_ENOMEM;
    }
    for (int attempt = 0;; attempt++) {
        temp_name(w->tmp_name);
        w->fd = open_at(s->tmp_fd, w->tmp_name, O_WRONLY | O_CREAT | O_EXCL, 0600);
        if (w->fd >= 0) {
            break;
        }
        if (errno != EEXIST || attempt == 8) {
            th_free(w);
            return TH_EIO;
        }
    }
    *out = &w->base;
    return 0;
}

static int fs_writer_write(th_blob_writer *base, const void *data, size_t len)
{
    fs_writer *w = (fs_writer *)base;
    if (w->io_failed) {
        return TH_EIO;
    }
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(w->fd, p, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            /* Part of the chunk may be on disk: the writer cannot be continued. */
            w->io_failed = true;
            return TH_EIO;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void writer_drop(fs_store *s, fs_writer *w)
{
    if (w->fd >= 0) {
        close(w->fd);
    }
    (void)unlinkat(s->tmp_fd, w->tmp_name, 0);
    th_free(w);
}

static void fs_writer_abort(th_blob_writer *base)
{
    fs_writer *w = (fs_writer *)base;
    writer_drop(store_of(base->store), w);
}

/* "ab/cd/<key>" and its two folders. */
static void key_paths(const char *key, char dir1[3], char dir2[6],
                      char rel[6 + TH_BLOB_KEY_LEN + 1])
{
    snprintf(dir1, 3, "%.2s", key);
    snprintf(dir2, 6, "%.2s/%.2s", key, key + 2);
    snprintf(rel, 6 + TH_BLOB_KEY_LEN + 1, "%.2s/%.2s/%s", key, key + 2, key);
}

/* fsync through fault injection is not simulated; a failure marks the store failed. */
static int sync_fd(fs_store *s, int fd)
{
    if (fsync(fd) != 0) {
        atomic_store(&s->failed, true);
        return TH_EIO;
    }
    return 0;
}

static int fs_writer_commit(th_ctx *ctx, th_blob_writer *base, const char *key)
{
    fs_writer *w = (fs_writer *)base;
    fs_store *s = store_of(base->store);
    int rc = th_ctx_err(ctx);
    if (rc != 0) {
        writer_drop(s, w);
        return rc;
    }
    if (w->io_failed || atomic_load(&s->failed)) {
        writer_drop(s, w);
        return TH_EIO;
    }
    rc = sync_fd(s, w->fd);
    int closed = close(w->fd);
    w->fd = -1;
    if (rc != 0 || closed != 0) {
        writer_drop(s, w);
        return TH_EIO;
    }
    char dir1[3], dir2[6], rel[6 + TH_BLOB_KEY_LEN + 1];
    key_paths(key, dir1, dir2, rel);
    int fd1 = -1, fd2 = -1;
    if ((mkdirat(s->root_fd, dir1, 0700) != 0 && errno != EEXIST) ||
        (fd1 = open_dir(s->root_fd, dir1)) < 0 ||
        (mkdirat(fd1, dir2 + 3, 0700) != 0 && errno != EEXIST) ||
        (fd2 = open_dir(fd1, dir2 + 3)) < 0) {
        rc = TH_EIO;
    } else if (linkat(s->tmp_fd, w->tmp_name, fd2, key, 0) == 0) {
        rc = 0;
    } else if (errno == EEXIST) {
        /* Content-addressed: the same key is the same bytes, unless the stored copy was damaged
         * (another size); then this one replaces it. */
        struct stat st;
        if (fstatat(fd2, key, &st, 0) == 0 && (uint64_t)st.st_size == base->nbytes) {
            rc = 0;
        } else if (renameat(s->tmp_fd, w->tmp_name, fd2, key) == 0) {
            rc = 0;
        } else {
            rc = TH_EIO;
        }
    } else {
        rc = TH_EIO;
    }
    /* The folders are fsynced even when this writer did not create them: another writer may
     * have made them an instant ago and not synced them yet. An fsync of a clean folder is
     * cheap. */
    if (rc == 0) {
        rc = sync_fd(s, fd2);
    }
    if (rc == 0) {
        rc = sync_fd(s, fd1);
    }
    if (rc == 0) {
        rc = sync_fd(s, s->root_fd);
    }
    if (fd2 >= 0) {
        close(fd2);
    }
    if (fd1 >= 0) {
        close(fd1);
    }
    writer_drop(s, w); /* the temporary name goes; the blob keeps its link under the key */
    return rc;
}

static int fs_path(th_blob_store *store, const char *key, char *path, size_t len)
{
    fs_store *s = store_of(store);
    char dir1[3], dir2[6], rel[6 + TH_BLOB_KEY_LEN + 1];
    key_paths(key, dir1, dir2, rel);
    struct stat st;
    if (fstatat(s->root_fd, rel, &st, 0) != 0) {
        return errno == ENOENT ? TH_ENOTFOUND : TH_EIO;
    }
    int n = snprintf(path, len, "%s/%s", s->root, rel);
    if (n < 0 || (size_t)n >= len) {
        return TH_ETOOBIG;
    }
    return 0;
}

static int fs_remove(th_ctx *ctx, th_blob_store *store, const char *key)
{
    (void)ctx;
    fs_store *s = store_of(store);
    char dir1[3], dir2[6], rel[6 + TH_BLOB_KEY_LEN + 1];
    key_paths(key, dir1, dir2, rel);
    if (unlinkat(s->root_fd, rel, 0) != 0) {
        return errno == ENOENT ? TH_ENOTFOUND : TH_EIO;
    }
    int fd2 = open_dir(s->root_fd, dir2);
    if (fd2 < 0) {
        return TH_EIO;
    }
    int rc = sync_fd(s, fd2);
    close(fd2);
    return rc;
}

static bool is_temp_name(const char *name)
{
    if (strlen(name) != TMP_NAME_LEN || strcmp(name + 16, TMP_SUFFIX) != 0) {
        return false;
    }
    for (int i = 0; i < 16; i++) {
        if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f'))) {
            return false;
        }
    }
    return true;
}

static int fs_sweep(th_blob_store *store, uint64_t min_age_s, size_t *removed)
{
    fs_store *s = store_of(store);
    int fd = open_dir(s->tmp_fd, ".");
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    if (dir == NULL) {
        if (fd >= 0) {
            close(fd);
        }
        return TH_EIO;
    }
    time_t now = time(NULL);
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        struct stat st;
        if (!is_temp_name(e->d_name) || fstatat(s->tmp_fd, e->d_name, &st, 0) != 0) {
            continue;
        }
        bool old_enough =
            min_age_s == 0 || (now >= st.st_mtime && (uint64_t)(now - st.st_mtime) >= min_age_s);
        if (old_enough && unlinkat(s->tmp_fd, e->d_name, 0) == 0) {
            (*removed)++;
        }
    }
    closedir(dir);
    return 0;
}

static const th_blob_ops fs_ops = {
    .name = "file",
    .close = fs_close,
    .writer_open = fs_writer_open,
    .writer_write = fs_writer_write,
    .writer_commit = fs_writer_commit,
    .writer_abort = fs_writer_abort,
    .path = fs_path,
    .remove = fs_remove,
    .sweep = fs_sweep,
};
