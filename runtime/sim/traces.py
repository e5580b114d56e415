"""Request traces: generated (the paper's context-length ranges, Poisson arrivals) or read from CSV.

A trace is a list of ``TraceRequest`` sorted by arrival. A request's *context* is its prompt
plus its output (what its KV grows to). ``generate_trace`` draws contexts from a range and a
distribution, outputs from their own range (never more than the context less one token), and
exponential gaps between arrivals at ``rate`` requests/s; one seed gives one trace.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import ValidationError

__all__ = ["TraceRequest", "TraceSpec", "generate_trace", "read_trace_csv", "write_trace_csv", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("uniform", "loguniform")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """How to draw a trace: contexts in ``[min_context, max_context]`` tokens (``distribution``:
    ``uniform``, or ``loguniform`` for many short and a few very long), outputs in
    ``[min_output, max_output]`` tokens (uniform); ``num_requests`` of them, or (``num_requests=0``)
    as many as arrive in ``duration_s`` at the trace's rate."""

    name: str
    min_context: int
    max_context: int
    num_requests: int = 0
    distribution: str = "uniform"
    min_output: int = 1
    max_output: int = 512
    include_max: bool = False  # one request (at a seeded position) has exactly max_context tokens
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        if not 2 <= self.min_context <= self.max_context:
            raise ValidationError("min_context", self.min_context, f"must be in [2, max_context={self.max_context}]")
        if self.num_requests < 0 or (self.num_requests == 0) == (self.duration_s <= 0):
            raise ValidationError("num_requests", self.num_requests, "must be >= 1, or 0 with a duration_s > 0")
        if self.distribution not in DISTRIBUTIONS:
            raise ValidationError("distribution", self.distribution, f"must be one of {', '.join(DISTRIBUTIONS)}")
        if not 1 <= self.min_output <= self.max_output:
            raise ValidationError("min_output", self.min_output, f"must be in [1, max_output={self.max_output}]")


def generate_trace(spec: TraceSpec, rate: float, seed: int = 0) -> list[TraceRequest]:
    """Draw a trace from ``spec`` with Poisson arrivals at ``rate`` requests/s (the first at 0)."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValidationError("rate", rate, "must be a positive number of requests per second")
    rng = random.Random(f"{spec.name}/{seed}")
    lengths = random.Random(f"{spec.name}/{seed}/lengths")  # the same requests at every rate
    out = []
    t = 0.0
    n = spec.num_requests or max(1, round(rate * spec.duration_s))
    longest = lengths.randrange(n) if spec.include_max else -1
    for i in range(n):
        if i == longest:
            context = spec.max_context
        elif spec.distribution == "uniform":
            context = lengths.randint(spec.min_context, spec.max_context)
        else:
            lo, hi = math.log(spec.min_context), math.log(spec.max_context + 1)
            context = min(spec.max_context, int(math.exp(lengths.uniform(lo, hi))))
        output = min(lengths.randint(spec.min_output, spec.max_output), context - 1)
        out.append(TraceRequest(t, context - output, output))
        t += rng.expovariate(rate)
    return out


def read_trace_csv(path: str | Path) -> list[TraceRequest]:
    """A trace from a CSV file with a header ``arrival_s,prompt_tokens,output_tokens``."""
    path = Path(path)
    try:
        f = path.open(newline="")
    except OSError as e:
        raise ValidationError("trace", str(path), f"cannot be read: {e.strerror}") from None
    with f:
        reader = csv.DictReader(f)
        want = ["arrival_s", "prompt_tokens", "output_tokens"]
        if reader.fieldnames is None or [c.strip() for c in reader.fieldnames] != want:
            raise ValidationError("trace", str(path), f"must have the header {','.join(want)} (has {reader.fieldnames})")
        out = []
        for line, row in enumerate(reader, start=2):
            try:
                r = TraceRequest(float(row["arrival_s"]), int(row["prompt_tokens"]), int(row["output_tokens"]))
            except (TypeError, ValueError):
                raise ValidationError("trace", f"{path}:{line}", f"must hold a number in each column (has {row})") from None
            if not (r.arrival_s >= 0 and math.isfinite(r.arrival_s)) or r.prompt_tokens < 1 or r.output_tokens < 1:
                raise ValidationError(
                    "trace", f"{path}:{line}", "needs arrival_s >= 0, prompt_tokens >= 1 and output_tokens >= 1"
                )
            out.append(r)
    if not out:
        raise ValidationError("trace", str(path), "holds no requests")
    out.sort(key=lambda r: r.arrival_s)
    return out


def write_trace_csv(trace: list[TraceRequest], path: str | Path) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", "prompt_tokens", "output_tokens"])
        for r in trace:
            w.writerow([f"{r.arrival_s:.6f}", r.prompt_tokens, r.output_tokens])
