// Matrix-vector products straight from GGUF-quantised weights, for CPU decode steps.
//
// A decode step reads every weight once; in fp32 that is 4 bytes a weight and the step is
// bound by memory bandwidth. Reading the quantised blocks instead (Q4_1: 0.75 bytes a weight
// in the layout below) and dequantising in registers gives the same fp32 products (up to
// summation order) from about 5x fewer bytes.
//
// Layout (structure of arrays, repacked from ggml's blocks of 32 weights along a row):
//   Q4_1: d[O, NB] f32, m[O, NB] f32, qs[O, NB, 16] u8   w[o, 32b + j]      = d * (qs[j] & 15) + m
//                                                        w[o, 32b + j + 16] = d * (qs[j] >> 4) + m
//   Q8_0: d[O, NB] f32, qs[O, NB, 32] i8                 w[o, 32b + j]      = d * qs[j]
// y[t, o] = sum_k w[o, k] x[t, k]   for x [T, K], y [T, O], K = 32 * NB.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define INFINILLM_X86 1
#endif

namespace infinillm {

// Block sums of x: sx[t, b] = sum_j x[t, 32b + j] (Q4_1's m term).
inline void block_sums(const float* x, int T, int K, float* sx) {
  const int NB = K / 32;
  for (int t = 0; t < T; ++t)
    for (int b = 0; b < NB; ++b) {
      float s = 0.f;
      for (int j = 0; j < 32; ++j) s += x[(size_t)t * K + 32 * b + j];
      sx[(size_t)t * NB + b] = s;
    }
}

inline void q4_1_gemv_scalar(const float* x, const float* sx, int T, int K, const float* d, const float* m,
                             const uint8_t* qs, int o0, int o1, int O, float* y) {
  const int NB = K / 32;
  for (int o = o0; o < o1; ++o)
    for (int t = 0; t < T; ++t) {
      const float* xt = x + (size_t)t * K;
      float acc = 0.f;
      for (int b = 0; b < NB; ++b) {
        const uint8_t* q = qs + ((size_t)o * NB + b) * 16;
        float a = 0.f;
        for (int j = 0; j < 16; ++j) a += (float)(q[j] & 15) * xt[32 * b + j] + (float)(q[j] >> 4) * xt[32 * b + j + 16];
        acc += d[(size_t)o * NB + b] * a + m[(size_t)o * NB + b] * sx[(size_t)t * NB + b];
      }
      y[(size_t)t * O + o] = acc;
    }
}

inline void q8_0_gemv_scalar(const float* x, int T, int K, const float* d, const int8_t* qs, int o0, int o1, int O,
                             float* y) {
  const int NB = K / 32;
  for (int o = o0; o < o1; ++o)
    for (int t = 0; t < T; ++t) {
      const float* xt = x + (size_t)t * K;
      float acc = 0.f;
      for (int b = 0; b < NB; ++b) {
        const int8_t* q = qs + ((size_t)o * NB + b) * 32;
        float a = 0.f;
        for (int j = 0; j < 32; ++j) a += (float)q[j] * xt[32 * b + j];
        acc += d[(size_t)o * NB + b] * a;
      }
      y[(size_t)t * O + o] = acc;
    }
}

#ifdef INFINILLM_X86
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

__attribute__((target("avx2,fma"))) inline void q4_1_gemv_avx2(const float* x, const float* sx, int T, int K,
                                                              const float* d, const float* m, const uint8_t* qs,
                                                              int o0, int o1, int O, float* y) {
  const int NB = K / 32;
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int o = o0; o < o1; ++o) {
    const float* dr = d + (size_t)o * NB;
    const float* mr = m + (size_t)o * NB;
    const uint8_t* qr = qs + (size_t)o * NB * 16;
    for (int t = 0; t < T; ++t) {
      const float* xt = x + (size_t)t * K;
      const float* st = sx + (size_t)t * NB;
      __m256 acc = _mm256_setzero_ps();
      float accm = 0.f;
      for (int b = 0; b < NB; ++b) {
        __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + 16 * b));
        __m128i lo = _mm_and_si128(q, low);
        __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
        const float* xb = xt + 32 * b;
        __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xb));
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(xb + 8), s);
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xb + 16), s);
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(xb + 24), s);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dr[b]), s, acc);
        accm += mr[b] * st[b];
      }
      y[(size_t)t * O + o] = hsum256(acc) + accm;
    }
  }
}

__attribute__((target("avx2,fma"))) inline void q8_0_gemv_avx2(const float* x, int T, int K, const float* d,
                                                              const int8_t* qs, int o0, int o1, int O, float* y) {
  const int NB = K / 32;
  for (int o = o0; o < o1; ++o) {
    const float* dr = d + (size_t)o * NB;
    const int8_t* qr = qs + (size_t)o * NB * 32;
    for (int t = 0; t < T; ++t) {
      const float* xt = x + (size_t)t * K;
      __m256 acc = _mm256_setzero_ps();
      for (int b = 0; b < NB; ++b) {
        const int8_t* q = qr + 32 * b;
        const float* xb = xt + 32 * b;
        __m256 s = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)))),
            _mm256_loadu_ps(xb));
        for (int j = 8; j < 32; j += 8)
          s = _mm256_fmadd_ps(
              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)))),
              _mm256_loadu_ps(xb + j), s);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dr[b]), s, acc);
      }
      y[(size_t)t * O + o] = hsum256(acc);
    }
  }
}
#endif

inline bool has_avx2() {
#ifdef INFINILLM_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

inline void q4_1_gemv(const float* x, const float* sx, int T, int K, const float* d, const float* m,
                      const uint8_t* qs, int o0, int o1, int O, float* y) {
#ifdef INFINILLM_X86
  if (has_avx2()) return q4_1_gemv_avx2(x, sx, T, K, d, m, qs, o0, o1, O, y);
#endif
  q4_1_gemv_scalar(x, sx, T, K, d, m, qs, o0, o1, O, y);
}

inline void q8_0_gemv(const float* x, int T, int K, const float* d, const int8_t* qs, int o0, int o1, int O,
                      float* y) {
#ifdef INFINILLM_X86
  if (has_avx2()) return q8_0_gemv_avx2(x, T, K, d, qs, o0, o1, O, y);
#endif
  q8_0_gemv_scalar(x, T, K, d, qs, o0, o1, O, y);
}

}  // namespace infinillm
