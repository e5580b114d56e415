"""A worker on another host joins a running runtime over tcp with CURVE (``infinillm worker
--join ADDR --key FILE``), here on loopback: it becomes a member (lends, serves requests, shows
in ``statistics()``); a worker with the wrong key is refused and counted; a joined worker stops
by itself once its runtime is gone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

import infinillm
from infinillm import SamplingParams
from infinillm.testing import generate_all, make_tiny_model, outputs_alone
from infinillm.transport.auth import generate_keypair

BLOCK = 16
pytestmark = pytest.mark.slow


def prompt(n: int, i: int = 0) -> list[int]:
    return [(i * 11 + j * 7) % 300 + 3 for j in range(n)]


async def start_worker(tiny_model, join_address, key, *extra):
    argv = [sys.executable, "-m", "infinillm.cli", "worker", "--join", join_address, "--key", str(key),
            "--model", tiny_model, "--num-blocks", "16", *extra]
    return await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE)


async def first_line(stream) -> str:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        line += chunk
    return line.decode()


async def test_a_worker_joins_over_tcp_with_curve_serves_and_lends_and_a_wrong_key_is_refused(tiny_model, tmp_path):
    public, secret = generate_keypair(tmp_path / "keys", "cluster")
    _, intruder = generate_keypair(tmp_path / "other", "intruder")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = [prompt(140, i) for i in range(3)]  # 160 tokens: 10 blocks each
    want = [out.outputs[0].token_ids for out in await outputs_alone(tiny_model, prompts, params)]
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=16 * BLOCK,
                                      max_model_len=256, transport="tcp", join_address="tcp://127.0.0.1:0",
                                      curve_secret_key_file=str(secret), curve_public_key_file=str(public)) as rt:
        assert rt.join_address.startswith("tcp://127.0.0.1:")
        worker = await start_worker(tiny_model, rt.join_address, secret)
        with trio.fail_after(120):
            line = await first_line(worker.stdout)
        assert line.startswith("joined as instance 1 tcp://"), line
        s = await rt.sync_statistics()
        assert [i.instance_id for i in s.instances] == [0, 1] and s.instances[1].kv_capacity_blocks == 16

        homes = set()
        with trio.fail_after(120):
            got = await generate_all(rt, prompts, params, lambda i, out: homes.add(rt.statistics().homes.get(f"r{i}")))
        assert got == [tuple(w) for w in want]
        assert 1 in homes  # the newcomer served some
        s = await rt.sync_statistics()
        assert all((i.kv_used_blocks, i.kv_lent_blocks, i.kv_borrowed_blocks) == (0, 0, 0) for i in s.instances)

        refused_before = rt.statistics().refused_joins
        intruder_proc = await start_worker(tiny_model, rt.join_address, intruder, "--join-timeout-s", "3")
        with trio.fail_after(60):
            rc = await intruder_proc.wait()
        err = (await intruder_proc.stderr.receive_some(65536)).decode()
        assert rc == 2 and "is that its join address" in err and "key" in err, err
        assert rt.statistics().refused_joins > refused_before
        assert [i.instance_id for i in (await rt.sync_statistics()).instances] == [0, 1]
    with trio.fail_after(30):  # its runtime is gone: the joined worker stops by itself
        await worker.wait()


async def test_joins_refused_or_dropped_leave_nothing_behind(tiny_model, tmp_path):
    """Found by an adversarial review (each was a bug): a worker with another model is refused
    with a message that says so (it blamed the key); a worker refused after its id was given
    stayed in the ledger as a phantom the planner moved blocks to; a joined worker declared
    lost while it was stopped ran on after it resumed."""
    import os
    import signal

    public, secret = generate_keypair(tmp_path / "keys", "cluster")
    other = str(make_tiny_model(tmp_path / "other", hidden_size=32))
    async with infinillm.open_runtime(model=tiny_model, device="cpu", kv_capacity_tokens=16 * BLOCK,
                                      max_model_len=256, transport="tcp", join_address="tcp://127.0.0.1:0",
                                      curve_secret_key_file=str(secret), curve_public_key_file=str(public),
                                      heartbeat_timeout_s=1.0) as rt:
        for argv in ((other,), (tiny_model, "--dtype", "bfloat16")):
            w = await start_worker(argv[0], rt.join_address, secret, *argv[1:])
            with trio.fail_after(60):
                rc = await w.wait()
            err = (await w.stderr.receive_some(65536)).decode()
            assert rc == 2 and ("refused this worker" in err and "model" in err or "--dtype float32" in err), err
        assert list(rt.ledger.instance_ids()) == [0]  # no phantom member

        worker = await start_worker(tiny_model, rt.join_address, secret)
        with trio.fail_after(120):
            line = await first_line(worker.stdout)
        assert line.startswith("joined as instance"), line
        os.kill(worker.pid, signal.SIGSTOP)
        with trio.fail_after(30):
            while not rt.statistics().lost_instances:
                await rt.sync_statistics()
        os.kill(worker.pid, signal.SIGCONT)
        with trio.fail_after(30):  # told it was dropped, it stops (the runtime is still open)
            await worker.wait()
        assert list(rt.ledger.instance_ids()) == [0]
