"""Typed endpoints: request/reply over inproc, ipc and tcp; timeouts; a peer that goes away; a
server fuzzed with malformed frames that keeps serving well-formed peers; one-way streams."""

from __future__ import annotations

import logging
import random
import re
from contextlib import asynccontextmanager

import msgpack
import pytest
import torch
import trio
import trio.testing

from infinillm import CapacityError, TransportConfig, TransportError
from infinillm.transport import (
    PROTOCOL_VERSION,
    AbortRequest,
    Ack,
    AttentionQuery,
    AttentionResult,
    BlockTransfer,
    Codec,
    DealerSocket,
    DecodeError,
    ErrorReply,
    HeartbeatDelta,
    PushSocket,
    RemoteError,
    ReserveBlocks,
    Reservation,
    StepOutputs,
    RequestDelta,
    open_transport,
)

from .conftest import make_query, result_for

KINDS = ["inproc", "ipc", "tcp"]


class Peer:
    """A handler that answers attention queries and records what it saw."""

    def __init__(self) -> None:
        self.seen: list = []
        self.release = trio.Event()

    async def __call__(self, msg):
        self.seen.append(msg)
        if isinstance(msg, AttentionQuery):
            return result_for(msg)
        if isinstance(msg, ReserveBlocks):
            if msg.num_blocks > 10:
                raise CapacityError(f"cannot lend {msg.num_blocks} blocks: 10 free")
            return Reservation(7, msg.num_blocks)
        if isinstance(msg, AbortRequest):
            await self.release.wait()  # holds the request until released
            return None
        if isinstance(msg, HeartbeatDelta) and msg.instance_id == 99:
            raise RuntimeError("a bug in the handler")
        if isinstance(msg, HeartbeatDelta) and msg.instance_id == 98:
            return {"not": "a message"}
        return None


@pytest.mark.parametrize("kind", KINDS)
async def test_round_trips(kind):
    peer = Peer()
    with trio.fail_after(20):
        async with open_transport(TransportConfig(transport=kind)) as tp:
            async with tp.open_server(peer) as server, tp.open_client(server.address) as client:
                assert server.address.startswith(f"{kind}://")
                if kind == "tcp":
                    assert server.address.startswith("tcp://127.0.0.1:")  # loopback by default
                for i in range(20):
                    q = make_query(batch=1 + i % 3, seed=i, with_kv=i % 2 == 1)
                    r = await client.request(q)
                    want = result_for(q)
                    assert isinstance(r, AttentionResult) and r.layer == want.layer
                    assert torch.equal(r.out, want.out) and torch.equal(r.lse, want.lse)
                assert await client.request(HeartbeatDelta(1, 0, 1, 10, 10, 0, 0, 0, 0)) == Ack()
                assert client.statistics().num_replies == 21
                assert server.statistics().num_requests == 21
                assert server.statistics().num_replies == 21


async def test_large_tensors_cross_zero_copy_and_intact():
    # 4 MiB of KV: its own frame, handed to ZeroMQ without a copy; the receiver views it.
    kv = torch.randn(4, 2, 4, 16, 8, 64)
    got = []

    async def handler(msg):
        got.append(msg)
        return Ack()

    async with open_transport(TransportConfig(transport="ipc")) as tp:
        async with tp.open_server(handler) as server, tp.open_client(server.address) as client:
            with trio.fail_after(20):
                await client.request(BlockTransfer(3, (1, 2, 3, 4), kv))
    assert torch.equal(got[0].kv, kv) and got[0].block_ids == (1, 2, 3, 4)


async def test_concurrent_requests_each_get_their_own_reply():
    peer = Peer()
    async with open_transport(TransportConfig(transport="ipc")) as tp:
        async with tp.open_server(peer, concurrency=3) as server, tp.open_client(server.address) as client:
            results = {}

            async def ask(i):
                q = make_query(seed=i)
                for _ in range(10):
                    r = await client.request(q)
                    assert torch.equal(r.out, q.q * 2)
                results[i] = True

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for i in range(16):
                        nursery.start_soon(ask, i)
            assert len(results) == 16
            stats = client.statistics()
            assert stats.num_replies == 160 and stats.num_in_flight == 0 and stats.num_late_replies == 0


async def test_errors_come_back_as_errors_and_the_server_goes_on():
    peer = Peer()
    async with open_transport(TransportConfig(transport="inproc")) as tp:
        async with tp.open_server(peer) as server, tp.open_client(server.address) as client:
            assert await client.request(ReserveBlocks(1, 4)) == Reservation(7, 4)
            with pytest.raises(CapacityError, match=r"cannot lend 11 blocks: 10 free \(from inproc://server\)"):
                await client.request(ReserveBlocks(1, 11))
            with pytest.raises(RemoteError, match="RuntimeError: a bug in the handler") as info:
                await client.request(HeartbeatDelta(99, 0, 1, 10, 10, 0, 0, 0, 0))
            assert info.value.code == "RuntimeError"
            with pytest.raises(TransportError, match=r"the server could not encode its reply: cannot encode dict: "
                                                     r"not a registered message type \(from inproc://server\)"):
                await client.request(HeartbeatDelta(98, 0, 1, 10, 10, 0, 0, 0, 0))
            assert await client.request(ReserveBlocks(1, 2)) == Reservation(7, 2)
            assert server.statistics().num_handler_errors == 3


async def test_one_way_messages_get_no_reply():
    peer = Peer()
    async with open_transport(TransportConfig(transport="inproc")) as tp:
        async with tp.open_server(peer) as server, tp.open_client(server.address) as client:
            await client.send(HeartbeatDelta(1, 0, 1, 10, 10, 0, 0, 0, 0))
            assert await client.request(Ack()) == Ack()  # ordered after the one-way message
            assert [type(m) for m in peer.seen] == [HeartbeatDelta, Ack]
            assert server.statistics().num_replies == 1


async def test_a_request_times_out_with_a_clear_error(autojump_clock):
    peer = Peer()
    async with open_transport(TransportConfig(transport="inproc", request_timeout_s=5.0)) as tp:
        async with tp.open_server(peer, concurrency=2) as server, tp.open_client(server.address) as client:
            t0 = trio.current_time()
            with pytest.raises(TransportError, match=r"no reply from inproc://server to AbortRequest within 5 s"):
                await client.request(AbortRequest(1))
            assert trio.current_time() - t0 == pytest.approx(5.0)
            with pytest.raises(TransportError, match=r"no reply from inproc://server to AbortRequest within 0\.5 s "
                                                     r"\(request_timeout_s\); the peer may have gone"):
                await client.request(AbortRequest(2), timeout=0.5)
            peer.release.set()  # the two late replies arrive and are dropped
            assert await client.request(ReserveBlocks(1, 3)) == Reservation(7, 3)
            stats = client.statistics()
            assert stats.num_timeouts == 2 and stats.num_late_replies == 2 and stats.num_in_flight == 0


async def test_no_server_at_all_times_out_saying_it_is_not_connected(tmp_path, autojump_clock):
    async with open_transport(TransportConfig(transport="ipc")) as tp:
        async with tp.open_client(f"ipc://{tmp_path}/nobody", timeout=2.0) as client:
            with pytest.raises(TransportError, match=r"within 2 s .*\(it is not connected\)"):
                await client.request(Ack())


async def test_cancelled_requests_leave_the_client_usable():
    peer = Peer()
    async with open_transport(TransportConfig(transport="ipc")) as tp:
        async with tp.open_server(peer, concurrency=4) as server, tp.open_client(server.address) as client:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.request, AbortRequest(1))  # waits for release
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.cancel_scope.cancel()  # cancels the leader while it receives
                for i in range(5):
                    assert (await client.request(ReserveBlocks(1, i + 1))).num_blocks == i + 1
                assert client.statistics().num_in_flight == 0


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
async def test_a_peer_that_goes_away_fails_pending_requests_at_once(kind):
    peer = Peer()
    with trio.fail_after(20):
        async with open_transport(TransportConfig(transport=kind, request_timeout_s=600)) as tp:
            async with _serve_then_vanish(tp, peer) as (server_scope, address):
                async with tp.open_client(address) as client:
                    await client.wait_connected()
                    assert await client.request(Ack()) == Ack()
                    async with trio.open_nursery() as nursery:
                        failures = []

                        async def pending():
                            try:
                                await client.request(AbortRequest(5))  # the server never answers
                            except TransportError as e:
                                failures.append(str(e))

                        nursery.start_soon(pending)
                        nursery.start_soon(pending)
                        await trio.testing.wait_all_tasks_blocked()
                        server_scope.cancel()  # the server goes away (its socket closes)
                    assert len(failures) == 2
                    assert all(f"peer {address} has gone" in f for f in failures)
                    with pytest.raises(TransportError, match=rf"peer {re.escape(address)} has gone: its connection closed"):
                        await client.request(Ack())  # fails fast while the peer is away
                    assert not client.connected


@asynccontextmanager
async def _serve_then_vanish(tp, peer):
    """A server in its own nursery; cancelling the yielded scope shuts it down."""
    async with trio.open_nursery() as nursery:

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                async with tp.open_server(peer) as server:
                    task_status.started((scope, server.address))
                    await trio.sleep_forever()

        scope, address = await nursery.start(run)
        yield scope, address
        scope.cancel()


# ---- malformed input at a live endpoint ---------------------------------------------------------


def _garbage(rng: random.Random, codec: Codec) -> list[bytes]:
    good = [bytes(memoryview(f).cast("B")) for f in codec.encode(make_query(seed=rng.randrange(100)), 77)]
    choice = rng.randrange(8)
    if choice == 0:
        return [rng.randbytes(rng.randrange(1, 64))]
    if choice == 1:
        return [msgpack.packb([PROTOCOL_VERSION + 1, 1, 5])]
    if choice == 2:
        return good[:1]  # truncated: the tensor frame is missing
    if choice == 3:
        return [good[0], good[1][: rng.randrange(len(good[1]))]]
    if choice == 4:
        return [*good, b"extra"]
    if choice == 5:
        h = bytearray(good[0])
        h[rng.randrange(len(h))] ^= 0xFF
        return [bytes(h), good[1]]
    if choice == 6:
        return [msgpack.packb([PROTOCOL_VERSION, 1, 8, "layer", (1,), None, None, None, None])]
    return [b""]


async def test_malformed_frames_fuzzed_at_a_live_server_do_not_stop_it(caplog):
    # The fuzzer is one DEALER: ZeroMQ keeps one connection's messages in order (and the
    # server, one loop, handles them in that order, replying on the same connection in order).
    # So once the fuzzer has the reply to a well-formed request it sent after all its garbage,
    # the server has certainly handled every bad message, and every error reply is in.
    caplog.set_level(logging.WARNING, logger="infinillm.transport")
    peer = Peer()
    rng = random.Random(11)
    last_seq = 1 << 40  # no garbage carries it
    async with open_transport(TransportConfig(transport="ipc")) as tp:
        garbage = [_garbage(rng, tp.codec) for _ in range(300)]
        # the garbage whose seq is readable is answered with an ErrorReply carrying that seq
        answered = []
        for frames in garbage:
            with pytest.raises(DecodeError) as info:
                tp.codec.decode(frames)
            if info.value.seq:
                answered.append(info.value.seq)
        async with tp.open_server(peer) as server, tp.open_client(server.address) as client:
            fuzzer = tp.socket(DealerSocket)
            tp.connect(fuzzer, server.address)
            with trio.fail_after(30):
                async with fuzzer:
                    for i, frames in enumerate(garbage):
                        await fuzzer.send(frames)
                        if i % 10 == 0:  # a well-formed peer is served all along
                            q = make_query(seed=i)
                            r = await client.request(q)
                            assert torch.equal(r.out, q.q * 2)
                    await fuzzer.send(tp.codec.encode(Ack(), last_seq))
                    replies = []
                    while True:
                        seq, reply = tp.codec.decode(await fuzzer.receive())
                        if seq == last_seq:
                            assert reply == Ack()
                            break
                        replies.append((seq, reply))
            stats = server.statistics()
            assert stats.num_bad_messages == len(garbage) == 300
            assert stats.num_requests == 31  # 30 queries and the fuzzer's last Ack
            assert stats.num_undeliverable == 0
            assert [seq for seq, _ in replies] == answered and len(answered) > 0
            for _, reply in replies:
                assert isinstance(reply, ErrorReply) and reply.code == "TransportError"
            assert any("refused a message" in r.getMessage() for r in caplog.records)


# ---- one-way streams ----------------------------------------------------------------------------


async def test_push_pull_streams_and_skips_bad_input(caplog):
    caplog.set_level(logging.WARNING, logger="infinillm.transport")
    async with open_transport(TransportConfig(transport="ipc")) as tp:
        async with tp.open_puller(name="outputs") as puller, tp.open_pusher(puller.address) as pusher:
            bad = tp.socket(PushSocket)  # a second pusher, sending junk
            tp.connect(bad, puller.address)
            with trio.fail_after(10):
                for step in range(5):
                    await pusher.send(StepOutputs(0, step, (RequestDelta(1, (step,)),)))
                await bad.send([b"junk"])
                await pusher.send(StepOutputs(0, 5, ()))
                got = []
                async for msg in puller:
                    got.append(msg.step)
                    if msg.step == 5:
                        break
            bad.close()
            assert got == [0, 1, 2, 3, 4, 5]
            assert puller.statistics().num_bad_messages == 1
