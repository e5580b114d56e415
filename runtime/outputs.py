"""What ``generate`` yields: vLLM-shaped, frozen snapshots of a request's progress.

::

    RequestOutput                       one per step of a request, cumulative
      request_id, prompt, prompt_token_ids
      outputs: (CompletionOutput,)      one completion (SamplingParams.n is 1)
        text                            everything decoded so far (not a delta)
        token_ids                       every generated token so far
        cumulative_logprob              sum of the chosen tokens' logprobs (None unless asked)
        logprobs: ({id: Logprob},)      one dict per generated token (None unless asked)
        finish_reason, stop_reason      None until the request ends
      finished                          True on the last snapshot only
      metrics, error

The runtime builds a new snapshot at every step; the sequences are tuples, so a snapshot the
application still holds never changes under it. vLLM uses lists here: compare with
``list(out.token_ids) == [...]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FinishReason",
    "FINISH_REASONS",
    "Logprob",
    "CompletionOutput",
    "RequestMetrics",
    "RequestOutput",
    "make_logprobs_dict",
]

FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")
"""Why a request ended: a stop condition (EOS, stop token id, stop string), its length limit
(max_tokens or max_model_len), an abort (by id, or its consumer left), or an error."""


@dataclass(frozen=True, slots=True)
class Logprob:
    """The log-probability of one token at one position (vLLM's ``Logprob``).

    ``rank`` is 1 for the most likely token; ``decoded_token`` is the token's text on its own.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    """One completion of a request, cumulative up to the snapshot.

    ``stop_reason`` is the stop string or stop token id that ended it (None for EOS and for
    the other finish reasons).
    """

    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None = None
    logprobs: Sequence[dict[int, Logprob]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", tuple(self.token_ids))
        if self.logprobs is not None:
            object.__setattr__(self, "logprobs", tuple(self.logprobs))
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r} is invalid: must be one of {FINISH_REASONS}")
        if self.stop_reason is not None and self.finish_reason != "stop":
            raise ValueError(f"stop_reason={self.stop_reason!r} needs finish_reason='stop', got {self.finish_reason!r}")

    def finished(self) -> bool:
        """True once the completion has a finish reason (vLLM's method of the same name)."""
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """Timestamps of a request (``time.monotonic()`` seconds) and its token counts."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """A snapshot of one request: the prompt and its completions so far.

    ``finished`` is True on the last snapshot only; ``error`` carries the message of a request
    that ended with ``finish_reason="error"``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: Sequence[int]
    outputs: Sequence[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if self.outputs and self.finished != all(o.finished() for o in self.outputs):
            raise ValueError(
                f"finished={self.finished} disagrees with the completions' finish reasons "
                f"{[o.finish_reason for o in self.outputs]}"
            )


def make_logprobs_dict(
    token_id: int,
    logprob: float,
    rank: int | None,
    top_token_ids: Sequence[int],
    top_logprobs: Sequence[float],
    decode: Callable[[int], str],
) -> dict[int, Logprob]:
    """The logprobs entry of one generated token, shaped as vLLM's.

    The chosen token comes first with its own rank, then the top tokens with ranks 1..k; the
    chosen token appears once even when it is among the top ones, so the dict holds k or k+1
    entries. ``decode`` gives a token's text on its own (the detokenizer's ``decode_token``).
    The arguments are a row of the sampler's output (``SampledToken``'s fields).
    """
    entry = {token_id: Logprob(logprob, rank, decode(token_id))}
    for position, (top_id, top_logprob) in enumerate(zip(top_token_ids, top_logprobs), start=1):
        if top_id != token_id:
            entry[top_id] = Logprob(top_logprob, position, decode(top_id))
    return entry
