"""``open_runtime(..., launcher="ray")``: the workers are placed as Ray actors on a local Ray
cluster (started for the runtime's lifetime), and still speak ZeroMQ: the same tokens as one
instance with room, borrowing across them, and everything stopped afterwards."""

from __future__ import annotations

import pytest
import trio

import infinillm
from infinillm import SamplingParams
from infinillm.testing import generate_all, outputs_alone

ray = pytest.importorskip("ray", reason="the optional extra infinillm[ray]")
BLOCK = 16
pytestmark = pytest.mark.slow


async def test_workers_placed_as_ray_actors_serve_and_lend(tiny_model):
    from infinillm.ray_launcher import RayWorkerProcess

    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompts = [[(i * 11 + j * 7) % 300 + 3 for j in range(n)] for i, n in enumerate([300, 60, 150])]
    want = [out.outputs[0].token_ids for out in await outputs_alone(tiny_model, prompts, params)]
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=16 * BLOCK,
                                      max_model_len=512, num_instances=3, launcher="ray") as rt:
        assert ray.is_initialized()
        assert all(isinstance(w.process, RayWorkerProcess) for w in rt.workers)
        spread = []
        with trio.fail_after(120):
            got = await generate_all(
                rt, prompts, params,
                lambda i, out: spread.extend(p for p in rt.statistics().placements.values() if len(p) > 1))
        assert got == [tuple(w) for w in want]
        assert spread  # the 300-token prompt needs more than one instance's 16 blocks
        s = await rt.sync_statistics()
        assert [i.instance_id for i in s.instances] == [0, 1, 2]
        assert all((i.kv_used_blocks, i.kv_lent_blocks, i.kv_borrowed_blocks) == (0, 0, 0) for i in s.instances)
        workers = rt.workers
    assert all(w.process.returncode == 0 for w in workers)
    assert not ray.is_initialized()  # the local cluster it started is gone
