"""Adversarial tests of the multi-instance runtime through its public API (workers as homes).

Each test here reproduces a bug an adversarial review found (now fixed); the comment above each
says what it was."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from infinillm import SamplingParams, ValidationError

BLOCK = 16


def _prompt(n, i=0):
    return {"prompt_token_ids": [(i * 11 + j * 7) % 300 + 3 for j in range(n)]}


# Found by review (fixed): Runtime.sync_statistics() called from a task that outlives the ``async with`` block (a
# monitoring task in an outer nursery) and still in flight when the runtime closes either
#  - raises IndexError("list index out of range"): WorkerHome.run is cancelled at close while
#    the Sync is in flight; its ``except Exception`` does not catch trio.Cancelled, its
#    ``finally`` sets ``done`` with an empty ``box`` and WorkerHome.request reads ``box[0]``; or
#  - hangs forever: its Sync was queued after WorkerHome.run stopped (``done`` is never set), or
#    it waits in ``await self._heard.wait()`` for a heartbeat that the cancelled
#    ``_receive_from_workers`` task will never deliver.
# Expected: a sync_statistics() pending when the runtime closes returns (the last statistics, as
# it does when called after close) or raises InfiniLLMError, promptly.
# Timing dependent: several monitors and up to three rounds make it show up reliably (it failed in
# 2 of 3 rounds here).
async def test_sync_statistics_in_flight_when_the_runtime_closes_returns(open_tiny):
    failures = []
    for round_ in range(3):
        with trio.fail_after(120):
            async with trio.open_nursery() as outer:
                async with open_tiny(max_model_len=256, num_instances=3, kv_capacity_tokens=16 * BLOCK) as rt:

                    async def monitor(rt=rt):
                        try:
                            with trio.fail_after(15):
                                while not rt.closed:
                                    await rt.sync_statistics()
                        except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                            failures.append(repr(e))

                    async def read(i, rt=rt):
                        async for _ in rt.generate(_prompt(40, i), SamplingParams(max_tokens=200, ignore_eos=True)):
                            pass

                    for _ in range(8):
                        outer.start_soon(monitor)
                    for i in range(6):
                        outer.start_soon(read, i)
                    await trio.sleep(0.3 + 0.2 * round_)
        assert failures == [], f"round {round_}: {failures}"


# Found by review: a stop string the control socket could not carry (a lone surrogate, over 1 MiB)
# was accepted, and the outcome depended on where the router placed the request (normal on
# instance 0, finish_reason="error" on a worker). Now refused where the parameters are made.
@pytest.mark.parametrize("stop, pattern", [
    ("\ud800", r"SamplingParams.stop='\\ud800' is invalid: must be valid Unicode: surrogates not allowed at index 0"),
    ("x" * 70_000, r"SamplingParams.stop='1 strings of 70000 UTF-8 bytes' is invalid: must be at most 65536 bytes in all"),
], ids=["lone-surrogate", "over-64KiB"])
def test_a_stop_string_the_wire_cannot_carry_is_refused(stop, pattern):
    with pytest.raises(ValidationError, match=pattern):
        SamplingParams(max_tokens=3, stop=[stop])


async def test_long_stop_strings_within_the_limit_are_served_alike_on_every_instance(open_tiny):
    params = SamplingParams(max_tokens=3, ignore_eos=True, stop=["x" * 30_000, "y" * 30_000])
    async with open_tiny(max_model_len=256, num_instances=3, kv_capacity_tokens=16 * BLOCK) as rt:
        finals = {}

        async def one(i):
            async for out in rt.generate(_prompt(10, i), params, request_id=f"r{i}"):
                finals[i] = out

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(6):  # six at once: the router puts two on each instance
                    nursery.start_soon(one, i)
        assert {o.outputs[0].finish_reason for o in finals.values()} == {"length"}
        s = await rt.sync_statistics()
        assert [i.kv_free_blocks for i in s.instances] == [16, 16, 16]


# Found by review (fixed): after the runtime is closed, ``await rt.sync_statistics()`` returns
# ``self.statistics()`` without a checkpoint, so it is never cancelled: a monitoring loop
# ``while True: await rt.sync_statistics()`` left running after the close spins forever and its
# cancel scope / fail_after can never fire. Expected: it checkpoints, as trio async APIs do.
async def test_sync_statistics_after_close_is_a_checkpoint(open_tiny):
    async with open_tiny(max_model_len=256, num_instances=3, kv_capacity_tokens=16 * BLOCK) as rt:
        pass
    with trio.testing.assert_checkpoints():
        await rt.sync_statistics()


# Found by review (fixed): the module docstring of homes.py says "a stream cannot tell where its request
# ran", but a request homed on a worker and aborted by the runtime's close ends with
# ``metrics.finished_time=None`` (RemoteOutput.final reuses the last, unfinished, delta's
# metrics; ``metrics`` is None if no token had arrived), while the same request homed on
# instance 0 ends with ``finished_time`` set (EngineRequest.snapshot(finished=True)).
async def test_a_request_aborted_by_the_close_ends_with_the_same_metrics_on_every_instance(open_tiny):
    finals, homes = {}, {}
    with trio.fail_after(120):
        async with trio.open_nursery() as outer:
            async with open_tiny(max_model_len=256, num_instances=3, kv_capacity_tokens=16 * BLOCK) as rt:

                async def one(i):
                    async for out in rt.generate(_prompt(30, i), SamplingParams(max_tokens=200, ignore_eos=True),
                                                 request_id=f"r{i}"):
                        homes.setdefault(i, rt.statistics().homes.get(f"r{i}"))
                        if out.finished:
                            finals[i] = out

                for i in range(6):
                    outer.start_soon(one, i)
                while len(homes) < 6:
                    await trio.sleep(0.01)
    assert sorted(homes.values()) == [0, 0, 1, 1, 2, 2]
    for i, out in finals.items():
        assert out.outputs[0].finish_reason == "abort"
        assert out.metrics is not None and out.metrics.finished_time is not None, (homes[i], out.metrics)
