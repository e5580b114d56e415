"""The throughput model and the greedy planner (gManager), against both implementations.

Most planner tests use a flat model whose arithmetic is exact in binary: f(batch) = 1024
tokens/s, g(ctx) = 65536 context tokens/s, 1 layer, 16-token blocks. In units of
u = 1/4096 s a batch of b costs 4b u of dense work and n blocks of context cost n u of
attention, so an instance decodes ``4096 * b / (4b + n)`` tokens/s.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinillm import SchedulerError, ValidationError
from infinillm.core_sched import PoolCounters, implementation
from infinillm.core_sched.types import Move


def flat_model(core):
    return core.ThroughputModel([1], [1024.0], [1], [65536.0], num_layers=1, block_size=16)


def add_instance(ledger, i, capacity, free, *, max_lent=None, lent=0, host=0, batch=0, waiting=0, wblocks=0):
    ledger.register_instance(i, capacity, capacity if max_lent is None else max_lent, host)
    ledger.apply_snapshot(i, PoolCounters(1, capacity, free, capacity - free, lent, 0, 0))
    ledger.set_load(i, batch, waiting, wblocks)


def spread(rid, n, src, dst):
    return Move(rid, n, src, dst, "spread")


def home(rid, n, src, dst):
    return Move(rid, n, src, dst, "home")


# ---- the throughput model ------------------------------------------------------------------------


def table_model(core):
    return core.ThroughputModel(
        dense_batch=[1, 8, 64], dense_tokens_per_s=[128, 1024, 4096],
        attn_ctx=[1024, 4096], attn_tokens_per_s=[2**20, 2**21], num_layers=2, block_size=16,
    )  # fmt: skip


def test_tables_interpolate_linearly_and_clamp(core):
    m = table_model(core)
    assert m.dense_throughput(4) == 512.0  # 128 + (1024 - 128) * (4 - 1) / (8 - 1)
    assert m.dense_throughput(36) == 2560.0  # 1024 + 3072 * 28 / 56
    assert m.dense_throughput(0.5) == 128.0 and m.dense_throughput(1000) == 4096.0  # clamped
    assert m.attention_throughput(2560) == 1.5 * 2**20  # half way from 2**20 to 2**21
    assert m.attention_throughput(1) == 2**20 and m.attention_throughput(10**6) == 2**21
    assert (m.num_layers, m.block_size) == (2, 16)


def test_step_time_and_tokens_per_s(core):
    m = table_model(core)
    # T_layer = 4 / f(4) + 4096 / g(4096) + 512 / g(512) = 2**-7 + 2**-9 + 2**-11 = 21 / 2048 s
    assert m.layer_time(4, [4096, 512]) == 21 / 2048
    assert m.step_time(4, [4096, 512]) == 42 / 2048  # 2 layers
    assert m.tokens_per_s(4, [4096, 512]) == 4 / (42 / 2048)  # 195.04... tokens/s
    assert m.tokens_per_s(0, [4096]) == 0.0 and m.step_time(0, []) == 0.0
    with pytest.raises(ValidationError, match=r"batch=-1 is invalid: must be in \[0, 2147483647\]"):
        m.step_time(-1, [])
    with pytest.raises(ValidationError, match=r"contexts=\[5, -1\] is invalid: must all be finite and >= 0"):
        m.tokens_per_s(1, [5, -1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dense_batch=[]), r"dense_batch=\[\] is invalid: must have at least 1 point"),
        (dict(dense_batch=[1, 8, 8]), r"dense_batch=\[1, 8, 8\] is invalid: must be strictly increasing"),
        (dict(dense_tokens_per_s=[1, 2]), r"dense_tokens_per_s=\[1, 2\] is invalid: must have as many points as "
                                          r"dense_batch \(3\)"),
        (dict(attn_tokens_per_s=[1.0, 0.0]), r"attn_tokens_per_s=\[1.0, 0.0\] is invalid: must be positive and finite"),
        (dict(attn_ctx=[1, float("nan")]), r"attn_ctx=\[1, nan\] is invalid: must be positive and finite"),
        (dict(attn_ctx=["a", 2]), r"attn_ctx=\['a', 2\] is invalid: must be numbers"),
        (dict(num_layers=0), r"num_layers=0 is invalid: must be in \[1, 2147483647\]"),
        (dict(block_size=0), r"block_size=0 is invalid: must be in \[1, 2147483647\]"),
    ],
)
def test_model_tables_are_validated(core, kwargs, message):
    args = dict(dense_batch=[1, 8, 64], dense_tokens_per_s=[128, 1024, 4096], attn_ctx=[1024, 4096],
                attn_tokens_per_s=[2**20, 2**21], num_layers=2, block_size=16)
    args.update(kwargs)
    with pytest.raises(ValidationError, match=message):
        core.ThroughputModel(**args)


def test_planner_arguments_are_validated(core):
    m = flat_model(core)
    with pytest.raises(ValidationError, match=r"max_moves_per_step=-1 is invalid: must be in \[0, 9223372036854775807\]"):
        core.Planner(m, -1)
    with pytest.raises(ValidationError, match=r"home_headroom=-1 is invalid: must be in \[0, 2147483647\]"):
        core.Planner(m, 4, home_headroom=-1)
    with pytest.raises(TypeError, match="model must be a ThroughputModel"):
        core.Planner(object(), 4)
    with pytest.raises(TypeError, match="needs a DebtLedger of the same implementation"):
        core.Planner(m, 4).plan(object())
    p = core.Planner(m, 4, home_headroom=2)
    assert (p.max_moves_per_step, p.home_headroom, p.model) == (4, 2, m)


# ---- spread ----------------------------------------------------------------------------------------


def debtor_with_two_requests(ledger):
    """Instance 0: batch 2, one request waiting for 4 blocks, 1 free: short by 3.

    Requests 10 (24 blocks) and 11 (15 blocks), both at home. Before any move it decodes
    4096 * 2 / (8 + 39) = 174.3 tokens/s.
    """
    add_instance(ledger, 0, 40, 1, batch=2, waiting=1, wblocks=4)
    ledger.record_blocks(10, 0, 0, 24)
    ledger.record_blocks(11, 0, 0, 15)


def test_an_idle_creditor_takes_as_much_as_the_rate_limit_allows(core):
    ledger = core.DebtLedger()
    debtor_with_two_requests(ledger)
    add_instance(ledger, 1, 64, 64, max_lent=32)
    # Moving k blocks of request 10 (the longest): with k >= 3 the waiting request fits
    # ((1 + k) // 4 >= 1), batch 3, local attention 15 + (24 - k) + 4 = 43 - k:
    # 4096 * 3 / (12 + 43 - k) rises with k; the idle creditor decodes 0 either way. The
    # remote k u hides behind 43 - k u for every k <= 8: the rate limit (8) decides.
    assert core.Planner(flat_model(core), 8).plan(ledger) == [spread(10, 8, 0, 1)]


def test_a_busy_creditor_takes_only_what_pays_for_itself(core):
    ledger = core.DebtLedger()
    debtor_with_two_requests(ledger)
    add_instance(ledger, 1, 64, 64, max_lent=32, batch=16)
    # Pair tokens/s = debtor + creditor (creditor: 4096 * 16 / (64 + k)):
    #   k=0: 8192/47 + 65536/64 = 174.30 + 1024.00 = 1198.30
    #   k=1: 8192/46 + 65536/65 = 178.09 + 1008.25 = 1186.34   (the waiting request does not fit)
    #   k=2: 8192/45 + 65536/66 = 182.04 +  992.97 = 1175.01
    #   k=3: 12288/52 + 65536/67 = 236.31 + 978.15 = 1214.46  <- best: batch 3
    #   k=4: 12288/51 + 65536/68 = 240.94 + 963.76 = 1204.70   ... falls from here
    assert core.Planner(flat_model(core), 8).plan(ledger) == [spread(10, 3, 0, 1)]


def test_remote_attention_must_hide_behind_local_attention(core):
    ledger = core.DebtLedger()
    add_instance(ledger, 0, 14, 0, batch=2, waiting=1, wblocks=16)
    ledger.record_blocks(10, 0, 0, 12)
    ledger.record_blocks(11, 0, 0, 2)
    add_instance(ledger, 1, 64, 64)
    # k <= min(16 budget, 64 lendable, 12 - 1) = 11; the waiting request needs 16, never fits.
    # Local after: 2 + (12 - k) u, remote: k u; hidden while k <= 14 - k, so k <= 7, though
    # the debtor's tokens/s (8192 / (8 + 14 - k)) would keep rising up to k = 11.
    assert core.Planner(flat_model(core), 16).plan(ledger) == [spread(10, 7, 0, 1)]


def test_no_move_when_no_k_raises_the_pair_throughput(core):
    ledger = core.DebtLedger()
    add_instance(ledger, 0, 40, 0, batch=2, waiting=1, wblocks=64)
    ledger.record_blocks(10, 0, 0, 40)
    add_instance(ledger, 1, 64, 64, batch=16)
    # k=1: the debtor gains 8192/47 - 8192/48 = 3.63, the creditor loses 1024 - 65536/65 = 15.75;
    # every k up to 4 loses more than it gains (nothing waiting fits in 4 blocks).
    assert core.Planner(flat_model(core), 4).plan(ledger) == []


def test_a_request_keeps_one_block_at_home_and_lent_in_requests_stay(core):
    ledger = core.DebtLedger()
    add_instance(ledger, 0, 8, 0, batch=2, waiting=1, wblocks=4)
    ledger.record_blocks(10, 0, 0, 1)  # the longest own request has 1 block: nothing to move
    add_instance(ledger, 2, 64, 64)
    ledger.record_blocks(20, 2, 0, 7)  # instance 2's request lent by 0: not 0's to move
    # (a headroom of 64 keeps instance 2, idle with 64 free, from bringing request 20 home)
    assert core.Planner(flat_model(core), 8, home_headroom=64).plan(ledger) == []


def test_debtors_go_most_short_first(core):
    ledger = core.DebtLedger()
    add_instance(ledger, 0, 40, 1, batch=2, waiting=1, wblocks=4)  # short 3
    ledger.record_blocks(10, 0, 0, 24)
    add_instance(ledger, 1, 40, 1, batch=2, waiting=1, wblocks=6)  # short 5: first
    ledger.record_blocks(11, 1, 1, 30)
    add_instance(ledger, 2, 128, 128)
    # Debtor 1: with k >= 5 its waiting request fits ((1 + k) // 6 = 1) and 4096 * 3 /
    # (12 + 30 - k + 6) rises with k; hidden while k <= 36 - k. It takes the whole budget, 10,
    # and debtor 0 gets nothing.
    assert core.Planner(flat_model(core), 10).plan(ledger) == [spread(11, 10, 1, 2)]


def test_the_rate_limit_is_shared_across_debtors(core):
    ledger = core.DebtLedger()
    add_instance(ledger, 0, 40, 1, batch=2, waiting=1, wblocks=4)  # short 3
    ledger.record_blocks(10, 0, 0, 24)
    add_instance(ledger, 1, 40, 3, batch=2, waiting=1, wblocks=8)  # short 5: first
    ledger.record_blocks(11, 1, 1, 30)
    add_instance(ledger, 2, 128, 128, max_lent=6)
    add_instance(ledger, 3, 128, 100)
    # Debtor 1 (short 5) first, to creditor 2 (free 128 > 100), which lends at most 6: with
    # k = 5 its waiting request fits ((3 + 5) // 8 = 1), and tokens/s rise up to k = 6.
    # Creditor 2 is then out of lendable blocks; debtor 0 gets creditor 3 and the rest of the
    # budget, 10 - 6 = 4 (k >= 3 admits its waiting request; it rises to k = 4).
    assert core.Planner(flat_model(core), 10).plan(ledger) == [spread(11, 6, 1, 2), spread(10, 4, 0, 3)]


def test_the_creditor_ranking_follows_the_moves_of_the_plan(core):
    ledger = core.DebtLedger()
    for d, rid in ((0, 10), (1, 11)):
        add_instance(ledger, d, 8, 1, batch=2, waiting=1, wblocks=4)
        ledger.record_blocks(rid, d, d, 5)
    add_instance(ledger, 2, 64, 30)
    add_instance(ledger, 3, 64, 29)
    # Both short by 3: debtor 0 first (id). k <= 5 - 1 = 4, creditor idle:
    #   k=1: 8192 / (8 + 4) = 682.7     k=2: 8192 / (8 + 3) = 744.7   <- best
    #   k=3: 12288 / (12 + 2 + 4) = 682.7 (the waiting request fits)   k=4: 12288 / 17 = 722.8
    # Debtor 0 takes 2 from instance 2 (30 free), which is left with 28 < 29: debtor 1 goes to 3.
    assert core.Planner(flat_model(core), 8).plan(ledger) == [spread(10, 2, 0, 2), spread(11, 2, 1, 3)]


def test_among_equal_creditors_the_debtors_host_wins(core):
    ledger = core.DebtLedger()
    add_instance(ledger, 5, 40, 1, host=1, batch=2, waiting=1, wblocks=4)
    ledger.record_blocks(10, 5, 5, 24)
    add_instance(ledger, 1, 64, 64)
    add_instance(ledger, 2, 64, 64, host=1)
    add_instance(ledger, 3, 64, 64, host=1)
    add_instance(ledger, 0, 64, 64, batch=1)  # more load: last
    assert core.Planner(flat_model(core), 4).plan(ledger) == [spread(10, 4, 5, 2)]


# ---- bring home ----------------------------------------------------------------------------------


def test_an_idle_home_brings_its_blocks_back_most_borrowed_first(core):
    ledger = core.DebtLedger()
    add_instance(ledger, 0, 32, 10)  # idle, 10 free
    for i in (1, 2):
        add_instance(ledger, i, 32, 20)
    ledger.record_blocks(10, 0, 0, 5)
    ledger.record_blocks(10, 0, 1, 3)
    ledger.record_blocks(10, 0, 2, 4)  # 7 away
    ledger.record_blocks(11, 0, 0, 2)
    ledger.record_blocks(11, 0, 1, 2)  # 2 away
    # Room: 10 free - 4 headroom = 6. Request 10 first (7 away): 4 from instance 2 (its biggest
    # holder), then 2 of 3 from instance 1; the room is used up, request 11 waits.
    assert core.Planner(flat_model(core), 100, home_headroom=4).plan(ledger) == [
        home(10, 4, 2, 0), home(10, 2, 1, 0)
    ]
    # The rate limit binds first with 5.
    assert core.Planner(flat_model(core), 5, home_headroom=4).plan(ledger) == [home(10, 4, 2, 0), home(10, 1, 1, 0)]
    # Nothing when the home has queued work, or no room beyond its headroom.
    assert core.Planner(flat_model(core), 100, home_headroom=10).plan(ledger) == []
    ledger.set_load(0, 0, 1, 1)
    assert core.Planner(flat_model(core), 100).plan(ledger) == []


def test_spreads_come_before_homes_and_share_the_budget(core):
    ledger = core.DebtLedger()
    debtor_with_two_requests(ledger)
    add_instance(ledger, 1, 64, 64, max_lent=6)
    add_instance(ledger, 2, 32, 20, max_lent=0)  # idle, lends nothing, 5 blocks away on 1
    ledger.record_blocks(30, 2, 2, 1)
    ledger.record_blocks(30, 2, 1, 5)
    # The spread takes what instance 1 may lend (6; tokens/s rise with k as in the idle-creditor
    # test), the home move the rest of the budget: 10 - 6 = 4 of request 30's 5 blocks.
    assert core.Planner(flat_model(core), 10).plan(ledger) == [spread(10, 6, 0, 1), home(30, 4, 1, 2)]


def test_plan_is_a_query(core):
    ledger = core.DebtLedger()
    debtor_with_two_requests(ledger)
    add_instance(ledger, 1, 64, 64, max_lent=32)
    planner = core.Planner(flat_model(core), 8)
    before = (ledger.instance(0), ledger.instance(1), ledger.placement(10))
    assert planner.plan(ledger) == planner.plan(ledger) == [spread(10, 8, 0, 1)]
    assert (ledger.instance(0), ledger.instance(1), ledger.placement(10)) == before
    assert core.Planner(flat_model(core), 0).plan(ledger) == []
    assert planner.plan(core.DebtLedger()) == []


# ---- compiled == twin on random clusters -----------------------------------------------------------


@st.composite
def tables(draw, max_points=4):
    n = draw(st.integers(1, max_points))
    xs = sorted(draw(st.sets(st.integers(1, 4096), min_size=n, max_size=n)))
    ys = draw(st.lists(st.floats(1.0, 1e7, allow_nan=False), min_size=n, max_size=n))
    return xs, ys


@st.composite
def clusters(draw):
    n = draw(st.integers(1, 10))
    instances = []
    for i in range(n):
        capacity = draw(st.integers(1, 64))
        reserved = draw(st.integers(0, capacity // 4))
        used = draw(st.integers(0, capacity - reserved))
        lent = draw(st.integers(0, used))
        instances.append(dict(
            id=i * 3, capacity=capacity, max_lent=draw(st.integers(0, capacity)), host=draw(st.integers(0, 2)),
            counters=PoolCounters(1, capacity, capacity - used - reserved, used, lent, reserved, 0),
            load=(draw(st.integers(0, 8)), draw(st.sampled_from([0, 0, 1, 3])), draw(st.integers(0, 24))),
        ))  # fmt: skip
    records = []  # each request has blocks at home (its tail) and maybe on up to 2 others
    for rid in draw(st.lists(st.integers(0, 60), unique=True, max_size=40)):
        home = draw(st.sampled_from(instances))["id"]
        records.append((rid, home, home, draw(st.integers(1, 24))))
        for inst in draw(st.lists(st.sampled_from(instances), max_size=2)):
            records.append((rid, home, inst["id"], draw(st.integers(1, 8))))
    dense, attn = draw(tables()), draw(tables())
    model = dict(dense_batch=dense[0], dense_tokens_per_s=dense[1], attn_ctx=attn[0], attn_tokens_per_s=attn[1],
                 num_layers=draw(st.integers(1, 80)), block_size=draw(st.sampled_from([1, 16, 32])))
    return instances, records, model, draw(st.integers(1, 40)), draw(st.integers(0, 8))


def build(impl, instances, records):
    ledger = impl.DebtLedger()
    for x in instances:
        ledger.register_instance(x["id"], x["capacity"], x["max_lent"], x["host"])
        ledger.apply_snapshot(x["id"], x["counters"])
        ledger.set_load(x["id"], *x["load"])
    for record in records:
        ledger.record_blocks(*record)
    return ledger


@settings(max_examples=300)
@given(cluster=clusters())
def test_compiled_and_twin_plan_alike_on_random_clusters(cluster):
    instances, records, model, budget, headroom = cluster
    plans, models = [], []
    for name in ("compiled", "python"):
        impl = implementation(name)
        ledger = build(impl, instances, records)
        m = impl.ThroughputModel(**model)
        models.append([m.tokens_per_s(b, [c * m.block_size for c in range(b)]) for b in (0, 1, 5, 40)])
        plans.append(impl.Planner(m, budget, home_headroom=headroom).plan(ledger))
    assert plans[0] == plans[1]
    assert models[0] == models[1]  # bit for bit

    # What any plan must respect.
    ledger = build(implementation("python"), instances, records)
    assert sum(m.num_blocks for m in plans[0]) <= budget
    for m in plans[0]:
        assert m.num_blocks >= 1 and m.src != m.dst
        if m.kind == "spread":
            src = ledger.instance(m.src)
            assert ledger.home_of(m.request_id) == m.src and ledger.placement(m.request_id)[m.src] > m.num_blocks
            assert src.num_waiting > 0 and src.free < src.waiting_blocks
            assert ledger.instance(m.dst).num_waiting == 0 and m.num_blocks <= ledger.instance(m.dst).lendable
        else:
            assert ledger.home_of(m.request_id) == m.dst and m.num_blocks <= ledger.placement(m.request_id)[m.src]
            assert ledger.instance(m.dst).free - headroom >= m.num_blocks


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cluster=clusters())
def test_record_and_forget_keep_the_indexes_consistent(core, cluster):
    instances, records, _, _, _ = cluster
    ledger = build(core, instances, records)
    ids = [x["id"] for x in instances]
    placements = {}
    for rid, home_id, inst, n in records:
        placements.setdefault(rid, {}).setdefault(inst, 0)
        placements[rid][inst] += n
    for i in ids:
        owed = {}
        for rid, where in placements.items():
            if ledger.home_of(rid) == i:
                for inst, n in where.items():
                    if inst != i:
                        owed[inst] = owed.get(inst, 0) + n
        assert ledger.creditors_of(i) == dict(sorted(owed.items()))
        assert ledger.instance(i).away_blocks == sum(owed.values())
    for rid in list(placements)[::2]:
        assert ledger.forget_request(rid) == sum(placements.pop(rid).values())
    for i in ids:
        assert ledger.requests_on(i) == {rid: where[i] for rid, where in sorted(placements.items()) if i in where}
    with pytest.raises(SchedulerError, match="unknown request -5"):
        ledger.home_of(-5)
