"""Placing new requests on instances: longest context first, each on an instance it fits.

The runtime admits the requests queued since the last step all at once; ``Router.place``
decides each one's home from every instance's load::

    needs (blocks: prompt + what it may generate), sorted longest first
    for each: the instances with free blocks (after reservations, less what requests placed there
              and not started yet will take) >= its need
              -> the one with the shortest queue (running + waiting), then the most free
              none -> the one with the most free blocks (it will borrow the rest), then the
              shortest queue
    the chosen instance's free and queue are updated before the next request is placed

With prefix caching a request may have an *affinity*: the instance that was home to the
longest prefix of its prompt seen lately (its KV is cached there, and on the creditors of that
home, which only that home can reuse). It goes there when it fits there, or fits nowhere, and
that instance's queue is at most ``AFFINITY_SLACK`` longer than the shortest: reuse beats
balance until the imbalance grows (SGLang's cache-aware routing in its simplest form).

Placing the longest first keeps the large free regions for the requests that need them (a short
request fits anywhere); among the instances where a request fits, the shortest queue spreads
the compute. A request no single instance can hold still runs: its home borrows from the others
(and the whole cluster's limit was checked at the call: ``RequestTooLongError``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["InstanceLoad", "Router", "AFFINITY_SLACK"]

AFFINITY_SLACK = 2  # how much longer than the shortest an affine instance's queue may be


@dataclass(slots=True)
class InstanceLoad:
    """One instance as the router sees it: ``free_blocks`` after reservations and after what
    requests already placed there (not started yet) will take; ``queue`` its running and
    waiting requests."""

    instance_id: int
    free_blocks: int
    queue: int


class Router:
    """Longest-context-first-fit placement (see the module docstring)."""

    def place(self, needs: Sequence[int], loads: Sequence[InstanceLoad],
              affinity: Sequence[int | None] | None = None) -> list[int]:
        """The home instance of each request, in the order of ``needs`` (blocks each);
        ``affinity``: each request's preferred instance (its cached prefix), or None."""
        if not loads:
            raise ValueError("no instance to place requests on")
        free = {x.instance_id: x.free_blocks for x in loads}
        queue = {x.instance_id: x.queue for x in loads}
        ids = [x.instance_id for x in loads]
        homes = [0] * len(needs)
        for i in sorted(range(len(needs)), key=lambda i: -needs[i]):
            need = needs[i]
            fits = [j for j in ids if free[j] >= need]
            near = affinity[i] if affinity is not None else None
            if near in free and (free[near] >= need or not fits) and \
                    queue[near] <= min(queue.values()) + AFFINITY_SLACK:
                home = near
            elif fits:
                home = min(fits, key=lambda j: (queue[j], -free[j], j))
            else:
                home = min(ids, key=lambda j: (-free[j], queue[j], j))
            homes[i] = home
            free[home] -= need
            queue[home] += 1
        return homes
