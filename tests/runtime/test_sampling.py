"""SamplingParams validation and the batched Sampler: greedy, filters, seeds, logprobs, masks."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from infinillm.errors import ValidationError
from infinillm.sampling import (
    MAX_SEED,
    Sampler,
    SamplingParams,
    apply_penalties,
    apply_top_k_top_p_min_p,
    make_generator,
)

# ---- SamplingParams -------------------------------------------------------------------------

# (field, value, what the message says is allowed)
ONE_COMPLETION = "must be 1 (only one completion per request is supported)"
MAX_TOKENS = "must be None or an integer >= 1"
TEMPERATURE = "must be in [0, 1e+06] (0 is greedy)"
TOP_P = "must be in (0, 1] (1 is off)"
TOP_K = "must be -1 or 0 (off) or an integer >= 1"
MIN_P = "must be in [0, 1] (0 is off)"
PENALTY = "must be in [-2, 2]"
REPETITION_PENALTY = "must be in [1e-06, 1e+06] (1 is off)"
SEED = f"must be None or an integer in [0, {MAX_SEED}]"
STOP = "must be a non-empty string or a list of non-empty strings"
STOP_TOKEN_IDS = "must be a list of integers >= 0"
BOOL = "must be True or False"
LOGPROBS = "must be None or an integer in [0, 20]"
BAD_VALUES = [
    ("n", 2, ONE_COMPLETION),
    ("n", 0, ONE_COMPLETION),
    ("max_tokens", 0, MAX_TOKENS),
    ("max_tokens", -1, MAX_TOKENS),
    ("max_tokens", 1.5, MAX_TOKENS),
    ("max_tokens", True, MAX_TOKENS),
    ("min_tokens", -1, "must be an integer >= 0"),
    ("min_tokens", 2.0, "must be an integer >= 0"),
    ("temperature", -1, TEMPERATURE),
    ("temperature", -1e-9, TEMPERATURE),
    ("temperature", math.inf, TEMPERATURE),
    ("temperature", math.nan, TEMPERATURE),
    ("temperature", "1", TEMPERATURE),
    ("top_p", 0, TOP_P),
    ("top_p", 1.0001, TOP_P),
    ("top_p", -0.5, TOP_P),
    ("top_k", -2, TOP_K),
    ("top_k", 1.5, TOP_K),
    ("min_p", -0.1, MIN_P),
    ("min_p", 1.1, MIN_P),
    ("presence_penalty", 2.5, PENALTY),
    ("frequency_penalty", -3.0, PENALTY),
    ("repetition_penalty", 0.0, REPETITION_PENALTY),
    ("repetition_penalty", -1.0, REPETITION_PENALTY),
    ("seed", -1, SEED),
    ("seed", MAX_SEED + 1, SEED),
    ("seed", 1.0, SEED),
    ("stop", "", STOP),
    ("stop", [""], STOP),
    ("stop", ["ok", 1], STOP),
    ("stop", 5, STOP),
    ("stop_token_ids", [-1], STOP_TOKEN_IDS),
    ("stop_token_ids", [True], STOP_TOKEN_IDS),
    ("stop_token_ids", "3", STOP_TOKEN_IDS),
    ("ignore_eos", 1, BOOL),
    ("include_stop_str_in_output", "yes", BOOL),
    ("skip_special_tokens", None, BOOL),
    ("logprobs", 21, LOGPROBS),
    ("logprobs", -1, LOGPROBS),
    ("logprobs", 2.0, LOGPROBS),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_VALUES)
def test_every_bad_value_raises_a_validation_error_naming_field_and_value(field, value, allowed):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    e = info.value
    assert isinstance(e, ValueError)
    assert e.field == field and e.value is value and e.owner == "SamplingParams"
    assert str(e).startswith(f"SamplingParams.{field}={value!r} is invalid: ")
    assert str(e) == f"SamplingParams.{field}={value!r} is invalid: {allowed}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "SamplingParams.temperature=-1 is invalid: must be in [0, 1e+06] (0 is greedy)"),
        ({"temperature": 1e39}, "SamplingParams.temperature=1e+39 is invalid: must be in [0, 1e+06] (0 is greedy)"),
        ({"repetition_penalty": 1e-50}, "SamplingParams.repetition_penalty=1e-50 is invalid: must be in [1e-06, 1e+06] (1 is off)"),
        ({"top_p": 0}, "SamplingParams.top_p=0 is invalid: must be in (0, 1] (1 is off)"),
        ({"top_p": 1.5}, "SamplingParams.top_p=1.5 is invalid: must be in (0, 1] (1 is off)"),
        ({"top_k": -2}, "SamplingParams.top_k=-2 is invalid: must be -1 or 0 (off) or an integer >= 1"),
        ({"max_tokens": 0}, "SamplingParams.max_tokens=0 is invalid: must be None or an integer >= 1"),
        ({"logprobs": 21}, "SamplingParams.logprobs=21 is invalid: must be None or an integer in [0, 20]"),
        ({"seed": -1}, f"SamplingParams.seed=-1 is invalid: must be None or an integer in [0, {MAX_SEED}]"),
        ({"n": 2}, "SamplingParams.n=2 is invalid: must be 1 (only one completion per request is supported)"),
        ({"min_tokens": 5, "max_tokens": 4}, "SamplingParams.min_tokens=5 is invalid: must be <= max_tokens=4"),
    ],
)
def test_messages_name_the_value_and_the_limit(kwargs, message):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 16, 0, 1.0, 1.0, -1, 0.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.logprobs) == (None, (), (), None)
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens) == (False, False, True)
    assert not p.greedy and not p.has_penalties


def test_edge_values_are_accepted():
    for kwargs in (
        {"top_k": 0},
        {"top_k": -1},
        {"top_k": 1},
        {"top_p": 1.0},
        {"min_p": 1.0},
        {"seed": 0},
        {"seed": MAX_SEED},
        {"logprobs": 0},
        {"logprobs": 20},
        {"max_tokens": None},
        {"max_tokens": 1, "min_tokens": 1},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0, "repetition_penalty": 1.3},
    ):
        SamplingParams(**kwargs)


def test_stop_and_stop_token_ids_become_tuples_and_params_are_frozen_and_hashable():
    assert SamplingParams(stop="###").stop == ("###",)
    stops = ["a", "bc"]
    p = SamplingParams(stop=stops, stop_token_ids=[7, 9])
    stops.append("d")  # the caller's list is not shared
    assert p.stop == ("a", "bc") and p.stop_token_ids == (7, 9)
    assert hash(p) == hash(SamplingParams(stop=("a", "bc"), stop_token_ids=(7, 9)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


def test_temperature_below_epsilon_is_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


# ---- helpers --------------------------------------------------------------------------------


def probs_to_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().to(torch.float32)


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def filter_one(logits: torch.Tensor, top_k: int = -1, top_p: float = 1.0, min_p: float = 0.0) -> set[int]:
    out = apply_top_k_top_p_min_p(
        logits.unsqueeze(0),
        torch.tensor([top_k]),
        torch.tensor([top_p], dtype=torch.float32),
        torch.tensor([min_p], dtype=torch.float32),
    )
    return kept(out[0])


# Probabilities by token id (deliberately not sorted): id 3 is the most likely, then 0, 5, 1, 4, 2.
PROBS = [0.25, 0.10, 0.04, 0.40, 0.06, 0.15]
LOGITS = probs_to_logits(PROBS)


# ---- filters: exact kept sets ---------------------------------------------------------------


@pytest.mark.parametrize(("top_k", "expected"), [(1, {3}), (2, {3, 0}), (3, {3, 0, 5}), (5, {3, 0, 5, 1, 4})])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert filter_one(LOGITS, top_k=top_k) == expected


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        # mass of the more likely tokens, in order 3, 0, 5, 1, 4, 2: 0, .40, .65, .80, .90, .96
        (0.39, {3}),
        (0.41, {3, 0}),
        (0.64, {3, 0}),
        (0.66, {3, 0, 5}),
        (0.79, {3, 0, 5}),
        (0.81, {3, 0, 5, 1}),
        (0.89, {3, 0, 5, 1}),
        (0.91, {3, 0, 5, 1, 4}),
        (0.97, {3, 0, 5, 1, 4, 2}),
        (1e-6, {3}),  # at least one token survives
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, expected):
    assert filter_one(LOGITS, top_p=top_p) == expected


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        # p >= min_p * 0.40
        (0.2, {3, 0, 5, 1}),  # >= .08
        (0.3, {3, 0, 5}),  # >= .12
        (0.5, {3, 0}),  # >= .20
        (0.9, {3}),  # >= .36
        (1.0, {3}),
    ],
)
def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely(min_p, expected):
    assert filter_one(LOGITS, min_p=min_p) == expected


def test_top_p_runs_on_the_distribution_renormalised_after_top_k():
    # Alone, top_p=.7 keeps 3 tokens (the mass before id 5 is .65 < .7). After top_k=3 the
    # survivors renormalise to .40/.80, .25/.80, .15/.80 = .5, .3125, .1875: the mass before
    # id 5 is .8125 >= .7, so only two remain.
    assert filter_one(LOGITS, top_p=0.7) == {3, 0, 5}
    assert filter_one(LOGITS, top_k=3, top_p=0.7) == {3, 0}


def test_off_values_keep_everything():
    every = set(range(6))
    assert filter_one(LOGITS, top_k=-1) == every
    assert filter_one(LOGITS, top_k=0) == every
    assert filter_one(LOGITS, top_k=6) == every
    assert filter_one(LOGITS, top_k=1000) == every
    assert filter_one(LOGITS, top_p=1.0) == every
    assert filter_one(LOGITS, min_p=0.0) == every


def test_top_k_keeps_ties_with_the_kth_value():
    assert filter_one(torch.tensor([1.0, 2.0, 2.0, 0.0]), top_k=1) == {1, 2}


def test_each_row_has_its_own_filters_and_kept_logits_are_unchanged():
    logits = LOGITS.repeat(4, 1)
    out = apply_top_k_top_p_min_p(
        logits,
        torch.tensor([2, -1, -1, 4]),
        torch.tensor([1.0, 0.41, 1.0, 1.0]),
        torch.tensor([0.0, 0.0, 0.5, 0.3]),
    )
    assert [kept(row) for row in out] == [{3, 0}, {3, 0}, {3, 0}, {3, 0, 5}]
    assert torch.equal(out[0, [3, 0]], LOGITS[[3, 0]])
    assert torch.equal(logits, LOGITS.repeat(4, 1))  # the input is not modified


# ---- greedy ---------------------------------------------------------------------------------


def test_greedy_is_argmax_whatever_the_filters_and_generators():
    logits = torch.randn(8, 100, generator=make_generator(7))
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.3, min_p=0.5, seed=i) for i in range(8)]
    out = Sampler().sample(logits, params, [make_generator(i) for i in range(8)])
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32


def test_greedy_ties_go_to_the_lowest_id():
    logits = torch.tensor([[0.0, 1.0, 3.0, 1.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    out = Sampler().sample(logits, [SamplingParams(temperature=0)] * 2, [None, None])
    assert out.token_ids.tolist() == [2, 0]


# ---- random sampling: distributions from many draws -----------------------------------------

DRAWS = 20_000  # the frequency of a token with p = .5 has a standard deviation of .0035


def draw_frequencies(params: SamplingParams, logits: torch.Tensor = LOGITS, seed: int = 0) -> list[float]:
    """Sample DRAWS rows of the same logits in one batch (unseeded: the shared generator)."""
    batch = logits.repeat(DRAWS, 1)
    tokens = Sampler(seed=seed).sample(batch, [params] * DRAWS, [None] * DRAWS).token_ids
    return (torch.bincount(tokens, minlength=logits.shape[0]).double() / DRAWS).tolist()


def expected_frequencies(probs: list[float], keep: set[int], temperature: float = 1.0) -> list[float]:
    weights = [p ** (1.0 / temperature) if i in keep else 0.0 for i, p in enumerate(probs)]
    total = sum(weights)
    return [w / total for w in weights]


@pytest.mark.parametrize(
    ("kwargs", "keep"),
    [
        ({}, {0, 1, 2, 3, 4, 5}),
        ({"top_k": 2}, {3, 0}),
        ({"top_p": 0.66}, {3, 0, 5}),
        ({"min_p": 0.2}, {3, 0, 5, 1}),
        ({"top_k": 3, "top_p": 0.7}, {3, 0}),
    ],
)
def test_sampled_frequencies_match_the_filtered_distribution(kwargs, keep):
    freq = draw_frequencies(SamplingParams(temperature=1.0, **kwargs))
    expected = expected_frequencies(PROBS, keep)
    assert {i for i, f in enumerate(freq) if f > 0} == keep  # never outside the kept set
    assert max(abs(f - e) for f, e in zip(freq, expected)) < 0.015


def test_temperature_sharpens_and_flattens():
    for temperature in (0.5, 2.0):
        freq = draw_frequencies(SamplingParams(temperature=temperature))
        expected = expected_frequencies(PROBS, set(range(6)), temperature)
        assert max(abs(f - e) for f, e in zip(freq, expected)) < 0.015


def test_the_shared_generator_is_seeded_by_the_sampler_seed():
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(64, 50, generator=make_generator(3))
    a = Sampler(seed=11).sample(logits, [params] * 64, [None] * 64).token_ids
    b = Sampler(seed=11).sample(logits, [params] * 64, [None] * 64).token_ids
    c = Sampler(seed=12).sample(logits, [params] * 64, [None] * 64).token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- seeds: reproducible whatever the batch -------------------------------------------------

VOCAB = 1000
STEPS = 6


def step_logits(step: int, row_seed: int) -> torch.Tensor:
    """A flat-ish distribution per (request, step), so that samples vary from step to step."""
    return torch.randn(VOCAB, generator=make_generator(1000 * row_seed + step))


def run_batch(
    rows: list[tuple[str, int | None]], sampler_seed: int, device: str = "cpu", generator_device: str = "cpu"
) -> dict[str, list[int]]:
    """Decode STEPS steps of a batch; rows are (name, seed or None); returns tokens by name."""
    sampler = Sampler(seed=sampler_seed)
    params = {name: SamplingParams(temperature=0.8, top_p=0.95, seed=seed) for name, seed in rows}
    generators = {name: make_generator(seed, generator_device) for name, seed in rows}
    tokens: dict[str, list[int]] = {name: [] for name, _ in rows}
    for step in range(STEPS):
        logits = torch.stack([step_logits(step, ord(name)) for name, _ in rows]).to(device)
        out = sampler.sample(logits, [params[n] for n, _ in rows], [generators[n] for n, _ in rows])
        for (name, _), token in zip(rows, out.token_ids.tolist()):
            tokens[name].append(token)
    return tokens


def test_a_seeded_request_samples_the_same_tokens_alone_or_in_any_batch():
    alone = run_batch([("x", 1234)], sampler_seed=0)["x"]
    crowded = run_batch([("a", None), ("b", 5), ("x", 1234), ("c", None), ("d", 6)], sampler_seed=1)
    reordered = run_batch([("x", 1234), ("d", 6), ("c", None), ("b", 5)], sampler_seed=2)
    assert crowded["x"] == alone
    assert reordered["x"] == alone
    assert crowded["b"] == reordered["b"] and crowded["d"] == reordered["d"]
    assert len(set(alone)) > 1  # the steps really sample
    other_seed = run_batch([("x", 4321)], sampler_seed=0)["x"]
    assert other_seed != alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_seeded_requests_are_reproducible_on_cuda_with_cuda_or_cpu_generators(generator_device):
    run = functools.partial(run_batch, device="cuda", generator_device=generator_device)
    alone = run([("x", 1234)], sampler_seed=0)["x"]
    assert run([("a", None), ("b", 5), ("x", 1234), ("c", None)], sampler_seed=1)["x"] == alone
    assert run([("x", 1234), ("c", None), ("b", 5)], sampler_seed=2)["x"] == alone


# ---- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_the_raw_log_softmax_with_the_k_max_top_entries():
    logits = torch.randn(4, 50, generator=make_generator(5))
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        SamplingParams(temperature=0, logprobs=None),
        SamplingParams(temperature=0.5, top_k=3, logprobs=0),  # temperature and top-k do not change logprobs
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=1.2, seed=9, logprobs=5),
    ]
    out = Sampler().sample(logits, params, [None, None, None, make_generator(9)])
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    assert out.top_logprobs is not None and out.ranks is not None
    assert out.top_logprobs.token_ids.shape == (4, 5) and out.top_logprobs.logprobs.shape == (4, 5)
    top_values, top_ids = raw.topk(5, dim=-1)
    assert torch.equal(out.top_logprobs.logprobs, top_values)
    assert torch.equal(out.top_logprobs.token_ids, top_ids)
    expected_ranks = [int((raw[i] > raw[i, t]).sum()) + 1 for i, t in enumerate(out.token_ids.tolist())]
    assert out.ranks.tolist() == expected_ranks
    assert out.ranks[0] == 1 and out.ranks[2] == 1  # greedy rows chose the most likely token

    rows = out.tolist([p.logprobs for p in params])
    assert [r.token_id for r in rows] == out.token_ids.tolist()
    assert [len(r.top_token_ids) for r in rows] == [0, 0, 3, 5]
    assert rows[0].rank is None and rows[1].rank == expected_ranks[1]
    assert rows[2].top_token_ids == tuple(top_ids[2, :3].tolist())
    assert rows[2].top_logprobs == tuple(top_values[2, :3].tolist())
    assert rows[3].logprob == raw[3, rows[3].token_id].item()


def test_without_logprobs_there_are_no_ranks_or_top_entries():
    out = Sampler().sample(torch.randn(2, 10), [SamplingParams(temperature=0)] * 2, [None, None])
    assert out.ranks is None and out.top_logprobs is None
    assert [r.rank for r in out.tolist([None, None])] == [None, None]


# ---- masks (min_tokens) and penalties -------------------------------------------------------


def test_mask_ids_are_never_chosen():
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0], [0.0, 9.0, 8.0, 1.0]])
    before = logits.clone()
    out = Sampler().sample(logits, [SamplingParams(temperature=0)] * 2, [None, None], mask_ids=[[1], []])
    assert out.token_ids.tolist() == [2, 1]
    assert torch.equal(logits, before)
    # Logprobs stay the raw ones, even for a row whose mask changed the choice.
    assert out.logprobs[0].item() == torch.log_softmax(before[0], dim=-1)[2].item()

    freq = draw_frequencies(SamplingParams(temperature=1.0), seed=3)  # unmasked: id 3 is most likely
    assert freq[3] > 0.3
    batch = LOGITS.repeat(2000, 1)
    tokens = Sampler().sample(batch, [SamplingParams()] * 2000, [None] * 2000, mask_ids=[[3, 0]] * 2000).token_ids
    assert set(tokens.tolist()) == {1, 2, 4, 5}


def test_penalties_follow_vllm_exactly():
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5, 3.0]])
    out = apply_penalties(
        logits,
        prompt_token_ids=[[0]],
        output_token_ids=[[1, 2, 2]],
        presence=torch.tensor([0.25]),
        frequency=torch.tensor([0.5]),
        repetition=torch.tensor([2.0]),
    )
    # id 0 (prompt): 2/2; id 1 (output once): -1*2 - .5 - .25; id 2 (output twice): 1/2 - 1 - .25
    assert out.tolist() == [[1.0, -2.75, -0.75, 0.5, 3.0]]


def test_sampler_applies_penalties_before_choosing_and_needs_the_histories():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)]
    out = Sampler().sample(logits, params, [None], prompt_token_ids=[[0]], output_token_ids=[[]])
    assert out.token_ids.tolist() == [1]  # 3/2 = 1.5 < 2
    with pytest.raises(ValueError, match="penalties need"):
        Sampler().sample(logits, params, [None])


def test_shape_mismatches_are_refused():
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        Sampler().sample(torch.zeros(5), [SamplingParams()], [None])
    with pytest.raises(ValueError, match="batch of 2 rows got 1 params"):
        Sampler().sample(torch.zeros(2, 5), [SamplingParams()], [None, None])


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(42), make_generator(42)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
