"""The roofline cost model: how long a step, a message or a block copy takes.

Every figure is the larger of bytes over bandwidth and FLOPs over peak, scaled by the fractions
of the datasheet peaks that real kernels reach (``Efficiency``), plus link latencies:

- **dense layers** of a step with T tokens (S of them sampled): weights (and activations) read
  once per step over HBM bandwidth, ``2 * T * params`` FLOPs over peak (the output projection
  only for the S sampled rows), split over the instance's ``tp`` GPUs; tensor parallelism adds
  two all-reduces of ``T * hidden`` values per layer (ring inside a node over NVLink, then
  across nodes over each GPU's NIC, hierarchical as NCCL does it), which is what makes one
  instance over a whole cluster slow;
- **attention** over a part of a request's KV held on one instance: its k/v bytes over HBM
  bandwidth, ``4 * queries * keys * heads * head_dim`` FLOPs per layer over peak (causal: a
  prefill chunk sees half of itself);
- **communication** (DistAttention): one message per creditor per layer carrying the queries
  (and the new k/v when the tail block is lent) and bringing back outputs and log-sum-exps:
  message latency plus bytes over the link (NVLink inside a node, InfiniBand across);
- **migration**: a block's k/v over the link between the two instances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ValidationError
from .hardware import GPU, ModelShape

__all__ = ["Efficiency", "CostModel"]


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Fractions of the datasheet peaks that kernels reach (docs/SIMULATION.md checks them
    against published measurements), and the fixed host time of a step (scheduling, launch)."""

    gemm_flops: float = 0.7
    attention_flops: float = 0.6
    memory_bandwidth: float = 0.8
    link_bandwidth: float = 0.8
    step_overhead_s: float = 0.5e-3

    def __post_init__(self) -> None:
        for name in ("gemm_flops", "attention_flops", "memory_bandwidth", "link_bandwidth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValidationError(name, v, "must be a fraction of the peak in (0, 1]")
        v = self.step_overhead_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
            raise ValidationError("step_overhead_s", v, "must be a finite number of seconds >= 0")


class CostModel:
    """Times of one instance of ``tp`` GPUs (more than a node's GPUs spans several nodes)
    serving ``model`` on ``gpu``."""

    def __init__(self, gpu: GPU, model: ModelShape, tp: int = 1, efficiency: Efficiency | None = None) -> None:
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValidationError("tp", tp, "must be an integer >= 1")
        self.gpu = gpu
        self.model = model
        self.tp = tp
        self.eff = efficiency or Efficiency()
        m = model
        self._layer_flops_per_token = 2.0 * m.layer_params * m.num_layers
        self._head_flops_per_row = 2.0 * m.vocab * m.hidden
        self._weight_bytes = float((m.num_layers * m.layer_params + m.vocab * m.hidden) * m.dtype_bytes)
        self._act_bytes_per_token = float(m.num_layers * (6 * m.hidden + 3 * m.intermediate) * m.dtype_bytes)
        self._flops = gpu.flops * tp
        self._bandwidth = gpu.memory_bandwidth * tp * self.eff.memory_bandwidth
        self._attn_flops_per_qk = 4.0 * m.num_heads * m.head_dim * m.num_layers
        self._kv_bytes = float(m.kv_bytes_per_token)
        self.query_bytes_per_layer = float(m.num_heads * m.head_dim * m.dtype_bytes)  # one token's q
        self.result_bytes_per_layer = float(m.num_heads * (m.head_dim * m.dtype_bytes + 4))  # o and lse
        self.kv_bytes_per_layer = self._kv_bytes / m.num_layers  # one token's k and v in one layer

    # ---- memory ------------------------------------------------------------------------------

    def kv_capacity_tokens(self, memory_utilization: float = 0.9) -> int:
        """Tokens of KV the instance holds: its memory (times ``memory_utilization``, as vLLM's
        ``gpu_memory_utilization``) less the weights, over one token's k/v."""
        room = self.gpu.memory_bytes * self.tp * memory_utilization - self.model.weight_bytes
        return max(0, int(room // self._kv_bytes))

    def block_bytes(self, block_size: int) -> float:
        return self._kv_bytes * block_size

    # ---- compute -----------------------------------------------------------------------------

    def dense_time(self, num_tokens: int, num_sampled: int) -> float:
        """Non-attention work of a step: every layer's projections and MLP, the output head for
        the sampled rows, tensor parallelism's all-reduces, and the step's fixed overhead."""
        if num_tokens <= 0:
            return 0.0
        flops = self._layer_flops_per_token * num_tokens + self._head_flops_per_row * num_sampled
        nbytes = self._weight_bytes + self._act_bytes_per_token * num_tokens
        t = max(nbytes / self._bandwidth, flops / (self._flops * self.eff.gemm_flops))
        if self.tp > 1:
            t += 2 * self.model.num_layers * self.allreduce_time(num_tokens * self.model.hidden * self.model.dtype_bytes)
        return t + self.eff.step_overhead_s

    def attention_time(self, num_queries: int, kv_tokens: float, causal: bool = False) -> float:
        """Partial attention of ``num_queries`` query tokens over ``kv_tokens`` keys held on this
        instance, all layers. ``causal``: the keys end with the queries' own tokens (a prefill
        chunk on its home), so each query sees on average half of the chunk."""
        if num_queries <= 0 or kv_tokens <= 0:
            return 0.0
        seen = kv_tokens - (num_queries - 1) / 2.0 if causal else kv_tokens
        flops = self._attn_flops_per_qk * num_queries * max(seen, 1.0)
        return max(kv_tokens * self._kv_bytes / self._bandwidth, flops / (self._flops * self.eff.attention_flops))

    # ---- links -------------------------------------------------------------------------------

    def allreduce_time(self, nbytes: float) -> float:
        """One all-reduce of ``nbytes`` over the instance's GPUs: a ring inside each node, then
        a ring across nodes on each GPU's shard (hierarchical)."""
        g = min(self.tp, self.gpu.gpus_per_node)
        n = math.ceil(self.tp / g)
        bw = self.eff.link_bandwidth
        t = 0.0
        if g > 1:
            t += 2 * (g - 1) / g * nbytes / (self.gpu.nvlink_bandwidth * bw) + 2 * (g - 1) * self.gpu.nvlink_hop_s
        if n > 1:
            t += 2 * (n - 1) / n * (nbytes / g) / (self.gpu.net_bandwidth * bw) + 2 * (n - 1) * self.gpu.net_hop_s
        return t

    def message_time(self, nbytes: float, same_node: bool, lanes: int = 1) -> float:
        """A point-to-point message between two instances, sent over ``lanes`` GPU pairs at once."""
        if same_node:
            return self.gpu.nvlink_message_s + nbytes / (self.gpu.nvlink_bandwidth * self.eff.link_bandwidth * lanes)
        return self.gpu.net_message_s + nbytes / (self.gpu.net_bandwidth * self.eff.link_bandwidth * lanes)

    # ---- the planner's view ------------------------------------------------------------------

    def throughput_tables(self, block_size: int) -> tuple[list[float], list[float], list[float], list[float]]:
        """The planner's ``ThroughputModel`` tables from this model: dense tokens/s per layer at
        a batch size (f) and attention context tokens/s per layer at a context length (g)."""
        layers = self.model.num_layers
        batches = [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]
        dense = [b / (self.dense_time(int(b), int(b)) / layers) for b in batches]
        contexts = [float(block_size), 4096.0, 65536.0, 1048576.0]
        attn = [c / (self.attention_time(1, c) / layers) for c in contexts]
        return batches, dense, contexts, attn
