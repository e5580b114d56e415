"""``Transport``: one trio loop's ZeroMQ context, its sockets, addresses, codec and CURVE keys.

::

    async with open_transport(config) as tp:                 # TransportConfig
        async with tp.open_server(handler) as server:        # ROUTER, bound to tp.default_address
            async with tp.open_client(server.address) as client:
                reply = await client.request(msg)

Addresses. ``default_address(name)`` follows ``config.transport``: ``inproc://name``;
``ipc://<private dir>/name`` (a directory made for this transport, mode 0700, removed on close);
``tcp://<bind_host>:<port>`` with ``bind_host`` loopback unless configured and the port
``base_port + index`` (any free port when ``base_port`` is 0). Any address may also be given
explicitly.

Security. tcp sockets get CURVE when keys are configured (``auth.py``): servers then admit
only authorized client keys. Without keys, binding tcp to anything but loopback is refused
unless ``allow_insecure_tcp=True``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import tempfile
import weakref
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, TypeVar

import trio
import zmq

from ..config import TransportConfig
from ..errors import TransportError
from .auth import CurveKeys, ZapHandler, ZapStats
from .codec import Codec
from .socket import ZmqSocket

if TYPE_CHECKING:
    from .endpoint import Client, Handler, Puller, Pusher, Server

__all__ = ["Transport", "open_transport"]

S = TypeVar("S", bound=ZmqSocket)

_IPC_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the NUL
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LOOPBACK_NAMES = ("localhost",)


def _tcp_host(address: str) -> str:
    rest = address[len("tcp://") :]
    if ";" in rest:  # source;destination form: the destination is what matters
        rest = rest.split(";", 1)[1]
    if rest.startswith("["):
        return rest[1 : rest.find("]")]
    return rest.rsplit(":", 1)[0]


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Transport:
    """Makes this loop's sockets and endpoints; closes them all on close. Use
    ``open_transport`` (it also runs the ZAP handler when CURVE keys are configured)."""

    def __init__(
        self,
        config: TransportConfig | None = None,
        *,
        keys: CurveKeys | None = None,
        allow_insecure_tcp: bool = False,
    ) -> None:
        self.config = config if config is not None else TransportConfig()
        self.keys = keys if keys is not None else CurveKeys.from_config(self.config)
        self.allow_insecure_tcp = allow_insecure_tcp
        self.codec = Codec.from_config(self.config)
        self._context = zmq.Context()
        self._sockets: weakref.WeakSet[ZmqSocket] = weakref.WeakSet()
        self._ipc_dir: str | None = None
        self._closed = False
        self.zap: ZapHandler | None = ZapHandler(self._context, self.keys) if self.keys is not None else None

    @property
    def zmq_context(self) -> zmq.Context:
        return self._context

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- sockets and addresses ---------------------------------------------------------------

    def socket(self, cls: type[S], **options: Any) -> S:
        """A new trio socket of pattern ``cls`` (``RouterSocket``...); ``options`` are zmq
        socket options by name. Closed with the transport if not before."""
        if self._closed:
            raise trio.ClosedResourceError("the transport is closed")
        sock = cls.create(self._context, **options)
        self._sockets.add(sock)
        return sock

    def _watch(self, sock: S) -> S:
        self._sockets.add(sock)
        return sock

    def default_address(self, name: str, index: int = 0) -> str:
        """Where an endpoint called ``name`` binds by default (see the module docstring)."""
        if not _NAME.fullmatch(name):
            raise TransportError(f"endpoint name {name!r} must be letters, digits, '_', '.' or '-'")
        kind = self.config.transport
        if kind == "inproc":
            return f"inproc://{name}"
        if kind == "ipc":
            if self._ipc_dir is None:
                self._ipc_dir = tempfile.mkdtemp(prefix="infinillm-")  # mode 0700
            return f"ipc://{self._ipc_dir}/{name}"
        host = self.config.bind_host
        if host == "localhost":
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        port = self.config.base_port + index if self.config.base_port else "*"
        return f"tcp://{host}:{port}"

    def bind(self, sock: ZmqSocket, address: str | None = None, *, name: str = "endpoint") -> str:
        """Bind ``sock`` (to ``default_address(name)`` when no address is given) and return
        the resolved address, for peers to connect to."""
        if address is None:
            address = self.default_address(name)
        if address.startswith("tcp://"):
            host = _tcp_host(address)
            if self.keys is not None:
                self.keys.apply_server(sock.zmq_socket)
            elif not _is_loopback(host) and not self.allow_insecure_tcp:
                raise TransportError(
                    f"refusing to bind {address!r} without CURVE keys: only loopback tcp may be unauthenticated "
                    "(set curve_secret_key_file/curve_public_key_file, or allow_insecure_tcp=True)"
                )
            if ":" in host:
                sock.zmq_socket.setsockopt(zmq.IPV6, 1)
        elif address.startswith("ipc://"):
            if len(address) - len("ipc://") > _IPC_PATH_MAX:
                raise TransportError(
                    f"ipc path {address[6:]!r} is {len(address) - 6} bytes, over the limit of {_IPC_PATH_MAX}"
                )
        elif not address.startswith("inproc://"):
            raise TransportError(f"address {address!r} must start with tcp://, ipc:// or inproc://")
        return sock.bind(address)

    def connect(self, sock: ZmqSocket, address: str) -> None:
        """Connect ``sock`` to ``address`` (with CURVE client keys over tcp when configured)."""
        if address.startswith("tcp://"):
            if self.keys is not None:
                self.keys.apply_client(sock.zmq_socket)
            if ":" in _tcp_host(address):
                sock.zmq_socket.setsockopt(zmq.IPV6, 1)
        elif not address.startswith(("ipc://", "inproc://")):
            raise TransportError(f"address {address!r} must start with tcp://, ipc:// or inproc://")
        sock.connect(address)

    # ---- endpoints (see endpoint.py) ---------------------------------------------------------

    def open_server(self, handler: Handler, address: str | None = None, *, name: str = "server",
                    concurrency: int = 1) -> AbstractAsyncContextManager[Server]:
        """``async with``: a ``Server`` answering requests with ``handler``."""
        from .endpoint import open_server

        return open_server(self, handler, address, name=name, concurrency=concurrency)

    def open_client(self, address: str, *, timeout: float | None = None) -> AbstractAsyncContextManager[Client]:
        """``async with``: a ``Client`` of the server at ``address``."""
        from .endpoint import open_client

        return open_client(self, address, timeout=timeout)

    def open_pusher(self, address: str) -> AbstractAsyncContextManager[Pusher]:
        """``async with``: a ``Pusher`` sending one-way messages to the puller at ``address``."""
        from .endpoint import open_pusher

        return open_pusher(self, address)

    def open_puller(self, address: str | None = None, *, name: str = "puller") -> AbstractAsyncContextManager[Puller]:
        """``async with``: a ``Puller`` bound to ``address`` (default: ``default_address(name)``)."""
        from .endpoint import open_puller

        return open_puller(self, address, name=name)

    def zap_statistics(self) -> ZapStats | None:
        return self.zap.statistics() if self.zap is not None else None

    # ---- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every socket made here, the context, and the ipc directory."""
        if self._closed:
            return
        self._closed = True
        for sock in list(self._sockets):
            sock.close()
        self._context.destroy(linger=0)
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None

    def __del__(self) -> None:  # a transport left open still removes its ipc directory
        d = getattr(self, "_ipc_dir", None)
        if d is not None and os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def open_transport(
    config: TransportConfig | None = None,
    *,
    keys: CurveKeys | None = None,
    allow_insecure_tcp: bool = False,
) -> AsyncIterator[Transport]:
    """A ``Transport`` for the enclosed block; runs its ZAP handler (CURVE) in a nursery."""
    tp = Transport(config, keys=keys, allow_insecure_tcp=allow_insecure_tcp)
    try:
        async with trio.open_nursery() as nursery:
            if tp.zap is not None:
                await nursery.start(tp.zap.serve)
            try:
                yield tp
            finally:
                nursery.cancel_scope.cancel()
    finally:
        tp.close()
