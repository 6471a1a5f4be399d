/* The peak float32 FMA rate of one core with 256-bit vectors: ten independent chains of
 * _mm256_fmadd_ps (enough to cover the FMA latency on two pipes). The best of many short runs is
 * kept, the figure least disturbed by other processes on a shared machine.
 *     gcc -O2 -mavx2 -mfma bench/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak   (bench/step_parts.py --fma-peak does it) */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  /* ten named accumulators, not an array: with an array GCC kept them in memory */
  __m256 a0 = _mm256_set1_ps(1.000f), a1 = _mm256_set1_ps(1.001f), a2 = _mm256_set1_ps(1.002f),
         a3 = _mm256_set1_ps(1.003f), a4 = _mm256_set1_ps(1.004f), a5 = _mm256_set1_ps(1.005f),
         a6 = _mm256_set1_ps(1.006f), a7 = _mm256_set1_ps(1.007f), a8 = _mm256_set1_ps(1.008f),
         a9 = _mm256_set1_ps(1.009f);
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  const long n = 5000000;
  double best = 1e9;
  for (int r = 0; r < 200; r++) {
    const double t0 = seconds();
    for (long k = 0; k < n; k++) {
      a0 = _mm256_fmadd_ps(a0, b, c); a1 = _mm256_fmadd_ps(a1, b, c); a2 = _mm256_fmadd_ps(a2, b, c);
      a3 = _mm256_fmadd_ps(a3, b, c); a4 = _mm256_fmadd_ps(a4, b, c); a5 = _mm256_fmadd_ps(a5, b, c);
      a6 = _mm256_fmadd_ps(a6, b, c); a7 = _mm256_fmadd_ps(a7, b, c); a8 = _mm256_fmadd_ps(a8, b, c);
      a9 = _mm256_fmadd_ps(a9, b, c);
      /* keeps the loop from being folded away; the operands stay in registers */
      __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7),
                       "+x"(a8), "+x"(a9));
    }
    const double t = seconds() - t0;
    if (t < best) best = t;
  }
  float v[8];
  _mm256_storeu_ps(v, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                    _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)),
                                                  _mm256_add_ps(a8, a9))));
  printf("%.3f ns per 8-lane FMA on one core (%.2f G/s) [%g]\n", best / (10.0 * n) * 1e9, 10.0 * n / best / 1e9, v[0]);
  return 0;
}
