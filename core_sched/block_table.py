"""Pure-Python twin of the block tables (``core_sched/csrc/block_table.hpp``).

Same behaviour, same results, same errors: the test suite runs against both, and a hypothesis
test drives both with the same random operations. ``block_table.hpp`` carries the design; in
short::

    request 7, block_size 4, 14 tokens, 5 logical blocks (the last one allocated ahead, empty)

    logical  |   0    |   1    |   2    |   3        |   4    |
    tokens   | 0..3   | 4..7   | 8..11  | 12,13 + 2  |  --    |   <- partially filled tail
    block id |   5    |   9    |   2    |   6        |   3    |
    instance |   A    |   A    |   B    |   B        |   A    |
             '-- run 0: A -----'-- run 1: B ---------'-- run 2: A

    runs(7) == [(A, [5, 9]), (B, [2, 6]), (A, [3])]

A request's table is its block ids in logical order plus its runs, each run being (instance,
first logical block); a run ends where the next one starts. Adjacent runs differ in instance.
"""

from __future__ import annotations

import operator
from bisect import bisect_right

import numpy as np

from ..errors import CapacityError, SchedulerError, ValidationError

__all__ = ["BlockTables"]

_INT32_MAX = (1 << 31) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

Runs = list[tuple[int, list[int]]]


class _Table:
    """One request's table: ``blocks`` [num_blocks] and the runs as two parallel lists."""

    __slots__ = ("num_tokens", "blocks", "run_instances", "run_starts")

    def __init__(self) -> None:
        self.num_tokens = 0
        self.blocks: list[int] = []  # block id of each logical block
        self.run_instances: list[int] = []  # [num_runs]
        self.run_starts: list[int] = []  # [num_runs] first logical block of each run

    def run_end(self, k: int) -> int:
        """One past the last logical block of run ``k``."""
        return self.run_starts[k + 1] if k + 1 < len(self.run_starts) else len(self.blocks)

    def run_of(self, logical: int) -> int:
        """The run holding logical block ``logical``."""
        return bisect_right(self.run_starts, logical) - 1

    def num_filled(self, block_size: int) -> int:
        """Logical blocks holding at least one token: ceil(num_tokens / block_size)."""
        return -(-self.num_tokens // block_size)

    def count_on(self, instance: int, limit: int) -> int:
        """Blocks on ``instance`` among the logical blocks [0, limit)."""
        n = 0
        for k, start in enumerate(self.run_starts):
            if start >= limit:
                break
            if self.run_instances[k] == instance:
                n += min(self.run_end(k), limit) - start
        return n

    def append(self, instance: int, ids: list[int]) -> None:
        if not ids:
            return
        if not self.run_instances or self.run_instances[-1] != instance:
            self.run_instances.append(instance)
            self.run_starts.append(len(self.blocks))
        self.blocks.extend(ids)

    def merge_runs_from(self, k0: int) -> None:
        """Merge adjacent runs on the same instance, from run ``k0`` on."""
        kept = k0
        for k in range(k0 + 1, len(self.run_starts)):
            if self.run_instances[k] != self.run_instances[kept]:
                kept += 1
                self.run_instances[kept] = self.run_instances[k]
                self.run_starts[kept] = self.run_starts[k]
        del self.run_instances[kept + 1 :], self.run_starts[kept + 1 :]

    def runs(self, first: int = 0) -> Runs:
        """The runs as (instance, [block ids]) from logical block ``first`` on."""
        if first >= len(self.blocks):
            return []
        out = []
        for k in range(self.run_of(first), len(self.run_starts)):
            lo = max(self.run_starts[k], first)
            out.append((self.run_instances[k], self.blocks[lo : self.run_end(k)]))
        return out

    def cut(self, keep: int) -> Runs:
        """Drop every logical block from ``keep`` on; returns them as runs."""
        dropped = self.runs(keep)
        while self.run_starts and self.run_starts[-1] >= keep:
            self.run_starts.pop()
            self.run_instances.pop()
        del self.blocks[keep:]
        return dropped


class BlockTables:
    """Block tables of the requests whose home is one instance.

    Each request's KV is a list of logical blocks; logical block i holds token positions
    [i*block_size, (i+1)*block_size). Consecutive logical blocks on the same instance form a
    run: ``runs(rid) -> [(instance, [block ids]), ...]``. See ``csrc/block_table.hpp``.
    """

    def __init__(self, block_size: int) -> None:
        block_size = operator.index(block_size)
        if not (1 <= block_size <= 1024 and block_size & (block_size - 1) == 0):
            raise ValidationError("block_size", block_size, "must be a power of two in [1, 1024]")
        self._block_size = block_size
        self._tables: dict[int, _Table] = {}

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_requests(self) -> int:
        return len(self._tables)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: int) -> None:
        request_id = _request_id(request_id)
        if request_id in self._tables:
            raise SchedulerError(f"request {request_id} already has a block table")
        self._tables[request_id] = _Table()

    def has_request(self, request_id: int) -> bool:
        return _request_id(request_id) in self._tables

    def remove_request(self, request_id: int) -> Runs:
        """Forget a request; returns all its blocks as runs (the caller frees them on their pools)."""
        request_id = _request_id(request_id)
        table = self._table(request_id)
        del self._tables[request_id]
        return table.runs()

    def num_tokens(self, request_id: int) -> int:
        return self._table(_request_id(request_id)).num_tokens

    def num_blocks(self, request_id: int) -> int:
        return len(self._table(_request_id(request_id)).blocks)

    def blocks_needed(self, request_id: int, num_new_tokens: int) -> int:
        """Blocks to append so that ``num_tokens + num_new_tokens`` tokens fit."""
        request_id = _request_id(request_id)
        num_new_tokens = _count(num_new_tokens, "num_new_tokens")
        t = self._table(request_id)
        return max(0, -(-(t.num_tokens + num_new_tokens) // self._block_size) - len(t.blocks))

    # ---- growth ------------------------------------------------------------------------------

    def append_blocks(self, request_id: int, instance: int, block_ids: list[int]) -> None:
        """Append blocks on ``instance``: they extend the tail run if it is on ``instance``,
        else they start a new run (the tail spills onto the next run)."""
        request_id = _request_id(request_id)
        instance = _instance(instance, "instance")
        ids = _block_ids(block_ids, "block_ids")
        self._table(request_id).append(instance, ids)

    def append_tokens(self, request_id: int, n: int) -> None:
        """Count ``n`` more tokens as written; the blocks must hold them (else nothing changes)."""
        request_id = _request_id(request_id)
        n = _count(n, "n")
        t = self._table(request_id)
        slots = len(t.blocks) * self._block_size
        if n > slots - t.num_tokens:
            raise CapacityError(
                f"request {request_id}: {t.num_tokens} + {n} tokens do not fit in {len(t.blocks)} "
                f"blocks of {self._block_size} tokens ({slots} slots)"
            )
        if n > _INT32_MAX - t.num_tokens:
            raise ValidationError("n", n, f"must be <= {_INT32_MAX - t.num_tokens}: positions are int32")
        t.num_tokens += n

    # ---- queries -----------------------------------------------------------------------------

    def runs(self, request_id: int) -> Runs:
        return self._table(_request_id(request_id)).runs()

    def locate(self, request_id: int, position: int) -> tuple[int, int, int]:
        """(instance, block id, offset in the block) of a token position."""
        request_id = _request_id(request_id)
        position = operator.index(position)
        t = self._table(request_id)
        if not 0 <= position < t.num_tokens:
            raise ValidationError("position", position, _positions(request_id, t.num_tokens))
        logical, offset = divmod(position, self._block_size)
        return t.run_instances[t.run_of(logical)], t.blocks[logical], offset

    def blocks_on(self, request_id: int, instance: int) -> list[int]:
        """The request's block ids on ``instance``, in logical order."""
        request_id = _request_id(request_id)
        instance = _instance(instance, "instance")
        t = self._table(request_id)
        out = []
        for k, on in enumerate(t.run_instances):
            if on == instance:
                out.extend(t.blocks[t.run_starts[k] : t.run_end(k)])
        return out

    # ---- shrinking and migration -------------------------------------------------------------

    def truncate(self, request_id: int, num_tokens: int) -> Runs:
        """Keep the first ``num_tokens`` tokens; drops every block past ceil(num_tokens /
        block_size) (blocks allocated ahead included) and returns them as runs."""
        request_id = _request_id(request_id)
        num_tokens = operator.index(num_tokens)
        t = self._table(request_id)
        if not 0 <= num_tokens <= t.num_tokens:
            raise ValidationError(
                "num_tokens", num_tokens, f"must be in [0, {t.num_tokens}] (tokens request {request_id} holds)"
            )
        t.num_tokens = num_tokens
        return t.cut(t.num_filled(self._block_size))

    def move_blocks(self, request_id: int, src: int, dst: int, new_block_ids: list[int], keep_last: int = 0) -> list[int]:
        """Migration: the last ``len(new_block_ids)`` blocks (logical order) the request has on
        ``src`` before its last ``keep_last`` logical blocks (which stay where they are: the
        tail being appended to) now live on ``dst`` under the new ids; returns their old ids
        (same order)::

            before   A[5 9] B[2] A[4 8]          move 3 blocks A -> C, new ids [70 71 72]
            after    A[5] C[70] B[2] C[71 72]    returns [9, 4, 8]
            keep_last=1, move 2:  A[5] C[70] B[2] C[71] A[8]   returns [9, 4]

        A run that straddles the kept tail is split there first; walking the runs backwards,
        every run on ``src`` moves whole except the last one visited, of which only a suffix
        moves (that run splits in two); neighbours on one instance then merge.
        """
        request_id = _request_id(request_id)
        src = _instance(src, "src")
        dst = _instance(dst, "dst")
        new_ids = _block_ids(new_block_ids, "new_block_ids")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValidationError("keep_last", keep_last, "must be an integer >= 0")
        t = self._table(request_id)
        n = len(new_ids)
        limit = len(t.blocks) - min(keep_last, len(t.blocks))
        have = t.count_on(src, limit)
        if have < n:
            raise SchedulerError(
                f"request {request_id} has {have} blocks on instance {src}"
                + (f" before its last {keep_last}" if keep_last else "")
                + f", cannot move {n} to instance {dst}"
            )
        old_ids = [-1] * n
        if n == 0:
            return old_ids
        if limit < len(t.blocks):
            s = t.run_of(limit)
            if t.run_starts[s] < limit:
                t.run_instances.insert(s + 1, t.run_instances[s])
                t.run_starts.insert(s + 1, limit)
        left = n  # blocks still to move; the next one found (walking back) is number left-1
        k = len(t.run_starts)
        while left > 0:
            k -= 1
            if t.run_instances[k] != src or t.run_starts[k] >= limit:
                continue
            lo, hi = t.run_starts[k], t.run_end(k)
            moved = min(left, hi - lo)
            cut = hi - moved  # blocks [cut, hi) of this run move: numbers [left - moved, left)
            old_ids[left - moved : left] = t.blocks[cut:hi]
            t.blocks[cut:hi] = new_ids[left - moved : left]
            left -= moved
            if cut == lo:
                t.run_instances[k] = dst
            else:
                t.run_instances.insert(k + 1, dst)
                t.run_starts.insert(k + 1, cut)
        t.merge_runs_from(max(k - 1, 0))
        return old_ids

    # ---- per-step conversions for a batch ----------------------------------------------------

    def batch_tables(self, request_ids: list[int], instance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the attention kernel of ``instance`` reads for a batch, int32 arrays [B, M]:

        - ``block_table``: block ids (padding -1),
        - ``block_start``: absolute position of each block's first token (padding 0),
        - ``block_len``: tokens in that block (padding 0).

        Only the blocks on ``instance`` that hold at least one token, in logical order;
        M is the most such blocks of one request, at least 1.
        """
        ids = _request_ids(request_ids)
        instance = _instance(instance, "instance")
        bs = self._block_size
        tables = [self._table(rid) for rid in ids]
        width = max([1] + [t.count_on(instance, t.num_filled(bs)) for t in tables])
        block_table = np.full((len(tables), width), -1, dtype=np.int32)  # [B, M]
        block_start = np.zeros((len(tables), width), dtype=np.int32)  # [B, M]
        block_len = np.zeros((len(tables), width), dtype=np.int32)  # [B, M]
        for row, t in enumerate(tables):
            filled = t.num_filled(bs)
            col = 0
            for k, on in enumerate(t.run_instances):
                lo, hi = t.run_starts[k], min(t.run_end(k), filled)
                if on != instance or hi <= lo:
                    continue
                n = hi - lo
                block_table[row, col : col + n] = t.blocks[lo:hi]
                block_start[row, col : col + n] = np.arange(lo * bs, hi * bs, bs)
                block_len[row, col : col + n] = bs
                col += n
                if hi == filled:  # the request's last block with tokens: maybe partly filled
                    block_len[row, col - 1] = t.num_tokens - (filled - 1) * bs
        return block_table, block_start, block_len

    def slot_mapping(self, request_ids: list[int], counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Where ``append_kv`` writes the k/v of the last ``counts[i]`` tokens of each request,
        in batch order: ``instance`` int32 [T] and ``slot`` int64 [T] (block*block_size +
        offset), T = sum(counts)."""
        ids = _request_ids(request_ids)
        if len(counts) != len(ids):
            raise ValidationError("len(counts)", len(counts), f"must equal len(request_ids)={len(ids)}")
        bs = self._block_size
        tables = []
        ns = []
        for i, rid in enumerate(ids):
            t = self._table(rid)
            c = operator.index(counts[i])
            if not 0 <= c <= t.num_tokens:
                raise ValidationError(f"counts[{i}]", c, f"must be in [0, {t.num_tokens}] (tokens request {rid} holds)")
            tables.append(t)
            ns.append(c)
        total = sum(ns)
        instance = np.empty(total, dtype=np.int32)  # [T]
        slot = np.empty(total, dtype=np.int64)  # [T]
        o = 0
        for t, c in zip(tables, ns):
            if c == 0:
                continue
            p0, p1 = t.num_tokens - c, t.num_tokens  # the positions [p0, p1)
            lb0, lb1 = p0 // bs, (p1 - 1) // bs + 1  # the logical blocks [lb0, lb1) holding them
            positions = np.arange(p0, p1, dtype=np.int64)  # [c]
            blocks = np.asarray(t.blocks[lb0:lb1], dtype=np.int64)  # [lb1 - lb0]
            slot[o : o + c] = blocks[positions // bs - lb0] * bs + positions % bs
            k = t.run_of(lb0)
            while k < len(t.run_starts) and t.run_starts[k] < lb1:
                lo, hi = max(t.run_starts[k] * bs, p0), min(t.run_end(k) * bs, p1)  # positions on run k
                instance[o + lo - p0 : o + hi - p0] = t.run_instances[k]
                k += 1
            o += c
        return instance, slot

    # ---- internals ---------------------------------------------------------------------------

    def _table(self, request_id: int) -> _Table:
        t = self._tables.get(request_id)
        if t is None:
            raise SchedulerError(f"request {request_id} has no block table")
        return t

    def __repr__(self) -> str:
        return f"BlockTables(block_size={self._block_size}, num_requests={len(self._tables)})"


def _request_id(value, field: str = "request_id") -> int:
    value = operator.index(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValidationError(field, value, f"must be in [{_INT64_MIN}, {_INT64_MAX}]")
    return value


def _request_ids(values) -> list[int]:
    out = []
    for r in values:
        r = operator.index(r)
        if not _INT64_MIN <= r <= _INT64_MAX:
            raise ValidationError(f"request_ids[{len(out)}]", r, f"must be in [{_INT64_MIN}, {_INT64_MAX}]")
        out.append(r)
    return out


def _instance(value, field: str) -> int:
    value = operator.index(value)
    if not 0 <= value <= _INT32_MAX:
        raise ValidationError(field, value, f"must be in [0, {_INT32_MAX}]")
    return value


def _block_ids(values, field: str) -> list[int]:
    out = []
    for b in values:
        b = operator.index(b)
        if not 0 <= b <= _INT32_MAX:
            raise ValidationError(f"{field}[{len(out)}]", b, f"must be in [0, {_INT32_MAX}]")
        out.append(b)
    return out


def _count(value, field: str) -> int:
    value = operator.index(value)
    if value < 0:
        raise ValidationError(field, value, "must be >= 0")
    if value > _INT64_MAX:
        raise ValidationError(field, value, f"must be <= {_INT64_MAX}")
    return value


def _positions(request_id: int, num_tokens: int) -> str:
    if num_tokens == 0:
        return f"request {request_id} holds no tokens"
    return f"must be in [0, {num_tokens - 1}] (tokens of request {request_id})"
