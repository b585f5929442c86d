/* `trialhub token create|list|revoke`: API keys from the command line, on the same store the
 * server uses (SQLite allows it while the server runs). `create` prints the key, and only the
 * key, on one line of stdout. */
#include <stdio.h>
#include <string.h>

#include "cmd/cmd.h"
#include "trialhub/auth.h"
#include "trialhub/clock.h"

static void usage(FILE *out)
{
    fputs("usage:\n"
          "  trialhub token create --role patient|site|investigator|admin\n"
          "                        [--trial T] [--site S] [--patient P]\n"
          "  trialhub token list\n"
          "  trialhub token revoke KEY_ID\n"
          "options: --database URL (or TRIALHUB_DATABASE_URL)\n"
          "Scope: patient keys need --trial and --patient, site keys --trial and --site,\n"
          "investigator keys --trial, admin keys none. The server picks up keys created or\n"
          "revoked here when it restarts; keys made with POST /v1/keys apply at once.\n",
          out);
}

static int write_one(th_store *store, int (*fn)(th_store *, void *), void *arg)
{
    int rc = th_store_begin(store);
    if (rc == 0) {
        rc = fn(store, arg);
        if (rc == 0) {
            rc = th_store_commit(store);
        }
        if (rc != 0) {
            th_store_rollback(store);
        }
    }
    return rc;
}

static int insert_key(th_store *store, void *arg)
{
    return th_store_key_insert(store, arg);
}

static int print_key(void *arg, const th_key *k)
{
    (void)arg;
    printf("%-22s %-13s %-12s %-12s %-12s %s\n", k->id, th_role_name(k->role),
           k->trial_id[0] ? k->trial_id : "-", k->site_id[0] ? k->site_id : "-",
           k->patient_id[0] ? k->patient_id : "-", k->revoked_ms ? "revoked" : "active");
    return 0;
}

typedef struct revoke_args {
    const char *id;
    int64_t now_ms;
} revoke_args;

static int revoke_key(th_store *store, void *arg)
{
    revoke_args *r = arg;
    return th_store_key_revoke(store, r->id, r->now_ms);
}

int th_cmd_token(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *action = argv[1];
    const char *db = th_cmd_env("TRIALHUB_DATABASE_URL", TH_DEFAULT_DATABASE_URL);
    const char *role_name = NULL, *trial = NULL, *site = NULL, *patient = NULL, *key_id = NULL;
    for (int i = 2; i < argc; i++) {
        const char *v;
        if ((v = th_cmd_flag(argc, argv, &i, "database"))) {
            db = v;
        } else if ((v = th_cmd_flag(argc, argv, &i, "role"))) {
            role_name = v;
        } else if ((v = th_cmd_flag(argc, argv, &i, "trial"))) {
            trial = v;
        } else if ((v = th_cmd_flag(argc, argv, &i, "site"))) {
            site = v;
        } else if ((v = th_cmd_flag(argc, argv, &i, "patient"))) {
            patient = v;
        } else if (strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (argv[i][0] != '-' && key_id == NULL) {
            key_id = argv[i];
        } else {
            fprintf(stderr, "trialhub token: unknown option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (strcmp(action, "create") == 0) {
        th_role role;
        if (th_role_parse(role_name, &role) != 0) {
            fprintf(stderr, "trialhub token create: --role must be patient, site, investigator "
                            "or admin\n");
            return 2;
        }
        th_key key;
        char text[TH_KEY_TEXT_MAX + 1];
        if (th_key_generate(role, trial, site, patient, &key, text) != 0) {
            fprintf(stderr, "trialhub token create: the scope does not fit the role (see "
                            "--help)\n");
            return 2;
        }
        key.created_ms = (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS);
        th_store *store = th_cmd_open_store(db);
        int rc = write_one(store, insert_key, &key);
        th_store_close(store);
        if (rc != 0) {
            fprintf(stderr, "trialhub token create: cannot store the key: %s\n", th_strerror(rc));
            return 1;
        }
        printf("%s\n", text);
        return 0;
    }
    if (strcmp(action, "list") == 0) {
        th_store *store = th_cmd_open_store(db);
        printf("%-22s %-13s %-12s %-12s %-12s %s\n", "ID", "ROLE", "TRIAL", "SITE", "PATIENT",
               "STATE");
        int rc = th_store_keys_each(store, print_key, NULL);
        th_store_close(store);
        return rc == 0 ? 0 : 1;
    }
    if (strcmp(action, "revoke") == 0) {
        if (key_id == NULL) {
            fprintf(stderr, "trialhub token revoke: which key? (trialhub token list)\n");
            return 2;
        }
        th_store *store = th_cmd_open_store(db);
        revoke_args args = {key_id, (int64_t)(th_clock_wall_ns() / TH_NS_PER_MS)};
        int rc = write_one(store, revoke_key, &args);
        th_store_close(store);
        if (rc == TH_ENOTFOUND) {
            fprintf(stderr, "trialhub token revoke: no active key %s\n", key_id);
            return 1;
        }
        return rc == 0 ? 0 : 1;
    }
    fprintf(stderr, "trialhub token: unknown action '%s'\n", action);
    usage(stderr);
    return 2;
}
