/* API keys: generation, hashing and look-up. A key is shown once, at creation; the store keeps
 * only its SHA-256. The keyring holds every key record in memory as an immutable snapshot
 * sorted by hash, so authenticating a request is one hash and one binary search, lock-free. */
#ifndef TH_AUTH_H
#define TH_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#include "trialhub/error.h"
#include "trialhub/store.h"

typedef struct th_keyring th_keyring;

/* Longest key text: "thk_" + 43 base64url characters. */
#define TH_KEY_TEXT_MAX 48

/* Parses "patient", "site", "investigator", "admin". Returns 0 or TH_EINVAL. */
TH_MUST_CHECK int th_role_parse(const char *name, th_role *out);
/* Returns the role's name ("patient", ...). */
const char *th_role_name(th_role role);

/* Fills *key with a new random id, the hash of a new random secret, and role/scope, and writes
 * the secret (the key to show once) into text. Scope rules: patient needs trial and patient;
 * site needs trial and site; investigator needs trial; admin takes none. Returns 0, TH_EINVAL
 * (scope does not fit the role, or an id is too long) or TH_ESYS (no randomness). */
TH_MUST_CHECK int th_key_generate(th_role role, const char *trial_id, const char *site_id,
                                  const char *patient_id, th_key *key,
                                  char text[TH_KEY_TEXT_MAX + 1]);

/* SHA-256 of the key text. */
void th_key_hash(const char *text, size_t len, unsigned char hash[TH_KEY_HASH_LEN]);

/* Creates a keyring loaded from store. Returns 0, TH_EIO or TH_ENOMEM. */
TH_MUST_CHECK int th_keyring_create(th_store *store, th_keyring **out);
void th_keyring_destroy(th_keyring *ring);

/* Reloads every key from the store and publishes the new set. Returns 0, TH_EIO or TH_ENOMEM. */
TH_MUST_CHECK int th_keyring_reload(th_keyring *ring);

/* Looks up the key whose text is given (not NUL-terminated, len bytes). On success copies its
 * record into *out. Returns 0, or TH_EPERM for an unknown or revoked key. Lock-free and
 * thread-safe; the comparison of hashes is constant-time. On a miss it reloads the keyring from
 * the store at most once a second, so keys made or revoked by `trialhub token` while the server
 * runs take effect within a second. */
TH_MUST_CHECK int th_keyring_check(th_keyring *ring, const char *text, size_t len, th_key *out);

/* Number of active keys (for `serve` to decide whether to print a bootstrap admin key). */
size_t th_keyring_active_count(th_keyring *ring);

#endif
