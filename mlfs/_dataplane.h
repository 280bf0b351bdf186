/* Shared by mlfs/_dataplane.c and mlfs/_dataplane_avx2.c. */
#include <stddef.h>

void dp_xxh3_128_avx2(const void *p, size_t n, unsigned long long seed, unsigned long long out[2]);
unsigned long long dp_xxh3_64_avx2(const void *p, size_t n, unsigned long long seed);
