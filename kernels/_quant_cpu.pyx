# distutils: language = c++
"""CPU kernels: products from GGUF-quantised weights (``csrc/quant_cpu.hpp``) and decode
attention straight from the paged cache (``csrc/attention_cpu.hpp``).

Called with numpy views of torch tensors (no copies); the GIL is released while the product
runs.
"""

from libc.stdint cimport int8_t, int64_t, uint8_t
from libcpp.vector cimport vector

import numpy as np

cdef extern from "quant_cpu.hpp" namespace "infinillm" nogil:
    void block_sums(const float* x, int T, int K, float* sx)
    void q4_1_gemv(const float* x, const float* sx, int T, int K, const float* d, const float* m,
                   const uint8_t* qs, int o0, int o1, int O, float* y)
    void q8_0_gemv(const float* x, int T, int K, const float* d, const int8_t* qs, int o0, int o1, int O, float* y)
    void q4_1_matmul_rows(const float* x, const float* sx, int T, int K, const float* d, const float* m,
                          const uint8_t* qs, int O, float* y, int threads, long long min_macs) except +
    void q8_0_matmul_rows(const float* x, int T, int K, const float* d, const int8_t* qs, int O, float* y,
                          int threads, long long min_macs) except +
    bint has_avx2()
    bint has_avx512()


cdef extern from "attention_cpu.hpp" namespace "infinillm" nogil:
    bint decode_attention_supported(int H, int Hkv, int D)
    void decode_attention(const float* q, const float* kc, const float* vc, const int64_t* slots,
                          const uint8_t* visible, int B, int T, int H, int Hkv, int D, float scale, float* out,
                          float* lse, int threads, long long min_work) except +


def attention_supported(int num_heads, int num_kv_heads, int head_dim) -> bool:
    return decode_attention_supported(num_heads, num_kv_heads, head_dim)


def decode_attention_cpu(const float[:, :, ::1] q, const float[:, :, ::1] k_flat, const float[:, :, ::1] v_flat,
                         const int64_t[:, ::1] slots, const uint8_t[:, ::1] visible, float scale,
                         float[:, :, ::1] out, float[:, ::1] lse, int threads=1, long long min_work=0):
    """One query row a request q [B, H, D] over the keys ``slots`` [B, T] names (flat cache rows
    of k_flat / v_flat [S, Hkv, D]) where ``visible`` [B, T]: out [B, H, D], lse [B, H]."""
    cdef int B = q.shape[0], H = q.shape[1], D = q.shape[2], T = slots.shape[1], Hkv = k_flat.shape[1]
    if not decode_attention_supported(H, Hkv, D) or k_flat.shape[2] != D or v_flat.shape[1] != Hkv \
            or v_flat.shape[2] != D or slots.shape[0] != B or visible.shape[0] != B or visible.shape[1] != T \
            or out.shape[0] != B or out.shape[1] != H or out.shape[2] != D or lse.shape[0] != B or lse.shape[1] != H:
        raise ValueError("decode_attention_cpu: shapes do not agree, or this CPU / head layout is not supported")
    if B == 0 or T == 0:
        return
    with nogil:
        decode_attention(&q[0, 0, 0], &k_flat[0, 0, 0], &v_flat[0, 0, 0], &slots[0, 0], &visible[0, 0], B, T, H, Hkv,
                         D, scale, &out[0, 0, 0], &lse[0, 0], threads, min_work)


def simd() -> str:
    return "avx512" if has_avx512() else "avx2" if has_avx2() else "scalar"


def q4_1_matmul(const float[:, ::1] x, const float[:, ::1] d, const float[:, ::1] m, const uint8_t[:, ::1] qs,
                float[:, ::1] y, int threads=1, long long min_macs=0):
    """y[T, O] = x[T, K] @ W.T for a Q4_1 weight W [O, K] given as d/m [O, K/32], qs [O, K/2];
    over ``threads`` threads when it has at least ``min_macs`` multiply-adds."""
    cdef int T = x.shape[0], K = x.shape[1], O = d.shape[0]
    if K % 32 or d.shape[1] != K // 32 or m.shape[0] != O or m.shape[1] != K // 32 or qs.shape[0] != O \
            or qs.shape[1] != K // 2 or y.shape[0] != T or y.shape[1] != O:
        raise ValueError(f"q4_1_matmul: shapes x ({x.shape[0]}, {x.shape[1]}), d ({d.shape[0]}, {d.shape[1]}), "
                         f"qs ({qs.shape[0]}, {qs.shape[1]}), y ({y.shape[0]}, {y.shape[1]}) do not agree")
    sx_arr = np.empty((T, K // 32), dtype=np.float32)
    cdef float[:, ::1] sx = sx_arr
    with nogil:
        block_sums(&x[0, 0], T, K, &sx[0, 0])
        q4_1_matmul_rows(&x[0, 0], &sx[0, 0], T, K, &d[0, 0], &m[0, 0], &qs[0, 0], O, &y[0, 0], threads, min_macs)


def q8_0_matmul(const float[:, ::1] x, const float[:, ::1] d, const int8_t[:, ::1] qs, float[:, ::1] y,
                int threads=1, long long min_macs=0):
    """y[T, O] = x[T, K] @ W.T for a Q8_0 weight W [O, K] given as d [O, K/32], qs [O, K]; over
    ``threads`` threads when it has at least ``min_macs`` multiply-adds."""
    cdef int T = x.shape[0], K = x.shape[1], O = d.shape[0]
    if K % 32 or d.shape[1] != K // 32 or qs.shape[0] != O or qs.shape[1] != K or y.shape[0] != T or y.shape[1] != O:
        raise ValueError(f"q8_0_matmul: shapes x ({x.shape[0]}, {x.shape[1]}), d ({d.shape[0]}, {d.shape[1]}), "
                         f"qs ({qs.shape[0]}, {qs.shape[1]}), y ({y.shape[0]}, {y.shape[1]}) do not agree")
    with nogil:
        q8_0_matmul_rows(&x[0, 0], T, K, &d[0, 0], &qs[0, 0], O, &y[0, 0], threads, min_macs)
