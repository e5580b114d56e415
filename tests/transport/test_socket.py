"""The trio socket layer: delivery, ordering, cancellation safety, several tasks on one socket.

Every test runs twice: with the socket layer's libzmq calls made directly (``_wire``: the
default) and through pyzmq's (what serves when the compiled module is not there)."""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.testing
import zmq

from infinillm.transport import DealerSocket, PullSocket, PushSocket, RouterSocket
from infinillm.transport import socket as socket_module


@pytest.fixture(autouse=True, params=["libzmq", "pyzmq"])
def socket_calls(request, monkeypatch):
    if request.param == "libzmq":
        if socket_module._lib is None:
            if os.environ.get("INFINILLM_CORE", "").strip().lower() == "python":
                pytest.skip("INFINILLM_CORE=python: the socket layer calls pyzmq only")
            pytest.fail("the compiled socket calls (infinillm.transport._wire) are not bound: run `make build`")
    else:
        monkeypatch.setattr(socket_module, "_lib", None)
    return request.param


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def pair(zctx, kind: str, name: str):
    """A connected (sender, receiver) pair: PUSH/PULL or DEALER/ROUTER over inproc."""
    if kind == "push":
        a, b = PushSocket.create(zctx), PullSocket.create(zctx)
    else:
        a, b = DealerSocket.create(zctx), RouterSocket.create(zctx)
    b.bind(f"inproc://{name}")
    a.connect(f"inproc://{name}")
    return a, b


async def test_dealer_router_round_trip(zctx):
    dealer, router = pair(zctx, "dealer", "rt")
    async with dealer, router:
        await dealer.send([b"hello", bytearray(b"x" * 100_000), memoryview(b"tail")])
        peer, frames = await router.receive()
        assert [f.bytes for f in frames] == [b"hello", b"x" * 100_000, b"tail"]
        await router.send(peer, [b"back"])
        assert [f.bytes for f in await dealer.receive()] == [b"back"]


async def test_nowait_variants(zctx):
    push, pull = pair(zctx, "push", "nowait")
    async with push, pull:
        with pytest.raises(trio.WouldBlock):
            pull.receive_nowait()
        push.send_nowait([b"1"])
        await trio.testing.wait_all_tasks_blocked()
        while True:  # the message crosses libzmq's pipe without a trio checkpoint in between
            try:
                assert pull.receive_nowait()[0].bytes == b"1"
                break
            except trio.WouldBlock:
                await trio.lowlevel.checkpoint()


async def test_bad_frames_are_refused_before_anything_is_sent(zctx):
    push, pull = pair(zctx, "push", "bad")
    async with push, pull:
        with pytest.raises(TypeError, match="frame 1 is a str"):
            await push.send([b"ok", "text"])
        with pytest.raises(TypeError, match="frame 0 .* buffer protocol"):
            push.send_nowait([object()])
        with pytest.raises(ValueError, match="at least one frame"):
            await push.send([])
        await push.send([b"next"])
        assert [f.bytes for f in await pull.receive()] == [b"next"]  # nothing partial came first


@pytest.mark.parametrize("kind", ["push", "dealer"])
async def test_10000_messages_arrive_in_order_while_receivers_are_cancelled_at_random(zctx, kind):
    # A sender (bursts of 0..3 messages, then 0..3 checkpoints) and a receiver task; the
    # receiver cancels one receive in ten before it starts, and a third task cancels the
    # current receive at random points (after 0..3 checkpoints), often while it waits. No
    # message may be lost, duplicated or reordered.
    sender, receiver = pair(zctx, kind, f"chaos-{kind}")
    rng = random.Random(5)
    total = 10_000
    got: list[int] = []
    scope_box: list[trio.CancelScope | None] = [None]
    cancels = 0

    async def send_all():
        i = 0
        while i < total:
            for _ in range(rng.randrange(4)):
                if i < total:
                    await sender.send([i.to_bytes(4, "little")])
                    i += 1
            for _ in range(rng.randrange(4)):
                await trio.lowlevel.checkpoint()

    async def receive_all():
        nonlocal cancels
        while len(got) < total:
            with trio.CancelScope() as scope:
                scope_box[0] = scope
                if rng.random() < 0.1:
                    scope.cancel()
                if kind == "push":
                    frames = await receiver.receive()
                else:
                    _, frames = await receiver.receive()
                got.append(int.from_bytes(frames[0].bytes, "little"))
            scope_box[0] = None
            if scope.cancelled_caught:
                cancels += 1

    async def chaos():
        while len(got) < total:
            for _ in range(rng.randrange(4)):
                await trio.lowlevel.checkpoint()
            scope = scope_box[0]
            if scope is not None:
                scope.cancel()

    with trio.fail_after(60):
        async with sender, receiver, trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            nursery.start_soon(chaos)
            await receive_all()
            nursery.cancel_scope.cancel()
    assert got == list(range(total))
    assert cancels > 1000  # the receiver really was cancelled, often


async def test_several_receivers_on_one_socket_share_the_messages_exactly_once(zctx):
    push, pull = pair(zctx, "push", "many")
    seen: list[int] = []

    async def receiver():
        while True:
            frames = await pull.receive()
            seen.append(int(frames[0].bytes))

    with trio.fail_after(30):
        async with push, pull, trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(receiver)
            for i in range(2000):
                await push.send([str(i).encode()])
            while len(seen) < 2000:
                await trio.sleep(0)
            nursery.cancel_scope.cancel()
    assert sorted(seen) == list(range(2000))


async def test_a_task_sending_while_another_waits_to_receive_does_not_strand_it(zctx):
    # The receiving task waits on the socket's FD while another task sends on the same socket:
    # the send may consume the FD's signal for an arrived message (ZeroMQ's FD is
    # edge-triggered), so the waiter must be woken to look again. A ping-pong of 2000 rounds
    # where the ping is sent by one task and the pong received by another.
    dealer, router = pair(zctx, "dealer", "pingpong")
    rounds = 2000
    received = 0

    async def echo():
        while True:
            peer, frames = await router.receive()
            await router.send(peer, frames)

    async def receive_pongs():
        nonlocal received
        while received < rounds:
            await dealer.receive()
            received += 1

    with trio.fail_after(30):
        async with dealer, router, trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nursery.start_soon(receive_pongs)
            for i in range(rounds):
                await dealer.send([b"ping"])
                while received <= i:
                    await trio.sleep(0)
            nursery.cancel_scope.cancel()
    assert received == rounds


async def test_a_cancelled_send_sends_nothing(zctx, tmp_path):
    # No peer yet: DEALER (IMMEDIATE) has nowhere to queue, so send waits; cancel it there.
    address = f"ipc://{tmp_path}/late"
    dealer = DealerSocket.create(zctx)
    dealer.connect(address)
    async with dealer:
        with trio.move_on_after(0.05) as scope:
            await dealer.send([b"cancelled"])
        assert scope.cancelled_caught
        with pytest.raises(trio.WouldBlock):
            dealer.send_nowait([b"also not"])
        router = RouterSocket.create(zctx)
        async with router:
            router.bind(address)
            await dealer.send([b"sent"])
            _, frames = await router.receive()
            assert [f.bytes for f in frames] == [b"sent"]
            with pytest.raises(trio.WouldBlock):
                router.receive_nowait()


async def test_a_receive_cancelled_before_it_starts_takes_nothing(zctx):
    push, pull = pair(zctx, "push", "precancel")
    async with push, pull:
        await push.send([b"kept"])
        with trio.CancelScope() as scope:
            scope.cancel()
            await pull.receive()
        assert scope.cancelled_caught
        assert (await pull.receive())[0].bytes == b"kept"


async def test_closing_wakes_waiters(zctx):
    push, pull = pair(zctx, "push", "close")
    async with push:
        async with trio.open_nursery() as nursery:
            errors = []

            async def wait():
                try:
                    await pull.receive()
                except trio.ClosedResourceError as e:
                    errors.append(e)

            nursery.start_soon(wait)
            nursery.start_soon(wait)  # one watches the FD, one parks
            await trio.testing.wait_all_tasks_blocked()
            pull.close()
        assert len(errors) == 2
        with pytest.raises(trio.ClosedResourceError):
            await pull.receive()
        pull.close()  # idempotent


async def test_send_to_a_gone_peer_raises_from_router(zctx):
    from infinillm import TransportError

    router = RouterSocket.create(zctx)
    async with router:
        router.bind("inproc://gone")
        with pytest.raises(TransportError, match="send failed"):
            router.send_nowait(b"nobody", [b"x"])


async def test_received_frames_lend_writable_bytes_and_outlive_their_list(zctx):
    push, pull = pair(zctx, "push", "frames")
    async with push, pull:
        await push.send([b"head", bytes(range(200))])
        frames = await pull.receive()
        head, body = frames
        del frames
        assert head.bytes == b"head" and len(body) == 200 and not body.more and head.more
        view = memoryview(body)
        assert not view.readonly and bytes(view) == bytes(range(200))
        del body
        view[0] = 7  # the memory is still the frame's, alive through the view
        assert view[0] == 7 and view[1] == 1
        assert bytes(head.buffer) == b"head"


async def test_a_socket_whose_context_was_destroyed_behind_our_back_is_closed_not_crashed():
    ctx = zmq.Context()
    push, pull = PushSocket.create(ctx), PullSocket.create(ctx)
    pull.bind("inproc://gone")
    push.connect("inproc://gone")
    ctx.destroy(linger=0)  # closes the zmq sockets under the wrappers
    with pytest.raises(trio.ClosedResourceError):
        pull.receive_nowait()
    with pytest.raises(trio.ClosedResourceError):
        push.send_nowait([b"x"])
    with pytest.raises(trio.ClosedResourceError):
        with trio.move_on_after(1):
            await pull.receive()
    push.close()
    pull.close()
