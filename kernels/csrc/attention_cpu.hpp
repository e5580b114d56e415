// Decode attention on the CPU straight from the paged cache: one query row per request, its
// keys and values read where they lie (no gather), in fp32.
//
//   q [B, H, D]   slots [B, T] (flat cache rows: block * block_size + offset)   visible [B, T]
//   k_cache, v_cache [S, Hkv, D] (flat)   ->   out [B, H, D], lse [B, H]
//
// For each request and key-value head: the G = H / Hkv query heads' scores against every visible
// key (AVX-512 dot products, the G queries held in registers), the softmax with a vectorised exp
// (Cephes' polynomial: within 2 ulp of expf), then the weighted sum of the values. A request
// that sees no key gets out = 0 and lse = -inf (merge_partials treats it as empty).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "quant_cpu.hpp"  // RowPool, has_avx512

namespace infinillm {

#ifdef INFINILLM_X86
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  // exp(x) for x <= 0 (scores less their maximum): x = n ln2 + r, |r| <= ln2 / 2.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// A row of TP scores (TP a multiple of 16; -inf where a key is not seen) becomes
// exp(score - m) in place, 0 where not seen; returns their sum.
__attribute__((target("avx512f"))) inline float softmax_row(float* s, int TP, float m) {
  const __m512 mv = _mm512_set1_ps(m), inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 total = _mm512_setzero_ps();
  for (int t = 0; t < TP; t += 16) {
    __m512 x = _mm512_loadu_ps(s + t);
    __mmask16 hidden = _mm512_cmp_ps_mask(x, inf, _CMP_EQ_OQ);
    __m512 p = _mm512_mask_blend_ps(hidden, exp512(_mm512_sub_ps(x, mv)), _mm512_setzero_ps());
    _mm512_storeu_ps(s + t, p);
    total = _mm512_add_ps(total, p);
  }
  return _mm512_reduce_add_ps(total);
}

// Requests [b0, b1). D a multiple of 16, at most 256; G at most 8.
__attribute__((target("avx512f"))) inline void decode_attention_avx512(
    const float* q, const float* kc, const float* vc, const int64_t* slots, const uint8_t* visible, int T, int H,
    int Hkv, int D, float scale, float* out, float* lse, int b0, int b1) {
  const int G = H / Hkv, ND = D / 16;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  thread_local std::vector<float> scores;
  if ((int)scores.size() < G * (T + 16)) scores.resize(G * (T + 16));
  const int TP = T + 16 - T % 16;  // a row of scores, padded to whole registers
  for (int b = b0; b < b1; ++b) {
    const int64_t* sl = slots + (size_t)b * T;
    const uint8_t* vis = visible + (size_t)b * T;
    for (int h = 0; h < Hkv; ++h) {
      __m512 qv[8][16];
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < ND; ++j) qv[g][j] = _mm512_loadu_ps(q + ((size_t)b * H + h * G + g) * D + 16 * j);
      float mx[8];
      for (int g = 0; g < G; ++g) mx[g] = neg_inf;
      for (int t = 0; t < T; ++t) {
        if (!vis[t]) {
          for (int g = 0; g < G; ++g) scores[g * TP + t] = neg_inf;
          continue;
        }
        const float* k = kc + ((size_t)sl[t] * Hkv + h) * D;
        __m512 acc[8];
        for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
        for (int j = 0; j < ND; ++j) {
          __m512 kv = _mm512_loadu_ps(k + 16 * j);
          for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(qv[g][j], kv, acc[g]);
        }
        for (int g = 0; g < G; ++g) {
          float s = _mm512_reduce_add_ps(acc[g]) * scale;
          scores[g * TP + t] = s;
          if (s > mx[g]) mx[g] = s;
        }
      }
      for (int g = 0; g < G; ++g) {
        float* o = out + ((size_t)b * H + h * G + g) * D;
        float* s = scores.data() + (size_t)g * TP;
        if (mx[g] == neg_inf) {
          for (int d = 0; d < D; ++d) o[d] = 0.f;
          lse[(size_t)b * H + h * G + g] = neg_inf;
          continue;
        }
        for (int t = T; t < TP; ++t) s[t] = neg_inf;
        float sum = softmax_row(s, TP, mx[g]);
        __m512 acc[16];
        for (int j = 0; j < ND; ++j) acc[j] = _mm512_setzero_ps();
        for (int t = 0; t < T; ++t) {
          if (!vis[t]) continue;
          __m512 p = _mm512_set1_ps(s[t]);
          const float* v = vc + ((size_t)sl[t] * Hkv + h) * D;
          for (int j = 0; j < ND; ++j) acc[j] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16 * j), acc[j]);
        }
        __m512 inv = _mm512_set1_ps(1.f / sum);
        for (int j = 0; j < ND; ++j) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[j], inv));
        lse[(size_t)b * H + h * G + g] = mx[g] + std::log(sum);
      }
    }
  }
}
// Lane i of the result: the sum of v[i]'s 16 lanes (a transpose-and-add tree: 45 shuffles and
// adds for 16 dot products, where reducing each alone takes ~10 dependent operations).
__attribute__((target("avx512f"))) inline __m512 reduce16(const __m512* v) {
  __m512 s[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i+3]
    __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

// The same attention with G query heads a key-value head and D = 16 * ND known when compiled, so
// queries and accumulators stay in registers: scores 16 keys at a time (reduce16), values read
// once for all G heads.
template <int G, int ND>
__attribute__((target("avx512f"))) inline void decode_attention_tiles(
    const float* q, const float* kc, const float* vc, const int64_t* slots, const uint8_t* visible, int T, int H,
    int Hkv, float scale, float* out, float* lse, int b0, int b1) {
  constexpr int D = 16 * ND;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int TP = (T + 15) / 16 * 16;
  thread_local std::vector<float> scores;
  if ((int)scores.size() < G * TP) scores.resize(G * TP);
  const __m512 vscale = _mm512_set1_ps(scale), vinf = _mm512_set1_ps(neg_inf);
  for (int b = b0; b < b1; ++b) {
    const int64_t* sl = slots + (size_t)b * T;
    const uint8_t* vis = visible + (size_t)b * T;
    for (int h = 0; h < Hkv; ++h) {
      __m512 mx[G];
      for (int g = 0; g < G; ++g) mx[g] = vinf;
      for (int t0 = 0; t0 < T; t0 += 16) {
        const int n = T - t0 < 16 ? T - t0 : 16;
        const float* rows[16];
        __mmask16 seen = 0;
        for (int i = 0; i < n; ++i) {
          rows[i] = kc + ((size_t)sl[t0 + i] * Hkv + h) * D;
          if (vis[t0 + i]) seen |= (__mmask16)(1u << i);
        }
        for (int i = t0 + 16; i < T && i < t0 + 32; ++i)  // the next 16 keys' rows, from memory meanwhile
          for (int j = 0; j < D; j += 16) _mm_prefetch((const char*)(kc + ((size_t)sl[i] * Hkv + h) * D + j), _MM_HINT_T0);
        for (int g = 0; g < G; ++g) {
          const float* qg = q + ((size_t)b * H + h * G + g) * D;
          __m512 qv[ND], acc[16];
          for (int j = 0; j < ND; ++j) qv[j] = _mm512_loadu_ps(qg + 16 * j);
          for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
          for (int i = 0; i < n; ++i) {
            if (!((seen >> i) & 1)) continue;
            __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(rows[i]));
            for (int j = 1; j < ND; ++j) a = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(rows[i] + 16 * j), a);
            acc[i] = a;
          }
          __m512 sc = _mm512_mask_blend_ps(seen, vinf, _mm512_mul_ps(reduce16(acc), vscale));
          _mm512_storeu_ps(scores.data() + (size_t)g * TP + t0, sc);
          mx[g] = _mm512_max_ps(mx[g], sc);
        }
      }
      float m[G], sum[G];
      for (int g = 0; g < G; ++g) {
        m[g] = _mm512_reduce_max_ps(mx[g]);
        sum[g] = 0.f;
        if (m[g] == neg_inf) continue;
        sum[g] = softmax_row(scores.data() + (size_t)g * TP, TP, m[g]);
      }
      __m512 acc[G][ND];
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < ND; ++j) acc[g][j] = _mm512_setzero_ps();
      for (int t = 0; t < T; ++t) {
        if (t + 8 < T)
          for (int j = 0; j < D; j += 16) _mm_prefetch((const char*)(vc + ((size_t)sl[t + 8] * Hkv + h) * D + j), _MM_HINT_T0);
        if (!vis[t]) continue;
        const float* v = vc + ((size_t)sl[t] * Hkv + h) * D;
        __m512 vv[ND];
        for (int j = 0; j < ND; ++j) vv[j] = _mm512_loadu_ps(v + 16 * j);
        for (int g = 0; g < G; ++g) {
          __m512 p = _mm512_set1_ps(scores[(size_t)g * TP + t]);
          for (int j = 0; j < ND; ++j) acc[g][j] = _mm512_fmadd_ps(p, vv[j], acc[g][j]);
        }
      }
      for (int g = 0; g < G; ++g) {
        float* o = out + ((size_t)b * H + h * G + g) * D;
        if (m[g] == neg_inf) {
          for (int d = 0; d < D; ++d) o[d] = 0.f;
          lse[(size_t)b * H + h * G + g] = neg_inf;
          continue;
        }
        __m512 inv = _mm512_set1_ps(1.f / sum[g]);
        for (int j = 0; j < ND; ++j) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[g][j], inv));
        lse[(size_t)b * H + h * G + g] = m[g] + std::log(sum[g]);
      }
    }
  }
}

// The compiled layouts (D of 64 or 128; G of 1-8), else the general kernel.
inline void decode_attention_part(const float* q, const float* kc, const float* vc, const int64_t* slots,
                                  const uint8_t* visible, int T, int H, int Hkv, int D, float scale, float* out,
                                  float* lse, int b0, int b1) {
#define INFINILLM_TILE(g, nd) \
  if (H / Hkv == g && D == 16 * nd) \
    return decode_attention_tiles<g, nd>(q, kc, vc, slots, visible, T, H, Hkv, scale, out, lse, b0, b1);
  INFINILLM_TILE(1, 4) INFINILLM_TILE(2, 4) INFINILLM_TILE(3, 4) INFINILLM_TILE(4, 4)
  INFINILLM_TILE(5, 4) INFINILLM_TILE(6, 4) INFINILLM_TILE(7, 4) INFINILLM_TILE(8, 4)
  INFINILLM_TILE(1, 8) INFINILLM_TILE(2, 8) INFINILLM_TILE(3, 8) INFINILLM_TILE(4, 8)
  INFINILLM_TILE(5, 8) INFINILLM_TILE(6, 8) INFINILLM_TILE(7, 8) INFINILLM_TILE(8, 8)
#undef INFINILLM_TILE
  decode_attention_avx512(q, kc, vc, slots, visible, T, H, Hkv, D, scale, out, lse, b0, b1);
}
#endif

inline bool decode_attention_supported(int H, int Hkv, int D) {
#ifdef INFINILLM_X86
  return has_avx512() && Hkv > 0 && H % Hkv == 0 && H / Hkv <= 8 && D % 16 == 0 && D <= 256;
#else
  return false;
#endif
}

// Over `threads` threads (requests split evenly) when B * T * H * D >= min_work.
inline void decode_attention(const float* q, const float* kc, const float* vc, const int64_t* slots,
                             const uint8_t* visible, int B, int T, int H, int Hkv, int D, float scale, float* out,
                             float* lse, int threads, int64_t min_work) {
#ifdef INFINILLM_X86
  int parts = (int64_t)B * T * H * D >= min_work ? std::max(1, std::min(threads, B)) : 1;
  RowPool::get().run(parts, [&](int part, int n) {
    decode_attention_part(q, kc, vc, slots, visible, T, H, Hkv, D, scale, out, lse, B * part / n,
                          B * (part + 1) / n);
  });
#endif
}

}  // namespace infinillm
