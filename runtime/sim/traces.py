"""Request traces: generated (the paper's context-length ranges, Poisson arrivals) or read from CSV.

A trace is a list of ``TraceRequest`` (in any order: the simulation takes them by arrival;
``read_trace_csv`` sorts them). A request's *context* is its prompt
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
MAX_TOKENS = 2**31 - 1  # positions are int32 in the scheduler core
MAX_REQUESTS = 10_000_000


def _int(field: str, value, lo: int, hi: int = MAX_TOKENS) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(field, value, f"must be an integer in [{lo}, {hi}]")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: when it arrives (seconds, finite, >= 0), its prompt and its output tokens
    (integers >= 1; the output is also its ``max_tokens``)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if isinstance(self.arrival_s, bool) or not isinstance(self.arrival_s, (int, float)) \
                or not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValidationError("arrival_s", self.arrival_s, "must be a finite number of seconds >= 0")
        _int("prompt_tokens", self.prompt_tokens, 1)
        _int("output_tokens", self.output_tokens, 1)
        if self.prompt_tokens + self.output_tokens > MAX_TOKENS:
            raise ValidationError("prompt_tokens + output_tokens", self.prompt_tokens + self.output_tokens,
                                  f"must be <= {MAX_TOKENS}")

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
        _int("max_context", self.max_context, 2)
        _int("min_context", self.min_context, 2, self.max_context)
        _int("num_requests", self.num_requests, 0, MAX_REQUESTS)
        d = self.duration_s
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and d >= 0):
            raise ValidationError("duration_s", d, "must be a finite number of seconds >= 0")
        if (self.num_requests == 0) == (d == 0):
            raise ValidationError("num_requests", self.num_requests,
                                  f"with duration_s={d}: give exactly one of them (num_requests >= 1, or 0 with a "
                                  "duration_s > 0)")
        if self.distribution not in DISTRIBUTIONS:
            raise ValidationError("distribution", self.distribution, f"must be one of {', '.join(DISTRIBUTIONS)}")
        _int("max_output", self.max_output, 1)
        _int("min_output", self.min_output, 1, self.max_output)


def generate_trace(spec: TraceSpec, rate: float, seed: int = 0) -> list[TraceRequest]:
    """Draw a trace from ``spec`` with Poisson arrivals at ``rate`` requests/s (the first at 0)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate > 0 and math.isfinite(rate)):
        raise ValidationError("rate", rate, "must be a positive number of requests per second")
    rng = random.Random(f"{spec.name}/{seed}")
    lengths = random.Random(f"{spec.name}/{seed}/lengths")  # the same requests at every rate
    out = []
    t = 0.0
    if spec.num_requests:
        n = spec.num_requests
    else:
        expected = rate * spec.duration_s
        if expected > MAX_REQUESTS:
            raise ValidationError("rate", rate, f"x duration_s={spec.duration_s} must be <= {MAX_REQUESTS:,} requests")
        n = max(1, round(expected))
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
        if not math.isfinite(t):
            raise ValidationError("rate", rate, "is too small: the arrivals run past any finite time")
    return out


def read_trace_csv(path: str | Path) -> list[TraceRequest]:
    """A trace from a CSV file with a header ``arrival_s,prompt_tokens,output_tokens``."""
    path = Path(path)
    try:
        f = path.open(newline="", encoding="utf-8-sig")  # (a byte-order mark, as spreadsheets write)
    except OSError as e:
        raise ValidationError("trace", str(path), f"cannot be read: {e.strerror}") from None
    want = ["arrival_s", "prompt_tokens", "output_tokens"]
    out = []
    try:
        with f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [c.strip() for c in header] != want:
                raise ValidationError("trace", str(path), f"must have the header {','.join(want)} (has {header})")
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                where = f"{path}:{reader.line_num}"
                if len(row) != 3:
                    raise ValidationError("trace", where, f"must hold 3 values (has {len(row)}: {row})")
                try:
                    arrival, prompt, output = float(row[0]), int(row[1]), int(row[2])
                except ValueError:
                    raise ValidationError("trace", where, f"must hold a number in each column (has {row})") from None
                try:
                    out.append(TraceRequest(arrival, prompt, output))
                except ValidationError as e:
                    raise ValidationError("trace", where, f"holds {e}") from None
    except UnicodeDecodeError as e:
        raise ValidationError("trace", str(path), f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not out:
        raise ValidationError("trace", str(path), "holds no requests")
    out.sort(key=lambda r: r.arrival_s)
    return out


def write_trace_csv(trace: list[TraceRequest], path: str | Path) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", "prompt_tokens", "output_tokens"])
        for r in trace:
            w.writerow([repr(float(r.arrival_s)), r.prompt_tokens, r.output_tokens])  # reads back equal
