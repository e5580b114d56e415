"""The debt ledger (gManager state), against both implementations (the ``core`` fixture)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from infinillm import SchedulerError, ValidationError
from infinillm.core_sched import PoolCounters, PoolDelta, compiled_available, implementation


def counts(view):
    return (view.version, view.capacity, view.free, view.used, view.lent, view.reserved, view.borrowed)


def delta(instance, base, version, free=0, used=0, lent=0, reserved=0, borrowed=0, capacity=0):
    return PoolDelta(instance, base, version, capacity, free, used, lent, reserved, borrowed)


def test_a_registered_instance_starts_as_a_fresh_pool(core):
    ledger = core.DebtLedger()
    ledger.register_instance(3, capacity=16, max_lent=8, host=2)
    pool = core.BlockPool(3, 16, 8)
    view = ledger.instance(3)
    assert counts(view) == counts(pool.counters()) == (0, 16, 16, 0, 0, 0, 0)
    assert (view.instance_id, view.host, view.max_lent, view.lendable) == (3, 2, 8, 8)  # min(16 free, 8 - 0 - 0)
    assert (view.batch_size, view.num_waiting, view.waiting_blocks, view.load, view.away_blocks) == (0, 0, 0, 0, 0)
    assert ledger.instance_ids() == [3] and ledger.num_instances == 1 and ledger.has_instance(3)


def test_register_checks(core):
    ledger = core.DebtLedger()
    ledger.register_instance(0, 8, 4)
    with pytest.raises(SchedulerError, match="instance 0 is already registered"):
        ledger.register_instance(0, 8, 4)
    with pytest.raises(ValidationError, match=r"capacity=0 is invalid: must be in \[1, 2147483647\]"):
        ledger.register_instance(1, 0, 0)
    with pytest.raises(ValidationError, match=r"max_lent=9 is invalid: must be in \[0, 8\] \(capacity\)"):
        ledger.register_instance(1, 8, 9)
    with pytest.raises(ValidationError, match=r"instance_id=-1 is invalid: must be in \[0, 2147483647\]"):
        ledger.register_instance(-1, 8, 4)
    with pytest.raises(ValidationError, match=r"host=-2 is invalid: must be in \[0, 2147483647\]"):
        ledger.register_instance(1, 8, 4, host=-2)
    with pytest.raises(SchedulerError, match="unknown instance 5"):
        ledger.instance(5)
    assert ledger.instance_ids() == [0]


def test_deltas_apply_in_order_and_a_gap_is_refused(core):
    ledger = core.DebtLedger()
    ledger.register_instance(1, 16, 8)
    assert ledger.apply_delta(delta(1, 0, 3, free=-5, used=5))
    assert counts(ledger.instance(1)) == (3, 16, 11, 5, 0, 0, 0)  # 16 - 5 free
    # A heartbeat 3 -> 5 was lost; 5 -> 6 arrives: refused, nothing changes, caller asks for a snapshot.
    assert not ledger.apply_delta(delta(1, 5, 6, free=-1, used=1))
    assert counts(ledger.instance(1)) == (3, 16, 11, 5, 0, 0, 0)
    ledger.apply_snapshot(1, PoolCounters(6, 16, 8, 6, 2, 2, 1))
    assert counts(ledger.instance(1)) == (6, 16, 8, 6, 2, 2, 1)
    assert ledger.instance(1).lendable == 4  # min(8 free, 8 max_lent - 2 lent - 2 reserved)
    assert ledger.apply_delta(delta(1, 6, 6))  # an empty heartbeat
    with pytest.raises(SchedulerError, match="unknown instance 9"):
        ledger.apply_delta(delta(9, 0, 1))


def test_inconsistent_heartbeats_are_refused_and_change_nothing(core):
    ledger = core.DebtLedger()
    ledger.register_instance(2, 8, 8)
    with pytest.raises(SchedulerError, match=r"instance 2: counters would become capacity=8 free=5 used=2 lent=0 "
                                             r"reserved=0 borrowed=0: need each in \[0, 2147483647\], "
                                             r"capacity == free \+ used \+ reserved and lent <= used"):
        ledger.apply_delta(delta(2, 0, 1, free=-3, used=2))  # 5 + 2 + 0 != 8
    with pytest.raises(SchedulerError, match="lent=3"):
        ledger.apply_delta(delta(2, 0, 1, free=-2, used=2, lent=3))  # lent > used
    with pytest.raises(SchedulerError, match="delta goes back from version 0 to -1"):
        ledger.apply_delta(delta(2, 0, -1))
    # 8 free + (2**63 - 1) overflows int64: the message has the true sum, 2**63 + 7
    with pytest.raises(SchedulerError, match=r"capacity=8 free=9223372036854775815 used=0 lent=0 reserved=-8"):
        ledger.apply_delta(delta(2, 0, 1, free=2**63 - 1, reserved=-8))
    with pytest.raises(SchedulerError, match="free=-1"):
        ledger.apply_snapshot(2, PoolCounters(4, 8, -1, 9, 0, 0, 0))
    with pytest.raises(SchedulerError, match="unknown instance 3"):
        ledger.apply_snapshot(3, PoolCounters(0, 8, 8, 0, 0, 0, 0))
    assert counts(ledger.instance(2)) == (0, 8, 8, 0, 0, 0, 0)


def test_the_ledger_follows_real_pools_through_their_deltas(core):
    a, b = core.BlockPool(0, 12, 6), core.BlockPool(1, 12, 6)
    ledger = core.DebtLedger()
    ledger.register_instance(0, 12, 6)
    ledger.register_instance(1, 12, 6)
    a.allocate(100, 5)
    rid = b.try_reserve(borrower=0, n=3, now=0.0, ttl=1.0)
    b.commit(rid, 100, now=0.0)
    a.add_borrowed(100, 0, 3)
    for pool in (a, b):
        assert ledger.apply_delta(pool.take_delta())
    assert counts(ledger.instance(0)) == (2, 12, 7, 5, 0, 0, 3)  # allocate, add_borrowed
    assert counts(ledger.instance(1)) == (2, 12, 9, 3, 3, 0, 0)  # reserve, commit
    assert ledger.instance(1).lendable == 3  # min(9 free, 6 - 3 lent - 0)


def test_a_new_lending_cap_changes_what_the_instance_may_lend(core):
    ledger = core.DebtLedger()
    ledger.register_instance(0, 10, 4)
    assert ledger.instance(0).lendable == 4
    ledger.set_max_lent(0, 1)
    assert ledger.instance(0).max_lent == 1 and ledger.instance(0).lendable == 1
    ledger.set_max_lent(0, 10)
    assert ledger.instance(0).lendable == 10
    with pytest.raises(ValidationError, match=r"max_lent=11 is invalid: must be an integer in \[0, 10\] \(capacity\)"):
        ledger.set_max_lent(0, 11)
    with pytest.raises(SchedulerError, match="unknown instance 3"):
        ledger.set_max_lent(3, 1)


def test_load_is_validated_and_feeds_lendable_and_totals(core):
    ledger = core.DebtLedger()
    ledger.register_instance(0, 10, 4)
    ledger.register_instance(1, 20, 20, host=1)
    ledger.set_load(0, batch_size=3, num_waiting=2, waiting_blocks=7)
    view = ledger.instance(0)
    assert (view.batch_size, view.num_waiting, view.waiting_blocks, view.load) == (3, 2, 7, 5)
    with pytest.raises(ValidationError, match=r"num_waiting=-1 is invalid: must be in \[0, 2147483647\]"):
        ledger.set_load(0, 1, -1, 0)
    with pytest.raises(SchedulerError, match="unknown instance 4"):
        ledger.set_load(4, 1, 1, 1)
    ledger.apply_snapshot(1, PoolCounters(9, 20, 12, 6, 1, 2, 5))
    t = ledger.totals()
    assert (t.num_instances, t.num_requests) == (2, 0)
    assert (t.capacity, t.free, t.used, t.lent, t.reserved, t.borrowed) == (30, 22, 6, 1, 2, 5)  # 10 + 20, 10 + 12, ...
    assert t.lendable == 4 + 12  # instance 0: min(10, 4); instance 1: min(12, 20 - 1 - 2)
    assert (t.batch_size, t.num_waiting) == (3, 2)


def test_placement_records_debts_between_instances(core):
    ledger = core.DebtLedger()
    for i in range(3):
        ledger.register_instance(i, 32, 16)
    ledger.record_blocks(7, home=0, instance=0, delta_blocks=5)
    ledger.record_blocks(7, 0, 1, 3)
    ledger.record_blocks(7, 0, 2, 2)
    ledger.record_blocks(8, 1, 1, 4)
    ledger.record_blocks(8, 1, 0, 6)
    assert ledger.placement(7) == {0: 5, 1: 3, 2: 2} and ledger.home_of(8) == 1
    assert ledger.creditors_of(0) == {1: 3, 2: 2}  # request 7 owes 3 blocks to 1, 2 to 2
    assert ledger.debtors_of(0) == {1: 6}  # instance 0 holds 6 blocks of request 8 (home 1)
    assert ledger.debtors_of(1) == {0: 3} and ledger.creditors_of(1) == {0: 6}
    assert ledger.requests_on(0) == {7: 5, 8: 6} and ledger.requests_on(1) == {7: 3, 8: 4}
    assert ledger.instance(0).away_blocks == 5  # 3 + 2
    # Move request 7's blocks home from instance 2.
    ledger.record_blocks(7, 0, 2, -2)
    ledger.record_blocks(7, 0, 0, 2)
    assert ledger.placement(7) == {0: 7, 1: 3} and ledger.creditors_of(0) == {1: 3}
    assert ledger.debtors_of(2) == {} and ledger.instance(0).away_blocks == 3
    assert ledger.forget_request(7) == 10  # 7 + 3
    assert ledger.forget_request(7) == 0  # idempotent
    assert ledger.creditors_of(0) == {} and ledger.debtors_of(1) == {} and ledger.instance(0).away_blocks == 0
    assert ledger.num_requests == 1 and not ledger.has_request(7)
    with pytest.raises(SchedulerError, match="unknown request 7"):
        ledger.placement(7)


def test_record_blocks_refuses_what_breaks_the_placement(core):
    ledger = core.DebtLedger()
    ledger.register_instance(0, 8, 8)
    ledger.register_instance(1, 8, 8)
    ledger.record_blocks(5, 0, 1, 2)
    with pytest.raises(SchedulerError, match="request 5 holds 2 blocks on instance 1: cannot remove 3"):
        ledger.record_blocks(5, 0, 1, -3)
    with pytest.raises(SchedulerError, match="request 5 has home 0, not 1"):
        ledger.record_blocks(5, 1, 1, 1)
    with pytest.raises(SchedulerError, match="unknown instance 4"):
        ledger.record_blocks(5, 0, 4, 1)
    with pytest.raises(SchedulerError, match="unknown instance 6"):
        ledger.record_blocks(6, 6, 0, 1)
    with pytest.raises(ValidationError, match=r"request_id=-1 is invalid: must be in \[0, 9223372036854775807\]"):
        ledger.record_blocks(-1, 0, 0, 1)
    with pytest.raises(SchedulerError, match="request 9 holds 0 blocks on instance 0: cannot remove 1"):
        ledger.record_blocks(9, 0, 0, -1)
    assert not ledger.has_request(9)
    assert ledger.placement(5) == {1: 2} and ledger.creditors_of(0) == {1: 2}
    ledger.record_blocks(5, 0, 1, -2)  # down to 0: the request stays known, with no blocks
    assert ledger.placement(5) == {} and ledger.home_of(5) == 0 and ledger.instance(0).away_blocks == 0


def test_creditors_are_ranked_by_free_then_load_then_host_then_id(core):
    ledger = core.DebtLedger()
    # id: (free, load, host)
    layout = {0: (10, 0, 0), 1: (30, 4, 1), 2: (30, 2, 1), 3: (30, 2, 0), 4: (30, 2, 0), 5: (50, 0, 1), 6: (2, 0, 0)}
    for i, (free, load, host) in layout.items():
        ledger.register_instance(i, 64, 64, host)
        ledger.apply_snapshot(i, PoolCounters(1, 64, free, 64 - free, 0, 0, 0))
        ledger.set_load(i, load, 0, 0)
    # 5 has most free; of the free-30 ones, load 2 (2, 3, 4) before load 4 (1); among 2, 3, 4 the
    # borrower's host (0) first: 3, 4 (by id), then 2. 6 lends only 2 < 3; 0 is the borrower.
    assert ledger.creditors(0, 3) == [5, 3, 4, 2, 1]
    assert ledger.creditors(0, 3, limit=2) == [5, 3]
    # Borrower 5 is on host 1: of the load-2 ones 2 comes first, then 3, 4; then 1 (load 4), 0, 6.
    assert ledger.creditors(5, 1) == [2, 3, 4, 1, 0, 6]
    assert ledger.creditors(0, 51) == []
    with pytest.raises(ValidationError, match=r"n=0 is invalid: must be in \[1, 2147483647\]"):
        ledger.creditors(0, 0)
    with pytest.raises(ValidationError, match=r"limit=-1 is invalid: must be >= 0 or None"):
        ledger.creditors(0, 1, limit=-1)
    with pytest.raises(SchedulerError, match="unknown instance 9"):
        ledger.creditors(9, 1)


def test_lending_cap_limits_creditors(core):
    ledger = core.DebtLedger()
    ledger.register_instance(0, 8, 8)
    ledger.register_instance(1, 64, 6)
    ledger.apply_snapshot(1, PoolCounters(1, 64, 40, 22, 3, 2, 0))
    assert ledger.instance(1).lendable == 1  # min(40 free, 6 - 3 lent - 2 reserved)
    assert ledger.creditors(0, 1) == [1] and ledger.creditors(0, 2) == []


def test_remove_instance_returns_the_requests_it_touched(core):
    ledger = core.DebtLedger()
    for i in range(3):
        ledger.register_instance(i, 32, 16)
    ledger.record_blocks(1, 0, 0, 4)
    ledger.record_blocks(1, 0, 2, 3)  # home 0, lent by 2
    ledger.record_blocks(2, 1, 1, 5)
    ledger.record_blocks(2, 1, 2, 1)  # home 1, lent by 2
    ledger.record_blocks(3, 2, 2, 2)
    ledger.record_blocks(3, 2, 0, 2)  # home 2, lent by 0
    ledger.record_blocks(4, 1, 1, 2)  # untouched
    assert ledger.remove_instance(2) == [1, 2, 3]
    assert ledger.placement(1) == {0: 4} and ledger.placement(2) == {1: 5}
    assert not ledger.has_request(3)  # its home died: forgotten, its block on 0 too
    assert ledger.requests_on(0) == {1: 4} and ledger.debtors_of(0) == {}
    assert ledger.instance(0).away_blocks == 0 and ledger.instance(1).away_blocks == 0
    assert ledger.instance_ids() == [0, 1] and ledger.num_requests == 3
    with pytest.raises(SchedulerError, match="unknown instance 2"):
        ledger.remove_instance(2)


def test_both_implementations_raise_the_same_messages():
    counters = "need each in [0, 2147483647], capacity == free + used + reserved and lent <= used"
    calls_and_errors = [
        (lambda L: L.register_instance(0, 8, 4), ("SchedulerError", "instance 0 is already registered")),
        (lambda L: L.register_instance(7, 8, 99), ("ValidationError", "max_lent=99 is invalid: must be in [0, 8] (capacity)")),
        (lambda L: L.instance(42), ("SchedulerError", "unknown instance 42")),
        (lambda L: L.apply_delta(delta(0, 0, 1, free=1)),
         ("SchedulerError", f"instance 0: counters would become capacity=8 free=9 used=0 lent=0 reserved=0 borrowed=0: {counters}")),
        (lambda L: L.apply_delta(delta(0, 0, -3)), ("SchedulerError", "instance 0: delta goes back from version 0 to -3")),
        (lambda L: L.apply_snapshot(0, PoolCounters(1, 8, 8, 0, 1, 0, 0)),
         ("SchedulerError", f"instance 0: counters would become capacity=8 free=8 used=0 lent=1 reserved=0 borrowed=0: {counters}")),
        (lambda L: L.set_load(0, 1, 2, -5), ("ValidationError", "waiting_blocks=-5 is invalid: must be in [0, 2147483647]")),
        (lambda L: L.record_blocks(1, 0, 1, -9), ("SchedulerError", "request 1 holds 2 blocks on instance 1: cannot remove 9")),
        (lambda L: L.record_blocks(1, 1, 1, 1), ("SchedulerError", "request 1 has home 0, not 1")),
        (lambda L: L.record_blocks(1, 0, 1, 2**31),
         ("ValidationError", "delta_blocks=2147483648 is invalid: would put 2147483650 blocks of request 1 on instance 1 "
                             "(at most 2147483647)")),
        (lambda L: L.home_of(77), ("SchedulerError", "unknown request 77")),
        (lambda L: L.creditors(0, 2**31), ("ValidationError", "n=2147483648 is invalid: must be in [1, 2147483647]")),
        (lambda L: L.debtors_of(5), ("SchedulerError", "unknown instance 5")),
        (lambda L: L.remove_instance(5), ("SchedulerError", "unknown instance 5")),
    ]
    messages = {}
    for name in ("compiled", "python"):
        ledger = implementation(name).DebtLedger()
        ledger.register_instance(0, 8, 4)
        ledger.register_instance(1, 8, 4)
        ledger.record_blocks(1, 0, 1, 2)
        out = []
        for call, _ in calls_and_errors:
            with pytest.raises((SchedulerError, ValidationError)) as info:
                call(ledger)
            out.append((type(info.value).__name__, str(info.value)))
        messages[name] = out
    assert messages["compiled"] == messages["python"]
    assert messages["python"] == [error for _, error in calls_and_errors]


# ---- the invariant: the ledger fed deltas equals each pool ---------------------------------------

ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free", "lend", "borrow", "beat", "drop"]), st.integers(0, 2),
              st.integers(0, 2), st.integers(1, 4)),
    max_size=60,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_after_every_delta_the_ledger_equals_each_pool(core, ops):
    # The `core` fixture is a stateless namespace of classes, so sharing it across examples is fine.
    pools = [core.BlockPool(i, 12, 6) for i in range(3)]
    ledger = core.DebtLedger()
    for i in range(3):
        ledger.register_instance(i, 12, 6)
    next_request = 1
    for op, i, j, n in ops:
        pool = pools[i]
        if op == "alloc" and pool.can_allocate(n):
            pool.allocate(next_request, n)
            next_request += 1
        elif op == "free":
            pool.free_request(j + 1)
        elif op == "lend" and i != j:
            rid = pools[j].try_reserve(i, n, 0.0, 1.0)
            if rid is not None:
                pools[j].commit(rid, next_request, 0.0)
                pool.add_borrowed(next_request, i, n)
                next_request += 1
        elif op == "borrow":
            pool.add_borrowed(10_000 + j, i, n)
        elif op in ("beat", "drop"):
            d = pool.take_delta()
            if op == "drop":  # the heartbeat is lost: the next one is refused until a snapshot
                continue
            if not ledger.apply_delta(d):
                assert d.base_version != ledger.instance(i).version
                ledger.apply_snapshot(i, pool.counters())
                pool.take_delta()  # the snapshot covers everything up to now
            assert counts(ledger.instance(i)) == counts(pool.counters())
    for i, pool in enumerate(pools):
        d = pool.take_delta()
        if not ledger.apply_delta(d):
            ledger.apply_snapshot(i, pool.counters())
        assert counts(ledger.instance(i)) == counts(pool.counters())



# ---- the compiled ledger against its twin, on random call sequences ----------------------------
#
# Both ledgers get the same calls, valid and not (unknown or duplicate instances, stale, backward
# and inconsistent heartbeats, placements below 0 or past int32, bad arguments). After every
# call they must agree on what it returned or raised (type and message), and on every view:
# instances, placements, debts, totals, and the plan a planner makes of them. Arguments stay
# within int64, where the compiled signatures are. The strategies are weighted (repeats in
# sampled_from) so that most calls succeed and the ledgers fill up.

INSTANCES = [0, 1, 2, 3]
REQUESTS = [0, 1, 2, 3, 4]
INT64_EXTREMES = [2**63 - 1, -(2**63)]


def outcome(obj, name, *args):
    """What a call returned (dicts as item lists, to compare their order), or what it raised."""
    try:
        result = getattr(obj, name)(*args)
    except Exception as exc:  # noqa: BLE001 - the very exception is what is compared
        return ("raised", type(exc), str(exc))
    if isinstance(result, dict):
        return (dict, list(result.items()))
    return (type(result), result)


def observe(ledger):
    views = [repr(ledger), ledger.totals(), ledger.instance_ids(), ledger.num_instances, ledger.num_requests]
    for i in [-1, *INSTANCES]:
        views += [outcome(ledger, name, i) for name in ("has_instance", "instance", "requests_on", "debtors_of",
                                                         "creditors_of")]  # fmt: skip
    for rid in [-1, *REQUESTS]:
        views += [outcome(ledger, name, rid) for name in ("has_request", "placement", "home_of")]
    return views


@st.composite
def pool_counters(draw, capacity):
    """Counters a pool of about ``capacity`` blocks could report; one in five breaks a rule."""
    capacity = draw(st.sampled_from([capacity] * 4 + [capacity + 2, max(capacity - 1, 1)]))  # may resize
    reserved = draw(st.integers(0, capacity))
    used = draw(st.integers(0, capacity - reserved))
    values = [capacity, capacity - used - reserved, used, draw(st.integers(0, used)), reserved, draw(st.integers(0, 5))]
    if draw(st.integers(0, 4)) == 0:  # inconsistent, negative or past int32
        i = draw(st.integers(0, 5), label="broken field")
        values[i] = draw(st.sampled_from([values[i] + 1, values[i] - 1, -1, 2**31, 2**40]), label="broken value")
    return values  # capacity, free, used, lent, reserved, borrowed


class LedgerTwins(RuleBasedStateMachine):
    """One call sequence, two ledgers: the compiled ``DebtLedger`` and its twin never differ."""

    def __init__(self):
        super().__init__()
        self.impls = [implementation(name) for name in ("compiled", "python")]
        self.compiled, self.twin = (impl.DebtLedger() for impl in self.impls)

    @initialize(sizes=st.lists(st.tuples(st.sampled_from([4, 8, 16]), st.sampled_from([1.0, 0.5, 0]),
                                         st.integers(0, 1)), min_size=2, max_size=4))  # fmt: skip
    def register_some(self, sizes):
        for i, (capacity, lend, host) in enumerate(sizes):
            self.call("register_instance", i, capacity, int(capacity * lend), host)

    def call(self, name, *args):
        compiled, twin = outcome(self.compiled, name, *args), outcome(self.twin, name, *args)
        assert compiled == twin, (name, args)
        return twin

    def draw_instance(self, data, label="instance"):
        registered = self.twin.instance_ids()
        return data.draw(st.sampled_from(registered * 6 + [-1, 7, 2**40]), label=label)

    def current(self, instance):
        """The twin's counters of a registered instance (a fresh one's for any other id)."""
        if not self.twin.has_instance(instance):
            return PoolCounters(0, 8, 8, 0, 0, 0, 0)
        v = self.twin.instance(instance)
        return PoolCounters(v.version, v.capacity, v.free, v.used, v.lent, v.reserved, v.borrowed)

    # ---- instances ------------------------------------------------------------------------------

    @rule(instance=st.sampled_from(INSTANCES + [-1, 2**31]), capacity=st.sampled_from([1, 4, 8, 16, 16, 0, 2**31]),
          data=st.data(), host=st.sampled_from([0, 0, 1, 2, -1, 2**31]))  # fmt: skip
    def register_instance(self, instance, capacity, data, host):
        max_lent = data.draw(st.sampled_from([capacity] * 3 + [capacity // 2, 0, capacity + 1, -1]), label="max_lent")
        self.call("register_instance", instance, capacity, max_lent, host)

    @rule(instance=st.sampled_from(INSTANCES + [-1, 7]))
    def remove_instance(self, instance):
        self.call("remove_instance", instance)

    # ---- heartbeats -----------------------------------------------------------------------------

    @rule(data=st.data())
    def apply_delta(self, data):
        instance = self.draw_instance(data)
        now = self.current(instance)
        target = data.draw(pool_counters(now.capacity), label="counters")
        base = now.version + data.draw(st.sampled_from([0, 0, 0, 0, -1, 1]), label="base - version")  # stale
        version = base + data.draw(st.sampled_from([1, 1, 2, 0, -1]), label="version - base")  # -1: backward
        changes = [t - c for t, c in zip(target, (now.capacity, now.free, now.used, now.lent, now.reserved,
                                                  now.borrowed))]  # fmt: skip
        if data.draw(st.integers(0, 9), label="overflow") == 0:  # sums that overflow int64 in C++
            changes[data.draw(st.integers(0, 5))] = data.draw(st.sampled_from(INT64_EXTREMES))
        self.call("apply_delta", PoolDelta(instance, base, version, *changes))

    @rule(data=st.data())
    def apply_snapshot(self, data):
        instance = self.draw_instance(data)
        now = self.current(instance)
        version = now.version + data.draw(st.sampled_from([1, 5, 0, -3]), label="version step")  # any version
        counters = PoolCounters(version, *data.draw(pool_counters(now.capacity), label="counters"))
        self.call("apply_snapshot", instance, counters)

    @rule(data=st.data(), load=st.tuples(*[st.sampled_from([0, 1, 2, 5, -1, 2**31])] * 3))
    def set_load(self, data, load):
        self.call("set_load", self.draw_instance(data), *load)

    # ---- placement ------------------------------------------------------------------------------

    @rule(rid=st.sampled_from(REQUESTS * 2 + [-1, 2**63 - 1, 2**63]), data=st.data())
    def record_blocks(self, rid, data):
        home = self.draw_instance(data, "home")
        if self.twin.has_request(rid) and data.draw(st.integers(0, 4), label="its own home") > 0:
            home = self.twin.home_of(rid)
        instance = self.draw_instance(data)
        have = self.twin.placement(rid).get(instance, 0) if self.twin.has_request(rid) else 0
        delta = data.draw(st.sampled_from([1, 2, 3] * 3 + [0, -have, -have, -1, -have - 1, 2**31 - 1, 2**31]),
                          label="delta")  # fmt: skip
        self.call("record_blocks", rid, home, instance, delta)

    @rule(rid=st.sampled_from([-1, *REQUESTS]))
    def forget_request(self, rid):
        self.call("forget_request", rid)

    # ---- queries --------------------------------------------------------------------------------

    @rule(data=st.data(), n=st.sampled_from([1, 1, 2, 4, 8, 0, 2**31]), limit=st.sampled_from([None, 0, 1, 3, -1]))
    def creditors(self, data, n, limit):
        self.call("creditors", self.draw_instance(data, "borrower"), n, limit)

    @rule(budget=st.sampled_from([0, 4, 16]), headroom=st.sampled_from([0, 2]))
    def plan(self, budget, headroom):
        plans = []
        for impl, ledger in zip(self.impls, (self.compiled, self.twin)):
            model = impl.ThroughputModel([1, 8], [1024.0, 4096.0], [16, 1024], [65536.0, 2**20], 2, 16)
            plans.append(impl.Planner(model, budget, home_headroom=headroom).plan(ledger))
        assert plans[0] == plans[1]

    @invariant()
    def the_ledgers_look_the_same(self):
        assert observe(self.compiled) == observe(self.twin)


TestLedgerTwins = pytest.mark.skipif(not compiled_available(), reason="the compiled core is not built")(
    LedgerTwins.TestCase
)
TestLedgerTwins.settings = settings(max_examples=100, stateful_step_count=50)
