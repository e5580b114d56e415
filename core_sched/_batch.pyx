# distutils: language = c++
"""The compiled batch planner: a Cython class whose bookkeeping lives in C++ containers.

Its pure-Python twin is ``core_sched/batch.py`` (same behaviour, plans and errors); read the
twin's ``BatchPlanner`` docstring for the algorithm. The requests' state sits in an
``unordered_map``, the running queue in a ``vector`` (admission order) and the waiting queue in
a ``deque`` (FCFS, preempted requests at the front). The block pool and block tables are
driven through their Python-level methods: what is compiled here is the planner's own work.
"""

from libc.stdint cimport int64_t
from libcpp.deque cimport deque
from libcpp.unordered_map cimport unordered_map
from libcpp.vector cimport vector

from infinillm.errors import RequestTooLongError, SchedulerError, ValidationError
from collections import OrderedDict

from infinillm.core_sched.types import BatchStats, LoanRequest, Preemption, PrefixClaim, ScheduledChunk, StepPlan
from infinillm.core_sched.batch import _check_hashes, _hash_list

IMPLEMENTATION = "compiled"


cdef struct Request:
    int64_t prompt_len
    int64_t max_tokens      # prompt_len + max_new_tokens: num_tokens never passes it
    int64_t num_tokens      # prompt + outputs so far
    int64_t num_computed    # tokens whose KV is in the block tables
    bint running


cdef inline int64_t cdiv(int64_t a, int64_t b):
    return -((-a) // b)


cdef class BatchPlanner:
    """The batch planner of one instance: continuous batching with chunked prefill.

    The algorithm is documented on the twin, ``infinillm.core_sched.batch.BatchPlanner``.
    """

    cdef object _pool
    cdef object _tables
    cdef int64_t _home
    cdef int64_t _block_size
    cdef int64_t _max_num_seqs
    cdef int64_t _max_num_batched_tokens
    cdef int64_t _cluster_blocks
    cdef unordered_map[int64_t, Request] _requests
    cdef vector[int64_t] _running
    cdef deque[int64_t] _waiting
    cdef int64_t _num_steps
    cdef int64_t _num_preemptions
    cdef int64_t _num_loans
    cdef dict _hashes           # request -> its prompt's block hashes (prefix caching)
    cdef object _remote         # OrderedDict hash -> (instance, block): cached on other instances
    cdef int64_t _prefix_query_tokens
    cdef int64_t _prefix_hit_tokens

    def __init__(self, pool, tables, int64_t max_num_seqs, int64_t max_num_batched_tokens,
                 int64_t cluster_blocks):
        if max_num_seqs < 1:
            raise ValidationError("max_num_seqs", max_num_seqs, "must be >= 1")
        if max_num_batched_tokens < 1:
            raise ValidationError("max_num_batched_tokens", max_num_batched_tokens, "must be >= 1")
        _check_cluster_blocks(cluster_blocks, pool.num_blocks)
        self._pool = pool
        self._tables = tables
        self._home = pool.instance_id
        self._block_size = tables.block_size
        self._max_num_seqs = max_num_seqs
        self._max_num_batched_tokens = max_num_batched_tokens
        self._cluster_blocks = cluster_blocks
        self._num_steps = 0
        self._num_preemptions = 0
        self._num_loans = 0
        self._hashes = {}
        self._remote = OrderedDict()
        self._prefix_query_tokens = 0
        self._prefix_hit_tokens = 0

    # ---- configuration and counters ----------------------------------------------------------

    @property
    def pool(self):
        return self._pool

    @property
    def tables(self):
        return self._tables

    @property
    def max_num_seqs(self):
        return self._max_num_seqs

    @property
    def max_num_batched_tokens(self):
        return self._max_num_batched_tokens

    @property
    def cluster_blocks(self):
        """Total KV blocks of the cluster, for admission; set it when instances join or leave."""
        return self._cluster_blocks

    @cluster_blocks.setter
    def cluster_blocks(self, int64_t value):
        _check_cluster_blocks(value, self._pool.num_blocks)
        self._cluster_blocks = value

    @property
    def num_running(self):
        return self._running.size()

    @property
    def num_waiting(self):
        return self._waiting.size()

    @property
    def num_requests(self):
        return self._requests.size()

    @property
    def waiting_blocks(self):
        """Blocks the head waiting request needs for its first chunk (a full token budget)."""
        return self._waiting_blocks()

    cdef int64_t _waiting_blocks(self):
        if self._waiting.empty():
            return 0
        cdef Request* head = &self._requests[self._waiting.front()]
        return cdiv(min(head.num_tokens, self._max_num_batched_tokens), self._block_size)

    def running_ids(self):
        return [rid for rid in self._running]

    def waiting_ids(self):
        return [rid for rid in self._waiting]

    def has_request(self, int64_t request_id):
        return self._requests.count(request_id) != 0

    def is_running(self, int64_t request_id):
        return self._get(request_id).running

    def num_tokens(self, int64_t request_id):
        return self._get(request_id).num_tokens

    def num_computed(self, int64_t request_id):
        return self._get(request_id).num_computed

    def statistics(self):
        return BatchStats(self._running.size(), self._waiting.size(), self._waiting_blocks(),
                          self._num_steps, self._num_preemptions, self._num_loans,
                          self._prefix_query_tokens, self._prefix_hit_tokens)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, int64_t request_id, int64_t prompt_len, int64_t max_new_tokens, block_hashes=None):
        """Queue a request (FCFS), or reject one that could never fit in the cluster.
        ``block_hashes``: the hashes naming its prompt's full blocks (prefix caching)."""
        cdef Request r
        if prompt_len < 1:
            raise ValidationError("prompt_len", prompt_len, "must be >= 1")
        if max_new_tokens < 1:
            raise ValidationError("max_new_tokens", max_new_tokens, "must be >= 1")
        if self._requests.count(request_id):
            raise SchedulerError(f"request {request_id} is already in the batch planner")
        cdef int64_t total = prompt_len + max_new_tokens
        cdef int64_t blocks = cdiv(total, self._block_size)
        if blocks > self._cluster_blocks:
            raise RequestTooLongError(
                f"request {request_id} needs {blocks} blocks ({total} tokens) "
                f"but the cluster has {self._cluster_blocks} blocks"
            )
        hashes = _check_hashes(block_hashes, prompt_len, self._block_size)
        r.prompt_len = prompt_len
        r.max_tokens = total
        r.num_tokens = prompt_len
        r.num_computed = 0
        r.running = False
        self._requests[request_id] = r
        if hashes:
            self._hashes[request_id] = hashes
        self._waiting.push_back(request_id)

    # ---- the directory of this home's blocks cached on other instances -----------------------

    def remember_remote(self, int64_t instance, blocks, hashes):
        """Blocks of a request of this home that ``instance`` keeps cached; see the twin."""
        blocks, hashes = [int(b) for b in blocks], _hash_list(hashes)
        if instance == self._home:
            raise ValidationError("instance", instance, "must be another instance (this pool caches its own)")
        if len(blocks) != len(hashes):
            raise ValidationError("hashes", len(hashes), f"must name each block ({len(blocks)})")
        for b, h in zip(blocks, hashes):
            self._remote[h] = (instance, b)
            self._remote.move_to_end(h)
        while len(self._remote) > self._cluster_blocks:
            self._remote.popitem(last=False)

    def forget_remote(self, int64_t instance, hashes=None):
        """Forget blocks cached on ``instance`` (those named by ``hashes``, or all); see the twin."""
        if hashes is None:
            gone = [h for h, (i, _) in self._remote.items() if i == instance]
        else:
            gone = [h for h in _hash_list(hashes) if h in self._remote and self._remote[h][0] == instance]
        for h in gone:
            del self._remote[h]
        return len(gone)

    @property
    def num_remote_cached(self):
        return len(self._remote)

    def append_output(self, int64_t request_id):
        """Record the token sampled at the end of the request's last chunk."""
        cdef Request* r = self._get(request_id)
        if not r.running or r.num_computed != r.num_tokens:
            raise SchedulerError(
                f"request {request_id} has no sampled token to append: "
                f"{r.num_computed} of {r.num_tokens} tokens computed"
            )
        if r.num_tokens >= r.max_tokens:
            raise SchedulerError(
                f"request {request_id} already has its {r.max_tokens - r.prompt_len} new tokens (max_new_tokens)"
            )
        r.num_tokens += 1

    def add_loan(self, int64_t request_id, int64_t instance, block_ids):
        """Append blocks lent by ``instance`` (reserved there by the engine) to a running request."""
        if not self._requests.count(request_id) or not self._requests[request_id].running:
            raise SchedulerError(f"request {request_id} is not running: give the loan back to instance {instance}")
        if instance == self._home:
            raise SchedulerError(f"instance {instance} cannot lend to itself (request {request_id})")
        self._tables.append_blocks(request_id, instance, block_ids)
        self._pool.add_borrowed(request_id, self._home, len(block_ids))

    def finish(self, int64_t request_id):
        """Forget a request and free its blocks; returns its remote runs for the caller to free."""
        self._get(request_id)
        return self._drop(request_id)

    def abort(self, int64_t request_id):
        """``finish``, except that an unknown (or already finished) request is a no-op."""
        if not self._requests.count(request_id):
            return []
        return self._drop(request_id)

    def preempt(self, int64_t request_id):
        """Preempt a running request now, in recompute mode; see the twin."""
        cdef Request* r = self._get(request_id)
        cdef size_t k
        if not r.running:
            return ()
        for k in range(self._running.size()):
            if self._running[k] == request_id:
                self._running.erase(self._running.begin() + k)
                break
        self._num_preemptions += 1
        return self._preempt(request_id)

    # ---- the step ----------------------------------------------------------------------------

    def schedule(self, int64_t loan_available=0):
        """Plan one step; see the twin's class docstring."""
        if loan_available < 0:
            raise ValidationError("loan_available", loan_available, "must be >= 0")
        cdef int64_t budget = self._max_num_batched_tokens
        cdef int64_t chunk, need, shortfall, free, rid, victim, hits, taken, cached, borrow
        cdef Request* r
        cdef size_t i = 0
        cdef bint scheduled
        chunks = []
        preempted = []
        loans = []

        # 1. Running requests, in admission order.
        while i < self._running.size() and budget > 0:
            rid = self._running[i]
            r = &self._requests[rid]
            chunk = min(r.num_tokens - r.num_computed, budget)
            if chunk == 0:  # its sampled token was not appended yet: nothing to compute
                i += 1
                continue
            need = self._tables.blocks_needed(rid, chunk)
            scheduled = True
            while need > self._pool.num_free:
                shortfall = need - self._pool.num_free
                if shortfall <= loan_available:
                    loan_available -= shortfall
                    loans.append(LoanRequest(rid, shortfall))
                    scheduled = False
                    break
                victim = self._running.back()
                self._running.pop_back()
                preempted.append(Preemption(victim, self._preempt(victim)))
                if victim == rid:
                    scheduled = False
                    break
            if scheduled:
                chunks.append(self._commit(rid, r, chunk, need))
                budget -= chunk
            i += 1

        # 2. Waiting requests, FCFS, only when memory is not short.
        claims = []
        if not loans and not preempted:
            while (not self._waiting.empty() and budget > 0
                   and <int64_t>self._running.size() < self._max_num_seqs):
                rid = self._waiting.front()
                r = &self._requests[rid]
                runs, hits, taken = self._match_prefix(rid, r)
                cached = hits * self._block_size
                chunk = min(r.num_tokens - cached, budget)
                need = cdiv(chunk, self._block_size)
                free = self._pool.num_free - taken  # reusing a cached block no request holds takes a free one
                if cdiv(r.num_tokens, self._block_size) - hits > free + loan_available:
                    break  # its whole context would not fit: admitting it now would only be undone
                borrow = 0
                if need > free:
                    if not self._running.empty():
                        break
                    if free == 0:  # idle, every block here its cached prefix: borrow its first chunk
                        if not hits or need > loan_available:
                            break
                        borrow = need
                    else:
                        chunk = free * self._block_size  # idle instance: take what is free
                        need = free
                self._waiting.pop_front()
                r.running = True
                self._running.push_back(rid)
                self._tables.add_request(rid)
                if rid in self._hashes:
                    self._prefix_query_tokens += r.num_tokens
                    self._prefix_hit_tokens += cached
                if hits:
                    self._reuse(rid, r, runs, claims)
                if borrow:  # it runs from the next step, on the blocks lent (as a running request)
                    loans.append(LoanRequest(rid, borrow))
                    break
                chunks.append(self._commit(rid, r, chunk, need))
                budget -= chunk

        self._num_steps += 1
        self._num_preemptions += len(preempted)
        self._num_loans += len(loans)
        return StepPlan(tuple(chunks), tuple(preempted), tuple(loans),
                        self._max_num_batched_tokens - budget, tuple(claims))

    # ---- internals ---------------------------------------------------------------------------

    cdef Request* _get(self, int64_t request_id) except NULL:
        if not self._requests.count(request_id):
            raise SchedulerError(f"unknown request {request_id}")
        return &self._requests[request_id]

    cdef tuple _match_prefix(self, int64_t rid, Request* r):
        """The longest cached run of a waiting request's block hashes; see the twin."""
        hashes = self._hashes.get(rid)
        if not hashes:
            return [], 0, 0
        hashes = hashes[: (r.num_tokens - 1) // self._block_size]
        runs = []
        cdef Py_ssize_t i = 0, n = len(hashes)
        cdef int64_t k, local = 0
        while i < n:
            k = self._pool.lookup(self._home, hashes[i:])
            if k:
                runs.append((self._home, hashes[i : i + k], None))
                local += self._pool.lookup_evictable(self._home, hashes[i : i + k])
                i += k
                continue
            hit = self._remote.get(hashes[i])
            if hit is None:
                break
            instance, block = hit
            if runs and runs[len(runs) - 1][0] == instance:  # (no negative indexing: wraparound is off)
                runs[len(runs) - 1][1].append(hashes[i])
                runs[len(runs) - 1][2].append(block)
            else:
                runs.append((instance, [hashes[i]], [block]))
            i += 1
        return runs, i, local

    cdef _reuse(self, int64_t rid, Request* r, list runs, list claims):
        """Put a newly admitted request's cached prefix in its table; see the twin."""
        cdef int64_t hits = 0
        for instance, hashes, blocks in runs:
            if instance == self._home:
                blocks = self._pool.acquire(rid, self._home, hashes)
                self._tables.append_blocks(rid, self._home, blocks)
            else:
                self._tables.append_blocks(rid, instance, blocks)
                self._pool.add_borrowed(rid, self._home, len(blocks))
                claims.append(PrefixClaim(rid, instance, tuple(blocks), tuple(hashes)))
            hits += len(blocks)
        self._tables.append_tokens(rid, hits * self._block_size)
        r.num_computed = hits * self._block_size

    cdef object _commit(self, int64_t rid, Request* r, int64_t chunk, int64_t need):
        """Make room for a chunk and mark its KV computed."""
        if need:
            self._tables.append_blocks(rid, self._home, self._pool.allocate(rid, need))
        self._tables.append_tokens(rid, chunk)
        cdef int64_t start = r.num_computed
        r.num_computed += chunk
        return ScheduledChunk(rid, start, chunk, r.num_computed == r.num_tokens)

    cdef list _release(self, int64_t request_id):
        """Free every block of a running request; returns its remote runs."""
        runs = self._tables.remove_request(request_id)
        self._pool.free_request(request_id)
        borrowed = self._pool.borrowed_by(request_id)
        if borrowed:
            self._pool.remove_borrowed(request_id, borrowed)
        return [(instance, list(ids)) for instance, ids in runs if instance != self._home]

    cdef tuple _preempt(self, int64_t request_id):
        """Recompute-mode preemption of a running request already popped from ``running``."""
        remote = self._release(request_id)
        cdef Request* r = &self._requests[request_id]
        r.running = False
        r.num_computed = 0
        self._waiting.push_front(request_id)
        return tuple((instance, tuple(ids)) for instance, ids in remote)

    cdef list _drop(self, int64_t request_id):
        cdef bint running = self._requests[request_id].running
        cdef size_t k
        self._requests.erase(request_id)
        self._hashes.pop(request_id, None)
        if running:
            for k in range(self._running.size()):
                if self._running[k] == request_id:
                    self._running.erase(self._running.begin() + k)
                    break
            return self._release(request_id)
        for k in range(self._waiting.size()):
            if self._waiting[k] == request_id:
                self._waiting.erase(self._waiting.begin() + k)
                break
        return []

    def __repr__(self):
        return (f"BatchPlanner(instance={self._home}, running={self._running.size()}, "
                f"waiting={self._waiting.size()}, max_num_seqs={self._max_num_seqs}, "
                f"max_num_batched_tokens={self._max_num_batched_tokens})")


def _check_cluster_blocks(int64_t cluster_blocks, int64_t local_blocks):
    if cluster_blocks < local_blocks:
        raise ValidationError("cluster_blocks", cluster_blocks, f"must be >= {local_blocks} (this instance's blocks)")
