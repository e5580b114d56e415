"""The cost model beside published measurements (``infinillm sim --published``).

Each entry: what was measured, where (the source), the published figure, and the model's figure
for the same setting, computed here by the cost model or by a simulation of that setting.
docs/SIMULATION.md carries the table this prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cluster import ClusterSpec, simulate
from .cost import CostModel
from .hardware import gpu, model_shape
from .traces import TraceRequest

__all__ = ["Comparison", "comparisons", "format_comparisons", "distattention_vs_headwise", "format_distattention"]


@dataclass(frozen=True, slots=True)
class Comparison:
    what: str
    source: str
    unit: str
    published: float
    model: float

    @property
    def ratio(self) -> float:
        return self.model / self.published


def _decode_tokens_per_s(model: str, tp: int, context: int = 256) -> float:
    c = CostModel(gpu("a100"), model_shape(model), tp)
    return 1.0 / (c.dense_time(1, 1) + c.attention_time(1, context))


def _batch_run(model: str, tp: int, n: int, prompt: int, output: int, max_batched: int):
    spec = ClusterSpec(gpu("a100"), model_shape(model), tp, tp, max_num_seqs=n, max_num_batched_tokens=max_batched)
    return simulate(spec, "vllm-multi", [TraceRequest(0.0, prompt, output) for _ in range(n)])


def comparisons() -> list[Comparison]:
    c7 = CostModel(gpu("a100"), model_shape("llama2-7b"), 1)
    ttft = c7.dense_time(2048, 1) + c7.attention_time(2048, 2048, causal=True)
    trt = _batch_run("llama2-7b", 1, 384, 128, 128, 384 * 128)
    vllm70 = _batch_run("llama2-70b", 4, 64, 256, 256, 8192)
    fa2 = c7.gpu.flops * c7.eff.attention_flops / 1e12
    return [
        Comparison("LLaMA2-7B decode, batch 1, 1 x A100-80GB (bf16)",
                   "pytorch-labs/gpt-fast README (A100-80GB power-limited to 330 W)", "tokens/s", 104.9,
                   _decode_tokens_per_s("llama2-7b", 1)),
        Comparison("LLaMA2-7B decode, batch 1, tensor parallel over 8 x A100",
                   "pytorch-labs/gpt-fast README", "tokens/s", 328.43, _decode_tokens_per_s("llama2-7b", 8)),
        Comparison("LLaMA2-70B decode, batch 1, tensor parallel over 8 x A100",
                   "pytorch-labs/gpt-fast README", "tokens/s", 62.50, _decode_tokens_per_s("llama2-70b", 8)),
        Comparison("LLaMA2-7B time to first token, 2,048-token prompt, batch 1, A100 (fp16)",
                   "NVIDIA TensorRT-LLM docs/source/performance.md (v0.5)", "ms", 133.0, 1e3 * ttft),
        Comparison("LLaMA2-7B output throughput, batch 384, 128 in / 128 out, 1 x A100 (fp16)",
                   "NVIDIA TensorRT-LLM docs/source/performance.md (v0.6.1)", "tokens/s", 5586.0,
                   trt.output_throughput),
        Comparison("LLaMA-70B, 64 requests of 256 in / 256 out, tensor parallel over 4 x A100-80GB, end to end",
                   "vllm-project/vllm PR #2192 (custom all-reduce; NCCL figure)", "s", 16.37, vllm70.makespan_s),
        Comparison("attention forward, head dim 128, A100 (FlashAttention-2's best)",
                   "Dao 2023, FlashAttention-2 (arXiv 2307.08691), A100-80GB SXM4", "TFLOP/s", 230.0, fa2),
    ]


def format_comparisons(rows: list[Comparison]) -> str:
    lines = [f"{'measure':<92} {'published':>10} {'model':>10} {'model/pub':>9}  unit  (source)"]
    for r in rows:
        lines.append(f"{r.what:<92} {r.published:>10,.1f} {r.model:>10,.1f} {r.ratio:>9.2f}  {r.unit}  ({r.source})")
    return "\n".join(lines)


def distattention_vs_headwise(context: int, batch: int, model: str = "llama2-13b", gpus: int = 4) -> tuple[float, float]:
    """The paper's micro-benchmark in the model: one layer's attention over ``context`` tokens
    for ``batch`` requests, head-wise tensor parallel over ``gpus`` GPUs against DistAttention
    over ``gpus`` one-GPU instances (a quarter of the KV each, one message each way per layer,
    over NVLink). Returns (head-wise seconds, DistAttention seconds)."""
    m = model_shape(model)
    one = CostModel(gpu("a100"), m, 1)
    tp = CostModel(gpu("a100"), m, gpus)
    headwise = tp.attention_time(batch, batch * context) / m.num_layers
    dist = one.attention_time(batch, batch * context / gpus) / m.num_layers + one.message_time(
        batch * (one.query_bytes_per_layer + one.result_bytes_per_layer), True)
    return headwise, dist


def format_distattention() -> str:
    lines = ["DistAttention against head-wise tensor-parallel attention, LLaMA2-13B, 4 x A100, one layer "
             "(the paper: DistAttention 1.01-1.25x faster over 4K-256K)",
             f"{'context':>8} {'batch':>5} {'head-wise us':>12} {'DistAttention us':>16} {'speed-up':>8}"]
    for ctx in (4096, 32768, 262144):
        for b in (1, 8):
            h, d = distattention_vs_headwise(ctx, b)
            lines.append(f"{ctx:>8,} {b:>5} {h * 1e6:>12.1f} {d * 1e6:>16.1f} {h / d:>7.2f}x")
    return "\n".join(lines)
