"""Typed endpoints over the trio sockets: request/reply with timeouts, and one-way streams.

``Server``  ROUTER: decodes each request, awaits ``handler(msg)``, sends the reply. Input it
            cannot decode is logged, counted and answered with an ``ErrorReply`` when its
            sequence number was readable; a handler that raises is answered with an
            ``ErrorReply``; either way the server goes on serving.
``Client``  DEALER to one server: ``request(msg)`` returns the reply or raises
            ``TransportError`` (timed out, peer gone, refused) or the peer's error; many
            requests may be in flight, each matched to its reply by sequence number.
``Pusher``  PUSH: ``send(msg)``, one-way.
``Puller``  PULL: ``receive()`` / ``async for``; bad input is logged, counted and skipped.

Each is opened by an ``open_*`` async context manager (or the ``Transport`` method of the same
name), which runs its background task in a nursery and closes its socket on exit.

Requests and replies (frames after the codec, DESIGN.md §4)::

    client                                   server
      request(msg): seq = n
      [header(seq=n), tensors...]  ------->   handler(msg) -> reply
                                   <-------   [header(seq=n), tensors...]
      the waiting request(msg) with seq n returns the reply

Who receives. A client has no receive task: the first request waiting for a reply receives
for all (and hands other requests their replies); when it has its own it hands the role to
another waiting request. This saves a task switch per round trip. Two background tasks stay
off the hot path: one sleeps until the earliest request deadline and times out what is due
(one timer for all requests, not a cancel scope each), and one watches the socket's monitor,
so that a peer that goes away (its connection drops: the process died, the host is
unreachable past ZeroMQ's heartbeats) fails every pending request at once with
``TransportError``, and later requests fail fast until it is back; a peer that refuses our
CURVE key fails them the same way. Over inproc there are no monitor events: a silent peer is
found by the request timeout.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import trio
import zmq

from .. import errors
from ..errors import TransportError
from .codec import Codec, DecodeError
from .messages import Ack, ErrorReply, Message
from .socket import DealerSocket, PullSocket, PushSocket, RouterSocket, _PairSocket

if TYPE_CHECKING:
    from .context import Transport

__all__ = [
    "Server",
    "Client",
    "Pusher",
    "Puller",
    "ServerStats",
    "ClientStats",
    "PullerStats",
    "RemoteError",
    "Handler",
    "open_server",
    "open_client",
    "open_pusher",
    "open_puller",
    "error_from_reply",
]

log = logging.getLogger("infinillm.transport")

Handler = Callable[[Message], Awaitable["Message | None"]]

_ACK = Ack()
_HEARTBEAT_IVL_MS = 1000  # ZeroMQ PINGs a silent tcp peer every second...
_HEARTBEAT_TIMEOUT_MS = 5000  # ...and drops the connection after 5 s without an answer
_LOG_FIRST = 10  # log each of the first bad messages, then every 100th


def _log_bad(count: int, fmt: str, *args: object) -> None:
    if count <= _LOG_FIRST or count % 100 == 0:
        log.warning(fmt + " (%d so far)", *args, count)


def _hex(peer: zmq.Frame) -> str:
    return peer.bytes.hex()


class RemoteError(TransportError):
    """The peer answered with an error that has no local class (``code`` is its name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# Errors that may come back as themselves: their constructors take one message.
_REMOTE_CLASSES = {
    cls.__name__: cls
    for cls in (
        errors.CapacityError,
        errors.RequestTooLongError,
        errors.InstanceDeadError,
        errors.TransportError,
        errors.SchedulerError,
        errors.RequestAbortedError,
    )
}


def error_from_reply(reply: ErrorReply, peer: str) -> Exception:
    """The exception to raise for an ``ErrorReply`` from ``peer``."""
    cls = _REMOTE_CLASSES.get(reply.code)
    if cls is None:
        return RemoteError(reply.code, f"{reply.message} (from {peer})")
    return cls(f"{reply.message} (from {peer})")


# ---- server -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerStats:
    """A snapshot of a ``Server``'s counters since it was opened."""

    num_requests: int  # decoded and handed to the handler (one-way included)
    num_replies: int
    num_bad_messages: int  # refused by the decoder
    num_handler_errors: int  # the handler raised
    num_undeliverable: int  # the reply could not be sent: the peer had gone or was full


class Server:
    """Answers requests on a ROUTER socket (see the module docstring).

    ``concurrency`` loops receive and handle requests; with one (the default) a handler that
    waits holds up the requests behind it, so handlers should not wait on anything slow
    (DESIGN.md §4: handlers never wait on the engine), or the server needs more loops.
    """

    def __init__(self, sock: RouterSocket, handler: Handler, codec: Codec, address: str, *, concurrency: int = 1) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise errors.ValidationError("concurrency", concurrency, "must be an integer >= 1", owner="Server")
        self._sock = sock
        self._handler = handler
        self._codec = codec
        self.address = address
        self.concurrency = concurrency
        self._num_requests = 0
        self._num_replies = 0
        self._num_bad = 0
        self._num_handler_errors = 0
        self._num_undeliverable = 0

    def statistics(self) -> ServerStats:
        return ServerStats(self._num_requests, self._num_replies, self._num_bad, self._num_handler_errors,
                           self._num_undeliverable)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, ``concurrency`` requests at a time."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency - 1):
                nursery.start_soon(self._serve_loop)
            task_status.started()
            await self._serve_loop()

    async def _serve_loop(self) -> None:
        sock = self._sock
        codec = self._codec
        while True:
            frames = await sock._receive()
            peer = frames[0]  # the routing id, as the frame it came in (sent back as it is)
            try:
                seq, msg = codec.decode(frames[1:])
            except DecodeError as e:
                self._num_bad += 1
                _log_bad(self._num_bad, "%s: refused a message from peer %s: %s", self.address, _hex(peer), e)
                if e.seq:
                    self._reply(peer, e.seq, ErrorReply("TransportError", str(e)))
                continue
            self._num_requests += 1
            try:
                reply = await self._handler(msg)
            except Exception as e:  # the handler's failure is the request's, not the server's
                self._num_handler_errors += 1
                if isinstance(e, errors.InfiniLLMError):  # refused on purpose (no room, ...)
                    log.info("%s: %s refused: %s", self.address, type(msg).__name__, e)
                else:
                    log.warning("%s: handler failed on %s", self.address, type(msg).__name__, exc_info=True)
                reply = ErrorReply.from_exception(e)
            if seq:
                self._reply(peer, seq, _ACK if reply is None else reply)
            # Let the request and its frames go now, while the peer reads the reply, not after
            # the next wake, on the next request's time (and not held while idle).
            frames = peer = msg = reply = None

    def _reply(self, peer: zmq.Frame, seq: int, reply: Message) -> None:
        try:
            frames = self._codec.encode(reply, seq)
        except TransportError as e:
            log.warning("%s: cannot encode the reply %s: %s", self.address, type(reply).__name__, e)
            self._num_handler_errors += 1
            frames = self._codec.encode(ErrorReply("TransportError", f"the server could not encode its reply: {e}"), seq)
        try:
            self._sock._send_nowait([peer, *frames], checked=True)
        except trio.WouldBlock:
            # Waiting here would stall every other peer behind one slow one: drop, like ZeroMQ.
            self._num_undeliverable += 1
            _log_bad(self._num_undeliverable, "%s: peer %s is not reading; reply dropped", self.address, _hex(peer))
            return
        except TransportError as e:  # EHOSTUNREACH: the peer has gone
            self._num_undeliverable += 1
            _log_bad(self._num_undeliverable, "%s: reply to peer %s undeliverable: %s", self.address, _hex(peer), e)
            return
        self._num_replies += 1


@asynccontextmanager
async def open_server(tp: Transport, handler: Handler, address: str | None = None, *, name: str = "server",
                      concurrency: int = 1) -> AsyncIterator[Server]:
    """A ``Server`` bound to ``address`` (default ``tp.default_address(name)``), serving in a
    nursery until the block exits. ``server.address`` is where clients connect."""
    sock = tp.socket(RouterSocket, maxmsgsize=tp.codec.max_message_bytes)
    try:
        bound = tp.bind(sock, address, name=name)
        server = Server(sock, handler, tp.codec, bound, concurrency=concurrency)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    finally:
        sock.close()


# ---- client -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientStats:
    """A snapshot of a ``Client``'s counters since it was opened."""

    num_requests: int
    num_replies: int
    num_timeouts: int
    num_failed: int  # failed because the peer went away or refused us
    num_late_replies: int  # arrived after their request gave up
    num_bad_replies: int  # refused by the decoder
    num_in_flight: int
    connected: bool


class _Pending:
    __slots__ = ("deadline", "reply", "error", "expired", "event", "send_scope")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.reply: Message | None = None
        self.error: TransportError | None = None
        self.expired = False
        self.event: trio.Event | None = None  # set while this request waits for another to receive
        self.send_scope: trio.CancelScope | None = None  # set while its send waits for the peer


class Client:
    """Requests to one server over a DEALER socket (see the module docstring)."""

    def __init__(self, sock: DealerSocket, codec: Codec, address: str, *, timeout: float, monitored: bool) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise errors.ValidationError("timeout", timeout, "must be a number of seconds > 0", owner="Client")
        self._sock = sock
        self._codec = codec
        self.address = address
        self.timeout = float(timeout)
        self._monitored = monitored
        self._connected = not monitored  # without a monitor we cannot tell: assume so
        self._failure: str | None = None  # why requests fail fast now (peer gone, refused)
        self._connected_event = trio.Event()
        if not monitored:
            self._connected_event.set()
        self._pending: dict[int, _Pending] = {}
        self._next_seq = 1
        self._leader: _Pending | None = None  # the request receiving for all
        self._timer: trio.CancelScope | None = None  # the expiry task's sleep; deadline = earliest
        self._num_requests = 0
        self._num_replies = 0
        self._num_timeouts = 0
        self._num_failed = 0
        self._num_late = 0
        self._num_bad = 0

    @property
    def connected(self) -> bool:
        return self._connected

    def statistics(self) -> ClientStats:
        return ClientStats(self._num_requests, self._num_replies, self._num_timeouts, self._num_failed,
                           self._num_late, self._num_bad, len(self._pending), self._connected)

    async def wait_connected(self) -> None:
        """Until the connection's handshake has succeeded (at once over inproc)."""
        await self._connected_event.wait()

    async def request(self, msg: Message, *, timeout: float | None = None) -> Message:
        """Send ``msg`` and return the reply.

        Raises ``TransportError`` if no reply comes within ``timeout`` seconds (default: the
        client's, ``TransportConfig.request_timeout_s``), if the peer goes away meanwhile or
        has gone, or if it refused us; raises the peer's error if it answered with one
        (``CapacityError``... as themselves, others as ``RemoteError``). Cancelling a request
        is safe: its late reply is dropped.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._failure is not None:
            await trio.lowlevel.checkpoint()
            self._num_failed += 1
            raise TransportError(self._failure)
        seq = self._next_seq
        self._next_seq = seq + 1
        frames = self._codec.encode(msg, seq)
        limit = self.timeout if timeout is None else timeout
        p = _Pending(trio.current_time() + limit)
        self._pending[seq] = p
        self._num_requests += 1
        timer = self._timer
        if timer is not None and p.deadline < timer.deadline:
            timer.deadline = p.deadline
        sock = self._sock
        try:
            try:
                sock._send_nowait(frames, checked=True)
            except trio.WouldBlock:  # no peer connected yet, or its queue is full
                with trio.CancelScope(deadline=p.deadline) as p.send_scope:
                    await sock._send(frames, schedule=False)
                p.send_scope = None
                if p.error is None and p.reply is None and trio.current_time() >= p.deadline:
                    p.expired = True
            frames = None  # sent (ZeroMQ holds what it needs): free them now, not after the reply
            # Wait for the reply: one request receives for all (see the module docstring).
            while p.reply is None and p.error is None and not p.expired:
                if self._leader is not None:
                    p.event = trio.Event()
                    await p.event.wait()
                    p.event = None
                    continue
                self._leader = p
                try:
                    reply_frames = await sock._receive(interruptible=True)
                finally:
                    self._leader = None
                if reply_frames is not None:
                    self._dispatch(reply_frames)
        finally:
            del self._pending[seq]
            if self._leader is None:
                self._pass_receiving()
        reply = p.reply
        if reply is None:
            if p.error is not None:
                self._num_failed += 1
                raise p.error
            self._num_timeouts += 1
            raise TransportError(
                f"no reply from {self.address} to {type(msg).__name__} within {limit:g} s "
                f"(request_timeout_s); the peer may have gone"
                + ("" if self._connected else " (it is not connected)")
            )
        if type(reply) is ErrorReply:
            raise error_from_reply(reply, self.address)
        return reply

    async def send(self, msg: Message) -> None:
        """Send ``msg`` one-way (no reply). Waits while the server is not connected."""
        if self._failure is not None:
            await trio.lowlevel.checkpoint()
            raise TransportError(self._failure)
        await self._sock.send(self._codec.encode(msg, 0))

    def _pass_receiving(self) -> None:
        # Hand the receiving role to one request still waiting for its reply.
        for p in self._pending.values():
            if p.event is not None and p.reply is None:
                p.event.set()
                return

    def _wake(self, p: _Pending) -> None:
        if p.send_scope is not None:
            p.send_scope.cancel()
        elif p is self._leader:
            self._sock._interrupt_receive()
        elif p.event is not None:
            p.event.set()

    def _dispatch(self, frames: list) -> None:
        try:
            seq, reply = self._codec.decode(frames)
        except DecodeError as e:
            self._num_bad += 1
            _log_bad(self._num_bad, "%s: refused a reply: %s", self.address, e)
            p = self._pending.get(e.seq) if e.seq else None
            if p is not None:
                p.error = TransportError(f"bad reply from {self.address}: {e}")
                self._wake(p)
            return
        p = self._pending.get(seq)
        if p is None:
            self._num_late += 1
            return
        self._num_replies += 1
        p.reply = reply
        if p.event is not None:
            p.event.set()

    def _fail_all(self, why: str) -> None:
        for p in list(self._pending.values()):
            if p.reply is None and p.error is None:
                p.error = TransportError(why)
                self._wake(p)

    async def _expire(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Time requests out: one sleep until the earliest deadline, not a timer per request."""
        task_status.started()
        while True:
            earliest = min((p.deadline for p in self._pending.values() if not p.expired), default=math.inf)
            with trio.CancelScope(deadline=earliest) as self._timer:
                await trio.sleep_forever()
            self._timer = None
            now = trio.current_time()
            for p in list(self._pending.values()):
                if p.deadline <= now and p.reply is None and not p.expired:
                    p.expired = True
                    self._wake(p)

    async def _watch_monitor(self, monitor: _PairSocket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            frames = await monitor.receive()
            event, value = struct.unpack("=HI", frames[0].bytes[:6])
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
                self._failure = None
                self._connected_event.set()
            elif event == zmq.EVENT_DISCONNECTED:
                if self._connected:
                    self._connected = False
                    self._connected_event = trio.Event()
                    self._failure = f"peer {self.address} has gone: its connection closed"
                    self._fail_all(self._failure + " with the request pending")
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                what = {
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH: f"the server refused our key (status {value})",
                    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: f"protocol error {value:#x}",
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: f"{os.strerror(value)} (errno {value})",
                }[event]
                self._failure = f"handshake with {self.address} failed: {what}; check the CURVE keys"
                self._fail_all(self._failure)
            elif event == zmq.EVENT_MONITOR_STOPPED:
                return


@asynccontextmanager
async def open_client(tp: Transport, address: str, *, timeout: float | None = None) -> AsyncIterator[Client]:
    """A ``Client`` connected to the server at ``address`` for the enclosed block."""
    sock = tp.socket(DealerSocket, maxmsgsize=tp.codec.max_message_bytes)
    monitor: _PairSocket | None = None
    try:
        zsock = sock.zmq_socket
        monitored = not address.startswith("inproc://")
        if monitored:
            if address.startswith("tcp://"):
                zsock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
                zsock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
            events = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                      | zmq.EVENT_MONITOR_STOPPED)
            monitor = tp._watch(_PairSocket(zsock.get_monitor_socket(events)))
        client = Client(sock, tp.codec, address, timeout=timeout or tp.config.request_timeout_s, monitored=monitored)
        async with trio.open_nursery() as nursery:
            await nursery.start(client._expire)
            if monitor is not None:
                await nursery.start(client._watch_monitor, monitor)
            tp.connect(sock, address)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if monitor is not None:
            if not sock.closed:
                try:
                    sock.zmq_socket.disable_monitor()
                except zmq.ZMQError:
                    pass
            monitor.close()
        sock.close()


# ---- one-way ----------------------------------------------------------------------------------


class Pusher:
    """Sends one-way messages over a PUSH socket."""

    def __init__(self, sock: PushSocket, codec: Codec, address: str) -> None:
        self._sock = sock
        self._codec = codec
        self.address = address

    async def send(self, msg: Message) -> None:
        """Send ``msg``; waits while no puller is connected or its queue is full."""
        await self._sock.send(self._codec.encode(msg, 0))

    def send_nowait(self, msg: Message) -> None:
        """Send ``msg`` now or raise ``trio.WouldBlock``."""
        self._sock.send_nowait(self._codec.encode(msg, 0))


@asynccontextmanager
async def open_pusher(tp: Transport, address: str) -> AsyncIterator[Pusher]:
    sock = tp.socket(PushSocket)
    try:
        tp.connect(sock, address)
        yield Pusher(sock, tp.codec, address)
    finally:
        sock.close()


@dataclass(frozen=True, slots=True)
class PullerStats:
    num_messages: int
    num_bad_messages: int


class Puller:
    """Receives one-way messages over a PULL socket; bad input is logged, counted, skipped."""

    def __init__(self, sock: PullSocket, codec: Codec, address: str) -> None:
        self._sock = sock
        self._codec = codec
        self.address = address
        self._num_messages = 0
        self._num_bad = 0

    def statistics(self) -> PullerStats:
        return PullerStats(self._num_messages, self._num_bad)

    async def receive(self) -> Message:
        """The next well-formed message (cancellation-safe: nothing is lost)."""
        while True:
            frames = await self._sock.receive()
            try:
                _, msg = self._codec.decode(frames)
            except DecodeError as e:
                self._num_bad += 1
                _log_bad(self._num_bad, "%s: refused a message: %s", self.address, e)
                continue
            self._num_messages += 1
            return msg

    def __aiter__(self) -> Puller:
        return self

    async def __anext__(self) -> Message:
        return await self.receive()


@asynccontextmanager
async def open_puller(tp: Transport, address: str | None = None, *, name: str = "puller") -> AsyncIterator[Puller]:
    sock = tp.socket(PullSocket, maxmsgsize=tp.codec.max_message_bytes)
    try:
        bound = tp.bind(sock, address, name=name)
        yield Puller(sock, tp.codec, bound)
    finally:
        sock.close()
