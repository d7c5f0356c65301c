/* Round trip of one cache line between cores 0 and 1: which state this VM's two vCPUs are in.

       gcc -O2 -pthread -o /tmp/core_roundtrip bench/core_roundtrip.c && /tmp/core_roundtrip

   Two threads, pinned to cores 0 and 1, pass a counter back and forth through one cache line, 2 million times,
   and print the mean round trip. On the nineteenth and twentieth sessions' Zen 4 VM it read 52-65 ns (the two
   vCPUs on one die of the host) or 305-345 ns (on two dies), flipping every few seconds to minutes; batch-1 plans
   that split each op between the threads ran up to 2.2x slower in the second state (bench/RESULTS.md). It spins
   both cores for 0.1-0.7 s: run it between timings, not during them. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

#define ROUNDS 2000000L

static _Atomic long turn __attribute__((aligned(64)));

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *answer(void *unused) {
    (void)unused;
    pin(1);
    for (long i = 0; i < ROUNDS; i++) {
        while (atomic_load_explicit(&turn, memory_order_acquire) != 2 * i + 1) {}
        atomic_store_explicit(&turn, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

int main(void) {
    pthread_t other;
    struct timespec start, end;
    pthread_create(&other, NULL, answer, NULL);
    pin(0);
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < ROUNDS; i++) {
        atomic_store_explicit(&turn, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&turn, memory_order_acquire) != 2 * i + 2) {}
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    pthread_join(other, NULL);
    double seconds = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) * 1e-9;
    printf("round trip %.1f ns\n", seconds / ROUNDS * 1e9);
    return 0;
}
