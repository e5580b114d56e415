"""Prefix caching in the block pool, against both implementations (the ``core`` fixture).

A full block is named by the hash of its tokens and of everything before them; when its last
holder frees it, it stays cached (evictable, least recently used first) and counts as free.
"""

import pytest

from infinillm import SchedulerError, ValidationError
from infinillm.core_sched import BLOCK_CACHED, BLOCK_FREE, BLOCK_USED


def counts(pool):
    c = pool.counters()
    return (c.capacity, c.free, c.used, c.lent, c.reserved, c.borrowed)


def test_a_freed_named_block_stays_cached_and_counts_as_free(core):
    pool = core.BlockPool(0, 4)
    a = pool.allocate(1, 3)
    assert [pool.register_block(b, h) for b, h in zip(a, [101, 102, 103])] == [True, True, True]
    assert pool.num_cached == 3 and pool.num_evictable == 0
    assert pool.free_request(1) == 3
    assert [pool.state(b) for b in a] == [BLOCK_CACHED] * 3
    assert counts(pool) == (4, 4, 0, 0, 0, 0)  # cached blocks are free for admission and lending
    assert pool.num_evictable == 3 and pool.lendable == 4
    assert pool.owner(a[0]) is None and pool.refs(a[0]) == 0 and pool.block_hash(a[0]) == 101


def test_acquire_takes_the_longest_cached_prefix_and_shares_blocks_in_use(core):
    pool = core.BlockPool(0, 8)
    a = pool.allocate(1, 3)
    for b, h in zip(a, [101, 102, 103]):
        pool.register_block(b, h)
    assert pool.lookup(0, [101, 102, 999, 103]) == 2
    assert pool.acquire(2, 0, [101, 102, 999, 103]) == a[:2]  # shared while request 1 still runs
    assert [pool.refs(b) for b in a] == [2, 2, 1]
    assert counts(pool) == (8, 5, 3, 0, 0, 0)  # a shared block is used once
    pool.free_request(1)
    assert [pool.state(b) for b in a] == [BLOCK_USED, BLOCK_USED, BLOCK_CACHED]
    assert pool.acquire(3, 0, [101, 102, 103]) == a
    assert pool.num_evictable == 0
    pool.free_request(2)
    pool.free_request(3)
    assert pool.num_evictable == 3 and counts(pool) == (8, 8, 0, 0, 0, 0)


def test_allocation_uses_free_blocks_first_then_evicts_least_recently_freed(core):
    pool = core.BlockPool(0, 4)
    a = pool.allocate(1, 2)
    b = pool.allocate(2, 2)
    for blk, h in zip(a + b, [1, 2, 3, 4]):
        pool.register_block(blk, h)
    pool.free_request(2)  # freed first: evicted first, its tail block before its head
    pool.free_request(1)
    assert pool.allocate(3, 1) == [b[1]]
    assert pool.num_evicted == 1 and pool.lookup(0, [3, 4]) == 1 and pool.lookup(0, [1, 2]) == 2
    assert pool.block_hash(b[1]) is None and pool.state(b[1]) == BLOCK_USED
    assert pool.acquire(4, 0, [1, 2]) == a  # touching them makes them the newest
    pool.free_request(4)
    assert pool.allocate(5, 1) == [b[0]]


def test_fresh_free_blocks_are_taken_before_cached_ones(core):
    pool = core.BlockPool(0, 4)
    a = pool.allocate(1, 1)
    pool.register_block(a[0], 7)
    pool.free_request(1)
    assert sorted(pool.allocate(2, 3)) == [1, 2, 3] and pool.lookup(0, [7]) == 1


def test_a_hash_names_one_block_and_a_block_one_hash(core):
    pool = core.BlockPool(0, 4)
    a, b = pool.allocate(1, 2)
    assert pool.register_block(a, 5) is True
    assert pool.register_block(b, 5) is False  # the same prefix computed twice: not named
    assert pool.register_block(a, 6) is False
    assert pool.block_hash(b) is None and pool.num_cached == 1
    pool.free_request(1)
    assert pool.state(b) == BLOCK_FREE and pool.state(a) == BLOCK_CACHED
    with pytest.raises(SchedulerError, match="block 0 is not in use"):
        pool.register_block(a, 9)
    with pytest.raises(ValidationError, match="block"):
        pool.register_block(4, 9)


def test_cached_blocks_of_another_home_are_not_shared(core):
    """A creditor caches a debtor's prefix for the debtor's requests only."""
    pool = core.BlockPool(0, 4)
    r = pool.try_reserve(1, 2, now=0.0, ttl=1.0)
    lent = pool.commit(r, 500, now=0.0)
    for blk, h in zip(lent, [1, 2]):
        pool.register_block(blk, h)
    assert pool.num_lent == 2
    pool.free_request(500)
    assert pool.num_lent == 0 and pool.num_evictable == 2 and pool.lendable == 4
    assert pool.lookup(0, [1, 2]) == 0 and pool.acquire(7, 0, [1, 2]) == []
    assert pool.lookup(1, [1, 2]) == 2
    assert pool.acquire(501, 1, [1, 2]) == lent
    assert counts(pool) == (4, 2, 2, 2, 0, 0)  # lent again
    with pytest.raises(SchedulerError, match="held here for instance 1, not 0"):
        pool.acquire(501, 0, [1])


def test_a_request_never_holds_a_block_twice(core):
    pool = core.BlockPool(0, 4)
    a = pool.allocate(1, 2)
    pool.register_block(a[0], 1)
    pool.register_block(a[1], 2)
    assert pool.acquire(1, 0, [1, 2]) == []
    assert [pool.refs(b) for b in a] == [1, 1]


def test_free_blocks_of_a_shared_block_drops_one_holder(core):
    pool = core.BlockPool(0, 4)
    a = pool.allocate(1, 1)
    pool.register_block(a[0], 1)
    pool.acquire(2, 0, [1])
    pool.allocate(3, 1)
    with pytest.raises(SchedulerError, match="block 0 is not held by request 3"):
        pool.free_blocks(3, a)
    pool.free_blocks(2, a)
    assert pool.refs(a[0]) == 1 and pool.blocks_of(1) == a and pool.blocks_of(2) == []
    pool.free_blocks(1, a)
    assert pool.state(a[0]) == BLOCK_CACHED


def test_reservations_evict_cached_blocks_when_nothing_else_is_free(core):
    pool = core.BlockPool(0, 2)
    a = pool.allocate(1, 2)
    pool.register_block(a[0], 1)
    pool.register_block(a[1], 2)
    pool.free_request(1)
    r = pool.try_reserve(3, 2, now=0.0, ttl=1.0)
    assert r is not None and pool.num_cached == 0 and pool.num_evicted == 2
    pool.cancel(r)
    assert pool.num_free == 2 and pool.num_evictable == 0


def test_reset_cache_forgets_evictable_blocks_only(core):
    pool = core.BlockPool(0, 4)
    a = pool.allocate(1, 2)
    pool.register_block(a[0], 1)
    pool.register_block(a[1], 2)
    pool.acquire(2, 0, [1])
    pool.free_request(1)
    assert pool.reset_cache() == 1  # a[1]; a[0] is still held by request 2
    assert pool.num_cached == 1 and pool.lookup(0, [1, 2]) == 1
    assert pool.state(a[1]) == BLOCK_FREE


def test_bad_hashes_are_refused(core):
    pool = core.BlockPool(0, 4)
    with pytest.raises(ValidationError, match="one-dimensional"):
        pool.lookup(0, [[1, 2]])
    with pytest.raises((OverflowError, ValidationError)):
        pool.acquire(1, 0, [2**64])
    assert pool.lookup(0, []) == 0 and pool.acquire(1, 0, []) == []


# ---- the batch planner ---------------------------------------------------------------------------

from infinillm.core_sched.types import LoanRequest, PrefixClaim, ScheduledChunk  # noqa: E402


def planner(core, num_blocks=16, block_size=4, budget=64):
    pool = core.BlockPool(0, num_blocks)
    return core.BatchPlanner(pool, core.BlockTables(block_size), 4, budget, 4 * num_blocks)


def test_a_request_reuses_the_cached_prefix_of_a_finished_one(core):
    bp = planner(core)
    pool = bp.pool
    bp.add_request(1, 10, 2, [101, 102])  # 10 tokens: blocks 0, 1 full, 2 partial
    bp.schedule()
    blocks = bp.tables.blocks_on(1, 0)
    for b, h in zip(blocks, [101, 102]):
        pool.register_block(b, h)
    bp.finish(1)
    assert pool.num_evictable == 2 and pool.num_free == 16
    bp.add_request(2, 13, 2, [101, 102, 103])  # the same first 8 tokens, then others
    plan = bp.schedule()
    assert plan.chunks == (ScheduledChunk(2, 8, 5, True),)  # only the 5 new tokens computed
    assert bp.tables.blocks_on(2, 0)[:2] == blocks[:2] and bp.num_computed(2) == 13
    s = bp.statistics()
    assert (s.prefix_query_tokens, s.prefix_hit_tokens) == (10 + 13, 8)
    assert s.prefix_hit_rate == pytest.approx(8 / 23)


def test_the_last_token_is_always_computed(core):
    bp = planner(core)
    bp.add_request(1, 8, 2, [101, 102])
    bp.schedule()
    for b, h in zip(bp.tables.blocks_on(1, 0), [101, 102]):
        bp.pool.register_block(b, h)
    bp.finish(1)
    bp.add_request(2, 8, 2, [101, 102])  # the very same prompt: its last block is computed again
    assert bp.schedule().chunks == (ScheduledChunk(2, 4, 4, True),)


def test_requests_running_together_share_a_cached_prefix(core):
    bp = planner(core)
    bp.add_request(1, 9, 4, [101, 102])
    bp.schedule()
    first = bp.tables.blocks_on(1, 0)
    for b, h in zip(first, [101, 102]):
        bp.pool.register_block(b, h)
    bp.append_output(1)
    bp.add_request(2, 9, 4, [101, 102])
    plan = bp.schedule()
    assert plan.chunks[1] == ScheduledChunk(2, 8, 1, True)
    assert bp.tables.blocks_on(2, 0)[:2] == first[:2] and bp.pool.refs(first[0]) == 2
    bp.abort(1)
    assert bp.pool.refs(first[0]) == 1 and bp.pool.num_used == 3  # two shared + request 2's own


def test_remote_cached_blocks_are_claimed_and_forgotten(core):
    bp = planner(core)
    bp.remember_remote(3, [40, 41], [101, 102])
    assert bp.num_remote_cached == 2
    bp.add_request(1, 12, 2, [101, 102, 103])
    plan = bp.schedule()
    assert plan.claims == (PrefixClaim(1, 3, (40, 41), (101, 102)),)
    assert plan.chunks == (ScheduledChunk(1, 8, 4, True),)
    assert bp.tables.runs(1)[0] == (3, [40, 41]) and bp.pool.borrowed_by(1) == 2
    # The claim failed (evicted there): forget them and recompute the request from scratch.
    assert bp.forget_remote(3, [101, 102]) == 2 and bp.num_remote_cached == 0
    assert bp.preempt(1) == ((3, (40, 41)),)
    plan = bp.schedule()
    assert plan.claims == () and plan.chunks == (ScheduledChunk(1, 0, 12, True),)


def test_a_prefix_may_run_from_home_to_creditors_and_back(core):
    bp = planner(core)
    bp.add_request(1, 9, 1, [101, 102])
    bp.schedule()
    home = bp.tables.blocks_on(1, 0)
    bp.pool.register_block(home[0], 101)
    bp.finish(1)
    bp.remember_remote(5, [7], [102])
    bp.add_request(2, 13, 1, [101, 102, 103])
    plan = bp.schedule()
    assert plan.claims == (PrefixClaim(2, 5, (7,), (102,)),)
    assert bp.tables.runs(2)[:2] == [(0, [home[0]]), (5, [7])]
    assert plan.chunks == (ScheduledChunk(2, 8, 5, True),)
    bp.remember_remote(6, [1], [999])
    assert bp.forget_remote(6) == 1 and bp.forget_remote(5) == 1


def test_prefix_arguments_are_checked(core):
    bp = planner(core)
    with pytest.raises(ValidationError, match="at most 2"):
        bp.add_request(1, 9, 1, [1, 2, 3])
    with pytest.raises(ValidationError, match="int64"):
        bp.add_request(1, 9, 1, [2**64])
    with pytest.raises(ValidationError, match="another instance"):
        bp.remember_remote(0, [1], [1])
    with pytest.raises(ValidationError, match="must name each block"):
        bp.remember_remote(1, [1, 2], [1])
    assert bp.num_waiting == 0


def test_the_remote_directory_keeps_at_most_the_clusters_blocks(core):
    bp = planner(core, num_blocks=2)  # cluster_blocks = 8
    bp.remember_remote(1, list(range(10)), list(range(100, 110)))
    assert bp.num_remote_cached == 8
    assert bp.forget_remote(1, [100, 101]) == 0  # the oldest went first


def test_lookup_evictable_counts_the_cached_blocks_no_request_holds(core):
    pool = core.BlockPool(0, 4)
    a = pool.allocate(1, 3)
    for b, h in zip(a, [1, 2, 3]):
        pool.register_block(b, h)
    pool.free_blocks(1, a[1:])
    assert pool.lookup(0, [1, 2, 3, 4]) == 3 and pool.lookup_evictable(0, [1, 2, 3, 4]) == 2
    assert pool.lookup_evictable(1, [1, 2]) == 0 and pool.lookup_evictable(0, []) == 0


def test_an_idle_instance_full_of_the_prefix_borrows_the_first_chunk(core):
    """Every block here is the request's own cached prefix: it is admitted with a loan for the
    rest and computes from the next step, once the loan is in its table."""
    bp = planner(core, num_blocks=2)
    bp.add_request(1, 8, 1, [101, 102])
    bp.schedule()
    for b, h in zip(bp.tables.blocks_on(1, 0), [101, 102]):
        bp.pool.register_block(b, h)
    bp.finish(1)
    bp.add_request(2, 12, 2, [101, 102, 103])
    assert bp.schedule(0).chunks == ()  # nothing to borrow from: it waits
    plan = bp.schedule(4)
    assert plan.chunks == () and plan.loans == (LoanRequest(2, 1),) and bp.is_running(2)
    bp.add_loan(2, 3, [50])
    assert bp.schedule(4).chunks == (ScheduledChunk(2, 8, 4, True),)
