"""What the simulator simulates: GPUs, their links, and the models' shapes.

GPU figures are the vendors' datasheet peaks (bf16 dense tensor FLOP/s, HBM bandwidth, NVLink
bandwidth per direction); the cost model (``cost.py``) scales them by the fractions real kernels
reach. docs/SIMULATION.md sets the model's figures beside published measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError

__all__ = ["GPU", "GPUS", "ModelShape", "MODELS", "gpu", "model_shape"]


@dataclass(frozen=True, slots=True)
class GPU:
    """One accelerator and the links around it.

    ``nvlink_bandwidth`` and ``net_bandwidth`` are bytes/s in one direction per GPU (inside a
    node over NVLink/NVSwitch; across nodes over the GPU's own InfiniBand NIC). Latencies are
    per ring hop of a collective (``*_hop_s``) and per point-to-point message (``*_message_s``:
    launch, synchronisation and the first byte).
    """

    name: str
    flops: float  # bf16 dense tensor FLOP/s
    memory_bandwidth: float  # HBM bytes/s
    memory_bytes: float
    nvlink_bandwidth: float
    net_bandwidth: float
    gpus_per_node: int = 8
    nvlink_hop_s: float = 2e-6
    net_hop_s: float = 6e-6
    nvlink_message_s: float = 10e-6
    net_message_s: float = 20e-6


GPUS: dict[str, GPU] = {
    # NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOPS bf16 dense, 2,039 GB/s HBM2e, NVLink 600 GB/s
    # (both directions); DGX A100: one HDR 200 Gb/s InfiniBand NIC per GPU.
    "a100": GPU("A100-SXM4-80GB", 312e12, 2.039e12, 80e9, 300e9, 25e9),
    # NVIDIA H100 datasheet (SXM5 80GB): 989 TFLOPS bf16 dense, 3.35 TB/s HBM3, NVLink 900 GB/s;
    # DGX H100: one NDR 400 Gb/s NIC per GPU.
    "h100": GPU("H100-SXM5-80GB", 989e12, 3.35e12, 80e9, 450e9, 50e9),
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A decoder-only transformer's shape (LLaMA family: gated MLP, RMSNorm, untied head)."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer: q, k, v, o projections and the gated MLP."""
        kv = self.num_kv_heads * self.head_dim
        return self.hidden * (2 * self.hidden + 2 * kv) + 3 * self.hidden * self.intermediate

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + 2 * self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """k and v of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


MODELS: dict[str, ModelShape] = {
    # Touvron et al. 2023, "Llama 2" (Table 1 and the released configs).
    "llama2-7b": ModelShape("LLaMA2-7B", 32, 4096, 32, 32, 11008, 32000),
    "llama2-13b": ModelShape("LLaMA2-13B", 40, 5120, 40, 40, 13824, 32000),
    "llama2-70b": ModelShape("LLaMA2-70B", 80, 8192, 64, 8, 28672, 32000),
}


def gpu(name: str) -> GPU:
    try:
        return GPUS[str(name).lower()]
    except KeyError:
        raise ValidationError("gpu", name, f"must be one of {', '.join(GPUS)}") from None


def model_shape(name: str) -> ModelShape:
    try:
        return MODELS[str(name).lower()]
    except KeyError:
        raise ValidationError("model", name, f"must be one of {', '.join(MODELS)}") from None
