"""Many instances on CPU: what spreading a request's KV over worker processes costs.

Prints JSON lines {"metric", "value", "unit"}, all measured in this run:

- ``single_decode_tok_s``: decode tokens/s of one long request on one instance with room for it;
- ``spread_decode_tok_s``: the same request whose home holds a few blocks and borrows the rest
  from 3 worker processes over ZeroMQ (per layer one query per creditor, merged by
  log-sum-exp); ``spread_vs_single`` is their ratio (issue #11: >= 0.6);
- ``spread_instances``: how many instances held its blocks.

The home engine runs in this process, its steps in a worker thread of a trio loop, as the
runtime runs them. ``borrow_vs_static`` (the mixed-length workload through the runtime) comes
with ``open_runtime(num_instances > 1)``.

Usage: python benchmarks/bench_cluster.py [--quick] [--model smollm2|PATH] [--prompt-tokens N]
"""

from __future__ import annotations

import argparse
import os
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


async def main(args: argparse.Namespace) -> None:
    loaded = load_model(args.model, progress=False)
    prompt = [(i * 37) % 20000 + 100 for i in range(args.prompt_tokens)]
    need = -(-(args.prompt_tokens + args.new_tokens) // BLOCK)
    single = make_engine(loaded, 0, need + 8)
    singles = [await decode_rate(single, prompt, args.new_tokens) for _ in range(args.repeat)]

    # The home holds a quarter; three creditors lend the rest (each lends at most half its blocks).
    home_blocks = need // 4
    lend = -(-(need - home_blocks) // 3) + 2
    spreads, held = [], set()
    async with open_transport() as tp, trio.open_nursery() as nursery:
        workers, clients = [], []
        async with open_worker(args.model, 1, 2 * lend, block_size=BLOCK) as w1, \
                open_worker(args.model, 2, 2 * lend, block_size=BLOCK) as w2, \
                open_worker(args.model, 3, 2 * lend, block_size=BLOCK) as w3:
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
    ns = parser.parse_args()
    ns.new_tokens = 16 if ns.quick else 48
    ns.repeat = 1 if ns.quick else 3
    os.environ.setdefault("TQDM_DISABLE", "1")
    trio.run(main, ns)
