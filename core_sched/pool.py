"""Pure-Python twin of the block pool (``core_sched/csrc/block_pool.hpp``).

Same behaviour, same block ids in the same order, same errors: the test suite runs against
both. Read ``block_pool.hpp`` for the design; this file mirrors it line for line where it can.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..errors import CapacityError, SchedulerError, ValidationError
from .types import BLOCK_CACHED, BLOCK_FREE, BLOCK_RESERVED, BLOCK_USED, PoolCounters, PoolDelta

__all__ = ["BlockPool"]

INT32_MAX = 2147483647


class _Reservation:
    __slots__ = ("borrower", "expires_at", "blocks")

    def __init__(self, borrower: int, expires_at: float, blocks: list[int]) -> None:
        self.borrower = borrower
        self.expires_at = expires_at
        self.blocks = blocks


class BlockPool:
    """The KV block pool of one instance (rManager): allocate, free, lend, reserve."""

    def __init__(self, instance_id: int, num_blocks: int, max_lent_blocks: int | None = None) -> None:
        _check_args(instance_id, num_blocks, max_lent_blocks)
        self._instance_id = instance_id
        self._num_blocks = num_blocks
        self._max_lent = num_blocks if max_lent_blocks is None else max_lent_blocks
        self._state = [BLOCK_FREE] * num_blocks
        self._owner_request = [-1] * num_blocks
        self._owner_home = [-1] * num_blocks
        self._free_stack = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks  # holders of a used block (1 unless a cached prefix is shared)
        self._hash: dict[int, int] = {}  # block -> the hash naming it
        self._cache: dict[int, int] = {}  # hash -> block
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks no request holds, oldest first
        self._num_evicted = 0
        self._held: dict[int, list[int]] = {}
        self._reservations: dict[int, _Reservation] = {}  # insertion order == id order
        self._borrowed_by_request: dict[int, int] = {}
        self._next_reservation = 1
        self._used = 0
        self._lent = 0
        self._reserved = 0
        self._borrowed = 0
        self._version = 0
        self._reported = self.counters()

    # ---- counters ----------------------------------------------------------------------------

    @property
    def instance_id(self) -> int:
        return self._instance_id

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def max_lent_blocks(self) -> int:
        return self._max_lent

    def set_max_lent_blocks(self, n: int) -> None:
        """A new lending cap in [0, num_blocks] (memory pressure lowers it, relief raises it
        back). Loans already made stay; while lent + reserved >= the cap nothing more is lent."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self._num_blocks:
            raise ValidationError("max_lent_blocks", n, f"must be an integer in [0, {self._num_blocks}] (num_blocks)")
        self._max_lent = n

    @property
    def num_free(self) -> int:
        """Free blocks, the cached (evictable) ones included."""
        return len(self._free_stack) + len(self._lru)

    @property
    def num_used(self) -> int:
        return self._used

    @property
    def num_lent(self) -> int:
        return self._lent

    @property
    def num_reserved(self) -> int:
        return self._reserved

    @property
    def num_borrowed(self) -> int:
        return self._borrowed

    @property
    def num_requests(self) -> int:
        return len(self._held)

    @property
    def num_reservations(self) -> int:
        return len(self._reservations)

    @property
    def version(self) -> int:
        return self._version

    def counters(self) -> PoolCounters:
        return PoolCounters(
            self._version, self._num_blocks, self.num_free, self._used, self._lent, self._reserved, self._borrowed
        )

    def take_delta(self) -> PoolDelta:
        """Counter changes since the previous call: what the next heartbeat carries."""
        now, was = self.counters(), self._reported
        self._reported = now
        return PoolDelta(
            self._instance_id,
            was.version,
            now.version,
            now.capacity - was.capacity,
            now.free - was.free,
            now.used - was.used,
            now.lent - was.lent,
            now.reserved - was.reserved,
            now.borrowed - was.borrowed,
        )

    # ---- own requests ------------------------------------------------------------------------

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    def allocate(self, request_id: int, n: int) -> list[int]:
        """Allocate ``n`` blocks for a request whose home is this instance."""
        if n < 0:
            raise ValidationError("n", n, "must be >= 0")
        if n > self.num_free:
            raise CapacityError(
                f"instance {self._instance_id}: cannot allocate {n} blocks for request {request_id}: "
                f"{self.num_free} of {self._num_blocks} free"
            )
        held = self._held.setdefault(request_id, [])
        out = []
        for _ in range(n):
            b = self._pop_free()
            self._state[b] = BLOCK_USED
            self._refs[b] = 1
            self._owner_request[b] = request_id
            self._owner_home[b] = self._instance_id
            held.append(b)
            out.append(b)
        if not held:
            del self._held[request_id]
        self._used += n
        if n:
            self._version += 1
        return out

    def free_blocks(self, request_id: int, blocks: list[int]) -> None:
        """Free the named blocks of a request; all must be its own, else nothing is freed."""
        held = self._held.get(request_id)
        if held is None:
            if blocks:
                raise SchedulerError(f"instance {self._instance_id}: request {request_id} holds no blocks here")
            return
        named: set[int] = set()  # linear in the blocks named and held, as block_pool.hpp
        mine = set(held)  # a shared block has other holders: the owner alone does not tell
        for b in blocks:
            if not (0 <= b < self._num_blocks) or self._state[b] != BLOCK_USED or b not in mine:
                raise SchedulerError(
                    f"instance {self._instance_id}: block {b} is not held by request {request_id}"
                )
            if b in named:
                raise SchedulerError(f"instance {self._instance_id}: block {b} named twice")
            named.add(b)
        held[:] = [b for b in held if b not in named]
        for b in blocks:
            self._release_used(b)
        if not held:
            del self._held[request_id]
        if blocks:
            self._version += 1

    def free_request(self, request_id: int) -> int:
        """Free every block a request holds here, own or lent; returns how many."""
        held = self._held.pop(request_id, None)
        if held is None:
            return 0
        for b in reversed(held):
            self._release_used(b)
        if held:
            self._version += 1
        return len(held)

    def allocate_batch(self, request_ids, counts) -> tuple[np.ndarray, np.ndarray]:
        """Allocate ``counts[i]`` blocks for ``request_ids[i]`` (home here), all or nothing.

        Returns ``(blocks, offsets)``: int32 ``[sum(counts)]`` and int32 ``[B+1]``; request i's
        blocks are ``blocks[offsets[i]:offsets[i+1]]`` (CSR layout, no per-request lists).
        """
        request_ids = [int(r) for r in request_ids]
        counts = [int(n) for n in counts]
        if len(counts) != len(request_ids):
            raise ValidationError("counts", len(counts), f"must have one count per request ({len(request_ids)})")
        for n in counts:
            if n < 0:
                raise ValidationError("counts", n, "must be >= 0")
        total = sum(counts)
        if total > self.num_free:
            raise CapacityError(
                f"instance {self._instance_id}: cannot allocate {total} blocks for a batch of {len(request_ids)} "
                f"requests: {self.num_free} of {self._num_blocks} free"
            )
        blocks: list[int] = []
        offsets = [0]
        for rid, n in zip(request_ids, counts):
            blocks += self.allocate(rid, n)
            offsets.append(len(blocks))
        return np.array(blocks, dtype=np.int32), np.array(offsets, dtype=np.int32)

    def free_requests(self, request_ids) -> int:
        """Free every block of each request; returns the total freed."""
        return sum(self.free_request(int(rid)) for rid in request_ids)

    def blocks_of(self, request_id: int) -> list[int]:
        return list(self._held.get(request_id, ()))

    def owner(self, block: int) -> tuple[int, int] | None:
        """(request id, home instance) of a used block, None for a free or reserved one."""
        self._check_block(block)
        if self._state[block] != BLOCK_USED:
            return None
        return self._owner_request[block], self._owner_home[block]

    def state(self, block: int) -> int:
        self._check_block(block)
        return self._state[block]

    # ---- prefix caching ----------------------------------------------------------------------

    @property
    def num_cached(self) -> int:
        """Blocks named by a hash (prefix caching), in use or not."""
        return len(self._cache)

    @property
    def num_evictable(self) -> int:
        """Cached blocks no request holds (counted in ``num_free``)."""
        return len(self._lru)

    @property
    def num_evicted(self) -> int:
        """Cached blocks evicted so far (taken by an allocation)."""
        return self._num_evicted

    def register_block(self, block: int, block_hash: int) -> bool:
        """Name a used block by ``block_hash``; False when the hash names another block
        already (or the block is named already)."""
        self._check_block(block)
        if self._state[block] != BLOCK_USED:
            raise SchedulerError(f"instance {self._instance_id}: block {block} is not in use: it cannot be cached")
        block_hash = _int64(block_hash)
        if block in self._hash or block_hash in self._cache:
            return False
        self._hash[block] = block_hash
        self._cache[block_hash] = block
        self._version += 1
        return True

    def lookup(self, home: int, hashes) -> int:
        """How many of ``hashes``, from the first, name blocks cached here for ``home``."""
        k = 0
        for h in _hash_list(hashes):
            b = self._cache.get(h)
            if b is None or self._owner_home[b] != home:
                break
            k += 1
        return k

    def lookup_evictable(self, home: int, hashes) -> int:
        """Of the blocks ``lookup`` finds, how many no request holds (taking them uses free blocks)."""
        hashes = _hash_list(hashes)
        k = self.lookup(home, hashes)
        return sum(self._state[self._cache[h]] == BLOCK_CACHED for h in hashes[:k])

    def acquire(self, request_id: int, home: int, hashes) -> list[int]:
        """Take the longest cached run of ``hashes`` (from the first) for request
        ``request_id`` of instance ``home``; returns its blocks (appended to the request's)."""
        hashes = _hash_list(hashes)
        if not 0 <= home <= INT32_MAX:
            raise ValidationError("home", home, f"must be in [0, {INT32_MAX}]")
        if not hashes:
            return []
        held = self._held.get(request_id)
        if held and self._owner_home[held[0]] != home:
            raise SchedulerError(
                f"instance {self._instance_id}: request {request_id} is held here for instance "
                f"{self._owner_home[held[0]]}, not {home}"
            )
        k = self.lookup(home, hashes)
        mine = set(held or ())
        took = 0
        while took < k and self._cache[hashes[took]] not in mine:
            took += 1
        if took == 0:
            return []
        held = self._held.setdefault(request_id, [])
        out = []
        for h in hashes[:took]:
            b = self._cache[h]
            if self._state[b] == BLOCK_CACHED:
                del self._lru[b]
                self._state[b] = BLOCK_USED
                self._refs[b] = 1
                self._used += 1
                if home != self._instance_id:
                    self._lent += 1
            else:
                self._refs[b] += 1
            self._owner_request[b] = request_id
            held.append(b)
            out.append(b)
        self._version += 1
        return out

    def reset_cache(self) -> int:
        """Forget every cached block no request holds; returns how many."""
        n = 0
        while self._lru:
            b, _ = self._lru.popitem(last=False)
            self._forget_hash(b)
            self._state[b] = BLOCK_FREE
            self._owner_home[b] = -1
            self._free_stack.append(b)
            n += 1
        if n:
            self._version += 1
        return n

    def refs(self, block: int) -> int:
        """How many requests hold a block (0 unless used)."""
        self._check_block(block)
        return self._refs[block]

    def block_hash(self, block: int) -> int | None:
        """The hash naming a block, or None."""
        self._check_block(block)
        return self._hash.get(block)

    # ---- loans -------------------------------------------------------------------------------

    @property
    def lendable(self) -> int:
        """Blocks this pool could lend now: free ones, capped by the lending cap."""
        room = max(0, self._max_lent - self._lent - self._reserved)
        return min(room, self.num_free)

    def try_reserve(self, borrower: int, n: int, now: float, ttl: float) -> int | None:
        """Reserve ``n`` blocks for instance ``borrower`` until ``now + ttl``.

        Returns a reservation id, or None when the blocks are not there (free memory or the
        lending cap): first come, first served. Times are seconds as doubles, as in the C++.
        """
        if n <= 0:
            raise ValidationError("n", n, "must be >= 1")
        if not 0 <= borrower <= INT32_MAX:
            raise ValidationError("borrower", borrower, f"must be in [0, {INT32_MAX}]")
        if borrower == self._instance_id:
            raise SchedulerError(f"instance {self._instance_id} cannot lend to itself")
        if n > self.num_free or self._lent + self._reserved + n > self._max_lent:
            return None
        rid = self._next_reservation
        self._next_reservation += 1
        blocks = []
        for _ in range(n):
            b = self._pop_free()
            self._state[b] = BLOCK_RESERVED
            self._owner_home[b] = borrower
            blocks.append(b)
        self._reservations[rid] = _Reservation(borrower, float(now) + float(ttl), blocks)
        self._reserved += n
        self._version += 1
        return rid

    def commit(self, reservation_id: int, request_id: int, now: float) -> list[int]:
        """Turn a reservation into blocks of the borrower's request ``request_id``."""
        now = float(now)
        r = self._reservations.get(reservation_id)
        if r is None:
            raise SchedulerError(f"instance {self._instance_id}: unknown reservation {reservation_id}")
        if now > r.expires_at:
            self._release_reservation(reservation_id)
            self._version += 1
            raise CapacityError(
                f"instance {self._instance_id}: reservation {reservation_id} expired at {r.expires_at} (now {now})"
            )
        held = self._held.get(request_id)
        if held and self._owner_home[held[0]] != r.borrower:
            raise SchedulerError(
                f"instance {self._instance_id}: request {request_id} is held here for instance "
                f"{self._owner_home[held[0]]}, not {r.borrower}"
            )
        held = self._held.setdefault(request_id, [])
        for b in r.blocks:
            self._state[b] = BLOCK_USED
            self._refs[b] = 1
            self._owner_request[b] = request_id
            held.append(b)
        n = len(r.blocks)
        self._reserved -= n
        self._used += n
        self._lent += n
        del self._reservations[reservation_id]
        self._version += 1
        return list(r.blocks)

    def cancel(self, reservation_id: int) -> int:
        if reservation_id not in self._reservations:
            raise SchedulerError(f"instance {self._instance_id}: unknown reservation {reservation_id}")
        n = self._release_reservation(reservation_id)
        self._version += 1
        return n

    def expire(self, now: float) -> int:
        """Give back every reservation that expired before ``now``; returns blocks released."""
        now = float(now)
        dead = [rid for rid, r in self._reservations.items() if now > r.expires_at]
        n = sum(self._release_reservation(rid) for rid in dead)
        if n:
            self._version += 1
        return n

    # ---- this instance's requests held elsewhere ---------------------------------------------

    def add_borrowed(self, request_id: int, home: int, n: int) -> None:
        if home != self._instance_id:
            raise SchedulerError(
                f"instance {self._instance_id} never borrows for request {request_id} of instance {home}"
            )
        if not 0 <= n <= INT32_MAX - self._borrowed:  # the counters are int32 in the C++
            raise ValidationError(
                "n", n, f"must be in [0, {INT32_MAX - self._borrowed}] (at most {INT32_MAX} blocks borrowed in all)"
            )
        self._borrowed_by_request[request_id] = self._borrowed_by_request.get(request_id, 0) + n
        self._borrowed += n
        if n:
            self._version += 1

    def remove_borrowed(self, request_id: int, n: int) -> None:
        have = self._borrowed_by_request.get(request_id, 0)
        if n < 0 or n > have:
            raise ValidationError("n", n, f"must be in [0, {have}] (blocks request {request_id} borrowed)")
        if n == 0:
            return
        if have == n:
            del self._borrowed_by_request[request_id]
        else:
            self._borrowed_by_request[request_id] = have - n
        self._borrowed -= n
        self._version += 1

    def borrowed_by(self, request_id: int) -> int:
        return self._borrowed_by_request.get(request_id, 0)

    # ---- internals ---------------------------------------------------------------------------

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self._num_blocks:
            raise ValidationError("block", block, f"must be in [0, {self._num_blocks - 1}]")

    def _pop_free(self) -> int:
        """A free block: the top of the free stack, else the least recently used cached block,
        whose name is forgotten (evicted). The caller sets its new state."""
        if self._free_stack:
            return self._free_stack.pop()
        b, _ = self._lru.popitem(last=False)
        self._forget_hash(b)
        self._num_evicted += 1
        return b

    def _release_used(self, b: int) -> None:
        """Drop one holder of a used block; the last one frees it (to the free stack, or to the
        tail of the cache's eviction order when it is named)."""
        self._refs[b] -= 1
        if self._refs[b] > 0:
            return
        if self._owner_home[b] != self._instance_id:
            self._lent -= 1
        self._used -= 1
        self._owner_request[b] = -1
        if b in self._hash:
            self._state[b] = BLOCK_CACHED  # keeps its home: the home whose requests may reuse it
            self._lru[b] = None
            return
        self._state[b] = BLOCK_FREE
        self._owner_home[b] = -1
        self._free_stack.append(b)

    def _forget_hash(self, b: int) -> None:
        h = self._hash.pop(b, None)
        if h is not None:
            del self._cache[h]

    def _release_reservation(self, rid: int) -> int:
        r = self._reservations.pop(rid)
        for b in reversed(r.blocks):
            self._state[b] = BLOCK_FREE
            self._owner_home[b] = -1
            self._free_stack.append(b)
        self._reserved -= len(r.blocks)
        return len(r.blocks)

    def __repr__(self) -> str:
        c = self.counters()
        cached = f", cached={len(self._cache)}" if self._cache else ""
        return (
            f"BlockPool(instance={self._instance_id}, capacity={c.capacity}, free={c.free}, used={c.used}, "
            f"lent={c.lent}, reserved={c.reserved}, borrowed={c.borrowed}{cached})"
        )


def _check_args(instance_id: int, num_blocks: int, max_lent_blocks: int | None) -> None:
    if not 0 <= instance_id <= INT32_MAX:
        raise ValidationError("instance_id", instance_id, f"must be in [0, {INT32_MAX}]")
    if not 1 <= num_blocks <= INT32_MAX:
        raise ValidationError("num_blocks", num_blocks, f"must be in [1, {INT32_MAX}]")
    if max_lent_blocks is not None and not 0 <= max_lent_blocks <= num_blocks:
        raise ValidationError("max_lent_blocks", max_lent_blocks, f"must be in [0, {num_blocks}] (num_blocks)")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _int64(h) -> int:
    h = int(h)
    if not _INT64_MIN <= h <= _INT64_MAX:
        raise OverflowError(f"hash {h} does not fit in int64")
    return h


def _hash_list(hashes) -> list[int]:
    arr = np.asarray(hashes)
    if arr.ndim != 1:
        raise ValidationError("hashes", arr.shape, "must be one-dimensional")
    return [_int64(h) for h in arr.tolist()]
