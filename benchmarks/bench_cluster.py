"""Many instances on CPU: what borrowing buys, and what spreading a request's KV costs.

Prints JSON lines {"metric", "value", "unit"}, all measured in this run:

- ``borrow_tok_s`` / ``static_tok_s``: generated tokens/s of one mixed workload (a seeded
  trace of short and long requests arriving over time) served by ``open_runtime(num_instances=4)``
  with borrowing (``max_lend_fraction=0.5``) and by the same four instances isolated
  (``max_lend_fraction=0``: a request waits, or is preempted and recomputed, when its instance
  is full); ``borrow_vs_static`` is their ratio (issue #11: >= 1.35);

- ``planner_tok_s`` / ``on_demand_tok_s``: the same trace with borrowing, with the gManager's
  planner migrating blocks (``max_moves_per_step=8``: spreading a debtor's long request, bringing
  blocks home when there is room) and without (``max_moves_per_step=0``: loans on demand only);
  ``planner_vs_on_demand`` is their ratio (issue #12: >= 1.0, the planner never hurts);

- ``single_decode_tok_s``: decode tokens/s of one long request on one instance with room for it;
- ``spread_decode_tok_s``: the same request whose home holds a few blocks and borrows the rest
  from 3 worker processes over ZeroMQ (per layer one query per creditor, merged by
  log-sum-exp); ``spread_vs_single`` is their ratio (issue #11: >= 0.6);
- ``spread_instances``: how many instances held its blocks;
- with ``--local-peers``, ``spread_local_vs_single`` instead: the creditors are engines of this
  process (``LocalPeer``, no sockets), which isolates the spread path's own cost.

For ``spread_vs_single`` the home engine runs in this process, its steps in a worker thread
of a trio loop, as the runtime runs them; its workers get the torch threads the runtime would
give them (this host's cores shared among the four instances).

Usage: python benchmarks/bench_cluster.py [--quick] [--model smollm2|PATH] [--prompt-tokens N]
           [--only borrow|planner|spread]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import trio

sys.path.insert(0, os.path.dirname(__file__))

from _common import emit  # noqa: E402

from infinillm import SamplingParams  # noqa: E402
from infinillm.cluster import ZmqPeer  # noqa: E402
from infinillm.config import CacheConfig, SchedulerConfig  # noqa: E402
from infinillm.engine import Engine  # noqa: E402
from infinillm.loader import load_model  # noqa: E402
from infinillm.transport import DealerSocket, open_transport  # noqa: E402
from infinillm.worker import open_worker  # noqa: E402

BLOCK = 16


def make_engine(loaded, instance_id: int, num_blocks: int, cluster_blocks: int | None = None) -> Engine:
    model, tokenizer, args = loaded
    return Engine(model, args, tokenizer, cache=CacheConfig(block_size=BLOCK), scheduler=SchedulerConfig(),
                  num_blocks=num_blocks, max_model_len=args.max_position_embeddings, instance_id=instance_id,
                  cluster_blocks=cluster_blocks)


async def decode_rate(engine: Engine, prompt: list[int], new_tokens: int, watch=None) -> float:
    """Decode tokens/s of one request (first to last token: prefill excluded)."""
    engine.add_request("bench", prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    stamps = []
    while engine.has_work:
        outs = await trio.to_thread.run_sync(engine.step)
        if outs:
            stamps.append(time.perf_counter())
        if watch is not None:
            watch()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def trace(seed: int, num_requests: int, capacity: int) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt ids, max_tokens), in arrival order: mostly short requests, and every
    fourth a long one whose context grows to about 60-90% of one instance's KV capacity."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(num_requests):
        t += rng.expovariate(4.0)  # about 4 arrivals a second
        if i % 4 == 3:
            total = int(capacity * rng.uniform(0.6, 0.9))
            prompt_len = total // 2
        else:
            total = rng.randint(96, 256)
            prompt_len = total // 2
        prompt = [rng.randrange(100, 20000) for _ in range(prompt_len)]
        out.append((t, prompt, total - prompt_len))
    return out


async def serve_trace(args: argparse.Namespace, lend_fraction: float, moves: int = 0) -> tuple[float, float, int]:
    """Generated tokens/s of the trace on 4 instances, makespan, preemptions; ``moves``: the
    planner's ``max_moves_per_step`` (0: borrowing on demand only, no migration)."""
    import infinillm

    capacity = args.capacity
    requests = trace(7, args.num_requests, capacity)
    async with infinillm.open_runtime(model=args.model, device="cpu", num_instances=4, kv_capacity_tokens=capacity,
                                      max_model_len=capacity, max_lend_fraction=lend_fraction,
                                      max_num_batched_tokens=256, max_moves_per_step=moves) as rt:
        tokens = preemptions = 0
        t0 = trio.current_time()

        async def one(arrival: float, prompt: list[int], max_tokens: int) -> None:
            nonlocal tokens, preemptions
            await trio.sleep_until(t0 + arrival)
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            async for out in rt.generate({"prompt_token_ids": prompt}, params):
                pass
            tokens += len(out.outputs[0].token_ids)
            preemptions += out.metrics.num_preemptions

        async with trio.open_nursery() as nursery:
            for r in requests:
                nursery.start_soon(one, *r)
        elapsed = trio.current_time() - t0
    return tokens / elapsed, elapsed, preemptions


async def borrow_vs_static(args: argparse.Namespace) -> None:
    borrow, static = [], []
    for _ in range(args.repeat):  # interleaved, so drift on the shared machine hits both
        borrow.append(await serve_trace(args, 0.5))
        static.append(await serve_trace(args, 0.0))
    b = statistics.median(x[0] for x in borrow)
    s = statistics.median(x[0] for x in static)
    emit("borrow_tok_s", b, "tok/s", runs=[round(x[0], 2) for x in borrow], preemptions=[x[2] for x in borrow])
    emit("static_tok_s", s, "tok/s", runs=[round(x[0], 2) for x in static], preemptions=[x[2] for x in static])
    emit("borrow_vs_static", b / s, "x", requests=args.num_requests, capacity_tokens=args.capacity)


async def planner_vs_on_demand(args: argparse.Namespace) -> None:
    """The same trace with borrowing, with the gManager's planner moving blocks (8 a round)
    and without it (on-demand borrowing only)."""
    planned, on_demand = [], []
    for _ in range(args.repeat):  # interleaved
        planned.append(await serve_trace(args, 0.5, moves=8))
        on_demand.append(await serve_trace(args, 0.5, moves=0))
    p = statistics.median(x[0] for x in planned)
    o = statistics.median(x[0] for x in on_demand)
    emit("planner_tok_s", p, "tok/s", runs=[round(x[0], 2) for x in planned])
    emit("on_demand_tok_s", o, "tok/s", runs=[round(x[0], 2) for x in on_demand])
    emit("planner_vs_on_demand", p / o, "x", requests=args.num_requests, capacity_tokens=args.capacity)


async def main(args: argparse.Namespace) -> None:
    if args.only in (None, "borrow"):
        await borrow_vs_static(args)
    if args.only in (None, "planner"):
        await planner_vs_on_demand(args)
    if args.only in (None, "spread"):
        await spread_vs_single(args)


async def spread_vs_single(args: argparse.Namespace) -> None:
    loaded = load_model(args.model, progress=False)
    prompt = [(i * 37) % 20000 + 100 for i in range(args.prompt_tokens)]
    need = -(-(args.prompt_tokens + args.new_tokens) // BLOCK)
    single = make_engine(loaded, 0, need + 8)
    singles = [await decode_rate(single, prompt, args.new_tokens) for _ in range(args.repeat)]

    # The home holds a quarter; three creditors lend the rest (each lends at most half its blocks).
    home_blocks = need // 4
    lend = -(-(need - home_blocks) // 3) + 2
    spreads, held = [], set()
    if args.local_peers:  # the creditors as engines of this process: the spread path without IPC
        from infinillm.cluster import LocalPeer

        for _ in range(args.repeat):
            creditors = [make_engine(loaded, i, 2 * lend) for i in (1, 2, 3)]
            home = make_engine(loaded, 0, home_blocks, home_blocks + 3 * lend)
            home.peers = {c.instance_id: LocalPeer(c) for c in creditors}
            spreads.append(await decode_rate(home, prompt, args.new_tokens))
        s, p = statistics.median(singles), statistics.median(spreads)
        emit("single_decode_tok_s", s, "tok/s", runs=[round(x, 2) for x in singles])
        emit("spread_local_decode_tok_s", p, "tok/s", runs=[round(x, 2) for x in spreads])
        emit("spread_local_vs_single", p / s, "x", prompt_tokens=args.prompt_tokens)
        return
    async with open_transport() as tp, trio.open_nursery() as nursery:
        workers, clients = [], []
        threads = max(1, (os.cpu_count() or 1) // 4)  # as open_runtime(num_instances=4) shares the cores
        async with open_worker(args.model, 1, 2 * lend, block_size=BLOCK, threads=threads) as w1, \
                open_worker(args.model, 2, 2 * lend, block_size=BLOCK, threads=threads) as w2, \
                open_worker(args.model, 3, 2 * lend, block_size=BLOCK, threads=threads) as w3:
            workers = [w1, w2, w3]
            async with tp.open_client(w1.peer_address) as c1, tp.open_client(w2.peer_address) as c2, \
                    tp.open_client(w3.peer_address) as c3:
                clients = [c1, c2, c3]
                token = trio.lowlevel.current_trio_token()
                direct = []
                for w in workers:
                    sock = tp.socket(DealerSocket)
                    tp.connect(sock, w.peer_address)
                    direct.append(sock.zmq_socket)
                for _ in range(args.repeat):
                    home = make_engine(loaded, 0, home_blocks, home_blocks + 3 * lend)
                    home.peers = {w.instance_id: ZmqPeer(w.instance_id, c, nursery, token, lendable=lend,
                                                         direct=d if not args.through_loop else None, codec=tp.codec)
                                  for w, c, d in zip(workers, clients, direct)}

                    def watch(home=home):
                        for rid in home.requests:
                            held.update(i for i, _ in home.tables.runs(rid))

                    spreads.append(await decode_rate(home, prompt, args.new_tokens, watch))
                    for peer in home.peers.values():
                        await peer.wait_released()
        nursery.cancel_scope.cancel()
    s, p = statistics.median(singles), statistics.median(spreads)
    emit("single_decode_tok_s", s, "tok/s", runs=[round(x, 2) for x in singles])
    emit("spread_decode_tok_s", p, "tok/s", runs=[round(x, 2) for x in spreads])
    emit("spread_vs_single", p / s, "x", prompt_tokens=args.prompt_tokens)
    emit("spread_instances", len(held), "instances")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--through-loop", action="store_true",
                        help="send attention queries through the trio loop instead of the step's own socket")
    parser.add_argument("--only", choices=("borrow", "planner", "spread"), default=None)
    parser.add_argument("--local-peers", action="store_true",
                        help="spread over creditor engines of this process (LocalPeer: no sockets), to see the "
                             "spread path's own cost")
    parser.add_argument("--capacity", type=int, default=1024, help="KV tokens of each instance (borrow_vs_static)")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None, help="runs of each (medians); default 3, 1 with --quick")
    ns = parser.parse_args()
    ns.new_tokens = 16 if ns.quick else 48
    ns.repeat = ns.repeat or (1 if ns.quick else 3)
    if ns.num_requests is None:
        ns.num_requests = 16 if ns.quick else 32
    os.environ.setdefault("TQDM_DISABLE", "1")
    trio.run(main, ns)
