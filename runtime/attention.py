"""The DistAttention backend the model calls once per layer, and the paged KV cache.

The model never computes attention itself: each layer hands ``(q, k, v)`` of the step's packed
tokens to ``backend.forward(layer, q, k, v)``. The backend

1. writes the new k, v into the paged cache at the slots the block tables give
   (``append_kv``);
2. computes this instance's *partial* attention over the blocks it holds of each request
   (``partial_attention``: out and log-sum-exp);
3. merges the partials of every instance that holds blocks of the step's requests
   (``merge_partials``). With one instance there is one partial; the step's
   ``remote`` attention peers (many instances) each contribute theirs::

       request r: blocks on A (home) and B
       A: q,k,v ──► append_kv(A) ──► partial(A) ─┐
                └─ q ──(transport)──► partial(B) ─┴─► merge ──► out

``AttentionMetadata`` is what the engine builds once per step from the scheduler core's block
tables; it is the boundary between scheduling and the kernels.

Sliding-window models (Mistral v0.1; Qwen2 with ``use_sliding_window``) give the backend each
layer's window (``ModelArgs.layer_windows``); every partial of layer i, local or remote, sees
only keys at ``q_pos - window_i < k_pos <= q_pos``, so the merge stays exact. Blocks wholly
before the window stay allocated (the block pool does not free them early); the kernels skip
them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .kernels import append_kv, merge_partials, partial_attention, resolve_backend
from .kernels.reference import DecodePlan, build_decode_plan, decode_attention_sdpa, select_plan

__all__ = ["KVCache", "AttentionMetadata", "DistAttentionBackend", "RemotePartial"]


class KVCache:
    """The paged KV cache of one instance: per layer ``[num_blocks, block_size, Hkv, D]``."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype


@dataclass(slots=True)
class AttentionMetadata:
    """One step's attention inputs for the local instance (tensors on the model's device).

    ``cu_q`` [B+1] int32 offsets of each request's tokens in the packed batch; ``q_pos`` [T]
    int32 absolute positions; ``block_table``/``block_start``/``block_len`` [B, M] int32: each
    request's blocks *on this instance*; ``slot_mapping`` [n] int64: where the new k, v of the
    rows ``kv_rows`` [n] go in this instance's cache (``kv_rows`` None: every row, n = T; rows
    whose slot is on a creditor travel with its query instead).
    """

    cu_q: torch.Tensor
    q_pos: torch.Tensor
    block_table: torch.Tensor
    block_start: torch.Tensor
    block_len: torch.Tensor
    slot_mapping: torch.Tensor
    kv_rows: torch.Tensor | None = None


class RemotePartial(Protocol):
    """Partial attention of the step's queries over blocks another instance holds, with the
    layer's sliding window (the peer serves the same model, so it knows each layer's).
    ``start`` sends the layer's query and returns a callable that waits for the partial:
    (out [T, H, D] fp32, lse [T, H] fp32), -inf rows where the peer holds nothing
    (``cluster.RemoteAttention``)."""

    def start(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]: ...


class DistAttentionBackend:
    """Per-step attention: local paged partial attention, merged with remote partials.

    ``layer_windows`` holds each layer's sliding window (None: full causal attention); None or
    empty means full attention in every layer.
    """

    def __init__(
        self,
        cache: KVCache,
        metadata: AttentionMetadata,
        scale: float | None = None,
        remote: list[RemotePartial] | None = None,
        backend: str | None = None,
        layer_windows: Sequence[int | None] | None = None,
    ) -> None:
        self.cache = cache
        self.meta = metadata
        self.scale = scale
        self.remote = remote or []
        self.backend = backend
        self.layer_windows = tuple(layer_windows or ())
        # The torch path attends all decode requests at once from a plan that depends only on
        # the block tables and the window: build one per distinct window once per step, not
        # once per layer.
        self._decode_plans: dict[int | None, DecodePlan] = {}
        self._fast_decode = False
        if resolve_backend(metadata.q_pos.device.type, backend) == "torch":
            m = metadata
            self._decode_plans = {
                w: build_decode_plan(m.cu_q, m.q_pos, m.block_table, m.block_start, m.block_len, cache.block_size, w)
                for w in set(self.layer_windows) or {None}
            }
            # A pure decode step whose keys are all here (the common case of one instance) takes
            # a short path: the inputs were checked once, here, so each layer is four torch
            # operations (append k, append v, gather, fused SDPA) instead of the general path.
            # (Every row a single-query request means the plan's rows are 0..T-1, in order.)
            self._fast_decode = not self.remote and all(
                p.rows.numel() == m.q_pos.numel() and bool(p.seen.all()) for p in self._decode_plans.values()
            )
            if self._fast_decode:
                self._slot_index = m.slot_mapping.long()
        # With remote partials, only the rows of spread requests need a log-sum-exp: the decode
        # rows of requests whose every block is here keep the fused path.
        self._local_plans: dict[int | None, DecodePlan] = {}
        if self.remote and self._decode_plans:
            spread = torch.zeros(metadata.q_pos.numel(), dtype=torch.bool, device=metadata.q_pos.device)
            for peer in self.remote:
                spread[peer.rows] = True
            for w, plan in list(self._decode_plans.items()):
                here = ~spread[plan.rows]
                local = select_plan(plan, here)
                if local.rows.numel() and bool(local.seen.all()):
                    self._local_plans[w] = local
                    self._decode_plans[w] = select_plan(plan, ~here)

    def window(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: full causal attention)."""
        return self.layer_windows[layer] if self.layer_windows else None

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (after RoPE) -> attention output [T, H, D]."""
        m = self.meta
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        window = self.window(layer)
        if self._fast_decode:
            return self._decode_layer(q, k, v, kc, vc, self._decode_plans[window])
        # Send first, so that the creditors compute while this instance does.
        pending = [peer.start(layer, q, k, v) for peer in self.remote]
        if m.kv_rows is None:
            append_kv(k, v, kc, vc, m.slot_mapping, backend=self.backend)
        elif m.kv_rows.numel():
            append_kv(k.index_select(0, m.kv_rows), v.index_select(0, m.kv_rows), kc, vc, m.slot_mapping,
                      backend=self.backend)
        out, lse = partial_attention(
            q, m.cu_q, m.q_pos, kc, vc, m.block_table, m.block_start, m.block_len, self.scale,
            backend=self.backend, decode_plan=self._decode_plans.get(window), need_lse=bool(self.remote), window=window,
        )
        local = self._local_plans.get(window)
        if local is not None:  # decode rows with every key here: the fused path
            out[local.rows] = decode_attention_sdpa(q.index_select(0, local.rows), local, kc, vc, self.scale).to(out.dtype)
            lse[local.rows] = 0.0  # any finite lse: no remote partial has these rows (-inf), so the merge keeps out
        if not self.remote:
            return out
        outs, lses = [out.float()], [lse]  # partials merge in fp32
        for wait in pending:
            o, s = wait()
            outs.append(o)
            lses.append(s)
        merged, _ = merge_partials(torch.stack(outs), torch.stack(lses), backend=self.backend)
        return merged.to(q.dtype)

    def _decode_layer(self, q, k, v, kc, vc, plan: DecodePlan) -> torch.Tensor:
        num_blocks, block_size, num_kv_heads, head_dim = kc.shape
        kc.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, self._slot_index, k.to(kc.dtype))
        vc.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, self._slot_index, v.to(vc.dtype))
        return decode_attention_sdpa(q, plan, kc, vc, self.scale).to(q.dtype)
