"""How a home borrows blocks: how many, and from whom (the engine and the simulator both ask here).

- ``loan_size``: a request short of ``short`` blocks borrows them and up to ``BORROW_AHEAD``
  more that it will grow into (never past its own maximum), so a growing request does not stop
  for a loan at every block.
- ``creditor_order``: the request's present creditors first (each new one costs a query per
  layer), then the instances with the most room; a loan is split over several when no one has
  enough.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["BORROW_AHEAD", "loan_size", "creditor_order"]

BORROW_AHEAD = 4  # blocks a loan takes beyond what the step needs


def loan_size(short: int, max_blocks: int, have_blocks: int) -> int:
    """Blocks to borrow for a request short of ``short`` that may grow to ``max_blocks`` and
    holds ``have_blocks`` now."""
    return max(short, min(short + BORROW_AHEAD, max_blocks - have_blocks))


def creditor_order(lendable: Iterable[tuple[int, int]], held: set[int]) -> list[tuple[int, int]]:
    """``(instance, lendable blocks)`` pairs, best creditor first (stable for ties)."""
    return sorted(lendable, key=lambda p: (p[0] not in held, -p[1]))
