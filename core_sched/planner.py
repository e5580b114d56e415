"""Pure-Python twin of the gManager's planner (``core_sched/csrc/planner.hpp``).

Same plans, same floats, same errors as the compiled ``ThroughputModel`` and ``Planner``: the
test suite runs against both, and a property test checks that they agree on random clusters.
``planner.hpp`` holds the design; the summary:

**Throughput model.** Per layer, ``T_layer(batch, contexts) = batch / f(batch) +
sum_r ctx_r / g(ctx_r)`` and an instance decodes ``batch / (num_layers * T_layer)`` tokens/s.
``f`` (dense-layer tokens/s at a batch size) and ``g`` (attention context tokens/s at a context
length) are profiled tables, interpolated piecewise-linearly and clamped at both ends.

**Plan** (never changes the ledger; at most ``max_moves_per_step`` blocks move per call):

1. *Spread.* Debtors (``num_waiting > 0`` and ``free < waiting_blocks``), most blocks short
   first, then id. For each: its longest own request ``r`` (most blocks on it, then lowest id),
   the best creditor ``c`` (``num_waiting == 0``, ``lendable > 0``, ranked like
   ``DebtLedger.creditors`` on the counts as this plan changed them), and the ``k`` in
   ``1..min(budget, lendable(c), blocks(r on d) - 1)`` that maximises the pair's tokens/s, with
   ``a(k) = min(num_waiting, (free + k) // waiting_blocks)`` waiting requests admitted (each
   taken to need ``waiting_blocks``) and the moved attention on ``c`` no slower than the
   debtor's local attention (it hides behind it). ``k`` must beat ``k = 0`` strictly; ties go
   to the smaller ``k``.
2. *Bring home.* Instances with ``num_waiting == 0``, blocks away, and ``free - home_headroom > 0``
   (most blocks away first) pull them back: most-away requests first, biggest holder first.

Decisions (the same in ``planner.hpp``):

- An instance's attention covers every part held there, own or lent-in; a part's context is
  its blocks there times ``block_size`` (the ledger counts blocks, not tokens).
- Only the debtor's own requests spread (a lent-in one is its home's business), and a request
  keeps at least one block at home.
- "Remote attention" is the time of the request's whole part on the creditor after the move
  (blocks it already had there plus ``k``): that is what the debtor waits for.
- Within one plan a creditor's free, lent and attention follow the moves already chosen; a
  move's source gets no credit for the blocks it will free (free only once the copy is done).
- Spreads come before homes; both share the budget. One move per debtor per plan.

Every float expression below is written as in the C++ (same operations, same order; sums run
by request id), so both produce bit-identical results: no ``sum()`` (Python 3.12 compensates
float sums) and no reordering.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Sequence

from ..errors import ValidationError
from .ledger import INT32_MAX, DebtLedger
from .types import MOVE_HOME, MOVE_SPREAD, Move

__all__ = ["ThroughputModel", "Planner"]

INT64_MAX = 9223372036854775807


class ThroughputModel:
    """Decode throughput of an instance from its batch size and the contexts it attends over.

    ``dense_batch`` / ``dense_tokens_per_s`` tabulate f, ``attn_ctx`` / ``attn_tokens_per_s``
    tabulate g (x strictly increasing, all values positive and finite, at least one point).
    """

    def __init__(
        self,
        dense_batch: Sequence[float],
        dense_tokens_per_s: Sequence[float],
        attn_ctx: Sequence[float],
        attn_tokens_per_s: Sequence[float],
        num_layers: int,
        block_size: int,
    ) -> None:
        self._dense_batch = _check_table("dense_batch", dense_batch, increasing=True)
        self._dense_tps = _check_table("dense_tokens_per_s", dense_tokens_per_s, like=("dense_batch", self._dense_batch))
        self._attn_ctx = _check_table("attn_ctx", attn_ctx, increasing=True)
        self._attn_tps = _check_table("attn_tokens_per_s", attn_tokens_per_s, like=("attn_ctx", self._attn_ctx))
        if not 1 <= num_layers <= INT32_MAX:
            raise ValidationError("num_layers", num_layers, f"must be in [1, {INT32_MAX}]")
        if not 1 <= block_size <= INT32_MAX:
            raise ValidationError("block_size", block_size, f"must be in [1, {INT32_MAX}]")
        self._num_layers = num_layers
        self._block_size = block_size

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def block_size(self) -> int:
        return self._block_size

    def dense_throughput(self, batch: float) -> float:
        """f(batch): dense-layer tokens/s at this batch size."""
        return _interpolate(self._dense_batch, self._dense_tps, float(batch))

    def attention_throughput(self, ctx: float) -> float:
        """g(ctx): attention context tokens/s at this context length."""
        return _interpolate(self._attn_ctx, self._attn_tps, float(ctx))

    def layer_time(self, batch: int, contexts: Sequence[float]) -> float:
        """T_layer = batch / f(batch) + sum_r ctx_r / g(ctx_r), in seconds."""
        batch, contexts = _check_step(batch, contexts)
        attn = 0.0
        for ctx in contexts:
            attn += self._attention_time(ctx)
        return self._dense_time(float(batch)) + attn

    def step_time(self, batch: int, contexts: Sequence[float]) -> float:
        """One decode step over all layers: num_layers * T_layer, in seconds."""
        return self._num_layers * self.layer_time(batch, contexts)

    def tokens_per_s(self, batch: int, contexts: Sequence[float]) -> float:
        """Decode tokens/s: batch / step_time (0 for an empty batch)."""
        batch, contexts = _check_step(batch, contexts)
        attn = 0.0
        for ctx in contexts:
            attn += self._attention_time(ctx)
        return self._tokens_per_s_at(float(batch), attn)

    # ---- the planner's arithmetic (planner.hpp: ThroughputModel) ---------------------------

    def _dense_time(self, batch: float) -> float:
        return batch / self.dense_throughput(batch) if batch > 0 else 0.0

    def _attention_time(self, ctx: float) -> float:
        return ctx / self.attention_throughput(ctx) if ctx > 0 else 0.0

    def _blocks_time(self, blocks: int) -> float:
        return self._attention_time(float(blocks * self._block_size))

    def _tokens_per_s_at(self, batch: float, attn: float) -> float:
        if batch <= 0:
            return 0.0
        return batch / (self._num_layers * (self._dense_time(batch) + attn))

    def __repr__(self) -> str:
        return (
            f"ThroughputModel(dense_points={len(self._dense_batch)}, attn_points={len(self._attn_ctx)}, "
            f"num_layers={self._num_layers}, block_size={self._block_size})"
        )


class Planner:
    """The gManager's greedy planner: spread debtors' long requests, bring blocks home.

    ``max_moves_per_step`` caps the *blocks* moved by one ``plan`` call (both phases together),
    so that migration hides behind compute; ``home_headroom`` is the free blocks an instance
    keeps after bringing blocks home. ``plan`` takes a ledger of the same implementation.
    """

    def __init__(self, model: ThroughputModel, max_moves_per_step: int, home_headroom: int = 0) -> None:
        if not isinstance(model, ThroughputModel):
            raise TypeError(f"model must be a ThroughputModel of the same implementation as the planner, "
                            f"not {type(model).__module__}.{type(model).__name__}")
        if not 0 <= max_moves_per_step <= INT64_MAX:
            raise ValidationError("max_moves_per_step", max_moves_per_step, f"must be in [0, {INT64_MAX}]")
        if not 0 <= home_headroom <= INT32_MAX:
            raise ValidationError("home_headroom", home_headroom, f"must be in [0, {INT32_MAX}]")
        self._model = model
        self._max_moves = max_moves_per_step
        self._home_headroom = home_headroom

    @property
    def model(self) -> ThroughputModel:
        return self._model

    @property
    def max_moves_per_step(self) -> int:
        return self._max_moves

    @property
    def home_headroom(self) -> int:
        return self._home_headroom

    def plan(self, ledger: DebtLedger) -> list[Move]:
        """The moves for this period, in the order to carry them out (spreads, then homes)."""
        if not isinstance(ledger, DebtLedger):
            raise TypeError(f"plan() needs a DebtLedger of the same implementation as the planner, "
                            f"not {type(ledger).__module__}.{type(ledger).__name__}")
        model = self._model
        budget = self._max_moves
        out: list[Move] = []
        instances = ledger._instances
        requests = ledger._requests
        if budget <= 0 or not instances:
            return out

        # Plan-local view: free/lent/attention as the moves chosen so far leave them.
        free = {i: x.free for i, x in instances.items()}
        lent = {i: x.lent for i, x in instances.items()}
        attn: dict[int, float] = {}  # attention time per layer of the parts held there
        debtors = []  # (-blocks short, id)
        ranked: list[tuple[int, int, int]] = []  # (-free, load, id), sorted
        ranked_by_host: dict[int, list[tuple[int, int, int]]] = {}
        for i in sorted(instances):
            x = instances[i]
            if x.num_waiting > 0 and x.free < x.waiting_blocks:
                debtors.append((-(x.waiting_blocks - x.free), i))
            elif x.num_waiting == 0 and x.lendable > 0:
                key = (-x.free, x.load, i)
                ranked.append(key)
                ranked_by_host.setdefault(x.host, []).append(key)
        ranked.sort()
        for keys in ranked_by_host.values():
            keys.sort()
        debtors.sort()

        # ---- 1. spread ----------------------------------------------------------------------
        for _, d in debtors:
            if budget <= 0 or not ranked:
                break
            D = instances[d]
            order = sorted(D.parts)
            rid, rb = -1, 0  # the longest own request and its blocks on d
            for r in order:
                blocks, home = D.parts[r]
                if home == d and blocks > rb:
                    rid, rb = r, blocks
            if rb < 2:
                continue  # a request keeps at least one block at home

            top = ranked[0]
            c = top[2]
            same_host = ranked_by_host.get(D.host)
            if same_host and same_host[0][0] == top[0] and same_host[0][1] == top[1]:
                c = same_host[0][2]
            C = instances[c]
            kmax = min(budget, C.lendable_with(free[c], lent[c]), rb - 1)

            rest = 0.0
            for r in order:
                if r != rid:
                    rest += model._blocks_time(D.parts[r][0])
            if c not in attn:
                s = 0.0
                for r in sorted(C.parts):
                    s += model._blocks_time(C.parts[r][0])
                attn[c] = s
            part = C.parts.get(rid)
            prc = 0 if part is None else part[0]
            crest = attn[c] - model._blocks_time(prc)
            tw = model._blocks_time(D.waiting_blocks)
            free_d = free[d]

            def pair_tps(k: int) -> tuple[float, float, float]:
                a = min(D.num_waiting, (free_d + k) // D.waiting_blocks)
                local = rest + model._blocks_time(rb - k) + float(a) * tw
                remote = model._blocks_time(prc + k)
                total = model._tokens_per_s_at(float(D.batch_size + a), local) + model._tokens_per_s_at(
                    float(C.batch_size), crest + remote
                )
                return total, local, remote

            best = pair_tps(0)[0]
            best_k, best_remote = 0, 0.0
            for k in range(1, kmax + 1):
                total, local, remote = pair_tps(k)
                if remote <= local and total > best:
                    best, best_k, best_remote = total, k, remote
            if best_k == 0:
                continue

            out.append(Move(rid, best_k, d, c, MOVE_SPREAD))
            budget -= best_k
            old_key = (-free[c], C.load, c)
            _remove(ranked, old_key)
            _remove(ranked_by_host[C.host], old_key)
            free[c] -= best_k
            lent[c] += best_k
            attn[c] = crest + best_remote
            if C.lendable_with(free[c], lent[c]) > 0:
                new_key = (-free[c], C.load, c)
                insort(ranked, new_key)
                insort(ranked_by_host[C.host], new_key)

        # ---- 2. bring home ------------------------------------------------------------------
        if budget <= 0:
            return out
        homes = sorted(
            (-x.away_blocks, i)
            for i, x in instances.items()
            if x.num_waiting == 0 and x.away_blocks > 0 and free[i] - self._home_headroom > 0
        )
        for _, h in homes:
            if budget <= 0:
                break
            H = instances[h]
            room = free[h] - self._home_headroom
            reqs = sorted((-(requests[r].total - requests[r].placement.get(h, 0)), r) for r in H.homed_away)
            for _, r in reqs:
                if room <= 0 or budget <= 0:
                    break
                holders = sorted((-blocks, inst) for inst, blocks in requests[r].placement.items() if inst != h)
                for neg_blocks, inst in holders:
                    m = min(-neg_blocks, room, budget)
                    if m <= 0:
                        break
                    out.append(Move(r, m, inst, h, MOVE_HOME))
                    room -= m
                    budget -= m
                    free[h] -= m
        return out

    def __repr__(self) -> str:
        return f"Planner(max_moves_per_step={self._max_moves}, home_headroom={self._home_headroom})"


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect_right(xs, x) - 1
    return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])


def _remove(keys: list, key: tuple) -> None:
    del keys[bisect_left(keys, key)]


def _check_table(
    field: str, values: Sequence[float], *, increasing: bool = False, like: tuple[str, list[float]] | None = None
) -> list[float]:
    """The table as floats; ValidationError naming ``field`` unless positive, finite, >= 1 point."""
    points = list(values)
    if not points:
        raise ValidationError(field, points, "must have at least 1 point")
    if like is not None and len(points) != len(like[1]):
        raise ValidationError(field, points, f"must have as many points as {like[0]} ({len(like[1])})")
    try:
        floats = [float(v) for v in points]
    except (TypeError, ValueError):
        raise ValidationError(field, points, "must be numbers") from None
    if not all(math.isfinite(v) and v > 0 for v in floats):
        raise ValidationError(field, points, "must be positive and finite")
    if increasing and any(floats[i] >= floats[i + 1] for i in range(len(floats) - 1)):
        raise ValidationError(field, points, "must be strictly increasing")
    return floats


def _check_step(batch: int, contexts: Sequence[float]) -> tuple[int, list[float]]:
    if not 0 <= batch <= INT32_MAX:
        raise ValidationError("batch", batch, f"must be in [0, {INT32_MAX}]")
    ctxs = [float(c) for c in contexts]
    if not all(math.isfinite(c) and c >= 0 for c in ctxs):
        raise ValidationError("contexts", list(contexts), "must all be finite and >= 0")
    return batch, ctxs
