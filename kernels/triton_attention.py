"""Triton kernels: partial attention over paged KV, the exact merge, KV append.

Partial attention runs one program per (query token, KV head, split). A program loads the
queries of every head of its KV group (GQA: they share the keys, so they travel together),
walks its share of the request's blocks with an online softmax in fp32, and writes a partial
(out, lse) for its split. Splitting a long context over several programs (flash-decoding) keeps
the GPU busy at small batch; the splits are merged by the same log-sum-exp merge that merges
partials of different instances, so correctness rests on one identity.

    q   [total_q, H, D] ──► program (t, kvh, s): heads kvh*G .. kvh*G+G-1 of query t,
                            blocks j = s, s+S, s+2S, ... of its request's block table
                            ──► out_s [S, total_q, H, D], lse_s [S, total_q, H] ──► merge

A program skips the blocks its query cannot see: those wholly after its position and, with a
sliding window, those wholly before ``pos - window + 1``.

The host wrappers check shapes and dtypes; ``reference.py`` holds the torch reference of each.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["partial_attention_triton", "merge_partials_triton", "append_kv_triton"]

_LOG2E = 1.4426950408889634


@triton.jit
def _partial_attention_kernel(
    Q, K, V, OUT, LSE,
    Q_REQ, Q_POS, BT, BSTART, BLEN,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    stride_btb,
    max_blocks, num_splits, window, scale_log2,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    req = tl.load(Q_REQ + t)
    pos = tl.load(Q_POS + t)
    # Keys at positions in (lo, pos] are visible: lo = pos - window, or -1 (window 0: full causal).
    lo = tl.where(window > 0, pos - window, -1)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    offs = tl.arange(0, BLOCK_SIZE)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    q = tl.load(Q + t * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    q = q.to(tl.float32)  # [G, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    for j in range(split, max_blocks, num_splits):
        blk = tl.load(BT + req * stride_btb + j)
        start = tl.load(BSTART + req * stride_btb + j)
        n_valid = tl.load(BLEN + req * stride_btb + j)
        if (blk >= 0) & (n_valid > 0) & (start <= pos) & (start + n_valid - 1 > lo):
            blk64 = blk.to(tl.int64)
            k = tl.load(K + blk64 * stride_kb + offs[:, None] * stride_ks + kvh * stride_kh + d[None, :])
            v = tl.load(V + blk64 * stride_vb + offs[:, None] * stride_vs + kvh * stride_vh + d[None, :])
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale_log2  # [G, BS]
            visible = (offs < n_valid) & (start + offs <= pos) & (start + offs > lo)
            s = tl.where(visible[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(OUT + split * stride_os + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=g_ok[:, None])
    tl.store(LSE + split * stride_ls + t * stride_lt + heads, lse, mask=g_ok)


@triton.jit
def _merge_kernel(
    OUTS, LSES, OUT, LSE,
    num_parts, stride_op, stride_ot, stride_lp, stride_lt, stride_rt,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM)
    h_ok = h < NUM_HEADS
    m = tl.full([HEADS_PAD], float("-inf"), tl.float32)
    for p in range(0, num_parts):
        m = tl.maximum(m, tl.load(LSES + p * stride_lp + t * stride_lt + h, mask=h_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([HEADS_PAD], tl.float32)
    acc = tl.zeros([HEADS_PAD, HEAD_DIM], tl.float32)
    for p in range(0, num_parts):
        lse_p = tl.load(LSES + p * stride_lp + t * stride_lt + h, mask=h_ok, other=float("-inf"))
        w = tl.exp(lse_p - m_safe)  # 0 for an empty partial
        o = tl.load(OUTS + p * stride_op + t * stride_ot + h[:, None] * HEAD_DIM + d[None, :],
                    mask=h_ok[:, None], other=0.0)
        total += w
        acc += w[:, None] * o.to(tl.float32)
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(OUT + t * stride_rt + h[:, None] * HEAD_DIM + d[None, :], out.to(OUT.dtype.element_ty),
             mask=h_ok[:, None])
    tl.store(LSE + t * NUM_HEADS + h, lse, mask=h_ok)


@triton.jit
def _append_kv_kernel(
    K, V, KC, VC, SLOTS,
    stride_kt, stride_vt, row,
    ROW_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t).to(tl.int64)
    i = tl.arange(0, ROW_PAD)
    ok = i < row
    tl.store(KC + slot * row + i, tl.load(K + t * stride_kt + i, mask=ok), mask=ok)
    tl.store(VC + slot * row + i, tl.load(V + t * stride_vt + i, mask=ok), mask=ok)


def _num_splits(total_q: int, num_kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the device, never more splits than blocks."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms) // max(1, total_q * num_kv_heads))
    return max(1, min(want, max_blocks, 64))


def partial_attention_triton(q, cu_q, q_pos, k_cache, v_cache, block_table, block_start, block_len, scale=None,
                             num_splits: int | None = None, window: int | None = None):
    """``partial_attention_ref``'s contract on the GPU; ``num_splits`` overrides the split count."""
    total_q, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    batch, max_blocks = block_table.shape
    group = num_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    # Request index of each query token: q[cu_q[b]:cu_q[b+1]] belongs to b.
    q_req = torch.repeat_interleave(
        torch.arange(batch, device=q.device, dtype=torch.int32), (cu_q[1:] - cu_q[:-1]).long(), output_size=total_q
    )
    splits = num_splits or _num_splits(total_q, num_kv_heads, max_blocks, q.device)
    outs = torch.empty(splits, total_q, num_heads, head_dim, dtype=torch.float32 if splits > 1 else q.dtype,
                       device=q.device)
    lses = torch.empty(splits, total_q, num_heads, dtype=torch.float32, device=q.device)
    if total_q == 0:
        return outs[0].to(q.dtype), lses[0]
    grid = (total_q, num_kv_heads, splits)
    _partial_attention_kernel[grid](
        q, k_cache, v_cache, outs, lses,
        q_req, q_pos, block_table, block_start, block_len,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        outs.stride(0), outs.stride(1), outs.stride(2),
        lses.stride(0), lses.stride(1),
        block_table.stride(0),
        max_blocks, splits, window or 0, scale * _LOG2E,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
    )
    if splits == 1:
        return outs[0], lses[0]
    out, lse = merge_partials_triton(outs, lses)
    return out.to(q.dtype), lse


def merge_partials_triton(outs: torch.Tensor, lses: torch.Tensor):
    num_parts, total_q, num_heads, head_dim = outs.shape
    outs = outs.contiguous()
    lses = lses.contiguous()
    out = torch.empty(total_q, num_heads, head_dim, dtype=outs.dtype, device=outs.device)
    lse = torch.empty(total_q, num_heads, dtype=torch.float32, device=outs.device)
    if total_q == 0:
        return out, lse
    _merge_kernel[(total_q,)](
        outs, lses, out, lse,
        num_parts, outs.stride(0), outs.stride(1), lses.stride(0), lses.stride(1), out.stride(0),
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
    )
    return out, lse


def append_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    n, num_kv_heads, head_dim = k.shape
    if n == 0:
        return
    row = num_kv_heads * head_dim
    _append_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), v.stride(0), row,
        ROW_PAD=triton.next_power_of_2(row),
    )
