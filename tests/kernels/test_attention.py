"""Partial attention, merge and KV append: Triton against the torch reference, and the
DistAttention identity (partials over any partition of the blocks merge to full attention),
with and without a sliding window; every path against a plain dense masked softmax."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinillm import ValidationError
from infinillm.kernels import append_kv, merge_partials, partial_attention

from .conftest import DEVICE, needs_triton


# ---- helpers ---------------------------------------------------------------------------------


def full_attention(q, q_pos, k, v, scale, window=None):
    """Plain softmax attention of queries q [n, H, D] at q_pos over keys k, v [T, Hkv, D] at
    positions 0..T-1, causal by position and, with a window, only keys at
    q_pos - window < k_pos. Returns out [n, H, D], lse [n, H] (fp32)."""
    n, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    s = torch.einsum("nkgd,tkd->nkgt", q.double().view(n, hkv, g, d), k.double()) * scale
    k_pos = torch.arange(k.shape[0])[None, :]
    mask = k_pos <= q_pos.long()[:, None]
    if window is not None:
        mask &= k_pos > q_pos.long()[:, None] - window
    s = s.masked_fill(~mask[:, None, None, :], -math.inf)
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("nkgt,tkd->nkgd", torch.softmax(s, -1), v.double())
    return out.reshape(n, h, d).float(), lse.reshape(n, h).float()


class Paged:
    """One request's context laid out in a paged cache, blocks scattered at random slots."""

    def __init__(self, ctx, block_size, hkv, d, dtype=torch.float32, seed=0, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.ctx, self.block_size = ctx, block_size
        self.num_logical = -(-ctx // block_size)
        num_blocks = self.num_logical + 3
        self.k = torch.randn(ctx, hkv, d, generator=gen)
        self.v = torch.randn(ctx, hkv, d, generator=gen)
        self.k_cache = torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.ids = torch.randperm(num_blocks, generator=gen)[: self.num_logical]
        for i, blk in enumerate(self.ids.tolist()):
            n = min(block_size, ctx - i * block_size)
            self.k_cache[blk, :n] = self.k[i * block_size : i * block_size + n].to(dtype)
            self.v_cache[blk, :n] = self.v[i * block_size : i * block_size + n].to(dtype)
        self.k_cache, self.v_cache = self.k_cache.to(device), self.v_cache.to(device)
        self.device = device

    def tables(self, logical):
        """block_table/start/len [1, len(logical)] for the given logical blocks."""
        logical = list(logical)
        m = max(1, len(logical))
        bt = torch.full((1, m), -1, dtype=torch.int32)
        bs = torch.zeros((1, m), dtype=torch.int32)
        bl = torch.zeros((1, m), dtype=torch.int32)
        for j, i in enumerate(logical):
            bt[0, j] = int(self.ids[i])
            bs[0, j] = i * self.block_size
            bl[0, j] = min(self.block_size, self.ctx - i * self.block_size)
        return bt.to(self.device), bs.to(self.device), bl.to(self.device)


def run_partitioned(paged, q, q_pos, parts, backend, scale, window=None):
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    outs, lses = [], []
    for part in parts:
        bt, bs, bl = paged.tables(part)
        o, l = partial_attention(q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, scale, backend=backend, window=window)
        outs.append(o.float())
        lses.append(l)
    return merge_partials(torch.stack(outs), torch.stack(lses), backend=backend)


# ---- the DistAttention identity (torch path, hypothesis) -------------------------------------


@st.composite
def partitioned_case(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    ctx = draw(st.integers(1, 70))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3, 8]))
    nblocks = -(-ctx // block_size)
    parts_n = draw(st.integers(1, 4))
    owner = draw(st.lists(st.integers(0, parts_n - 1), min_size=nblocks, max_size=nblocks))
    parts = [[i for i in range(nblocks) if owner[i] == p] for p in range(parts_n)]  # some may be empty
    decode = draw(st.booleans())
    if decode:
        positions = [ctx - 1]
    else:  # a prefill chunk: consecutive positions ending at the context's last token
        n = draw(st.integers(1, ctx))
        positions = list(range(ctx - n, ctx))
    window = draw(st.one_of(st.none(), st.integers(1, ctx + 3)))  # shorter than, equal to, longer than the context
    return block_size, ctx, hkv, group, parts, positions, window


@settings(max_examples=80)
@given(partitioned_case(), st.integers(0, 2**16))
def test_partials_over_any_partition_merge_to_full_attention(case, seed):
    block_size, ctx, hkv, group, parts, positions, window = case
    d = 64
    paged = Paged(ctx, block_size, hkv, d, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(positions), hkv * group, d, generator=gen)
    q_pos = torch.tensor(positions, dtype=torch.int32)
    scale = 1 / math.sqrt(d)
    out, lse = run_partitioned(paged, q, q_pos, parts, "torch", scale, window)
    ref_out, ref_lse = full_attention(q, q_pos, paged.k, paged.v, scale, window)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@needs_triton
@settings(max_examples=12)
@given(partitioned_case(), st.integers(0, 2**16))
def test_triton_partials_over_any_partition_merge_to_full_attention(case, seed):
    block_size, ctx, hkv, group, parts, positions, window = case
    d = 64
    paged = Paged(ctx, block_size, hkv, d, seed=seed, device=DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(positions), hkv * group, d, generator=gen)
    q_pos = torch.tensor(positions, dtype=torch.int32)
    scale = 1 / math.sqrt(d)
    out, lse = run_partitioned(paged, q.to(DEVICE), q_pos.to(DEVICE), parts, "triton", scale, window)
    ref_out, ref_lse = full_attention(q, q_pos, paged.k, paged.v, scale, window)
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)


# ---- Triton kernels against the reference, irregular shapes ----------------------------------

TRITON_CASES = [
    # (ctx, block_size, hkv, group, head_dim, dtype, positions: "decode" | "prefill" | "zero")
    (1, 16, 1, 1, 64, torch.float32, "decode"),  # context of 1
    (16, 16, 2, 3, 64, torch.float32, "decode"),  # exactly one full block
    (37, 8, 2, 8, 64, torch.float32, "prefill"),  # partial tail, GQA 8
    (33, 16, 1, 3, 128, torch.float16, "decode"),  # fp16 cache, head_dim 128
    (20, 4, 2, 1, 128, torch.bfloat16, "prefill"),  # bf16 cache
    (9, 4, 1, 1, 64, torch.float32, "zero"),  # a query at position 0
]


@needs_triton
@pytest.mark.parametrize("ctx,block_size,hkv,group,d,dtype,kind", TRITON_CASES)
def test_triton_partial_attention_matches_reference(ctx, block_size, hkv, group, d, dtype, kind):
    paged = Paged(ctx, block_size, hkv, d, dtype=dtype, seed=ctx, device=DEVICE)
    positions = {"decode": [ctx - 1], "prefill": list(range(max(0, ctx - 5), ctx)), "zero": [0, ctx - 1]}[kind]
    q = torch.randn(len(positions), hkv * group, d, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    q_pos = torch.tensor(positions, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, len(positions)], dtype=torch.int32, device=DEVICE)
    logical = list(range(paged.num_logical))
    # Hold every other block here (the rest live "elsewhere"), to exercise gaps in positions.
    for held in (logical, logical[::2]):
        bt, bs, bl = paged.tables(held)
        o_t, l_t = partial_attention(q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, backend="triton")
        o_r, l_r = partial_attention(q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, backend="torch")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert o_t.dtype == dtype and l_t.dtype == torch.float32
        torch.testing.assert_close(o_t.float(), o_r.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(l_t, l_r, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_batch_with_empty_request_and_splits():
    from infinillm.kernels.triton_attention import partial_attention_triton

    hkv, group, d, bs = 2, 2, 64, 4
    a = Paged(11, bs, hkv, d, seed=1, device=DEVICE)
    # Request 0: 3 blocks here; request 1: no block here (its queries see nothing).
    bt = torch.full((2, 3), -1, dtype=torch.int32, device=DEVICE)
    st_ = torch.zeros((2, 3), dtype=torch.int32, device=DEVICE)
    bl = torch.zeros((2, 3), dtype=torch.int32, device=DEVICE)
    bt0, bs0, bl0 = a.tables(range(3))
    bt[0], st_[0], bl[0] = bt0[0], bs0[0], bl0[0]
    q = torch.randn(3, hkv * group, d).to(DEVICE)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEVICE)
    q_pos = torch.tensor([9, 10, 5], dtype=torch.int32, device=DEVICE)
    o_r, l_r = partial_attention(q, cu, q_pos, a.k_cache, a.v_cache, bt, st_, bl, backend="torch")
    for splits in (1, 2, 3):
        o_t, l_t = partial_attention_triton(q, cu, q_pos, a.k_cache, a.v_cache, bt, st_, bl, num_splits=splits)
        torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l_t, l_r, atol=1e-5, rtol=1e-5)
    assert torch.isinf(l_r[2]).all() and (o_r[2] == 0).all()  # request 1 sees no key here


@needs_triton
def test_triton_merge_matches_reference_and_handles_all_empty():
    gen = torch.Generator().manual_seed(3)
    outs = torch.randn(3, 5, 6, 64, generator=gen)
    lses = torch.randn(3, 5, 6, generator=gen)
    lses[:, 0] = -math.inf  # token 0: every partial empty
    lses[1, 1] = -math.inf  # token 1: one partial empty
    outs, lses = outs.to(DEVICE), lses.to(DEVICE)
    o_t, l_t = merge_partials(outs, lses, backend="triton")
    o_r, l_r = merge_partials(outs, lses, backend="torch")
    torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_t, l_r)
    assert not torch.isnan(o_t).any() and (o_t[0] == 0).all() and torch.isinf(l_t[0]).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_append_kv_writes_flat_slots(backend):
    kc = torch.zeros(4, 4, 2, 64, device=DEVICE)
    vc = torch.zeros(4, 4, 2, 64, device=DEVICE)
    k = torch.randn(3, 2, 64).to(DEVICE)
    v = torch.randn(3, 2, 64).to(DEVICE)
    slots = torch.tensor([5, 0, 15], dtype=torch.int64, device=DEVICE)  # block 1 offset 1, block 0 offset 0, block 3 offset 3
    append_kv(k, v, kc, vc, slots, backend=backend)
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(kc[0, 0], k[1]) and torch.equal(kc[3, 3], k[2])
    assert torch.equal(vc[3, 3], v[2])
    assert int((kc != 0).any(-1).any(-1).sum()) == 3  # nothing else written


# ---- edge cases and validation ---------------------------------------------------------------


def test_merge_of_all_empty_partials_is_zero_not_nan():
    outs = torch.zeros(2, 1, 2, 64)
    lses = torch.full((2, 1, 2), -math.inf)
    out, lse = merge_partials(outs, lses, backend="torch")
    assert not torch.isnan(out).any() and (out == 0).all() and torch.isinf(lse).all()


def test_query_sees_only_keys_at_or_before_its_position():
    p = Paged(8, 4, 1, 64, seed=5)
    q = torch.randn(1, 1, 64)
    bt, bs, bl = p.tables([1])  # the block holding positions 4..7
    cu = torch.tensor([0, 1], dtype=torch.int32)
    out, lse = partial_attention(q, cu, torch.tensor([3], dtype=torch.int32), p.k_cache, p.v_cache, bt, bs, bl)
    assert torch.isinf(lse).all() and (out == 0).all()  # every key here is in its future


def test_bad_shapes_are_refused_with_the_numbers():
    kc = torch.zeros(4, 4, 2, 64)
    q = torch.zeros(1, 3, 64)  # 3 heads over 2 KV heads
    i32 = torch.zeros((1, 1), dtype=torch.int32)
    with pytest.raises(ValidationError, match="num_heads=3 is invalid: must be a multiple of num_kv_heads=2"):
        partial_attention(q, torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32), kc, kc, i32, i32, i32)
    with pytest.raises(ValidationError, match=r"block_table\.dtype=torch\.int64 is invalid: must be int32"):
        partial_attention(torch.zeros(1, 2, 64), torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                          kc, kc, i32.long(), i32, i32)


def test_fused_cpu_path_matches_the_reference_on_prefill_with_blind_queries():
    from infinillm.kernels.reference import partial_attention_ref, partial_attention_torch

    p = Paged(70, 8, 2, 64, seed=11)
    logical = [4, 5, 6, 8]  # positions 32..55 and 64..69 held here
    bt, bs, bl = p.tables(logical)
    positions = list(range(10, 70))  # 60 queries: those before 32 see nothing here
    q = torch.randn(len(positions), 6, 64, generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, len(positions)], dtype=torch.int32)
    q_pos = torch.tensor(positions, dtype=torch.int32)
    o_r, l_r = partial_attention_ref(q, cu, q_pos, p.k_cache, p.v_cache, bt, bs, bl)
    o_t, l_t = partial_attention_torch(q, cu, q_pos, p.k_cache, p.v_cache, bt, bs, bl)
    torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_t, l_r, atol=1e-5, rtol=1e-5)
    assert torch.isinf(l_t[:22]).all() and (o_t[:22] == 0).all()  # positions 10..31


def test_decode_without_lse_gives_the_same_output():
    from infinillm.kernels.reference import partial_attention_ref, partial_attention_torch

    p = Paged(45, 4, 2, 64, seed=3)
    bt, bs, bl = p.tables(range(p.num_logical))
    q = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 1], dtype=torch.int32)
    q_pos = torch.tensor([44], dtype=torch.int32)
    o_r, _ = partial_attention_ref(q, cu, q_pos, p.k_cache, p.v_cache, bt, bs, bl)
    o_t, _ = partial_attention_torch(q, cu, q_pos, p.k_cache, p.v_cache, bt, bs, bl, need_lse=False)
    torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)


def test_a_step_plan_batches_decode_requests_exactly():
    from infinillm.kernels.reference import build_decode_plan, partial_attention_ref, partial_attention_torch

    # Three requests: two decoding (one holding only some blocks here), one prefill chunk of 3.
    a = Paged(45, 4, 2, 64, seed=5)
    k_cache, v_cache = a.k_cache.clone(), a.v_cache.clone()
    held = [list(range(a.num_logical)), [0, 2, 5, 9], list(range(a.num_logical))]
    m = max(len(h) for h in held)
    bt = torch.full((3, m), -1, dtype=torch.int32)
    bs_ = torch.zeros((3, m), dtype=torch.int32)
    bl = torch.zeros((3, m), dtype=torch.int32)
    for r, h in enumerate(held):
        t, s_, l_ = a.tables(h)
        bt[r, : len(h)], bs_[r, : len(h)], bl[r, : len(h)] = t[0], s_[0], l_[0]
    cu = torch.tensor([0, 1, 2, 5], dtype=torch.int32)
    q_pos = torch.tensor([44, 40, 20, 21, 22], dtype=torch.int32)
    q = torch.randn(5, 6, 64, generator=torch.Generator().manual_seed(7))
    plan = build_decode_plan(cu, q_pos, bt, bs_, bl, 4)
    assert plan.requests.tolist() == [0, 1] and plan.rows.tolist() == [0, 1]
    o_r, l_r = partial_attention_ref(q, cu, q_pos, k_cache, v_cache, bt, bs_, bl)
    o_t, l_t = partial_attention_torch(q, cu, q_pos, k_cache, v_cache, bt, bs_, bl, decode_plan=plan)
    torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_t, l_r, atol=1e-5, rtol=1e-5)
    o_n, _ = partial_attention_torch(q, cu, q_pos, k_cache, v_cache, bt, bs_, bl, decode_plan=plan, need_lse=False)
    torch.testing.assert_close(o_n, o_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("num_requests", [1, 3, 6])
def test_decode_requests_whose_keys_are_one_run_of_slots_read_views_exactly(window, num_requests):
    """Decode requests whose visible keys fill a run of consecutive slots (blocks side by side,
    in any order, the last one part full) read them as views of the cache: the same out and
    lse as the reference, with and without the lse; past ``_RUN_MAX_REQUESTS`` requests, or
    with a block out of the run, the batched gather takes over, with the same results."""
    from infinillm.kernels.reference import _RUN_MAX_REQUESTS, build_decode_plan, partial_attention_ref, partial_attention_torch

    gen = torch.Generator().manual_seed(11)
    block_size, hkv, group, d = 4, 2, 3, 64
    ctxs = [13, 16, 23, 28, 33, 36][:num_requests]  # the reversed ones (odd r) end on a full block
    blocks = [-(-c // block_size) for c in ctxs]
    num_blocks = sum(blocks) + 2
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen)
    m = max(blocks)
    bt = torch.full((num_requests, m), -1, dtype=torch.int32)
    bs_ = torch.zeros((num_requests, m), dtype=torch.int32)
    bl = torch.zeros((num_requests, m), dtype=torch.int32)
    first = 1
    for r, (ctx, nb) in enumerate(zip(ctxs, blocks)):
        ids = list(range(first, first + nb))
        if r % 2:
            ids.reverse()  # side by side in reverse, all full: still one run of slots
        first += nb
        for j, blk in enumerate(ids):
            bt[r, j], bs_[r, j], bl[r, j] = blk, j * block_size, min(block_size, ctx - j * block_size)
    cu = torch.arange(num_requests + 1, dtype=torch.int32)
    q_pos = torch.tensor([c - 1 for c in ctxs], dtype=torch.int32)
    q = torch.randn(num_requests, hkv * group, d, generator=gen)

    def check(bt):
        plan = build_decode_plan(cu, q_pos, bt, bs_, bl, block_size, window)
        o_r, l_r = partial_attention_ref(q, cu, q_pos, k_cache, v_cache, bt, bs_, bl, window=window)
        o_t, l_t = partial_attention_torch(q, cu, q_pos, k_cache, v_cache, bt, bs_, bl, decode_plan=plan, window=window)
        torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l_t, l_r, atol=1e-5, rtol=1e-5)
        o_n, _ = partial_attention_torch(q, cu, q_pos, k_cache, v_cache, bt, bs_, bl, decode_plan=plan,
                                         need_lse=False, window=window)
        torch.testing.assert_close(o_n, o_r, atol=1e-5, rtol=1e-5)
        return plan

    plan = check(bt)
    if num_requests <= _RUN_MAX_REQUESTS:
        assert plan.runs is not None and len(plan.runs) == num_requests
        for (start, count), ctx in zip(plan.runs, ctxs):
            assert count == (ctx if window is None else min(ctx, window))
    else:
        assert plan.runs is None
    broken = bt.clone()
    broken[0, 1] = num_blocks - 1  # one block of the first request away from its run
    assert check(broken).runs is None


# ---- sliding window: every path against the dense masked softmax ------------------------------

WINDOW_CASES = [
    # (ctx, block_size, hkv, group, window, positions: "decode" | "prefill" | "chunk")
    (70, 16, 2, 4, 24, "prefill"),  # window shorter than the context, not a multiple of block_size
    (70, 16, 2, 4, 24, "decode"),
    (70, 16, 2, 4, 24, "chunk"),  # a few queries: the reference's matrix products
    (45, 8, 1, 3, 45, "prefill"),  # window equal to the context
    (45, 8, 1, 3, 45, "decode"),
    (30, 4, 2, 1, 100, "prefill"),  # window longer than the context
    (30, 4, 2, 1, 100, "decode"),
    (33, 16, 2, 2, 1, "decode"),  # window 1: a query sees only itself
    (33, 16, 2, 2, 1, "prefill"),
    (50, 4, 1, 8, 7, "chunk"),  # GQA 8, window of 7 over blocks of 4
]


def window_case(ctx, block_size, hkv, group, kind, device="cpu"):
    """A paged context, queries at the given kind of positions, and their cu_q."""
    paged = Paged(ctx, block_size, hkv, 64, seed=ctx + block_size, device=device)
    positions = {"decode": [ctx - 1], "prefill": list(range(ctx)), "chunk": list(range(ctx - 5, ctx))}[kind]
    q = torch.randn(len(positions), hkv * group, 64, generator=torch.Generator().manual_seed(ctx))
    q_pos = torch.tensor(positions, dtype=torch.int32)
    cu = torch.tensor([0, len(positions)], dtype=torch.int32)
    return paged, q, q_pos, cu


@pytest.mark.parametrize("ctx,block_size,hkv,group,window,kind", WINDOW_CASES)
def test_torch_paths_match_dense_windowed_attention(ctx, block_size, hkv, group, window, kind):
    from infinillm.kernels.reference import build_decode_plan, partial_attention_ref, partial_attention_torch

    paged, q, q_pos, cu = window_case(ctx, block_size, hkv, group, kind)
    ref_out, ref_lse = full_attention(q, q_pos, paged.k, paged.v, 1 / 8, window)
    bt, bs, bl = paged.tables(range(paged.num_logical))
    results = {
        "reference": partial_attention_ref(q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, window=window),
        "torch": partial_attention_torch(q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, window=window),
    }
    if kind == "decode":
        plan = build_decode_plan(cu, q_pos, bt, bs, bl, block_size, window)
        results["plan"] = partial_attention_torch(
            q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, decode_plan=plan, window=window
        )
        out_sdpa, _ = partial_attention_torch(
            q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, decode_plan=plan, need_lse=False, window=window
        )
        torch.testing.assert_close(out_sdpa, ref_out, atol=1e-5, rtol=1e-5)
    for path, (out, lse) in results.items():
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=lambda m: f"{path}: {m}")
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5, msg=lambda m: f"{path}: {m}")


@needs_triton
@pytest.mark.parametrize("ctx,block_size,hkv,group,window,kind", WINDOW_CASES)
def test_triton_matches_dense_windowed_attention(ctx, block_size, hkv, group, window, kind):
    paged, q, q_pos, cu = window_case(ctx, block_size, hkv, group, kind, DEVICE)
    ref_out, ref_lse = full_attention(q, q_pos, paged.k, paged.v, 1 / 8, window)
    bt, bs, bl = paged.tables(range(paged.num_logical))
    out, lse = partial_attention(q.to(DEVICE), cu.to(DEVICE), q_pos.to(DEVICE), paged.k_cache, paged.v_cache, bt, bs, bl,
                                 backend="triton", window=window)
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)


def test_long_windowed_prefill_spans_query_slices():
    # 1100 queries: the fused path attends in two slices, each gathering only the blocks its
    # window reaches.
    from infinillm.kernels.reference import partial_attention_ref, partial_attention_torch

    paged, q, q_pos, cu = window_case(1100, 16, 1, 2, "prefill")
    window = 300
    bt, bs, bl = paged.tables(range(paged.num_logical))
    ref_out, ref_lse = full_attention(q, q_pos, paged.k, paged.v, 1 / 8, window)
    for fn in (partial_attention_ref, partial_attention_torch):
        out, lse = fn(q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, window=window)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def batch_tables(paged_list, held):
    """block_table/start/len [B, M] of request r holding blocks held[r] of paged_list[r]."""
    m = max(1, max(len(h) for h in held))
    bt = torch.full((len(held), m), -1, dtype=torch.int32)
    bs_ = torch.zeros((len(held), m), dtype=torch.int32)
    bl = torch.zeros((len(held), m), dtype=torch.int32)
    for r, (p, h) in enumerate(zip(paged_list, held)):
        if h:
            t, s_, l_ = p.tables(h)
            bt[r, : len(h)], bs_[r, : len(h)], bl[r, : len(h)] = t[0], s_[0], l_[0]
    return bt, bs_, bl


def test_a_windowed_step_plan_keeps_only_the_blocks_in_reach():
    from infinillm.kernels.reference import build_decode_plan, partial_attention_ref, partial_attention_torch

    # Four requests over one 90-token context in blocks of 8, window 20: three decoding (one
    # holding all blocks, one some, one only blocks its window does not reach), one prefill
    # chunk of 3.
    a = Paged(90, 8, 2, 64, seed=9)
    all_blocks = list(range(a.num_logical))  # 12 blocks
    held = [all_blocks, [0, 3, 8, 10], [0, 1, 2], all_blocks]
    bt, bs_, bl = batch_tables([a] * 4, held)
    cu = torch.tensor([0, 1, 2, 3, 6], dtype=torch.int32)
    q_pos = torch.tensor([89, 85, 60, 40, 41, 42], dtype=torch.int32)
    q = torch.randn(6, 6, 64, generator=torch.Generator().manual_seed(7))
    window = 20
    plan = build_decode_plan(cu, q_pos, bt, bs_, bl, 8, window)
    assert plan.requests.tolist() == [0, 1, 2] and plan.window == window
    # Position 89 reaches back to 70: blocks 8..11 (positions 64..89), 4 blocks of 8 = 32 slots
    # per request, not 12 blocks. Request 1 (85: 66..85) sees 66..71 of block 8 and 80..85 of
    # block 10; request 2 (60: 41..60) holds only 0..23.
    assert tuple(plan.slots.shape) == (3, 32)
    assert plan.visible.sum(dim=1).tolist() == [20, 6 + 6, 0]
    assert plan.seen.tolist() == [True, True, False]
    o_r, l_r = partial_attention_ref(q, cu, q_pos, a.k_cache, a.v_cache, bt, bs_, bl, window=window)
    o_t, l_t = partial_attention_torch(q, cu, q_pos, a.k_cache, a.v_cache, bt, bs_, bl, decode_plan=plan, window=window)
    torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l_t, l_r, atol=1e-5, rtol=1e-5)
    assert torch.isinf(l_t[2]).all() and (o_t[2] == 0).all()  # request 2 sees nothing here
    ref_out, _ = full_attention(q[:1], q_pos[:1], a.k, a.v, 1 / 8, window)
    torch.testing.assert_close(o_t[:1], ref_out, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_window_with_splits_and_an_empty_request():
    from infinillm.kernels.triton_attention import partial_attention_triton

    a = Paged(50, 4, 2, 64, seed=2, device=DEVICE)
    held = [list(range(a.num_logical)), [0, 1, 2], list(range(0, a.num_logical, 3))]
    bt, bs_, bl = (t.to(DEVICE) for t in batch_tables([a] * 3, held))
    cu = torch.tensor([0, 2, 3, 5], dtype=torch.int32, device=DEVICE)
    q_pos = torch.tensor([48, 49, 40, 30, 31], dtype=torch.int32, device=DEVICE)  # request 1's window (31..40) misses 0..11
    q = torch.randn(5, 4, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    o_r, l_r = partial_attention(q, cu, q_pos, a.k_cache, a.v_cache, bt, bs_, bl, backend="torch", window=10)
    assert torch.isinf(l_r[2]).all()
    for splits in (1, 2, 5):
        o_t, l_t = partial_attention_triton(q, cu, q_pos, a.k_cache, a.v_cache, bt, bs_, bl, num_splits=splits, window=10)
        torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l_t, l_r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "16"])
def test_a_bad_window_is_refused_naming_value_and_limit(window):
    p = Paged(8, 4, 1, 64)
    bt, bs, bl = p.tables([0, 1])
    with pytest.raises(ValidationError) as e:
        partial_attention(torch.zeros(1, 1, 64), torch.tensor([0, 1], dtype=torch.int32), torch.tensor([7], dtype=torch.int32),
                          p.k_cache, p.v_cache, bt, bs, bl, window=window)
    assert str(e.value) == f"window={window!r} is invalid: must be an int >= 1, or None for full causal attention"


def test_a_plan_for_another_window_is_refused():
    from infinillm.kernels.reference import build_decode_plan

    p = Paged(8, 4, 1, 64)
    bt, bs, bl = p.tables([0, 1])
    cu, q_pos = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([7], dtype=torch.int32)
    plan = build_decode_plan(cu, q_pos, bt, bs, bl, 4, window=4)
    with pytest.raises(ValidationError, match="decode_plan.window=4 is invalid: must equal window=None"):
        partial_attention(torch.zeros(1, 1, 64), cu, q_pos, p.k_cache, p.v_cache, bt, bs, bl, decode_plan=plan)


@pytest.mark.parametrize("ctx,first,block_size,hkv,group", [
    (2600, 1000, 16, 3, 3),  # a chunk after 1,000 tokens, across query slices, GQA 3
    (1500, 0, 7, 2, 1),  # the whole prompt, blocks that do not divide the slice
    (300, 283, 16, 1, 4),  # a short chunk starting inside a block
])
def test_cpu_causal_split_matches_dense_attention(ctx, first, block_size, hkv, group):
    """A prefill chunk whose keys are all here (the causal split: the chunk's own keys under the
    kernel's causal mask, earlier ones unmasked, merged by log-sum-exp) against plain attention."""
    from infinillm.kernels.reference import partial_attention_torch

    paged = Paged(ctx, block_size, hkv, 64, seed=ctx)
    positions = list(range(first, ctx))
    q = torch.randn(len(positions), hkv * group, 64, generator=torch.Generator().manual_seed(first))
    q_pos = torch.tensor(positions, dtype=torch.int32)
    cu = torch.tensor([0, len(positions)], dtype=torch.int32)
    bt, bs, bl = paged.tables(list(range(paged.num_logical)))
    out, lse = partial_attention_torch(q, cu, q_pos, paged.k_cache, paged.v_cache, bt, bs, bl, scale=1 / 8)
    ref_out, ref_lse = full_attention(q, q_pos, paged.k, paged.v, 1 / 8)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("d", [64, 128, 96])
def test_the_cpu_decode_kernel_matches_the_reference(monkeypatch, window, group, d):
    """The CPU decode-attention kernel (``csrc/attention_cpu.hpp``: keys read where they lie, a
    vectorised exp) against the reference, for requests seeing all, some (a window, blocks
    elsewhere) or none of their keys here, its requests split over threads or not; head sizes
    of 64 and 128 take the compiled layouts (scores 16 keys at a time), 96 the general loop."""
    from infinillm.kernels import reference
    from infinillm.kernels.reference import build_decode_plan, partial_attention_ref, partial_attention_torch

    if reference._quant_cpu is None or not reference._quant_cpu.attention_supported(2 * group, 2, d):
        pytest.skip("the CPU decode kernel is not built or this CPU has no AVX-512")
    gen = torch.Generator().manual_seed(group)
    block_size, hkv = 4, 2
    k_cache = torch.randn(40, block_size, hkv, d, generator=gen)
    v_cache = torch.randn(40, block_size, hkv, d, generator=gen)
    held = [[3, 7, 1, 9, 12], [20, 21], [], [5, 30, 31, 32, 33, 34]]  # request 2 holds nothing here
    ctx = [19, 6, 9, 24]
    m = max(len(h) for h in held)
    bt = torch.full((4, m), -1, dtype=torch.int32)
    bs_ = torch.zeros((4, m), dtype=torch.int32)
    bl = torch.zeros((4, m), dtype=torch.int32)
    for r, h in enumerate(held):
        for j, blk in enumerate(h):
            bt[r, j], bs_[r, j], bl[r, j] = blk, j * block_size, min(block_size, ctx[r] - 1 - j * block_size)
    cu = torch.arange(5, dtype=torch.int32)
    q_pos = torch.tensor([c - 1 for c in ctx], dtype=torch.int32)
    q = torch.randn(4, hkv * group, d, generator=gen)
    o_r, l_r = partial_attention_ref(q, cu, q_pos, k_cache, v_cache, bt, bs_, bl, window=window)
    plan = build_decode_plan(cu, q_pos, bt, bs_, bl, block_size, window)
    for work in (0, 1 << 40):  # split over the threads, then not
        monkeypatch.setattr(reference, "_CPU_PARALLEL_WORK", work)
        o_t, l_t = partial_attention_torch(q, cu, q_pos, k_cache, v_cache, bt, bs_, bl, window=window, decode_plan=plan)
        torch.testing.assert_close(o_t, o_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l_t, l_r, atol=1e-5, rtol=1e-5)
    assert torch.isinf(l_t[2]).all() and (o_t[2] == 0).all()
