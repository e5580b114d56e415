"""The block pool (rManager), against both implementations (the ``core`` fixture)."""

import pytest

from infinillm import CapacityError, SchedulerError, ValidationError
from infinillm.core_sched import BLOCK_FREE, BLOCK_RESERVED, BLOCK_USED


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
    with pytest.raises(ValidationError, match="n=-1"):
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


def test_lending_goes_through_a_reservation_under_the_cap(core):
    pool = core.BlockPool(0, 10, max_lent_blocks=4)
    pool.allocate(1, 5)  # own: 0..4
    rid = pool.try_reserve(borrower=2, n=3, now=0.0, ttl=1.0)
    assert rid is not None
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


def test_reservations_expire_and_an_expired_commit_fails(core):
    pool = core.BlockPool(1, 6)
    a = pool.try_reserve(0, 2, now=0.0, ttl=1.0)
    b = pool.try_reserve(2, 2, now=0.5, ttl=1.0)
    assert pool.expire(now=1.2) == 2  # a expired at 1.0, b lives until 1.5
    assert pool.num_reservations == 1
    with pytest.raises(SchedulerError, match=f"unknown reservation {a}"):
        pool.commit(a, 5, now=1.2)
    with pytest.raises(CapacityError, match=f"reservation {b} expired"):
        pool.commit(b, 5, now=1.6)
    assert counts(pool) == (6, 6, 0, 0, 0, 0)


def test_cancel_returns_the_blocks(core):
    pool = core.BlockPool(1, 6)
    rid = pool.try_reserve(0, 4, 0.0, 1.0)
    assert pool.cancel(rid) == 4
    with pytest.raises(SchedulerError):
        pool.cancel(rid)
    assert counts(pool) == (6, 6, 0, 0, 0, 0)


def test_cannot_lend_to_itself_or_reserve_nothing(core):
    pool = core.BlockPool(1, 6)
    with pytest.raises(SchedulerError, match="cannot lend to itself"):
        pool.try_reserve(1, 1, 0.0, 1.0)
    with pytest.raises(ValidationError, match="n=0"):
        pool.try_reserve(0, 0, 0.0, 1.0)


def test_commit_refuses_a_request_held_for_another_home(core):
    pool = core.BlockPool(0, 8)
    r1 = pool.try_reserve(1, 1, 0.0, 1.0)
    pool.commit(r1, 42, 0.0)
    r2 = pool.try_reserve(2, 1, 0.0, 1.0)
    with pytest.raises(SchedulerError, match="request 42 is held here for instance 1"):
        pool.commit(r2, 42, 0.0)


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
    with pytest.raises(ValidationError, match="num_blocks=0"):
        core.BlockPool(0, 0)
    with pytest.raises(ValidationError, match=r"max_lent_blocks=9 is invalid: must be in \[0, 8\]"):
        core.BlockPool(0, 8, 9)
    with pytest.raises(ValidationError, match="instance_id=-1"):
        core.BlockPool(-1, 8)
    with pytest.raises(ValidationError, match="block=8"):
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
    with pytest.raises(ValidationError, match="counts=-1"):
        pool.allocate_batch([1], [-1])
    assert pool.free_requests([7, 9, 8]) == 5
    assert pool.num_free == 10
