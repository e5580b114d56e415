"""Data types that cross the scheduler core's boundary (shared by the compiled core and twin)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PoolCounters", "PoolDelta", "BLOCK_FREE", "BLOCK_RESERVED", "BLOCK_USED"]

# Block states (core_sched/csrc/block_pool.hpp: BlockState).
BLOCK_FREE = 0
BLOCK_RESERVED = 1
BLOCK_USED = 2


@dataclass(frozen=True, slots=True)
class PoolCounters:
    """A snapshot of one instance's block pool.

    ``capacity == free + reserved + used``; ``lent`` (blocks holding other instances'
    requests) is part of ``used``; ``borrowed`` counts blocks of this instance's requests held
    by other instances (not part of this pool's capacity).
    """

    version: int
    capacity: int
    free: int
    used: int
    lent: int
    reserved: int
    borrowed: int


@dataclass(frozen=True, slots=True)
class PoolDelta:
    """Counter changes of one pool between two heartbeats.

    The receiver applies it only if ``base_version`` equals the version it last saw from this
    instance; otherwise it has missed a heartbeat and must ask for a full snapshot.
    """

    instance_id: int
    base_version: int
    version: int
    capacity: int
    free: int
    used: int
    lent: int
    reserved: int
    borrowed: int

    @property
    def empty(self) -> bool:
        return self.version == self.base_version
