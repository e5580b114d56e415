"""The gManager's planner moving KV blocks between instances while requests generate: the
tokens are exactly those of a run without moves, and every block is accounted for afterwards."""

from __future__ import annotations

import pytest
import trio

import infinillm
from infinillm import SamplingParams
from infinillm.testing import outputs_alone

BLOCK = 16
pytestmark = pytest.mark.slow


def prompt(n: int, i: int = 0) -> list[int]:
    return [(i * 11 + j * 7) % 300 + 3 for j in range(n)]


async def test_borrowed_blocks_come_home_when_the_home_has_room_again_without_changing_a_token(tiny_model):
    """A long request whose home is full borrows from the other instance; when the request
    that filled its home is aborted, the planner brings its blocks home (``MoveBlocks``,
    carried out between two steps) while it generates: the same tokens and logprobs as a run
    on one instance with room, and no block left anywhere afterwards."""
    blocker = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, logprobs=1)
    (want,) = await outputs_alone(tiny_model, [prompt(200, 2)], long)
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=16 * BLOCK,
                                      max_model_len=384, num_instances=2, planner_interval_s=0.05,
                                      max_num_batched_tokens=64) as rt:
        placements, finals, homes, aborted_at = [], {}, set(), []
        freed, long_done = trio.Event(), trio.Event()

        async def run(request_id, p, params, started):
            async for out in rt.generate({"prompt_token_ids": p}, params, request_id=request_id):
                if not started.is_set():
                    started.set()
                if request_id == "long":
                    s = rt.statistics()
                    if out.finished:
                        continue
                    placements.append(dict(s.placements.get("long", {})))
                    homes.add(s.homes["long"])
                    if len(placements[-1]) > 1 and not freed.is_set():  # it borrowed: free its home
                        freed.set()
                        aborted_at.append(len(placements))
                        rt.abort(next(b for b in ("b0", "b1") if s.homes.get(b) == s.homes["long"]))
            finals[request_id] = out
            if request_id == "long":
                long_done.set()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                # One blocker on each instance (7 blocks), then the long request (200 prompt
                # tokens, 13 blocks, prefilled in chunks of 64): its home (either) has 9 free,
                # so it borrows while it prefills; then the blocker at its home is aborted.
                for name, i in (("b0", 0), ("b1", 1), ("long", 2)):
                    started = trio.Event()
                    nursery.start_soon(run, name, prompt(110 if name != "long" else 200, i),
                                       blocker if name != "long" else long, started)
                    await started.wait()
                await long_done.wait()
                for name in ("b0", "b1"):
                    rt.abort(name)
        got = finals["long"]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for g, w in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
            (tok,) = [t for t in w if w[t].rank == 1]
            assert abs(g[tok].logprob - w[tok].logprob) < 1e-3
        (home,) = homes
        away = [sum(n for i, n in p.items() if i != home) for p in placements]
        assert max(away) > 0, "the long request never borrowed"
        (at,) = aborted_at
        # Its home has room again: the planner brings blocks home (all but what the other
        # instance's blocker may have borrowed from it meanwhile).
        assert min(away[at:]) < away[at - 1], "its blocks never came home"
        assert rt.num_moves >= 1
        s = await rt.sync_statistics()
        for i in s.instances:
            assert (i.kv_used_blocks, i.kv_lent_blocks, i.kv_borrowed_blocks, i.kv_reserved_blocks) == (0, 0, 0, 0), i
