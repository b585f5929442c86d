/* Scoring of a validated QuestionnaireResponse: the sum or mean of its answers' weights over
 * the instrument's scored items (as the Questionnaire defines them), with PHQ-9 and GAD-7
 * severity bands and the PHQ-9 item 9 safety alert, and the app's own total for comparison. */
#include <math.h>

#include "fhir/fhir_int.h"

typedef struct band {
    double upto; /* inclusive upper bound of the band */
    const char *name;
} band;

/* Kroenke et al. 2001 (PHQ-9), Spitzer et al. 2006 (GAD-7). */
static const band phq9_bands[] = {
    {4, "minimal"}, {9, "mild"}, {14, "moderate"}, {19, "moderately severe"}, {27, "severe"}};
static const band gad7_bands[] = {{4, "minimal"}, {9, "mild"}, {14, "moderate"}, {21, "severe"}};

static const char *band_of(const band *bands, size_t n, double value)
{
    if (value < 0) {
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        if (value <= bands[i].upto) {
            return bands[i].name;
        }
    }
    return NULL;
}

const char *th_fhir_score_kind_name(th_fhir_score_kind kind)
{
    switch (kind) {
    case TH_FHIR_SCORE_NONE:
        return "none";
    case TH_FHIR_SCORE_SUM:
        return "sum";
    case TH_FHIR_SCORE_MEAN:
        return "mean";
    }
    return "unknown";
}

int th_fhir_score_compute(const th_fhir_instrument *inst, const th_qr *qr, th_fhir_score *out)
{
    if (inst == NULL || qr == NULL || out == NULL || qr->fields.instrument != inst ||
        qr->state == NULL) {
        return TH_EINVAL;
    }
    th_fhir_score s = {.kind = inst->score_kind, .expected = inst->nscored};
    double total = 0;
    unsigned counted = 0; /* answers counted, for the mean */
    for (uint32_t i = 0; i < inst->nscored; i++) {
        uint32_t q = inst->scored[i];
        const th__item_state *st = &qr->state[q];
        const th__item *it = &inst->items[q];
        if (st->nweights > 0) {
            total += st->weight_sum;
            counted += st->nweights;
            s.answered++;
        } else if (st->has_number && (it->type == TH__QT_INTEGER || it->type == TH__QT_DECIMAL)) {
            total += st->number;
            counted++;
            s.answered++;
        }
    }
    if (s.kind == TH_FHIR_SCORE_SUM) {
        s.value = total;
    } else if (s.kind == TH_FHIR_SCORE_MEAN && counted > 0) {
        s.value = total / counted;
    }
    s.is_integer = s.value == floor(s.value);
    s.complete = s.kind != TH_FHIR_SCORE_NONE && s.answered == s.expected;
    if (s.complete && s.kind == TH_FHIR_SCORE_SUM) {
        if (inst->scale == TH_FHIR_SCALE_PHQ9) {
            s.band = band_of(phq9_bands, sizeof(phq9_bands) / sizeof(phq9_bands[0]), s.value);
        } else if (inst->scale == TH_FHIR_SCALE_GAD7) {
            s.band = band_of(gad7_bands, sizeof(gad7_bands) / sizeof(gad7_bands[0]), s.value);
        }
    }
    if (inst->alert_item != TH__NO_ITEM) {
        const th__item_state *st = &qr->state[inst->alert_item];
        s.alert = st->nweights > 0 && st->weight_sum > 0;
    }
    if (inst->app_score_item != TH__NO_ITEM && qr->state[inst->app_score_item].has_number) {
        s.has_app_score = true;
        s.app_score = qr->state[inst->app_score_item].number;
        s.app_score_agrees = fabs(s.app_score - s.value) < 1e-6;
    }
    *out = s;
    return TH_OK;
}
