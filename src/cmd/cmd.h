/* Shared by the subcommands: settings from flags and the environment, and opening the store. */
#ifndef TRIALHUB_CMD_H
#define TRIALHUB_CMD_H

#include <stdbool.h>

#include "trialhub/store.h"

#define TRIALHUB_VERSION        "0.1.0"
#define TH_DEFAULT_DATABASE_URL "sqlite://./data/trialhub.db"
#define TH_DEFAULT_LISTEN       "127.0.0.1:8080"

/* Returns the value of --name=value or --name value at argv[*i] (advancing *i), or NULL when
 * argv[*i] is not that flag. Exits with status 2 and a message if the value is missing. */
const char *th_cmd_flag(int argc, char **argv, int *i, const char *name);

/* Returns getenv(name) if set and not empty, else fallback. */
const char *th_cmd_env(const char *name, const char *fallback);

/* Parses an unsigned number for a setting; exits with status 2 and a message if it is not one
 * or is outside [min, max]. */
unsigned long th_cmd_number(const char *setting, const char *text, unsigned long min,
                            unsigned long max);

/* Opens the store at url or exits with status 1 and the reason. */
th_store *th_cmd_open_store(const char *url);

int th_cmd_serve(int argc, char **argv);
int th_cmd_token(int argc, char **argv);

#endif
