// AVX512-BF16 helpers shared by the CPU kernels: compiled with target attributes, so the module
// builds for any x86 CPU and callers check `__builtin_cpu_supports("avx512bf16")` first. Where
// the compiler or the architecture has no AVX512-BF16 (GCC < 10, not x86), CACHEBLEND_BF16 is 0
// and the kernels' bf16 paths are left out: the rest of the module still builds.
#pragma once
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 10)
#define CACHEBLEND_BF16 1
#include <immintrin.h>

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// exp(x) for x <= 0: 2^n * e^r with |r| <= ln2/2, degree-6 polynomial (relative error ~1e-7).
BF16_TARGET inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// acc + the pairwise bf16 dot products of a and b, per fp32 lane.
BF16_TARGET inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#else
#define CACHEBLEND_BF16 0
#endif
