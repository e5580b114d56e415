"""Partial-attention kernel throughput, against the device's copy bandwidth and torch SDPA.

Prints JSON lines {"metric", "value", "unit"}, all measured in this run:

On CUDA (the Triton kernels):
- ``decode_bw_{4k,32k,128k}``: bytes of KV read per second by the decode kernel, for a batch
  of requests at that context (paged cache, fp16, 32 heads / 8 KV heads x 128 dims);
- ``copy_bw``: device-to-device copy bandwidth (bytes read + written per second);
- ``decode_bw_fraction_32k``: decode_bw_32k / copy_bw;
- ``sdpa_bw_*``: the same attention through torch ``scaled_dot_product_attention`` on
  contiguous K/V (no paging), and ``decode_vs_sdpa_32k``.

On CPU (the torch path): decode time of ``partial_attention`` against SDPA on the same data,
``cpu_decode_vs_sdpa_*`` (SDPA time over ours: above 1 means we are faster).

Usage: python benchmarks/bench_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _common import emit, median_seconds  # noqa: E402

from infinillm.kernels import partial_attention  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def make_decode_case(batch: int, ctx: int, dtype, device):
    blocks_per_req = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * blocks_per_req
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)  # scattered blocks, like a real pool
    block_table = perm.view(batch, blocks_per_req)
    block_start = (torch.arange(blocks_per_req, device=device, dtype=torch.int32) * BLOCK_SIZE).expand(batch, -1).contiguous()
    block_len = torch.full((batch, blocks_per_req), BLOCK_SIZE, dtype=torch.int32, device=device)
    block_len[:, -1] = ctx - (blocks_per_req - 1) * BLOCK_SIZE
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=dtype, device=device)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    q_pos = torch.full((batch,), ctx - 1, dtype=torch.int32, device=device)
    kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    return (q, cu_q, q_pos, k_cache, v_cache, block_table, block_start, block_len), kv_bytes


def sdpa_case(batch: int, ctx: int, dtype, device):
    q = torch.randn(batch, NUM_HEADS, 1, HEAD_DIM, dtype=dtype, device=device)
    k = torch.randn(batch, NUM_KV_HEADS, ctx, HEAD_DIM, dtype=dtype, device=device)
    v = torch.randn_like(k)
    return q, k, v


def cuda_time(fn, repeat: int) -> float:
    """Median seconds per call, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10)
    times.sort()
    return times[len(times) // 2]


def bench_cuda(repeat: int) -> None:
    device, dtype = "cuda", torch.float16
    n = 1 << 28  # 512 MiB of fp16
    src = torch.empty(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), repeat)
    copy_bw = 2 * n * src.element_size() / t
    emit("copy_bw", copy_bw / 1e9, "GB/s", device=torch.cuda.get_device_name())
    src = dst = None  # free before the attention cases
    torch.cuda.empty_cache()
    bw = {}
    for label, ctx, batch in (("4k", 4096, 32), ("32k", 32768, 8), ("128k", 131072, 2)):
        args, kv_bytes = make_decode_case(batch, ctx, dtype, device)
        t = cuda_time(lambda: partial_attention(*args, backend="triton"), repeat)
        bw[label] = kv_bytes / t
        emit(f"decode_bw_{label}", bw[label] / 1e9, "GB/s", batch=batch, context=ctx, ms=t * 1e3)
        args = None
        q, k, v = sdpa_case(batch, ctx, dtype, device)
        t_s = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeat)
        emit(f"sdpa_bw_{label}", kv_bytes / t_s / 1e9, "GB/s", batch=batch, context=ctx, ms=t_s * 1e3)
        if label == "32k":
            emit("decode_vs_sdpa_32k", t_s / t, "x")
        q = k = v = None
        torch.cuda.empty_cache()
    emit("decode_bw_fraction_32k", bw["32k"] / copy_bw, "ratio")


def bench_cpu(repeat: int) -> None:
    dtype = torch.float32
    for label, ctx, batch in (("1k", 1024, 4), ("4k", 4096, 2)):
        args, kv_bytes = make_decode_case(batch, ctx, dtype, "cpu")
        t = median_seconds(lambda: partial_attention(*args, backend="torch"), repeat=repeat)
        q, k, v = sdpa_case(batch, ctx, dtype, "cpu")
        t_s = median_seconds(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True), repeat=repeat
        )
        emit(f"cpu_decode_ms_{label}", t * 1e3, "ms", batch=batch, context=ctx)
        emit(f"cpu_sdpa_ms_{label}", t_s * 1e3, "ms", batch=batch, context=ctx)
        emit(f"cpu_decode_vs_sdpa_{label}", t_s / t, "x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args()
    repeat = 3 if args.quick else 9
    if torch.cuda.is_available():
        bench_cuda(repeat)
    else:
        bench_cpu(repeat)


if __name__ == "__main__":
    main()
