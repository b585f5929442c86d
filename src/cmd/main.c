/* trialhub's entry point: parses the subcommand and hands over to it. Until the HTTP server
 * lands (ingestion issue), `serve` says so and exits. */
#include <stdio.h>
#include <string.h>

#define TRIALHUB_VERSION "0.1.0"

static void usage(FILE *out)
{
    fputs("usage: trialhub <command> [options]\n"
          "\n"
          "commands:\n"
          "  serve      run the API server (embeds analysis workers unless --workers 0)\n"
          "  version    print the version\n"
          "\n"
          "environment:\n"
          "  TRIALHUB_LISTEN        host:port to listen on (default 127.0.0.1:8080)\n"
          "  TRIALHUB_DATABASE_URL  store URL (default sqlite://./data/trialhub.db)\n"
          "\n"
          "Run 'trialhub <command> --help' for a command's options.\n",
          out);
}

static int cmd_serve(int argc, char **argv)
{
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            puts("usage: trialhub serve\n\nRuns the API server.");
            return 0;
        }
    }
    fputs("trialhub serve: the concurrency core is built; the HTTP server arrives with the\n"
          "ingestion issue (#3). Nothing to serve yet: run 'make test' to exercise the core.\n",
          stderr);
    return 0;
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
        return cmd_serve(argc, argv);
    }
    fprintf(stderr, "trialhub: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
