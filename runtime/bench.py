"""``infinillm bench``: the runtime's throughput and latency on this machine, through the public API.

Sends ``--requests`` requests at once (random prompts of ``--prompt-tokens`` tokens, seeded, each
generating exactly ``--max-tokens`` tokens) and reports what a serving benchmark reports: the
wall time, requests/s, output and total tokens/s, and the time to the first token and between
tokens (mean, median, p90). ``--json`` prints one JSON object instead of the table. (The
benchmarks under ``benchmarks/`` compare against baselines; this measures one configuration.)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

import trio

__all__ = ["main", "build_parser", "run_bench"]


def build_parser(prog: str = "infinillm bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', a Hugging Face folder or a GGUF file")
    p.add_argument("--requests", type=int, default=16, help="requests sent at once")
    p.add_argument("--prompt-tokens", type=int, default=256, help="tokens of each (random) prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    p.add_argument("--instances", type=int, default=1, help="instances serving (workers beside this process)")
    p.add_argument("--kv-capacity-tokens", type=int, default=None,
                   help="KV cache of each instance, in tokens (default: sized from free memory; "
                        "needed with --instances > 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0}
    ordered = sorted(values)
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import infinillm
    from . import SamplingParams

    options: dict[str, Any] = dict(model=args.model, device=args.device, num_instances=args.instances)
    if args.kv_capacity_tokens is not None:
        options["kv_capacity_tokens"] = args.kv_capacity_tokens
    async with infinillm.open_runtime(**options) as rt:
        vocab = rt.engine.args.vocab_size
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        ttft: list[float] = []
        itl: list[float] = []
        finals: list[Any] = []
        t0 = time.perf_counter()

        streams = [rt.generate({"prompt_token_ids": ids}, params) for ids in prompts]  # bad input raises here

        async def one(stream) -> None:
            start = time.perf_counter()
            last = None
            out = None
            async for out in stream:
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - start)
                else:
                    itl.append(now - last)
                last = now
            finals.append(out)

        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(one, stream)
        wall = time.perf_counter() - t0
    out_tokens = sum(len(f.outputs[0].token_ids) for f in finals)
    in_tokens = sum(len(f.prompt_token_ids) for f in finals)
    return {
        "requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "instances": args.instances, "wall_s": wall, "requests_per_s": len(finals) / wall,
        "output_tokens_per_s": out_tokens / wall, "total_tokens_per_s": (in_tokens + out_tokens) / wall,
        "ttft_s": _summary(ttft), "inter_token_s": _summary(itl),
    }


def _table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['requests']} requests of {r['prompt_tokens']} prompt tokens, {r['max_tokens']} generated each, "
        f"on {r['instances']} instance{'s' if r['instances'] > 1 else ''}",
        f"  wall time            {r['wall_s']:.2f} s",
        f"  requests/s           {r['requests_per_s']:.2f}",
        f"  output tokens/s      {r['output_tokens_per_s']:.1f}",
        f"  total tokens/s       {r['total_tokens_per_s']:.1f}",
    ]
    for name, key in (("time to first token", "ttft_s"), ("time between tokens", "inter_token_s")):
        s = r[key]
        lines.append(f"  {name:<20} mean {s['mean'] * 1e3:.1f} ms, median {s['median'] * 1e3:.1f} ms, "
                     f"p90 {s['p90'] * 1e3:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "infinillm bench") -> int:
    from .cli import run_command

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for name in ("requests", "prompt_tokens", "max_tokens", "instances"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    result: dict[str, Any] = {}

    async def measure() -> int:
        result.update(await run_bench(args))
        return 0

    status = run_command(measure)
    if status == 0:
        print(json.dumps(result) if args.json else _table(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
