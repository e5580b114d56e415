"""Torch reference of each DistAttention kernel; also the CPU path.

Shapes (the contract of ``infinillm.kernels``)::

    k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]
    q                 [total_q, num_heads, head_dim]   queries of B requests, packed
    cu_q              [B+1] int32                      request b owns q[cu_q[b]:cu_q[b+1]]
    q_pos             [total_q] int32                  absolute position of each query token
    block_table       [B, max_blocks] int32            blocks of request b held here, -1 padded
    block_start       [B, max_blocks] int32            absolute position of each block's first token
    block_len         [B, max_blocks] int32            valid tokens in each block
    window            int >= 1, or None                sliding window (None: full causal attention)

A query at position ``q_pos`` attends to the keys of its request in these blocks at positions
``k_pos`` with ``q_pos - window < k_pos <= q_pos`` (causal by position; with ``window`` None
just ``k_pos <= q_pos``): the last ``window`` positions, its own included, as transformers'
sliding-window mask. ``out`` is normalised over those keys only; ``lse`` is the natural-log
log-sum-exp of the scaled scores, so partials over disjoint key sets merge exactly::

    lse = logsumexp_j(lse_j)        out = sum_j exp(lse_j - lse) * out_j

A query that sees no key has ``lse = -inf`` and ``out = 0``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:  # the CPU decode-attention kernel (csrc/attention_cpu.hpp), when built
    from . import _quant_cpu
except ImportError:
    _quant_cpu = None

# The CPUs this process may use: the CPU kernels' threads (decode attention, quantised products).
CPU_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_CPU_PARALLEL_WORK = 1 << 22  # decode attention splits its requests over the cores from B*T*H*D this large

__all__ = [
    "partial_attention_ref",
    "partial_attention_torch",
    "merge_partials_ref",
    "append_kv_ref",
    "DecodePlan",
    "build_decode_plan",
    "select_plan",
    "decode_attention_sdpa",
]

# Queries of one request are processed in slices of this many, bounding the score matrix.
_QUERY_SLICE = 1024


def _visible(key_pos: torch.Tensor, key_ok: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys at ``key_pos`` (held where ``key_ok``) queries at ``q_pos`` see, broadcast:
    ``q_pos - window < key_pos <= q_pos``."""
    visible = key_ok & (key_pos <= q_pos)
    if window is not None:
        visible &= key_pos > q_pos - window
    return visible


def _held_keys(block_table, block_start, block_len, b: int, offsets: torch.Tensor, q_pos: torch.Tensor, window: int | None):
    """Request b's blocks held here that queries at ``q_pos`` [n] may see (those wholly after
    the last query or before the first one's window are left out), and where their keys sit:
    ``(ids [nb], key_pos [T], key_ok [T])`` with T = nb * block_size, or None when there are none."""
    ids = block_table[b].long()
    lens = block_len[b].long()
    starts = block_start[b].long()
    held = (ids >= 0) & (lens > 0) & (starts <= q_pos.max())
    if window is not None:
        held &= starts + lens - 1 > q_pos.min() - window
    if not bool(held.any()):
        return None
    ids, lens, starts = ids[held], lens[held], starts[held]
    key_pos = (starts[:, None] + offsets[None, :]).reshape(-1)  # [T]
    key_ok = (offsets[None, :] < lens[:, None]).reshape(-1)  # [T]
    return ids, key_pos, key_ok


def partial_attention_ref(
    q: torch.Tensor,
    cu_q: torch.Tensor,
    q_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention (out [total_q, H, D] in q's dtype, lse [total_q, H] fp32) of the module
    docstring, in plain matrix products: the reference every other path is tested against."""
    total_q, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = torch.zeros(total_q, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((total_q, num_heads), -math.inf, dtype=torch.float32, device=q.device)
    cu = cu_q.tolist()
    offsets = torch.arange(block_size, device=q.device)
    for b in range(len(cu) - 1):
        q0, q1 = cu[b], cu[b + 1]
        found = _held_keys(block_table, block_start, block_len, b, offsets, q_pos[q0:q1], window) if q0 < q1 else None
        if found is None:
            continue
        ids, key_pos, key_ok = found
        # One gather per cache (index_select: several times faster than advanced indexing);
        # the products below read the [T, Hkv, D] result through strided views, without copies.
        k = k_cache.index_select(0, ids).view(-1, num_kv_heads, head_dim).float().permute(1, 0, 2)  # [Hkv, T, D]
        v = v_cache.index_select(0, ids).view(-1, num_kv_heads, head_dim).float().permute(1, 0, 2)
        for s0 in range(q0, q1, _QUERY_SLICE):
            s1 = min(q1, s0 + _QUERY_SLICE)
            n = s1 - s0
            # [n, H, D] -> [Hkv, n*G, D]: the G query heads of a KV group share its keys.
            qs = q[s0:s1].float().view(n, num_kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(num_kv_heads, n * group, head_dim)
            scores = torch.matmul(qs, k.transpose(1, 2)).mul_(scale)  # [Hkv, n*G, T]
            mask = _visible(key_pos[None, :], key_ok[None, :], q_pos[s0:s1].long()[:, None], window)  # [n, T]
            if not bool(mask.all()):
                scores.masked_fill_(~mask.repeat_interleave(group, dim=0)[None], -math.inf)
            m = torch.logsumexp(scores, dim=-1, keepdim=True)  # [Hkv, n*G, 1]; -inf where no key is visible
            seen = torch.isfinite(m)
            p = torch.exp_(scores.sub_(torch.where(seen, m, 0.0)))  # masked scores give 0
            o = torch.matmul(p, v)  # [Hkv, n*G, D]
            out[s0:s1] = o.view(num_kv_heads, n, group, head_dim).permute(1, 0, 2, 3).reshape(n, num_heads, head_dim).to(out.dtype)
            lse[s0:s1] = m.view(num_kv_heads, n, group).permute(1, 0, 2).reshape(n, num_heads)
    return out, lse


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """Where the keys of every single-query (decode) request of a batch sit, padded to one
    rectangle, so all of them attend in a few batched tensor operations.

    Built once per step and window (it depends only on the block tables, the positions and the
    sliding window, not on the layer: layers that share a window share a plan) by
    ``build_decode_plan``; ``partial_attention_torch`` builds one itself when not given.

    ``requests`` [B'] int64: the batch's requests with exactly one query; ``rows`` [B'] int64:
    their query rows in q; ``slots`` [B', T] int64: flat cache slot of each key
    (``block * block_size + offset``, 0 where padded); ``visible`` [B', T] bool: the key is held
    here and the query sees it (``q_pos - window < k_pos <= q_pos``); ``seen`` [B'] bool: at
    least one is; ``window``: the sliding window it was built for (None: full attention).
    With a window only the blocks that overlap some query's window are in ``slots``, so T is
    about ``window + block_size``, not the whole context.

    ``runs``: when the plan has at most ``_RUN_MAX_REQUESTS`` requests and the keys each one
    sees are one run of consecutive cache slots (the common case: a pool hands a growing
    request neighbouring blocks), ``(first slot, count)`` per request, and the kernels read
    those keys as views of the cache instead of gathering them; else None. (Attention does not
    depend on the order of the keys, only on which ones are seen.)
    """

    requests: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    visible: torch.Tensor
    seen: torch.Tensor
    window: int | None
    runs: tuple[tuple[int, int], ...] | None = None


# Up to this many decode requests read their keys as views of the cache, one request at a time,
# when each one's keys are a run of slots; more take one batched gather (fewer, larger calls).
_RUN_MAX_REQUESTS = 4


def _slot_runs(slots: torch.Tensor, visible: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
    """``DecodePlan.runs`` of a plan's ``slots`` and ``visible`` [B', T], or None."""
    b = slots.shape[0]
    if b == 0 or b > _RUN_MAX_REQUESTS:
        return None
    count = visible.sum(dim=1)
    first = slots.masked_fill(~visible, torch.iinfo(slots.dtype).max).amin(dim=1)
    last = slots.masked_fill(~visible, -1).amax(dim=1)
    # Distinct slots (blocks are distinct) fill [first, last] exactly when there are last-first+1.
    if not bool(((count > 0) & (last - first + 1 == count)).all()):
        return None
    return tuple(zip(first.tolist(), count.tolist()))


def build_decode_plan(
    cu_q: torch.Tensor,
    q_pos: torch.Tensor,
    block_table: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> DecodePlan:
    """The ``DecodePlan`` of a batch for a sliding ``window`` (None: full attention):
    vectorised, no per-request Python loop."""
    counts = (cu_q[1:] - cu_q[:-1]).long()
    requests = torch.nonzero(counts == 1).flatten()  # [B']
    rows = cu_q[:-1].long()[requests]
    pos = q_pos.long()[rows][:, None]  # [B', 1]
    bt = block_table.long()[requests]  # [B', M]
    starts = block_start.long()[requests]
    lens = block_len.long()[requests]
    if window is not None and requests.numel():
        # Keep the blocks that overlap each query's window, packed to the left (a stable sort
        # keeps their order): M shrinks to about window / block_size + 1.
        near = (bt >= 0) & (lens > 0) & (starts <= pos) & (starts + lens - 1 > pos - window)  # [B', M]
        width = max(1, int(near.sum(dim=1).max()))
        order = torch.sort(near.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]  # [B', M']
        bt = torch.where(near.gather(1, order), bt.gather(1, order), -1)
        starts, lens = starts.gather(1, order), lens.gather(1, order)
    offsets = torch.arange(block_size, device=bt.device)
    held = (bt >= 0)[:, :, None] & (offsets[None, None, :] < lens[:, :, None])  # [B', M, BS]
    key_pos = starts[:, :, None] + offsets[None, None, :]
    visible = _visible(key_pos, held, pos[:, :, None], window).flatten(1)  # [B', T]
    slots = (bt.clamp(min=0)[:, :, None] * block_size + offsets[None, None, :]).flatten(1)
    return DecodePlan(requests, rows, slots, visible, visible.any(dim=1), window, _slot_runs(slots, visible))


def select_plan(plan: DecodePlan, keep: torch.Tensor) -> DecodePlan:
    """The part of a decode plan for the requests ``keep`` [B'] marks."""
    slots, visible = plan.slots[keep], plan.visible[keep]
    return DecodePlan(plan.requests[keep], plan.rows[keep], slots, visible, plan.seen[keep], plan.window,
                      _slot_runs(slots, visible))


def _gather_plan_keys(plan: DecodePlan, cache: torch.Tensor) -> torch.Tensor:
    """The plan's keys (or values) out of a paged cache: [B', T, Hkv, D]."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    b, t = plan.slots.shape
    flat = cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    return flat.index_select(0, plan.slots.flatten()).view(b, t, num_kv_heads, head_dim)


def decode_attention_sdpa(q: torch.Tensor, plan: DecodePlan, k_cache, v_cache, scale: float | None) -> torch.Tensor:
    """Attention of the plan's queries q [B', H, D] (in plan order), without the log-sum-exp,
    over the keys ``plan.visible`` marks (its window included); every query must see at least
    one key (``plan.seen``). A few requests whose keys are runs of slots: torch's fused SDPA over
    views of the cache; otherwise on the CPU the decode kernel (``csrc/attention_cpu.hpp``: keys
    read where they lie; 2-12x the gather below at contexts of thousands, docs/PERFORMANCE.md);
    else the keys gathered, then torch's fused SDPA under a mask."""
    b, num_heads, head_dim = q.shape
    if plan.runs is None and _cpu_kernel(q, k_cache, v_cache):  # no gather, no padding, no mask
        return _cpu_decode(q, plan, k_cache, v_cache, head_dim**-0.5 if scale is None else scale)[0]
    if plan.runs is not None:  # each request's keys are one run of slots: views, no gather
        num_blocks, block_size, num_kv_heads, _ = k_cache.shape
        flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        out = torch.empty(b, num_heads, head_dim, dtype=k_cache.dtype, device=q.device)
        for i, (first, count) in enumerate(plan.runs):
            out[i] = torch.nn.functional.scaled_dot_product_attention(
                q[i].view(1, num_heads, 1, head_dim).to(k_cache.dtype),
                flat_k[first:first + count].permute(1, 0, 2)[None], flat_v[first:first + count].permute(1, 0, 2)[None],
                scale=scale, enable_gqa=num_heads != num_kv_heads,
            ).view(num_heads, head_dim)
        return out
    k, v = _gather_plan_keys(plan, k_cache), _gather_plan_keys(plan, v_cache)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.view(b, num_heads, 1, head_dim).to(k.dtype), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3),
        attn_mask=plan.visible[:, None, None, :], scale=scale, enable_gqa=num_heads != k.shape[2],
    )  # [B', H, 1, D]
    return o.view(b, num_heads, head_dim)


def _cpu_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the CPU decode-attention kernel (``csrc/attention_cpu.hpp``) serves this cache:
    built, fp32 and contiguous on the CPU, a head layout it takes (AVX-512, head_dim a multiple
    of 16, at most 8 query heads a key-value head)."""
    return (_quant_cpu is not None and q.device.type == "cpu" and k_cache.dtype == v_cache.dtype == torch.float32
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and _quant_cpu.attention_supported(q.shape[1], k_cache.shape[2], k_cache.shape[3]))


def _cpu_decode(q, plan: DecodePlan, k_cache, v_cache, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's queries q [B', H, D] (in plan order) over their visible keys, read where they
    lie in the cache: (out [B', H, D], lse [B', H]) in fp32 (a request seeing no key: 0, -inf)."""
    b, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty(b, num_heads, head_dim, dtype=torch.float32)
    lse = torch.empty(b, num_heads, dtype=torch.float32)
    _quant_cpu.decode_attention_cpu(
        q.float().contiguous().numpy(), k_cache.view(num_blocks * block_size, num_kv_heads, head_dim).numpy(),
        v_cache.view(num_blocks * block_size, num_kv_heads, head_dim).numpy(), plan.slots.contiguous().numpy(),
        plan.visible.contiguous().view(torch.uint8).numpy(), scale, out.numpy(), lse.numpy(), CPU_THREADS,
        _CPU_PARALLEL_WORK,
    )
    return out, lse


def _decode_attention(q, plan: DecodePlan, k_cache, v_cache, scale: float, out, lse, need_lse: bool = True) -> None:
    """Partial attention of the plan's single-query requests, all at once (fills out/lse rows),
    over the keys ``plan.visible`` marks (its window included).

    Without ``need_lse`` (nothing to merge with: every key of the step is here) it runs torch's
    fused SDPA, which does not give the log-sum-exp; lse rows are then left as they are.
    """
    if not need_lse and bool(plan.seen.all()):
        out[plan.rows] = decode_attention_sdpa(q.index_select(0, plan.rows), plan, k_cache, v_cache, scale).to(out.dtype)
        return
    if _cpu_kernel(q, k_cache, v_cache):
        o, m = _cpu_decode(q.index_select(0, plan.rows), plan, k_cache, v_cache, scale)
        out[plan.rows] = o.to(out.dtype)
        lse[plan.rows] = m
        return
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    b = plan.slots.shape[0]
    if plan.runs is not None:  # each request's keys are one run of slots: views, no gather, no mask
        num_blocks, block_size, _, _ = k_cache.shape
        flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        rows = plan.rows.tolist()
        for row, (first, count) in zip(rows, plan.runs):
            qs = q[row].float().view(num_kv_heads, group, head_dim)
            k = flat_k[first:first + count].float().permute(1, 2, 0)  # [Hkv, D, n]
            v = flat_v[first:first + count].float().permute(1, 0, 2)  # [Hkv, n, D]
            scores = torch.matmul(qs, k)  # [Hkv, G, n], unscaled
            top = scores.amax(dim=-1, keepdim=True)
            p = scores.sub_(top).mul_(scale).exp_()
            total = p.sum(dim=-1, keepdim=True)
            out[row] = torch.matmul(p, v).div_(total).view(num_heads, head_dim).to(out.dtype)
            lse[row] = top.mul_(scale).add_(total.log_()).view(num_heads)
        return
    k, v = _gather_plan_keys(plan, k_cache), _gather_plan_keys(plan, v_cache)
    k, v = k.float(), v.float()
    qs = q.index_select(0, plan.rows).float().view(b, num_kv_heads, group, head_dim)  # [B', Hkv, G, D]
    scores = torch.matmul(qs, k.permute(0, 2, 3, 1)).mul_(scale)  # [B', Hkv, G, T]
    scores.masked_fill_(~plan.visible[:, None, None, :], -math.inf)
    m = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B', Hkv, G, 1]
    p = torch.exp_(scores.sub_(torch.where(torch.isfinite(m), m, 0.0)))
    o = torch.matmul(p, v.permute(0, 2, 1, 3))  # [B', Hkv, G, D]
    out[plan.rows] = o.reshape(b, num_heads, head_dim).to(out.dtype)
    lse[plan.rows] = m.reshape(b, num_heads)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _causal_split(key_pos: torch.Tensor, key_ok: torch.Tensor, q_pos: torch.Tensor) -> tuple[int, int] | None:
    """For a slice of queries at consecutive positions whose keys here run in position order:
    ``(i0, i1)`` when keys ``[i0, i1)`` are exactly the queries' own positions and every key
    before ``i0`` is real (so all visible to every query); None otherwise (the masked path)."""
    n = q_pos.numel()
    p0 = int(q_pos[0])
    if int(q_pos[-1]) - p0 != n - 1:
        return None
    i0 = int(torch.searchsorted(key_pos, p0))
    i1 = i0 + n
    if i1 > key_pos.numel() or not bool(key_ok[:i1].all()):
        return None
    if int(key_pos[i0]) != p0 or int(key_pos[i1 - 1]) != p0 + n - 1:
        return None
    return i0, i1
# A request with at least this many queries in the batch takes the fused flash path.
_FLASH_MIN_QUERIES = 16


def partial_attention_torch(
    q: torch.Tensor,
    cu_q: torch.Tensor,
    q_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    scale: float | None = None,
    decode_plan: DecodePlan | None = None,
    need_lse: bool = True,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU production path: same contract as ``partial_attention_ref``, faster.

    Requests with many queries (prefill chunks) run torch's fused CPU flash attention
    (``aten::_scaled_dot_product_flash_attention_for_cpu``), which returns the log-sum-exp
    beside the output and never materialises the [queries, keys] score matrix, with an additive
    mask for causality by position and the window: several times faster than the reference
    there. Each slice of at most ``_QUERY_SLICE`` queries gathers only the blocks held here that
    it may see (none wholly after its last query or before its first query's window).
    Single-query requests (decode) attend all together through a ``DecodePlan`` (pass the
    step's plan, built for the same ``window``, to reuse it across layers); requests with a few
    queries take the reference's two matrix products. Falls back to the reference where the
    fused operator is missing or the tensors are not on the CPU. ``need_lse=False`` (the caller
    will not merge: all the step's keys are on this instance) lets decode rows skip the
    log-sum-exp; their lse is then unspecified.
    """
    if _FLASH_CPU is None or q.device.type != "cpu":
        return partial_attention_ref(q, cu_q, q_pos, k_cache, v_cache, block_table, block_start, block_len, scale, window)
    total_q, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = torch.zeros(total_q, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((total_q, num_heads), -math.inf, dtype=torch.float32, device=q.device)
    cu = cu_q.tolist()
    offsets = torch.arange(block_size, device=q.device)
    work_dtype = q.dtype if q.dtype in (torch.float32, torch.bfloat16) else torch.float32
    # Single-query rows: through the caller's plan (built once per step, shared by the layers),
    # else per request like the other short ones (building a plan per call does not pay).
    plan = decode_plan
    if plan is not None and plan.rows.numel():
        _decode_attention(q, plan, k_cache, v_cache, scale, out, lse, need_lse)
    lowest = 1 if plan is not None else 0
    few = [b for b in range(len(cu) - 1) if lowest < cu[b + 1] - cu[b] < _FLASH_MIN_QUERIES]
    if few:  # decode-sized requests: one reference call over just them
        rows = torch.cat([torch.arange(cu[b], cu[b + 1]) for b in few]).to(q.device)
        sizes = torch.tensor([0] + [cu[b + 1] - cu[b] for b in few], dtype=torch.int32)
        sel = torch.tensor(few, device=q.device)
        o, m = partial_attention_ref(
            q[rows], torch.cumsum(sizes, 0, dtype=torch.int32).to(q.device), q_pos[rows], k_cache, v_cache,
            block_table[sel], block_start[sel], block_len[sel], scale, window,
        )
        out[rows], lse[rows] = o, m

    def heads(cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # [nb, BS, Hkv, D] -> [1, H, T, D]
        num_keys = ids.numel() * block_size
        x = cache.index_select(0, ids).view(num_keys, num_kv_heads, head_dim).to(work_dtype)
        x = x.permute(1, 0, 2)
        if group > 1:
            x = x[:, None].expand(num_kv_heads, group, num_keys, head_dim).reshape(num_heads, num_keys, head_dim)
        return x.unsqueeze(0)

    for b in range(len(cu) - 1):
        q0, q1 = cu[b], cu[b + 1]
        if q1 - q0 < _FLASH_MIN_QUERIES:
            continue
        for s0 in range(q0, q1, _QUERY_SLICE):
            s1 = min(q1, s0 + _QUERY_SLICE)
            qp = q_pos[s0:s1].long()  # [n]
            found = _held_keys(block_table, block_start, block_len, b, offsets, qp, window)
            if found is None:
                continue
            ids, key_pos, key_ok = found
            k, v = heads(k_cache, ids), heads(v_cache, ids)
            qs = q[s0:s1].to(work_dtype).permute(1, 0, 2).unsqueeze(0)  # [1, H, n, D]
            split = None if window is not None else _causal_split(key_pos, key_ok, qp)
            if split is not None:
                # The slice's own keys (exactly its positions, in order) with the kernel's causal
                # mask, which skips the upper triangle; the keys before it, all visible, unmasked;
                # the two merged by log-sum-exp. No mask to build, no masked work.
                i0, i1 = split
                o, m = _FLASH_CPU(qs, k[:, :, i0:i1], v[:, :, i0:i1], 0.0, True, scale=scale)
                o, m = o[0].permute(1, 0, 2), m[0].permute(1, 0).float()  # [n, H, D], [n, H]
                if i0 > 0:
                    ob, mb = _FLASH_CPU(qs, k[:, :, :i0], v[:, :, :i0], 0.0, False, scale=scale)
                    ob, mb = ob[0].permute(1, 0, 2), mb[0].permute(1, 0).float()
                    both = torch.logaddexp(m, mb)
                    o = (o.float() * torch.exp(m - both)[..., None] + ob.float() * torch.exp(mb - both)[..., None])
                    m = both
                out[s0:s1] = o.to(out.dtype)
                lse[s0:s1] = m
                continue
            visible = _visible(key_pos[None, :], key_ok[None, :], qp[:, None], window)  # [n, T]
            seen = visible.any(dim=1)  # [n]
            mask = None
            if not bool(visible.all()):
                mask = torch.zeros(visible.shape, dtype=work_dtype, device=q.device).masked_fill_(~visible, -math.inf)
                mask[~seen] = 0.0  # rows that see nothing: keep the kernel finite, fixed below
            o, m = _FLASH_CPU(qs, k, v, 0.0, False, attn_mask=mask, scale=scale)
            o = o[0].permute(1, 0, 2)  # [n, H, D]
            m = m[0].permute(1, 0).float()  # [n, H]
            if not bool(seen.all()):
                o = o.masked_fill(~seen[:, None, None], 0.0)
                m = m.masked_fill(~seen[:, None], -math.inf)
            out[s0:s1] = o.to(out.dtype)
            lse[s0:s1] = m
    return out, lse


def merge_partials_ref(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of P partials: outs [P, Tq, H, D], lses [P, Tq, H] (fp32).

    All partials -inf gives out 0 and lse -inf, never NaN.
    """
    lse = torch.logsumexp(lses.float(), dim=0)  # [Tq, H]
    seen = torch.isfinite(lse)
    w = torch.exp(lses.float() - torch.where(seen, lse, 0.0)[None])  # [P, Tq, H]; 0 for -inf partials
    w = torch.where(seen[None], w, 0.0)
    out = (w[..., None] * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse


def append_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [n, Hkv, D] to flat slots ``block * block_size + offset`` of the caches."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    slots = slot_mapping.long()
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = k.to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = v.to(v_cache.dtype)
