"""Instances in other processes: a home engine here borrows blocks from worker processes over
ZeroMQ (real sockets, real processes) and gets the tokens of one instance with room.

The home's steps run in a worker thread of this test's trio loop, as the runtime runs them;
its ``ZmqPeer`` s cross into the loop for every reservation, commit, release and query.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from contextlib import asynccontextmanager

import pytest
import trio

from infinillm import SamplingParams
from infinillm.cluster import ZmqPeer
from infinillm.config import CacheConfig, SchedulerConfig
from infinillm.engine import Engine
from infinillm.loader import load_model
from infinillm.testing import make_tiny_model
from infinillm.worker import open_worker
from infinillm.transport import CancelReservation, ReserveBlocks, open_transport

BLOCK = 16


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny")))


@asynccontextmanager
async def worker(folder: str, instance_id: int, num_blocks: int):
    """A worker process; yields (process, peer address)."""
    async with open_worker(folder, instance_id, num_blocks, block_size=BLOCK, max_model_len=1024) as w:
        yield w.process, w.peer_address
    assert w.process.returncode == 0


def home_engine(folder: str, num_blocks: int, cluster_blocks: int, max_num_batched_tokens: int = 32,
                prefix_caching: bool = True) -> Engine:
    model, tokenizer, args = load_model(folder, progress=False)
    return Engine(model, args, tokenizer, cache=CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching),
                  scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens),
                  num_blocks=num_blocks, max_model_len=1024, instance_id=0, cluster_blocks=cluster_blocks)


async def run(engine: Engine, prompts, params) -> dict[str, tuple]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    finals = {}
    while engine.has_work:
        for out in await trio.to_thread.run_sync(engine.step):
            if out.finished:
                finals[out.request_id] = (tuple(out.outputs[0].token_ids), out.outputs[0].logprobs, out.outputs[0].finish_reason)
    return finals


PROMPTS = [[(i * 7 + j * 13) % 300 + 3 for j in range(n)] for i, n in enumerate([150, 30, 90])]
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=1)


async def test_a_home_spreads_its_requests_over_two_worker_processes(tiny_folder):
    want = await run(home_engine(tiny_folder, 200, 200, 2048), PROMPTS, GREEDY)
    # Each worker lends at most 4 of its 8 blocks; the home has 6 and needs about 22 in all, so
    # it borrows from both, and preempts (recomputes) when the loans run out.
    async with worker(tiny_folder, 1, 8) as (_, address1), worker(tiny_folder, 2, 8) as (_, address2):
        async with open_transport() as tp, tp.open_client(address1) as c1, tp.open_client(address2) as c2:
            async with trio.open_nursery() as nursery:
                token = trio.lowlevel.current_trio_token()
                home = home_engine(tiny_folder, 6, 6 + 4 + 4)
                home.peers = {1: ZmqPeer(1, c1, nursery, token, lendable=4), 2: ZmqPeer(2, c2, nursery, token, lendable=4)}
                lent = {1: 0, 2: 0}
                for peer in home.peers.values():
                    commit = peer.commit

                    def counted(reservation, rid, peer=peer, commit=commit):
                        blocks = commit(reservation, rid)
                        lent[peer.instance_id] += len(blocks)
                        return blocks

                    peer.commit = counted
                got = await run(home, PROMPTS, GREEDY)
                assert lent[1] > 0 and lent[2] > 0, lent  # both workers held blocks of the home's requests
                assert home.pool.num_borrowed == 0
                for peer in home.peers.values():  # the releases (one-way) have landed
                    await peer.wait_released()
                for client in (c1, c2):  # every lent block came back: all 4 lendable again
                    reply = await client.request(ReserveBlocks(0, 4))
                    assert reply.reservation_id is not None, reply
                    await client.request(CancelReservation(reply.reservation_id))
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid][0] == want[rid][0]
        for g, w in zip(got[rid][1], want[rid][1]):
            (tok,) = [t for t in w if w[t].rank == 1]
            assert math.isclose(g[tok].logprob, w[tok].logprob, abs_tol=1e-3)


async def test_a_worker_exits_when_its_parent_lets_it_go(tiny_folder):
    async with worker(tiny_folder, 1, 4) as (proc, _):
        assert proc.poll() is None
    assert proc.returncode == 0


async def test_a_worker_whose_parent_dies_exits_by_itself(tiny_folder):
    # A parent that starts a worker (handing it the parent's own stdin, which this test keeps
    # open, so only the parent's death can stop it), then is killed with SIGKILL.
    parent_code = (
        "import subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-m', 'infinillm.worker', '--model', {tiny_folder!r}, "
        "'--instance-id', '1', '--num-blocks', '4']); "
        "print('worker', p.pid, flush=True); p.wait()"
    )
    parent = await trio.lowlevel.open_process([sys.executable, "-c", parent_code], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        out = b""
        with trio.fail_after(120):
            while b"ready" not in out:
                chunk = await parent.stdout.receive_some()
                assert chunk, "the worker never became ready"
                out += chunk
        pid = int(out.split(b"worker ")[1].split()[0])
        pidfd = os.pidfd_open(pid)
        try:
            parent.kill()
            await parent.wait()
            with trio.fail_after(10):  # it polls its parent every second
                await trio.lowlevel.wait_readable(pidfd)  # readable once the worker has exited
        finally:
            os.close(pidfd)
    finally:
        await parent.stdin.aclose()
        parent.kill()


async def test_two_homes_borrowing_from_each_other_at_once_do_not_deadlock(tiny_folder):
    # Two engines, each a home and each the other's creditor, stepping at the same time in
    # worker threads of one loop; each serves the other's queries on its own peer socket while
    # its own step waits on the other's. Each home's three requests grow to 100 tokens (7 blocks):
    # 21 blocks wanted where it has 10, so both borrow (and preempt) while the other is busy;
    # every request fits in its home alone, so each makes progress. Which one gets loans when
    # depends on the timing (a home lends only the blocks it has free, e.g. just after it
    # preempted); that both step, query and serve at once without waiting on each other is
    # what this checks.
    from infinillm.cluster import PeerService

    prompts = [[(i * 11 + j * 5) % 300 + 3 for j in range(60)] for i in range(3)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = await run(home_engine(tiny_folder, 200, 200, 2048), prompts, params)
    # Without prefix caching: a preempted request then computes its blocks again and both homes
    # stay short long enough to borrow (with it, about one run in five needed no loan at all).
    a = home_engine(tiny_folder, 10, 10 + 5, 32, prefix_caching=False)
    b = Engine(a.model, a.args, a.tokenizer, cache=CacheConfig(block_size=BLOCK, enable_prefix_caching=False),
               scheduler=SchedulerConfig(max_num_batched_tokens=32), num_blocks=10, max_model_len=1024,
               instance_id=1, cluster_blocks=15)
    results: dict[int, dict] = {}
    async with open_transport() as tp:
        async with tp.open_server(PeerService(a).handle, name="peer0", concurrency=4) as sa, \
                tp.open_server(PeerService(b).handle, name="peer1", concurrency=4) as sb, \
                tp.open_client(sb.address) as to_b, tp.open_client(sa.address) as to_a, \
                trio.open_nursery() as nursery:
            token = trio.lowlevel.current_trio_token()
            a.peers = {1: ZmqPeer(1, to_b, nursery, token, lendable=5)}
            b.peers = {0: ZmqPeer(0, to_a, nursery, token, lendable=5)}

            async def drive(i, engine):
                results[i] = await run(engine, prompts, params)

            with trio.fail_after(30):
                async with trio.open_nursery() as homes:
                    homes.start_soon(drive, 0, a)
                    homes.start_soon(drive, 1, b)
            assert a.num_loans + b.num_loans > 0
    for i in (0, 1):
        assert {rid: r[0] for rid, r in results[i].items()} == {rid: r[0] for rid, r in want.items()}


async def test_a_worker_that_cannot_start_is_an_error_with_its_reason(tmp_path):
    from infinillm import InfiniLLMError

    with pytest.raises(InfiniLLMError, match=r"worker 3 exited before it was ready \(rc 2\): .*model='/no/such/model' is invalid: does not exist"):
        async with open_worker("/no/such/model", 3, 4):
            pass  # pragma: no cover


async def test_a_reply_left_unread_by_a_failed_step_is_skipped_on_the_direct_socket(tiny_folder):
    # A step that sent a query and then failed never reads its reply; the next query on the
    # step thread's own socket must get its own answer, not that one.
    import torch

    from infinillm.transport import AttentionQuery, DealerSocket

    _, _, args = load_model(tiny_folder, progress=False)
    async with worker(tiny_folder, 1, 4) as (_, address), open_transport() as tp:
        sock = tp.socket(DealerSocket)
        tp.connect(sock, address)
        async with tp.open_client(address) as client, trio.open_nursery() as nursery:
            peer = ZmqPeer(1, client, nursery, trio.lowlevel.current_trio_token(), lendable=2,
                           direct=sock.zmq_socket, codec=tp.codec)

            def query(layer: int) -> AttentionQuery:
                return AttentionQuery.build(layer, (5,), torch.ones(1, args.num_heads, args.head_dim), None,
                                            torch.tensor([3], dtype=torch.int32), [[0]], [[0]], [[4]])

            def two_queries():
                peer.start_attention(query(0))  # its step "failed": never waited on
                return peer.start_attention(query(1))()

            result = await trio.to_thread.run_sync(two_queries)
            assert result.layer == 1 and result.out.shape == (1, args.num_heads, args.head_dim)
        sock.close()


async def test_blocks_migrate_to_a_worker_process_and_back_without_changing_a_token(tiny_folder):
    """Migration over the wire (``BlockTransfer`` out, ``FetchBlocks`` home) to a worker
    process: the same tokens as a run without moves, and every lent block back afterwards."""
    want = await run(home_engine(tiny_folder, 200, 200, 2048), PROMPTS, GREEDY)
    async with worker(tiny_folder, 1, 16) as (_, address):
        async with open_transport() as tp, tp.open_client(address) as client:
            async with trio.open_nursery() as nursery:
                home = home_engine(tiny_folder, 40, 40 + 8, 2048)
                home.peers = {1: ZmqPeer(1, client, nursery, trio.lowlevel.current_trio_token(), lendable=8)}
                for i, p in enumerate(PROMPTS):
                    home.add_request(f"r{i}", p, GREEDY)
                finals, step, placements = {}, 0, []
                while home.has_work:
                    step += 1
                    rids = sorted(home.requests)
                    if step == 3:
                        home.queue_move(rids[0], 4, 0, 1)
                    if step == 8:
                        home.queue_move(rids[0], 3, 1, 0)
                    for out in await trio.to_thread.run_sync(home.step):
                        if out.finished:
                            c = out.outputs[0]
                            finals[out.request_id] = (tuple(c.token_ids), c.logprobs, c.finish_reason)
                    placements.append({r: home.placement(r) for r in home.requests})
                await home.peers[1].wait_released()
                reply = await client.request(ReserveBlocks(0, 8))  # all 8 lendable again
                assert reply.reservation_id is not None, reply
                await client.request(CancelReservation(reply.reservation_id))
    assert home.num_blocks_moved == 7
    assert any(p.get(r, {}).get(1) == 4 for p in placements for r in p)
    assert {r: v[0] for r, v in finals.items()} == {r: v[0] for r, v in want.items()}
