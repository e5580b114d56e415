"""Weights kept in their GGUF quantised form, for CPU decode steps.

A decode step on the CPU reads every weight once and is bound by memory bandwidth: in fp32,
SmolLM2-135M is 540 MB a token. ``QuantWeight`` keeps a GGUF Q4_1 or Q8_0 matrix repacked as
structure-of-arrays (``kernels/csrc/quant_cpu.hpp``) and multiplies with it directly, reading
0.75 (Q4_1) or 1.125 (Q8_0) bytes a weight; the products are the fp32 products of the
dequantised weights up to summation order. The model uses them for steps of up to
``QUANT_MAX_TOKENS`` tokens (decode batches) and its fp32 weights for prefill
(``LlamaModel.attach_quantized``). Large products split their output rows over the CPU's cores
(a small pool of threads in ``quant_cpu.hpp``, one product at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ValidationError
from .kernels.reference import CPU_THREADS

__all__ = ["QuantWeight", "QUANT_KINDS", "quant_kernels_available"]

QUANT_KINDS = ("Q4_1", "Q8_0")
_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
# Products of at least this many multiply-adds split their rows over the CPU's cores (below,
# handing rows to another thread costs more than it saves: a decode of one token's smaller
# projections).
PARALLEL_MIN_MACS = 1 << 21
THREADS = CPU_THREADS

try:
    from .kernels import _quant_cpu
except ImportError:  # the extension is not built
    _quant_cpu = None


def quant_kernels_available() -> bool:
    return _quant_cpu is not None


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """A quantised weight [out_features, in_features]: per 32-weight block a scale ``d``
    (and a minimum ``m`` for Q4_1), and the packed quants ``qs``."""

    kind: str
    d: torch.Tensor  # [O, K/32] f32
    m: torch.Tensor | None  # [O, K/32] f32 (Q4_1)
    qs: torch.Tensor  # [O, K/2] uint8 (Q4_1) or [O, K] int8 (Q8_0)

    @property
    def out_features(self) -> int:
        return self.d.shape[0]

    @property
    def in_features(self) -> int:
        return self.d.shape[1] * 32

    @staticmethod
    def from_gguf_blocks(kind: str, raw: np.ndarray, rows: int, cols: int) -> QuantWeight:
        """From a GGUF tensor's raw bytes (ggml blocks of 32 along each row)."""
        if kind not in QUANT_KINDS:
            raise ValidationError("kind", kind, f"must be one of {QUANT_KINDS}")
        if cols % 32:
            raise ValidationError("cols", cols, "must be a multiple of 32")
        nb = cols // 32
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, nb, _BLOCK_BYTES[kind])
        d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
        if kind == "Q4_1":
            m = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
            qs = blocks[:, :, 4:20].reshape(rows, nb * 16).copy()
            return QuantWeight(kind, torch.from_numpy(d), torch.from_numpy(m), torch.from_numpy(qs))
        qs = blocks[:, :, 2:34].reshape(rows, nb * 32).copy().view(np.int8)
        return QuantWeight(kind, torch.from_numpy(d), None, torch.from_numpy(qs))

    def take_rows(self, index: np.ndarray) -> QuantWeight:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
        m = None if self.m is None else self.m[idx].contiguous()
        return QuantWeight(self.kind, self.d[idx].contiguous(), m, self.qs[idx].contiguous())

    @staticmethod
    def concat(parts: list[QuantWeight]) -> QuantWeight | None:
        """Row-wise concatenation (fused projections); None if the parts differ in kind."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1 or len({p.in_features for p in parts}) != 1:
            return None
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return QuantWeight(parts[0].kind, torch.cat([p.d for p in parts]), m, torch.cat([p.qs for p in parts]))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [O, K] (for tests)."""
        o, nb = self.d.shape
        if self.kind == "Q4_1":
            q = self.qs.view(o, nb, 16)
            vals = torch.cat([(q & 15), (q >> 4)], dim=-1).float()  # [O, NB, 32]
            return (vals * self.d[..., None] + self.m[..., None]).reshape(o, nb * 32)
        return (self.qs.view(o, nb, 32).float() * self.d[..., None]).reshape(o, nb * 32)

    def matmul(self, x: torch.Tensor, *, threads: int | None = None, min_macs: int | None = None) -> torch.Tensor:
        """x [T, K] float32 (CPU) -> x @ W.T [T, O] float32, its rows over ``threads`` threads
        (default: the CPUs this process may use) when it has at least ``min_macs``
        multiply-adds (default ``PARALLEL_MIN_MACS``)."""
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        threads = THREADS if threads is None else threads
        min_macs = PARALLEL_MIN_MACS if min_macs is None else min_macs
        if self.kind == "Q4_1":
            _quant_cpu.q4_1_matmul(x.numpy(), self.d.numpy(), self.m.numpy(), self.qs.numpy(), y.numpy(), threads, min_macs)
        else:
            _quant_cpu.q8_0_matmul(x.numpy(), self.d.numpy(), self.qs.numpy(), y.numpy(), threads, min_macs)
        return y
