"""Scheduler core: the compiled (Cython over C++) core against its pure-Python twin.

Prints one JSON line per figure ({"metric", "value", "unit"}), each measured in this run:

- ``alloc_free_*``: allocate then free the KV blocks of a 64-request batch (32 blocks each,
  512-token contexts at block_size 16) through the batch calls; ``alloc_free_speedup`` is
  twin time over compiled time.
- ``block_table_*``: the per-step conversion of that batch's block tables into the int32
  arrays the attention kernel reads; ``block_table_speedup`` likewise.
- ``planner_ms_{32,256,1024}``: median decision time of the compiled planner for that many
  instances with 16 requests each (and the twin's at 32 and 256 for comparison).

Usage: python benchmarks/bench_core_sched.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import emit, median_seconds  # noqa: E402

from infinillm import core_sched  # noqa: E402
from infinillm.core_sched import PoolCounters  # noqa: E402

BATCH = 64
BLOCKS_PER_REQUEST = 32
BLOCK_SIZE = 16


def bench_alloc_free(impl, repeat: int) -> float:
    pool = impl.BlockPool(0, BATCH * BLOCKS_PER_REQUEST * 2)
    rids = list(range(BATCH))
    counts = [BLOCKS_PER_REQUEST] * BATCH

    def step():
        pool.allocate_batch(rids, counts)
        pool.free_requests(rids)

    return median_seconds(step, repeat=repeat)


def bench_block_tables(impl, repeat: int) -> float:
    """One decode step's ``batch_tables`` for the batch on its home instance 0: each request's
    32 blocks in two runs, 24 at home and 8 lent by instance 1, the tail block partly filled."""
    tables = impl.BlockTables(BLOCK_SIZE)
    rids = list(range(BATCH))
    for rid in rids:
        first = rid * BLOCKS_PER_REQUEST
        tables.add_request(rid)
        tables.append_blocks(rid, 0, range(first, first + 24))
        tables.append_blocks(rid, 1, range(first + 24, first + BLOCKS_PER_REQUEST))
        tables.append_tokens(rid, BLOCKS_PER_REQUEST * BLOCK_SIZE - 5)
    return median_seconds(lambda: tables.batch_tables(rids, 0), repeat=repeat)


def make_cluster(impl, num_instances: int, requests_per_instance: int = 16, seed: int = 0):
    """A ledger of a cluster with mixed context lengths: ~30% of instances are debtors (few free
    blocks, requests waiting), the rest have room; some requests already have blocks elsewhere.
    Context lengths are Pareto-distributed (a few long requests, many short ones)."""
    rnd = random.Random(seed)
    capacity = 2048
    ledger = impl.DebtLedger()
    for i in range(num_instances):
        ledger.register_instance(i, capacity, capacity // 2, host=i // 8)
    rid = 0
    for i in range(num_instances):
        debtor = rnd.random() < 0.3
        used = 0
        for _ in range(requests_per_instance):
            blocks = max(2, int(rnd.paretovariate(1.2) * 8))
            ledger.record_blocks(rid, i, i, blocks)
            used += blocks
            if rnd.random() < 0.2:
                j = rnd.randrange(num_instances)
                if j != i:
                    ledger.record_blocks(rid, i, j, rnd.randint(1, 16))
            rid += 1
        used = min(used, capacity)
        free = rnd.randint(0, 8) if debtor else capacity - used
        ledger.apply_snapshot(i, PoolCounters(1, capacity, free, capacity - free, 0, 0, 0))
        ledger.set_load(i, requests_per_instance, rnd.randint(1, 4) if debtor else 0, rnd.randint(10, 64) if debtor else 0)
    return ledger


def throughput_model(impl):
    """Illustrative f (dense tokens/s by batch) and g (attention tokens/s by context) tables of
    a 32-layer model on one GPU; the planner's cost does not depend on their values."""
    return impl.ThroughputModel(
        [1, 2, 4, 8, 16, 32, 64, 128], [900, 1800, 3500, 6800, 13000, 24000, 40000, 60000],
        [128, 512, 2048, 8192, 32768, 131072], [2e6, 6e6, 15e6, 30e6, 40e6, 45e6], 32, 16,
    )


def bench_planner(impl, num_instances: int, repeat: int, max_moves: int = 8) -> tuple[float, list]:
    ledger = make_cluster(impl, num_instances)
    planner = impl.Planner(throughput_model(impl), max_moves, home_headroom=64)
    plan = planner.plan(ledger)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        planner.plan(ledger)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    args = parser.parse_args()
    repeat = 3 if args.quick else 9
    compiled, twin = core_sched.implementation("compiled"), core_sched.implementation("python")

    t_c = bench_alloc_free(compiled, repeat)
    t_p = bench_alloc_free(twin, repeat)
    emit("alloc_free_compiled_us", t_c * 1e6, "us", batch=BATCH, blocks_per_request=BLOCKS_PER_REQUEST)
    emit("alloc_free_twin_us", t_p * 1e6, "us", batch=BATCH, blocks_per_request=BLOCKS_PER_REQUEST)
    emit("alloc_free_speedup", t_p / t_c, "x")

    t_c = bench_block_tables(compiled, repeat)
    t_p = bench_block_tables(twin, repeat)
    emit("block_table_compiled_us", t_c * 1e6, "us", batch=BATCH, blocks_per_request=BLOCKS_PER_REQUEST)
    emit("block_table_twin_us", t_p * 1e6, "us", batch=BATCH, blocks_per_request=BLOCKS_PER_REQUEST)
    emit("block_table_speedup", t_p / t_c, "x")

    for n in (32, 256, 1024):
        t_c, plan_c = bench_planner(compiled, n, 50 * repeat)
        emit(f"planner_ms_{n}", t_c * 1e3, "ms", instances=n, requests_per_instance=16, moves=len(plan_c))
        if n <= 256:
            t_p, plan_p = bench_planner(twin, n, repeat)
            assert plan_p == plan_c, "compiled and twin planners disagree"
            emit(f"planner_twin_ms_{n}", t_p * 1e3, "ms", instances=n, requests_per_instance=16)


if __name__ == "__main__":
    main()
