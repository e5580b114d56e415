"""The public API end to end on a tiny random-weight model: generate, abort, statistics, bad input.

Each test opens its own runtime (the tiny model loads in milliseconds). Assertions are exact:
token counts, finish reasons, and every KV block free once the requests are done.
"""

from __future__ import annotations

import math

import pytest
import trio

import infinillm
from infinillm import RequestTooLongError, SamplingParams, ValidationError

BLOCK = 16


async def collect(stream):
    outs = [out async for out in stream]
    return outs


def assert_all_blocks_free(rt) -> None:
    inst = rt.statistics().instances[0]
    assert inst.kv_used_blocks == 0 and inst.kv_reserved_blocks == 0
    assert inst.kv_free_blocks == inst.kv_capacity_blocks
    assert rt.engine.tables.num_requests == 0


async def test_generate_streams_cumulative_outputs_and_finishes_once(open_tiny):
    async with open_tiny() as rt:
        outs = await collect(rt.generate("hello there", SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)))
        assert len(outs) == 7  # one snapshot per generated token
        assert [o.finished for o in outs] == [False] * 6 + [True]
        final = outs[-1].outputs[0]
        assert final.finish_reason == "length" and len(final.token_ids) == 7
        for a, b in zip(outs, outs[1:]):  # cumulative: each snapshot extends the previous
            assert b.outputs[0].text.startswith(a.outputs[0].text)
            assert tuple(b.outputs[0].token_ids[: len(a.outputs[0].token_ids)]) == tuple(a.outputs[0].token_ids)
        assert outs[-1].prompt == "hello there"
        assert_all_blocks_free(rt)
        s = rt.statistics()
        assert s.num_finished == 1 and s.instances[0].generated_tokens == 7


async def test_prompt_forms_and_logprobs(open_tiny):
    async with open_tiny() as rt:
        ids = rt.tokenizer.encode("one two three")
        by_text = await collect(rt.generate("one two three", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
        by_ids = await collect(rt.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
        assert by_ids[-1].outputs[0].token_ids == by_text[-1].outputs[0].token_ids
        assert by_ids[-1].prompt is None and tuple(by_ids[-1].prompt_token_ids) == tuple(ids)
        chat = [{"role": "user", "content": "hi"}]
        out = (await collect(rt.generate(chat, SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True))))[-1]
        c = out.outputs[0]
        assert len(c.logprobs) == 3
        for tok, entry in zip(c.token_ids, c.logprobs):
            assert tok in entry and entry[tok].rank == 1  # greedy picks the most likely token
            assert 2 <= len(entry) <= 3
        assert math.isclose(c.cumulative_logprob, sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)), rel_tol=1e-6)


async def test_seeded_sampling_is_reproducible(open_tiny):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    async with open_tiny() as rt:
        a = (await collect(rt.generate("seeded", params)))[-1].outputs[0].token_ids
        async with trio.open_nursery() as nursery:  # the same request again, inside a busy batch
            results = {}

            async def run(i, p):
                results[i] = (await collect(rt.generate("seeded" if i == 0 else f"other {i}", p)))[-1]

            nursery.start_soon(run, 0, params)
            for i in range(1, 5):
                nursery.start_soon(run, i, SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True))
        assert results[0].outputs[0].token_ids == a


async def test_fifty_streams_ten_aborted_midway_the_rest_complete_and_blocks_are_free(open_tiny):
    async with open_tiny(kv_capacity_tokens=2048) as rt:
        finals: dict[int, infinillm.RequestOutput] = {}

        async def consume(i: int) -> None:
            params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
            n = 0
            async for out in rt.generate(f"stream number {i}", params, request_id=f"r{i}"):
                n += 1
                finals[i] = out
                if i % 5 == 0 and n == 4:
                    if i % 10 == 0:
                        rt.abort(f"r{i}")  # abort by id: the stream ends with finish_reason abort
                    else:
                        break  # leave the loop early: the request is aborted too

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(consume, i)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(50):
            c = finals[i].outputs[0]
            if i % 10 == 0:
                assert finals[i].finished and c.finish_reason == "abort"
            elif i % 5 == 0:
                assert not finals[i].finished and len(c.token_ids) == 4  # left after the 4th
            else:
                assert finals[i].finished and c.finish_reason == "length" and len(c.token_ids) == 12
        with trio.fail_after(30):
            while rt.statistics().num_running or rt.statistics().num_aborted < 10:
                await trio.sleep(0.01)  # the early leavers' aborts land between two steps
        s = rt.statistics()
        assert s.num_finished == 40 and s.num_aborted == 10
        assert_all_blocks_free(rt)


async def test_bad_input_is_refused_at_the_call_and_the_runtime_keeps_serving(open_tiny):
    async with open_tiny(max_model_len=64) as rt:
        with pytest.raises(ValidationError, match=r"prompt='' is invalid: must be a non-empty string"):
            rt.generate("")
        with pytest.raises(ValidationError, match=r"prompt='<64 tokens>' is invalid: must be shorter than max_model_len=64 tokens"):
            rt.generate({"prompt_token_ids": [5] * 64})
        vocab = rt.engine.args.vocab_size
        with pytest.raises(ValidationError, match=rf"prompt_token_ids={vocab} is invalid: must be token ids in \[0, {vocab - 1}\]"):
            rt.generate({"prompt_token_ids": [1, vocab]})
        with pytest.raises(ValidationError, match=r"prompt_token_ids=\['a'\] is invalid: must be a list of int token ids"):
            rt.generate({"prompt_token_ids": ["a"]})
        with pytest.raises(ValidationError, match=r"SamplingParams\.temperature=-1 is invalid: must be in \[0, 1e\+06\] \(0 is greedy\)"):
            SamplingParams(temperature=-1)
        with pytest.raises(ValidationError, match=r"prompt\[0\]=\{'role': 'user'\} is invalid: a chat message needs string 'role' and 'content'"):
            rt.generate([{"role": "user"}])
        with pytest.raises(ValidationError, match=r"sampling_params='dict' is invalid: must be a SamplingParams"):
            rt.generate("x", {"max_tokens": 3})
        out = (await collect(rt.generate("still serving", SamplingParams(max_tokens=3, ignore_eos=True))))[-1]
        assert out.outputs[0].finish_reason == "length"
        assert_all_blocks_free(rt)


async def test_a_request_is_capped_at_max_model_len(open_tiny):
    # The KV cache holds max_model_len (128 tokens = 8 blocks), so every request fits: one asking
    # for more ends with "length" at max_model_len (100 prompt + 28 new tokens).
    async with open_tiny(kv_capacity_tokens=8 * BLOCK, max_model_len=128) as rt:
        out = (await collect(rt.generate({"prompt_token_ids": [3] * 100}, SamplingParams(max_tokens=70, ignore_eos=True))))[-1]
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 28


async def test_a_request_larger_than_the_cluster_is_rejected_with_the_numbers(open_tiny):
    # An instance whose cluster (the blocks it may borrow too) is smaller than max_model_len:
    # the engine refuses at the call what can never fit.
    from infinillm.config import CacheConfig, SchedulerConfig
    from infinillm.engine import Engine

    async with open_tiny() as rt:
        engine = Engine(rt.engine.model, rt.engine.args, rt.tokenizer, cache=CacheConfig(block_size=BLOCK),
                        scheduler=SchedulerConfig(), num_blocks=8, max_model_len=4096, cluster_blocks=8)
        with pytest.raises(RequestTooLongError, match=r"needs 11 KV blocks \(176 tokens\) but the cluster has 8 blocks \(128 tokens\)"):
            engine.check_request([3] * 100, SamplingParams(max_tokens=70))  # ceil(170/16) = 11
        assert engine.check_request([3] * 100, SamplingParams(max_tokens=28)) == 28  # ceil(128/16) = 8: fits exactly


async def test_memory_pressure_preempts_and_recomputes_without_changing_greedy_tokens(open_tiny):
    prompts = [f"pressure test {i} " * 3 for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    async with open_tiny(kv_capacity_tokens=4096) as rt:
        alone = [(await collect(rt.generate(p, params)))[-1].outputs[0].token_ids for p in prompts]
    # 12 blocks for 6 requests that each grow to ~4 blocks: some must be preempted and recomputed.
    async with open_tiny(kv_capacity_tokens=12 * BLOCK, max_model_len=12 * BLOCK) as rt:
        results = {}

        async def run(i):
            results[i] = (await collect(rt.generate(prompts[i], params)))[-1].outputs[0].token_ids

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(run, i)
        assert rt.statistics().instances[0].num_preemptions > 0
        assert [results[i] for i in range(len(prompts))] == alone
        assert_all_blocks_free(rt)


async def test_unknown_option_and_bad_config_fail_before_loading(tiny_model):
    with pytest.raises(ValidationError) as e:
        async with infinillm.open_runtime(model=tiny_model, block_sizes=16):
            pass  # pragma: no cover
    assert str(e.value) == (
        "block_sizes=16 is invalid: unknown option; known options: base_port, bind_host, block_size, cpu_kv_fraction, "
        "curve_public_key_file, curve_secret_key_file, curve_server_public_key_file, device, dtype, "
        "enable_prefix_caching, gpu_memory_utilization, heartbeat_interval_s, heartbeat_timeout_s, instance_mode, join_address, kv_capacity_tokens, "
        "launcher, "
        "max_lend_fraction, max_message_bytes, max_model_len, max_moves_per_step, max_num_batched_tokens, max_num_seqs, "
        "min_free_memory_fraction, "
        "model, num_instances, planner_interval_s, preemption_mode, request_timeout_s, reservation_ttl_s, seed, transport, worker_threads"
    )
    with pytest.raises(ValidationError) as e:
        async with infinillm.open_runtime(model="/no/such/model", device="cpu"):
            pass  # pragma: no cover
    assert str(e.value) == (
        "model='/no/such/model' is invalid: does not exist; "
        "must be a Hugging Face model folder (config.json, *.safetensors), a .gguf file, or 'smollm2'"
    )


async def test_a_failing_step_ends_its_requests_with_error_and_serving_goes_on(open_tiny):
    async with open_tiny() as rt:
        real_forward = rt.engine.model.forward
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # the third step blows up mid-generation
                raise RuntimeError("simulated device fault")
            return real_forward(*args, **kwargs)

        rt.engine.model.forward = flaky
        outs = await collect(rt.generate("doomed", SamplingParams(max_tokens=10, ignore_eos=True)))
        final = outs[-1]
        assert final.finished and final.outputs[0].finish_reason == "error"
        assert "simulated device fault" in final.error
        assert len(final.outputs[0].token_ids) == 2  # steps 1 and 2 produced a token each
        assert_all_blocks_free(rt)
        out = (await collect(rt.generate("survivor", SamplingParams(max_tokens=5, ignore_eos=True))))[-1]
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5
        assert rt.statistics().num_errors == 1


async def test_a_failing_step_ends_only_the_requests_in_that_step(open_tiny):
    # max_num_seqs=1: "doomed" runs alone while "waiting" waits in the engine; the step that
    # fails holds only "doomed", so only it ends with "error".
    async with open_tiny(max_num_seqs=1) as rt:
        real_forward = rt.engine.model.forward
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated device fault")
            return real_forward(*args, **kwargs)

        rt.engine.model.forward = flaky
        finals = {}

        async def run(name):
            finals[name] = (await collect(rt.generate(name, SamplingParams(max_tokens=5, ignore_eos=True), request_id=name)))[-1]

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "doomed")
                await trio.testing.wait_all_tasks_blocked()  # "doomed" is admitted first
                nursery.start_soon(run, "waiting")
        assert finals["doomed"].outputs[0].finish_reason == "error" and "simulated device fault" in finals["doomed"].error
        assert finals["waiting"].outputs[0].finish_reason == "length" and len(finals["waiting"].outputs[0].token_ids) == 5
        assert rt.statistics().num_errors == 1 and rt.statistics().num_finished == 1
        assert_all_blocks_free(rt)


async def test_the_runtime_seed_reaches_the_sampler_of_unseeded_requests(open_tiny):
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)  # no per-request seed

    async def sample(seed: int) -> tuple[int, ...]:
        async with open_tiny(seed=seed) as rt:
            return tuple((await collect(rt.generate("random", params)))[-1].outputs[0].token_ids)

    assert await sample(1) == await sample(1)
    assert await sample(1) != await sample(2)
