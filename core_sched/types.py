"""Data types that cross the scheduler core's boundary (shared by the compiled core and twin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["PoolCounters", "PoolDelta", "BLOCK_FREE", "BLOCK_RESERVED", "BLOCK_USED", "BLOCK_CACHED"]

# Block states (core_sched/csrc/block_pool.hpp: BlockState).
BLOCK_FREE = 0
BLOCK_RESERVED = 1
BLOCK_USED = 2
BLOCK_CACHED = 3  # no request holds it; keeps a cached prefix's KV (evictable, counted free)


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


# ---- the batch planner (core_sched/batch.py, _batch.pyx) --------------------------------------

__all__ += ["ScheduledChunk", "LoanRequest", "Preemption", "PrefixClaim", "StepPlan", "BatchStats"]


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """One request's share of a step: compute the KV of positions ``[start, start + num_tokens)``.

    ``samples`` is True when the chunk reaches the request's last token, so the step samples
    its next token (a decode, or the last chunk of a prefill); the engine then calls
    ``BatchPlanner.append_output`` (or ``finish``).
    """

    request_id: int
    start: int
    num_tokens: int
    samples: bool


@dataclass(frozen=True, slots=True)
class LoanRequest:
    """A running request is short of ``num_blocks`` blocks: borrow them from a creditor.

    The engine reserves them (``BlockPool.try_reserve`` there) and hands them to
    ``BatchPlanner.add_loan`` before the next step; the request sits this step out.
    """

    request_id: int
    num_blocks: int


class Preemption(NamedTuple):
    """A request preempted (recompute mode) in this step.

    Its local blocks are already free; ``remote_runs`` (``((instance, (block, ...)), ...)``)
    are the blocks other instances hold for it, which the caller must free there. A named
    tuple so that ``for rid, runs in plan.preempted`` works.
    """

    request_id: int
    remote_runs: tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True, slots=True)
class PrefixClaim:
    """A request admitted in this step reuses cached blocks another instance holds.

    The planner put ``blocks`` (that instance's block ids, named by ``hashes``) into the
    request's table as if lent, and counted them borrowed. The engine takes them on that
    instance (``BlockPool.acquire`` there) before the step runs; if they are gone (evicted),
    it forgets them (``BatchPlanner.forget_remote``) and preempts the request, whose claimed
    blocks it must not free there.
    """

    request_id: int
    instance: int
    blocks: tuple[int, ...]
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What ``BatchPlanner.schedule`` hands the engine for one step (vLLM's SchedulerOutput).

    ``chunks``: running requests first, in admission order, then newly admitted ones;
    ``num_batched_tokens`` is the sum of their ``num_tokens``. Block tables and slot mappings
    already cover every chunk. ``preempted`` and ``loans`` are in the order they happened;
    ``claims`` are the cached blocks on other instances that newly admitted requests reuse.
    """

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Preemption, ...]
    loans: tuple[LoanRequest, ...]
    num_batched_tokens: int
    claims: tuple[PrefixClaim, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.preempted and not self.loans


@dataclass(frozen=True, slots=True)
class BatchStats:
    """A snapshot of one instance's batch planner (``BatchPlanner.statistics()``).

    ``waiting_blocks`` is what the head waiting request needs for its first chunk; the counts
    ``num_steps``, ``num_preemptions`` and ``num_loans`` run since the planner was made, as
    do the prefix cache's: ``prefix_query_tokens`` (the tokens of each admission of a request
    that had block hashes: a preempted request counts again when it is admitted again, as in
    vLLM) and ``prefix_hit_tokens`` (those found cached, here or on other instances).
    """

    num_running: int
    num_waiting: int
    waiting_blocks: int
    num_steps: int
    num_preemptions: int
    num_loans: int
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


# ---- the debt ledger and planner (core_sched/ledger.py, planner.py, _ledger.pyx) --------------

__all__ += ["InstanceView", "LedgerTotals", "Move", "MOVE_SPREAD", "MOVE_HOME"]

# Move kinds (core_sched/csrc/planner.hpp: MoveKind).
MOVE_SPREAD = "spread"  # blocks of a debtor's request go to a creditor
MOVE_HOME = "home"  # blocks of a request come back to its home


@dataclass(frozen=True, slots=True)
class InstanceView:
    """The ledger's view of one instance (``DebtLedger.instance``).

    Counters as of heartbeat ``version``, as the instance's pool counts them
    (``capacity == free + used + reserved``, ``lent <= used``); ``lendable`` is
    ``min(free, max(0, max_lent - lent - reserved))``. Load as last set: ``batch_size`` running
    requests, ``num_waiting`` queued, ``waiting_blocks`` what the head of the queue needs.
    ``away_blocks`` counts blocks of its own requests on other instances, from the placements.
    """

    instance_id: int
    host: int
    version: int
    capacity: int
    free: int
    used: int
    lent: int
    reserved: int
    borrowed: int
    max_lent: int
    lendable: int
    batch_size: int
    num_waiting: int
    waiting_blocks: int
    away_blocks: int

    @property
    def load(self) -> int:
        """What the creditor ranking weighs after free memory: running plus waiting requests."""
        return self.batch_size + self.num_waiting


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """Counters summed over the ledger's instances (``DebtLedger.totals``)."""

    num_instances: int
    num_requests: int
    capacity: int
    free: int
    used: int
    lent: int
    reserved: int
    borrowed: int
    lendable: int
    batch_size: int
    num_waiting: int


@dataclass(frozen=True, slots=True)
class Move:
    """Move ``num_blocks`` blocks of a request from instance ``src`` to ``dst`` (``Planner.plan``).

    ``kind`` is ``"spread"`` (from a memory-bound debtor, its home, to a creditor) or ``"home"``
    (back to the request's home, ``dst``). The runtime carries it out: reserve on ``dst``, copy,
    free on ``src``, then ``record_blocks`` twice.
    """

    request_id: int
    num_blocks: int
    src: int
    dst: int
    kind: str
