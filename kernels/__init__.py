"""DistAttention's arithmetic: partial attention over paged KV, the exact log-sum-exp merge,
and KV append; Triton kernels for CUDA and a torch reference of each (the CPU path).

Importing this package never needs Triton: where it is missing the torch path serves.
"""

from __future__ import annotations

from .backend import BACKENDS, Backend, resolve_backend, triton_available

__all__ = ["BACKENDS", "Backend", "resolve_backend", "triton_available"]
