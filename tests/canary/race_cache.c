/* Race canary: the classic unsynchronised cache. One updater thread rewrites a small map of
 * trial progress counters while request threads read it, with no lock. ThreadSanitizer must
 * report this; if it ever stops doing so, the race gate is broken (tests/CMakeLists.txt). */
#include <pthread.h>
#include <stdio.h>

#define NKEYS    16
#define NREADERS 4
#define ROUNDS   20000

struct entry {
    char key[8];
    long submissions;
};

static struct entry cache[NKEYS];

static void *updater(void *arg)
{
    (void)arg;
    for (long round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < NKEYS; i++) {
            cache[i].submissions = round; /* unsynchronised write */
        }
    }
    return NULL;
}

static void *reader(void *arg)
{
    long *sum = arg;
    for (long round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < NKEYS; i++) {
            *sum += cache[i].submissions; /* unsynchronised read */
        }
    }
    return NULL;
}

int main(void)
{
    pthread_t writer, readers[NREADERS];
    long sums[NREADERS] = {0};
    for (int i = 0; i < NKEYS; i++) {
        snprintf(cache[i].key, sizeof(cache[i].key), "S%d", i);
    }
    pthread_create(&writer, NULL, updater, NULL);
    for (int i = 0; i < NREADERS; i++) {
        pthread_create(&readers[i], NULL, reader, &sums[i]);
    }
    pthread_join(writer, NULL);
    long total = 0;
    for (int i = 0; i < NREADERS; i++) {
        pthread_join(readers[i], NULL);
        total += sums[i];
    }
    printf("race_cache: total %ld\n", total);
    return 0;
}
