/* trialhub's entry point: picks the subcommand and hands over to it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmd/cmd.h"

static void usage(FILE *out)
{
    fputs("usage: trialhub <command> [options]\n"
          "\n"
          "commands:\n"
          "  serve      run the API server (see 'trialhub serve --help')\n"
          "  token      create, list and revoke API keys (see 'trialhub token --help')\n"
          "  worker     image-analysis and webhook workers (see 'trialhub worker --help')\n"
          "  analyze    analyze one DICOM image: JSON request on stdin, result on stdout\n"
          "             (run by workers; see 'trialhub analyze --help')\n"
          "  version    print the version\n"
          "\n"
          "environment (flags override):\n"
          "  TRIALHUB_LISTEN          host:port to listen on (default " TH_DEFAULT_LISTEN ")\n"
          "  TRIALHUB_DATABASE_URL    store URL (default " TH_DEFAULT_DATABASE_URL ")\n"
          "  TRIALHUB_QUESTIONNAIRES  folder of extra Questionnaire/CodeSystem JSON files\n"
          "  TRIALHUB_LOG_LEVEL       debug, info (default), warn, error\n",
          out);
}

const char *th_cmd_flag(int argc, char **argv, int *i, const char *name)
{
    const char *arg = argv[*i];
    size_t n = strlen(name);
    if (strncmp(arg, "--", 2) != 0 || strncmp(arg + 2, name, n) != 0) {
        return NULL;
    }
    if (arg[2 + n] == '=') {
        return arg + 3 + n;
    }
    if (arg[2 + n] != '\0') {
        return NULL;
    }
    if (*i + 1 >= argc) {
        fprintf(stderr, "trialhub: --%s needs a value\n", name);
        exit(2);
    }
    return argv[++*i];
}

const char *th_cmd_env(const char *name, const char *fallback)
{
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

unsigned long th_cmd_number(const char *setting, const char *text, unsigned long min,
                            unsigned long max)
{
    char *end;
    unsigned long v = strtoul(text, &end, 10);
    if (*text == '\0' || *end != '\0' || *text == '-' || v < min || v > max) {
        fprintf(stderr, "trialhub: %s must be a number from %lu to %lu (got '%s')\n", setting, min,
                max, text);
        exit(2);
    }
    return v;
}

th_store *th_cmd_open_store(const char *url)
{
    th_store *store = NULL;
    char err[256] = "";
    int rc = th_store_open(url, &store, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "trialhub: cannot open the store %s: %s (%s)\n", url, err, th_errname(rc));
        exit(1);
    }
    return store;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        puts("trialhub " TRIALHUB_VERSION);
        return 0;
    }
    if (strcmp(cmd, "serve") == 0) {
        return th_cmd_serve(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "token") == 0) {
        return th_cmd_token(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "worker") == 0) {
        return th_cmd_worker(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "analyze") == 0) {
        return th_cmd_analyze(argc - 1, argv + 1);
    }
    fprintf(stderr, "trialhub: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
