# distutils: language = c++
"""The compiled block tables: Cython over ``core_sched/csrc/block_table.hpp``.

Its pure-Python twin is ``core_sched/block_table.py`` (same name, behaviour, results and
errors); ``infinillm.core_sched`` picks one by the ``INFINILLM_CORE`` environment variable, and
the test suite runs against both. Arguments are checked here, in Python terms, in the twin's
order; the C++ core then does the work. The per-step conversions (``batch_tables``,
``slot_mapping``) fill numpy buffers through typed memoryviews in C++ loops.
"""

import operator

import numpy as np

from libc.stdint cimport int32_t, int64_t
from libcpp.vector cimport vector

from block_table cimport CppBlockTables, CRequestTable, TABLE_OK

from infinillm.errors import CapacityError, SchedulerError, ValidationError

IMPLEMENTATION = "compiled"

_INT32_MAX = (1 << 31) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


cdef class BlockTables:
    """Block tables of the requests whose home is one instance.

    Each request's KV is a list of logical blocks; logical block i holds token positions
    [i*block_size, (i+1)*block_size). Consecutive logical blocks on the same instance form a
    run: ``runs(rid) -> [(instance, [block ids]), ...]``. See ``csrc/block_table.hpp``.
    """

    cdef CppBlockTables* c

    def __cinit__(self, block_size):
        block_size = operator.index(block_size)
        if not (1 <= block_size <= 1024 and block_size & (block_size - 1) == 0):
            raise ValidationError("block_size", block_size, "must be a power of two in [1, 1024]")
        self.c = new CppBlockTables(<int32_t>block_size)

    def __dealloc__(self):
        del self.c

    @property
    def block_size(self):
        return self.c.block_size()

    @property
    def num_requests(self):
        return self.c.num_requests()

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id):
        cdef int64_t rid = _request_id(request_id)
        if self.c.add_request(rid) != TABLE_OK:
            raise SchedulerError(f"request {rid} already has a block table")

    def has_request(self, request_id):
        return self.c.has_request(_request_id(request_id))

    def remove_request(self, request_id):
        """Forget a request; returns all its blocks as runs (the caller frees them on their pools)."""
        cdef int64_t rid = _request_id(request_id)
        cdef CRequestTable whole
        if self.c.remove_request(rid, whole) != TABLE_OK:
            raise SchedulerError(f"request {rid} has no block table")
        return _runs_of(&whole)

    def num_tokens(self, request_id):
        return self._table(_request_id(request_id)).num_tokens

    def num_blocks(self, request_id):
        return self._table(_request_id(request_id)).num_blocks()

    def blocks_needed(self, request_id, num_new_tokens):
        """Blocks to append so that ``num_tokens + num_new_tokens`` tokens fit."""
        cdef int64_t rid = _request_id(request_id)
        num_new_tokens = _count(num_new_tokens, "num_new_tokens")
        cdef CRequestTable* t = self._table(rid)
        needed = -(-(t.num_tokens + num_new_tokens) // self.c.block_size())
        return max(0, needed - t.num_blocks())

    # ---- growth ------------------------------------------------------------------------------

    def append_blocks(self, request_id, instance, block_ids):
        """Append blocks on ``instance``: they extend the tail run if it is on ``instance``,
        else they start a new run (the tail spills onto the next run)."""
        cdef int64_t rid = _request_id(request_id)
        cdef int32_t on = _instance(instance, "instance")
        cdef vector[int32_t] ids
        _fill_block_ids(ids, block_ids, "block_ids")
        if self.c.append_blocks(rid, on, ids.data(), <int32_t>ids.size()) != TABLE_OK:
            raise SchedulerError(f"request {rid} has no block table")

    def append_tokens(self, request_id, n):
        """Count ``n`` more tokens as written; the blocks must hold them (else nothing changes)."""
        cdef int64_t rid = _request_id(request_id)
        n = _count(n, "n")
        cdef CRequestTable* t = self._table(rid)
        slots = t.num_blocks() * self.c.block_size()
        if n > slots - t.num_tokens:
            raise CapacityError(
                f"request {rid}: {t.num_tokens} + {n} tokens do not fit in {t.num_blocks()} "
                f"blocks of {self.c.block_size()} tokens ({slots} slots)"
            )
        if n > _INT32_MAX - t.num_tokens:
            raise ValidationError("n", n, f"must be <= {_INT32_MAX - t.num_tokens}: positions are int32")
        self.c.append_tokens(rid, <int64_t>n)

    # ---- queries -----------------------------------------------------------------------------

    def runs(self, request_id):
        return _runs_of(self._table(_request_id(request_id)))

    def locate(self, request_id, position):
        """(instance, block id, offset in the block) of a token position."""
        cdef int64_t rid = _request_id(request_id)
        position = operator.index(position)
        cdef CRequestTable* t = self._table(rid)
        cdef int32_t on = 0, block = 0, offset = 0
        if not 0 <= position < t.num_tokens:
            raise ValidationError("position", position, _positions(rid, t.num_tokens))
        self.c.locate(rid, <int64_t>position, on, block, offset)
        return on, block, offset

    def blocks_on(self, request_id, instance):
        """The request's block ids on ``instance``, in logical order."""
        cdef int64_t rid = _request_id(request_id)
        cdef int32_t on = _instance(instance, "instance")
        cdef vector[int32_t] out
        if self.c.blocks_on(rid, on, out) != TABLE_OK:
            raise SchedulerError(f"request {rid} has no block table")
        return out

    # ---- shrinking and migration -------------------------------------------------------------

    def truncate(self, request_id, num_tokens):
        """Keep the first ``num_tokens`` tokens; drops every block past ceil(num_tokens /
        block_size) (blocks allocated ahead included) and returns them as runs."""
        cdef int64_t rid = _request_id(request_id)
        num_tokens = operator.index(num_tokens)
        cdef CRequestTable* t = self._table(rid)
        cdef CRequestTable dropped
        if not 0 <= num_tokens <= t.num_tokens:
            raise ValidationError(
                "num_tokens", num_tokens, f"must be in [0, {t.num_tokens}] (tokens request {rid} holds)"
            )
        self.c.truncate(rid, <int64_t>num_tokens, dropped)
        return _runs_of(&dropped)

    def move_blocks(self, request_id, src, dst, new_block_ids, keep_last=0):
        """Migration: the last ``len(new_block_ids)`` blocks (logical order) the request has on
        ``src`` before its last ``keep_last`` logical blocks now live on ``dst`` under the new
        ids; returns their old ids (same order). See the twin."""
        cdef int64_t rid = _request_id(request_id)
        cdef int32_t from_ = _instance(src, "src")
        cdef int32_t to = _instance(dst, "dst")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValidationError("keep_last", keep_last, "must be an integer >= 0")
        cdef vector[int32_t] new_ids
        cdef vector[int32_t] old_ids
        _fill_block_ids(new_ids, new_block_ids, "new_block_ids")
        cdef CRequestTable* t = self._table(rid)
        cdef int32_t limit = t.num_blocks() - min(<int32_t>keep_last, t.num_blocks())
        cdef int32_t have = t.count_on(from_, limit)
        if have < <int64_t>new_ids.size():
            raise SchedulerError(
                f"request {rid} has {have} blocks on instance {from_}"
                + (f" before its last {keep_last}" if keep_last else "")
                + f", cannot move {new_ids.size()} to instance {to}"
            )
        self.c.move_blocks(rid, from_, to, new_ids.data(), <int32_t>new_ids.size(), old_ids, <int32_t>keep_last)
        return old_ids

    # ---- per-step conversions for a batch ----------------------------------------------------

    def batch_tables(self, request_ids, instance):
        """What the attention kernel of ``instance`` reads for a batch, int32 arrays [B, M]:

        - ``block_table``: block ids (padding -1),
        - ``block_start``: absolute position of each block's first token (padding 0),
        - ``block_len``: tokens in that block (padding 0).

        Only the blocks on ``instance`` that hold at least one token, in logical order;
        M is the most such blocks of one request, at least 1.
        """
        cdef vector[int64_t] ids
        _fill_request_ids(ids, request_ids)
        cdef int32_t on = _instance(instance, "instance")
        cdef size_t r
        for r in range(ids.size()):
            self._table(ids[r])  # every request must have a table: the first unknown one raises
        cdef int32_t batch = <int32_t>ids.size()
        cdef int32_t width = self.c.batch_width(ids.data(), batch, on)
        block_table = np.empty((batch, width), dtype=np.int32)  # [B, M]
        block_start = np.empty((batch, width), dtype=np.int32)  # [B, M]
        block_len = np.empty((batch, width), dtype=np.int32)  # [B, M]
        cdef int32_t[:, ::1] table_view = block_table
        cdef int32_t[:, ::1] start_view = block_start
        cdef int32_t[:, ::1] len_view = block_len
        if batch:
            self.c.fill_batch_tables(ids.data(), batch, on, width, &table_view[0, 0],
                                     &start_view[0, 0], &len_view[0, 0])
        return block_table, block_start, block_len

    def slot_mapping(self, request_ids, counts):
        """Where ``append_kv`` writes the k/v of the last ``counts[i]`` tokens of each request,
        in batch order: ``instance`` int32 [T] and ``slot`` int64 [T] (block*block_size +
        offset), T = sum(counts)."""
        cdef vector[int64_t] ids
        cdef vector[int64_t] ns
        cdef CRequestTable* t
        cdef size_t i
        _fill_request_ids(ids, request_ids)
        if len(counts) != <Py_ssize_t>ids.size():
            raise ValidationError("len(counts)", len(counts), f"must equal len(request_ids)={ids.size()}")
        total = 0
        for i in range(ids.size()):
            t = self._table(ids[i])
            c = operator.index(counts[i])
            if not 0 <= c <= t.num_tokens:
                raise ValidationError(
                    f"counts[{i}]", c, f"must be in [0, {t.num_tokens}] (tokens request {ids[i]} holds)"
                )
            ns.push_back(c)
            total += c
        instance = np.empty(total, dtype=np.int32)  # [T]
        slot = np.empty(total, dtype=np.int64)  # [T]
        cdef int32_t[::1] instance_view = instance
        cdef int64_t[::1] slot_view = slot
        if total:
            self.c.fill_slot_mapping(ids.data(), ns.data(), <int32_t>ids.size(), &instance_view[0],
                                     &slot_view[0])
        return instance, slot

    # ---- internals ---------------------------------------------------------------------------

    cdef CRequestTable* _table(self, int64_t request_id) except NULL:
        cdef CRequestTable* t = self.c.find(request_id)
        if t == NULL:
            raise SchedulerError(f"request {request_id} has no block table")
        return t

    def __repr__(self):
        return f"BlockTables(block_size={self.c.block_size()}, num_requests={self.c.num_requests()})"


cdef list _runs_of(CRequestTable* t):
    """The runs of a table as [(instance, [block ids]), ...]."""
    cdef list out = []
    cdef list ids
    cdef size_t k
    cdef int32_t i
    for k in range(t.runs.size()):
        ids = []
        for i in range(t.runs[k].start, t.run_end(k)):
            ids.append(t.blocks[i])
        out.append((t.runs[k].instance, ids))
    return out


cdef object _request_id(object value):
    value = operator.index(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValidationError("request_id", value, f"must be in [{_INT64_MIN}, {_INT64_MAX}]")
    return value


cdef int _fill_request_ids(vector[int64_t]& out, object values) except -1:
    for r in values:
        r = operator.index(r)
        if not _INT64_MIN <= r <= _INT64_MAX:
            raise ValidationError(f"request_ids[{out.size()}]", r, f"must be in [{_INT64_MIN}, {_INT64_MAX}]")
        out.push_back(r)
    return 0


cdef object _instance(object value, str field):
    value = operator.index(value)
    if not 0 <= value <= _INT32_MAX:
        raise ValidationError(field, value, f"must be in [0, {_INT32_MAX}]")
    return value


cdef int _fill_block_ids(vector[int32_t]& out, object values, str field) except -1:
    for b in values:
        b = operator.index(b)
        if not 0 <= b <= _INT32_MAX:
            raise ValidationError(f"{field}[{out.size()}]", b, f"must be in [0, {_INT32_MAX}]")
        out.push_back(b)
    return 0


cdef object _count(object value, str field):
    value = operator.index(value)
    if value < 0:
        raise ValidationError(field, value, "must be >= 0")
    if value > _INT64_MAX:
        raise ValidationError(field, value, f"must be <= {_INT64_MAX}")
    return value


cdef str _positions(int64_t request_id, int64_t num_tokens):
    if num_tokens == 0:
        return f"request {request_id} holds no tokens"
    return f"must be in [0, {num_tokens - 1}] (tokens of request {request_id})"
