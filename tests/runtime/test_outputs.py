"""The vLLM-shaped results: frozen snapshots, finish reasons, logprobs entries."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from infinillm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, make_logprobs_dict
from infinillm.sampling import Sampler, SamplingParams


def decode(token_id: int) -> str:
    return f"<{token_id}>"


def test_a_snapshot_does_not_change_when_the_runtime_keeps_appending():
    token_ids = [5, 6]
    logprobs = [{5: Logprob(-0.5, 1, "a")}, {6: Logprob(-0.25, 1, "b")}]
    completion = CompletionOutput(0, "ab", token_ids, -0.75, logprobs)
    token_ids.append(7)
    logprobs.append({7: Logprob(-1.0, 2, "c")})
    assert completion.token_ids == (5, 6)
    assert completion.logprobs == ({5: Logprob(-0.5, 1, "a")}, {6: Logprob(-0.25, 1, "b")})
    with pytest.raises(dataclasses.FrozenInstanceError):
        completion.text = "x"  # type: ignore[misc]


def test_completion_defaults_and_finished():
    running = CompletionOutput(index=0, text="Hi", token_ids=[1])
    assert (running.cumulative_logprob, running.logprobs, running.finish_reason, running.stop_reason) == (
        None,
        None,
        None,
        None,
    )
    assert not running.finished()
    done = CompletionOutput(0, "Hi", [1, 2], finish_reason="stop", stop_reason="###")
    assert done.finished() and done.stop_reason == "###"


@pytest.mark.parametrize("reason", ["stop", "length", "abort", "error"])
def test_every_finish_reason_is_accepted(reason):
    assert CompletionOutput(0, "", [], finish_reason=reason).finished()


def test_inconsistent_completions_are_refused():
    with pytest.raises(ValueError, match="finish_reason='done' is invalid"):
        CompletionOutput(0, "", [], finish_reason="done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stop_reason=7 needs finish_reason='stop', got 'length'"):
        CompletionOutput(0, "", [], finish_reason="length", stop_reason=7)


def test_request_output_is_finished_exactly_when_its_completions_are():
    running = CompletionOutput(0, "a", [1])
    done = CompletionOutput(0, "ab", [1, 2], finish_reason="length")
    first = RequestOutput("r1", "prompt", [9, 8], [running], finished=False)
    last = RequestOutput("r1", "prompt", [9, 8], [done], finished=True, metrics=RequestMetrics(arrival_time=1.0))
    assert first.prompt_token_ids == (9, 8) and first.outputs == (running,)
    assert last.outputs[0].text == "ab" and last.error is None and last.metrics is not None
    with pytest.raises(ValueError, match="finished=True disagrees"):
        RequestOutput("r1", "prompt", [9], [running], finished=True)
    with pytest.raises(ValueError, match="finished=False disagrees"):
        RequestOutput("r1", "prompt", [9], [done], finished=False)
    failed = RequestOutput(
        "r2", None, [9], [CompletionOutput(0, "", [], finish_reason="error")], finished=True, error="boom"
    )
    assert failed.error == "boom"


def test_logprobs_dict_puts_the_chosen_token_first_and_adds_it_when_outside_the_top():
    # chosen among the top: k entries
    assert make_logprobs_dict(4, -0.5, 1, [4, 2], [-0.5, -1.5], decode) == {
        4: Logprob(-0.5, 1, "<4>"),
        2: Logprob(-1.5, 2, "<2>"),
    }
    # chosen outside the top: k + 1 entries, the chosen one with its own rank, first
    entry = make_logprobs_dict(9, -3.0, 5, [4, 2], [-0.5, -1.5], decode)
    assert list(entry) == [9, 4, 2]
    assert entry[9] == Logprob(-3.0, 5, "<9>")
    # logprobs=0: only the chosen token
    assert make_logprobs_dict(9, -3.0, 5, [], [], decode) == {9: Logprob(-3.0, 5, "<9>")}


def test_sampler_rows_become_logprobs_entries():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    out = Sampler().sample(logits, [SamplingParams(temperature=0, logprobs=2)], [None])
    (row,) = out.tolist([2])
    raw = torch.log_softmax(logits[0], dim=-1).tolist()
    assert make_logprobs_dict(row.token_id, row.logprob, row.rank, row.top_token_ids, row.top_logprobs, decode) == {
        1: Logprob(raw[1], 1, "<1>"),
        2: Logprob(raw[2], 2, "<2>"),
    }
