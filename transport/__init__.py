"""The wire between the runtime and its instances, and between instances: trio over ZeroMQ,
typed messages with raw tensor frames (never pickle), CURVE authentication for tcp.

Layers, bottom up (each module's docstring has the details):

``socket.py``    trio wrappers over pyzmq sockets, one class per pattern (ROUTER, DEALER, PUSH,
                 PULL): FD waiting with ZMQ_EVENTS, zero-copy multipart, cancellation-safe
``messages.py``  every message as a frozen dataclass (``AttentionQuery``, ``AttentionResult``,
                 ``HeartbeatDelta``, ``ReserveBlocks``, ..., ``ErrorReply``, ``Ack``)
``codec.py``     the one encoder/decoder: msgpack header + raw tensor frames, versioned,
                 refusing malformed, truncated, oversized or wrong-version input
``auth.py``      CURVE key files and the ZAP handler (``python -m infinillm.transport.keys``)
``context.py``   ``Transport``: a loop's ZeroMQ context, addresses, sockets, endpoints
``endpoint.py``  ``Server`` / ``Client`` (request/reply, timeouts, peer-gone errors),
                 ``Pusher`` / ``Puller`` (one-way)

Everything here binds to loopback unless an address is configured
(``TransportConfig.bind_host``).
"""

from __future__ import annotations

from ..config import TransportConfig
from ..errors import TransportError
from .auth import CurveKeys, ZapHandler, ZapStats, generate_keypair, key_files, load_public_key, load_secret_key
from .codec import MAX_DIMS, PROTOCOL_VERSION, SMALL_TENSOR_BYTES, Codec, DecodeError
from .context import Transport, open_transport
from .endpoint import (
    Client,
    ClientStats,
    Handler,
    Puller,
    PullerStats,
    Pusher,
    RemoteError,
    Server,
    ServerStats,
    error_from_reply,
    open_client,
    open_puller,
    open_pusher,
    open_server,
)
from .messages import (
    MESSAGE_TYPES,
    AbortRequest,
    ConnectPeers,
    LendableUpdate,
    InstancesLost,
    FetchBlocks,
    JoinRequest,
    Joined,
    JoinReady,
    Sync,
    Synced,
    Ack,
    AddRequest,
    AttentionQuery,
    AttentionResult,
    BlockTransfer,
    CancelReservation,
    CommitReservation,
    Committed,
    ErrorReply,
    HeartbeatDelta,
    Message,
    MoveBlocks,
    ReleaseBlocks,
    ClaimCached,
    Claimed,
    RequestDelta,
    Reservation,
    ReserveBlocks,
    StepOutputs,
)
from .socket import DealerSocket, PullSocket, PushSocket, RouterSocket, ZmqSocket

__all__ = [
    "TransportConfig",
    "TransportError",
    # sockets
    "ZmqSocket",
    "RouterSocket",
    "DealerSocket",
    "PushSocket",
    "PullSocket",
    # messages
    "Message",
    "MESSAGE_TYPES",
    "AttentionQuery",
    "AttentionResult",
    "HeartbeatDelta",
    "ReserveBlocks",
    "Reservation",
    "CommitReservation",
    "Committed",
    "CancelReservation",
    "ReleaseBlocks",
    "ClaimCached",
    "Claimed",
    "MoveBlocks",
    "BlockTransfer",
    "AddRequest",
    "AbortRequest",
    "ConnectPeers",
    "LendableUpdate",
    "InstancesLost",
    "FetchBlocks",
    "JoinRequest",
    "Joined",
    "JoinReady",
    "Sync",
    "Synced",
    "RequestDelta",
    "StepOutputs",
    "ErrorReply",
    "Ack",
    # codec
    "Codec",
    "DecodeError",
    "PROTOCOL_VERSION",
    "SMALL_TENSOR_BYTES",
    "MAX_DIMS",
    # auth
    "CurveKeys",
    "ZapHandler",
    "ZapStats",
    "generate_keypair",
    "key_files",
    "load_public_key",
    "load_secret_key",
    # endpoints
    "Transport",
    "open_transport",
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
