"""Pure-Python twin of the debt ledger (``core_sched/csrc/ledger.hpp``).

Same behaviour, results and errors as the compiled ``DebtLedger``: the test suite runs against
both. Read ``ledger.hpp`` for the design; in short, two sources feed the ledger and it keeps
them apart:

- **counters** per instance, from heartbeats (``apply_delta`` / ``apply_snapshot``), exactly as
  the instance's ``BlockPool`` counts them. Invariant: after every pool's deltas are applied in
  order, ``instance(i)`` carries that pool's ``counters()``.
- **placement** per request, from the runtime (``record_blocks``): its home and its blocks on
  each instance. Blocks of a request on an instance other than its home are a debt of the home
  to that instance (``debtors_of`` / ``creditors_of``).

Per instance it also keeps the load the planner reads (``set_load``), and two indexes: the
requests with blocks there (``parts``) and its own requests with blocks elsewhere
(``homed_away``, ``away_blocks``). Where the C++ iterates an ordered map, this file sorts.
"""

from __future__ import annotations

from ..errors import SchedulerError, ValidationError
from .types import InstanceView, LedgerTotals, PoolCounters, PoolDelta

__all__ = ["DebtLedger"]

INT32_MAX = 2147483647
INT64_MAX = 9223372036854775807


class _Instance:
    __slots__ = (
        "id", "host", "max_lent", "version", "capacity", "free", "used", "lent", "reserved", "borrowed",
        "batch_size", "num_waiting", "waiting_blocks", "parts", "homed_away", "away_blocks",
    )  # fmt: skip

    def __init__(self, instance_id: int, capacity: int, max_lent: int, host: int) -> None:
        self.id = instance_id
        self.host = host
        self.max_lent = max_lent
        # A fresh instance's counters are a fresh BlockPool's: version 0, everything free.
        self.version = 0
        self.capacity = capacity
        self.free = capacity
        self.used = self.lent = self.reserved = self.borrowed = 0
        self.batch_size = self.num_waiting = self.waiting_blocks = 0
        self.parts: dict[int, list[int]] = {}  # request -> [blocks here, home]
        self.homed_away: set[int] = set()  # own requests with blocks on other instances
        self.away_blocks = 0  # their blocks elsewhere

    def lendable_with(self, free: int, lent: int) -> int:
        return min(free, max(0, self.max_lent - lent - self.reserved))

    @property
    def lendable(self) -> int:
        return self.lendable_with(self.free, self.lent)

    @property
    def load(self) -> int:
        return self.batch_size + self.num_waiting


class _Request:
    __slots__ = ("home", "total", "placement")

    def __init__(self, home: int) -> None:
        self.home = home
        self.total = 0
        self.placement: dict[int, int] = {}  # instance -> blocks (> 0)


class DebtLedger:
    """The cluster's debt ledger (gManager): heartbeat counters and request placements."""

    def __init__(self) -> None:
        self._instances: dict[int, _Instance] = {}
        self._requests: dict[int, _Request] = {}

    # ---- instances ---------------------------------------------------------------------------

    def register_instance(self, instance_id: int, capacity: int, max_lent: int, host: int = 0) -> None:
        """Add an instance with a fresh pool's counters (version 0, all ``capacity`` blocks free)."""
        _check_range("instance_id", instance_id, 0)
        _check_range("capacity", capacity, 1)
        if not 0 <= max_lent <= capacity:
            raise ValidationError("max_lent", max_lent, f"must be in [0, {capacity}] (capacity)")
        _check_range("host", host, 0)
        if instance_id in self._instances:
            raise SchedulerError(f"instance {instance_id} is already registered")
        self._instances[instance_id] = _Instance(instance_id, capacity, max_lent, host)

    def remove_instance(self, instance_id: int) -> list[int]:
        """Drop a dead instance; returns (sorted) the requests that had blocks there or had it as home.

        Requests homed there are forgotten entirely (their blocks on other instances are the
        caller's to free); the others lose only their part on the dead instance.
        """
        x = self._get(instance_id)
        affected = list(x.parts)
        affected += [rid for rid, r in self._requests.items() if r.home == x.id and rid not in x.parts]
        affected.sort()
        for rid in affected:
            r = self._requests[rid]
            if r.home == x.id:
                self.forget_request(rid)
            else:
                b = r.placement.pop(x.id, 0)
                r.total -= b
                self._update_away(rid, r, -b)
        del self._instances[instance_id]
        return affected

    def has_instance(self, instance_id: int) -> bool:
        return instance_id in self._instances

    def instance_ids(self) -> list[int]:
        return sorted(self._instances)

    @property
    def num_instances(self) -> int:
        return len(self._instances)

    def instance(self, instance_id: int) -> InstanceView:
        x = self._get(instance_id)
        return InstanceView(
            x.id, x.host, x.version, x.capacity, x.free, x.used, x.lent, x.reserved, x.borrowed, x.max_lent,
            x.lendable, x.batch_size, x.num_waiting, x.waiting_blocks, x.away_blocks,
        )  # fmt: skip

    # ---- heartbeats --------------------------------------------------------------------------

    def apply_delta(self, delta: PoolDelta) -> bool:
        """Apply a heartbeat's counter changes.

        Applies only if ``delta.base_version`` is the version last applied for that instance;
        otherwise returns False and changes nothing (a heartbeat was missed: the caller asks the
        instance for a snapshot). Raises SchedulerError for an unknown instance, or counters
        that would break ``capacity == free + used + reserved``, ``lent <= used`` or go negative.
        """
        x = self._get(delta.instance_id)
        if delta.base_version != x.version:
            return False
        if delta.version < delta.base_version:
            raise SchedulerError(
                f"instance {x.id}: delta goes back from version {delta.base_version} to {delta.version}"
            )
        new = (
            x.capacity + delta.capacity, x.free + delta.free, x.used + delta.used, x.lent + delta.lent,
            x.reserved + delta.reserved, x.borrowed + delta.borrowed,
        )  # fmt: skip
        _check_counters(x.id, *new)
        x.version = delta.version
        x.capacity, x.free, x.used, x.lent, x.reserved, x.borrowed = new
        return True

    def apply_snapshot(self, instance_id: int, counters: PoolCounters) -> None:
        """Replace an instance's counters with a full snapshot (authoritative, whatever its version)."""
        x = self._get(instance_id)
        c = counters
        _check_counters(x.id, c.capacity, c.free, c.used, c.lent, c.reserved, c.borrowed)
        x.version = c.version
        x.capacity, x.free, x.used, x.lent, x.reserved, x.borrowed = (
            c.capacity, c.free, c.used, c.lent, c.reserved, c.borrowed,
        )  # fmt: skip

    def set_max_lent(self, instance_id: int, max_lent: int) -> None:
        """The instance's lending cap, as its pool now has it (``BlockPool.set_max_lent_blocks``,
        reported in its heartbeats): what it may lend follows."""
        x = self._get(instance_id)
        if isinstance(max_lent, bool) or not isinstance(max_lent, int) or not 0 <= max_lent <= x.capacity:
            raise ValidationError("max_lent", max_lent, f"must be an integer in [0, {x.capacity}] (capacity)")
        x.max_lent = max_lent

    def set_load(self, instance_id: int, batch_size: int, num_waiting: int, waiting_blocks: int) -> None:
        """The instance's load: running requests, queued ones, blocks the head of the queue needs."""
        _check_range("batch_size", batch_size, 0)
        _check_range("num_waiting", num_waiting, 0)
        _check_range("waiting_blocks", waiting_blocks, 0)
        x = self._get(instance_id)
        x.batch_size, x.num_waiting, x.waiting_blocks = batch_size, num_waiting, waiting_blocks

    # ---- placement ---------------------------------------------------------------------------

    def record_blocks(self, request_id: int, home: int, instance: int, delta_blocks: int) -> None:
        """``+n`` when n blocks of the request are placed on ``instance``, ``-n`` when freed or moved.

        The first call for a request records its home (even with ``delta_blocks == 0``). A
        request's blocks on an instance never go below 0 (SchedulerError, nothing changes).
        """
        _check_range("request_id", request_id, 0, INT64_MAX)
        self._get(home)
        x = self._get(instance)
        r = self._requests.get(request_id)
        if r is not None and r.home != home:
            raise SchedulerError(f"request {request_id} has home {r.home}, not {home}")
        have = 0 if r is None else r.placement.get(instance, 0)
        now = have + delta_blocks
        if now < 0:
            raise SchedulerError(
                f"request {request_id} holds {have} blocks on instance {instance}: cannot remove {-delta_blocks}"
            )
        if now > INT32_MAX:
            raise ValidationError(
                "delta_blocks", delta_blocks,
                f"would put {now} blocks of request {request_id} on instance {instance} (at most {INT32_MAX})",
            )  # fmt: skip
        if r is None:
            r = self._requests[request_id] = _Request(home)
        if now == 0:
            r.placement.pop(instance, None)
            x.parts.pop(request_id, None)
        else:
            r.placement[instance] = now
            x.parts[request_id] = [now, r.home]
        r.total += delta_blocks
        if instance != r.home:
            self._update_away(request_id, r, delta_blocks)

    def forget_request(self, request_id: int) -> int:
        """Forget a finished or aborted request; returns the blocks it still had recorded."""
        r = self._requests.pop(request_id, None)
        if r is None:
            return 0
        for inst in r.placement:
            x = self._instances.get(inst)
            if x is not None:
                x.parts.pop(request_id, None)
        h = self._instances.get(r.home)
        if h is not None:
            h.away_blocks -= r.total - r.placement.get(r.home, 0)
            h.homed_away.discard(request_id)
        return r.total

    def placement(self, request_id: int) -> dict[int, int]:
        """Blocks of the request per instance (by instance id)."""
        r = self._get_request(request_id)
        return {inst: r.placement[inst] for inst in sorted(r.placement)}

    def home_of(self, request_id: int) -> int:
        return self._get_request(request_id).home

    def has_request(self, request_id: int) -> bool:
        return request_id in self._requests

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def requests_on(self, instance_id: int) -> dict[int, int]:
        """Blocks per request (by request id) held on the instance, own and lent-in."""
        x = self._get(instance_id)
        return {rid: x.parts[rid][0] for rid in sorted(x.parts)}

    # ---- queries -----------------------------------------------------------------------------

    def creditors(self, borrower: int, n: int, limit: int | None = None) -> list[int]:
        """Instances that could lend ``borrower`` ``n`` blocks now, best first.

        Those (not the borrower) with ``lendable >= n``, ranked by free blocks (most first), then
        load (batch + waiting, least first), then the borrower's host first, then id. The
        answer may be stale by a heartbeat: the borrower still reserves (``try_reserve``).
        """
        if not 1 <= n <= INT32_MAX:
            raise ValidationError("n", n, f"must be in [1, {INT32_MAX}]")
        if limit is not None and limit < 0:
            raise ValidationError("limit", limit, "must be >= 0 or None")
        b = self._get(borrower)
        ranked = sorted(
            (-x.free, x.load, 0 if x.host == b.host else 1, x.id)
            for x in self._instances.values()
            if x.id != b.id and x.lendable >= n
        )
        if limit is not None:
            ranked = ranked[:limit]
        return [key[3] for key in ranked]

    def debtors_of(self, creditor: int) -> dict[int, int]:
        """Blocks of other instances' requests that ``creditor`` holds, per home (by id)."""
        x = self._get(creditor)
        sums: dict[int, int] = {}
        for blocks, home in x.parts.values():
            if home != x.id:
                sums[home] = sums.get(home, 0) + blocks
        return {home: sums[home] for home in sorted(sums)}

    def creditors_of(self, debtor: int) -> dict[int, int]:
        """Blocks of ``debtor``'s requests that other instances hold, per instance (by id)."""
        x = self._get(debtor)
        sums: dict[int, int] = {}
        for rid in x.homed_away:
            for inst, blocks in self._requests[rid].placement.items():
                if inst != x.id:
                    sums[inst] = sums.get(inst, 0) + blocks
        return {inst: sums[inst] for inst in sorted(sums)}

    def totals(self) -> LedgerTotals:
        xs = self._instances.values()
        return LedgerTotals(
            len(self._instances),
            len(self._requests),
            sum(x.capacity for x in xs),
            sum(x.free for x in xs),
            sum(x.used for x in xs),
            sum(x.lent for x in xs),
            sum(x.reserved for x in xs),
            sum(x.borrowed for x in xs),
            sum(x.lendable for x in xs),
            sum(x.batch_size for x in xs),
            sum(x.num_waiting for x in xs),
        )

    # ---- internals ---------------------------------------------------------------------------

    def _get(self, instance_id: int) -> _Instance:
        x = self._instances.get(instance_id)
        if x is None:
            raise SchedulerError(f"unknown instance {instance_id}")
        return x

    def _get_request(self, request_id: int) -> _Request:
        r = self._requests.get(request_id)
        if r is None:
            raise SchedulerError(f"unknown request {request_id}")
        return r

    def _update_away(self, request_id: int, r: _Request, delta: int) -> None:
        """The request's blocks away from home changed by ``delta``: keep its home's index in step."""
        h = self._instances.get(r.home)
        if h is None:
            return
        h.away_blocks += delta
        if r.total - r.placement.get(r.home, 0) > 0:
            h.homed_away.add(request_id)
        else:
            h.homed_away.discard(request_id)

    def __repr__(self) -> str:
        t = self.totals()
        return (
            f"DebtLedger(instances={t.num_instances}, requests={t.num_requests}, capacity={t.capacity}, "
            f"free={t.free}, lent={t.lent}, borrowed={t.borrowed})"
        )


def _check_range(field: str, value: int, low: int, high: int = INT32_MAX) -> None:
    if not low <= value <= high:
        raise ValidationError(field, value, f"must be in [{low}, {high}]")


def _check_counters(instance_id: int, capacity: int, free: int, used: int, lent: int, reserved: int, borrowed: int) -> None:
    ok = all(0 <= v <= INT32_MAX for v in (capacity, free, used, lent, reserved, borrowed))
    if not (ok and capacity == free + used + reserved and lent <= used):
        raise SchedulerError(
            f"instance {instance_id}: counters would become capacity={capacity} free={free} used={used} "
            f"lent={lent} reserved={reserved} borrowed={borrowed}: need each in [0, {INT32_MAX}], "
            f"capacity == free + used + reserved and lent <= used"
        )
