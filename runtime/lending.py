"""How a home borrows blocks: how many, and from whom (the engine and the simulator both ask here).

- ``loan_size``: a request short of ``short`` blocks borrows them and up to ``BORROW_AHEAD``
  more that it will grow into (never past its own maximum), so a growing request does not stop
  for a loan at every block.
- ``movable``: which of a request's blocks a migration may move (the planner's moves).
- ``plan_loan``: which creditors lend how many. A request's part on one creditor grows up to
  ``part_limit`` blocks: its share of the cluster (its most blocks over the instances), and at
  least ``MIN_PART_TOKENS`` worth. Its present creditors come first (each new one costs a query
  per layer), up to that limit; then new creditors, most room first; only then the present
  ones past the limit. A very long request thus spreads over many instances, whose partial
  attentions run in parallel (a prefill chunk of a 2M-token prompt waits for the largest part,
  not for the whole), while a short one stays on few.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

__all__ = ["BORROW_AHEAD", "MIN_PART_TOKENS", "borrow", "loan_size", "movable", "part_limit", "plan_loan"]

BORROW_AHEAD = 4  # blocks a loan takes beyond what the step needs
MIN_PART_TOKENS = 4096  # a part below this is not worth its message per layer


def loan_size(short: int, max_blocks: int, have_blocks: int) -> int:
    """Blocks to borrow for a request short of ``short`` that may grow to ``max_blocks`` and
    holds ``have_blocks`` now."""
    return max(short, min(short + BORROW_AHEAD, max_blocks - have_blocks))


def part_limit(max_blocks: int, num_instances: int, block_size: int) -> int:
    """The blocks of one request that one creditor should hold before the next one is asked."""
    return max(-(-MIN_PART_TOKENS // block_size), -(-max_blocks // max(1, num_instances)))


def plan_loan(n: int, offers: Sequence[tuple[int, int]], parts: Mapping[int, int], limit: int) -> list[tuple[int, int]]:
    """Split a loan of ``n`` blocks: ``(creditor, blocks)`` in the order to ask them.

    ``offers``: ``(instance, lendable blocks)`` (stable order for ties); ``parts``: the
    request's blocks on each creditor now; ``limit``: ``part_limit``."""
    room = {i: lendable for i, lendable in offers if lendable > 0}
    out: list[tuple[int, int]] = []

    def take(i: int, most: int) -> None:
        nonlocal n
        k = min(n, room[i], most)
        if k > 0:
            out.append((i, k))
            room[i] -= k
            n -= k

    present = sorted((i for i in room if parts.get(i, 0) > 0), key=lambda i: -room[i])
    for i in present:
        take(i, limit - parts[i])
    for i in sorted((i for i in room if parts.get(i, 0) == 0), key=lambda i: -room[i]):
        take(i, limit)
    for i in present + sorted((i for i in room if parts.get(i, 0) == 0), key=lambda i: -room[i]):
        take(i, n)
    merged: dict[int, int] = {}
    for i, k in out:
        merged[i] = merged.get(i, 0) + k
    return list(merged.items())



def borrow(n: int, offers: Sequence[tuple[int, int]], parts: Mapping[int, int], limit: int,
           ask: Callable[[int, int], bool]) -> int:
    """Take a loan of ``n`` blocks as ``plan_loan`` splits it: ``ask(creditor, blocks)`` reserves
    and commits them there and returns False when that creditor refuses (its room went
    meanwhile, or it died). A refusing creditor's share goes to the others. Returns the blocks
    granted."""
    room = {i: k for i, k in offers}
    order = [i for i, _ in offers]
    parts = dict(parts)
    granted = 0
    while n > granted:
        plan = plan_loan(n - granted, [(i, room[i]) for i in order if i in room], parts, limit)
        if not plan:
            break
        for i, k in plan:
            if ask(i, k):
                granted += k
                parts[i] = parts.get(i, 0) + k
                room[i] -= k
            else:
                del room[i]
    return granted


def movable(runs: Sequence[tuple[int, Sequence[int]]], instance: int) -> tuple[list[int], bool]:
    """The ids (logical order) of a request's blocks on ``instance`` that may move, from its
    block table's runs: full ones, never its last block (the tail being appended to;
    ``BlockTables.move_blocks(..., keep_last=1)`` relabels the last of these); and whether the
    tail is on ``instance``."""
    total = sum(len(ids) for _, ids in runs)
    out, logical = [], 0
    for on, ids in runs:
        for b in ids:
            if on == instance and logical < total - 1:
                out.append(b)
            logical += 1
    return out, bool(runs) and runs[-1][0] == instance
