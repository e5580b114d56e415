"""DistAttention's arithmetic: partial attention over paged KV, the exact log-sum-exp merge,
and KV append; Triton kernels for CUDA and a torch reference of each (the CPU path).

Importing this package never needs Triton: where it is missing the torch path serves.
"""

from __future__ import annotations

from .attention import append_kv, merge_partials, partial_attention
from .backend import BACKENDS, Backend, resolve_backend, triton_available
from .reference import append_kv_ref, merge_partials_ref, partial_attention_ref

__all__ = [
    "partial_attention",
    "merge_partials",
    "append_kv",
    "partial_attention_ref",
    "merge_partials_ref",
    "append_kv_ref",
    "BACKENDS",
    "Backend",
    "resolve_backend",
    "triton_available",
]
