/* Prints the wall clock in nanoseconds and exits: the first thing a container's process
 * does, so "start call -> this stamp" is the cold start. Built static so it runs in any
 * root filesystem. */
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    printf("%lld\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
    return 0;
}
