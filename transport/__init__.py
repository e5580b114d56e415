"""The wire between the runtime and its instances, and between instances: trio over ZeroMQ,
typed messages with raw tensor frames (never pickle), CURVE authentication for tcp.

Everything here binds to loopback unless an address is configured
(``TransportConfig.bind_host``).
"""

from __future__ import annotations

from ..config import TransportConfig
from ..errors import TransportError

__all__ = ["TransportConfig", "TransportError"]
