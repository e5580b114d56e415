# distutils: language = c++
"""Matrix-vector products from GGUF-quantised weights on the CPU (``csrc/quant_cpu.hpp``).

Called with numpy views of torch tensors (no copies); the GIL is released while the product
runs.
"""

from libc.stdint cimport int8_t, uint8_t
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
