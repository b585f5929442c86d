/* The race canary's fixed twin: the same cache, but each version is immutable and published
 * through th_snapshot, so readers never see a half-written map. ThreadSanitizer must stay quiet,
 * and every read must be internally consistent (all counters from the same round). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "trialhub/snapshot.h"

#define NKEYS    16
#define NREADERS 4
#define ROUNDS   2000
#define READS    20000

struct cache {
    long submissions[NKEYS];
};

static th_snapshot *snap;
static long inconsistent;
static pthread_mutex_t inconsistent_mu = PTHREAD_MUTEX_INITIALIZER;

static void *updater(void *arg)
{
    (void)arg;
    for (long round = 1; round <= ROUNDS; round++) {
        struct cache *next = malloc(sizeof(*next));
        if (next == NULL) {
            abort();
        }
        for (int i = 0; i < NKEYS; i++) {
            next->submissions[i] = round;
        }
        if (th_snapshot_publish(snap, next) != 0) {
            abort();
        }
    }
    return NULL;
}

static void *reader(void *arg)
{
    long *sum = arg;
    for (long n = 0; n < READS; n++) {
        th_snapshot_guard guard;
        const struct cache *c = th_snapshot_acquire(snap, &guard);
        if (c == NULL) {
            abort();
        }
        for (int i = 0; i < NKEYS; i++) {
            *sum += c->submissions[i];
            if (c->submissions[i] != c->submissions[0]) {
                pthread_mutex_lock(&inconsistent_mu);
                inconsistent++;
                pthread_mutex_unlock(&inconsistent_mu);
            }
        }
        th_snapshot_release(&guard);
    }
    return NULL;
}

int main(void)
{
    struct cache *first = calloc(1, sizeof(*first));
    if (first == NULL || th_snapshot_create(first, free, &snap) != 0) {
        return 1;
    }
    pthread_t writer, readers[NREADERS];
    long sums[NREADERS] = {0};
    pthread_create(&writer, NULL, updater, NULL);
    for (int i = 0; i < NREADERS; i++) {
        pthread_create(&readers[i], NULL, reader, &sums[i]);
    }
    pthread_join(writer, NULL);
    for (int i = 0; i < NREADERS; i++) {
        pthread_join(readers[i], NULL);
    }
    th_snapshot_destroy(snap);
    printf("race_cache_fixed: inconsistent reads %ld\n", inconsistent);
    return inconsistent == 0 ? 0 : 1;
}
