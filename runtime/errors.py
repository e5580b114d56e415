"""The one error hierarchy of infinillm.

Every error the runtime raises on purpose derives from :class:`InfiniLLMError`, so an embedding
application can catch them all with one clause and still tell them apart::

    InfiniLLMError
    ├── ValidationError (also ValueError)   a value given by the caller is out of range
    ├── CapacityError                       not enough KV memory, now or ever
    │   └── RequestTooLongError             a request that can never fit in the cluster
    ├── InstanceDeadError                   an instance stopped answering or crashed
    ├── TransportError                      malformed, oversized or undeliverable messages
    ├── SchedulerError                      a scheduler-core invariant was refused
    └── RequestAbortedError                 the request was aborted while it was awaited

Messages name the value and the limit it broke, so the caller can act on them without
reading the code (``"block_size=7 is invalid: must be a power of two in [1, 1024]"``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "InfiniLLMError",
    "ValidationError",
    "CapacityError",
    "RequestTooLongError",
    "InstanceDeadError",
    "TransportError",
    "SchedulerError",
    "RequestAbortedError",
]


class InfiniLLMError(Exception):
    """Base class of every error infinillm raises on purpose."""


class ValidationError(InfiniLLMError, ValueError):
    """A caller-supplied value is invalid.

    ``field`` names what was wrong, ``value`` is what was given and ``allowed`` says what
    would have been accepted; all three appear in the message.
    """

    def __init__(self, field: str, value: Any, allowed: str, *, owner: str | None = None) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        self.owner = owner
        where = f"{owner}.{field}" if owner else field
        super().__init__(f"{where}={value!r} is invalid: {allowed}")

    def __reduce__(self):  # keep the keyword-only `owner` through copy/pickle-free reconstruction
        return (_rebuild_validation_error, (self.field, self.value, self.allowed, self.owner))


def _rebuild_validation_error(field, value, allowed, owner):
    return ValidationError(field, value, allowed, owner=owner)


class CapacityError(InfiniLLMError):
    """Not enough KV blocks for what was asked (free blocks, lending cap, reservations)."""


class RequestTooLongError(CapacityError, ValueError):
    """A request that could never fit, even with the KV memory of the whole cluster."""


class InstanceDeadError(InfiniLLMError):
    """An instance crashed, exited, or stopped answering heartbeats."""


class TransportError(InfiniLLMError):
    """A message could not be decoded (malformed, truncated, oversized, wrong version) or
    could not be delivered (peer gone, timed out)."""


class SchedulerError(InfiniLLMError):
    """The scheduler core refused an operation that would break its invariants
    (freeing a block that is not the request's, committing an unknown reservation, ...)."""


class RequestAbortedError(InfiniLLMError):
    """The request was aborted (by id, or by its consumer leaving) while it was awaited."""
