/* API keys: random generation (getrandom), SHA-256 hashing (OpenSSL libcrypto), and the
 * in-memory keyring: an array of key records sorted by hash, published with th_snapshot.
 * Locking: `reload_mu` serialises reloads; lookups take no lock. */
#include "trialhub/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "trialhub/alloc.h"
#include "trialhub/clock.h"
#include "trialhub/snapshot.h"

static const char *const role_names[] = {NULL, "patient", "site", "investigator", "admin"};

int th_role_parse(const char *name, th_role *out)
{
    for (int r = TH_ROLE_PATIENT; r <= TH_ROLE_ADMIN; r++) {
        if (name && strcmp(name, role_names[r]) == 0) {
            *out = (th_role)r;
            return 0;
        }
    }
    return TH_EINVAL;
}

const char *th_role_name(th_role role)
{
    return role >= TH_ROLE_PATIENT && role <= TH_ROLE_ADMIN ? role_names[role] : "unknown";
}

/* OpenSSL 3 looks a digest up by name behind a global lock on every one-shot call (SHA256()
 * included): a fifth of a key check. Fetch it once; it lives as long as the process. */
static pthread_once_t sha_once = PTHREAD_ONCE_INIT;
static EVP_MD *sha256_md;

static void sha_fetch(void)
{
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

void th_key_hash(const char *text, size_t len, unsigned char hash[TH_KEY_HASH_LEN])
{
    pthread_once(&sha_once, sha_fetch);
    if (sha256_md == NULL || EVP_Digest(text, len, hash, NULL, sha256_md, NULL) != 1) {
        SHA256((const unsigned char *)text, len, hash);
    }
}

static int fill_random(void *buf, size_t len)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = getrandom(p, len, 0);
        if (n <= 0) {
            return TH_ESYS;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static bool id_ok(const char *id)
{
    return id && *id && strlen(id) <= TH_ID_MAX;
}

int th_key_generate(th_role role, const char *trial_id, const char *site_id, const char *patient_id,
                    th_key *key, char text[TH_KEY_TEXT_MAX + 1])
{
    bool has_trial = id_ok(trial_id), has_site = id_ok(site_id), has_patient = id_ok(patient_id);
    bool fits;
    switch (role) {
    case TH_ROLE_PATIENT:
        fits = has_trial && has_patient && !site_id;
        break;
    case TH_ROLE_SITE:
        fits = has_trial && has_site && !patient_id;
        break;
    case TH_ROLE_INVESTIGATOR:
        fits = has_trial && !site_id && !patient_id;
        break;
    case TH_ROLE_ADMIN:
        fits = !trial_id && !site_id && !patient_id;
        break;
    default:
        fits = false;
    }
    if (!fits) {
        return TH_EINVAL;
    }
    unsigned char secret[32], idbytes[8];
    if (fill_random(secret, sizeof(secret)) != 0 || fill_random(idbytes, sizeof(idbytes)) != 0) {
        return TH_ESYS;
    }
    static const char b64url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    char *out = text;
    out += sprintf(out, "thk_");
    /* 32 bytes -> 43 base64url characters, no padding. */
    unsigned bits = 0, nbits = 0;
    for (size_t i = 0; i < sizeof(secret); i++) {
        bits = (bits << 8) | secret[i];
        nbits += 8;
        while (nbits >= 6) {
            *out++ = b64url[(bits >> (nbits - 6)) & 63];
            nbits -= 6;
        }
    }
    if (nbits > 0) {
        *out++ = b64url[(bits << (6 - nbits)) & 63];
    }
    *out = '\0';
    memset(key, 0, sizeof(*key));
    char *id = key->id;
    id += sprintf(id, "key_");
    for (size_t i = 0; i < sizeof(idbytes); i++) {
        id += sprintf(id, "%02x", idbytes[i]);
    }
    th_key_hash(text, strlen(text), key->hash);
    key->role = role;
    snprintf(key->trial_id, sizeof(key->trial_id), "%s", has_trial ? trial_id : "");
    snprintf(key->site_id, sizeof(key->site_id), "%s", has_site ? site_id : "");
    snprintf(key->patient_id, sizeof(key->patient_id), "%s", has_patient ? patient_id : "");
    OPENSSL_cleanse(secret, sizeof(secret));
    return 0;
}

typedef struct key_set {
    th_key *keys; /* sorted by hash */
    size_t nkeys;
    size_t cap;
    size_t active;
} key_set;

struct th_keyring {
    th_store *store;
    th_snapshot *snap;
    pthread_mutex_t reload_mu;
    _Atomic uint64_t last_miss_reload_ns; /* rate limit for reloads on an unknown key */
};

static void set_free(void *arg)
{
    key_set *set = arg;
    if (set) {
        th_free(set->keys);
        th_free(set);
    }
}

static int collect_key(void *arg, const th_key *k)
{
    key_set *set = arg;
    if (set->nkeys == set->cap) {
        size_t cap = set->cap ? set->cap * 2 : 16;
        th_key *grown = th_realloc_array(set->keys, cap, sizeof(th_key));
        if (grown == NULL) {
            return TH_ENOMEM;
        }
        set->keys = grown;
        set->cap = cap;
    }
    set->keys[set->nkeys++] = *k;
    if (k->revoked_ms == 0) {
        set->active++;
    }
    return 0;
}

static int cmp_hash(const void *a, const void *b)
{
    return memcmp(((const th_key *)a)->hash, ((const th_key *)b)->hash, TH_KEY_HASH_LEN);
}

static int load_set(th_store *store, key_set **out)
{
    key_set *set = th_calloc(1, sizeof(*set));
    if (set == NULL) {
        return TH_ENOMEM;
    }
    int rc = th_store_keys_each(store, collect_key, set);
    if (rc != 0) {
        set_free(set);
        return rc;
    }
    if (set->nkeys > 1) {
        qsort(set->keys, set->nkeys, sizeof(th_key), cmp_hash);
    }
    *out = set;
    return 0;
}

int th_keyring_create(th_store *store, th_keyring **out)
{
    th_keyring *ring = th_calloc(1, sizeof(*ring));
    if (ring == NULL) {
        return TH_ENOMEM;
    }
    ring->store = store;
    pthread_mutex_init(&ring->reload_mu, NULL);
    key_set *set;
    int rc = load_set(store, &set);
    if (rc == 0) {
        rc = th_snapshot_create(set, set_free, &ring->snap);
        if (rc != 0) {
            set_free(set);
        }
    }
    if (rc != 0) {
        pthread_mutex_destroy(&ring->reload_mu);
        th_free(ring);
        return rc;
    }
    *out = ring;
    return 0;
}

void th_keyring_destroy(th_keyring *ring)
{
    if (ring) {
        th_snapshot_destroy(ring->snap);
        pthread_mutex_destroy(&ring->reload_mu);
        th_free(ring);
    }
}

int th_keyring_reload(th_keyring *ring)
{
    pthread_mutex_lock(&ring->reload_mu);
    key_set *set;
    int rc = load_set(ring->store, &set);
    if (rc == 0) {
        rc = th_snapshot_publish(ring->snap, set);
        if (rc != 0) {
            set_free(set);
        }
    }
    pthread_mutex_unlock(&ring->reload_mu);
    return rc;
}

static int check_once(th_keyring *ring, const char *text, size_t len, th_key *out);

int th_keyring_check(th_keyring *ring, const char *text, size_t len, th_key *out)
{
    int rc = check_once(ring, text, len, out);
    if (rc != TH_EPERM) {
        return rc;
    }
    /* Keys made or revoked by `trialhub token` in another process: on a miss, reload at most
     * once a second, so a flood of bad keys costs at most one small read per second. */
    uint64_t now = th_clock_now_ns(), last = atomic_load(&ring->last_miss_reload_ns);
    if (now - last < TH_NS_PER_S ||
        !atomic_compare_exchange_strong(&ring->last_miss_reload_ns, &last, now)) {
        return rc;
    }
    if (th_keyring_reload(ring) != 0) {
        return rc;
    }
    return check_once(ring, text, len, out);
}

static int check_once(th_keyring *ring, const char *text, size_t len, th_key *out)
{
    if (len == 0 || len > TH_KEY_TEXT_MAX) {
        return TH_EPERM;
    }
    th_key probe = {.role = TH_ROLE_PATIENT}; /* only the hash is compared */
    th_key_hash(text, len, probe.hash);
    th_snapshot_guard guard;
    const key_set *set = th_snapshot_acquire(ring->snap, &guard);
    if (set == NULL) {
        return TH_ENOMEM;
    }
    int rc = TH_EPERM;
    const th_key *found =
        set->nkeys ? bsearch(&probe, set->keys, set->nkeys, sizeof(th_key), cmp_hash) : NULL;
    /* The search compares hashes of the secret, never the secret itself, so its timing tells an
     * attacker nothing useful; the final check is constant-time anyway. */
    if (found && CRYPTO_memcmp(found->hash, probe.hash, TH_KEY_HASH_LEN) == 0 &&
        found->revoked_ms == 0) {
        *out = *found;
        rc = 0;
    }
    th_snapshot_release(&guard);
    return rc;
}

size_t th_keyring_active_count(th_keyring *ring)
{
    th_snapshot_guard guard;
    const key_set *set = th_snapshot_acquire(ring->snap, &guard);
    size_t n = set ? set->active : 0;
    th_snapshot_release(&guard);
    return n;
}
