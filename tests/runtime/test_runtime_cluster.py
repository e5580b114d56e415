"""``open_runtime(num_instances=N)``: instance 0 here and N-1 worker processes, each the home of
the requests the router places on it and a lender to the others; through the public API only
(plus the leak checks, which probe the workers' pools through their peer sockets)."""

from __future__ import annotations

import pytest
import trio

import infinillm
from infinillm import SamplingParams, ValidationError
from infinillm.testing import generate_all, make_tiny_model
from infinillm.transport import CancelReservation, ReserveBlocks

BLOCK = 16


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny")))


PROMPTS = [[(i * 7 + j * 13) % 300 + 3 for j in range(n)] for i, n in enumerate([200, 40, 120])]
GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


async def test_three_instances_serve_what_one_with_room_serves(tiny_model):
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=1024,
                                      max_model_len=256) as rt:
        want = await generate_all(rt, PROMPTS, GREEDY)
    # 8 blocks here, and two workers lending 4 of their 8 each: 16 blocks for ~27 wanted.
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=8 * BLOCK,
                                      max_model_len=256, num_instances=3, max_num_batched_tokens=32) as rt:
        assert len(rt.workers) == 2
        snapshots = []
        got = await generate_all(rt, PROMPTS, GREEDY, lambda i, out: snapshots.append(rt.statistics()))
        assert got == want
        assert sorted(set(h for s in snapshots for h in s.homes.values())) == [0, 1, 2]  # the router used all three
        spread = [p for s in snapshots for p in s.placements.values() if len(p) > 1]
        assert spread and all(set(p) <= {0, 1, 2} for p in spread)
        for s in snapshots:  # the blocks away of the requests homed here are what this instance borrowed
            here = [p for rid, p in s.placements.items() if s.homes[rid] == 0]
            assert sum(n for p in here for i, n in p.items() if i != 0) == s.instances[0].kv_borrowed_blocks
        s = await rt.sync_statistics()
        assert [i.instance_id for i in s.instances] == [0, 1, 2]
        assert [i.kv_capacity_blocks for i in s.instances] == [8, 8, 8] and s.placements == {} and s.homes == {}
        assert [(i.kv_free_blocks, i.kv_lent_blocks, i.kv_borrowed_blocks) for i in s.instances] == [(8, 0, 0)] * 3
        workers = rt.workers
    assert all(w.process.returncode == 0 for w in workers)  # stopped with the runtime


async def test_aborts_and_close_free_blocks_on_the_workers(tiny_model):
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=8 * BLOCK,
                                      max_model_len=192, num_instances=2, max_num_batched_tokens=32) as rt:
        stream = rt.generate({"prompt_token_ids": PROMPTS[2]}, params, request_id="spread")  # 120 tokens
        async for out in stream:
            if len(rt.statistics().placements.get("spread", {})) == 2:
                break  # leaving the loop aborts it
        await stream.aclose()
        s = await rt.sync_statistics()  # its blocks on both instances are free again
        assert [(i.kv_free_blocks, i.kv_lent_blocks, i.kv_borrowed_blocks) for i in s.instances] == [(8, 0, 0)] * 2
        left = rt.generate({"prompt_token_ids": PROMPTS[2]}, params)  # left running at close
        await left.__anext__()
        async for _ in rt.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(max_tokens=2)):
            pass


async def test_many_instances_need_each_workers_capacity(tiny_model):
    with pytest.raises(ValidationError, match=r"kv_capacity_tokens=None is invalid: must be given with num_instances > 1"):
        async with infinillm.open_runtime(model=tiny_model, device="cpu", num_instances=2, max_model_len=256):
            pass  # pragma: no cover


@pytest.mark.slow
async def test_two_hundred_mixed_requests_with_random_aborts_leave_every_pool_empty(tiny_model):
    import random

    rng = random.Random(7)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=12 * BLOCK,
                                      max_model_len=256, num_instances=3, max_num_batched_tokens=64) as rt:
        ends: dict[str, str] = {}

        async def one(i: int) -> None:
            prompt = [(i * 7 + j) % 300 + 3 for j in range(rng.choice([5, 30, 90, 170]))]
            stop_after = rng.choice([None, None, 1, 5])
            stream = rt.generate({"prompt_token_ids": prompt}, params, request_id=f"r{i}")
            async for out in stream:
                if out.finished:
                    ends[f"r{i}"] = out.outputs[0].finish_reason
                elif stop_after is not None and len(out.outputs[0].token_ids) >= stop_after:
                    if i % 2:
                        rt.abort(f"r{i}")
                    else:
                        ends[f"r{i}"] = "left"
                        break
            await stream.aclose()  # returns once the runtime has let the request go

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
        assert len(ends) == 200
        assert set(ends.values()) <= {"length", "abort", "left"} and "abort" in ends.values()
        s = await rt.sync_statistics()
        assert s.num_finished + s.num_aborted == 200 and s.num_errors == 0
        assert sorted(set(s.homes.values())) == [] and s.num_running == s.num_waiting == 0
        # every pool is empty, nothing is lent or borrowed, and the ledger is the sum of the pools
        assert [(i.kv_free_blocks, i.kv_used_blocks, i.kv_lent_blocks, i.kv_borrowed_blocks, i.kv_reserved_blocks)
                for i in s.instances] == [(12, 0, 0, 0, 0)] * 3
        t = rt.ledger.totals()
        assert (t.capacity, t.free, t.used, t.lent, t.borrowed) == (36, 36, 0, 0, 0)
        for peer in rt.engine.peers.values():  # and the workers' own pools agree: all 6 lendable
            reply = await peer.client.request(ReserveBlocks(0, 6))
            assert reply.reservation_id is not None
            await peer.client.request(CancelReservation(reply.reservation_id))


async def test_cancelled_while_workers_start_leaves_no_worker_behind(tiny_model, monkeypatch):
    import infinillm.worker as worker_module

    started = []
    first_up = trio.Event()
    real = worker_module.open_worker

    @__import__("contextlib").asynccontextmanager
    async def recorded(*args, **kwargs):
        async with real(*args, **kwargs) as w:
            started.append(w.process)
            first_up.set()
            yield w

    monkeypatch.setattr(worker_module, "open_worker", recorded)
    with trio.move_on_after(120) as scope:  # cancelled as soon as the first worker is up
        async with trio.open_nursery() as nursery:

            async def cancel_when_one_is_up():
                await first_up.wait()
                scope.cancel()

            nursery.start_soon(cancel_when_one_is_up)
            async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=8 * BLOCK,
                                              max_model_len=192, num_instances=3):
                await trio.sleep_forever()  # pragma: no cover
    assert scope.cancelled_caught and started
    assert all(p.returncode is not None for p in started)  # every started worker was stopped and reaped


async def test_an_error_in_the_block_comes_out_as_itself_with_workers_too(tiny_model):
    with pytest.raises(KeyError, match="'nothing here'"):
        async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=8 * BLOCK,
                                          max_model_len=192, num_instances=2) as rt:
            workers = rt.workers
            raise KeyError("nothing here")
    assert all(w.process.returncode == 0 for w in workers)
