"""Stateful property tests of the block pools of a small cluster, against a plain model.

Hypothesis drives random sequences of allocate / grow / truncate / reserve / commit (in time or
late) / cancel / expire / abort / heartbeat over three instances. After every step:

- every block is free, reserved for exactly one reservation, or owned by exactly one request
  (the model says which, and the pool agrees block by block);
- each pool's counters equal totals recomputed from the model, and the lending cap holds:
  ``lent + reserved <= max_lent`` (``lendable`` is what is left of it, capped by free blocks);
- the global ledger (the real ``DebtLedger`` of the same implementation), fed only the heartbeat
  deltas, equals each pool's counters as of its last heartbeat (and, after a final heartbeat of
  every pool, their counters now); its per-request placements equal where the blocks really are,
  and its debts (creditors_of / debtors_of) equal the lent blocks.

The machine runs once per implementation (compiled and twin).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from infinillm import CapacityError
from infinillm.core_sched import BLOCK_FREE, BLOCK_RESERVED, BLOCK_USED, implementation

NUM_INSTANCES = 3
NUM_BLOCKS = 12
MAX_LENT = 4
TTL = 1.0


class PoolModel:
    """What one pool should hold: owners of used blocks and pending reservations."""

    def __init__(self) -> None:
        self.owner: dict[int, tuple[int, int]] = {}  # block -> (request, home)
        self.reservations: dict[int, tuple[int, float, list[int]]] = {}  # id -> (borrower, expiry, blocks)
        self.borrowed: dict[int, int] = {}  # own request -> blocks it holds elsewhere

    def reserved_blocks(self) -> set[int]:
        return {b for _, _, blocks in self.reservations.values() for b in blocks}


class ClusterMachine(RuleBasedStateMachine):
    impl_name = "compiled"

    @initialize(homes=st.lists(st.integers(0, NUM_INSTANCES - 1), min_size=1, max_size=3))
    def start(self, homes: list[int]) -> None:
        impl = implementation(self.impl_name)
        self.pools = [impl.BlockPool(i, NUM_BLOCKS, MAX_LENT) for i in range(NUM_INSTANCES)]
        self.models = [PoolModel() for _ in range(NUM_INSTANCES)]
        self.homes: dict[int, int] = {}  # live request -> home instance
        self.pending: dict[tuple[int, int], int] = {}  # (creditor, reservation) -> the request it is for
        self.next_request = 1
        self.now = 0.0
        # The ledger as the gManager sees it: the sum of the heartbeat deltas.
        self.ledger = impl.DebtLedger()
        for i in range(NUM_INSTANCES):
            self.ledger.register_instance(i, NUM_BLOCKS, MAX_LENT, host=0)
        self.reported = {i: p.counters() for i, p in enumerate(self.pools)}
        for home in homes:  # some requests to lend to from the first step
            self.new_request(home, 2)

    # ---- rules -----------------------------------------------------------------------------

    def _allocate(self, rid: int, home: int, n: int) -> None:
        pool, model = self.pools[home], self.models[home]
        free_before = NUM_BLOCKS - len(model.owner) - len(model.reserved_blocks())
        if n > free_before:
            message = f"cannot allocate {n} blocks for request {rid}: {free_before} of {NUM_BLOCKS} free"
            with pytest.raises(CapacityError, match=re.escape(f"instance {home}: {message}")):
                pool.allocate(rid, n)
            return
        blocks = pool.allocate(rid, n)
        assert len(blocks) == n
        for b in blocks:
            assert b not in model.owner and b not in model.reserved_blocks(), f"block {b} handed out twice"
            model.owner[b] = (rid, home)
        self.ledger.record_blocks(rid, home, home, n)

    @rule(home=st.integers(0, NUM_INSTANCES - 1), n=st.integers(0, 5))
    def new_request(self, home: int, n: int) -> None:
        rid = self.next_request
        self.next_request += 1
        self.homes[rid] = home
        self._allocate(rid, home, n)

    @precondition(lambda self: self.homes)
    @rule(data=st.data(), n=st.integers(1, 4))
    def grow(self, data, n: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.homes)))
        self._allocate(rid, self.homes[rid], n)

    @precondition(lambda self: self.homes)
    @rule(data=st.data())
    def truncate(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.homes)))
        home = self.homes[rid]
        held = self.pools[home].blocks_of(rid)
        assert sorted(held) == sorted(b for b, o in self.models[home].owner.items() if o[0] == rid)
        k = data.draw(st.integers(0, len(held)))
        tail = held[len(held) - k:]
        self.pools[home].free_blocks(rid, tail)
        for b in tail:
            del self.models[home].owner[b]
        self.ledger.record_blocks(rid, home, home, -k)

    @precondition(lambda self: self.homes)
    @rule(data=st.data(), n=st.integers(1, 5))
    def reserve(self, data, n: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.homes)))
        home = self.homes[rid]
        creditor = data.draw(st.sampled_from([i for i in range(NUM_INSTANCES) if i != home]))
        model = self.models[creditor]
        free = NUM_BLOCKS - len(model.owner) - len(model.reserved_blocks())
        lent = sum(1 for (_, h) in model.owner.values() if h != creditor)
        expect_ok = n <= free and lent + len(model.reserved_blocks()) + n <= MAX_LENT
        if n <= free and not expect_ok:
            event("a reservation was refused by the lending cap")
        res = self.pools[creditor].try_reserve(home, n, self.now, TTL)
        assert (res is not None) == expect_ok
        if res is not None:
            assert res not in model.reservations
            # Which blocks: the pool says (state RESERVED); check they were free.
            blocks = [b for b in range(NUM_BLOCKS)
                      if self.pools[creditor].state(b) == BLOCK_RESERVED and b not in model.reserved_blocks()]
            assert len(blocks) == n
            assert not set(blocks) & set(model.owner)
            model.reservations[res] = (home, self.now + TTL, blocks)
            self.pending[(creditor, res)] = rid

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), late=st.sampled_from([0.0, 0.0, 0.0, 1.5]))
    def commit(self, data, late: float) -> None:
        """Commit a pending reservation; ``late``: the borrower's commit comes after this clock."""
        (creditor, res), rid = data.draw(st.sampled_from(sorted(self.pending.items())))
        del self.pending[(creditor, res)]
        model = self.models[creditor]
        borrower, expiry, blocks = model.reservations.pop(res)
        if rid not in self.homes:  # the request was aborted meanwhile: give the blocks back
            assert self.pools[creditor].cancel(res) == len(blocks)
            return
        now = self.now + late
        if now > expiry:  # nobody expired it yet: the commit does
            event("a late commit found its reservation expired")
            message = f"instance {creditor}: reservation {res} expired at {expiry} (now {now})"
            with pytest.raises(CapacityError, match=re.escape(message)):
                self.pools[creditor].commit(res, rid, now)
            return
        got = self.pools[creditor].commit(res, rid, now)
        assert sorted(got) == sorted(blocks)
        for b in got:
            model.owner[b] = (rid, borrower)
        self.ledger.record_blocks(rid, borrower, creditor, len(got))
        self.pools[borrower].add_borrowed(rid, borrower, len(got))
        hm = self.models[borrower]
        hm.borrowed[rid] = hm.borrowed.get(rid, 0) + len(got)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        (creditor, res), _ = data.draw(st.sampled_from(sorted(self.pending.items())))
        del self.pending[(creditor, res)]
        _, _, blocks = self.models[creditor].reservations.pop(res)
        assert self.pools[creditor].cancel(res) == len(blocks)

    @rule(dt=st.sampled_from([0.25, 0.5, 1.5]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def expire(self) -> None:
        for i, (pool, model) in enumerate(zip(self.pools, self.models)):
            dead = [r for r, (_, exp, _) in model.reservations.items() if self.now > exp]
            expected = sum(len(model.reservations[r][2]) for r in dead)
            assert pool.expire(self.now) == expected
            for r in dead:
                del model.reservations[r]
                self.pending.pop((i, r), None)

    @precondition(lambda self: self.homes)
    @rule(data=st.data())
    def abort(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.homes)))
        home = self.homes.pop(rid)
        for pool, model in zip(self.pools, self.models):
            expected = [b for b, o in model.owner.items() if o[0] == rid]
            assert pool.free_request(rid) == len(expected)
            for b in expected:
                del model.owner[b]
        n = self.models[home].borrowed.pop(rid, 0)
        self.pools[home].remove_borrowed(rid, n)
        self.ledger.forget_request(rid)

    @rule(instance=st.integers(0, NUM_INSTANCES - 1))
    def heartbeat(self, instance: int) -> None:
        self._heartbeat(instance)

    def _heartbeat(self, instance: int) -> None:
        d = self.pools[instance].take_delta()
        assert self.ledger.apply_delta(d), "a heartbeat was lost or applied twice"
        self.reported[instance] = self.pools[instance].counters()

    @rule(instance=st.integers(0, NUM_INSTANCES - 1))
    def lost_heartbeat_then_snapshot(self, instance: int) -> None:
        """A heartbeat goes missing: the next delta is refused, a snapshot repairs the view."""
        lost = self.pools[instance].take_delta()
        if lost.empty:
            return
        refused = self.pools[instance].take_delta()  # based on the lost one's version
        assert not self.ledger.apply_delta(refused)
        self.ledger.apply_snapshot(instance, self.pools[instance].counters())
        self.pools[instance].take_delta()  # the snapshot is the new base
        self.reported[instance] = self.pools[instance].counters()

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def every_block_is_free_or_owned_exactly_once(self) -> None:
        for i, (pool, model) in enumerate(zip(self.pools, self.models)):
            reserved = model.reserved_blocks()
            assert not reserved & set(model.owner)
            for b in range(NUM_BLOCKS):
                if b in model.owner:
                    assert pool.state(b) == BLOCK_USED and pool.owner(b) == model.owner[b], (i, b)
                elif b in reserved:
                    assert pool.state(b) == BLOCK_RESERVED and pool.owner(b) is None, (i, b)
                else:
                    assert pool.state(b) == BLOCK_FREE and pool.owner(b) is None, (i, b)

    @invariant()
    def counters_equal_recomputed_totals(self) -> None:
        for i, (pool, model) in enumerate(zip(self.pools, self.models)):
            c = pool.counters()
            used = len(model.owner)
            reserved = len(model.reserved_blocks())
            lent = sum(1 for (_, h) in model.owner.values() if h != i)
            assert (c.capacity, c.free, c.used, c.lent, c.reserved, c.borrowed) == (
                NUM_BLOCKS, NUM_BLOCKS - used - reserved, used, lent, reserved, sum(model.borrowed.values())
            )
            assert pool.num_reservations == len(model.reservations)

    @invariant()
    def lending_stays_under_the_cap(self) -> None:
        for pool in self.pools:
            c = pool.counters()
            assert c.lent + c.reserved <= MAX_LENT, (pool.instance_id, c)
            assert pool.lendable == min(c.free, max(0, MAX_LENT - c.lent - c.reserved))

    @invariant()
    def ledger_equals_sum_of_deltas(self) -> None:
        for i in range(NUM_INSTANCES):
            view, rep = self.ledger.instance(i), self.reported[i]
            assert (view.version, view.capacity, view.free, view.used, view.lent, view.reserved, view.borrowed) == (
                rep.version, rep.capacity, rep.free, rep.used, rep.lent, rep.reserved, rep.borrowed
            )

    @invariant()
    def ledger_placements_and_debts_match_the_pools(self) -> None:
        debts: dict[tuple[int, int], int] = {}
        for rid, home in self.homes.items():
            where = {}
            for i, model in enumerate(self.models):
                n = sum(1 for o in model.owner.values() if o[0] == rid)
                if n:
                    where[i] = n
                    if i != home:
                        debts[(home, i)] = debts.get((home, i), 0) + n
            if self.ledger.has_request(rid):
                assert self.ledger.placement(rid) == where
            else:
                assert not where
        for i in range(NUM_INSTANCES):
            assert self.ledger.creditors_of(i) == {c: n for (d, c), n in sorted(debts.items()) if d == i}
            assert self.ledger.debtors_of(i) == {d: n for (d, c), n in sorted(debts.items()) if c == i}

    def teardown(self) -> None:
        if not hasattr(self, "pools"):
            return
        for i in range(NUM_INSTANCES):
            self._heartbeat(i)
            view = self.ledger.instance(i)
            assert view.free == self.pools[i].num_free and view.version == self.pools[i].version


SETTINGS = settings(max_examples=60, stateful_step_count=40,
                    suppress_health_check=[HealthCheck.too_slow])


class CompiledCluster(ClusterMachine):
    impl_name = "compiled"


class TwinCluster(ClusterMachine):
    impl_name = "python"


TestCompiledCluster = CompiledCluster.TestCase
TestCompiledCluster.settings = SETTINGS
TestTwinCluster = TwinCluster.TestCase
TestTwinCluster.settings = SETTINGS
