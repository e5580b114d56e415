"""The block tables, against both implementations (the ``core`` fixture), and the compiled core
against its twin on random operation sequences (hypothesis)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinillm import CapacityError, SchedulerError, ValidationError
from infinillm import core_sched


def tables_with(core, block_size=4, **requests):
    """BlockTables with one request per keyword: ``r7=[(instance, [ids]), ..., num_tokens]``."""
    bt = core.BlockTables(block_size)
    for name, spec in requests.items():
        rid = int(name[1:])
        bt.add_request(rid)
        *runs, num_tokens = spec
        for instance, ids in runs:
            bt.append_blocks(rid, instance, ids)
        bt.append_tokens(rid, num_tokens)
    return bt


def as_lists(arrays):
    return tuple(a.tolist() for a in arrays)


# ---- construction and requests ---------------------------------------------------------------


def test_block_size_must_be_a_power_of_two_up_to_1024(core):
    for bad in (0, 3, 12, 2048, -4):
        message = rf"block_size={bad} is invalid: must be a power of two in \[1, 1024\]"
        with pytest.raises(ValidationError, match=message):
            core.BlockTables(bad)
    assert core.BlockTables(1).block_size == 1
    assert core.BlockTables(1024).block_size == 1024


def test_requests_are_added_once_and_forgotten_with_their_blocks(core):
    bt = core.BlockTables(16)
    bt.add_request(5)
    assert bt.has_request(5) and not bt.has_request(6)
    assert bt.num_requests == 1
    with pytest.raises(SchedulerError, match="request 5 already has a block table"):
        bt.add_request(5)
    bt.append_blocks(5, 0, [3, 4])
    bt.append_blocks(5, 2, [8])
    assert bt.remove_request(5) == [(0, [3, 4]), (2, [8])]
    assert not bt.has_request(5) and bt.num_requests == 0
    bt.add_request(6)
    assert bt.remove_request(6) == []  # a request holding no blocks gives nothing back


def test_unknown_requests_raise_everywhere(core):
    bt = core.BlockTables(16)
    calls = [
        lambda: bt.remove_request(9),
        lambda: bt.num_tokens(9),
        lambda: bt.num_blocks(9),
        lambda: bt.blocks_needed(9, 1),
        lambda: bt.append_blocks(9, 0, [1]),
        lambda: bt.append_tokens(9, 1),
        lambda: bt.runs(9),
        lambda: bt.locate(9, 0),
        lambda: bt.truncate(9, 0),
        lambda: bt.blocks_on(9, 0),
        lambda: bt.move_blocks(9, 0, 1, []),
        lambda: bt.batch_tables([9], 0),
        lambda: bt.slot_mapping([9], [0]),
    ]
    for call in calls:
        with pytest.raises(SchedulerError, match="request 9 has no block table"):
            call()


def test_argument_ranges(core):
    bt = core.BlockTables(16)
    bt.add_request(1)
    with pytest.raises(ValidationError, match="instance=-1 is invalid: must be in \\[0, 2147483647\\]"):
        bt.append_blocks(1, -1, [0])
    with pytest.raises(ValidationError, match=r"block_ids\[1\]=-1 is invalid: must be in \[0, 2147483647\]"):
        bt.append_blocks(1, 0, [0, -1])
    assert bt.num_blocks(1) == 0  # all or nothing
    with pytest.raises(ValidationError, match=r"block_ids\[0\]=2147483648 is invalid: must be in \[0, 2147483647\]"):
        bt.append_blocks(1, 0, [1 << 31])
    with pytest.raises(ValidationError, match=r"request_id=9223372036854775808 is invalid: must be in \[-9223372036854775808, 9223372036854775807\]"):
        bt.add_request(1 << 63)
    with pytest.raises(ValidationError, match=r"request_ids\[1\]=-9223372036854775809 is invalid: must be in \[-9223372036854775808, 9223372036854775807\]"):
        bt.batch_tables([1, -(1 << 63) - 1], 0)
    with pytest.raises(ValidationError, match=r"dst=2147483648 is invalid: must be in \[0, 2147483647\]"):
        bt.move_blocks(1, 0, 1 << 31, [])


# ---- growth ----------------------------------------------------------------------------------


def test_blocks_needed_counts_the_blocks_to_append(core):
    bt = core.BlockTables(16)
    bt.add_request(1)
    assert bt.blocks_needed(1, 0) == 0
    assert bt.blocks_needed(1, 1) == 1  # ceil(1/16)
    assert bt.blocks_needed(1, 16) == 1  # exactly one block
    assert bt.blocks_needed(1, 17) == 2  # ceil(17/16)
    bt.append_blocks(1, 0, [0])
    bt.append_tokens(1, 10)
    assert bt.blocks_needed(1, 6) == 0  # 10 + 6 = 16 fits the one block
    assert bt.blocks_needed(1, 7) == 1  # ceil(17/16) - 1
    assert bt.blocks_needed(1, 40) == 3  # ceil(50/16) = 4, minus 1
    bt.append_blocks(1, 0, [1, 2])  # allocated ahead
    assert bt.blocks_needed(1, 5) == 0  # ceil(15/16) = 1 < 3 held: never negative
    with pytest.raises(ValidationError, match="num_new_tokens=-1 is invalid: must be >= 0"):
        bt.blocks_needed(1, -1)


def test_append_tokens_must_fit_in_the_blocks_held(core):
    bt = tables_with(core, block_size=16, r1=[(0, [4, 5]), 20])
    assert (bt.num_tokens(1), bt.num_blocks(1)) == (20, 2)
    bt.append_tokens(1, 12)  # 20 + 12 = 32 = 2 * 16 slots: exactly full
    message = r"request 1: 32 \+ 1 tokens do not fit in 2 blocks of 16 tokens \(32 slots\)"
    with pytest.raises(CapacityError, match=message):
        bt.append_tokens(1, 1)
    assert bt.num_tokens(1) == 32  # nothing changed
    with pytest.raises(ValidationError, match="n=-2 is invalid: must be >= 0"):
        bt.append_tokens(1, -2)
    bt.append_tokens(1, 0)
    assert bt.num_tokens(1) == 32


def test_the_tail_spills_onto_a_new_run_on_another_instance(core):
    bt = core.BlockTables(4)
    bt.add_request(7)
    bt.append_blocks(7, 0, [5])
    bt.append_blocks(7, 0, [9])  # same instance: the tail run grows
    assert bt.runs(7) == [(0, [5, 9])]
    bt.append_blocks(7, 1, [2, 6])  # instance 0 is full: spill onto instance 1
    bt.append_blocks(7, 1, [])  # nothing appended, no empty run
    bt.append_blocks(7, 0, [3])  # back home: a third run
    assert bt.runs(7) == [(0, [5, 9]), (1, [2, 6]), (0, [3])]
    assert bt.num_blocks(7) == 5
    assert bt.blocks_on(7, 0) == [5, 9, 3]
    assert bt.blocks_on(7, 1) == [2, 6]
    assert bt.blocks_on(7, 2) == []


# ---- locate ----------------------------------------------------------------------------------


def test_locate_position_zero_block_boundaries_and_the_partial_tail(core):
    # block_size 4, 14 tokens: logical 0 = block 5 (A=0), 1 = 9 (A), 2 = 2 (B=1), 3 = 6 (B, 2 tokens)
    bt = tables_with(core, block_size=4, r7=[(0, [5, 9]), (1, [2, 6]), (0, [3]), 14])
    assert bt.locate(7, 0) == (0, 5, 0)
    assert bt.locate(7, 3) == (0, 5, 3)  # last slot of logical block 0
    assert bt.locate(7, 4) == (0, 9, 0)  # 4 // 4 = 1
    assert bt.locate(7, 7) == (0, 9, 3)
    assert bt.locate(7, 8) == (1, 2, 0)  # first token on the second run
    assert bt.locate(7, 13) == (1, 6, 1)  # 13 = 3*4 + 1, the partially filled tail
    with pytest.raises(ValidationError, match=r"position=14 is invalid: must be in \[0, 13\] \(tokens of request 7\)"):
        bt.locate(7, 14)  # block 6 has room but the token is not written
    with pytest.raises(ValidationError, match=r"position=-1 is invalid: must be in \[0, 13\] \(tokens of request 7\)"):
        bt.locate(7, -1)
    bt.add_request(8)
    with pytest.raises(ValidationError, match="position=0 is invalid: request 8 holds no tokens"):
        bt.locate(8, 0)


# ---- truncate --------------------------------------------------------------------------------


def test_truncate_mid_block_keeps_the_block_and_drops_the_rest(core):
    bt = tables_with(core, block_size=4, r7=[(0, [5, 9]), (1, [2, 6]), (0, [3]), 14])
    assert bt.truncate(7, 6) == [(1, [2, 6]), (0, [3])]  # ceil(6/4) = 2 blocks kept
    assert bt.runs(7) == [(0, [5, 9])]
    assert (bt.num_tokens(7), bt.num_blocks(7)) == (6, 2)
    assert bt.locate(7, 5) == (0, 9, 1)


def test_truncate_at_a_block_boundary_and_inside_a_run(core):
    bt = tables_with(core, block_size=4, r7=[(0, [5, 9]), (1, [2, 6]), (0, [3]), 14])
    assert bt.truncate(7, 12) == [(1, [6]), (0, [3])]  # 12/4 = 3 blocks kept: run 1 splits
    assert bt.runs(7) == [(0, [5, 9]), (1, [2])]
    assert bt.truncate(7, 12) == []  # nothing past ceil(12/4)
    assert bt.truncate(7, 0) == [(0, [5, 9]), (1, [2])]
    assert bt.runs(7) == [] and bt.num_blocks(7) == 0 and bt.num_tokens(7) == 0


def test_truncate_drops_blocks_allocated_ahead(core):
    bt = tables_with(core, block_size=4, r1=[(0, [0, 1, 2]), 5])  # block 2 holds no token yet
    assert bt.truncate(1, 5) == [(0, [2])]  # ceil(5/4) = 2 blocks needed
    message = r"num_tokens=6 is invalid: must be in \[0, 5\] \(tokens request 1 holds\)"
    with pytest.raises(ValidationError, match=message):
        bt.truncate(1, 6)
    with pytest.raises(ValidationError, match=r"num_tokens=-1 is invalid: must be in \[0, 5\] \(tokens request 1 holds\)"):
        bt.truncate(1, -1)


# ---- migration -------------------------------------------------------------------------------


def test_move_blocks_splits_a_run_when_only_its_end_moves(core):
    bt = tables_with(core, block_size=4, r1=[(0, [10, 11, 12]), 12])
    assert bt.move_blocks(1, src=0, dst=2, new_block_ids=[40]) == [12]
    assert bt.runs(1) == [(0, [10, 11]), (2, [40])]
    assert bt.locate(1, 8) == (2, 40, 0)  # 8 // 4 = 2, now on instance 2
    assert bt.move_blocks(1, 0, 2, [38, 39]) == [10, 11]  # the rest follows: one run again
    assert bt.runs(1) == [(2, [38, 39, 40])]


def test_move_blocks_takes_the_last_blocks_on_src_across_runs_and_merges(core):
    # A=0 [5 9] | B=1 [2] | A [4 8]; move 3 blocks A -> C=2
    bt = tables_with(core, block_size=4, r1=[(0, [5, 9]), (1, [2]), (0, [4, 8]), 18])
    assert bt.move_blocks(1, 0, 2, [70, 71, 72]) == [9, 4, 8]
    assert bt.runs(1) == [(0, [5]), (2, [70]), (1, [2]), (2, [71, 72])]
    # moving B's only block to C merges three runs into one
    assert bt.move_blocks(1, 1, 2, [73]) == [2]
    assert bt.runs(1) == [(0, [5]), (2, [70, 73, 71, 72])]
    # bringing them home merges with the home run
    assert bt.move_blocks(1, 2, 0, [1, 2, 3, 4]) == [70, 73, 71, 72]
    assert bt.runs(1) == [(0, [5, 1, 2, 3, 4])]
    assert bt.num_tokens(1) == 18  # tokens never move with the blocks' ids


def test_move_blocks_can_leave_the_tail_where_it_is(core):
    """``keep_last``: the last logical blocks (the tail being appended to) never move; a run
    that straddles them splits in three, and the parts on one instance merge again later."""
    bt = tables_with(core, block_size=4, r1=[(0, [5, 9, 4, 8]), 15])
    assert bt.move_blocks(1, 0, 2, [70, 71], keep_last=1) == [9, 4]
    assert bt.runs(1) == [(0, [5]), (2, [70, 71]), (0, [8])]
    assert bt.locate(1, 14) == (0, 8, 2)  # the tail: still here
    assert bt.move_blocks(1, 2, 0, [30, 31], keep_last=1) == [70, 71]  # home again: one run
    assert bt.runs(1) == [(0, [5, 30, 31, 8])]
    with pytest.raises(SchedulerError, match="request 1 has 3 blocks on instance 0 before its last 1, cannot move 4"):
        bt.move_blocks(1, 0, 2, [1, 2, 3, 4], keep_last=1)
    with pytest.raises(ValidationError, match="keep_last=-1 is invalid: must be an integer >= 0"):
        bt.move_blocks(1, 0, 2, [1], keep_last=-1)
    bt2 = tables_with(core, block_size=4, r1=[(0, [5]), (1, [2, 3]), 12])  # the tail on a creditor
    assert bt2.move_blocks(1, 1, 0, [40], keep_last=1) == [2]
    assert bt2.runs(1) == [(0, [5, 40]), (1, [3])]


def test_move_blocks_refuses_more_than_src_holds(core):
    bt = tables_with(core, block_size=4, r1=[(0, [5]), (1, [2, 3]), 9])
    with pytest.raises(SchedulerError, match="request 1 has 1 blocks on instance 0, cannot move 2 to instance 1"):
        bt.move_blocks(1, 0, 1, [7, 8])
    with pytest.raises(SchedulerError, match="request 1 has 0 blocks on instance 4, cannot move 1"):
        bt.move_blocks(1, 4, 1, [7])
    assert bt.move_blocks(1, 0, 1, []) == []
    assert bt.runs(1) == [(0, [5]), (1, [2, 3])]  # unchanged


# ---- batch tables ----------------------------------------------------------------------------


def test_batch_tables_for_one_instance(core):
    bt = tables_with(
        core,
        block_size=4,
        r1=[(0, [5, 9]), (1, [2, 6]), (0, [3]), 14],  # 4 blocks hold tokens; block 3 is ahead
        r2=[(0, [20, 21, 22]), 9],  # 9 tokens: 4 + 4 + 1
        r3=[(1, [30]), 4],  # nothing on instance 0
    )
    table, start, length = bt.batch_tables([1, 2, 3], instance=0)
    assert table.dtype == start.dtype == length.dtype == np.int32
    assert table.shape == (3, 3)  # M = max(2, 3, 0)
    assert table.tolist() == [[5, 9, -1], [20, 21, 22], [-1, -1, -1]]  # r1's block 3 is empty
    assert start.tolist() == [[0, 4, 0], [0, 4, 8], [0, 0, 0]]  # i * 4
    assert length.tolist() == [[4, 4, 0], [4, 4, 1], [0, 0, 0]]  # 9 - 8 = 1 in r2's tail
    # instance 1: r1's tail block 6 holds 14 - 12 = 2 tokens
    assert as_lists(bt.batch_tables([1, 3, 2], 1)) == (
        [[2, 6], [30, -1], [-1, -1]],
        [[8, 12], [0, 0], [0, 0]],
        [[4, 2], [4, 0], [0, 0]],
    )


def test_batch_tables_of_an_empty_batch_and_of_no_blocks(core):
    bt = tables_with(core, block_size=4, r1=[(1, [0]), 0])
    table, start, length = bt.batch_tables([], 0)
    assert table.shape == start.shape == length.shape == (0, 1)  # M is at least 1
    assert as_lists(bt.batch_tables([1], 1)) == ([[-1]], [[0]], [[0]])  # the block holds no token


# ---- slot mapping ----------------------------------------------------------------------------


def test_slot_mapping_of_the_last_tokens(core):
    bt = tables_with(
        core,
        block_size=4,
        r1=[(0, [5, 9]), (1, [2, 6]), 14],
        r2=[(2, [7]), 1],
    )
    instance, slot = bt.slot_mapping([1, 2], [7, 1])
    assert instance.dtype == np.int32 and slot.dtype == np.int64
    # r1 positions 7..13: 7 in block 9 (offset 3) on 0; 8..11 in block 2 on 1; 12, 13 in block 6 on 1
    assert instance.tolist() == [0, 1, 1, 1, 1, 1, 1, 2]
    assert slot.tolist() == [9 * 4 + 3, 8, 9, 10, 11, 24, 25, 7 * 4 + 0]
    # decode: one token each (the usual step); zero counts skip a request
    assert as_lists(bt.slot_mapping([2, 1], [0, 1])) == ([1], [25])
    assert as_lists(bt.slot_mapping([], [])) == ([], [])


def test_slot_mapping_checks_counts(core):
    bt = tables_with(core, block_size=4, r1=[(0, [5]), 3])
    with pytest.raises(ValidationError, match=r"len\(counts\)=2 is invalid: must equal len\(request_ids\)=1"):
        bt.slot_mapping([1], [1, 1])
    message = r"counts\[0\]=-1 is invalid: must be in \[0, 3\] \(tokens request 1 holds\)"
    with pytest.raises(ValidationError, match=message):
        bt.slot_mapping([1], [-1])
    with pytest.raises(ValidationError, match=r"counts\[1\]=4 is invalid: must be in \[0, 3\]"):
        bt.slot_mapping([1, 1], [1, 4])


def test_slot_mapping_agrees_with_locate(core):
    bt = tables_with(core, block_size=2, r4=[(3, [1]), (0, [8, 9]), (3, [4]), (1, [6]), 9])
    instance, slot = bt.slot_mapping([4], [9])
    for p in range(9):
        on, block, offset = bt.locate(4, p)
        assert (instance[p], slot[p]) == (on, block * 2 + offset)


# ---- compiled core against its twin ----------------------------------------------------------
#
# Operations are drawn from the current state (read off the twin) so that most of them are
# valid and reach deep states (spills, splits, merges, partial tails), with a margin of one on
# each side so the errors are compared too.

REQUESTS = st.sampled_from([0, 0, 1, 1, 2, 3, 4])  # 0..3 are added first; 4 only when a sequence adds it
INSTANCES = st.integers(0, 2)
BLOCK_IDS = st.integers(0, 50)
OPERATION_NAMES = (
    ["add_request", "remove_request", "has_request", "num_tokens", "num_blocks", "runs", "blocks_on"]
    + ["blocks_needed", "locate", "truncate"] * 2
    + ["append_blocks", "append_tokens", "move_blocks", "batch_tables", "slot_mapping"] * 4
    + ["grow"] * 8
)


def grow(bt, rid, instance, n, first_id):
    """What the engine does before a step: append the blocks needed for n tokens, then them."""
    k = bt.blocks_needed(rid, n)
    bt.append_blocks(rid, instance, range(first_id, first_id + k))
    bt.append_tokens(rid, n)
    return k


def sizes(twin, rid):
    """(num_tokens, num_blocks) of a request, (0, 0) when it has no table."""
    return (twin.num_tokens(rid), twin.num_blocks(rid)) if twin.has_request(rid) else (0, 0)


def draw_operation(data, twin):
    name = data.draw(st.sampled_from(OPERATION_NAMES), label="operation")
    bs = twin.block_size
    if name == "batch_tables":
        return name, data.draw(st.lists(REQUESTS, max_size=5)), data.draw(INSTANCES)
    if name == "slot_mapping":
        rids = data.draw(st.lists(REQUESTS, max_size=5))
        held = [sizes(twin, r)[0] for r in rids]
        counts = [data.draw(st.one_of(st.integers(0, n), st.integers(-1, n + 1))) for n in held]
        if data.draw(st.integers(0, 20)) == 0:
            counts.append(0)  # one count too many
        return name, rids, counts
    rid = data.draw(REQUESTS)
    num_tokens, num_blocks = sizes(twin, rid)
    if name == "blocks_needed":
        return name, rid, data.draw(st.integers(-1, 3 * bs))
    if name == "append_blocks":
        return name, rid, data.draw(INSTANCES), data.draw(st.lists(BLOCK_IDS, max_size=6))
    if name == "append_tokens":
        room = num_blocks * bs - num_tokens
        return name, rid, data.draw(st.one_of(st.just(room), st.integers(0, room), st.integers(-1, room + 1)))
    if name == "grow":
        return name, rid, data.draw(INSTANCES), data.draw(st.integers(1, 3 * bs)), data.draw(st.integers(0, 100))
    if name == "locate":
        return name, rid, data.draw(st.integers(-1, num_tokens))
    if name == "truncate":
        return name, rid, data.draw(st.integers(-1, num_tokens + 1))
    if name == "blocks_on":
        return name, rid, data.draw(INSTANCES)
    if name == "move_blocks":
        src, dst = data.draw(INSTANCES), data.draw(INSTANCES)
        have = len(twin.blocks_on(rid, src)) if twin.has_request(rid) else 0
        n = data.draw(st.one_of(st.integers(1, max(have, 1)), st.integers(0, have + 1)))
        keep_last = data.draw(st.sampled_from([0, 0, 1, 2]))
        return name, rid, src, dst, data.draw(st.lists(BLOCK_IDS, min_size=n, max_size=n)), keep_last
    return name, rid


def outcome(bt, op):
    name, *args = op
    try:
        result = grow(bt, *args) if name == "grow" else getattr(bt, name)(*args)
    except Exception as exc:  # noqa: BLE001 - the very exception is what is compared
        return ("raised", type(exc), str(exc))
    if isinstance(result, tuple) and result and isinstance(result[0], np.ndarray):
        return tuple((a.dtype, a.shape, a.tolist()) for a in result)
    return result


def state(bt):
    return [(rid, bt.num_tokens(rid), bt.runs(rid)) for rid in range(5) if bt.has_request(rid)]


def check_invariants(bt):
    for rid, num_tokens, runs in state(bt):
        assert all(a[0] != b[0] for a, b in zip(runs, runs[1:]))  # adjacent runs differ in instance
        assert all(ids for _, ids in runs)  # no empty run
        assert sum(len(ids) for _, ids in runs) == bt.num_blocks(rid)
        assert num_tokens <= bt.num_blocks(rid) * bt.block_size
        if num_tokens:  # slot_mapping of every token agrees with locate
            instance, slot = bt.slot_mapping([rid], [num_tokens])
            located = [bt.locate(rid, p) for p in range(num_tokens)]
            assert list(zip(instance.tolist(), slot.tolist())) == [(i, b * bt.block_size + o) for i, b, o in located]


@pytest.mark.skipif(not core_sched.compiled_available(), reason="the compiled core is not built")
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(block_size=st.sampled_from([1, 2, 4, 16]), data=st.data())
def test_compiled_and_twin_agree_on_random_operations(block_size, data):
    compiled = core_sched.implementation("compiled").BlockTables(block_size)
    twin = core_sched.implementation("python").BlockTables(block_size)
    for rid in range(4):
        compiled.add_request(rid)
        twin.add_request(rid)
    for _ in range(data.draw(st.integers(0, 60), label="length")):
        op = draw_operation(data, twin)
        assert outcome(compiled, op) == outcome(twin, op), op
        assert state(compiled) == state(twin), op
    assert compiled.num_requests == twin.num_requests
    check_invariants(twin)
    check_invariants(compiled)
