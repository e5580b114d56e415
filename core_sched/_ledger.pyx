# distutils: language = c++
"""The compiled debt ledger and planner (gManager): Cython over ``core_sched/csrc/ledger.hpp``
and ``core_sched/csrc/planner.hpp``.

Each class here has a pure-Python twin with the same name, behaviour and errors
(``core_sched/ledger.py`` for ``DebtLedger``, ``core_sched/planner.py`` for ``ThroughputModel``
and ``Planner``); ``infinillm.core_sched`` picks one by ``INFINILLM_CORE``, and the test suite
runs against both. ``Planner.plan`` reads the ledger's C++ object directly.
"""

import math

from libc.stdint cimport int32_t, int64_t
from libcpp.map cimport map
from libcpp.utility cimport pair
from libcpp.vector cimport vector

from block_pool cimport CPoolCounters

from ledger cimport (
    CLedgerDelta, CLedgerInstance, CLedgerPart, CLedgerRequest, CLedgerTotals, CPlanMove,
    CppDebtLedger, CppPlanner, CppThroughputModel,
    LEDGER_OK, LEDGER_UNKNOWN_INSTANCE, LEDGER_DUPLICATE_INSTANCE, LEDGER_STALE,
    LEDGER_VERSION_BACK, LEDGER_INCONSISTENT, LEDGER_OTHER_HOME, LEDGER_NEGATIVE, LEDGER_TOO_MANY,
    MOVE_SPREAD,
)

from infinillm.errors import SchedulerError, ValidationError
from infinillm.core_sched.types import (
    InstanceView, LedgerTotals, MOVE_HOME as KIND_HOME, MOVE_SPREAD as KIND_SPREAD, Move,
)

IMPLEMENTATION = "compiled"

cdef int64_t INT32_MAX = 2147483647
cdef int64_t INT64_MAX = 9223372036854775807


cdef _check_range(str field, value, int64_t low, int64_t high=INT32_MAX):
    if not low <= value <= high:
        raise ValidationError(field, value, f"must be in [{low}, {high}]")


cdef _counters_error(int64_t instance_id, capacity, free, used, lent, reserved, borrowed):
    return SchedulerError(
        f"instance {instance_id}: counters would become capacity={capacity} free={free} used={used} "
        f"lent={lent} reserved={reserved} borrowed={borrowed}: need each in [0, {INT32_MAX}], "
        f"capacity == free + used + reserved and lent <= used"
    )


cdef class DebtLedger:
    """The cluster's debt ledger (gManager): heartbeat counters and request placements.

    See ``core_sched/csrc/ledger.hpp`` (and the twin, ``core_sched/ledger.py``) for the design.
    """

    cdef CppDebtLedger* c

    def __cinit__(self):
        self.c = new CppDebtLedger()

    def __dealloc__(self):
        del self.c

    # ---- instances ---------------------------------------------------------------------------

    def register_instance(self, instance_id, capacity, max_lent, host=0):
        """Add an instance with a fresh pool's counters (version 0, all ``capacity`` blocks free)."""
        _check_range("instance_id", instance_id, 0)
        _check_range("capacity", capacity, 1)
        if not 0 <= max_lent <= capacity:
            raise ValidationError("max_lent", max_lent, f"must be in [0, {capacity}] (capacity)")
        _check_range("host", host, 0)
        if self.c.register_instance(instance_id, capacity, max_lent, host) == LEDGER_DUPLICATE_INSTANCE:
            raise SchedulerError(f"instance {instance_id} is already registered")

    def remove_instance(self, int64_t instance_id):
        """Drop a dead instance; returns (sorted) the requests that had blocks there or had it as home.

        Requests homed there are forgotten entirely (their blocks on other instances are the
        caller's to free); the others lose only their part on the dead instance.
        """
        cdef vector[int64_t] affected
        if self.c.remove_instance(instance_id, affected) != LEDGER_OK:
            raise SchedulerError(f"unknown instance {instance_id}")
        return affected

    def has_instance(self, int64_t instance_id):
        return self.c.has_instance(instance_id)

    def instance_ids(self):
        cdef vector[int64_t] out
        self.c.instance_ids(out)
        return out

    @property
    def num_instances(self):
        return self.c.num_instances()

    def instance(self, int64_t instance_id):
        cdef const CLedgerInstance* x = self._get(instance_id)
        return InstanceView(
            x.id, x.host, x.counters.version, x.counters.capacity, x.counters.free, x.counters.used,
            x.counters.lent, x.counters.reserved, x.counters.borrowed, x.max_lent, x.lendable(),
            x.batch_size, x.num_waiting, x.waiting_blocks, x.away_blocks,
        )

    # ---- heartbeats --------------------------------------------------------------------------

    def apply_delta(self, delta):
        """Apply a heartbeat's counter changes.

        Applies only if ``delta.base_version`` is the version last applied for that instance;
        otherwise returns False and changes nothing (a heartbeat was missed: the caller asks the
        instance for a snapshot). Raises SchedulerError for an unknown instance, or counters
        that would break ``capacity == free + used + reserved``, ``lent <= used`` or go negative.
        """
        cdef int64_t instance_id = delta.instance_id
        cdef CLedgerDelta d
        d.base_version = delta.base_version
        d.version = delta.version
        d.capacity = delta.capacity
        d.free = delta.free
        d.used = delta.used
        d.lent = delta.lent
        d.reserved = delta.reserved
        d.borrowed = delta.borrowed
        cdef int32_t status = self.c.apply_delta(instance_id, d)
        if status == LEDGER_OK:
            return True
        if status == LEDGER_STALE:
            return False
        if status == LEDGER_UNKNOWN_INSTANCE:
            raise SchedulerError(f"unknown instance {instance_id}")
        if status == LEDGER_VERSION_BACK:
            raise SchedulerError(
                f"instance {instance_id}: delta goes back from version {d.base_version} to {d.version}")
        cdef const CLedgerInstance* x = self.c.instance(instance_id)
        cdef CPoolCounters c = x.counters
        # The sums in Python ints, as the twin has them (in int64 they may overflow).
        raise _counters_error(
            instance_id, <object>c.capacity + delta.capacity, <object>c.free + delta.free,
            <object>c.used + delta.used, <object>c.lent + delta.lent, <object>c.reserved + delta.reserved,
            <object>c.borrowed + delta.borrowed)

    def apply_snapshot(self, int64_t instance_id, counters):
        """Replace an instance's counters with a full snapshot (authoritative, whatever its version)."""
        cdef CLedgerDelta s
        s.base_version = 0
        s.version = counters.version
        s.capacity = counters.capacity
        s.free = counters.free
        s.used = counters.used
        s.lent = counters.lent
        s.reserved = counters.reserved
        s.borrowed = counters.borrowed
        cdef int32_t status = self.c.apply_snapshot(instance_id, s)
        if status == LEDGER_UNKNOWN_INSTANCE:
            raise SchedulerError(f"unknown instance {instance_id}")
        if status != LEDGER_OK:
            raise _counters_error(instance_id, s.capacity, s.free, s.used, s.lent, s.reserved, s.borrowed)

    def set_max_lent(self, int64_t instance_id, max_lent):
        """The instance's lending cap, as its pool now has it; see the twin."""
        if not self.c.has_instance(instance_id):
            raise SchedulerError(f"unknown instance {instance_id}")
        capacity = self.c.instance(instance_id).counters.capacity
        if isinstance(max_lent, bool) or not isinstance(max_lent, int) or not 0 <= max_lent <= capacity:
            raise ValidationError("max_lent", max_lent, f"must be an integer in [0, {capacity}] (capacity)")
        self.c.set_max_lent(instance_id, max_lent)

    def set_load(self, int64_t instance_id, batch_size, num_waiting, waiting_blocks):
        """The instance's load: running requests, queued ones, blocks the head of the queue needs."""
        _check_range("batch_size", batch_size, 0)
        _check_range("num_waiting", num_waiting, 0)
        _check_range("waiting_blocks", waiting_blocks, 0)
        if self.c.set_load(instance_id, batch_size, num_waiting, waiting_blocks) != LEDGER_OK:
            raise SchedulerError(f"unknown instance {instance_id}")

    # ---- placement ---------------------------------------------------------------------------

    def record_blocks(self, request_id, int64_t home, int64_t instance, int64_t delta_blocks):
        """``+n`` when n blocks of the request are placed on ``instance``, ``-n`` when freed or moved.

        The first call for a request records its home (even with ``delta_blocks == 0``). A
        request's blocks on an instance never go below 0 (SchedulerError, nothing changes).
        """
        _check_range("request_id", request_id, 0, INT64_MAX)
        cdef int64_t rid = request_id
        cdef int32_t status = self.c.record_blocks(rid, home, instance, delta_blocks)
        if status == LEDGER_OK:
            return
        if status == LEDGER_UNKNOWN_INSTANCE:
            raise SchedulerError(f"unknown instance {home if not self.c.has_instance(home) else instance}")
        cdef const CLedgerRequest* r = self.c.request(rid)
        if status == LEDGER_OTHER_HOME:
            raise SchedulerError(f"request {rid} has home {r.home}, not {home}")
        have = 0 if r == NULL else r.on(<int32_t>instance)
        if status == LEDGER_NEGATIVE:
            raise SchedulerError(
                f"request {rid} holds {have} blocks on instance {instance}: cannot remove {-delta_blocks}")
        raise ValidationError(
            "delta_blocks", delta_blocks,
            f"would put {have + delta_blocks} blocks of request {rid} on instance {instance} (at most {INT32_MAX})")

    def forget_request(self, int64_t request_id):
        """Forget a finished or aborted request; returns the blocks it still had recorded."""
        return self.c.forget_request(request_id)

    def placement(self, int64_t request_id):
        """Blocks of the request per instance (by instance id)."""
        cdef vector[pair[int32_t, int32_t]] out
        CppDebtLedger.placement_of(self._get_request(request_id)[0], out)
        return {kv.first: kv.second for kv in out}

    def home_of(self, int64_t request_id):
        return self._get_request(request_id).home

    def has_request(self, int64_t request_id):
        return self.c.request(request_id) != NULL

    @property
    def num_requests(self):
        return self.c.num_requests()

    def requests_on(self, int64_t instance_id):
        """Blocks per request (by request id) held on the instance, own and lent-in."""
        cdef vector[pair[int64_t, int32_t]] out
        CppDebtLedger.requests_on(self._get(instance_id)[0], out)
        return {kv.first: kv.second for kv in out}

    # ---- queries -----------------------------------------------------------------------------

    def creditors(self, int64_t borrower, n, limit=None):
        """Instances that could lend ``borrower`` ``n`` blocks now, best first.

        Those (not the borrower) with ``lendable >= n``, ranked by free blocks (most first), then
        load (batch + waiting, least first), then the borrower's host first, then id. The
        answer may be stale by a heartbeat: the borrower still reserves (``try_reserve``).
        """
        cdef vector[int32_t] out
        if not 1 <= n <= INT32_MAX:
            raise ValidationError("n", n, f"must be in [1, {INT32_MAX}]")
        if limit is not None and limit < 0:
            raise ValidationError("limit", limit, "must be >= 0 or None")
        self._get(borrower)
        self.c.creditors(borrower, n, -1 if limit is None else min(limit, INT64_MAX), out)
        return out

    def debtors_of(self, int64_t creditor):
        """Blocks of other instances' requests that ``creditor`` holds, per home (by id)."""
        cdef vector[pair[int32_t, int64_t]] out
        self.c.debtors_of(self._get(creditor)[0], out)
        return {kv.first: kv.second for kv in out}

    def creditors_of(self, int64_t debtor):
        """Blocks of ``debtor``'s requests that other instances hold, per instance (by id)."""
        cdef vector[pair[int32_t, int64_t]] out
        self.c.creditors_of(self._get(debtor)[0], out)
        return {kv.first: kv.second for kv in out}

    def totals(self):
        cdef CLedgerTotals t = self.c.totals()
        return LedgerTotals(t.num_instances, t.num_requests, t.capacity, t.free, t.used, t.lent,
                            t.reserved, t.borrowed, t.lendable, t.batch_size, t.num_waiting)

    # ---- internals ---------------------------------------------------------------------------

    cdef const CLedgerInstance* _get(self, int64_t instance_id) except NULL:
        cdef const CLedgerInstance* x = self.c.instance(instance_id)
        if x == NULL:
            raise SchedulerError(f"unknown instance {instance_id}")
        return x

    cdef const CLedgerRequest* _get_request(self, int64_t request_id) except NULL:
        cdef const CLedgerRequest* r = self.c.request(request_id)
        if r == NULL:
            raise SchedulerError(f"unknown request {request_id}")
        return r

    def __repr__(self):
        t = self.totals()
        return (f"DebtLedger(instances={t.num_instances}, requests={t.num_requests}, capacity={t.capacity}, "
                f"free={t.free}, lent={t.lent}, borrowed={t.borrowed})")


# ---- the planner ---------------------------------------------------------------------------------


def _check_table(str field, values, increasing=False, like=None):
    """The table as floats; ValidationError naming ``field`` unless positive, finite, >= 1 point."""
    points = list(values)
    if not points:
        raise ValidationError(field, points, "must have at least 1 point")
    if like is not None and len(points) != len(like[1]):
        raise ValidationError(field, points, f"must have as many points as {like[0]} ({len(like[1])})")
    try:
        floats = [float(v) for v in points]
    except (TypeError, ValueError):
        raise ValidationError(field, points, "must be numbers") from None
    if not all(math.isfinite(v) and v > 0 for v in floats):
        raise ValidationError(field, points, "must be positive and finite")
    if increasing and any(floats[i] >= floats[i + 1] for i in range(len(floats) - 1)):
        raise ValidationError(field, points, "must be strictly increasing")
    return floats


cdef vector[double] _check_step(batch, contexts) except *:
    if not 0 <= batch <= INT32_MAX:
        raise ValidationError("batch", batch, f"must be in [0, {INT32_MAX}]")
    cdef vector[double] ctxs
    for c in contexts:
        ctxs.push_back(float(c))
    for c in ctxs:
        if not (math.isfinite(c) and c >= 0):
            raise ValidationError("contexts", list(contexts), "must all be finite and >= 0")
    return ctxs


cdef class ThroughputModel:
    """Decode throughput of an instance from its batch size and the contexts it attends over.

    ``dense_batch`` / ``dense_tokens_per_s`` tabulate f, ``attn_ctx`` / ``attn_tokens_per_s``
    tabulate g (x strictly increasing, all values positive and finite, at least one point).
    Per layer ``T_layer = batch / f(batch) + sum_r ctx_r / g(ctx_r)``; an instance decodes
    ``batch / (num_layers * T_layer)`` tokens/s. See ``core_sched/csrc/planner.hpp``.
    """

    cdef CppThroughputModel c
    cdef list _dense_batch, _attn_ctx

    def __cinit__(self, dense_batch, dense_tokens_per_s, attn_ctx, attn_tokens_per_s, num_layers, block_size):
        db = _check_table("dense_batch", dense_batch, increasing=True)
        dt = _check_table("dense_tokens_per_s", dense_tokens_per_s, like=("dense_batch", db))
        ac = _check_table("attn_ctx", attn_ctx, increasing=True)
        at = _check_table("attn_tokens_per_s", attn_tokens_per_s, like=("attn_ctx", ac))
        if not 1 <= num_layers <= INT32_MAX:
            raise ValidationError("num_layers", num_layers, f"must be in [1, {INT32_MAX}]")
        if not 1 <= block_size <= INT32_MAX:
            raise ValidationError("block_size", block_size, f"must be in [1, {INT32_MAX}]")
        self._dense_batch = db
        self._attn_ctx = ac
        self.c = CppThroughputModel(db, dt, ac, at, num_layers, block_size)

    @property
    def num_layers(self):
        return self.c.num_layers()

    @property
    def block_size(self):
        return self.c.block_size()

    def dense_throughput(self, double batch):
        """f(batch): dense-layer tokens/s at this batch size."""
        return self.c.dense_throughput(batch)

    def attention_throughput(self, double ctx):
        """g(ctx): attention context tokens/s at this context length."""
        return self.c.attention_throughput(ctx)

    def layer_time(self, batch, contexts):
        """T_layer = batch / f(batch) + sum_r ctx_r / g(ctx_r), in seconds."""
        cdef vector[double] ctxs = _check_step(batch, contexts)
        return self.c.layer_time(batch, ctxs.data(), ctxs.size())

    def step_time(self, batch, contexts):
        """One decode step over all layers: num_layers * T_layer, in seconds."""
        cdef vector[double] ctxs = _check_step(batch, contexts)
        return self.c.step_time(batch, ctxs.data(), ctxs.size())

    def tokens_per_s(self, batch, contexts):
        """Decode tokens/s: batch / step_time (0 for an empty batch)."""
        cdef vector[double] ctxs = _check_step(batch, contexts)
        cdef double attn = 0.0
        for i in range(ctxs.size()):
            attn += self.c.attention_time(ctxs[i])
        return self.c.tokens_per_s_at(batch, attn)

    def __repr__(self):
        return (f"ThroughputModel(dense_points={len(self._dense_batch)}, attn_points={len(self._attn_ctx)}, "
                f"num_layers={self.c.num_layers()}, block_size={self.c.block_size()})")


cdef class Planner:
    """The gManager's greedy planner: spread debtors' long requests, bring blocks home.

    ``max_moves_per_step`` caps the *blocks* moved by one ``plan`` call (both phases together),
    so that migration hides behind compute; ``home_headroom`` is the free blocks an instance
    keeps after bringing blocks home. ``plan`` takes a ledger of the same implementation. The
    algorithm and its decisions: ``core_sched/csrc/planner.hpp``.
    """

    cdef CppPlanner c
    cdef ThroughputModel _model

    def __cinit__(self, model, max_moves_per_step, home_headroom=0):
        if not isinstance(model, ThroughputModel):
            raise TypeError(f"model must be a ThroughputModel of the same implementation as the planner, "
                            f"not {type(model).__module__}.{type(model).__name__}")
        if not 0 <= max_moves_per_step <= INT64_MAX:
            raise ValidationError("max_moves_per_step", max_moves_per_step, f"must be in [0, {INT64_MAX}]")
        if not 0 <= home_headroom <= INT32_MAX:
            raise ValidationError("home_headroom", home_headroom, f"must be in [0, {INT32_MAX}]")
        self._model = model
        self.c = CppPlanner(self._model.c, max_moves_per_step, home_headroom)

    @property
    def model(self):
        return self._model

    @property
    def max_moves_per_step(self):
        return self.c.max_moves_per_step()

    @property
    def home_headroom(self):
        return self.c.home_headroom()

    def plan(self, ledger):
        """The moves for this period, in the order to carry them out (spreads, then homes)."""
        if not isinstance(ledger, DebtLedger):
            raise TypeError(f"plan() needs a DebtLedger of the same implementation as the planner, "
                            f"not {type(ledger).__module__}.{type(ledger).__name__}")
        cdef vector[CPlanMove] moves
        self.c.plan((<DebtLedger>ledger).c[0], moves)
        cdef CPlanMove m
        return [Move(m.request_id, m.num_blocks, m.src, m.dst, KIND_SPREAD if m.kind == MOVE_SPREAD else KIND_HOME)
                for m in moves]

    def __repr__(self):
        return f"Planner(max_moves_per_step={self.c.max_moves_per_step()}, home_headroom={self.c.home_headroom()})"
