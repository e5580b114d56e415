"""``infinillm sim``: the paper's experiment, or one trace, on a simulated cluster.

    infinillm sim --paper [--out DIR] [--processes N]
    infinillm sim --trace FILE.csv [--model llama2-7b] [--gpu a100] [--num-gpus 32] [--instance-tp N]
    infinillm sim --published

``--paper`` runs the nine traces of ``experiment.PAPER_TRACES`` under every policy at a sweep
of rates, prints the table, writes the plots and the table under ``--out``, and ends with one
JSON line: ``{"min_ratio_short_vs_multi", "min_ratio_long_vs_single", "max_context_tokens"}``.
``--trace`` serves a CSV trace (``arrival_s,prompt_tokens,output_tokens``) under every policy
and ends with a JSON line of each policy's throughput. ``--published`` prints the cost model
beside published measurements (``published.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from ..errors import InfiniLLMError, ValidationError
from .cluster import MAX_GPUS, POLICIES, ClusterSpec, Simulation
from .experiment import (
    PAPER_TRACES, format_table, instance_tp_for, plot_kv_use, plot_throughput, probe_max_context, run_experiment,
    summary_json,
)
from .hardware import GPUS, MODELS, gpu as gpu_named, model_shape
from .traces import read_trace_csv

__all__ = ["main"]


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Simulate a GPU cluster serving a trace, driving the real "
                                "scheduler core under a roofline cost model (docs/SIMULATION.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--paper", action="store_true", help="the paper's experiment: 32 GPUs, LLaMA2-7B/13B/70B, nine traces")
    what.add_argument("--trace", metavar="FILE.csv", help="a trace with columns arrival_s,prompt_tokens,output_tokens")
    what.add_argument("--published", action="store_true", help="the cost model beside published measurements")
    p.add_argument("--gpu", default="a100", choices=sorted(GPUS), help="the simulated GPU")
    p.add_argument("--num-gpus", type=int, default=32, help="GPUs in the cluster (nodes of 8)")
    p.add_argument("--model", default="llama2-7b", choices=sorted(MODELS), help="(--trace) the model served")
    p.add_argument("--instance-tp", type=int, default=None,
                   help="(--trace) GPUs per instance; default: the fewest that hold the weights and a 60K context")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, from " + ", ".join(POLICIES))
    p.add_argument("--seed", type=int, default=0, help="(--paper) the traces' seed")
    p.add_argument("--out", default="sim-out", help="where the table, the plots and the summary go")
    p.add_argument("--processes", type=int, default=None, help="(--paper) simulations run at once (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="(--paper) no plots (they need matplotlib)")
    return p


def main(argv: list[str] | None = None, prog: str = "infinillm sim") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        policies = tuple(dict.fromkeys(p.strip() for p in args.policies.split(",") if p.strip()))
        bad = [p for p in policies if p not in POLICIES]
        if bad or not policies:
            print(f"error: --policies {args.policies!r}: each must be one of {', '.join(POLICIES)}", file=sys.stderr)
            return 2
        if not 1 <= args.num_gpus <= MAX_GPUS:
            print(f"error: --num-gpus {args.num_gpus}: must be in [1, {MAX_GPUS}]", file=sys.stderr)
            return 2
        if args.processes is not None and not 1 <= args.processes <= 256:
            print(f"error: --processes {args.processes}: must be in [1, 256]", file=sys.stderr)
            return 2
        if args.published:
            from .published import comparisons, format_comparisons, format_distattention

            print(format_comparisons(comparisons()))
            print()
            print(format_distattention())
            return 0
        if args.paper:
            if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
                print("error: the plots need matplotlib: pip install 'infinillm[sim]' (or pass --no-plots)",
                      file=sys.stderr)
                return 2
            return _paper(args, policies, _out(args.out))
        return _trace(args, policies)
    except InfiniLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise ValidationError("--out", str(path), f"must be writable ({e.strerror})") from None


def _out(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValidationError("--out", path, f"must be a folder that can be written ({e.strerror})") from None
    return out


def _paper(args, policies, out: Path) -> int:
    started = time.monotonic()
    outcomes = run_experiment(PAPER_TRACES, gpu=args.gpu, num_gpus=args.num_gpus, seed=args.seed, policies=policies,
                              processes=args.processes, progress=not args.no_progress)
    table = format_table(PAPER_TRACES, outcomes)
    probe = probe_max_context(args.gpu, "llama2-7b", args.num_gpus) if "infinite-llm" in policies else None
    probe_served = probe.max_context_served if probe is not None else None
    summary = summary_json(PAPER_TRACES, outcomes, probe_served)
    print(table)
    if probe is not None:
        r = probe.requests[0]
        print(f"longest context: {r.context_tokens:,} tokens of LLaMA2-7B on {args.num_gpus} x {gpu_named(args.gpu).name} "
              f"(infinite-llm): {'served' if r.finish_s is not None else 'NOT served: ' + str(r.rejected)}"
              + (f", first token after {r.first_token_s:,.0f} s, KV on {r.most_instances} instances" if r.finish_s else ""))
    if not args.no_plots:
        plot_throughput(PAPER_TRACES, outcomes, out / "throughput_vs_rate.png")
        plot_kv_use(next(t for t in PAPER_TRACES if t.kind == "short"), outcomes, out / "kv_use_short.png")
        plot_kv_use(next(t for t in PAPER_TRACES if t.kind == "long"), outcomes, out / "kv_use_long.png")
    _write(out / "table.txt", table + "\n")
    _write(out / "summary.json", json.dumps(summary) + "\n")
    print(f"plots and table in {out}/ ({time.monotonic() - started:.0f} s)")
    print(json.dumps(summary))
    return 0


def _trace(args, policies) -> int:
    trace = read_trace_csv(args.trace)
    g, m = gpu_named(args.gpu), model_shape(args.model)
    tp = args.instance_tp if args.instance_tp is not None else instance_tp_for(g, m)
    spec = ClusterSpec(g, m, args.num_gpus, tp)
    sims = {p: Simulation(spec, p, trace) for p in policies}  # every option checked before any output
    out = _out(args.out)
    rows = {}
    print(f"{len(trace)} requests from {args.trace}: {m.name} on {args.num_gpus} x {g.name}, instances of {tp} GPU(s)")
    print(f"{'policy':<14} {'tok/s run':>11} {'tok/s loaded':>12} {'out tok/s':>10} {'completed':>9} {'rejected':>8} "
          f"{'longest':>10} {'TTFT s':>8} {'makespan s':>10}")
    for p, sim in sims.items():
        res = sim.run()
        rows[p] = res
        outputs = sum(r.output_tokens for r in res.completed)
        print(f"{p:<14} {res.makespan_throughput:>11,.0f} {res.throughput:>12,.0f} "
              f"{outputs / res.makespan_s if res.makespan_s > 0 else 0.0:>10,.0f} {len(res.completed):>9} "
              f"{len(res.rejected):>8} {res.max_context_served:>10,} {res.mean_ttft():>8.2f} {res.makespan_s:>10.1f}")
    print("tok/s run: tokens (prompt and output) of the completed requests over the whole run; loaded: useful "
          "tokens/s from 10% of the arrivals' span to the last arrival (docs/SIMULATION.md)")
    for p, res in rows.items():
        if res.rejected:
            print(f"{p}: {len(res.rejected)} rejected, e.g. {res.rejected[0].rejected}")
    summary = {"throughput": {p: round(r.makespan_throughput, 1) for p, r in rows.items()},
               "throughput_loaded": {p: round(r.throughput, 1) for p, r in rows.items()},
               "rejected": {p: len(r.rejected) for p, r in rows.items()},
               "max_context_tokens": max(r.max_context_served for r in rows.values())}
    _write(out / "summary.json", json.dumps(summary) + "\n")
    print(json.dumps(summary))
    return 0
