/* The roster: trials, their sites and their enrolled patients, held in memory as an immutable
 * snapshot so that request threads check enrolment and scope without touching the database.
 * Reloaded from the store after every admin write commits (one publisher), read lock-free by
 * everyone else (th_snapshot). */
#ifndef TRIALHUB_ROSTER_H
#define TRIALHUB_ROSTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "trialhub/error.h"
#include "trialhub/snapshot.h"
#include "trialhub/store.h"

typedef struct th_roster th_roster;
typedef struct th_roster_view th_roster_view;

typedef struct th_roster_patient {
    const char *id;
    const char *trial_id;
    const char *site_id;
    const char *arm;
    const char *enrolled_on;
} th_roster_patient;

typedef struct th_roster_trial {
    const char *id;
    const char *name;
    const char *arms_json;
    const char *schedule_json;
    int schedule_weeks[32];
    unsigned nschedule;
    unsigned npatients;
} th_roster_trial;

/* Creates the roster and loads it from store. Returns 0, TH_EIO or TH_ENOMEM. */
TH_MUST_CHECK int th_roster_create(th_store *store, th_roster **out);
void th_roster_destroy(th_roster *roster);

/* Rebuilds the view from the store and publishes it. Serialised internally; readers are never
 * blocked. Returns 0, TH_EIO or TH_ENOMEM (the old view stays). */
TH_MUST_CHECK int th_roster_reload(th_roster *roster);

/* Returns the current view, held until th_snapshot_release(guard); NULL only when out of
 * memory. Thread-safe, lock-free. */
const th_roster_view *th_roster_acquire(th_roster *roster, th_snapshot_guard *guard);

/* Lookups on a view; the returned pointers live as long as the guard is held. NULL if absent. */
const th_roster_patient *th_roster_patient_find(const th_roster_view *view, const char *id);
const th_roster_trial *th_roster_trial_find(const th_roster_view *view, const char *id);
bool th_roster_site_exists(const th_roster_view *view, const char *trial_id, const char *site_id);
size_t th_roster_trial_count(const th_roster_view *view);

/* Days since 1970-01-01 of a "YYYY-MM-DD" date (proleptic Gregorian); 0 if malformed. */
int64_t th_roster_date_days(const char *date);

/* The visit a response belongs to when it does not say: the scheduled week of trial nearest to
 * authored_s (Unix seconds) counted from the patient's enrolled_on date (the earlier one on a
 * tie). Returns -1 when the trial has no schedule. */
int th_roster_nearest_week(const th_roster_trial *trial, const char *enrolled_on,
                           int64_t authored_s);
const th_roster_trial *th_roster_trial_at(const th_roster_view *view, size_t i);

#endif
