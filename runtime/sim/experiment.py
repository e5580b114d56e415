"""The paper's experiment (``infinillm sim --paper``) and any trace (``--trace FILE.csv``).

32 A100s (4 nodes of 8) serve LLaMA2-7B, 13B and 70B on nine traces (``PAPER_TRACES``): for
each model a short trace (contexts 1-60K tokens) and two long ones (1-200K and 1-2000K, each
holding one request of the range's maximum), contexts drawn log-uniformly (many short requests,
a few very long: the mixture of chat and long-document requests the paper builds its traces
from), outputs 1-512 tokens, Poisson arrivals. Every policy serves every trace at a sweep of
rates around the cluster's nominal rate (what its peak FLOP/s would prefill); the table reports
the highest (saturating) rate, the plots the whole sweep.

Instances are sized as the paper sizes them, the same for every policy but ``vllm-single``: the
fewest GPUs (a power of two) that hold the weights and a 60K-token context.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .cluster import POLICIES, ClusterSpec, SimResult, simulate
from .cost import CostModel
from .hardware import GPU, ModelShape, gpu as gpu_named, model_shape
from .traces import TraceRequest, TraceSpec, generate_trace

__all__ = ["PAPER_TRACES", "PaperTrace", "instance_tp_for", "nominal_rate", "run_experiment", "summary_json",
           "format_table", "plot_throughput", "plot_kv_use"]

RATE_FACTORS = (0.1, 0.3, 1.0, 2.0)
SHORT_S = 60.0  # arrivals' span of a short trace (simulated seconds)
LONG_S = 300.0
INSTANCE_CONTEXT = 60_000


@dataclass(frozen=True, slots=True)
class PaperTrace:
    """One trace of the experiment: which model serves it, and whether it is short (compared
    with ``vllm-multi``) or long (compared with ``vllm-single``)."""

    index: int
    model: str
    spec: TraceSpec
    kind: str  # "short" | "long"


def _paper_traces() -> list[PaperTrace]:
    out = []
    for model in ("llama2-7b", "llama2-13b", "llama2-70b"):
        out.append(PaperTrace(0, model, TraceSpec(f"{model} short 1-60K", 2, 60_000, 0, "loguniform",
                                                  duration_s=SHORT_S), "short"))
    for hi, name in ((200_000, "1-200K"), (2_000_000, "1-2000K")):
        for model in ("llama2-7b", "llama2-13b", "llama2-70b"):
            out.append(PaperTrace(0, model, TraceSpec(f"{model} long {name}", 2, hi, 0, "loguniform",
                                                      include_max=True, duration_s=LONG_S), "long"))
    return [replace(t, index=i) for i, t in enumerate(out)]


PAPER_TRACES: list[PaperTrace] = _paper_traces()


def instance_tp_for(gpu: GPU, model: ModelShape, context_tokens: int = INSTANCE_CONTEXT, memory_utilization: float = 0.9) -> int:
    """The fewest GPUs (a power of two) whose memory holds the weights and ``context_tokens`` of KV."""
    tp = 1
    while CostModel(gpu, model, tp).kv_capacity_tokens(memory_utilization) < context_tokens:
        tp *= 2
        if tp > 1024:
            raise ValueError(f"{model.name} does not fit on 1024 x {gpu.name}")
    return tp


def nominal_rate(spec: ClusterSpec, trace: list[TraceRequest]) -> float:
    """Requests/s the cluster's peak dense FLOP/s (at the cost model's efficiency) could prefill:
    the scale of the rate sweep (attention and decoding make the real capacity lower)."""
    mean_context = sum(r.context_tokens for r in trace) / len(trace)
    flops = spec.num_gpus * spec.gpu.flops * spec.efficiency.gemm_flops
    return flops / (2.0 * spec.model.num_params * mean_context)


@dataclass(frozen=True, slots=True)
class Job:
    trace: int
    factor: float
    policy: str


@dataclass(slots=True)
class Outcome:
    """The measures of one (trace, rate, policy) run that the table and plots need."""

    trace: int
    factor: float
    policy: str
    rate: float
    throughput: float
    output_throughput: float
    makespan_throughput: float
    num_requests: int
    completed: int
    rejected: int
    max_context: int
    mean_ttft_s: float
    makespan_s: float
    num_instances: int
    instance_tp: int
    loans: int
    moves: int
    preemptions: int
    recomputed_tokens: int
    leaked_blocks: int
    kv_times: list[float] | None = None
    kv_used: list[list[float]] | None = None


def _cluster(gpu: GPU, model: ModelShape, num_gpus: int) -> ClusterSpec:
    return ClusterSpec(gpu, model, num_gpus, instance_tp_for(gpu, model))


def _outcome(job: Job, rate: float, res: SimResult, keep_kv: bool) -> Outcome:
    return Outcome(
        job.trace, job.factor, job.policy, rate, res.throughput, res.output_throughput, res.makespan_throughput,
        len(res.requests), len(res.completed), len(res.rejected), res.max_context_served, res.mean_ttft(),
        res.makespan_s, res.num_instances, res.instance_tp, res.num_loans, res.num_moves, res.num_preemptions, res.recomputed_tokens, res.leaked_blocks,
        res.kv_times if keep_kv else None, res.kv_used if keep_kv else None,
    )


# Worker state for a process pool: the experiment's traces and cluster (set by _init).
_STATE: dict = {}


def _init(state: dict) -> None:
    _STATE.update(state)


def _run(job: Job) -> Outcome:
    t = _STATE["traces"][job.trace]
    spec = _cluster(_STATE["gpu"], model_shape(t.model), _STATE["num_gpus"])
    base = generate_trace(replace(t.spec, num_requests=1000, duration_s=0.0), 1.0, _STATE["seed"])  # the length mix
    rate = nominal_rate(spec, base) * job.factor
    trace = generate_trace(t.spec, rate, _STATE["seed"])
    res = simulate(spec, job.policy, trace)
    keep_kv = job.factor == max(_STATE["factors"]) and job.policy in ("infinite-llm", "vllm-multi")
    return _outcome(job, rate, res, keep_kv)


def run_experiment(traces: list[PaperTrace], *, gpu: str = "a100", num_gpus: int = 32, seed: int = 0,
                   factors: tuple[float, ...] = RATE_FACTORS, policies: tuple[str, ...] = POLICIES,
                   processes: int | None = None, progress: bool = True) -> list[Outcome]:
    """Every policy on every trace at every rate factor; a process per core."""
    jobs = [Job(t.index, f, p) for t in traces for f in factors for p in policies]
    # The longest runs first, so that the pool's last minutes are not one long run alone.
    by_index = {t.index: t for t in traces}
    jobs.sort(key=lambda j: (-by_index[j.trace].spec.max_context, -j.factor))
    state = {"traces": {t.index: t for t in traces}, "gpu": gpu_named(gpu), "num_gpus": num_gpus,
             "seed": seed, "factors": factors}
    processes = processes or min(len(jobs), os.cpu_count() or 1)
    bar = _progress(len(jobs), progress)
    out = []
    try:
        if processes <= 1:
            _init(state)
            for job in jobs:
                out.append(_run(job))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(processes, initializer=_init, initargs=(state,)) as pool:
                for outcome in pool.imap_unordered(_run, jobs):
                    out.append(outcome)
                    bar.update(1)
    finally:
        bar.close()
    out.sort(key=lambda o: (o.trace, o.factor, POLICIES.index(o.policy)))
    return out


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="simulating", unit="run", disable=not enabled, leave=False)


# ---- reporting -------------------------------------------------------------------------------


def _at(outcomes: list[Outcome], trace: int, factor: float) -> dict[str, Outcome]:
    return {o.policy: o for o in outcomes if o.trace == trace and o.factor == factor}


def _ratio(a: Outcome | None, b: Outcome | None, measure: str = "makespan_throughput") -> float | None:
    if a is None or b is None or getattr(b, measure) <= 0:
        return None
    return getattr(a, measure) / getattr(b, measure)


def _x(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None else "-"


def format_table(traces: list[PaperTrace], outcomes: list[Outcome]) -> str:
    """A table per trace at its highest rate: each policy's throughput over the whole run
    (tokens/s, prompt and output, of the completed requests: vLLM's measure) and while loaded
    (useful tokens/s from 10% of the arrivals' span to the last arrival), output tokens/s, the
    longest context served, rejections, preemptions and the tokens they threw away, mean time
    to first token; then infinite-llm's ratio to each baseline, and a summary of the ratios."""
    top = max(o.factor for o in outcomes)
    lines = []
    summary = [f"{'trace':<28} {'kind':<5} {'vs vllm-multi':>14} {'vs vllm-single':>15} {'vs borrow-only':>15}"
               "   (run; loaded)"]
    for t in traces:
        at = _at(outcomes, t.index, top)
        if not at:
            continue
        first = next(iter(at.values()))
        lines.append(f"{t.spec.name} ({t.kind}): {first.num_requests:,} requests at {first.rate:.2f}/s, "
                     f"instances of {at.get('infinite-llm', first).instance_tp} GPU(s)")
        lines.append(f"  {'policy':<13} {'tok/s run':>11} {'tok/s loaded':>12} {'out tok/s':>9} {'longest':>9} "
                     f"{'rejected':>8} {'preempted':>9} {'recomputed':>11} {'TTFT s':>8}")
        for p in POLICIES:
            o = at.get(p)
            if o is None:
                continue
            lines.append(f"  {p:<13} {o.makespan_throughput:>11,.0f} {o.throughput:>12,.0f} {o.output_throughput:>9,.0f} "
                         f"{o.max_context:>9,} {o.rejected:>8} {o.preemptions:>9} {o.recomputed_tokens:>11,} "
                         f"{o.mean_ttft_s:>8.1f}")
        inf = at.get("infinite-llm")
        cells = []
        for p in ("vllm-multi", "vllm-single", "borrow-only"):
            cells.append(f"{_x(_ratio(inf, at.get(p)))}; {_x(_ratio(inf, at.get(p), 'throughput'))}")
        lines.append("  infinite-llm vs " + ", ".join(f"{p}: {c}" for p, c in
                                                        zip(("vllm-multi", "vllm-single", "borrow-only"), cells))
                     + "  (run; loaded)")
        lines.append("")
        summary.append(f"{t.spec.name:<28} {t.kind:<5} {cells[0]:>14} {cells[1]:>15} {cells[2]:>15}")
    return "\n".join(lines + summary)


def summary_json(traces: list[PaperTrace], outcomes: list[Outcome], max_context_probe: int | None = None) -> dict:
    """The figures the issue asks for, at the highest rate, from the whole-run throughput: the
    smallest ratio of infinite-llm to vllm-multi over the short traces, to vllm-single over the
    long ones, and the longest context infinite-llm served; and the same two ratios from the
    throughput while loaded (``*_loaded``)."""
    top = max(o.factor for o in outcomes)
    ratios: dict[str, list[float]] = {"short": [], "long": [], "short_loaded": [], "long_loaded": []}
    for t in traces:
        at = _at(outcomes, t.index, top)
        inf = at.get("infinite-llm")
        base = at.get("vllm-multi" if t.kind == "short" else "vllm-single")
        for measure, key in (("makespan_throughput", t.kind), ("throughput", f"{t.kind}_loaded")):
            if (r := _ratio(inf, base, measure)) is not None:
                ratios[key].append(r)
    served = [o.max_context for o in outcomes if o.policy == "infinite-llm"]
    if max_context_probe is not None:
        served.append(max_context_probe)

    def low(key: str) -> float | None:
        return round(min(ratios[key]), 3) if ratios[key] else None

    return {
        "min_ratio_short_vs_multi": low("short"),
        "min_ratio_long_vs_single": low("long"),
        "max_context_tokens": max(served, default=0),
        "min_ratio_short_vs_multi_loaded": low("short_loaded"),
        "min_ratio_long_vs_single_loaded": low("long_loaded"),
    }


def plot_throughput(traces: list[PaperTrace], outcomes: list[Outcome], path: str | Path) -> None:
    """Throughput against request rate, one panel per trace, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(traces) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, t in zip(axes.flat, traces):
        for p in POLICIES:
            pts = sorted((o.rate, o.makespan_throughput) for o in outcomes if o.trace == t.index and o.policy == p)
            if pts:
                ax.plot([x for x, _ in pts], [y / 1e3 for _, y in pts], marker="o", label=p)
        ax.set_title(t.spec.name, fontsize=10)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel("throughput (K tokens/s)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(traces):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kv_use(trace: PaperTrace, outcomes: list[Outcome], path: str | Path) -> None:
    """KV blocks in use per instance over time (own and lent) at the trace's highest rate, for
    infinite-llm and vllm-multi: the mean over the instances, and the band between the least
    and the most used instance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [o for o in outcomes if o.trace == trace.index and o.kv_times]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for o in runs:
        mean = [100 * sum(u) / len(u) for u in o.kv_used]
        low = [100 * min(u) for u in o.kv_used]
        high = [100 * max(u) for u in o.kv_used]
        line, = ax.plot(o.kv_times, mean, lw=1.2, label=f"{o.policy}: mean over {o.num_instances} instances")
        ax.fill_between(o.kv_times, low, high, color=line.get_color(), alpha=0.15, lw=0,
                        label=f"{o.policy}: least and most used instance")
    ax.set_title(f"KV blocks in use per instance (own and lent): {trace.spec.name}", fontsize=10)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("% of the instance's blocks")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_max_context(gpu: str = "a100", model: str = "llama2-7b", num_gpus: int = 32,
                      context_tokens: int = 2_000_000, output_tokens: int = 16) -> SimResult:
    """One request of ``context_tokens`` alone on the cluster under infinite-llm."""
    spec = _cluster(gpu_named(gpu), model_shape(model), num_gpus)
    trace = [TraceRequest(0.0, context_tokens - output_tokens, output_tokens)]
    return simulate(spec, "infinite-llm", trace)


def dumps(summary: dict) -> str:
    return json.dumps(summary)
