"""A request's life through the public API, as a vLLM user expects it, at every stage.

Interleavings are made deterministic with ``StepGate``: it holds an engine step in its worker
thread until the test lets it go, so a test can act *while a step runs* (abort, close, read)
and then check what happened, with no sleeps. The gate also records every engine call made
from outside the step's thread while a step runs: the runtime must make none.
"""

from __future__ import annotations

import gc
import threading

import pytest
import trio
import trio.testing

import infinillm
from infinillm import InfiniLLMError, SamplingParams, ValidationError
from infinillm.testing import assert_runtime_idle, make_tiny_model

BLOCK = 16
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


class StepGate:
    """Holds the next engine step (once armed) in its worker thread until ``release()``.

    ``held`` is set (on the trio side) when a held step is waiting; ``violations`` lists the
    engine calls made from another thread while a step ran.
    """

    def __init__(self, rt) -> None:
        self.engine = rt.engine
        self._token = trio.lowlevel.current_trio_token()
        self._armed = False
        self._release = threading.Event()  # the held step's
        self._step_thread: int | None = None
        self.held = trio.Event()
        self.violations: list[str] = []
        real_step = self.engine.step
        self.engine.step = lambda: self._step(real_step)
        for name in ("add_request", "abort", "fail", "statistics"):
            self._watch(name)

    def arm(self) -> None:
        """Hold the next step (a step held now stays held until ``release``)."""
        self._armed = True
        self.held = trio.Event()

    def release(self) -> None:
        self._release.set()

    def _step(self, real_step):
        self._step_thread = threading.get_ident()
        try:
            if self._armed:
                self._armed = False
                release = self._release = threading.Event()
                trio.from_thread.run_sync(self.held.set, trio_token=self._token)
                assert release.wait(timeout=20), "the test never released the step"
            return real_step()
        finally:
            self._step_thread = None

    def _watch(self, name: str) -> None:
        real = getattr(self.engine, name)

        def watched(*args, **kwargs):
            if self._step_thread is not None and self._step_thread != threading.get_ident():
                self.violations.append(name)
            return real(*args, **kwargs)

        setattr(self.engine, name, watched)


async def consume(stream, into: list) -> None:
    async for out in stream:
        into.append(out)


async def release_when_all_blocked(gate: StepGate) -> None:
    """Release the held step once every other task waits (e.g. the runtime's close on it)."""
    await trio.testing.wait_all_tasks_blocked()
    gate.release()


def reason(outs: list) -> str | None:
    return outs[-1].outputs[0].finish_reason if outs else None


# ---- request ids ----------------------------------------------------------------------------


async def test_a_request_id_is_taken_at_the_call_and_free_again_when_its_stream_ends(open_tiny):
    async with open_tiny() as rt:
        first = rt.generate("one", GREEDY, request_id="dup")
        with pytest.raises(ValidationError, match="request_id='dup' is invalid: is already in use by a live request"):
            rt.generate("two", GREEDY, request_id="dup")  # before either stream is read
        outs = [out async for out in first]
        assert reason(outs) == "length" and len(outs[-1].outputs[0].token_ids) == 6
        again = [out async for out in rt.generate("two", GREEDY, request_id="dup")]  # ended: free
        assert reason(again) == "length"


async def test_a_request_id_is_free_again_once_its_stream_is_closed_or_dropped(open_tiny):
    async with open_tiny() as rt:
        await rt.generate("never read", GREEDY, request_id="a").aclose()
        stream = rt.generate("read once", GREEDY, request_id="a")
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()  # aborted; returns once the runtime has let the request go
        assert "a" not in rt._requests
        rt.generate("dropped unread", GREEDY, request_id="a")  # dropped at once
        gc.collect()
        outs = [out async for out in rt.generate("last", GREEDY, request_id="a")]
        assert reason(outs) == "length"
        assert rt.statistics().num_aborted == 1  # the one read once; the unread never started
        assert_runtime_idle(rt)


async def test_two_streams_with_one_id_cannot_both_exist_so_every_stream_ends(open_tiny):
    async with open_tiny() as rt:
        results: dict[str, list] = {"a": [], "b": []}
        a = rt.generate("first", GREEDY, request_id="same")
        with pytest.raises(ValidationError, match="request_id='same'"):
            rt.generate("second", GREEDY, request_id="same")
        with trio.fail_after(60):
            await consume(a, results["a"])
        assert reason(results["a"]) == "length"


# ---- reading after close, errors out of the block -------------------------------------------


async def test_a_stream_first_read_after_the_runtime_closed_raises_instead_of_waiting(open_tiny):
    async with open_tiny() as rt:
        stream = rt.generate("late", GREEDY)
    with trio.fail_after(10):
        with pytest.raises(InfiniLLMError, match="the runtime is closed: request '[0-9a-f]+' was never started"):
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):  # and it stays ended
            await stream.__anext__()
    with pytest.raises(InfiniLLMError, match=r"the runtime is closed: generate\(\) needs an open runtime"):
        rt.generate("after close")


async def test_an_error_raised_in_the_block_comes_out_as_itself(open_tiny):
    with pytest.raises(infinillm.CapacityError, match="out of room") as info:
        async with open_tiny():
            raise infinillm.CapacityError("out of room")
    assert type(info.value) is infinillm.CapacityError
    with pytest.raises(KeyError):
        async with open_tiny():
            {}["missing"]
    try:  # the plain `except` a user writes works
        async with open_tiny() as rt:
            rt.generate("")
    except infinillm.ValidationError as e:
        assert "prompt='' is invalid: must be a non-empty string" in str(e)
    else:  # pragma: no cover
        pytest.fail("no ValidationError")


async def test_cancelling_the_block_from_outside_stops_the_runtime_cleanly(open_tiny):
    with trio.move_on_after(60) as outer:
        async with open_tiny() as rt:
            stream = rt.generate("cancelled", SamplingParams(max_tokens=400, ignore_eos=True))
            await stream.__anext__()
            outer.cancel()
            await trio.sleep_forever()
    assert outer.cancelled_caught
    assert rt.closed
    assert_runtime_idle(rt)


# ---- aborts at every stage -------------------------------------------------------------------


async def test_abort_before_the_first_read_ends_the_stream_with_an_abort_output(open_tiny):
    async with open_tiny() as rt:
        stream = rt.generate("aborted early", GREEDY, request_id="x")
        rt.abort("x")
        outs = [out async for out in stream]
        assert len(outs) == 1 and outs[0].finished and reason(outs) == "abort"
        assert list(outs[0].outputs[0].token_ids) == [] and outs[0].prompt == "aborted early"
        assert rt.statistics().num_aborted == 1
        rt.abort("x")  # unknown now: a no-op
        rt.abort("never-existed")


async def test_abort_while_queued_behind_a_running_step_gives_a_final_abort_output(open_tiny):
    async with open_tiny() as rt:
        gate = StepGate(rt)
        long_outs, queued_outs = [], []
        async with trio.open_nursery() as nursery:
            gate.arm()
            nursery.start_soon(consume, rt.generate("x " * 200, GREEDY, request_id="long"), long_outs)
            await gate.held.wait()  # the long prompt's first step runs in its thread
            nursery.start_soon(consume, rt.generate("queued", GREEDY, request_id="q"), queued_outs)
            await trio.testing.wait_all_tasks_blocked()
            assert "q" in rt._queue  # iterated, not admitted: the engine is busy
            rt.abort("q")
            gate.release()
        assert len(queued_outs) == 1 and reason(queued_outs) == "abort"
        assert queued_outs[0].outputs[0].token_ids == ()
        assert reason(long_outs) == "length"
        assert gate.violations == []


async def test_abort_while_waiting_in_the_engine_never_scheduled(open_tiny):
    async with open_tiny(max_num_seqs=1) as rt:
        gate = StepGate(rt)
        first, waiting = [], []
        async with trio.open_nursery() as nursery:
            gate.arm()
            nursery.start_soon(consume, rt.generate("runs", SamplingParams(max_tokens=20, ignore_eos=True)), first)
            await gate.held.wait()  # the first request's first step
            nursery.start_soon(consume, rt.generate("waits", GREEDY, request_id="w"), waiting)
            await trio.testing.wait_all_tasks_blocked()  # queued in the runtime
            gate.arm()
            gate.release()
            await gate.held.wait()  # the second step: "w" is in the engine, waiting (max_num_seqs=1)
            engine_req = next(r for r in rt.engine.requests.values() if r.request_id == "w")
            assert engine_req.first_scheduled_at is None  # admitted to the engine, never scheduled
            rt.abort("w")
            gate.release()
        assert len(waiting) == 1 and reason(waiting) == "abort"
        assert reason(first) == "length" and len(first[-1].outputs[0].token_ids) == 20
        assert gate.violations == []


async def test_abort_in_the_middle_of_a_chunked_prefill(open_tiny):
    # 300 prompt tokens in chunks of at most 64: five prefill steps before the first token.
    async with open_tiny(max_num_batched_tokens=64) as rt:
        gate = StepGate(rt)
        outs = []
        prompt = {"prompt_token_ids": [7] * 300}
        async with trio.open_nursery() as nursery:
            gate.arm()
            nursery.start_soon(consume, rt.generate(prompt, GREEDY, request_id="p"), outs)
            await gate.held.wait()
            for _ in range(2):  # let two chunks run, hold the third
                gate.arm()
                gate.release()
                await gate.held.wait()
            assert rt.engine.num_steps == 2 and outs == []
            rt.abort("p")
            gate.release()
        assert len(outs) == 1 and reason(outs) == "abort" and outs[0].outputs[0].token_ids == ()
        assert rt.engine.num_steps == 3  # the chunk in flight ran; nothing after the abort
        assert gate.violations == []
        assert_runtime_idle(rt)


async def test_abort_of_a_preempted_request(open_tiny):
    # 6 blocks for three requests that each grow to 3 blocks: one is preempted (recompute).
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    async with open_tiny(kv_capacity_tokens=6 * BLOCK, max_model_len=96) as rt:
        gate = StepGate(rt)
        outs: dict[int, list] = {i: [] for i in range(3)}
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(consume, rt.generate({"prompt_token_ids": [5 + i] * 8}, params, request_id=f"r{i}"), outs[i])
            while True:
                gate.arm()
                await gate.held.wait()
                preempted = [r for r in rt.engine.requests.values() if r.num_preemptions and r.request_id]
                if preempted:
                    break
                gate.release()
            victim = preempted[0].request_id
            rt.abort(victim)
            gate.release()
        by_id = {f"r{i}": outs[i] for i in range(3)}
        assert reason(by_id[victim]) == "abort"
        assert sorted(reason(o) for o in by_id.values()) == ["abort", "length", "length"]
        assert gate.violations == []


async def test_a_consumer_task_cancelled_mid_stream_aborts_its_request(open_tiny):
    async with open_tiny() as rt:
        seen = []
        with trio.CancelScope() as scope:
            async for out in rt.generate("cancel me", SamplingParams(max_tokens=300, ignore_eos=True), request_id="c"):
                seen.append(out)
                if len(seen) == 3:
                    scope.cancel()
                    await trio.lowlevel.checkpoint()  # Cancelled here, inside the loop
        assert len(seen) == 3 and scope.cancelled_caught
        gc.collect()
        while "c" in rt._requests:  # the dropped stream's abort lands between two steps
            await trio.testing.wait_all_tasks_blocked()
            await trio.lowlevel.checkpoint()
        assert rt.statistics().num_aborted == 1
        assert_runtime_idle(rt)


async def test_aclose_from_another_task_ends_the_consumers_loop_cleanly(open_tiny):
    async with open_tiny() as rt:
        gate = StepGate(rt)
        stream = rt.generate("closed elsewhere", SamplingParams(max_tokens=300, ignore_eos=True), request_id="z")
        outs = []
        async with trio.open_nursery() as nursery:
            gate.arm()
            nursery.start_soon(consume, stream, outs)  # must end without an exception
            await gate.held.wait()  # the consumer waits for the first output
            nursery.start_soon(release_when_all_blocked, gate)
            await stream.aclose()  # returns once the request is gone
            assert "z" not in rt._requests
        assert outs == [] or not outs[-1].finished
        assert gate.violations == []
        assert_runtime_idle(rt)


async def test_closing_the_runtime_while_a_step_runs_waits_for_it_and_ends_every_stream(open_tiny):
    running, queued = [], []
    async with trio.open_nursery() as outer:  # the consumers outlive the runtime's block
        async with open_tiny() as rt:
            gate = StepGate(rt)
            gate.arm()
            outer.start_soon(consume, rt.generate("in flight", SamplingParams(max_tokens=300, ignore_eos=True)), running)
            await gate.held.wait()
            outer.start_soon(consume, rt.generate("still queued", GREEDY), queued)
            await trio.testing.wait_all_tasks_blocked()
            rt.abort("nothing")  # unknown: no-op
            outer.start_soon(release_when_all_blocked, gate)  # once the close waits on the step
    assert reason(running) == "abort" and running[-1].finished
    assert len(queued) == 1 and reason(queued) == "abort"
    assert gate.violations == []  # the close never touched the engine while the step ran
    assert rt.statistics().num_aborted == 2
    assert_runtime_idle(rt)


async def test_statistics_while_a_step_runs_do_not_read_the_engine(open_tiny):
    async with open_tiny() as rt:
        gate = StepGate(rt)
        outs = []
        async with trio.open_nursery() as nursery:
            gate.arm()
            nursery.start_soon(consume, rt.generate("stats", GREEDY), outs)
            await gate.held.wait()
            s = rt.statistics()  # the figures from just before the step
            assert s.num_running + s.num_waiting == 1
            gate.release()
        assert gate.violations == []


# ---- what is refused, with the numbers ---------------------------------------------------------


async def test_every_public_check_names_the_value_and_the_limit(open_tiny):
    async with open_tiny(max_model_len=64) as rt:
        vocab = rt.engine.args.vocab_size
        with pytest.raises(ValidationError, match="request_id='' is invalid: must be a non-empty string"):
            rt.generate("x", request_id="")
        with pytest.raises(ValidationError, match="request_id=7 is invalid: must be a non-empty string"):
            rt.generate("x", request_id=7)
        with pytest.raises(ValidationError, match=r"prompt keys=\['ids'\] is invalid: a dict prompt must have exactly one key, 'prompt_token_ids'"):
            rt.generate({"ids": [1, 2]})
        with pytest.raises(ValidationError, match=r"prompt keys=\['extra', 'prompt_token_ids'\] is invalid"):
            rt.generate({"prompt_token_ids": [1], "extra": 1})
        with pytest.raises(ValidationError, match=r"prompt_token_ids=\[\] is invalid: must hold at least one token"):
            rt.generate({"prompt_token_ids": []})
        with pytest.raises(ValidationError, match=rf"prompt_token_ids=-1 is invalid: must be token ids in \[0, {vocab - 1}\]"):
            rt.generate({"prompt_token_ids": [3, -1]})
        with pytest.raises(ValidationError, match=rf"prompt_token_ids={vocab} is invalid: must be token ids in \[0, {vocab - 1}\]"):
            rt.generate({"prompt_token_ids": [vocab]})
        with pytest.raises(ValidationError, match=r"prompt_token_ids=\['a'\] is invalid: must be a list of int token ids"):
            rt.generate({"prompt_token_ids": ["a"]})
        with pytest.raises(ValidationError, match=r"prompt_token_ids=\[True\] is invalid: must be a list of int token ids"):
            rt.generate({"prompt_token_ids": [True]})
        with pytest.raises(ValidationError, match="prompt='<64 tokens>' is invalid: must be shorter than max_model_len=64 tokens"):
            rt.generate({"prompt_token_ids": [5] * 64})
        with pytest.raises(ValidationError, match=r"prompt=\[\] is invalid: must be a string, a list of chat messages"):
            rt.generate([])
        with pytest.raises(ValidationError, match=r"prompt\[0\]=\{'role': 'user'\} is invalid: a chat message needs string 'role' and 'content'"):
            rt.generate([{"role": "user"}])
        with pytest.raises(ValidationError, match="sampling_params='dict' is invalid: must be a SamplingParams"):
            rt.generate("x", {"max_tokens": 3})
        assert rt._requests == {}  # nothing refused took an id
        outs = [out async for out in rt.generate("still serving", GREEDY)]
        assert reason(outs) == "length"


@pytest.mark.skipif(infinillm.runtime.torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
async def test_cuda_without_a_gpu_is_refused_before_loading(tiny_model):
    with pytest.raises(ValidationError, match="device='cuda' is invalid: needs a CUDA device, and torch sees none"):
        async with infinillm.open_runtime(model=tiny_model, device="cuda"):
            pass  # pragma: no cover


async def test_max_model_len_beyond_the_models_positions_is_refused_at_open(open_tiny):
    # The tiny model encodes 2048 positions.
    with pytest.raises(ValidationError, match="max_model_len=4096 is invalid: must be <= the model's max_position_embeddings=2048"):
        async with open_tiny(max_model_len=4096, kv_capacity_tokens=8192):
            pass  # pragma: no cover


async def test_a_kv_cache_smaller_than_max_model_len_is_refused_at_open(open_tiny, tiny_model):
    # 512 tokens need ceil(512 / 16) = 32 blocks; 400 tokens of capacity are 25 blocks.
    with pytest.raises(ValidationError, match=r"max_model_len=512 is invalid: needs 32 KV blocks of 16 tokens, but the KV cache holds 25 blocks \(400 tokens\)"):
        async with open_tiny(kv_capacity_tokens=400):
            pass  # pragma: no cover
    # Without max_model_len, the model's own 2048 positions would need 128 blocks: the length
    # is what the cache holds instead, and a longer prompt is refused at generate().
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=1024) as rt:
        assert rt.engine.max_model_len == 1024
        with pytest.raises(ValidationError, match="max_model_len=1024"):
            rt.generate({"prompt_token_ids": [5] * 1024})


async def test_a_string_prompt_is_encoded_as_hugging_face_does_with_special_tokens(open_tiny, tmp_path):
    import json

    from infinillm.testing import import_transformers

    folder = make_tiny_model(tmp_path / "bos")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["post_processor"] = {  # the tokenizer adds a BOS (<|endoftext|>, id 0), as Llama's do
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    theirs = import_transformers().AutoTokenizer.from_pretrained(folder)
    async with open_tiny(model=str(folder)) as rt:
        outs = [o async for o in rt.generate("hello world", SamplingParams(max_tokens=1))]
        assert list(outs[-1].prompt_token_ids) == theirs("hello world")["input_ids"]
        assert outs[-1].prompt_token_ids[0] == 0  # the BOS
        chat = [{"role": "user", "content": "hi"}]
        outs = [o async for o in rt.generate(chat, SamplingParams(max_tokens=1))]
        assert outs[-1].prompt_token_ids[0] == 1  # <|im_start|>: the template's own, no BOS added


async def test_generation_tokens_per_s_is_a_recent_rate_and_zero_when_idle(open_tiny, mock_clock):
    mock_clock.rate = 1.0  # virtual time follows real time, and can jump
    async with open_tiny() as rt:
        assert rt.statistics().generation_tokens_per_s == 0.0
        rates = []
        async for out in rt.generate("busy", SamplingParams(max_tokens=300, ignore_eos=True)):
            if len(out.outputs[0].token_ids) in (20, 40):
                rates.append(rt.statistics().generation_tokens_per_s)
            if len(out.outputs[0].token_ids) == 40:
                mock_clock.jump(11)  # a stall longer than the window: the steps before it age out
                await trio.sleep(0)
            if len(out.outputs[0].token_ids) == 50:
                rates.append(rt.statistics().generation_tokens_per_s)
        assert rates[0] > 0 and rates[1] > 0  # while generating
        assert rates[2] > 0 and rates[2] != rates[1]  # measured over the steps after the stall only
        assert rt.statistics().generation_tokens_per_s == 0.0  # idle: nothing running or waiting


# ---- found by trying to break it -------------------------------------------------------------


@pytest.mark.parametrize("how", ["aclose", "drop"])
async def test_closing_a_finished_unread_stream_leaves_the_request_that_reused_its_id_alone(open_tiny, how):
    async with open_tiny() as rt:
        a = rt.generate("first", SamplingParams(max_tokens=3, ignore_eos=True), request_id="x")
        await a.__anext__()
        await a._request.ended.wait()  # a has finished; its last outputs sit unread in its stream
        b = rt.generate("second", SamplingParams(max_tokens=20, ignore_eos=True), request_id="x")
        outs = [await b.__anext__()]
        if how == "aclose":
            await a.aclose()
        else:
            del a
            gc.collect()
        outs += [out async for out in b]
        assert reason(outs) == "length" and len(outs[-1].outputs[0].token_ids) == 20


async def test_two_tasks_reading_one_stream_both_end_cleanly(open_tiny):
    async with open_tiny() as rt:
        stream = rt.generate("shared", SamplingParams(max_tokens=10, ignore_eos=True))
        seen: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, stream, seen)
            nursery.start_soon(consume, stream, seen)
        assert len(seen) == 10 and seen[-1].finished  # every output once, between the two


async def test_stop_token_ids_outside_the_vocabulary_are_refused_at_the_call(open_tiny):
    async with open_tiny() as rt:
        vocab = rt.engine.args.vocab_size
        with pytest.raises(ValidationError, match=rf"stop_token_ids=100000 is invalid: must be token ids in \[0, {vocab - 1}\]"):
            rt.generate("hi", SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=[3, 100_000]))
        outs = [o async for o in rt.generate("hi", SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=[vocab - 1]))]
        assert outs[-1].finished


async def test_a_prompt_that_is_not_valid_unicode_is_refused(open_tiny):
    async with open_tiny() as rt:
        with pytest.raises(ValidationError, match=r"prompt='a\\ud800b' is invalid: must be valid Unicode: surrogates not allowed at index 1"):
            rt.generate("a\ud800b")
        with pytest.raises(ValidationError, match=r"prompt\[0\]\['content'\]='a\\ud800b' is invalid: must be valid Unicode"):
            rt.generate([{"role": "user", "content": "a\ud800b"}])


async def test_statistics_from_another_thread_and_after_the_run(open_tiny):
    async with open_tiny() as rt:
        outs = [o async for o in rt.generate("count me", SamplingParams(max_tokens=4, ignore_eos=True))]
        s = await trio.to_thread.run_sync(rt.statistics)  # taken on the runtime's thread
        assert s.num_finished == 1 and s.instances[0].generated_tokens == 4 == len(outs)


def test_statistics_after_trio_run_returned(tmp_path):
    folder = make_tiny_model(tmp_path / "m")

    async def main():
        async with infinillm.open_runtime(model=str(folder), device="cpu", kv_capacity_tokens=1024, max_model_len=512) as rt:
            [o async for o in rt.generate("count me", SamplingParams(max_tokens=4, ignore_eos=True))]
        return rt

    rt = trio.run(main)
    s = rt.statistics()
    assert s.num_finished == 1 and s.generation_tokens_per_s == 0.0 and s.instances[0].generated_tokens == 4


async def test_max_model_len_below_two_is_refused(open_tiny):
    with pytest.raises(ValidationError, match=r"ModelConfig.max_model_len=1 is invalid: must be in \[2, 2147483648\]"):
        async with open_tiny(max_model_len=1):
            pass  # pragma: no cover
