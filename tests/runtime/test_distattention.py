"""DistAttention across engines: a request's KV spread over several instances gives the tokens
and log-probabilities of the same request on one instance with room for it.

The engines live in one process and reach each other through ``LocalPeer`` (every query and
result is encoded and decoded by the codec); the test drives the home engine's steps. The home
has a few blocks and borrows the rest from its peers (reserve, commit, write), so prompts,
prefill chunks, decode tails and the new tokens' k, v land on creditors.
"""

from __future__ import annotations


import pytest
import torch

from infinillm import SamplingParams, ValidationError
from infinillm.cluster import LocalPeer
from infinillm.config import CacheConfig, SchedulerConfig
from infinillm.engine import Engine
from infinillm.loader import load_model
from infinillm.testing import assert_engines_idle, assert_same_outputs, make_tiny_model
from infinillm.transport import AttentionQuery

BLOCK = 16


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tmp_path_factory):
    """(model, tokenizer, args): a tiny Llama, and a tiny Mistral whose window (24) is shorter
    than the prompts."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "mistral":
        make_tiny_model(folder, architecture="mistral", sliding_window=24)
    else:
        make_tiny_model(folder)
    return load_model(folder, progress=False)


def make_engine(tiny, instance_id: int, num_blocks: int, *, cluster_blocks: int | None = None,
                max_num_batched_tokens: int = 2048, max_num_seqs: int = 64) -> Engine:
    model, tokenizer, args = tiny
    return Engine(model, args, tokenizer, cache=CacheConfig(block_size=BLOCK),
                  scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs),
                  num_blocks=num_blocks, max_model_len=1024, instance_id=instance_id, cluster_blocks=cluster_blocks)


def make_cluster(tiny, home_blocks: int, creditor_blocks: list[int], **options) -> tuple[Engine, list[Engine]]:
    """A home engine (instance 0) whose peers are creditors 1..n, each lending up to half its
    blocks (``max_lend_fraction`` 0.5)."""
    creditors = [make_engine(tiny, i + 1, n) for i, n in enumerate(creditor_blocks)]
    lendable = sum(c.pool.lendable for c in creditors)
    home = make_engine(tiny, 0, home_blocks, cluster_blocks=home_blocks + lendable, **options)
    home.peers = {c.instance_id: LocalPeer(c) for c in creditors}
    return home, creditors


def prompts_of(lengths: list[int]) -> list[list[int]]:
    return [[(i * 7 + j * 13) % 300 + 3 for j in range(n)] for i, n in enumerate(lengths)]


def run(engine: Engine, prompts, params: SamplingParams, watch=None) -> dict[str, tuple]:
    """Every request to its end; (token ids, logprobs) by request id. ``watch()`` after each step."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    finals = {}
    while engine.has_work:
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                finals[out.request_id] = (tuple(c.token_ids), c.logprobs)
        if watch is not None:
            watch()
    return finals


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)


def test_spread_requests_equal_one_instance_with_room(tiny):
    prompts = prompts_of([150, 40, 230, 9])  # long and short together: spread and all-at-home rows
    want = run(make_engine(tiny, 0, 200), prompts, GREEDY)
    home, creditors = make_cluster(tiny, 6, [24, 24, 24], max_num_batched_tokens=48)
    held = {1: 0, 2: 0, 3: 0}

    def watch():
        for c in creditors:
            held[c.instance_id] = max(held[c.instance_id], c.pool.num_lent)
        # the home's borrowed blocks are exactly what the creditors lend it
        assert home.pool.num_borrowed == sum(c.pool.num_lent for c in creditors)

    got = run(home, prompts, GREEDY, watch)
    assert_same_outputs(got, want)
    assert all(n > 0 for n in held.values()), held  # every creditor held blocks at some point
    assert home.num_loans > 0
    assert_engines_idle(home, *creditors)


def test_a_decode_tail_on_a_creditor_writes_its_new_tokens_there(tiny):
    # The home has 2 blocks: the prompt's first chunk is admitted here, everything after is
    # borrowed, so decode tails (and their k, v) live on the creditor.
    prompts = prompts_of([40])
    want = run(make_engine(tiny, 0, 64), prompts, GREEDY)
    home, (creditor,) = make_cluster(tiny, 2, [16], max_num_batched_tokens=16)
    tails_remote = []

    def watch():
        for rid in list(home.requests):
            instance, _block, _offset = home.tables.locate(rid, home.tables.num_tokens(rid) - 1)
            tails_remote.append(instance == creditor.instance_id)

    got = run(home, prompts, GREEDY, watch)
    assert_same_outputs(got, want)
    assert any(tails_remote)
    assert_engines_idle(home, creditor)


def test_aborted_and_preempted_requests_free_their_blocks_on_every_instance(tiny):
    # Four requests growing to 100 tokens (7 blocks) each: 28 blocks wanted, 8 at home and 8
    # lendable by the creditors (half of 8 each), so requests borrow and then are preempted.
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    home, creditors = make_cluster(tiny, 8, [8, 8], max_num_batched_tokens=32)
    for i, p in enumerate(prompts_of([40, 40, 40, 40])):
        home.add_request(f"r{i}", p, params)
    while sum(c.pool.num_lent for c in creditors) < 2:
        home.step()
    spread = [rid for rid in home.requests if home.pool.borrowed_by(rid)]
    home.abort(spread[0])  # a request with blocks on a creditor
    while home.has_work:
        home.step()
    assert home.planner.statistics().num_preemptions > 0  # memory was short: some were recomputed
    assert_engines_idle(home, *creditors)


def test_a_creditor_refuses_a_query_naming_blocks_it_does_not_have(tiny):
    creditor = make_engine(tiny, 1, 4)
    _, _, args = tiny
    query = AttentionQuery.build(
        0, (7,), torch.zeros(1, args.num_heads, args.head_dim), None, torch.tensor([3], dtype=torch.int32),
        [[9]], [[0]], [[4]],
    )
    with pytest.raises(ValidationError, match="AttentionQuery.blocks=9 is invalid: must be block ids below 4"):
        creditor.serve_attention(query)


def test_a_creditor_that_fails_ends_the_requests_of_that_step_and_frees_their_blocks(tiny):
    # The home borrows for its long request; then the creditor's attention breaks. The step
    # that asked it ends its requests with "error" (blocks freed everywhere); a request that
    # was waiting goes on alone afterwards.
    home, (creditor,) = make_cluster(tiny, 4, [16], max_num_batched_tokens=32, max_num_seqs=1)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    long_rid = home.add_request("long", prompts_of([90])[0], params)
    home.add_request("later", prompts_of([20])[0], params)
    while not home.pool.borrowed_by(long_rid):
        home.step()
    peer = home.peers[creditor.instance_id]

    def broken(query):
        raise RuntimeError("creditor fault")

    peer.start_attention = broken
    outs = home.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in outs] == [("long", "error")]
    assert "creditor fault" in outs[0].error
    assert creditor.pool.num_lent == 0  # its blocks were released on the creditor too
    del peer.start_attention  # mended: the waiting request runs, all at home
    finals = []
    while home.has_work:
        finals += [o for o in home.step() if o.finished]
    assert [(o.request_id, o.outputs[0].finish_reason) for o in finals] == [("later", "length")]
    assert_engines_idle(home, creditor)


def test_a_reservation_never_committed_expires_and_its_blocks_are_lent_again(tiny):
    creditor = make_engine(tiny, 1, 8)  # lends at most 4
    assert creditor.lend_reserve(0, 4, ttl_s=0.0) is not None  # the borrower then goes silent
    assert creditor.pool.num_reserved == 4
    again = creditor.lend_reserve(2, 4, ttl_s=60.0)  # past the first one's ttl: it is given back
    assert again is not None and creditor.pool.num_reserved == 4
    assert creditor.lend_commit(again, 2 << 40 | 1) and creditor.pool.num_lent == 4


def test_requests_all_at_home_keep_the_fused_path_in_a_step_with_spread_ones(tiny, monkeypatch):
    import infinillm.attention as attention

    prompts = prompts_of([150, 9, 230, 12])  # two spread, two that fit at home
    want = run(make_engine(tiny, 0, 200), prompts, GREEDY)
    home, creditors = make_cluster(tiny, 6, [24, 24, 24], max_num_batched_tokens=48)
    fused_rows_in_spread_steps = []
    real = attention.decode_attention_sdpa

    def counted(q, plan, *args):
        fused_rows_in_spread_steps.append(q.shape[0])
        return real(q, plan, *args)

    real_init = attention.DistAttentionBackend.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.remote:  # only count the fused path where some request of the step is spread
            self._local_plans = {w: p for w, p in self._local_plans.items()}
            monkeypatch.setattr(attention, "decode_attention_sdpa", counted)
        else:
            monkeypatch.setattr(attention, "decode_attention_sdpa", real)

    monkeypatch.setattr(attention.DistAttentionBackend, "__init__", init)
    got = run(home, prompts, GREEDY)
    assert_same_outputs(got, want)
    assert fused_rows_in_spread_steps, "no decode row of a home-only request took the fused path beside spread rows"
    assert_engines_idle(home, *creditors)


def test_blocks_migrated_mid_generation_leave_the_tokens_exactly_as_without_moves(tiny):
    """Migration between two steps (``Engine.queue_move``): blocks of running requests go out
    to creditors (their k and v copied, the table switched, the home's blocks freed), later
    come home again; greedy tokens and logprobs equal a run without moves, and afterwards every
    pool is empty."""
    prompts = prompts_of([120, 70])
    want = run(make_engine(tiny, 0, 64), prompts, GREEDY)
    home, creditors = make_cluster(tiny, 40, [16, 16])
    seen = []
    steps = [0]

    def watch():
        steps[0] += 1
        rids = sorted(home.requests)
        if steps[0] == 4:  # out: 3 blocks of the first to 1, 2 of the second to 2
            home.queue_move(rids[0], 3, 0, 1)
            home.queue_move(rids[1], 2, 0, 2)
        if steps[0] == 10:  # home again, one part of them
            home.queue_move(rids[0], 2, 1, 0)
        seen.append({home.requests[r].request_id: home.placement(r) for r in rids})

    got = run(home, prompts, GREEDY, watch)
    assert_same_outputs(got, want)
    assert home.num_blocks_moved == 3 + 2 + 2
    assert any(p.get("r0", {}).get(1) == 3 and p.get("r1", {}).get(2) == 2 for p in seen)
    assert any(p.get("r0", {}).get(1) == 1 for p in seen)
    assert_engines_idle(home, *creditors)


def test_a_creditor_refuses_a_transfer_into_blocks_it_does_not_lend_the_request(tiny):
    home, (creditor,) = make_cluster(tiny, 8, [8])
    kv = torch.zeros(creditor.args.num_layers, 2, 1, BLOCK, creditor.args.num_kv_heads, creditor.args.head_dim)
    with pytest.raises(ValidationError, match="block_ids=3 is invalid: must be blocks this instance lends request 7"):
        creditor.write_lent_blocks(7, [3], kv)
    with pytest.raises(ValidationError, match="block_ids=99 is invalid"):
        creditor.read_lent_blocks(7, [99])


def test_a_creditor_that_fails_a_loan_is_skipped_and_the_step_goes_on(tiny):
    """A lender that dies while it is asked for a loan (its connection closes before its death
    is known: a TransportError, not InstanceDeadError) is skipped; the request borrows from the
    others. Found by an adversarial review: the error left ``step`` and failed every request."""
    from infinillm import TransportError

    prompts = prompts_of([120])
    want = run(make_engine(tiny, 0, 64), prompts, GREEDY)
    home, creditors = make_cluster(tiny, 6, [16, 16])
    dying = home.peers[1]

    def gone(*_):
        raise TransportError("peer ipc:///x/peer1 has gone: its connection closed with the request pending")

    dying.reserve = gone
    got = run(home, prompts, GREEDY)
    assert_same_outputs(got, want)
    assert creditors[0].pool.num_lent == 0  # (nothing was ever lent by the one that failed)
    assert_engines_idle(home, *creditors)
