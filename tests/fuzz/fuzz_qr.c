/* libFuzzer driver for the QuestionnaireResponse parser and validator: arbitrary bytes go
 * through th_qr_parse() against the built-in instruments plus the MII ones, then through
 * scoring and OperationOutcome building, as POST /fhir/QuestionnaireResponse does. Seeds are in
 * tests/fuzz/corpus/qr/. Build by hand for now, from the repository root: generate the
 * built-ins with cmake/th_embed_file.cmake (-DIN=src/fhir/builtin/phq9.json
 * -DOUT=$GEN/fhir_builtin_phq9.c -DSYMBOL=th__fhir_builtin_phq9, the same for gad7), then
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Iinclude -Isrc \
 *     tests/fuzz/fuzz_qr.c src/fhir/{outcome,qr,questionnaire,score}.c \
 *     $GEN/fhir_builtin_{phq9,gad7}.c src/core/{alloc,clock}.c -ljansson -o fuzz_qr
 *   mkdir -p work && ./fuzz_qr -max_total_time=60 work tests/fuzz/corpus/qr
 * Besides the built-ins it loads the MII instruments (tests/data/fhir/mii) and a Questionnaire
 * with groups, answer.item and repeats (tests/fuzz/questionnaires); TH_FUZZ_QUESTIONNAIRES (in
 * the environment, or -D at build time) is a ':'-separated list of directories to use instead. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trialhub/fhir.h"

#ifndef TH_FUZZ_QUESTIONNAIRES
#define TH_FUZZ_QUESTIONNAIRES "tests/data/fhir/mii:tests/fuzz/questionnaires"
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static th_qreg *reg;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (th_qreg_create(&reg) != TH_OK) {
        abort();
    }
    const char *dirs = getenv("TH_FUZZ_QUESTIONNAIRES");
    char list[1024];
    snprintf(list, sizeof(list), "%s", dirs != NULL ? dirs : TH_FUZZ_QUESTIONNAIRES);
    for (char *save = NULL, *dir = strtok_r(list, ":", &save); dir != NULL;
         dir = strtok_r(NULL, ":", &save)) {
        char err[512];
        if (th_qreg_load_dir(reg, dir, err, sizeof(err)) != TH_OK) {
            fprintf(stderr, "fuzz_qr: %s (skipped)\n", err);
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A fixed "now" keeps runs reproducible. */
    th_qr_options opts = {.now_unix_ns = INT64_C(1796083200) * 1000000000,
                          .max_future_skew_ns = INT64_C(300) * 1000000000};
    th_qr *qr = NULL;
    th_fhir_parse_error perr;
    json_t *oo = NULL;
    int rc = th_qr_parse(reg, (const char *)data, size, &opts, &qr, &perr);
    if (rc == TH_EPARSE) {
        if (th_fhir_outcome_parse_error(&perr, &oo) != TH_OK) {
            abort();
        }
        json_decref(oo);
        return 0;
    }
    if (rc != TH_OK) {
        abort(); /* no allocation failures are injected here */
    }
    const th_qr_fields *f = th_qr_get_fields(qr);
    if (f->instrument != NULL) {
        th_fhir_score score;
        if (th_fhir_score_compute(f->instrument, qr, &score) != TH_OK) {
            abort();
        }
        if (score.band != NULL && score.kind != TH_FHIR_SCORE_SUM) {
            abort();
        }
    }
    if (th_qr_valid(qr) != (th_fhir_issues_errors(th_qr_issues(qr)) == 0)) {
        abort();
    }
    if (th_fhir_outcome_from_issues(th_qr_issues(qr), &oo) != TH_OK) {
        abort();
    }
    char *dump = json_dumps(oo, JSON_COMPACT);
    if (dump == NULL) {
        abort();
    }
    free(dump);
    json_decref(oo);
    th_qr_destroy(qr);
    return 0;
}
