"""``infinillm.LLM`` (blocking) and ``infinillm.AsyncLLM`` (asyncio): the trio runtime on a
thread of its own, driven from plain Python and from asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

import infinillm
from infinillm import AsyncLLM, InfiniLLMError, LLM, SamplingParams, ValidationError


def options(tiny_model, device):
    return dict(model=tiny_model, kv_capacity_tokens=64 * 16, block_size=16, device=device, max_model_len=512)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_llm_generates_a_batch_in_order_and_matches_the_trio_runtime(tiny_model, device):
    prompts = ["the sea", "a lighthouse keeper", {"prompt_token_ids": [5, 6, 7]}]
    with LLM(**options(tiny_model, device)) as llm:
        outs = llm.generate(prompts, [greedy(4), greedy(6), greedy(5)])
        one = llm.generate("the sea", greedy(4))
        stats = llm.statistics()
    assert llm.closed
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 6, 5]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert outs[0].prompt == "the sea" and outs[1].prompt == "a lighthouse keeper"
    assert list(outs[2].prompt_token_ids) == [5, 6, 7]
    assert len(one) == 1 and one[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert stats.num_running == 0 and stats.num_finished == 4

    async def in_trio():
        async with infinillm.open_runtime(**options(tiny_model, device)) as rt:
            final = None
            async for final in rt.generate("a lighthouse keeper", greedy(6)):
                pass
            return final

    import trio

    assert trio.run(in_trio).outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_llm_bad_input_raises_and_the_runtime_goes_on(tiny_model, device):
    with LLM(**options(tiny_model, device)) as llm:
        with pytest.raises(ValidationError, match="max_tokens"):
            llm.generate(["ok", "fine"], [greedy(2), SamplingParams(max_tokens=0)])
        with pytest.raises(ValidationError, match="sampling_params"):
            llm.generate(["a", "b"], [greedy(2)])
        with pytest.raises(ValidationError, match="max_model_len=512"):
            llm.generate({"prompt_token_ids": [5] * 600}, greedy(2))
        assert llm.generate("still here", greedy(3))[0].outputs[0].finish_reason == "length"
        stats = llm.statistics()
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.kv_used_blocks == 0


def test_llm_refuses_a_bad_option_at_once_and_leaves_no_thread(tiny_model, device):
    before = threading.active_count()
    with pytest.raises(ValidationError, match="kv_capacity_tokens"):
        LLM(**{**options(tiny_model, device), "kv_capacity_tokens": -5})
    assert threading.active_count() == before


def test_llm_after_close_refuses_work_and_close_is_idempotent(tiny_model, device):
    llm = LLM(**options(tiny_model, device))
    llm.close()
    llm.close()
    with pytest.raises(InfiniLLMError, match="closed"):
        llm.generate("hello", greedy(2))
    assert llm.statistics().num_running == 0  # the last figures


def test_llm_abort_from_another_thread_ends_that_request(tiny_model, device):
    with LLM(**options(tiny_model, device)) as llm:

        def abort_when_running():
            while llm.statistics().num_running == 0:
                pass
            llm.abort("long")

        t = threading.Thread(target=abort_when_running)
        t.start()
        outs = llm.generate(["short", "long"], [greedy(2), greedy(400)], request_ids=["short", "long"])
        t.join()
    assert outs[0].outputs[0].finish_reason == "length"
    assert outs[1].outputs[0].finish_reason == "abort"


def test_async_llm_streams_and_cancelling_the_reader_aborts(tiny_model, device):
    async def main():
        async with AsyncLLM(**options(tiny_model, device)) as llm:
            texts = []
            async for out in llm.generate("the sea", greedy(5)):
                texts.append(out.outputs[0].text)
            assert out.finished and len(out.outputs[0].token_ids) == 5
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative

            first = asyncio.Event()

            async def reader():
                async for _ in llm.generate("long", greedy(400), request_id="cancelled"):
                    first.set()

            task = asyncio.create_task(reader())
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            async for out in llm.generate("early", greedy(400), request_id="left"):
                break  # leaving the loop closes the generator: aborted

            # Both ids are free again once their aborts are applied; a fresh request runs.
            final = None
            async for final in llm.generate("after", greedy(3)):
                pass
            assert final.outputs[0].finish_reason == "length"
            stats = llm.statistics()
            assert stats.num_running == 0 and stats.num_aborted == 2
        assert llm.closed

    asyncio.run(main())


def test_async_llm_close_ends_a_running_stream_with_abort(tiny_model, device):
    async def main():
        llm = AsyncLLM(**options(tiny_model, device))
        outs = []
        first = asyncio.Event()

        async def reader():
            async for out in llm.generate("long", greedy(450)):
                outs.append(out)
                first.set()

        task = asyncio.create_task(reader())
        await first.wait()
        await llm.close()
        await task
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(InfiniLLMError, match="closed"):
            async for _ in llm.generate("again", greedy(2)):
                pass

    asyncio.run(main())


def test_async_llm_bad_option_raises_when_awaited(tiny_model, device):
    async def main():
        with pytest.raises(ValidationError, match="block_size"):
            async with AsyncLLM(**{**options(tiny_model, device), "block_size": 7}):
                pass

    asyncio.run(main())


def test_async_llm_bad_input_raises_at_the_first_read(tiny_model, device):
    async def main():
        async with AsyncLLM(**options(tiny_model, device)) as llm:
            with pytest.raises(ValidationError, match="temperature"):
                async for _ in llm.generate("x", SamplingParams(temperature=-1)):
                    pass
            async for out in llm.generate("fine", greedy(2)):
                pass
            assert out.finished

    asyncio.run(main())


# ---- found by the adversarial review (each was a bug) ------------------------------------------


def test_a_batch_with_bad_input_starts_nothing_and_its_ids_stay_free(tiny_model, device):
    with LLM(**options(tiny_model, device)) as llm:
        with pytest.raises(ValidationError, match="prompt"):
            llm.generate(["good", ""], greedy(3), request_ids=["g1", "g2"])
        with pytest.raises(ValidationError, match="already in use"):
            llm.generate(["a", "b"], greedy(3), request_ids=["r1", "r1"])
        outs = llm.generate(["good", "fine"], greedy(3), request_ids=["g1", "r1"])  # at once: nothing holds them
        assert [o.request_id for o in outs] == ["g1", "r1"]
        stats = llm.statistics()
        assert stats.num_aborted == 0 and stats.num_finished == 2
        with pytest.raises(ValidationError, match="prompts="):
            llm.generate(5)
        with pytest.raises(ValidationError, match="request_ids="):
            llm.generate("x", request_ids="abc")
        assert llm.generate([]) == []


def test_an_interrupt_while_a_batch_starts_aborts_every_request_of_it(tiny_model, device):
    import _thread
    import random
    import time

    rng = random.Random(0)
    with LLM(**options(tiny_model, device)) as llm:
        for _ in range(4):
            before = llm.statistics().num_finished
            delay = rng.random() * 0.03
            # The interrupt lands at a random moment of the call (a deliberate delay, no condition).
            threading.Thread(target=lambda: (time.sleep(delay), _thread.interrupt_main())).start()  # sleep-ok
            with pytest.raises(KeyboardInterrupt):
                llm.generate(["hello"] * 200, greedy(400))  # seconds of work: the interrupt lands inside
            # Nothing of that call is left running: the next request is the only one that finishes.
            llm.generate("after", greedy(2))
            stats = llm.statistics()
            assert stats.num_finished == before + 1 and stats.num_running == 0 and stats.kv_used_blocks == 0


def test_a_dropped_llm_ends_its_runtime(tiny_model, device):
    import gc

    llm = LLM(**options(tiny_model, device))
    thread = llm._host._thread
    del llm
    gc.collect()
    thread.join(timeout=60)
    assert not thread.is_alive()


def test_async_llm_an_id_is_free_again_once_the_loop_is_left(tiny_model, device):
    async def main():
        async with AsyncLLM(**options(tiny_model, device)) as llm:
            for _ in range(3):
                # (A generator left by `break` is closed when asyncio finalizes it, later; closing
                # it, here by `aclosing`, aborts the request and returns once the id is free.)
                async with contextlib.aclosing(llm.generate("again", greedy(300), request_id="same")) as stream:
                    async for _ in stream:
                        break
            async for out in llm.generate("again", greedy(2), request_id="same"):
                pass
            assert out.outputs[0].finish_reason == "length"

    asyncio.run(main())


def test_async_llm_a_stream_whose_loop_closed_is_aborted(tiny_model, device):
    import trio

    llm = AsyncLLM(**options(tiny_model, device))

    async def start():
        await llm.ready()
        stream = llm.generate("hello", greedy(480), "orphan")
        await stream.__anext__()
        return stream

    loop = asyncio.new_event_loop()
    stream = loop.run_until_complete(start())
    loop.close()  # the loop is gone with the stream open: its next output finds no reader


    async def until_let_go():  # (on the runtime's thread: the request's own end, aborted or not)
        request = llm._host._runtime._requests.get("orphan")
        if request is not None:
            with trio.fail_after(60):
                await request.ended.wait()

    trio.from_thread.run(until_let_go, trio_token=llm._host._token)
    stats = llm.statistics()
    assert stats.num_running == 0 and stats.num_aborted == 1 and stats.num_finished == 0
    del stream
    asyncio.run(llm.close())
