"""The block pool (rManager), against both implementations (the ``core`` fixture)."""

import itertools

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from infinillm import CapacityError, SchedulerError, ValidationError
from infinillm.core_sched import BLOCK_FREE, BLOCK_RESERVED, BLOCK_USED, compiled_available, implementation


def counts(pool):
    c = pool.counters()
    return (c.capacity, c.free, c.used, c.lent, c.reserved, c.borrowed)


def test_allocate_hands_out_lowest_blocks_first_and_counts(core):
    pool = core.BlockPool(0, 8)
    assert pool.allocate(10, 3) == [0, 1, 2]
    assert pool.allocate(11, 2) == [3, 4]
    assert counts(pool) == (8, 3, 5, 0, 0, 0)  # 8 - 5 free
    assert pool.owner(1) == (10, 0)
    assert pool.owner(7) is None
    assert pool.blocks_of(10) == [0, 1, 2]
    assert pool.num_requests == 2


def test_free_request_returns_blocks_for_reuse_in_the_same_order(core):
    pool = core.BlockPool(0, 8)
    pool.allocate(10, 3)
    pool.allocate(11, 2)
    assert pool.free_request(10) == 3
    assert pool.free_request(10) == 0  # idempotent
    assert pool.allocate(12, 4) == [0, 1, 2, 5]  # LIFO stack: the freed ones first, in order
    assert counts(pool) == (8, 2, 6, 0, 0, 0)


def test_allocate_beyond_free_raises_and_changes_nothing(core):
    pool = core.BlockPool(3, 4)
    pool.allocate(1, 3)
    with pytest.raises(CapacityError, match="cannot allocate 2 blocks for request 2: 1 of 4 free"):
        pool.allocate(2, 2)
    assert counts(pool) == (4, 1, 3, 0, 0, 0)
    assert not pool.can_allocate(2) and pool.can_allocate(1)
    with pytest.raises(ValidationError, match=r"n=-1 is invalid: must be >= 0"):
        pool.allocate(2, -1)


def test_free_blocks_is_all_or_nothing(core):
    pool = core.BlockPool(0, 8)
    pool.allocate(1, 4)  # 0..3
    pool.allocate(2, 2)  # 4, 5
    with pytest.raises(SchedulerError, match="block 4 is not held by request 1"):
        pool.free_blocks(1, [3, 4])
    with pytest.raises(SchedulerError, match="block 3 named twice"):
        pool.free_blocks(1, [3, 3])
    assert counts(pool) == (8, 2, 6, 0, 0, 0)
    pool.free_blocks(1, [3, 2])  # truncate the tail
    assert pool.blocks_of(1) == [0, 1]
    assert counts(pool) == (8, 4, 4, 0, 0, 0)
    with pytest.raises(SchedulerError, match="request 9 holds no blocks here"):
        pool.free_blocks(9, [0])
    with pytest.raises(SchedulerError, match="request 9 holds no blocks here"):
        pool.free_blocks(9, [-1])  # an unknown request first, whatever the blocks
    with pytest.raises(SchedulerError, match="block 4 is not held by request 1"):
        pool.free_blocks(1, [4, 2**31])  # the first offender is named, out of range or not
    with pytest.raises(SchedulerError, match="block -1 is not held by request 1"):
        pool.free_blocks(1, [0, -1])
    assert pool.blocks_of(1) == [0, 1]


def test_lending_goes_through_a_reservation_under_the_cap(core):
    pool = core.BlockPool(0, 10, max_lent_blocks=4)
    pool.allocate(1, 5)  # own: 0..4
    rid = pool.try_reserve(borrower=2, n=3, now=0.0, ttl=1.0)
    assert rid == 1  # reservation ids count from 1
    assert counts(pool) == (10, 2, 5, 0, 3, 0)  # 10 - 5 used - 3 reserved
    assert pool.state(5) == BLOCK_RESERVED
    assert pool.try_reserve(2, 2, 0.0, 1.0) is None  # 3 reserved + 2 > cap 4
    assert pool.lendable == 1
    blocks = pool.commit(rid, request_id=700, now=0.5)
    assert blocks == [5, 6, 7]
    assert pool.owner(6) == (700, 2)
    assert counts(pool) == (10, 2, 8, 3, 0, 0)
    assert pool.free_request(700) == 3  # the borrower aborted
    assert counts(pool) == (10, 5, 5, 0, 0, 0)
    assert pool.state(6) == BLOCK_FREE and pool.state(0) == BLOCK_USED


def test_a_lower_lending_cap_stops_new_loans_and_keeps_the_old_ones(core):
    """Memory pressure lowers the cap below what is lent: loans stay, nothing more is lent;
    relief raises it and lending resumes."""
    pool = core.BlockPool(0, 10, max_lent_blocks=6)
    rid = pool.try_reserve(2, 4, 0.0, 1.0)
    pool.commit(rid, request_id=700, now=0.1)
    pool.set_max_lent_blocks(2)
    assert pool.max_lent_blocks == 2 and pool.lendable == 0 and pool.num_lent == 4
    assert pool.try_reserve(2, 1, 0.2, 1.0) is None
    pool.set_max_lent_blocks(10)
    assert pool.lendable == 6 and pool.try_reserve(2, 6, 0.3, 1.0) is not None
    for bad in (-1, 11, 2.5, True):
        with pytest.raises(ValidationError, match=r"max_lent_blocks=.* is invalid: must be an integer in \[0, 10\]"):
            pool.set_max_lent_blocks(bad)
    assert pool.max_lent_blocks == 10


def test_reservations_expire_and_an_expired_commit_fails(core):
    pool = core.BlockPool(1, 6)
    a = pool.try_reserve(0, 2, now=0.0, ttl=1.0)
    b = pool.try_reserve(2, 2, now=0.5, ttl=1.0)
    assert pool.expire(now=1.2) == 2  # a expired at 1.0, b lives until 1.5
    assert pool.num_reservations == 1
    with pytest.raises(SchedulerError, match=f"unknown reservation {a}"):
        pool.commit(a, 5, now=1.2)
    with pytest.raises(CapacityError, match=rf"instance 1: reservation {b} expired at 1.5 \(now 1.6\)"):
        pool.commit(b, 5, now=1.6)
    assert counts(pool) == (6, 6, 0, 0, 0, 0)


def test_times_are_doubles_whatever_number_type_is_given(core):
    pool = core.BlockPool(1, 6)
    rid = pool.try_reserve(0, 2, now=1, ttl=2)  # ints: expires at 3.0, as the C++ double has it
    with pytest.raises(CapacityError, match=rf"reservation {rid} expired at 3.0 \(now 4.0\)"):
        pool.commit(rid, 5, now=4)


def test_cancel_returns_the_blocks(core):
    pool = core.BlockPool(1, 6)
    rid = pool.try_reserve(0, 4, 0.0, 1.0)
    assert pool.cancel(rid) == 4
    with pytest.raises(SchedulerError, match=f"instance 1: unknown reservation {rid}"):
        pool.cancel(rid)
    assert counts(pool) == (6, 6, 0, 0, 0, 0)


def test_cannot_lend_to_itself_or_reserve_nothing(core):
    pool = core.BlockPool(1, 6)
    with pytest.raises(SchedulerError, match="cannot lend to itself"):
        pool.try_reserve(1, 1, 0.0, 1.0)
    with pytest.raises(ValidationError, match=r"n=0 is invalid: must be >= 1"):
        pool.try_reserve(0, 0, 0.0, 1.0)
    for borrower in (-1, 2**31):  # no instance: an error, not "no blocks" (None)
        with pytest.raises(ValidationError, match=rf"borrower={borrower} is invalid: must be in \[0, 2147483647\]"):
            pool.try_reserve(borrower, 1, 0.0, 1.0)
    assert pool.try_reserve(0, 2**31, 0.0, 1.0) is None  # more than there is
    assert counts(pool) == (6, 6, 0, 0, 0, 0)


def test_commit_refuses_a_request_held_for_another_home(core):
    pool = core.BlockPool(0, 8)
    r1 = pool.try_reserve(1, 1, 0.0, 1.0)
    pool.commit(r1, 42, 0.0)
    r2 = pool.try_reserve(2, 1, 0.0, 1.0)
    with pytest.raises(SchedulerError, match="instance 0: request 42 is held here for instance 1, not 2"):
        pool.commit(r2, 42, 0.0)
    assert pool.num_reservations == 1  # refused: the reservation stays


def test_never_borrows_for_a_remote_request(core):
    pool = core.BlockPool(0, 8)
    pool.add_borrowed(request_id=5, home=0, n=3)
    assert pool.num_borrowed == 3 and pool.borrowed_by(5) == 3
    with pytest.raises(SchedulerError, match="never borrows for request 6 of instance 2"):
        pool.add_borrowed(6, home=2, n=1)
    with pytest.raises(ValidationError, match=r"n=4 is invalid: must be in \[0, 3\]"):
        pool.remove_borrowed(5, 4)
    pool.remove_borrowed(5, 3)
    assert pool.num_borrowed == 0 and pool.borrowed_by(5) == 0


def test_borrowed_blocks_are_counted_in_int32(core):
    pool = core.BlockPool(0, 8)
    pool.add_borrowed(5, 0, 2**31 - 3)  # room left: 2**31 - 1 - (2**31 - 3) = 2
    message = r"n=3 is invalid: must be in \[0, 2\] \(at most 2147483647 blocks borrowed in all\)"
    with pytest.raises(ValidationError, match=message):
        pool.add_borrowed(6, 0, 3)
    with pytest.raises(ValidationError, match=r"n=-1 is invalid: must be in \[0, 2\]"):
        pool.add_borrowed(6, 0, -1)
    pool.add_borrowed(6, 0, 2)
    assert pool.num_borrowed == 2**31 - 1 and pool.borrowed_by(6) == 2


def test_deltas_carry_changes_since_the_last_report(core):
    pool = core.BlockPool(4, 16, max_lent_blocks=8)
    first = pool.take_delta()
    assert first.empty and first.instance_id == 4
    pool.allocate(1, 5)
    rid = pool.try_reserve(0, 2, 0.0, 1.0)
    pool.commit(rid, 99, 0.0)
    pool.add_borrowed(1, 4, 6)
    d = pool.take_delta()
    assert (d.base_version, d.version) == (0, 4)  # allocate, reserve, commit, add_borrowed
    assert (d.free, d.used, d.lent, d.reserved, d.borrowed) == (-7, 7, 2, 0, 6)
    assert pool.take_delta().empty


def test_constructor_checks(core):
    with pytest.raises(ValidationError, match=r"num_blocks=0 is invalid: must be in \[1, 2147483647\]"):
        core.BlockPool(0, 0)
    with pytest.raises(ValidationError, match=r"max_lent_blocks=9 is invalid: must be in \[0, 8\]"):
        core.BlockPool(0, 8, 9)
    with pytest.raises(ValidationError, match=r"instance_id=-1 is invalid: must be in \[0, 2147483647\]"):
        core.BlockPool(-1, 8)
    with pytest.raises(ValidationError, match=r"block=8 is invalid: must be in \[0, 7\]"):
        core.BlockPool(0, 8).owner(8)


def test_allocate_batch_is_csr_and_all_or_nothing(core):
    pool = core.BlockPool(0, 10)
    blocks, offsets = pool.allocate_batch([7, 8, 9], [2, 0, 3])
    assert blocks.dtype.name == offsets.dtype.name == "int32"
    assert blocks.tolist() == [0, 1, 2, 3, 4]
    assert offsets.tolist() == [0, 2, 2, 5]  # request 8 asked for none
    assert pool.blocks_of(9) == [2, 3, 4]
    with pytest.raises(CapacityError, match="cannot allocate 6 blocks for a batch of 2 requests: 5 of 10 free"):
        pool.allocate_batch([1, 2], [3, 3])
    assert pool.num_free == 5  # nothing was taken
    with pytest.raises(ValidationError, match=r"counts=-1 is invalid: must be >= 0"):
        pool.allocate_batch([1], [-1])
    assert pool.free_requests([7, 9, 8]) == 5
    assert pool.num_free == 10


# ---- the compiled pool against its twin, on random call sequences ----------------------------
#
# Both pools get the same calls, valid and not (unknown requests and reservations, double
# frees, over capacity, over the lending cap, bad arguments). After every call they must agree
# on what it returned (block ids in order) or raised (type and message), and on everything a
# caller can observe: counters, properties, every block's state and owner, every request's
# blocks and borrowed count. Arguments stay within int64, where the compiled signatures are.
# The strategies are weighted (repeats in sampled_from) so that most calls succeed and the
# pools reach deep states: loans committed, reservations expired, requests truncated.

INSTANCE = 1
BORROWER = 2
OWN = [0, 1, 2, 3]  # requests homed here
REMOTE = [100, 101]  # requests of the borrower, on blocks lent here
KNOWN_REQUESTS = [-1, *OWN, *REMOTE, 102]  # -1 and 102 never hold anything
HUGE = [2**31 - 1, 2**31, -(2**31), 2**40]  # past int32, within int64
REQUESTS = st.sampled_from(OWN * 3 + REMOTE + [-1, 102])
COUNTS = st.sampled_from([1, 1, 1, 2, 2, 3, 4, 0, -1, HUGE[1]])
BORROWERS = st.sampled_from([BORROWER] * 6 + [0, 3, INSTANCE, -1, *HUGE])
POOL_PROPERTIES = [
    "instance_id", "num_blocks", "max_lent_blocks", "num_free", "num_used", "num_lent", "num_reserved",
    "num_borrowed", "num_requests", "num_reservations", "version", "lendable",
    "num_cached", "num_evictable", "num_evicted",
]  # fmt: skip
HASHES = [11, 22, 33, 44, -5, 2**62]


def outcome(obj, name, *args):
    """What a call returned, arrays as (dtype, shape, values), or the exception it raised."""
    try:
        result = getattr(obj, name)(*args)
    except Exception as exc:  # noqa: BLE001 - the very exception is what is compared
        return ("raised", type(exc), str(exc))
    if isinstance(result, tuple) and result and isinstance(result[0], np.ndarray):
        return tuple((a.dtype.str, a.shape, a.tolist()) for a in result)
    return (type(result), result)


def observe(pool):
    return (
        repr(pool),
        pool.counters(),
        [getattr(pool, name) for name in POOL_PROPERTIES],
        [(pool.state(b), pool.owner(b), pool.refs(b), pool.block_hash(b)) for b in range(pool.num_blocks)],
        [(rid, pool.blocks_of(rid), pool.borrowed_by(rid)) for rid in KNOWN_REQUESTS],
    )


class PoolTwins(RuleBasedStateMachine):
    """One call sequence, two pools: the compiled ``BlockPool`` and its twin never differ."""

    @initialize(num_blocks=st.integers(1, 16), max_lent=st.one_of(st.none(), st.integers(0, 16)))
    def build(self, num_blocks, max_lent):
        max_lent = None if max_lent is None else min(max_lent, num_blocks)
        self.compiled, self.twin = (
            implementation(name).BlockPool(INSTANCE, num_blocks, max_lent) for name in ("compiled", "python")
        )
        self.now = 0  # an int until a fractional step: both must print it the same
        self.pending = {}  # reservation id -> expiry, as far as the test knows

    def call(self, name, *args):
        compiled, twin = outcome(self.compiled, name, *args), outcome(self.twin, name, *args)
        assert compiled == twin, (name, args)
        return twin

    def draw_request_with_blocks(self, data):
        holding = [rid for rid in KNOWN_REQUESTS if self.twin.blocks_of(rid)]
        return data.draw(st.sampled_from(holding * 3 + [-1, 102]), label="request")

    # ---- own requests ---------------------------------------------------------------------------

    @rule(rid=REQUESTS, n=COUNTS)
    def allocate(self, rid, n):
        self.call("allocate", rid, n)

    @rule(n=st.sampled_from([0, 1, 5, 16, 17, -1, HUGE[1]]))
    def can_allocate(self, n):
        self.call("can_allocate", n)

    @rule(data=st.data())
    def free_blocks(self, data):
        rid = self.draw_request_with_blocks(data)
        held = self.twin.blocks_of(rid)
        blocks = data.draw(
            st.one_of(
                st.integers(0, len(held)).map(lambda k: held[len(held) - k:]),  # truncate the tail
                st.permutations(held).flatmap(lambda p: st.integers(0, len(p)).map(lambda k: p[:k])),
                st.lists(st.sampled_from(held or [0]), max_size=4),  # may name a block twice
                st.lists(st.sampled_from([0, 1, 5, 15, 16, -1, *HUGE]), max_size=3),  # others', out of range
            ),
            label="blocks",
        )
        self.call("free_blocks", rid, blocks)

    @rule(data=st.data())
    def free_request(self, data):
        self.call("free_request", self.draw_request_with_blocks(data))

    @rule(rids=st.lists(REQUESTS, max_size=3), data=st.data())
    def allocate_batch(self, rids, data):
        n = len(rids) + data.draw(st.sampled_from([0, 0, 0, 0, 1, -1]), label="one count per request, or not")
        counts = data.draw(st.lists(COUNTS.filter(lambda c: c < 2**31), min_size=max(n, 0), max_size=max(n, 0)))
        self.call("allocate_batch", rids, counts)

    @rule(rids=st.lists(REQUESTS, max_size=3))
    def free_requests(self, rids):
        self.call("free_requests", rids)

    @rule(block=st.sampled_from([16, -1, *HUGE]))
    def owner_and_state_out_of_range(self, block):  # the blocks in range: every step, below
        self.call("owner", block)
        self.call("state", block)

    # ---- prefix caching -------------------------------------------------------------------------

    @rule(data=st.data(), h=st.sampled_from(HASHES))
    def register_block(self, data, h):
        used = [b for b in range(self.twin.num_blocks) if self.twin.state(b) == BLOCK_USED]
        block = data.draw(st.sampled_from(used * 3 + [0, 15, 16, -1]), label="block")
        self.call("register_block", block, h)

    @rule(rid=REQUESTS, home=st.sampled_from([INSTANCE] * 3 + [BORROWER, 7]),
          hashes=st.lists(st.sampled_from(HASHES), max_size=4))
    def lookup_and_acquire(self, rid, home, hashes):
        self.call("lookup", home, hashes)
        self.call("lookup_evictable", home, hashes)
        self.call("acquire", rid, home, hashes)

    @rule()
    def reset_cache(self):
        self.call("reset_cache")

    # ---- loans ----------------------------------------------------------------------------------

    @rule(borrower=BORROWERS, n=COUNTS, ttl=st.sampled_from([0, 0.5, 1, 2.5]))
    def try_reserve(self, borrower, n, ttl):
        result = self.call("try_reserve", borrower, n, self.now, ttl)
        if result[0] is int:
            self.pending[result[1]] = self.now + ttl

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), rid=st.sampled_from(REMOTE * 4 + OWN + [102]), late=st.sampled_from([0, 0, 0, 1, 2.5]))
    def commit(self, data, rid, late):  # an own request is held for another home: refused
        reservation = data.draw(st.sampled_from(sorted(self.pending)), label="reservation")
        before = self.twin.num_reservations
        self.call("commit", reservation, rid, self.now + late)  # a late commit finds it expired
        if self.twin.num_reservations < before:  # committed, or released as expired
            del self.pending[reservation]

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel(self, data):
        reservation = data.draw(st.sampled_from(sorted(self.pending)), label="reservation")
        self.call("cancel", reservation)
        del self.pending[reservation]

    @rule(reservation=st.sampled_from([0, 1, 2, 99, -1]), rid=st.sampled_from(REMOTE))
    def commit_and_cancel_unknown(self, reservation, rid):
        if reservation not in self.pending:  # never issued, or used up
            self.call("commit", reservation, rid, self.now)
            self.call("cancel", reservation)

    @rule(dt=st.sampled_from([0.25, 1, 1.5]))
    def advance(self, dt):
        self.now += dt

    @rule()
    def expire(self):
        self.call("expire", self.now)
        self.pending = {r: at for r, at in self.pending.items() if at >= self.now}

    # ---- this instance's requests held elsewhere ------------------------------------------------

    @rule(rid=REQUESTS, home=st.sampled_from([INSTANCE] * 4 + [BORROWER]), n=COUNTS)
    def add_borrowed(self, rid, home, n):
        self.call("add_borrowed", rid, home, n)

    @rule(rid=REQUESTS, data=st.data())
    def remove_borrowed(self, rid, data):
        have = self.twin.borrowed_by(rid)
        self.call("remove_borrowed", rid, data.draw(st.sampled_from([have, have, 1, 0, -1, have + 1]), label="n"))

    # ---- heartbeats -----------------------------------------------------------------------------

    @rule()
    def take_delta(self):
        self.call("take_delta")

    @invariant()
    def the_pools_look_the_same(self):
        assert observe(self.compiled) == observe(self.twin)


needs_compiled = pytest.mark.skipif(not compiled_available(), reason="the compiled core is not built")
TestPoolTwins = needs_compiled(PoolTwins.TestCase)
TestPoolTwins.settings = settings(max_examples=100, stateful_step_count=50)


@needs_compiled
def test_compiled_and_twin_constructors_agree():
    for args in itertools.product([-1, 0, 2**31 - 1, 2**31], [-1, 0, 1, 8, 2**31], [None, -1, 0, 8, 9]):
        compiled, twin = (outcome(implementation(name), "BlockPool", *args) for name in ("compiled", "python"))
        if compiled[0] != "raised" and twin[0] != "raised":
            compiled, twin = observe(compiled[1]), observe(twin[1])
        assert compiled == twin, args
