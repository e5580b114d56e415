"""Trio wrappers over pyzmq sockets: one small class per socket pattern.

``ZmqSocket``     the common core: a non-blocking pyzmq socket driven by trio
``RouterSocket``  serves many peers; every message carries the peer's routing id
``DealerSocket``  talks to a ROUTER; many requests in flight
``PushSocket``    one-way sender (step outputs, heartbeats)
``PullSocket``    one-way receiver (fair-queued over all pushers)

How waiting works. A ZeroMQ socket exposes one file descriptor (``zmq.FD``) for both
directions, and it is *edge-triggered* in ZeroMQ's sense: it becomes readable when the socket's
command mailbox has something, not when a message is ready, and any call on the socket (a send,
a receive, reading ``zmq.EVENTS``) may drain that signal. So:

- a receive reads ``zmq.EVENTS`` (which processes pending commands, unthrottled) and takes a
  message with ``zmq.NOBLOCK`` if ``POLLIN`` is set; a send tries ``zmq.NOBLOCK`` first and
  reads ``zmq.EVENTS`` on ``EAGAIN``;
- only when the socket is not ready does the task wait for the FD
  (``trio.lowlevel.wait_readable``), and then it looks again: the FD says "something changed",
  never "ready".

Only one task may wait on an FD in trio, so the first waiter watches the FD and other tasks park
until it returns. A successful operation by any task may have drained the signal the watcher is
waiting for, so it *kicks* the watcher awake (``trio.lowlevel.notify_closing`` on the FD, which
the watcher takes for a kick while the socket is open: cheaper than a cancel scope per wait)
and every waiter looks again.

Cancellation. A multipart message is atomic in ZeroMQ: once its first frame is accepted or
received, the rest are too, and ``NOBLOCK`` calls never stop half way. The only place a task can
be cancelled is while it waits, before it has taken or given anything. So a cancelled
``receive`` loses no message (it stays queued for the next receive) and a cancelled ``send``
sends nothing; a completed one sends all of it. The schedule point after an operation that did
not have to wait is cancel-shielded, so a message taken is always returned.

Zero copy. Frames of ``zmq.COPY_THRESHOLD`` bytes (64 KiB) or more are handed to pyzmq with
``copy=False`` and not copied, so a buffer that was sent must not be written to afterwards;
smaller ones are copied, as ZeroMQ does anyway. ``receive`` returns frame objects whose
``.buffer`` is a writable view of the message's memory (``.bytes`` copies it out).

Calls. The hot calls (read ``ZMQ_EVENTS``, take a whole message, queue a message of small
frames) go straight to the libzmq that pyzmq loaded, through the compiled ``_wire`` module, on
the socket's handle, while pyzmq says the socket is open: through pyzmq each costs microseconds
of Python-level work (an enum built per option read, a ``zmq.Frame`` per received frame), which
is much of a round trip right after a wait. Received frames are then ``_wire.Frame`` objects
(they own their libzmq message, like ``zmq.Frame``). Without the compiled module, or with
``INFINILLM_CORE=python``, pyzmq makes the same calls and frames are ``zmq.Frame``.

A socket is closed by ``close()`` (or ``async with``): tasks waiting on it get
``trio.ClosedResourceError``, and unsent messages are dropped after ``linger_ms``.
"""

from __future__ import annotations

import ctypes
from typing import Any, Sequence

import trio
import zmq

from .._choice import requested
from ..errors import TransportError

__all__ = ["ZmqSocket", "RouterSocket", "DealerSocket", "PushSocket", "PullSocket"]

# Plain ints (pyzmq's constants are enums, whose arithmetic costs microseconds), and pyzmq's
# compiled socket methods, called directly: the hot path is a few of these calls.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)
_get = zmq.backend.Socket.get
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv


def _bind_libzmq() -> Any:
    """The compiled socket calls (``_wire.zmq_events``, ``recv_multipart``,
    ``send_multipart``) bound to the libzmq pyzmq uses, or None where the compiled module or
    those functions cannot be found (then pyzmq's own calls serve)."""
    if requested() == "python":
        return None
    try:
        from . import _wire
    except ImportError:
        return None
    try:
        # Looked up through pyzmq's own extension module, the symbols resolve to the libzmq it
        # uses (its dependency, or the copy linked into it), whatever else the process loaded.
        from zmq.backend.cython import _zmq

        lib = ctypes.CDLL(_zmq.__file__)
        addresses = {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _wire._LIBZMQ_FUNCTIONS}
    except (ImportError, OSError, AttributeError):  # another pyzmq backend, or symbols not exported
        return None
    _wire.bind_libzmq(addresses, zmq_events=int(zmq.EVENTS), dontwait=int(zmq.NOBLOCK), sndmore=int(zmq.SNDMORE),
                      eagain=int(zmq.EAGAIN), copy_threshold=int(zmq.COPY_THRESHOLD))
    return _wire


_lib = _bind_libzmq()
if _lib is not None:
    _lib_events, _lib_recv, _lib_send = _lib.zmq_events, _lib.recv_multipart, _lib.send_multipart
_BUFFER_TYPES = (bytes, bytearray, memoryview, zmq.Frame, *((_lib.Frame,) if _lib is not None else ()))


def _recv_multipart(sock: zmq.Socket) -> list[zmq.Frame]:
    """One whole message, without blocking (``zmq.Again`` if there is none). ZeroMQ delivers
    multipart messages atomically: once the first frame is here, so are the others."""
    frame = _recv(sock, _NOBLOCK, False, False)
    frames = [frame]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False, False)
        frames.append(frame)
    return frames


def _send_multipart(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    """Queue a whole message, without blocking; ``zmq.Again`` if it cannot be, and then no
    part of it will be delivered. ZeroMQ checks the high-water mark at the first frame only; a
    later frame fails only when the pipe went away under us, and then ZeroMQ drops the rest of
    the message, which we feed it to end it."""
    last = len(frames) - 1
    for i in range(last):
        try:
            _send(sock, frames[i], _NOBLOCK | _SNDMORE, False, False)
        except zmq.Again:
            if i:
                for j in range(i + 1, last + 1):
                    try:
                        _send(sock, frames[j], _NOBLOCK | (_SNDMORE if j < last else 0), False, False)
                    except zmq.ZMQError:
                        pass
            raise
    _send(sock, frames[last], _NOBLOCK, False, False)


def _check_frames(frames: Sequence[Any]) -> None:
    # Refuse a bad frame before the first is queued, so a message is never sent in part.
    if not frames:
        raise ValueError("a message needs at least one frame")
    for i, f in enumerate(frames):
        if type(f) not in _BUFFER_TYPES:
            if isinstance(f, str):
                raise TypeError(f"frame {i} is a str: encode it to bytes")
            try:
                memoryview(f)
            except TypeError:
                raise TypeError(f"frame {i} ({type(f).__name__}) does not support the buffer protocol") from None


class ZmqSocket:
    """A pyzmq socket driven by trio (see the module docstring for the waiting protocol).

    Takes ownership of ``sock`` (which must not be used directly afterwards). Subclasses expose
    the operations their pattern allows; this class holds the machinery.
    """

    __slots__ = ("_sock", "_handle", "_fd", "_closed", "_watching", "_interrupted", "_lot", "_linger_ms", "__weakref__")

    socket_type: int = -1

    def __init__(self, sock: zmq.Socket, *, linger_ms: int = 0) -> None:
        if sock.closed:
            raise TransportError("cannot wrap a closed zmq socket")
        self._sock = sock
        self._handle: int = sock.underlying  # the libzmq socket, for the direct calls (_lib)
        self._fd: int = sock.getsockopt(zmq.FD)
        self._closed = False
        self._watching = False  # a task is inside wait_readable(fd)
        self._interrupted = False  # see _interrupt_receive
        self._lot = trio.lowlevel.ParkingLot()
        self._linger_ms = linger_ms
        sock.setsockopt(zmq.LINGER, linger_ms)

    @classmethod
    def create(cls, context: zmq.Context, *, linger_ms: int = 0, **options: Any) -> ZmqSocket:
        """A new socket of this pattern; ``options`` are zmq socket options by name
        (``sndhwm=1000``)."""
        sock = context.socket(cls.socket_type)
        try:
            for name, value in options.items():
                sock.setsockopt(getattr(zmq, name.upper()), value)
        except BaseException:
            sock.close(linger=0)
            raise
        return cls(sock, linger_ms=linger_ms)

    # ---- plumbing ---------------------------------------------------------------------------

    @property
    def zmq_socket(self) -> zmq.Socket:
        """The underlying pyzmq socket, for options; do not send or receive on it directly."""
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def bind(self, address: str) -> str:
        """Bind and return the resolved address (the real port for ``tcp://host:*``)."""
        self._check_open()
        try:
            self._sock.bind(address)
        except zmq.ZMQError as e:
            raise TransportError(f"cannot bind {address!r}: {e}") from None
        return self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def connect(self, address: str) -> None:
        self._check_open()
        try:
            self._sock.connect(address)
        except zmq.ZMQError as e:
            raise TransportError(f"cannot connect to {address!r}: {e}") from None

    def close(self) -> None:
        """Close now; idempotent. Waiting tasks get ``trio.ClosedResourceError``."""
        if self._closed:
            return
        self._closed = True
        try:
            trio.lowlevel.notify_closing(self._fd)
        except RuntimeError:  # outside trio (interpreter teardown): nobody can be waiting
            pass
        self._lot.unpark_all()
        self._sock.close(linger=self._linger_ms)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"{type(self).__name__} is closed")

    def _kick(self) -> None:
        # An operation may have drained the FD's signal: make the watcher look again. Waking a
        # task in wait_readable is what notify_closing does (it raises ClosedResourceError
        # there, which _wait_fd takes for a kick while the socket is open); a cancel scope
        # per wait would cost more on every wait than this costs on the rare kick.
        if self._watching:
            trio.lowlevel.notify_closing(self._fd)

    def _interrupt_receive(self) -> None:
        """Make a task waiting in an interruptible receive return None now (the ``Client``
        uses this for request timeouts). Nothing is lost: a message stays queued."""
        self._interrupted = True
        self._kick()
        self._lot.unpark_all()

    async def _wait_fd(self) -> None:
        """Wait until the socket may have changed (FD readable, or kicked). A checkpoint."""
        if self._watching:
            await self._lot.park()
            return
        self._watching = True
        try:
            await trio.lowlevel.wait_readable(self._fd)
        except trio.ClosedResourceError:
            if self._closed:
                raise
        finally:
            self._watching = False
            if self._lot:  # (unparking nobody still costs a few calls, on every wait)
                self._lot.unpark_all()

    def _zmq_error(self, e: zmq.ZMQError, what: str) -> Exception:
        if self._closed or e.errno in (zmq.ENOTSOCK, zmq.ETERM):
            return trio.ClosedResourceError(f"{type(self).__name__} is closed")
        return TransportError(f"{type(self).__name__}: {what} failed: {e}")

    # ---- the two operations -----------------------------------------------------------------

    def _receive_nowait(self) -> list[zmq.Frame]:
        self._check_open()
        try:
            if _lib is not None and not self._sock.closed:
                frames = _lib_recv(self._handle)
            else:
                frames = _recv_multipart(self._sock)
        except zmq.Again:
            raise trio.WouldBlock from None
        except zmq.ZMQError as e:
            raise self._zmq_error(e, "receive") from None
        self._kick()
        return frames

    async def _receive(self, *, interruptible: bool = False) -> list[zmq.Frame] | None:
        """One whole message. ``interruptible`` (the ``Client``'s): ``_interrupt_receive``
        makes it return None; the caller has checked for cancellation already."""
        if not interruptible:
            await trio.lowlevel.checkpoint_if_cancelled()
        sock = self._sock
        waited = False
        while True:
            if self._closed:
                raise trio.ClosedResourceError(f"{type(self).__name__} is closed")
            try:
                # ZMQ_EVENTS first: it processes pending commands, and is cheaper than EAGAIN.
                # (Straight from libzmq while pyzmq says the socket is open: a socket its
                # context closed behind our back is pyzmq's to refuse.)
                if _lib is not None and not sock.closed:
                    if _lib_events(self._handle) & _POLLIN:
                        frames = _lib_recv(self._handle)
                        break
                elif _get(sock, _EVENTS) & _POLLIN:
                    frames = _recv_multipart(sock)
                    break
            except zmq.Again:
                pass
            except zmq.ZMQError as e:
                raise self._zmq_error(e, "receive") from None
            if interruptible and self._interrupted:
                self._interrupted = False
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return None
            await self._wait_fd()
            waited = True
        if self._watching:
            self._kick()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return frames

    def _send_nowait(self, frames: Sequence[Any], *, checked: bool = False) -> None:
        """``checked=True``: the frames are known good (the codec's), skip checking them."""
        self._check_open()
        if not checked:
            _check_frames(frames)
        try:
            if _lib is None or self._sock.closed or not _lib_send(self._handle, frames):
                _send_multipart(self._sock, frames)
        except zmq.Again:
            raise trio.WouldBlock from None
        except zmq.ZMQError as e:
            raise self._zmq_error(e, "send") from None
        self._kick()

    async def _send(self, frames: Sequence[Any], *, schedule: bool = True) -> None:
        """Send all frames or none. ``schedule=False`` skips the schedule point after a send
        that did not wait (for callers that are about to wait anyway); it still raises if
        cancelled before sending."""
        await trio.lowlevel.checkpoint_if_cancelled()
        _check_frames(frames)
        sock = self._sock
        waited = False
        retried = False
        while True:
            if self._closed:
                raise trio.ClosedResourceError(f"{type(self).__name__} is closed")
            try:
                if _lib is None or sock.closed or not _lib_send(self._handle, frames):
                    _send_multipart(sock, frames)
            except zmq.Again:
                try:
                    events = _lib_events(self._handle) if _lib is not None and not sock.closed else _get(sock, _EVENTS)
                    ready = events & _POLLOUT
                except zmq.ZMQError as e:
                    raise self._zmq_error(e, "send") from None
                # A ROUTER may say POLLOUT while the pipe to this peer is full: wait then.
                if not ready or retried:
                    await self._wait_fd()
                    waited = True
                    retried = False
                else:
                    retried = True
                continue
            except zmq.ZMQError as e:
                raise self._zmq_error(e, "send") from None
            if self._watching:
                self._kick()
            if schedule and not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return


class RouterSocket(ZmqSocket):
    """ROUTER: receives ``(peer, frames)`` from many peers and replies to one by its id.

    ``ROUTER_MANDATORY`` is set, so a send to a peer that has gone raises ``TransportError``
    (EHOSTUNREACH) instead of vanishing, and a send to a peer whose queue is full waits.
    """

    __slots__ = ()
    socket_type = zmq.ROUTER

    def __init__(self, sock: zmq.Socket, *, linger_ms: int = 0) -> None:
        super().__init__(sock, linger_ms=linger_ms)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)

    async def receive(self) -> tuple[bytes, list[zmq.Frame]]:
        frames = await self._receive()
        return frames[0].bytes, frames[1:]

    def receive_nowait(self) -> tuple[bytes, list[zmq.Frame]]:
        frames = self._receive_nowait()
        return frames[0].bytes, frames[1:]

    async def send(self, peer: bytes, frames: Sequence[Any]) -> None:
        await self._send([peer, *frames])

    def send_nowait(self, peer: bytes, frames: Sequence[Any]) -> None:
        self._send_nowait([peer, *frames])


class DealerSocket(ZmqSocket):
    """DEALER: sends to and receives from the peer(s) it is connected to.

    ``IMMEDIATE`` is set, so messages queue only on completed connections: with no peer
    connected, ``send`` waits (and ``send_nowait`` raises ``trio.WouldBlock``) instead of
    queueing for a peer that may never come.
    """

    __slots__ = ()
    socket_type = zmq.DEALER

    def __init__(self, sock: zmq.Socket, *, linger_ms: int = 0) -> None:
        super().__init__(sock, linger_ms=linger_ms)
        sock.setsockopt(zmq.IMMEDIATE, 1)

    async def receive(self) -> list[zmq.Frame]:
        return await self._receive()

    def receive_nowait(self) -> list[zmq.Frame]:
        return self._receive_nowait()

    async def send(self, frames: Sequence[Any]) -> None:
        await self._send(frames)

    def send_nowait(self, frames: Sequence[Any]) -> None:
        self._send_nowait(frames)


class PushSocket(ZmqSocket):
    """PUSH: one-way sender, round-robin over connected pullers; waits when none is there."""

    __slots__ = ()
    socket_type = zmq.PUSH

    def __init__(self, sock: zmq.Socket, *, linger_ms: int = 0) -> None:
        super().__init__(sock, linger_ms=linger_ms)
        sock.setsockopt(zmq.IMMEDIATE, 1)

    async def send(self, frames: Sequence[Any]) -> None:
        await self._send(frames)

    def send_nowait(self, frames: Sequence[Any]) -> None:
        self._send_nowait(frames)


class PullSocket(ZmqSocket):
    """PULL: one-way receiver, fair-queued over all connected pushers."""

    __slots__ = ()
    socket_type = zmq.PULL

    async def receive(self) -> list[zmq.Frame]:
        return await self._receive()

    def receive_nowait(self) -> list[zmq.Frame]:
        return self._receive_nowait()


class _PairSocket(ZmqSocket):
    """PAIR: used for socket monitors (inproc)."""

    __slots__ = ()
    socket_type = zmq.PAIR

    async def receive(self) -> list[zmq.Frame]:
        return await self._receive()
