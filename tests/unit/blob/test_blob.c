/* Tests the blob store (include/trialhub/blob.h) on its file backend, in a fresh folder per
 * test: keys are the SHA-256 of the content (checked against published test vectors), committed
 * blobs sit at ab/cd/<key> with mode 0600 and nothing left in tmp/, identical content is stored
 * once, abort and failures leave nothing, the size limit refuses a chunk without changing the
 * writer, the sweep removes only stale temporary files, URLs are checked, constructors are run
 * under allocation failure, and distinct writers on several threads commit at once. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "unit/core/test_util.h"
#include "trialhub/blob.h"

/* SHA-256 test vectors (FIPS 180-2 and well-known digests). */
#define SHA_EMPTY "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#define SHA_ABC   "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
#define SHA_HELLO "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"

typedef struct fixture {
    char dir[PATH_MAX];
    char url[PATH_MAX + 16];
    th_blob_store *store;
} fixture;

static void remove_tree(const char *path)
{
    DIR *d = opendir(path);
    if (d == NULL) {
        unlink(path);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
            continue;
        }
        char child[PATH_MAX];
        snprintf(child, sizeof(child), "%s/%s", path, e->d_name);
        struct stat st;
        if (lstat(child, &st) == 0 && S_ISDIR(st.st_mode)) {
            remove_tree(child);
        } else {
            unlink(child);
        }
    }
    closedir(d);
    rmdir(path);
}

static int count_entries(const char *path)
{
    DIR *d = opendir(path);
    if (d == NULL) {
        return -1;
    }
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        n += e->d_name[0] != '.';
    }
    closedir(d);
    return n;
}

static int tmp_entries(const fixture *f)
{
    char tmp[PATH_MAX + 8];
    snprintf(tmp, sizeof(tmp), "%s/tmp", f->dir);
    return count_entries(tmp);
}

static int setup(void **state)
{
    setup_reset(state);
    fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->dir, sizeof(f->dir), "/tmp/th-blob-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    /* The store creates missing folders: point it one level down. */
    strcat(f->dir, "/blobs");
    snprintf(f->url, sizeof(f->url), "file://%s", f->dir);
    char err[256];
    assert_int_equal(th_blob_open(f->url, 0, &f->store, err, sizeof(err)), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    th_blob_close(f->store);
    char parent[PATH_MAX];
    snprintf(parent, sizeof(parent), "%s", f->dir);
    *strrchr(parent, '/') = '\0';
    remove_tree(parent);
    free(f);
    return teardown_check(state);
}

static void commit_bytes(th_blob_store *store, const char *const *chunks, size_t n, char *key)
{
    th_blob_writer *w = NULL;
    assert_int_equal(th_blob_writer_open(store, &w), 0);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(th_blob_writer_write(w, chunks[i], strlen(chunks[i])), 0);
    }
    assert_int_equal(th_blob_writer_commit(th_ctx_background(), w, key), 0);
}

static void read_blob(th_blob_store *store, const char *key, char *out, size_t cap, size_t *len)
{
    char path[PATH_MAX];
    assert_int_equal(th_blob_path(store, key, path, sizeof(path)), 0);
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    *len = fread(out, 1, cap, fp);
    fclose(fp);
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_commit_names_by_sha256(void **state)
{
    fixture *f = *state;
    assert_string_equal(th_blob_backend(f->store), "file");
    char key[TH_BLOB_KEY_LEN + 1];
    const char *abc[] = {"a", "b", "c"};
    commit_bytes(f->store, abc, 3, key);
    assert_string_equal(key, SHA_ABC);
    commit_bytes(f->store, NULL, 0, key);
    assert_string_equal(key, SHA_EMPTY);
    const char *hello[] = {"hel", "", "lo"};
    commit_bytes(f->store, hello, 3, key);
    assert_string_equal(key, SHA_HELLO);

    char path[PATH_MAX], want[PATH_MAX + 100];
    assert_int_equal(th_blob_path(f->store, SHA_HELLO, path, sizeof(path)), 0);
    snprintf(want, sizeof(want), "%s/2c/f2/" SHA_HELLO, f->dir);
    assert_string_equal(path, want);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(st.st_nlink, 1); /* the temporary name is gone */
    char data[16];
    size_t len;
    read_blob(f->store, SHA_HELLO, data, sizeof(data), &len);
    assert_int_equal(len, 5);
    assert_memory_equal(data, "hello", 5);
    assert_int_equal(tmp_entries(f), 0);
}

static void test_identical_content_stored_once(void **state)
{
    fixture *f = *state;
    char key1[TH_BLOB_KEY_LEN + 1], key2[TH_BLOB_KEY_LEN + 1];
    const char *one[] = {"hello"};
    const char *two[] = {"he", "llo"};
    commit_bytes(f->store, one, 1, key1);
    char path[PATH_MAX];
    assert_int_equal(th_blob_path(f->store, key1, path, sizeof(path)), 0);
    struct stat before, after;
    assert_int_equal(stat(path, &before), 0);
    commit_bytes(f->store, two, 2, key2);
    assert_string_equal(key1, key2);
    assert_int_equal(stat(path, &after), 0);
    assert_int_equal(before.st_ino, after.st_ino); /* the first copy stays */
    assert_int_equal(after.st_nlink, 1);
    char dir[PATH_MAX + 8];
    snprintf(dir, sizeof(dir), "%s/2c/f2", f->dir);
    assert_int_equal(count_entries(dir), 1);
    assert_int_equal(tmp_entries(f), 0);

    /* A damaged copy (another size) is replaced by the new one. */
    assert_int_equal(truncate(path, 2), 0);
    commit_bytes(f->store, one, 1, key2);
    char data[16];
    size_t len;
    read_blob(f->store, key2, data, sizeof(data), &len);
    assert_int_equal(len, 5);
    assert_memory_equal(data, "hello", 5);
    assert_int_equal(tmp_entries(f), 0);
}

static void test_abort_leaves_nothing(void **state)
{
    fixture *f = *state;
    th_blob_writer *w = NULL;
    assert_int_equal(th_blob_writer_open(f->store, &w), 0);
    assert_int_equal(tmp_entries(f), 1);
    assert_int_equal(th_blob_writer_write(w, "hello", 5), 0);
    assert_int_equal(th_blob_writer_size(w), 5);
    th_blob_writer_abort(w);
    th_blob_writer_abort(NULL);
    assert_int_equal(tmp_entries(f), 0);
    assert_int_equal(count_entries(f->dir), 1); /* tmp/ only: no ab/ folder */
    char path[PATH_MAX];
    assert_int_equal(th_blob_path(f->store, SHA_HELLO, path, sizeof(path)), TH_ENOTFOUND);

    /* A commit on a canceled context ends the writer, stores nothing. */
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    th_ctx_cancel(ctx);
    assert_int_equal(th_blob_writer_open(f->store, &w), 0);
    assert_int_equal(th_blob_writer_write(w, "hello", 5), 0);
    char key[TH_BLOB_KEY_LEN + 1] = "unchanged";
    assert_int_equal(th_blob_writer_commit(ctx, w, key), TH_ECANCELED);
    assert_string_equal(key, "unchanged");
    assert_int_equal(tmp_entries(f), 0);
    assert_int_equal(count_entries(f->dir), 1);
    th_ctx_release(ctx);
}

static void test_size_limit(void **state)
{
    fixture *f = *state;
    char dir[PATH_MAX + 8], url[PATH_MAX + 16], err[256];
    snprintf(dir, sizeof(dir), "%s-small", f->dir);
    snprintf(url, sizeof(url), "file://%s", dir);
    th_blob_store *small = NULL;
    assert_int_equal(th_blob_open(url, 10, &small, err, sizeof(err)), 0);
    th_blob_writer *w = NULL;
    assert_int_equal(th_blob_writer_open(small, &w), 0);
    assert_int_equal(th_blob_writer_write(w, "abcdef", 6), 0);
    assert_int_equal(th_blob_writer_write(w, "ghijk", 5), TH_ETOOBIG);
    assert_int_equal(th_blob_writer_size(w), 6); /* unchanged */
    assert_int_equal(th_blob_writer_write(w, "ghij", 4), 0);
    assert_int_equal(th_blob_writer_write(w, "k", 1), TH_ETOOBIG);
    char key[TH_BLOB_KEY_LEN + 1];
    assert_int_equal(th_blob_writer_commit(th_ctx_background(), w, key), 0);
    char data[16];
    size_t len;
    read_blob(small, key, data, sizeof(data), &len);
    assert_int_equal(len, 10);
    assert_memory_equal(data, "abcdefghij", 10);

    assert_int_equal(th_blob_writer_open(small, &w), 0);
    assert_int_equal(th_blob_writer_write(w, "0123456789A", 11), TH_ETOOBIG);
    th_blob_writer_abort(w);
    char tmp[PATH_MAX + 16];
    snprintf(tmp, sizeof(tmp), "%s/tmp", dir);
    assert_int_equal(count_entries(tmp), 0);
    th_blob_close(small);
    remove_tree(dir);
}

static void test_sweep_removes_only_stale_temps(void **state)
{
    fixture *f = *state;
    /* A writer in progress, two stale temporaries, a fresh one and a stranger. */
    th_blob_writer *live = NULL;
    assert_int_equal(th_blob_writer_open(f->store, &live), 0);
    assert_int_equal(th_blob_writer_write(live, "abc", 3), 0);
    const char *names[] = {"00112233445566aa.tmp", "ffeeddccbbaa9988.tmp", "0123456789abcdef.tmp",
                           "notes.txt"};
    for (int i = 0; i < 4; i++) {
        char path[PATH_MAX + 64];
        snprintf(path, sizeof(path), "%s/tmp/%s", f->dir, names[i]);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
        assert_true(fd >= 0);
        close(fd);
        if (i < 2 || i == 3) {
            struct timespec old[2] = {{.tv_sec = time(NULL) - 7200}, {.tv_sec = time(NULL) - 7200}};
            assert_int_equal(utimensat(AT_FDCWD, path, old, 0), 0);
        }
    }
    assert_int_equal(tmp_entries(f), 5);
    size_t removed = 99;
    assert_int_equal(th_blob_sweep(f->store, 3600, &removed), 0);
    assert_int_equal(removed, 2);
    assert_int_equal(tmp_entries(f), 3); /* the live writer's, the fresh one, notes.txt */
    char key[TH_BLOB_KEY_LEN + 1];
    assert_int_equal(th_blob_writer_commit(th_ctx_background(), live, key), 0);
    assert_string_equal(key, SHA_ABC);
    /* At start-up with no other user: everything of ours goes, strangers stay. */
    assert_int_equal(th_blob_sweep(f->store, 0, NULL), 0);
    assert_int_equal(tmp_entries(f), 1);
}

static void test_path_delete_and_keys(void **state)
{
    fixture *f = *state;
    char path[PATH_MAX];
    assert_int_equal(th_blob_path(f->store, "abc", path, sizeof(path)), TH_EINVAL);
    assert_int_equal(th_blob_path(f->store, "../../../../etc/passwd", path, sizeof(path)),
                     TH_EINVAL);
    char upper[] = SHA_ABC;
    upper[0] = 'B';
    assert_false(th_blob_key_valid(upper));
    assert_false(th_blob_key_valid(SHA_ABC "0"));
    assert_false(th_blob_key_valid(NULL));
    assert_true(th_blob_key_valid(SHA_ABC));
    assert_int_equal(th_blob_path(f->store, SHA_ABC, path, sizeof(path)), TH_ENOTFOUND);

    char key[TH_BLOB_KEY_LEN + 1];
    const char *abc[] = {"abc"};
    commit_bytes(f->store, abc, 1, key);
    char tiny[16];
    assert_int_equal(th_blob_path(f->store, key, tiny, sizeof(tiny)), TH_ETOOBIG);
    th_ctx *ctx = NULL;
    assert_int_equal(th_ctx_with_cancel(th_ctx_background(), &ctx), 0);
    th_ctx_cancel(ctx);
    assert_int_equal(th_blob_delete(ctx, f->store, key), TH_ECANCELED);
    th_ctx_release(ctx);
    assert_int_equal(th_blob_path(f->store, key, path, sizeof(path)), 0);
    assert_int_equal(th_blob_delete(th_ctx_background(), f->store, key), 0);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(th_blob_path(f->store, key, path, sizeof(path)), TH_ENOTFOUND);
    assert_int_equal(th_blob_delete(th_ctx_background(), f->store, key), TH_ENOTFOUND);
    assert_int_equal(th_blob_delete(th_ctx_background(), f->store, "zz"), TH_EINVAL);
}

static void test_urls(void **state)
{
    fixture *f = *state;
    th_blob_store *s = NULL;
    char err[256];
    assert_int_equal(th_blob_open("ftp://x", 0, &s, err, sizeof(err)), TH_EINVAL);
    assert_int_equal(th_blob_open("file://", 0, &s, err, sizeof(err)), TH_EINVAL);
    assert_int_equal(th_blob_open(NULL, 0, &s, err, sizeof(err)), TH_EINVAL);
    assert_int_equal(th_blob_open("s3://bucket/prefix", 0, &s, err, sizeof(err)), TH_EUNSUPPORTED);
    assert_null(s);
    assert_int_equal(th_blob_open("file:///proc/no/such/place", 0, &s, err, sizeof(err)), TH_EIO);
    assert_non_null(strstr(err, "cannot create the blob folder"));

    /* A relative URL is resolved once, at open: the store keeps working after a chdir. */
    char cwd[PATH_MAX], parent[PATH_MAX];
    assert_non_null(getcwd(cwd, sizeof(cwd)));
    snprintf(parent, sizeof(parent), "%s", f->dir);
    *strrchr(parent, '/') = '\0';
    assert_int_equal(chdir(parent), 0);
    int rc = th_blob_open("file://./rel/blobs", 0, &s, err, sizeof(err));
    assert_int_equal(chdir(cwd), 0);
    assert_int_equal(rc, 0);
    char key[TH_BLOB_KEY_LEN + 1], path[PATH_MAX], want[PATH_MAX + 100];
    const char *abc[] = {"abc"};
    commit_bytes(s, abc, 1, key);
    assert_int_equal(th_blob_path(s, key, path, sizeof(path)), 0);
    snprintf(want, sizeof(want), "%s/rel/blobs/ba/78/" SHA_ABC, parent);
    assert_string_equal(path, want);
    th_blob_close(s);
    th_blob_close(NULL);
}

/* Fail the Nth acquisition (allocation or descriptor) until each constructor succeeds: every
 * failure is clean, leaks nothing (ASan) and leaves no temporary file. */
static void test_allocation_failures(void **state)
{
    fixture *f = *state;
    char err[256];
    int rc = -1;
    long n;
    for (n = 0; n < 50 && rc != 0; n++) {
        th_blob_store *s = NULL;
        th__fault_fail_after(n);
        rc = th_blob_open(f->url, 0, &s, err, sizeof(err));
        th__fault_fail_after(-1);
        if (rc == 0) {
            th_blob_close(s);
        } else {
            assert_true(rc == TH_ENOMEM || rc == TH_EIO);
            assert_null(s);
        }
    }
    assert_int_equal(rc, 0);
    assert_true(n > 2);

    rc = -1;
    for (n = 0; n < 50 && rc != 0; n++) {
        th_blob_writer *w = NULL;
        th__fault_fail_after(n);
        rc = th_blob_writer_open(f->store, &w);
        th__fault_fail_after(-1);
        if (rc == 0) {
            char key[TH_BLOB_KEY_LEN + 1];
            assert_int_equal(th_blob_writer_write(w, "abc", 3), 0);
            assert_int_equal(th_blob_writer_commit(th_ctx_background(), w, key), 0);
            assert_string_equal(key, SHA_ABC);
        } else {
            assert_true(rc == TH_ENOMEM || rc == TH_EIO);
            assert_null(w);
            assert_int_equal(tmp_entries(f), 0);
        }
    }
    assert_int_equal(rc, 0);
    assert_true(n > 2);
    assert_int_equal(tmp_entries(f), 0);
}

/* Distinct writers on several threads: each commits its own blobs and a shared one at the same
 * time; every key is right, nothing is left in tmp/. */
#define THREADS          4
#define BLOBS_PER_THREAD 40

typedef struct worker_arg {
    th_blob_store *store;
    int id;
} worker_arg;

static void *writer_thread(void *arg)
{
    worker_arg *a = arg;
    for (int i = 0; i < BLOBS_PER_THREAD; i++) {
        char content[64];
        bool shared = i % 4 == 0;
        int len = shared ? snprintf(content, sizeof(content), "hello")
                         : snprintf(content, sizeof(content), "thread %d blob %d", a->id, i);
        th_blob_writer *w = NULL;
        T_CHECK(th_blob_writer_open(a->store, &w) == 0);
        if (w == NULL) {
            continue;
        }
        for (int k = 0; k < len; k++) {
            T_CHECK(th_blob_writer_write(w, content + k, 1) == 0);
        }
        char key[TH_BLOB_KEY_LEN + 1];
        T_CHECK(th_blob_writer_commit(th_ctx_background(), w, key) == 0);
        if (shared) {
            T_CHECK(strcmp(key, SHA_HELLO) == 0);
        }
        char path[PATH_MAX];
        T_CHECK(th_blob_path(a->store, key, path, sizeof(path)) == 0);
        struct stat st;
        T_CHECK(stat(path, &st) == 0 && st.st_size == len);
    }
    return NULL;
}

static void test_concurrent_writers(void **state)
{
    fixture *f = *state;
    pthread_t threads[THREADS];
    worker_arg args[THREADS];
    for (int t = 0; t < THREADS; t++) {
        args[t] = (worker_arg){.store = f->store, .id = t};
        threads[t] = spawn(writer_thread, &args[t]);
    }
    for (int t = 0; t < THREADS; t++) {
        join(threads[t]);
    }
    assert_int_equal(tmp_entries(f), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_commit_names_by_sha256, setup, teardown),
        cmocka_unit_test_setup_teardown(test_identical_content_stored_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_abort_leaves_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_size_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sweep_removes_only_stale_temps, setup, teardown),
        cmocka_unit_test_setup_teardown(test_path_delete_and_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_urls, setup, teardown),
        cmocka_unit_test_setup_teardown(test_allocation_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_concurrent_writers, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
