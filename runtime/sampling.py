"""Sampling: per-request parameters (vLLM's names and meanings) and one batched sampler.

``SamplingParams`` is what a caller gives ``generate``; it is frozen and validated when built, so
a bad value fails at the call with a :class:`~infinillm.errors.ValidationError` naming the
value and the limit.

``Sampler.sample`` turns one step's logits of a whole batch into one token per row. Every step
is a handful of tensor operations over ``[B, V]``; the only per-row Python work is building the
small per-row parameter vectors and drawing the random numbers of seeded rows from their own
generators. The pipeline, in vLLM's order::

    logits [B, V] (upcast to fp32)
      |
      +--> raw logprobs = log_softmax(logits)      what `logprobs` reports (vLLM's "raw" mode:
      |                                             before masks, penalties and temperature)
      +-- mask_ids -> -inf                         e.g. EOS and stop ids while min_tokens runs
      +-- penalties                                repetition (prompt + output tokens), then
      |                                             frequency and presence (output tokens)
      +-- greedy rows (temperature < 1e-5): argmax, ties to the lowest token id
      +-- random rows: / temperature -> top-k -> top-p -> min-p -> exponential race

The exponential race draws ``q_i ~ Exp(1)`` for every token and takes ``argmax_i p_i / q_i``:
``q_i / p_i ~ Exp(p_i)``, and the smallest of independent exponentials is token ``i`` with
probability ``p_i / sum(p)``, so this samples ``Categorical(p)`` exactly, with one vectorised
draw per row and no cumulative sums. A row whose request has a ``seed`` draws its ``q`` from
its own ``torch.Generator`` (``make_generator``), so its tokens depend only on its own logits and
seed, never on what else is in the batch or in which order; unseeded rows share the sampler's
generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

import torch

from .errors import ValidationError

__all__ = [
    "SamplingParams",
    "Sampler",
    "SamplerOutput",
    "SampledToken",
    "TopLogprobs",
    "make_generator",
    "apply_top_k_top_p_min_p",
    "apply_penalties",
    "GREEDY_EPS",
    "MAX_LOGPROBS",
    "MAX_SEED",
]

GREEDY_EPS = 1e-5
"""A temperature below this is greedy decoding (vLLM's ``_SAMPLING_EPS``)."""

MAX_LOGPROBS = 20
"""The largest ``logprobs`` a request may ask for (vLLM's default ``max_logprobs``)."""

MAX_TEMPERATURE = 1e6
"""The largest temperature: logits divided by it stay finite in float32 (and sampling is
uniform long before)."""

MAX_REPETITION_PENALTY = 1e6
"""Repetition penalties lie in [1 / this, this], so penalised logits stay finite in float32."""

MAX_STOP_BYTES = 65536  # stop strings, all together (they travel to worker instances)
MAX_SEED = (1 << 64) - 1
"""The largest seed ``torch.Generator.manual_seed`` takes."""

_OWNER = "SamplingParams"


# ---- parameters -----------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int, hi: int | None = None, allowed: str | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= lo and (hi is None or value <= hi)
    if not ok:
        limit = allowed or f"must be an integer in [{lo}, {hi if hi is not None else 'inf'}]"
        raise ValidationError(name, value, limit, owner=_OWNER)


def _check_float(name: str, value: Any, allowed: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or (value <= lo if lo_open else value < lo) or value > hi:
        raise ValidationError(name, value, allowed, owner=_OWNER)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValidationError(name, value, "must be True or False", owner=_OWNER)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one request's completion; vLLM's field names and meanings.

    Generation length
        ``max_tokens`` (default 16) caps the generated tokens; None means up to the model's
        ``max_model_len``. ``min_tokens`` generated tokens come before EOS, a stop token id or
        a stop string may end the request (the sampler masks EOS and the stop ids meanwhile).
    Choosing tokens
        ``temperature`` 0 is greedy (argmax; any value below 1e-5 counts as 0); otherwise the
        logits are divided by it and filtered by ``top_k`` (the k most likely tokens, ties with
        the k-th kept; -1 or 0 is off), ``top_p`` (the smallest set of most likely tokens whose
        probability reaches top_p; 1 is off) and ``min_p`` (tokens at least min_p times as
        likely as the most likely one; 0 is off). ``seed`` makes a request's sampling
        reproducible whatever else is in the batch.
    Penalties (vLLM's meanings; the defaults are off)
        ``repetition_penalty`` > 1 discourages every token seen in the prompt or the output
        (positive logits divided by it, negative ones multiplied); ``presence_penalty`` and
        ``frequency_penalty`` in [-2, 2] subtract from the logits of output tokens once, and
        once per occurrence.
    Stopping
        ``stop`` strings end the request; the text is cut before the stop string unless
        ``include_stop_str_in_output``. ``stop_token_ids`` end it on those ids. EOS ends it
        unless ``ignore_eos``.
    Output
        ``logprobs=k`` reports, for each generated token, its log-probability and those of the
        k most likely tokens (0: only the chosen one); values are the log-softmax of the raw
        logits. ``skip_special_tokens`` leaves special tokens out of the text.

    ``stop`` and ``stop_token_ids`` are stored as tuples (empty when not given), so the
    parameters are hashable and cannot change under a running request.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, 1, "must be 1 (only one completion per request is supported)")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, allowed="must be None or an integer >= 1")
        _check_int("min_tokens", self.min_tokens, 0, allowed="must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValidationError(
                "min_tokens", self.min_tokens, f"must be <= max_tokens={self.max_tokens}", owner=_OWNER
            )
        # Upper and lower limits keep logits / temperature and the penalties finite in float32.
        _check_float("temperature", self.temperature, f"must be in [0, {MAX_TEMPERATURE:g}] (0 is greedy)", 0.0,
                     MAX_TEMPERATURE)
        _check_float("top_p", self.top_p, "must be in (0, 1] (1 is off)", 0.0, 1.0, lo_open=True)
        _check_int("top_k", self.top_k, -1, allowed="must be -1 or 0 (off) or an integer >= 1")
        _check_float("min_p", self.min_p, "must be in [0, 1] (0 is off)", 0.0, 1.0)
        _check_float("presence_penalty", self.presence_penalty, "must be in [-2, 2]", -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, "must be in [-2, 2]", -2.0, 2.0)
        _check_float(
            "repetition_penalty", self.repetition_penalty,
            f"must be in [{1 / MAX_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 is off)",
            1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY,
        )
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED, f"must be None or an integer in [0, {MAX_SEED}]")
        object.__setattr__(self, "stop", self._normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", self._normalise_stop_token_ids(self.stop_token_ids))
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        if self.logprobs is not None:
            _check_int(
                "logprobs", self.logprobs, 0, MAX_LOGPROBS, f"must be None or an integer in [0, {MAX_LOGPROBS}]"
            )

    @staticmethod
    def _normalise_stop(stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        strings = (stop,) if isinstance(stop, str) else stop
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
            allowed = "must be a non-empty string or a list of non-empty strings"
            raise ValidationError("stop", stop, allowed, owner=_OWNER)
        size = 0
        for s in strings:
            try:
                size += len(s.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise ValidationError("stop", s[max(0, e.start - 8) : e.end + 8],
                                      f"must be valid Unicode: {e.reason} at index {e.start}", owner=_OWNER) from None
        if size > MAX_STOP_BYTES:
            raise ValidationError("stop", f"{len(strings)} strings of {size} UTF-8 bytes",
                                  f"must be at most {MAX_STOP_BYTES} bytes in all", owner=_OWNER)
        return tuple(strings)

    @staticmethod
    def _normalise_stop_token_ids(ids: Any) -> tuple[int, ...]:
        if ids is None:
            return ()
        ok = isinstance(ids, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        )
        if not ok:
            raise ValidationError("stop_token_ids", ids, "must be a list of integers >= 0", owner=_OWNER)
        return tuple(ids)

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature below 1e-5)."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """True when any penalty is on (the sampler then needs the request's token history)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


# ---- generators -----------------------------------------------------------------------------


@overload
def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator: ...
@overload
def make_generator(seed: None, device: torch.device | str = "cpu") -> None: ...
def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``; None for None (unseeded).

    One per seeded request, created when the request arrives and kept for its life, so that
    its draws continue one stream from step to step.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


# ---- output ---------------------------------------------------------------------------------


class TopLogprobs(NamedTuple):
    """The ``k_max`` most likely tokens of each row, most likely first.

    ``k_max`` is the largest ``logprobs`` asked for in the batch; a row that asked for fewer
    uses the first ones.
    """

    token_ids: torch.Tensor  # [B, k_max] int64
    logprobs: torch.Tensor  # [B, k_max] float32, log_softmax of the raw logits


@dataclass(frozen=True, slots=True)
class SampledToken:
    """One row of a ``SamplerOutput`` as Python values (``SamplerOutput.tolist``).

    ``rank`` (1 = most likely) and the top entries are filled only for rows that asked for
    logprobs; the top entries hold exactly the row's own ``logprobs`` count.
    """

    token_id: int
    logprob: float
    rank: int | None = None
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """One token per row, with its raw log-probability.

    ``ranks`` and ``top_logprobs`` are None when no row of the batch asked for logprobs.
    """

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, raw log-probability of the chosen token
    ranks: torch.Tensor | None = None  # [B] int64, 1 + number of tokens strictly more likely
    top_logprobs: TopLogprobs | None = None

    def tolist(self, num_logprobs: Sequence[int | None]) -> list[SampledToken]:
        """The rows as Python values, each row's top entries cut to its own ``logprobs``.

        ``num_logprobs[i]`` is row i's ``SamplingParams.logprobs``. One device-to-host copy per
        tensor, whatever the batch size.
        """
        token_ids = self.token_ids.tolist()
        logprobs = self.logprobs.tolist()
        if len(num_logprobs) != len(token_ids):
            raise ValueError(f"num_logprobs has {len(num_logprobs)} rows, the output {len(token_ids)}")
        if self.ranks is None or self.top_logprobs is None:
            return [SampledToken(t, lp) for t, lp in zip(token_ids, logprobs)]
        ranks = self.ranks.tolist()
        top_ids = self.top_logprobs.token_ids.tolist()
        top_values = self.top_logprobs.logprobs.tolist()
        rows = []
        for i, k in enumerate(num_logprobs):
            if k is None:
                rows.append(SampledToken(token_ids[i], logprobs[i]))
            else:
                rows.append(
                    SampledToken(token_ids[i], logprobs[i], ranks[i], tuple(top_ids[i][:k]), tuple(top_values[i][:k]))
                )
        return rows


# ---- the filters, exposed for tests and for callers that want the distribution --------------


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Return ``logits`` with every token a row's filters remove set to -inf (a new tensor).

    logits [B, V] float32, already divided by the temperature; top_k [B] int64 (<= 0 or >= V:
    off), top_p [B] float32 (1: off), min_p [B] float32 (0: off). Each filter keeps at least
    the most likely token, so every row keeps a non-empty support:

    - top-k keeps the tokens whose logit is >= the k-th largest (ties with it are kept);
    - top-p keeps, in decreasing order of probability after top-k (ties in increasing token
      id, a stable sort), each token whose preceding probability mass is still below top_p:
      the smallest prefix whose mass reaches top_p;
    - min-p keeps the tokens with ``p >= min_p * p_max``, compared in log space
      (``logit >= max_logit + log(min_p)``) so that tiny probabilities do not underflow.
      As top-k and top-p never remove the most likely token and renormalising scales every
      probability alike, min-p keeps the same set whether it runs before or after them.
    """
    batch, vocab = logits.shape
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1.0
    out = logits
    if bool(use_k.any()) or bool(use_p.any()):
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True, stable=True)
        remove_sorted = torch.zeros((batch, vocab), dtype=torch.bool, device=logits.device)
        if bool(use_k.any()):
            k = torch.where(use_k, top_k, torch.full_like(top_k, vocab)).clamp(1, vocab)
            kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
            remove_sorted |= sorted_logits < kth
        if bool(use_p.any()):
            probs = sorted_logits.masked_fill(remove_sorted, -math.inf).softmax(dim=-1)
            # Mass of the strictly more likely tokens: the prefix sum shifted right by one, so
            # the most likely token sees 0 < top_p and is always kept.
            mass_before = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
            remove_p = (mass_before >= top_p.unsqueeze(1)) & use_p.unsqueeze(1)
            remove_sorted |= remove_p
        remove = torch.zeros_like(remove_sorted).scatter_(1, sorted_ids, remove_sorted)
        out = logits.masked_fill(remove, -math.inf)
    use_min_p = min_p > 0.0
    if bool(use_min_p.any()):
        floor = out.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)  # -inf where off
        out = out.masked_fill(out < floor, -math.inf)
    if out is logits:
        out = logits.clone()
    return out


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Return ``logits`` [B, V] with vLLM's penalties applied (a new tensor).

    ``repetition [B]`` (1: off) divides the positive logits and multiplies the negative ones
    of every token seen in the row's prompt or output; ``frequency [B]`` is subtracted once per
    occurrence in the output and ``presence [B]`` once per distinct output token. The token
    histories become a ``[B, V]`` count matrix with one scatter per history (padded rows
    scatter into a spare column V that is dropped).
    """
    batch, vocab = logits.shape
    device = logits.device
    output_counts = _token_counts(output_token_ids, batch, vocab, device)
    prompt_seen = _token_counts(prompt_token_ids, batch, vocab, device) > 0
    seen = prompt_seen | (output_counts > 0)
    rep = repetition.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where(seen, penalised, logits)
    out = out - frequency.unsqueeze(1) * output_counts
    out = out - presence.unsqueeze(1) * (output_counts > 0).to(out.dtype)
    return out


def _token_counts(histories: Sequence[Sequence[int]], batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32: how often each token id occurs in each row's history."""
    if len(histories) != batch:
        raise ValueError(f"got {len(histories)} token histories for a batch of {batch}")
    width = max((len(h) for h in histories), default=0)
    counts = torch.zeros((batch, vocab + 1), dtype=torch.float32, device=device)
    if width:
        padded = torch.full((batch, width), vocab, dtype=torch.int64)
        for row, history in enumerate(histories):
            if len(history):
                padded[row, : len(history)] = torch.as_tensor(history, dtype=torch.int64)
        padded = padded.to(device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


# ---- the sampler ----------------------------------------------------------------------------


class Sampler:
    """Samples one token per row for a batch of requests, each with its own parameters.

    Owns the generator that unseeded rows share, one per device the logits come on, seeded
    from ``seed`` (e.g. ``ModelConfig.seed``, so a whole run is reproducible). Seeded requests
    bring their own generator (``make_generator(params.seed)``), created once per request; a
    generator on another device than the logits (a CPU generator for CUDA logits) draws on its
    own device and the draws are copied over, so a seed gives the same stream everywhere.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._shared_generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared_generators.get(device)
        if generator is None:
            generator = self._shared_generators[device] = make_generator(self.seed, device)
        return generator

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        *,
        mask_ids: Sequence[Sequence[int]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        output_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplerOutput:
        """One token per row of ``logits`` [B, V].

        ``params[i]`` and ``generators[i]`` belong to row i (None: the shared generator).
        ``mask_ids[i]`` are token ids row i must not produce this step (the detokenizer's
        ``mask_ids()``: EOS and stop ids while ``min_tokens`` runs). ``prompt_token_ids`` and
        ``output_token_ids`` are each row's token history, needed only when some row has a
        penalty. The input tensor is not modified.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch or len(generators) != batch:
            raise ValueError(f"batch of {batch} rows got {len(params)} params and {len(generators)} generators")
        device = logits.device
        logits = logits.to(dtype=torch.float32, copy=True)
        raw_logprobs = torch.log_softmax(logits, dim=-1)

        if mask_ids is not None:
            logits = self._mask(logits, mask_ids)
        if any(p.has_penalties for p in params):
            if prompt_token_ids is None or output_token_ids is None:
                raise ValueError("penalties need prompt_token_ids and output_token_ids for every row")
            logits = apply_penalties(
                logits,
                prompt_token_ids,
                output_token_ids,
                self._vector([p.presence_penalty for p in params], torch.float32, device),
                self._vector([p.frequency_penalty for p in params], torch.float32, device),
                self._vector([p.repetition_penalty for p in params], torch.float32, device),
            )

        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        # torch.argmax returns the first maximal index: ties go to the lowest token id.
        if not random_rows:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = torch.empty(batch, dtype=torch.int64, device=device)
        if greedy_rows and random_rows:
            rows = self._vector(greedy_rows, torch.int64, device)
            token_ids[rows] = logits.index_select(0, rows).argmax(dim=-1)
        if random_rows:
            rows = self._vector(random_rows, torch.int64, device)
            token_ids[rows] = self._sample_random(
                logits.index_select(0, rows),
                [params[i] for i in random_rows],
                [generators[i] for i in random_rows],
            )

        chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if not asked:
            return SamplerOutput(token_ids, chosen)
        ranks = (raw_logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
        top_values, top_ids = raw_logprobs.topk(min(max(asked), vocab), dim=-1)
        return SamplerOutput(token_ids, chosen, ranks, TopLogprobs(top_ids, top_values))

    def _sample_random(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Temperature, filters and the exponential race for the non-greedy rows [R, V]."""
        device = logits.device
        temperature = self._vector([p.temperature for p in params], torch.float32, device)
        logits = apply_top_k_top_p_min_p(
            logits / temperature.unsqueeze(1),
            self._vector([p.top_k for p in params], torch.int64, device),
            self._vector([p.top_p for p in params], torch.float32, device),
            self._vector([p.min_p for p in params], torch.float32, device),
        )
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs)
        shared = [j for j, g in enumerate(generators) if g is None]
        if shared:
            draws = torch.empty((len(shared), probs.shape[1]), dtype=probs.dtype, device=device)
            draws.exponential_(generator=self._shared_generator(device))
            race[self._vector(shared, torch.int64, device)] = draws
        for j, generator in enumerate(generators):
            if generator is None:
                continue
            if generator.device == device:
                race[j].exponential_(generator=generator)
            else:
                own = torch.empty(probs.shape[1], dtype=probs.dtype, device=generator.device)
                race[j] = own.exponential_(generator=generator).to(device)
        # Exp(1) can return 0; a floor keeps p / q finite (0 / 0 would be NaN, which argmax picks).
        race.clamp_(min=torch.finfo(race.dtype).tiny)
        return probs.div_(race).argmax(dim=-1)

    @staticmethod
    def _mask(logits: torch.Tensor, mask_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        if len(mask_ids) != logits.shape[0]:
            raise ValueError(f"mask_ids has {len(mask_ids)} rows, logits {logits.shape[0]}")
        rows = [row for row, ids in enumerate(mask_ids) for _ in ids]
        if rows:
            cols = [token for ids in mask_ids for token in ids]
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = -math.inf
        return logits

    @staticmethod
    def _vector(values: Sequence[float] | Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)
