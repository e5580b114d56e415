"""The public DistAttention operations: shape and dtype checks, then the chosen backend.

``partial_attention``  one instance's share of attention: (out, lse) over the blocks it holds,
                       causal by position, optionally within a sliding window
``merge_partials``     the exact log-sum-exp merge of partials from several instances
``append_kv``          write new k, v into the paged caches

Shapes are documented in ``reference.py``. ``backend`` is ``"auto"`` (Triton on CUDA, torch
elsewhere), ``"torch"`` or ``"triton"``; ``INFINILLM_KERNELS`` sets the default.
"""

from __future__ import annotations

import torch

from ..errors import ValidationError
from .backend import resolve_backend
from .reference import DecodePlan, append_kv_ref, merge_partials_ref, partial_attention_torch

__all__ = ["partial_attention", "merge_partials", "append_kv"]

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32,)


def _check(cond: bool, field: str, value, allowed: str) -> None:
    if not cond:
        raise ValidationError(field, value, allowed)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _check(k_cache.dim() == 4, "k_cache.shape", tuple(k_cache.shape), "must be [num_blocks, block_size, num_kv_heads, head_dim]")
    _check(v_cache.shape == k_cache.shape, "v_cache.shape", tuple(v_cache.shape), f"must equal k_cache.shape {tuple(k_cache.shape)}")
    _check(k_cache.dtype in _CACHE_DTYPES, "k_cache.dtype", k_cache.dtype, "must be float32, float16 or bfloat16")
    _check(v_cache.dtype == k_cache.dtype, "v_cache.dtype", v_cache.dtype, f"must equal k_cache.dtype {k_cache.dtype}")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous(), "k_cache", "non-contiguous", "must be contiguous")


def partial_attention(
    q: torch.Tensor,
    cu_q: torch.Tensor,
    q_pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    block_start: torch.Tensor,
    block_len: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str | None = None,
    decode_plan: DecodePlan | None = None,
    need_lse: bool = True,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of packed queries over the blocks this instance holds.

    Returns ``out`` [total_q, num_heads, head_dim] (q's dtype, normalised over the visible keys
    here) and ``lse`` [total_q, num_heads] fp32 (natural log; -inf where no key is visible).
    ``window`` (an int >= 1, or None for full causal attention) is the sliding window: a query
    at ``q_pos`` sees keys at ``q_pos - window < k_pos <= q_pos``.
    ``decode_plan`` (torch path only) is the step's ``build_decode_plan`` for the same window,
    reused across layers; ``need_lse=False`` says the caller will not merge (the torch path may
    then leave the lse of decode rows unspecified).
    """
    _check(window is None or (isinstance(window, int) and not isinstance(window, bool) and window >= 1),
           "window", window, "must be an int >= 1, or None for full causal attention")
    _check(decode_plan is None or decode_plan.window == window, "decode_plan.window",
           None if decode_plan is None else decode_plan.window, f"must equal window={window}")
    _check_cache(k_cache, v_cache)
    _check(q.dim() == 3, "q.shape", tuple(q.shape), "must be [total_q, num_heads, head_dim]")
    total_q, num_heads, head_dim = q.shape
    _, _, num_kv_heads, cache_dim = k_cache.shape
    _check(head_dim == cache_dim, "q.shape[2]", head_dim, f"must equal the cache's head_dim {cache_dim}")
    _check(num_heads % num_kv_heads == 0, "num_heads", num_heads, f"must be a multiple of num_kv_heads={num_kv_heads}")
    _check(q.dtype in _CACHE_DTYPES, "q.dtype", q.dtype, "must be float32, float16 or bfloat16")
    for name, t in (("cu_q", cu_q), ("q_pos", q_pos), ("block_table", block_table),
                    ("block_start", block_start), ("block_len", block_len)):
        _check(t.dtype in _INDEX_DTYPES, f"{name}.dtype", t.dtype, "must be int32")
        _check(t.device == q.device, f"{name}.device", t.device, f"must be {q.device}")
    _check(cu_q.dim() == 1 and cu_q.numel() >= 1, "cu_q.shape", tuple(cu_q.shape), "must be [B+1]")
    batch = cu_q.numel() - 1
    _check(block_table.dim() == 2 and block_table.shape[0] == batch, "block_table.shape", tuple(block_table.shape),
           f"must be [B={batch}, max_blocks]")
    _check(block_start.shape == block_table.shape, "block_start.shape", tuple(block_start.shape),
           f"must equal block_table.shape {tuple(block_table.shape)}")
    _check(block_len.shape == block_table.shape, "block_len.shape", tuple(block_len.shape),
           f"must equal block_table.shape {tuple(block_table.shape)}")
    _check(q_pos.shape == (total_q,), "q_pos.shape", tuple(q_pos.shape), f"must be [total_q={total_q}]")
    if resolve_backend(q.device.type, backend) == "triton":
        _check(head_dim & (head_dim - 1) == 0 and head_dim >= 16, "head_dim", head_dim,
               "must be a power of two >= 16 for the Triton kernels")
        from .triton_attention import partial_attention_triton

        return partial_attention_triton(
            q.contiguous() if q.stride(2) != 1 else q, cu_q, q_pos, k_cache, v_cache,
            block_table.contiguous(), block_start.contiguous(), block_len.contiguous(), scale, window=window,
        )
    return partial_attention_torch(
        q, cu_q, q_pos, k_cache, v_cache, block_table, block_start, block_len, scale, decode_plan, need_lse, window
    )


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, *, backend: str | None = None):
    """Exact merge of P partials: outs [P, total_q, H, D], lses [P, total_q, H] fp32."""
    _check(outs.dim() == 4, "outs.shape", tuple(outs.shape), "must be [P, total_q, num_heads, head_dim]")
    _check(lses.shape == outs.shape[:3], "lses.shape", tuple(lses.shape), f"must be {tuple(outs.shape[:3])}")
    _check(lses.dtype == torch.float32, "lses.dtype", lses.dtype, "must be float32")
    _check(outs.shape[0] >= 1, "outs.shape[0]", outs.shape[0], "must be >= 1 partial")
    if resolve_backend(outs.device.type, backend) == "triton":
        head_dim = outs.shape[3]
        _check(head_dim & (head_dim - 1) == 0, "head_dim", head_dim, "must be a power of two for the Triton kernels")
        from .triton_attention import merge_partials_triton

        return merge_partials_triton(outs, lses)
    return merge_partials_ref(outs, lses)


def append_kv(k, v, k_cache, v_cache, slot_mapping, *, backend: str | None = None) -> None:
    """Write k, v [n, num_kv_heads, head_dim] to flat slots ``block * block_size + offset``."""
    _check_cache(k_cache, v_cache)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    _check(k.shape == v.shape and k.dim() == 3 and tuple(k.shape[1:]) == (num_kv_heads, head_dim), "k.shape",
           tuple(k.shape), f"must be [n, {num_kv_heads}, {head_dim}] like v")
    _check(slot_mapping.shape == (k.shape[0],), "slot_mapping.shape", tuple(slot_mapping.shape), f"must be [{k.shape[0]}]")
    _check(slot_mapping.dtype in (torch.int32, torch.int64), "slot_mapping.dtype", slot_mapping.dtype, "must be int32 or int64")
    if resolve_backend(k.device.type, backend) == "triton":
        from .triton_attention import append_kv_triton

        k = k.to(k_cache.dtype)
        v = v.to(v_cache.dtype)
        if not (k[0:1].is_contiguous() and v[0:1].is_contiguous()) or k.stride(1) != head_dim or v.stride(1) != head_dim:
            k, v = k.contiguous(), v.contiguous()
        append_kv_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    append_kv_ref(k, v, k_cache, v_cache, slot_mapping)
