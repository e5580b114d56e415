"""Memory pressure on the instances' devices (another process takes memory), played by a test
double for NVML (``infinillm.testing.FileMemoryProbe``: no GPU on this machine; each process,
workers included, reads the memory the test writes in a file): lending stops, and resumes
when the memory comes back. Readings reach ``statistics()`` through the heartbeats."""

from __future__ import annotations

import os

import pytest
import trio

import infinillm
from infinillm import SamplingParams

BLOCK = 16
pytestmark = pytest.mark.slow


async def test_lending_stops_under_memory_pressure_and_resumes_after(tiny_model, tmp_path, monkeypatch):
    memory = tmp_path / "device-memory"

    def write(text):  # whole, as a probe would read it (a file written in place may be read half-written)
        (tmp_path / "next").write_text(text)
        os.replace(tmp_path / "next", memory)

    write("1000 500")  # half free: no pressure
    monkeypatch.setenv("INFINILLM_FAKE_MEMORY_FILE", str(memory))
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=16 * BLOCK,
                                      max_model_len=384, num_instances=2) as rt:
        s = await rt.sync_statistics()
        assert [(i.max_lent_blocks, i.memory_total_bytes, i.memory_free_bytes) for i in s.instances] == [(8, 1000, 500)] * 2

        write("1000 20")  # 2% free: other processes took the device's memory
        s = await rt.sync_statistics()
        assert [(i.max_lent_blocks, i.memory_free_bytes) for i in s.instances] == [(0, 20)] * 2

        # A request larger than any one instance needs a loan: it waits while nobody may lend.
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        prompt = {"prompt_token_ids": [(j * 7) % 300 + 3 for j in range(260)]}  # 300 tokens: 19 blocks
        stream = rt.generate(prompt, params, request_id="big")
        outs = []

        async def read():
            async for out in stream:
                outs.append(out)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                s = await rt.sync_statistics()
                assert s.num_waiting == 1 and s.num_running == 0 and not outs
                assert all(i.kv_borrowed_blocks == 0 and i.kv_lent_blocks == 0 for i in s.instances)

                write("1000 170")  # 17%: pressure gone, lending resumes
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 40
        s = await rt.sync_statistics()
        assert [i.max_lent_blocks for i in s.instances] == [8, 8]
        assert all((i.kv_used_blocks, i.kv_lent_blocks, i.kv_borrowed_blocks) == (0, 0, 0) for i in s.instances)
