// Matrix products straight from GGUF-quantised weights, for CPU steps of a few tokens.
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

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

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

#ifdef INFINILLM_X86
// AVX-512: each block's 32 weights are dequantised once into two registers (exactly the fp32
// weights: d * q is exact for |q| < 256 and a half-precision d, then + m rounds once, as the fp32
// dequantisation does) and used for a tile of tokens: 8 tokens by 2 output rows (16
// accumulators; each load of x feeds two rows), or 1-4 tokens by one row with two accumulators
// a token (so a decode of one token is not bound by the adds' latency). The formats differ only
// in how a block's weights are made (`Q41::weights`, `Q80::weights`).
constexpr int PREFETCH_ROWS = 6;  // how far ahead a tile asks for its weights

struct Q41 {
  const float* d;
  const float* m;
  const uint8_t* qs;
  __attribute__((target("avx512f,avx512bw"))) inline void weights(size_t at, __m512& w0, __m512& w1) const {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + at * 16));
    __m512 dv = _mm512_set1_ps(d[at]), mv = _mm512_set1_ps(m[at]);
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low))), dv, mv);
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low))), dv, mv);
  }
  // Ask for row o's blocks (NB of them) ahead of their use: the weights stream from memory once
  // a step, faster than the hardware's prefetcher ramps up on rows of a few hundred bytes.
  inline void prefetch(size_t o, int NB) const {
    for (int i = 0; i < NB * 16; i += 64) _mm_prefetch((const char*)(qs + o * NB * 16 + i), _MM_HINT_T0);
    for (int i = 0; i < NB; i += 16) {
      _mm_prefetch((const char*)(d + o * NB + i), _MM_HINT_T0);
      _mm_prefetch((const char*)(m + o * NB + i), _MM_HINT_T0);
    }
  }
};

struct Q80 {
  const float* d;
  const int8_t* qs;
  __attribute__((target("avx512f,avx512bw"))) inline void weights(size_t at, __m512& w0, __m512& w1) const {
    const __m128i* q = reinterpret_cast<const __m128i*>(qs + at * 32);
    __m512 dv = _mm512_set1_ps(d[at]);
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), dv);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), dv);
  }
  inline void prefetch(size_t o, int NB) const {
    for (int i = 0; i < NB * 32; i += 64) _mm_prefetch((const char*)(qs + o * NB * 32 + i), _MM_HINT_T0);
    for (int i = 0; i < NB; i += 16) _mm_prefetch((const char*)(d + o * NB + i), _MM_HINT_T0);
  }
};

// NT tokens from t0, one output row at a time (PAIR: two accumulators a token).
template <int NT, bool PAIR, typename F>
__attribute__((target("avx512f,avx512bw"))) inline void tile_avx512(const float* x, int K, const F& f, int o0, int o1,
                                                                 int O, float* y, int t0) {
  const int NB = K / 32;
  const float* xt = x + (size_t)t0 * K;
  for (int o = o0; o < o1; ++o) {
    if (o + PREFETCH_ROWS < o1) f.prefetch(o + PREFETCH_ROWS, NB);
    __m512 acc[NT], acc2[PAIR ? NT : 1];
    for (int i = 0; i < NT; ++i) acc[i] = _mm512_setzero_ps();
    for (int i = 0; i < (PAIR ? NT : 1); ++i) acc2[i] = _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) {
      __m512 w0, w1;
      f.weights((size_t)o * NB + b, w0, w1);
      const float* xb = xt + 32 * b;
      for (int i = 0; i < NT; ++i) {
        acc[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + (size_t)i * K), acc[i]);
        if (PAIR)
          acc2[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + (size_t)i * K + 16), acc2[i]);
        else
          acc[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + (size_t)i * K + 16), acc[i]);
      }
    }
    for (int i = 0; i < NT; ++i)
      y[(size_t)(t0 + i) * O + o] = _mm512_reduce_add_ps(PAIR ? _mm512_add_ps(acc[i], acc2[PAIR ? i : 0]) : acc[i]);
  }
}

// 8 tokens from t0 by two output rows at a time (an odd last row: by `tile_avx512`).
template <typename F>
__attribute__((target("avx512f,avx512bw"))) inline void tile8x2_avx512(const float* x, int K, const F& f, int o0,
                                                                    int o1, int O, float* y, int t0) {
  const int NB = K / 32;
  const float* xt = x + (size_t)t0 * K;
  int o = o0;
  for (; o + 2 <= o1; o += 2) {
    if (o + PREFETCH_ROWS + 2 <= o1) {
      f.prefetch(o + PREFETCH_ROWS, NB);
      f.prefetch(o + PREFETCH_ROWS + 1, NB);
    }
    __m512 a[8], c[8];
    for (int i = 0; i < 8; ++i) a[i] = c[i] = _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) {
      __m512 w00, w01, w10, w11;
      f.weights((size_t)o * NB + b, w00, w01);
      f.weights((size_t)(o + 1) * NB + b, w10, w11);
      const float* xb = xt + 32 * b;
      for (int i = 0; i < 8; ++i) {
        __m512 x0 = _mm512_loadu_ps(xb + (size_t)i * K), x1 = _mm512_loadu_ps(xb + (size_t)i * K + 16);
        a[i] = _mm512_fmadd_ps(w01, x1, _mm512_fmadd_ps(w00, x0, a[i]));
        c[i] = _mm512_fmadd_ps(w11, x1, _mm512_fmadd_ps(w10, x0, c[i]));
      }
    }
    for (int i = 0; i < 8; ++i) {
      y[(size_t)(t0 + i) * O + o] = _mm512_reduce_add_ps(a[i]);
      y[(size_t)(t0 + i) * O + o + 1] = _mm512_reduce_add_ps(c[i]);
    }
  }
  if (o < o1) tile_avx512<8, false>(x, K, f, o, o1, O, y, t0);
}

constexpr int ROW_CHUNK = 64;

// Every token of x [T, K] in tiles of 8 (by two rows), 4, 2, 1; output rows [o0, o1).
template <typename F>
__attribute__((target("avx512f,avx512bw"))) inline void gemm_avx512(const float* x, int T, int K, const F& f, int o0,
                                                                 int o1, int O, float* y) {
  // More than one tile of tokens: the output rows in chunks, every tile over a chunk while its
  // weights are in the cache (else each tile would read the whole matrix from memory again).
  const int chunk = T > 8 ? ROW_CHUNK : o1 - o0;
  for (int c0 = o0; c0 < o1; c0 += chunk) {
    const int c1 = std::min(o1, c0 + chunk);
    int t0 = 0;
    for (; t0 + 8 <= T; t0 += 8) tile8x2_avx512(x, K, f, c0, c1, O, y, t0);
    for (; t0 + 4 <= T; t0 += 4) tile_avx512<4, true>(x, K, f, c0, c1, O, y, t0);
    for (; t0 + 2 <= T; t0 += 2) tile_avx512<2, true>(x, K, f, c0, c1, O, y, t0);
    for (; t0 < T; t0 += 1) tile_avx512<1, true>(x, K, f, c0, c1, O, y, t0);
  }
}

__attribute__((target("avx512f,avx512bw"))) inline void q4_1_gemv_avx512(const float* x, int T, int K,
                                                                      const float* d, const float* m,
                                                                      const uint8_t* qs, int o0, int o1, int O,
                                                                      float* y) {
  gemm_avx512(x, T, K, Q41{d, m, qs}, o0, o1, O, y);
}

__attribute__((target("avx512f,avx512bw"))) inline void q8_0_gemv_avx512(const float* x, int T, int K,
                                                                      const float* d, const int8_t* qs, int o0,
                                                                      int o1, int O, float* y) {
  gemm_avx512(x, T, K, Q80{d, qs}, o0, o1, O, y);
}

inline bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
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
  if (has_avx512()) return q4_1_gemv_avx512(x, T, K, d, m, qs, o0, o1, O, y);
  if (has_avx2()) return q4_1_gemv_avx2(x, sx, T, K, d, m, qs, o0, o1, O, y);
#endif
  q4_1_gemv_scalar(x, sx, T, K, d, m, qs, o0, o1, O, y);
}

inline void q8_0_gemv(const float* x, int T, int K, const float* d, const int8_t* qs, int o0, int o1, int O,
                      float* y) {
#ifdef INFINILLM_X86
  if (has_avx512()) return q8_0_gemv_avx512(x, T, K, d, qs, o0, o1, O, y);
  if (has_avx2()) return q8_0_gemv_avx2(x, T, K, d, qs, o0, o1, O, y);
#endif
  q8_0_gemv_scalar(x, T, K, d, qs, o0, o1, O, y);
}

// A few persistent threads that split a product's output rows: started on first use, joined
// at exit. One call at a time (a lock): the caller takes part 0 and waits for the others. In a
// process forked after they started, products run on the calling thread alone.
class RowPool {
 public:
  static RowPool& get() {
    static RowPool pool;
    return pool;
  }

  // f(part, parts) for part in [0, parts), parts <= size(); returns when all are done.
  //
  // A decode step makes ~120 products a few hundred microseconds apart; waking a sleeping thread
  // costs tens of microseconds on a VM, so the threads spin (pausing, yielding now and then) for
  // up to SPIN_NS after each job before they sleep, and the caller spins the same while the
  // others finish.
  void run(int parts, const std::function<void(int, int)>& f) {
    std::lock_guard<std::mutex> call(call_mu_);
    if (parts <= 1 || getpid() != pid_) {
      f(0, 1);
      return;
    }
    start(parts - 1);
    parts = std::min<int>(parts, 1 + static_cast<int>(threads_.size()));
    job_ = &f;
    parts_ = parts;
    pending_.store(parts - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);  // a thread about to sleep sees the new generation
      if (sleeping_ > 0) cv_.notify_all();
    }
    f(0, parts);
    if (!spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(mu_);
      done_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    job_ = nullptr;
  }

  ~RowPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  static constexpr int64_t SPIN_NS = 300000;

  RowPool() : pid_(getpid()) {}

  template <typename P>
  static bool spin_until(const P& ready) {
    auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(SPIN_NS);
    for (int i = 1;; ++i) {
      if (ready()) return true;
#ifdef INFINILLM_X86
      _mm_pause();
#endif
      if (i % 256 == 0) {
        if (std::chrono::steady_clock::now() > until) return false;
        std::this_thread::yield();
      }
    }
  }

  void start(int want) {  // (under call_mu_)
    while (static_cast<int>(threads_.size()) < want) {
      int index = static_cast<int>(threads_.size()) + 1;
      threads_.emplace_back([this, index] { loop(index); });
    }
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      auto fresh = [&] { return stop_.load() || generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(fresh)) {
        std::unique_lock<std::mutex> lk(mu_);
        ++sleeping_;
        cv_.wait(lk, fresh);
        --sleeping_;
      }
      if (stop_.load()) return;
      seen = generation_.load(std::memory_order_acquire);
      if (index >= parts_) continue;
      (*job_)(index, parts_);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller, if it went to sleep, sees zero
        done_.notify_one();
      }
    }
  }

  pid_t pid_;
  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int, int)>* job_ = nullptr;  // written before generation_ is raised
  int parts_ = 0, sleeping_ = 0;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

// `product(o0, o1)` (output rows [o0, o1) of y = x W^T) over `threads` threads, the rows split
// evenly in multiples of 16, when the product has at least min_macs multiply-adds (T * O * K);
// else on this thread alone (handing rows over costs more than it saves).
template <typename P>
inline void split_rows(int T, int K, int O, int threads, int64_t min_macs, const P& product) {
  int parts = (int64_t)T * O * K >= min_macs ? std::max(1, std::min(threads, O / 16)) : 1;
  RowPool::get().run(parts, [&](int part, int n) {
    int o0 = (int)((int64_t)O * part / n) & ~15, o1 = part + 1 == n ? O : (int)((int64_t)O * (part + 1) / n) & ~15;
    product(o0, o1);
  });
}

inline void q4_1_matmul_rows(const float* x, const float* sx, int T, int K, const float* d, const float* m,
                             const uint8_t* qs, int O, float* y, int threads, int64_t min_macs) {
  split_rows(T, K, O, threads, min_macs, [&](int o0, int o1) { q4_1_gemv(x, sx, T, K, d, m, qs, o0, o1, O, y); });
}

inline void q8_0_matmul_rows(const float* x, int T, int K, const float* d, const int8_t* qs, int O, float* y,
                             int threads, int64_t min_macs) {
  split_rows(T, K, O, threads, min_macs, [&](int o0, int o1) { q8_0_gemv(x, T, K, d, qs, o0, o1, O, y); });
}

}  // namespace infinillm
