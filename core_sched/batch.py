"""Pure-Python twin of the batch planner (``core_sched/_batch.pyx``).

Same behaviour, same plans, same errors: the test suite runs against both and checks, on
random workloads, that the two produce identical plans. The algorithm is described once, in
the class docstring below; ``_batch.pyx`` mirrors this file line for line where it can.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from ..errors import RequestTooLongError, SchedulerError, ValidationError
from .types import BatchStats, LoanRequest, Preemption, PrefixClaim, ScheduledChunk, StepPlan

__all__ = ["BatchPlanner"]


class _Request:
    __slots__ = ("request_id", "prompt_len", "max_tokens", "num_tokens", "num_computed", "running")

    def __init__(self, request_id: int, prompt_len: int, max_new_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.max_tokens = prompt_len + max_new_tokens  # num_tokens never passes this
        self.num_tokens = prompt_len  # prompt + outputs so far
        self.num_computed = 0  # tokens whose KV is in the block tables
        self.running = False


class BatchPlanner:
    """The batch planner of one instance: continuous batching with chunked prefill.

    Each request is in one of two queues. ``waiting`` (FCFS; a preempted request goes back to
    its front) holds requests with no blocks; ``running`` (in order of admission) holds the
    requests whose KV is being built in the instance's block tables. A request has
    ``num_tokens`` (prompt plus outputs so far) and ``num_computed`` (tokens whose KV is in the
    tables); a step computes the KV of tokens ``[num_computed, num_computed + chunk)``::

        request 7, block_size 4, prompt 10, one output sampled so far (num_tokens 11)

        positions  0 1 2 3 | 4 5 6 7 | 8 9 10 .
                  [home  0][B, blk 3][home  5]      runs: (A,[0]) (B,[3]) (A,[5])
                  |<-- num_computed = 10 -->|
                                          chunk = 1 (decode): computes position 10, samples 11

    A chunk that reaches ``num_tokens`` yields a sampled token: the engine then calls
    ``append_output`` (``num_tokens += 1``), or ``finish`` when the request is done.

    ``schedule(loan_available)`` plans one step under a budget of ``max_num_batched_tokens``
    tokens and at most ``max_num_seqs`` running requests (the vLLM v1 scheduler's shape):

    1. Running requests, in admission order, while tokens are left: a decode gets 1 token, a
       partially prefilled request its next chunk, cut to the tokens left. The request's
       table needs ``k = tables.blocks_needed(rid, chunk)`` more blocks; while the pool is
       short of them by ``s``:

       a. if the cluster can lend ``s`` blocks (``loan_available``, which each loan asked for
          in this step uses up), ask for them (``LoanRequest(rid, s)``) and skip the request
          this step: it keeps its blocks, and once the engine has reserved them on a creditor
          it calls ``add_loan``, which appends them to the request's table;
       b. otherwise preempt the newest running request (recompute mode: all its blocks are
          freed, local ones here and remote ones by the caller, from ``StepPlan.preempted``;
          ``num_computed = 0``; it goes to the front of ``waiting``), and look again. When the
          newest is the needy request itself, it is preempted and the step goes on without it.

       Only requests after the needy one are ever preempted, so no request already planned in
       this step loses its blocks.
    2. Waiting requests, FCFS, only in a step that asked for no loan and preempted nobody
       (memory is short: admitting now would take blocks the running requests need next),
       while tokens and sequence slots are left: the first chunk is the whole prompt (plus
       outputs, for a preempted request) cut to the tokens left (chunked prefill). A request
       is admitted only when its whole context fits (free blocks here plus ``loan_available``:
       a request admitted on less would be preempted again as soon as it or the running ones
       grow, and recompute each time) and its first chunk's blocks are free here: waiting
       requests never borrow or preempt, they wait for memory, and the queue stops at the first
       that does not fit (FCFS). On an idle instance (nothing running, so nothing here will
       free blocks) the head's first chunk shrinks to the free blocks, and the rest is borrowed
       as it runs.

    Every planned chunk has its room made before ``schedule`` returns (blocks allocated from
    the pool and appended to the table, ``tables.append_tokens(rid, chunk)``,
    ``num_computed += chunk``), so ``tables.batch_tables`` / ``tables.slot_mapping`` already
    cover the step. The block tables hold exactly the running requests.

    The loans of one step must be answered (``add_loan``) or dropped before the next
    ``schedule``: the planner keeps no pending loans, and a request whose loan never came
    simply asks again (or preempts) in the next step.

    ``add_request`` rejects a request that could never fit in the whole cluster
    (``ceil((prompt_len + max_new_tokens) / block_size) > cluster_blocks``) with
    ``RequestTooLongError`` instead of queueing it forever. Everything is deterministic.

    Prefix caching: a request may come with ``block_hashes``, the hashes naming its prompt's
    full blocks (each of the block's tokens and of everything before it). At admission the
    longest run of them found cached (in this pool, ``BlockPool.lookup``; or on another
    instance, in the directory that ``remember_remote`` fills) is reused: local blocks are
    taken by reference (``BlockPool.acquire``), remote ones are put in the table as lent and
    returned as ``StepPlan.claims`` for the engine to take there; the request starts at
    ``num_computed = hits * block_size``. At least its last token is always computed (its
    logits are needed), so at most ``(num_tokens - 1) // block_size`` blocks are reused. The
    admission checks count what reusing takes: a cached block no request holds leaves the
    free blocks, one in use does not. On an idle instance whose every free block is the
    request's own cached prefix, the request is admitted with a loan for its first chunk
    (``LoanRequest``) and computes from the next step, as a running request short of blocks.
    """

    def __init__(self, pool, tables, max_num_seqs: int, max_num_batched_tokens: int, cluster_blocks: int) -> None:
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
        self._requests: dict[int, _Request] = {}
        self._running: list[int] = []  # admission order
        self._waiting: deque[int] = deque()  # FCFS; preempted requests at the front
        self._num_steps = 0
        self._num_preemptions = 0
        self._num_loans = 0
        self._hashes: dict[int, list[int]] = {}  # request -> its prompt's block hashes
        # hash -> (instance, block): blocks of this home's requests cached on other instances,
        # oldest first, at most cluster_blocks of them.
        self._remote: OrderedDict[int, tuple[int, int]] = OrderedDict()
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
    def max_num_seqs(self) -> int:
        return self._max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self._max_num_batched_tokens

    @property
    def cluster_blocks(self) -> int:
        """Total KV blocks of the cluster, for admission; set it when instances join or leave."""
        return self._cluster_blocks

    @cluster_blocks.setter
    def cluster_blocks(self, value: int) -> None:
        _check_cluster_blocks(value, self._pool.num_blocks)
        self._cluster_blocks = value

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    @property
    def waiting_blocks(self) -> int:
        """Blocks the head waiting request needs for its first chunk (a full token budget)."""
        if not self._waiting:
            return 0
        head = self._requests[self._waiting[0]]
        return _cdiv(min(head.num_tokens, self._max_num_batched_tokens), self._block_size)

    def running_ids(self) -> list[int]:
        return list(self._running)

    def waiting_ids(self) -> list[int]:
        return list(self._waiting)

    def has_request(self, request_id: int) -> bool:
        return request_id in self._requests

    def is_running(self, request_id: int) -> bool:
        return self._get(request_id).running

    def num_tokens(self, request_id: int) -> int:
        return self._get(request_id).num_tokens

    def num_computed(self, request_id: int) -> int:
        return self._get(request_id).num_computed

    def statistics(self) -> BatchStats:
        return BatchStats(
            len(self._running),
            len(self._waiting),
            self.waiting_blocks,
            self._num_steps,
            self._num_preemptions,
            self._num_loans,
            self._prefix_query_tokens,
            self._prefix_hit_tokens,
        )

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: int, prompt_len: int, max_new_tokens: int, block_hashes=None) -> None:
        """Queue a request (FCFS), or reject one that could never fit in the cluster.
        ``block_hashes``: the hashes naming its prompt's full blocks (prefix caching)."""
        if prompt_len < 1:
            raise ValidationError("prompt_len", prompt_len, "must be >= 1")
        if max_new_tokens < 1:
            raise ValidationError("max_new_tokens", max_new_tokens, "must be >= 1")
        if request_id in self._requests:
            raise SchedulerError(f"request {request_id} is already in the batch planner")
        total = prompt_len + max_new_tokens
        blocks = _cdiv(total, self._block_size)
        if blocks > self._cluster_blocks:
            raise RequestTooLongError(
                f"request {request_id} needs {blocks} blocks ({total} tokens) "
                f"but the cluster has {self._cluster_blocks} blocks"
            )
        hashes = _check_hashes(block_hashes, prompt_len, self._block_size)
        self._requests[request_id] = _Request(request_id, prompt_len, max_new_tokens)
        if hashes:
            self._hashes[request_id] = hashes
        self._waiting.append(request_id)

    # ---- the directory of this home's blocks cached on other instances -----------------------

    def remember_remote(self, instance: int, blocks, hashes) -> None:
        """Blocks of a request of this home that ``instance`` keeps cached (named by
        ``hashes``) now that the request let them go: later requests may reuse them there."""
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

    def forget_remote(self, instance: int, hashes=None) -> int:
        """Forget blocks cached on ``instance`` (those named by ``hashes``, or all); returns how
        many were known (its claim failed, or the instance was lost)."""
        if hashes is None:
            gone = [h for h, (i, _) in self._remote.items() if i == instance]
        else:
            gone = [h for h in _hash_list(hashes) if h in self._remote and self._remote[h][0] == instance]
        for h in gone:
            del self._remote[h]
        return len(gone)

    @property
    def num_remote_cached(self) -> int:
        return len(self._remote)

    def append_output(self, request_id: int) -> None:
        """Record the token sampled at the end of the request's last chunk."""
        r = self._get(request_id)
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

    def add_loan(self, request_id: int, instance: int, block_ids) -> None:
        """Append blocks lent by ``instance`` (reserved there by the engine) to a running request."""
        r = self._requests.get(request_id)
        if r is None or not r.running:
            raise SchedulerError(f"request {request_id} is not running: give the loan back to instance {instance}")
        if instance == self._home:
            raise SchedulerError(f"instance {instance} cannot lend to itself (request {request_id})")
        self._tables.append_blocks(request_id, instance, block_ids)
        self._pool.add_borrowed(request_id, self._home, len(block_ids))

    def finish(self, request_id: int) -> list:
        """Forget a request and free its blocks; returns its remote runs for the caller to free."""
        self._get(request_id)
        return self._drop(request_id)

    def abort(self, request_id: int) -> list:
        """``finish``, except that an unknown (or already finished) request is a no-op."""
        if request_id not in self._requests:
            return []
        return self._drop(request_id)

    def preempt(self, request_id: int) -> tuple:
        """Preempt a running request now, in recompute mode (as ``schedule`` does when memory
        runs short: its blocks freed, ``num_computed = 0``, first in ``waiting``); returns its
        remote runs for the caller to free. A waiting request is left as it is (returns ())."""
        r = self._get(request_id)
        if not r.running:
            return ()
        self._running.remove(request_id)
        self._num_preemptions += 1
        return self._preempt(request_id)

    # ---- the step ----------------------------------------------------------------------------

    def schedule(self, loan_available: int = 0) -> StepPlan:
        """Plan one step; see the class docstring."""
        if loan_available < 0:
            raise ValidationError("loan_available", loan_available, "must be >= 0")
        budget = self._max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Preemption] = []
        loans: list[LoanRequest] = []

        # 1. Running requests, in admission order.
        i = 0
        while i < len(self._running) and budget > 0:
            rid = self._running[i]
            r = self._requests[rid]
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
                victim = self._running.pop()
                preempted.append(Preemption(victim, self._preempt(victim)))
                if victim == rid:
                    scheduled = False
                    break
            if scheduled:
                chunks.append(self._commit(r, chunk, need))
                budget -= chunk
            i += 1

        # 2. Waiting requests, FCFS, only when memory is not short.
        claims: list[PrefixClaim] = []
        if not loans and not preempted:
            while self._waiting and budget > 0 and len(self._running) < self._max_num_seqs:
                rid = self._waiting[0]
                r = self._requests[rid]
                runs, hits, taken = self._match_prefix(rid, r)
                cached = hits * self._block_size
                chunk = min(r.num_tokens - cached, budget)
                need = _cdiv(chunk, self._block_size)
                free = self._pool.num_free - taken  # reusing a cached block no request holds takes a free one
                if _cdiv(r.num_tokens, self._block_size) - hits > free + loan_available:
                    break  # its whole context would not fit: admitting it now would only be undone
                borrow = 0
                if need > free:
                    if self._running:
                        break
                    if free == 0:  # idle, every block here its cached prefix: borrow its first chunk
                        if not hits or need > loan_available:
                            break
                        borrow = need
                    else:
                        chunk = free * self._block_size  # idle instance: take what is free
                        need = free
                self._waiting.popleft()
                r.running = True
                self._running.append(rid)
                self._tables.add_request(rid)
                if rid in self._hashes:
                    self._prefix_query_tokens += r.num_tokens
                    self._prefix_hit_tokens += cached
                if hits:
                    self._reuse(rid, r, runs, claims)
                if borrow:  # it runs from the next step, on the blocks lent (as a running request)
                    loans.append(LoanRequest(rid, borrow))
                    break
                chunks.append(self._commit(r, chunk, need))
                budget -= chunk

        self._num_steps += 1
        self._num_preemptions += len(preempted)
        self._num_loans += len(loans)
        return StepPlan(
            tuple(chunks), tuple(preempted), tuple(loans), self._max_num_batched_tokens - budget, tuple(claims)
        )

    # ---- internals ---------------------------------------------------------------------------

    def _get(self, request_id: int) -> _Request:
        r = self._requests.get(request_id)
        if r is None:
            raise SchedulerError(f"unknown request {request_id}")
        return r

    def _match_prefix(self, rid: int, r: _Request) -> tuple[list, int, int]:
        """The longest cached run of a waiting request's block hashes, as runs
        ``[(instance, hashes, blocks or None for local)]``, with the blocks it covers and how
        many of them are cached here with no request holding them (reusing those takes free
        blocks). Changes nothing."""
        hashes = self._hashes.get(rid)
        if not hashes:
            return [], 0, 0
        hashes = hashes[: (r.num_tokens - 1) // self._block_size]
        runs: list = []
        i = local = 0
        while i < len(hashes):
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
            if runs and runs[-1][0] == instance:
                runs[-1][1].append(hashes[i])
                runs[-1][2].append(block)
            else:
                runs.append((instance, [hashes[i]], [block]))
            i += 1
        return runs, i, local

    def _reuse(self, rid: int, r: _Request, runs: list, claims: list) -> None:
        """Put a newly admitted request's cached prefix in its table (``_match_prefix``)."""
        hits = 0
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

    def _commit(self, r: _Request, chunk: int, need: int) -> ScheduledChunk:
        """Make room for a chunk and mark its KV computed."""
        rid = r.request_id
        if need:
            self._tables.append_blocks(rid, self._home, self._pool.allocate(rid, need))
        self._tables.append_tokens(rid, chunk)
        start = r.num_computed
        r.num_computed += chunk
        return ScheduledChunk(rid, start, chunk, r.num_computed == r.num_tokens)

    def _release(self, request_id: int) -> list:
        """Free every block of a running request; returns its remote runs."""
        runs = self._tables.remove_request(request_id)
        self._pool.free_request(request_id)
        borrowed = self._pool.borrowed_by(request_id)
        if borrowed:
            self._pool.remove_borrowed(request_id, borrowed)
        return [(instance, list(ids)) for instance, ids in runs if instance != self._home]

    def _preempt(self, request_id: int) -> tuple:
        """Recompute-mode preemption of a running request already popped from ``running``."""
        remote = self._release(request_id)
        r = self._requests[request_id]
        r.running = False
        r.num_computed = 0
        self._waiting.appendleft(request_id)
        return tuple((instance, tuple(ids)) for instance, ids in remote)

    def _drop(self, request_id: int) -> list:
        r = self._requests.pop(request_id)
        self._hashes.pop(request_id, None)
        if r.running:
            self._running.remove(request_id)
            return self._release(request_id)
        self._waiting.remove(request_id)
        return []

    def __repr__(self) -> str:
        return (
            f"BatchPlanner(instance={self._home}, running={len(self._running)}, waiting={len(self._waiting)}, "
            f"max_num_seqs={self._max_num_seqs}, max_num_batched_tokens={self._max_num_batched_tokens})"
        )


def _check_cluster_blocks(cluster_blocks: int, local_blocks: int) -> None:
    if cluster_blocks < local_blocks:
        raise ValidationError("cluster_blocks", cluster_blocks, f"must be >= {local_blocks} (this instance's blocks)")


def _hash_list(hashes) -> list[int]:
    out = []
    for h in hashes:
        h = int(h)
        if not -(2**63) <= h < 2**63:
            raise ValidationError("block_hashes", h, "must be int64 values")
        out.append(h)
    return out


def _check_hashes(hashes, prompt_len: int, block_size: int) -> list[int]:
    if hashes is None:
        return []
    hashes = _hash_list(hashes)
    if len(hashes) > prompt_len // block_size:
        raise ValidationError(
            "block_hashes", len(hashes), f"must be at most {prompt_len // block_size} (the prompt's full blocks)"
        )
    return hashes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
