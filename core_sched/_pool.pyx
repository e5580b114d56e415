# distutils: language = c++
"""The compiled block pool: Cython over ``core_sched/csrc/block_pool.hpp``.

Each class here has a pure-Python twin with the same name, behaviour and errors
(``core_sched/pool.py`` for ``BlockPool``); ``infinillm.core_sched`` picks one by the
``INFINILLM_CORE`` environment variable, and the test suite runs against both.
"""

from libc.stdint cimport int32_t, int64_t
from libcpp.vector cimport vector

from block_pool cimport (
    CppBlockPool, CPoolCounters, CReservation, POOL_OK, POOL_BAD_REQUEST, POOL_EXPIRED,
)

import numpy as np

from infinillm.errors import CapacityError, SchedulerError, ValidationError
from infinillm.core_sched.types import PoolCounters, PoolDelta, BLOCK_USED

IMPLEMENTATION = "compiled"

cdef int32_t INT32_MAX = 2147483647


cdef class BlockPool:
    """The KV block pool of one instance (rManager): allocate, free, lend, reserve.

    See ``core_sched/csrc/block_pool.hpp`` for the design and invariants.
    """

    cdef CppBlockPool* c

    def __cinit__(self, int64_t instance_id, int64_t num_blocks, max_lent_blocks=None):
        if not 0 <= instance_id <= INT32_MAX:
            raise ValidationError("instance_id", instance_id, f"must be in [0, {INT32_MAX}]")
        if not 1 <= num_blocks <= INT32_MAX:
            raise ValidationError("num_blocks", num_blocks, f"must be in [1, {INT32_MAX}]")
        if max_lent_blocks is None:
            max_lent_blocks = num_blocks
        elif not 0 <= max_lent_blocks <= num_blocks:
            raise ValidationError("max_lent_blocks", max_lent_blocks, f"must be in [0, {num_blocks}] (num_blocks)")
        self.c = new CppBlockPool(<int32_t>instance_id, <int32_t>num_blocks, <int32_t>max_lent_blocks)

    def __dealloc__(self):
        del self.c

    # ---- counters ----------------------------------------------------------------------------

    @property
    def instance_id(self):
        return self.c.instance_id()

    @property
    def num_blocks(self):
        return self.c.num_blocks()

    @property
    def max_lent_blocks(self):
        return self.c.max_lent()

    def set_max_lent_blocks(self, n):
        """A new lending cap in [0, num_blocks]; see the twin."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.c.num_blocks():
            raise ValidationError("max_lent_blocks", n, f"must be an integer in [0, {self.c.num_blocks()}] (num_blocks)")
        self.c.set_max_lent(n)

    @property
    def num_free(self):
        return self.c.num_free()

    @property
    def num_used(self):
        return self.c.num_used()

    @property
    def num_lent(self):
        return self.c.num_lent()

    @property
    def num_reserved(self):
        return self.c.num_reserved()

    @property
    def num_borrowed(self):
        return self.c.num_borrowed()

    @property
    def num_requests(self):
        return self.c.num_requests()

    @property
    def num_reservations(self):
        return self.c.num_reservations()

    @property
    def version(self):
        return self.c.version()

    def counters(self):
        cdef CPoolCounters k = self.c.counters()
        return PoolCounters(k.version, k.capacity, k.free, k.used, k.lent, k.reserved, k.borrowed)

    def take_delta(self):
        """Counter changes since the previous call: what the next heartbeat carries."""
        cdef int64_t base = 0
        cdef CPoolCounters d = self.c.take_delta(base)
        return PoolDelta(self.c.instance_id(), base, d.version, d.capacity, d.free, d.used, d.lent,
                         d.reserved, d.borrowed)

    # ---- own requests ------------------------------------------------------------------------

    def can_allocate(self, int64_t n):
        return 0 <= n <= self.c.num_free()

    def allocate(self, int64_t request_id, int64_t n):
        """Allocate ``n`` blocks for a request whose home is this instance."""
        cdef vector[int32_t] out
        if n < 0:
            raise ValidationError("n", n, "must be >= 0")
        if n > self.c.num_free():
            raise CapacityError(
                f"instance {self.c.instance_id()}: cannot allocate {n} blocks for request {request_id}: "
                f"{self.c.num_free()} of {self.c.num_blocks()} free"
            )
        self.c.allocate(request_id, <int32_t>n, out)
        return out

    def free_blocks(self, int64_t request_id, blocks):
        """Free the named blocks of a request; all must be its own, else nothing is freed."""
        cdef vector[int32_t] ids
        cdef int32_t status
        blocks = list(blocks)
        for b in blocks:
            # An id past int32 is no block of this pool: -1 fails the C++ check just the same.
            ids.push_back(<int32_t>b if 0 <= b <= INT32_MAX else -1)
        status = self.c.free_blocks(request_id, ids.data(), <int32_t>ids.size())
        if status == POOL_OK:
            return None
        if status == POOL_BAD_REQUEST:
            raise SchedulerError(f"instance {self.c.instance_id()}: request {request_id} holds no blocks here")
        # Name the first offending block as given, as the twin does.
        seen = set()
        held = set(self.blocks_of(request_id))
        for b in blocks:
            if not 0 <= b < self.c.num_blocks() or self.c.state(<int32_t>b) != BLOCK_USED or b not in held:
                raise SchedulerError(f"instance {self.c.instance_id()}: block {b} is not held by request {request_id}")
            if b in seen:
                raise SchedulerError(f"instance {self.c.instance_id()}: block {b} named twice")
            seen.add(b)
        raise SchedulerError(f"instance {self.c.instance_id()}: free_blocks failed with status {status}")

    def free_request(self, int64_t request_id):
        """Free every block a request holds here, own or lent; returns how many."""
        return self.c.free_request(request_id)

    def allocate_batch(self, request_ids, counts):
        """Allocate ``counts[i]`` blocks for ``request_ids[i]`` (home here), all or nothing.

        Returns ``(blocks, offsets)``: int32 ``[sum(counts)]`` and int32 ``[B+1]``; request i's
        blocks are ``blocks[offsets[i]:offsets[i+1]]`` (CSR layout, no per-request lists).
        """
        cdef int64_t[::1] rids = np.ascontiguousarray(request_ids, dtype=np.int64)
        cdef int64_t[::1] ns = np.ascontiguousarray(counts, dtype=np.int64)
        cdef Py_ssize_t b, nreq = rids.shape[0]
        cdef int64_t total = 0
        if ns.shape[0] != nreq:
            raise ValidationError("counts", len(counts), f"must have one count per request ({nreq})")
        for b in range(nreq):
            if ns[b] < 0:
                raise ValidationError("counts", ns[b], "must be >= 0")
            total += ns[b]
        if total > self.c.num_free():
            raise CapacityError(
                f"instance {self.c.instance_id()}: cannot allocate {total} blocks for a batch of {nreq} "
                f"requests: {self.c.num_free()} of {self.c.num_blocks()} free"
            )
        out_arr = np.empty(total, dtype=np.int32)
        off_arr = np.empty(nreq + 1, dtype=np.int32)
        cdef int32_t[::1] out = out_arr
        cdef int32_t[::1] off = off_arr
        cdef Py_ssize_t pos = 0
        off[0] = 0
        for b in range(nreq):
            if ns[b]:
                self.c.allocate_into(rids[b], <int32_t>ns[b], &out[pos])
            pos += ns[b]
            off[b + 1] = <int32_t>pos
        return out_arr, off_arr

    def free_requests(self, request_ids):
        """Free every block of each request; returns the total freed."""
        cdef int64_t[::1] rids = np.ascontiguousarray(request_ids, dtype=np.int64)
        cdef Py_ssize_t b
        cdef int64_t n = 0
        for b in range(rids.shape[0]):
            n += self.c.free_request(rids[b])
        return n

    def blocks_of(self, int64_t request_id):
        cdef const vector[int32_t]* held = self.c.blocks_of(request_id)
        if held == NULL:
            return []
        return held[0]

    def owner(self, int64_t block):
        """(request id, home instance) of a used block, None for a free or reserved one."""
        self._check_block(block)
        if self.c.state(<int32_t>block) != BLOCK_USED:
            return None
        return self.c.owner_request(<int32_t>block), self.c.owner_home(<int32_t>block)

    def state(self, int64_t block):
        self._check_block(block)
        return self.c.state(<int32_t>block)

    # ---- prefix caching ----------------------------------------------------------------------

    @property
    def num_cached(self):
        """Blocks named by a hash (prefix caching), in use or not."""
        return self.c.num_cached()

    @property
    def num_evictable(self):
        """Cached blocks no request holds (counted in ``num_free``)."""
        return self.c.num_evictable()

    @property
    def num_evicted(self):
        """Cached blocks evicted so far (taken by an allocation)."""
        return self.c.num_evicted()

    def register_block(self, int64_t block, int64_t block_hash):
        """Name a used block by ``block_hash``; False when the hash names another block
        already (or the block is named already)."""
        self._check_block(block)
        cdef int32_t status = self.c.register_block(<int32_t>block, block_hash)
        if status < 0:
            raise SchedulerError(f"instance {self.c.instance_id()}: block {block} is not in use: it cannot be cached")
        return status == 1

    def lookup(self, int64_t home, hashes):
        """How many of ``hashes``, from the first, name blocks cached here for ``home``."""
        cdef int64_t[::1] hs = _hashes(hashes)
        if hs.shape[0] == 0:
            return 0
        return self.c.lookup(<int32_t>home, &hs[0], <int32_t>hs.shape[0])

    def lookup_evictable(self, int64_t home, hashes):
        """Of the blocks ``lookup`` finds, how many no request holds (taking them uses free blocks)."""
        cdef int64_t[::1] hs = _hashes(hashes)
        if hs.shape[0] == 0:
            return 0
        return self.c.lookup_evictable(<int32_t>home, &hs[0], <int32_t>hs.shape[0])

    def acquire(self, int64_t request_id, int64_t home, hashes):
        """Take the longest cached run of ``hashes`` (from the first) for request
        ``request_id`` of instance ``home``; returns its blocks (appended to the request's)."""
        cdef vector[int32_t] out
        cdef const vector[int32_t]* held
        cdef int64_t[::1] hs = _hashes(hashes)
        if not 0 <= home <= INT32_MAX:
            raise ValidationError("home", home, f"must be in [0, {INT32_MAX}]")
        if hs.shape[0] == 0:
            return []
        cdef int32_t status = self.c.acquire(request_id, <int32_t>home, &hs[0], <int32_t>hs.shape[0], out)
        if status < 0:
            held = self.c.blocks_of(request_id)
            raise SchedulerError(f"instance {self.c.instance_id()}: request {request_id} is held here for instance "
                                 f"{self.c.owner_home(held[0][0])}, not {home}")
        return out

    def reset_cache(self):
        """Forget every cached block no request holds; returns how many."""
        return self.c.reset_cache()

    def refs(self, int64_t block):
        """How many requests hold a block (0 unless used)."""
        self._check_block(block)
        return self.c.refs(<int32_t>block)

    def block_hash(self, int64_t block):
        """The hash naming a block, or None."""
        self._check_block(block)
        return self.c.block_hash(<int32_t>block) if self.c.hashed(<int32_t>block) else None

    # ---- loans -------------------------------------------------------------------------------

    @property
    def lendable(self):
        """Blocks this pool could lend now: free ones, capped by the lending cap."""
        return self.c.lendable()

    def try_reserve(self, int64_t borrower, int64_t n, double now, double ttl):
        """Reserve ``n`` blocks for instance ``borrower`` until ``now + ttl``.

        Returns a reservation id, or None when the blocks are not there (free memory or the
        lending cap): first come, first served. Times are seconds as doubles, as in the C++.
        """
        if n <= 0:
            raise ValidationError("n", n, "must be >= 1")
        if not 0 <= borrower <= INT32_MAX:
            raise ValidationError("borrower", borrower, f"must be in [0, {INT32_MAX}]")
        if borrower == self.c.instance_id():
            raise SchedulerError(f"instance {self.c.instance_id()} cannot lend to itself")
        if n > INT32_MAX:  # more than any pool has free
            return None
        cdef int64_t rid = self.c.try_reserve(<int32_t>borrower, <int32_t>n, now, ttl)
        if rid < 0:
            return None
        return rid

    def commit(self, int64_t reservation_id, int64_t request_id, double now):
        """Turn a reservation into blocks of the borrower's request ``request_id``."""
        cdef vector[int32_t] out
        cdef const vector[int32_t]* held
        cdef const CReservation* r = self.c.reservation(reservation_id)
        me = self.c.instance_id()
        if r == NULL:
            raise SchedulerError(f"instance {me}: unknown reservation {reservation_id}")
        # Kept for the messages: an expired commit releases the reservation.
        cdef int32_t borrower = r.borrower
        cdef double expires_at = r.expires_at
        cdef int32_t status = self.c.commit(reservation_id, request_id, now, out)
        if status >= 0:
            return out
        if status == POOL_EXPIRED:
            raise CapacityError(f"instance {me}: reservation {reservation_id} expired at {expires_at} (now {now})")
        held = self.c.blocks_of(request_id)
        raise SchedulerError(f"instance {me}: request {request_id} is held here for instance "
                             f"{self.c.owner_home(held[0][0])}, not {borrower}")

    def cancel(self, int64_t reservation_id):
        cdef int32_t n = self.c.cancel(reservation_id)
        if n < 0:
            raise SchedulerError(f"instance {self.c.instance_id()}: unknown reservation {reservation_id}")
        return n

    def expire(self, double now):
        """Give back every reservation that expired before ``now``; returns blocks released."""
        return self.c.expire(now)

    # ---- this instance's requests held elsewhere ---------------------------------------------

    def add_borrowed(self, int64_t request_id, int64_t home, int64_t n):
        if home != self.c.instance_id():
            raise SchedulerError(
                f"instance {self.c.instance_id()} never borrows for request {request_id} of instance {home}")
        cdef int64_t room = INT32_MAX - self.c.num_borrowed()  # the counters are int32
        if not 0 <= n <= room:
            raise ValidationError("n", n, f"must be in [0, {room}] (at most {INT32_MAX} blocks borrowed in all)")
        self.c.add_borrowed(request_id, <int32_t>home, <int32_t>n)

    def remove_borrowed(self, int64_t request_id, int64_t n):
        cdef int32_t have = self.c.borrowed_by(request_id)
        if n < 0 or n > have:
            raise ValidationError("n", n, f"must be in [0, {have}] (blocks request {request_id} borrowed)")
        self.c.remove_borrowed(request_id, <int32_t>n)

    def borrowed_by(self, int64_t request_id):
        return self.c.borrowed_by(request_id)

    # ---- internals ---------------------------------------------------------------------------

    cdef _check_block(self, int64_t block):
        if not 0 <= block < self.c.num_blocks():
            raise ValidationError("block", block, f"must be in [0, {self.c.num_blocks() - 1}]")

    def __repr__(self):
        c = self.counters()
        cached = f", cached={self.c.num_cached()}" if self.c.num_cached() else ""
        return (f"BlockPool(instance={self.c.instance_id()}, capacity={c.capacity}, free={c.free}, "
                f"used={c.used}, lent={c.lent}, reserved={c.reserved}, borrowed={c.borrowed}{cached})")


cdef int64_t[::1] _hashes(hashes):
    arr = np.ascontiguousarray(hashes, dtype=np.int64)
    if arr.ndim != 1:
        raise ValidationError("hashes", arr.shape, "must be one-dimensional")
    return arr
