"""One instance: the model, its paged KV cache, and the scheduler core that feeds it.

``Engine.step()`` is the whole loop of an instance, in nano-vllm's shape::

    plan = batch_planner.schedule()        # which tokens of which requests; blocks allocated
    batch = self._prepare(plan)            # packed input ids, positions, attention metadata
    hidden = model(batch)                  # dense layers here; attention via DistAttention
    tokens = sampler(logits of sampled rows)
    return self._postprocess(plan, tokens) # detokenize, stop checks, free finished requests

The engine is synchronous and owns no event loop: the runtime (``runtime.py``) calls ``step``
from its trio loop (in a worker thread, so the application's loop stays responsive) and hands
requests in and aborts out between steps. Request ids inside the engine are ints (the scheduler
core's); the runtime maps the public string ids onto them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from . import core_sched
from .attention import AttentionMetadata, DistAttentionBackend, KVCache
from .cluster import Peer, RemoteAttention
from .kernels import append_kv, partial_attention, resolve_backend
from .kernels.reference import DecodePlan, build_decode_plan
from .transport import AttentionQuery, AttentionResult
from .config import CacheConfig, SchedulerConfig
from .detokenizer import IncrementalDetokenizer
from .errors import InstanceDeadError, RequestTooLongError, TransportError, ValidationError
from .lending import borrow, loan_size, movable, part_limit
from . import model as _model
from .model import LlamaModel, ModelArgs
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, make_logprobs_dict
from .sampling import Sampler, SamplingParams, make_generator

__all__ = ["Engine", "EngineRequest", "EngineStats"]

log = logging.getLogger("infinillm.engine")

_RID_BITS = 40  # request ids: instance id << 40 | a counter


def block_hashes(token_ids, block_size: int, parent: int | None = None) -> list[int]:
    """The hashes naming the full blocks of ``token_ids`` (prefix caching): each is a 64-bit
    BLAKE2b digest of the previous block's hash and the block's tokens, so it names the block
    and everything before it. ``parent``: the hash of the block before ``token_ids[0]``
    (None at the start). Signed, to fit the scheduler core's int64."""
    tokens = np.asarray(token_ids, dtype=np.int32)
    out: list[int] = []
    prev = b"" if parent is None else int(parent).to_bytes(8, "little", signed=True)
    for i in range(len(tokens) // block_size):
        digest = hashlib.blake2b(prev + tokens[i * block_size : (i + 1) * block_size].tobytes(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little", signed=True))
        prev = digest
    return out


@dataclass(slots=True)
class EngineRequest:
    """A request as the engine tracks it: its tokens, sampling state and outputs so far."""

    request_id: str
    rid: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)  # prompt + outputs
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    arrival: float = 0.0
    first_scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_preemptions: int = 0
    # Prefix caching: the hashes of its full blocks so far, how many of its blocks (from the
    # first) are named where they lie, and which of them lie on creditors ((instance, block) ->
    # hash, for the release to keep them cached there).
    block_hashes: list[int] = field(default_factory=list)
    num_named: int = 0
    remote_named: dict[tuple[int, int], int] = field(default_factory=dict)

    def snapshot(self, finished: bool, error: str | None = None) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=self.detok.output_text,
            token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
        metrics = RequestMetrics(
            arrival_time=self.arrival,
            first_scheduled_time=self.first_scheduled_at,
            first_token_time=self.first_token_at,
            last_token_time=self.last_token_at,
            finished_time=self.last_token_at if finished else None,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_generated_tokens=len(self.output_token_ids),
            num_preemptions=self.num_preemptions,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            metrics=metrics,
            error=error,
        )


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of one instance."""

    instance_id: int
    num_running: int
    num_waiting: int
    kv_capacity_blocks: int
    kv_free_blocks: int
    kv_used_blocks: int
    kv_lent_blocks: int
    kv_borrowed_blocks: int
    kv_reserved_blocks: int
    block_size: int
    num_steps: int
    num_preemptions: int
    generated_tokens: int
    prompt_tokens: int
    max_lent_blocks: int = 0  # its lending cap now (lowered while its device's memory is short)
    memory_total_bytes: int = 0  # its device's memory as last read (0: not watched)
    memory_free_bytes: int = 0
    # Prefix caching: blocks named by a hash here (in use or evictable; evictable ones count as
    # free), and of the tokens of each admission (BatchStats), how many were found cached.
    kv_cached_blocks: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0


class Engine:
    """One instance serving requests end to end (see the module docstring)."""

    def __init__(
        self,
        model: LlamaModel,
        args: ModelArgs,
        tokenizer,
        *,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        num_blocks: int,
        max_model_len: int,
        instance_id: int = 0,
        cluster_blocks: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernel_backend: str | None = None,
        seed: int = 0,
        peers: Mapping[int, Peer] | None = None,
    ) -> None:
        self.model = model
        self.args = args
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = cache.block_size
        self.prefix_caching = cache.enable_prefix_caching
        self.max_model_len = max_model_len
        self.kernel_backend = kernel_backend
        self._cpu_threads = torch.get_num_threads()  # torch's threads for steps that are not decode batches
        self.pool = core_sched.BlockPool(instance_id, num_blocks, cache.max_lent_blocks(num_blocks))
        self.tables = core_sched.BlockTables(cache.block_size)
        self.planner = core_sched.BatchPlanner(
            self.pool,
            self.tables,
            scheduler.max_num_seqs,
            scheduler.max_num_batched_tokens,
            cluster_blocks if cluster_blocks is not None else num_blocks,
        )
        self.kv = KVCache(
            args.num_layers, num_blocks, cache.block_size, args.num_kv_heads, args.head_dim, dtype, self.device
        )
        self.sampler = Sampler(seed)  # unseeded requests share its generator (ModelConfig.seed)
        self.requests: dict[int, EngineRequest] = {}
        # Request ids are unique across the cluster (a creditor's pool keys blocks by request
        # id): the instance id in the high bits, a counter below.
        self._next_rid = (instance_id << _RID_BITS) + 1
        self.peers: dict[int, Peer] = dict(peers or {})
        # The pool has one owner at a time: this engine's planner (in its step) or a debtor's
        # reservation (``lend_*``, on the serving loop). Never held while waiting on a peer.
        self.pool_lock = threading.Lock()
        self.num_loans = 0  # loans granted: a step that only borrowed still made progress
        self.num_failed_claims = 0  # cached blocks gone on a creditor: their requests recomputed (progress too)
        # Peers reported gone (``lose_peer``, any thread) and not yet forgotten (``reap_lost``,
        # between steps): instance -> (blocks it could lend, why).
        self._lost_pending: dict[int, tuple[int, str]] = {}
        self.lost: dict[int, str] = {}  # every peer forgotten so far, and why
        self._lent_to: set[int] = set()  # requests of other homes that hold blocks here
        self.memory = None  # a memory.MemoryWatch when it lends to peers: its device's memory
        self._moves: list[tuple[int, int, int, int]] = []  # migrations to carry out between steps
        self.num_blocks_moved = 0
        self._served_plans: dict[tuple, tuple] = {}  # debtors' decode plans, reused across layers
        self.num_steps = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0

    # ---- requests in and out ----------------------------------------------------------------

    @property
    def instance_id(self) -> int:
        return self.pool.instance_id

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Validate a request; returns its max new tokens. Raises before anything is queued."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValidationError("prompt_token_ids", [], "must hold at least one token")
        if n >= self.max_model_len:
            raise ValidationError(
                "prompt", f"<{n} tokens>", f"must be shorter than max_model_len={self.max_model_len} tokens"
            )
        vocab = self.args.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValidationError("prompt_token_ids", bad[0], f"must be token ids in [0, {vocab - 1}]")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValidationError("stop_token_ids", bad[0], f"must be token ids in [0, {vocab - 1}]")
        room = self.max_model_len - n
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        need = -(-(n + max_new) // self.block_size)
        cluster = self.planner.cluster_blocks
        if need > cluster:
            raise RequestTooLongError(
                f"request of {n} prompt tokens + {max_new} new tokens needs {need} KV blocks "
                f"({need * self.block_size} tokens) but the cluster has {cluster} blocks "
                f"({cluster * self.block_size} tokens)"
            )
        return max_new

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
        output_token_ids: list[int] | tuple[int, ...] = (),
    ) -> int:
        """Queue a request. ``output_token_ids``: tokens it had generated already, elsewhere
        (its home was lost): it resumes after them, as if it had made them here (its text,
        held-back characters, stop strings, penalties and limits count them; their logprobs
        are empty placeholders, the runtime puts back the ones it had; a seeded generator is
        advanced past the draws they took)."""
        max_new = self.check_request(prompt_token_ids, params)
        done = [int(t) for t in output_token_ids]
        if len(done) >= max_new:
            raise ValidationError("output_token_ids", f"<{len(done)} tokens>", f"must be fewer than the request's {max_new} new tokens")
        rid = self._next_rid
        self._next_rid += 1
        req = EngineRequest(
            request_id=request_id,
            rid=rid,
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            max_new_tokens=max_new,
            generator=make_generator(params.seed) if params.seed is not None else None,
            detok=IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids), params, max_model_len=self.max_model_len),
            token_ids=list(prompt_token_ids),
            logprobs=[] if params.logprobs is not None else None,
            arrival=time.monotonic(),
        )
        for tok in done:
            if req.detok.append(tok) is not None:
                raise ValidationError("output_token_ids", tok, "ends the request: it is already finished")
        if req.generator is not None and params.temperature > 0:  # one exponential race per token (Sampler)
            draw = torch.empty(self.args.vocab_size, dtype=torch.float32, device=req.generator.device)
            for _ in done:
                draw.exponential_(generator=req.generator)
        req.token_ids += done
        req.output_token_ids += done
        if req.logprobs is not None:
            req.logprobs += [{} for _ in done]
        if self.prefix_caching:
            req.block_hashes = block_hashes(req.token_ids, self.block_size)
        self.planner.add_request(rid, len(prompt_token_ids) + len(done), max_new - len(done), req.block_hashes or None)
        self.requests[rid] = req
        self.prompt_tokens += len(prompt_token_ids)
        return rid

    def abort(self, rid: int) -> RequestOutput | None:
        """Abort a request: free every block it holds; returns its final output."""
        return self._end(rid, "abort")

    def fail(self, rid: int, error: str) -> RequestOutput | None:
        """End a request with ``error``, freeing every block it holds; its final output."""
        return self._end(rid, "error", error)

    def _end(self, rid: int, reason: str, error: str | None = None) -> RequestOutput | None:
        req = self.requests.pop(rid, None)
        if req is None:
            return None
        with self.pool_lock:
            runs = self.planner.abort(rid)
        self._release_remote(rid, runs, req)
        req.detok.finish(reason)
        req.finish_reason, req.stop_reason = reason, None
        return req.snapshot(finished=True, error=error)

    def placement(self, rid: int) -> dict[int, int]:
        """How many blocks each instance holds of a request in the block tables."""
        held: dict[int, int] = {}
        for instance, blocks in self.tables.runs(rid):
            held[instance] = held.get(instance, 0) + len(blocks)
        return held

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    # ---- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule, run and postprocess one batch; the outputs of the requests it touched.

        If running the batch fails, the requests of this step end with ``finish_reason="error"``
        (their blocks freed; the ones that already finished in this step keep their output);
        every other request is untouched and goes on. A failure in scheduling itself raises.
        """
        outputs: list[RequestOutput] = self.reap_lost() if self._lost_pending else []
        if self._moves:
            self._run_moves()
        loan_available = sum(p.lendable() for p in self.peers.values())
        with self.pool_lock:
            plan = self.planner.schedule(loan_available)
        for p in plan.preempted:  # recompute: back in the planner's waiting queue, tokens kept here
            req = self.requests[p.request_id]
            req.num_preemptions += 1
            self._release_remote(p.request_id, p.remote_runs, req)
            self._unname(req)
        if plan.claims:
            plan = self._claim(plan)
        for loan in plan.loans:
            if self.planner.is_running(loan.request_id):  # (not one a failed claim preempted)
                self._borrow(loan.request_id, loan.num_blocks)
        if not plan.chunks:
            return outputs
        self.num_steps += 1
        try:
            self._run(plan, outputs)
            if not self.requests:  # idle: the stepping thread gets torch's threads back
                self._torch_threads(None)
        except Exception as exc:  # noqa: BLE001 - ends this step's requests, not the engine
            if isinstance(exc, InstanceDeadError) and self._lost_pending:
                # A creditor died under the step: nothing was sampled; its requests compute
                # their tokens again, here or on the survivors, and the others go on.
                log.warning("step %d: %s; its %d requests are recomputed", self.num_steps, exc, len(plan.chunks))
                for c in plan.chunks:
                    self._preempt_now(c.request_id)
                outputs.extend(self.reap_lost())
                return outputs
            log.exception("step %d failed; ending its %d requests", self.num_steps, len(plan.chunks))
            error = f"{type(exc).__name__}: {exc}"
            for c in plan.chunks:
                out = self.fail(c.request_id, error)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _run(self, plan, outputs: list[RequestOutput]) -> None:
        """Run a plan through the model and sampler; append each request's snapshot."""
        now = time.monotonic()
        for c in plan.chunks:
            req = self.requests[c.request_id]
            if req.first_scheduled_at is None:
                req.first_scheduled_at = now
        input_ids, positions, meta, remote, sample_rows, sampled = self._prepare(plan)
        attn = DistAttentionBackend(self.kv, meta, backend=self.kernel_backend, remote=remote,
                                    layer_windows=self.model.args.layer_windows)
        self._torch_threads(plan.num_batched_tokens)
        hidden = self.model(input_ids, positions, attn)
        if self.prefix_caching:
            self._name_blocks(plan)
        if not sampled:
            return
        logits = self.model.compute_logits(hidden[sample_rows])
        reqs = [self.requests[rid] for rid in sampled]
        penalties = any(r.params.has_penalties for r in reqs)
        result = self.sampler.sample(
            logits,
            [r.params for r in reqs],
            [r.generator for r in reqs],
            mask_ids=[r.detok.mask_ids() for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs] if penalties else None,
            output_token_ids=[r.output_token_ids for r in reqs] if penalties else None,
        )
        rows = result.tolist([r.params.logprobs for r in reqs])
        now = time.monotonic()
        for req, row in zip(reqs, rows):
            tok = row.token_id
            req.token_ids.append(tok)
            req.output_token_ids.append(tok)
            self.generated_tokens += 1
            if req.first_token_at is None:
                req.first_token_at = now
            req.last_token_at = now
            if req.logprobs is not None:
                req.cumulative_logprob += row.logprob
                req.logprobs.append(
                    make_logprobs_dict(tok, row.logprob, row.rank, row.top_token_ids, row.top_logprobs,
                                       req.detok.decode_token)
                )
            # The detokenizer decides every finish: EOS, stop ids and strings, max_tokens and
            # max_model_len (max_new_tokens is the smaller of the two, so the planner agrees).
            stop = req.detok.append(tok)
            if stop is not None:
                req.finish_reason, req.stop_reason = stop.finish_reason, stop.stop_reason
                with self.pool_lock:
                    runs = self.planner.finish(req.rid)
                self._release_remote(req.rid, runs, req)
                del self.requests[req.rid]
                outputs.append(req.snapshot(finished=True))
            else:
                self.planner.append_output(req.rid)
                outputs.append(req.snapshot(finished=False))

    def _torch_threads(self, num_tokens: int | None) -> None:
        """A CPU step on the quantised weights (a decode batch) runs torch's own operations on
        one thread: they are small, and waking torch's other threads for each costs more than
        they save (torch's OpenMP team per calling thread), while the quantised products use
        every core themselves; other steps (``num_tokens`` None: the engine went idle) get
        torch's threads back. The count is switched only when the kind of step changes
        (switching costs a few hundred microseconds), in the thread running the step (OpenMP's
        setting is per thread; MKL's, which ``torch.set_num_threads`` sets too, is the process's:
        while a decode batch runs, an application's own MKL products in other threads use one
        thread). bench_generate: docs/PERFORMANCE.md."""
        if self.device.type != "cpu" or not self.model.num_quantized:
            return
        small = num_tokens is not None and num_tokens <= _model.QUANT_MAX_TOKENS
        want = 1 if small else self._cpu_threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _prepare(self, plan):
        """Pack the plan's chunks into model inputs and attention metadata."""
        rids = [c.request_id for c in plan.chunks]
        counts = [c.num_tokens for c in plan.chunks]
        ids_parts, pos_parts = [], []
        sample_rows: list[int] = []
        sampled: list[int] = []
        offset = 0
        for c in plan.chunks:
            req = self.requests[c.request_id]
            ids_parts.append(req.token_ids[c.start : c.start + c.num_tokens])
            pos_parts.append(np.arange(c.start, c.start + c.num_tokens, dtype=np.int64))
            offset += c.num_tokens
            if c.samples:
                sample_rows.append(offset - 1)
                sampled.append(c.request_id)
        dev = self.device
        input_ids = torch.tensor([t for part in ids_parts for t in part], dtype=torch.int64, device=dev)
        positions_np = np.concatenate(pos_parts)
        positions = torch.from_numpy(positions_np).to(dev)
        cu = np.zeros(len(counts) + 1, dtype=np.int32)
        np.cumsum(counts, out=cu[1:])
        q_pos = positions_np.astype(np.int32)
        bt, bstart, blen = self.tables.batch_tables(rids, self.instance_id)
        instances, all_slots = self.tables.slot_mapping(rids, counts)
        here = instances == self.instance_id  # [T]: the new k, v written in this cache
        kv_rows, slots = None, all_slots
        if not here.all():
            kv_rows = torch.from_numpy(np.flatnonzero(here)).to(dev)
            slots = all_slots[here]
        meta = AttentionMetadata(
            cu_q=torch.from_numpy(cu).to(dev),
            q_pos=torch.from_numpy(q_pos).to(dev),
            block_table=torch.from_numpy(bt).to(dev),
            block_start=torch.from_numpy(bstart).to(dev),
            block_len=torch.from_numpy(blen).to(dev),
            slot_mapping=torch.from_numpy(slots).to(dev),
            kv_rows=kv_rows,
        )
        remote = self._remote_attention(rids, cu, q_pos, instances, all_slots)
        return input_ids, positions, meta, remote, torch.tensor(sample_rows, dtype=torch.int64, device=dev), sampled

    def _remote_attention(self, rids, cu, q_pos, instances, slots) -> list[RemoteAttention]:
        """One ``RemoteAttention`` per creditor holding blocks of the step's requests (only the
        rows of those requests travel; requests with every block here are not in any)."""
        if not self.peers:  # one instance: nothing is anywhere else
            return []
        on: dict[int, list[int]] = {}  # creditor -> indices (in rids) of the requests it holds blocks of
        for b, rid in enumerate(rids):
            if self.pool.borrowed_by(rid):
                for instance in {i for i, _ in self.tables.runs(rid)} - {self.instance_id}:
                    on.setdefault(instance, []).append(b)
        remote = []
        for instance, idx in sorted(on.items()):
            sub = [rids[b] for b in idx]
            rows = np.concatenate([np.arange(cu[b], cu[b + 1], dtype=np.int64) for b in idx])
            sizes = np.array([cu[b + 1] - cu[b] for b in idx], dtype=np.int32)
            sub_cu = np.zeros(len(idx) + 1, dtype=np.int32)
            np.cumsum(sizes, out=sub_cu[1:])
            kv_rows = np.flatnonzero(instances == instance)
            remote.append(RemoteAttention(
                self.peers[instance], sub, rows, sub_cu, q_pos[rows], self.tables.batch_tables(sub, instance),
                kv_rows, slots[kv_rows], self.device,
            ))  # fmt: skip
        return remote

    # ---- the cluster: loans, remote blocks, serving creditors' queries -----------------------

    def _borrow(self, rid: int, n: int) -> None:
        """Borrow ``n`` blocks for a running request, and up to ``lending.BORROW_AHEAD`` more that it
        will grow into (never past its own maximum), so a growing request does not stop for a
        loan at every block. ``lending.plan_loan`` splits it over creditors (present ones first,
        up to the request's share of the cluster on each, then the peers with the most room); a
        peer that refuses (its room went meanwhile) is skipped. What could not be had is asked
        for again by the next step's plan."""
        req = self.requests.get(rid)
        have = self.tables.num_blocks(rid) if self.tables.has_request(rid) else 0
        most = have + n
        if req is not None:
            most = -(-(len(req.prompt_token_ids) + req.max_new_tokens) // self.block_size)
            n = loan_size(n, most, have)
        parts: dict[int, int] = {}
        if self.tables.has_request(rid):
            for i, ids in self.tables.runs(rid):
                if i != self.instance_id:
                    parts[i] = parts.get(i, 0) + len(ids)
        def ask(i: int, take: int) -> bool:
            peer = self.peers[i]
            try:
                reservation = peer.reserve(self.instance_id, take)
                if reservation is None:
                    return False
                blocks = peer.commit(reservation, rid)
            except (InstanceDeadError, TransportError) as e:  # it died (or is dying) meanwhile
                log.warning("loan from instance %d for request %d failed: %s", peer.instance_id, rid, e)
                return False
            with self.pool_lock:
                self.planner.add_loan(rid, peer.instance_id, blocks)
            self.num_loans += 1
            return True

        offers = [(p.instance_id, p.lendable()) for p in self.peers.values()]
        borrow(n, offers, parts, part_limit(most, len(self.peers) + 1, self.block_size), ask)

    def _release_remote(self, rid: int, runs, req: EngineRequest | None = None) -> None:
        """Free the blocks creditors hold for a request that ended or was preempted (those on
        a lost peer went with it). With prefix caching, its named full blocks stay cached there
        and this home remembers where (``BatchPlanner.remember_remote``)."""
        named = req.remote_named if req is not None else {}
        for instance, blocks in runs:
            peer = self.peers.get(instance)
            if peer is None:
                continue
            cached = [(b, named[(instance, b)]) for b in blocks if (instance, b) in named]
            peer.release(rid, list(blocks), cached)
            if cached:
                with self.pool_lock:
                    self.planner.remember_remote(instance, [b for b, _ in cached], [h for _, h in cached])

    # ---- prefix caching ----------------------------------------------------------------------

    def _name_blocks(self, plan) -> None:
        """After a step's KV is written: name the blocks its chunks filled, by the hash of their
        tokens and of everything before them, where they lie (here: ``BlockPool.register_block``;
        on a creditor: kept for the release, ``_release_remote``)."""
        bs = self.block_size
        for c in plan.chunks:
            req = self.requests.get(c.request_id)
            full = (c.start + c.num_tokens) // bs
            if req is None or full <= req.num_named:
                continue
            if len(req.block_hashes) < full:
                have = len(req.block_hashes)
                parent = req.block_hashes[-1] if have else None
                req.block_hashes += block_hashes(req.token_ids[have * bs : full * bs], bs, parent)
            i = 0  # the index of the run's first block
            with self.pool_lock:
                for instance, ids in self.tables.runs(c.request_id):
                    if i >= full:
                        break
                    lo, hi = max(req.num_named - i, 0), min(full - i, len(ids))  # this run's blocks to name
                    for j in range(lo, hi):
                        if instance == self.instance_id:
                            self.pool.register_block(ids[j], req.block_hashes[i + j])
                        else:
                            req.remote_named[(instance, ids[j])] = req.block_hashes[i + j]
                    i += len(ids)
            req.num_named = full

    @staticmethod
    def _unname(req: EngineRequest) -> None:
        """A preempted request's blocks are gone from its table: name them again when it runs."""
        req.num_named = 0
        req.remote_named = {}

    def _claim(self, plan):
        """Take on their creditors the cached blocks that newly admitted requests reuse
        (``StepPlan.claims``). A request whose blocks are gone there (evicted) is preempted, to
        be recomputed; the directory forgets them. Returns the plan without those requests'
        chunks."""
        failed: dict[int, list] = {}
        for claim in plan.claims:
            peer = self.peers.get(claim.instance)
            ok = False
            if peer is not None:
                try:
                    ok = peer.claim(claim.request_id, self.instance_id, list(claim.blocks), list(claim.hashes))
                except (InstanceDeadError, TransportError) as e:
                    log.warning("claiming cached blocks on instance %d failed: %s", claim.instance, e)
            if not ok:
                failed.setdefault(claim.request_id, []).append(claim)
        if not failed:
            return plan
        self.num_failed_claims += len(failed)
        for rid, bad in failed.items():
            unclaimed = {(c.instance, b) for c in bad for b in c.blocks}
            claimed = {(c.instance, b): h for c in plan.claims if c.request_id == rid and c not in bad
                       for b, h in zip(c.blocks, c.hashes)}
            with self.pool_lock:
                for c in bad:
                    self.planner.forget_remote(c.instance, list(c.hashes))
                runs = self.planner.preempt(rid)
            runs = [(i, [b for b in ids if (i, b) not in unclaimed]) for i, ids in runs]
            req = self.requests[rid]
            req.remote_named = claimed  # what it did take stays cached where it is
            self._release_remote(rid, [(i, ids) for i, ids in runs if ids], req)
            self._unname(req)
        chunks = tuple(c for c in plan.chunks if c.request_id not in failed)
        return dataclasses.replace(plan, chunks=chunks, num_batched_tokens=sum(c.num_tokens for c in chunks))

    def reset_prefix_cache(self) -> int:
        """Forget the cached blocks no request holds here (they become plain free blocks);
        returns how many. Blocks cached on creditors are forgotten too."""
        with self.pool_lock:
            n = self.pool.reset_cache()
            for instance in self.peers:
                self.planner.forget_remote(instance)
        return n

    def _preempt_now(self, rid: int) -> None:
        """Recompute a running request from its tokens (its blocks freed everywhere)."""
        req = self.requests.get(rid)
        if req is None:
            return
        with self.pool_lock:
            was_running = self.planner.is_running(rid)
            runs = self.planner.preempt(rid)
        if was_running:
            req.num_preemptions += 1
        self._release_remote(rid, runs, req)
        self._unname(req)

    # ---- migration ---------------------------------------------------------------------------

    def queue_move(self, rid: int, num_blocks: int, src: int, dst: int) -> None:
        """Ask for a migration (any thread; the gManager's planner): ``num_blocks`` blocks of
        request ``rid`` (homed here) move from instance ``src`` to ``dst``, one of them this
        instance. Carried out before the next step (``_run_moves``)."""
        self._moves.append((rid, num_blocks, src, dst))

    def _run_moves(self) -> None:
        moves, self._moves = self._moves, []
        for rid, n, src, dst in moves:
            try:
                if src == self.instance_id and dst != src:
                    self._move_out(rid, n, dst)
                elif dst == self.instance_id and src != dst:
                    self._move_home(rid, n, src)
                else:
                    log.warning("move of request %d from %d to %d: not this home's to make", rid, src, dst)
            except (InstanceDeadError, TransportError) as e:
                log.warning("move of request %d from %d to %d dropped: %s", rid, src, dst, e)

    def _movable(self, rid: int, instance: int) -> tuple[list[int], bool]:
        """Request ``rid``'s blocks on ``instance`` that may move, and whether its tail is there
        (``lending.movable``)."""
        return movable(self.tables.runs(rid), instance)

    def _move_out(self, rid: int, n: int, dst: int) -> None:
        """Move ``n`` of a running request's blocks from here to ``dst``, between two steps:
        reserve and commit there, copy their k and v over, switch the table, free them here.
        A request keeps at least one block at home."""
        peer = self.peers.get(dst)
        if peer is None or rid not in self.requests or not self.tables.has_request(rid):
            return
        movable, tail_here = self._movable(rid, self.instance_id)
        n = min(n, len(movable) - (0 if tail_here else 1), peer.lendable())  # one block stays at home
        if n <= 0:
            return
        reservation = peer.reserve(self.instance_id, n)
        if reservation is None:
            return
        new_ids = peer.commit(reservation, rid)
        old = movable[len(movable) - n:]
        with self.pool_lock:
            names = [self.pool.block_hash(b) for b in old]  # named blocks keep their names there
        idx = torch.tensor(old, dtype=torch.int64, device=self.device)
        kv = torch.stack([torch.stack([k.index_select(0, idx), v.index_select(0, idx)])
                          for k, v in zip(self.kv.k, self.kv.v)]).cpu()
        try:
            peer.write_blocks(rid, new_ids, kv)
        except Exception:
            peer.release(rid, new_ids)
            raise
        with self.pool_lock:
            self.tables.move_blocks(rid, self.instance_id, dst, new_ids, keep_last=1)
            self.pool.free_blocks(rid, old)
            self.pool.add_borrowed(rid, self.instance_id, n)
        req = self.requests.get(rid)
        if req is not None:
            req.remote_named.update({(dst, b): h for b, h in zip(new_ids, names) if h is not None})
        self.num_blocks_moved += n

    def _move_home(self, rid: int, n: int, src: int) -> None:
        """Bring ``n`` of a running request's blocks home from creditor ``src``: blocks here,
        their k and v fetched, the table switched, the creditor's blocks released."""
        peer = self.peers.get(src)
        if peer is None or rid not in self.requests or not self.tables.has_request(rid):
            return
        movable, _ = self._movable(rid, src)
        with self.pool_lock:
            n = min(n, len(movable), self.pool.num_free)
            if n <= 0:
                return
            new_ids = self.pool.allocate(rid, n)
        old = movable[len(movable) - n:]
        try:
            kv = peer.read_blocks(rid, old).to(self.device)
        except Exception:
            with self.pool_lock:
                self.pool.free_blocks(rid, new_ids)
            raise
        idx = torch.tensor(new_ids, dtype=torch.int64, device=self.device)
        for layer, (k, v) in enumerate(zip(self.kv.k, self.kv.v)):
            k.index_copy_(0, idx, kv[layer, 0].to(k.dtype))
            v.index_copy_(0, idx, kv[layer, 1].to(v.dtype))
        with self.pool_lock:
            self.tables.move_blocks(rid, src, self.instance_id, new_ids, keep_last=1)
            self.pool.remove_borrowed(rid, n)
            req = self.requests.get(rid)
            if req is not None:  # their names come home with them (the ids there may be lent again)
                for b, new in zip(old, new_ids):
                    h = req.remote_named.pop((src, b), None)
                    if h is not None:
                        self.pool.register_block(new, h)
        peer.release(rid, old)
        self.num_blocks_moved += n

    def write_lent_blocks(self, request_id: int, block_ids: list[int], kv: torch.Tensor) -> None:
        """A debtor moves blocks here: write their k and v into the blocks lent to it."""
        self._check_lent(request_id, block_ids)
        expect = (self.args.num_layers, 2, len(block_ids), self.block_size, self.args.num_kv_heads, self.args.head_dim)
        if tuple(kv.shape) != expect:
            raise ValidationError("BlockTransfer.kv", tuple(kv.shape), f"must be {expect} (this instance's cache)")
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        for layer, (k, v) in enumerate(zip(self.kv.k, self.kv.v)):
            k.index_copy_(0, idx, kv[layer, 0].to(device=self.device, dtype=k.dtype))
            v.index_copy_(0, idx, kv[layer, 1].to(device=self.device, dtype=v.dtype))

    def read_lent_blocks(self, request_id: int, block_ids: list[int]):
        """A debtor brings blocks home: their k and v (a ``BlockTransfer``)."""
        from .transport import BlockTransfer

        self._check_lent(request_id, block_ids)
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        kv = torch.stack([torch.stack([k.index_select(0, idx), v.index_select(0, idx)])
                          for k, v in zip(self.kv.k, self.kv.v)]).cpu()
        return BlockTransfer(request_id, tuple(block_ids), kv)

    def _check_lent(self, request_id: int, block_ids: list[int]) -> None:
        with self.pool_lock:
            lent = set(self.pool.blocks_of(request_id))  # (a block cached and shared has other holders)
            for b in block_ids:
                if b not in lent:
                    raise ValidationError("block_ids", b, f"must be blocks this instance lends request {request_id}")

    # ---- lost peers --------------------------------------------------------------------------

    def lose_peer(self, instance_id: int, max_lent: int, reason: str) -> None:
        """Instance ``instance_id`` is gone (any thread; the runtime calls it from its loop):
        a step waiting on it stops within a fraction of a second, and between two steps
        ``reap_lost`` forgets it. ``max_lent``: the blocks it could lend, which leave the
        cluster."""
        if instance_id in self.lost or instance_id in self._lost_pending or instance_id == self.instance_id:
            return
        self._lost_pending[instance_id] = (max_lent, reason)  # first: a step that sees the error checks it
        peer = self.peers.get(instance_id)
        if peer is not None and hasattr(peer, "mark_lost"):
            peer.mark_lost(reason)

    def reap_lost(self) -> list[RequestOutput]:
        """Between steps: forget the lost peers. Requests with blocks on one are preempted
        (recomputed from their tokens, on what is left); blocks lent to requests homed on one
        are freed; the cluster's blocks shrink by what it could lend, and a request that can
        no longer fit ends with ``finish_reason="error"`` (returned)."""
        outputs: list[RequestOutput] = []
        for instance_id, (max_lent, reason) in list(self._lost_pending.items()):
            self.peers = {i: p for i, p in self.peers.items() if i != instance_id}  # (a new dict: see add)
            for rid in list(self.requests):
                if self.tables.has_request(rid) and any(i == instance_id for i, _ in self.tables.runs(rid)):
                    self._preempt_now(rid)
            with self.pool_lock:
                self.planner.forget_remote(instance_id)
                for rid in [r for r in self._lent_to if r >> _RID_BITS == instance_id]:
                    self.pool.free_request(rid)
                    self._lent_to.discard(rid)
                self.pool.expire(time.monotonic())
                cluster = max(self.pool.num_blocks, self.planner.cluster_blocks - max_lent)
                self.planner.cluster_blocks = cluster
            self.lost[instance_id] = reason
            del self._lost_pending[instance_id]
            for rid, req in list(self.requests.items()):
                need = -(-(len(req.prompt_token_ids) + req.max_new_tokens) // self.block_size)
                if need > cluster:
                    out = self.fail(rid, (
                        f"instance {instance_id} was lost ({reason}) and the {cluster} KV blocks left in the cluster "
                        f"({cluster * self.block_size} tokens) cannot hold this request's {need}"
                    ))  # fmt: skip
                    if out is not None:
                        outputs.append(out)
            log.warning("instance %d lost (%s): forgotten; the cluster has %d blocks", instance_id, reason, cluster)
        return outputs

    def lend_reserve(self, borrower: int, n: int, ttl_s: float) -> int | None:
        """Reserve ``n`` blocks for instance ``borrower`` (first come, first served), after
        giving back every reservation older than its ttl (a borrower that never committed)."""
        with self.pool_lock:
            now = time.monotonic()
            self.pool.expire(now)
            return self.pool.try_reserve(borrower, n, now, ttl_s)

    def lend_commit(self, reservation_id: int, request_id: int) -> list[int]:
        with self.pool_lock:
            blocks = self.pool.commit(reservation_id, request_id, time.monotonic())
            self._lent_to.add(request_id)
            return blocks

    def lend_cancel(self, reservation_id: int) -> None:
        with self.pool_lock:
            self.pool.cancel(reservation_id)

    def lend_release(self, request_id: int, blocks: list[int], cached=()) -> None:
        """Free blocks lent to ``request_id`` (all of them when ``blocks`` is empty). ``cached``:
        (block, hash) pairs naming full blocks among them, which stay cached here for later
        requests of the same home (``lend_claim``)."""
        with self.pool_lock:
            held = self.pool.blocks_of(request_id)
            blocks = blocks or held
            if cached and self.prefix_caching:
                mine = set(blocks) & set(held)
                for b, h in cached:
                    if b in mine:
                        self.pool.register_block(b, h)
            self.pool.free_blocks(request_id, blocks)
            if not self.pool.blocks_of(request_id):
                self._lent_to.discard(request_id)

    def lend_claim(self, request_id: int, home: int, blocks: list[int], hashes: list[int]) -> bool:
        """A home's new request reuses blocks cached here for that home (named by ``hashes``):
        take them all for it, or none (False: evicted or reused meanwhile)."""
        if len(blocks) != len(hashes):
            raise ValidationError("hashes", len(hashes), f"must name each of the {len(blocks)} blocks")
        if not self.prefix_caching:
            return False
        with self.pool_lock:
            got = self.pool.acquire(request_id, home, hashes)
            if got != list(blocks):
                if got:
                    self.pool.free_blocks(request_id, got)
                return False
            self._lent_to.add(request_id)
            return True

    def serve_attention(self, query: AttentionQuery) -> AttentionResult:
        """A debtor's partial attention over the blocks this instance lends it: write the new k,
        v it brings, attend (the layer's window applied), answer in fp32."""
        num_blocks = self.kv.num_blocks
        blocks = query.blocks
        if int(blocks[0].max()) >= num_blocks:
            raise ValidationError("AttentionQuery.blocks", int(blocks[0].max()), f"must be block ids below {num_blocks}")
        dev = self.device
        layer = query.layer
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        if query.k is not None:
            append_kv(query.k.to(dev), query.v.to(dev), kc, vc, query.slot_mapping.to(dev), backend=self.kernel_backend)
        bt, bs, bl = (t.to(dev) for t in blocks)
        window = self.args.window(layer)
        cu_q, q_pos = query.query_offsets().to(dev), query.q_pos.to(dev)
        out, lse = partial_attention(
            query.q.to(dev), cu_q, q_pos, kc, vc, bt, bs, bl,
            backend=self.kernel_backend, window=window, decode_plan=self._served_plan(query, window, cu_q, q_pos, bt, bs, bl),
        )
        return AttentionResult(layer, out.float().cpu(), lse.cpu())

    def _served_plan(self, query: AttentionQuery, window, cu_q, q_pos, bt, bs, bl) -> DecodePlan | None:
        """The decode plan of a debtor's decode step (every row a request of its own) on the
        torch path, built at its first layer and reused by the others: a step's queries name
        the same requests, positions and blocks at every layer. None for anything else."""
        if self.device.type != "cpu" or resolve_backend("cpu", self.kernel_backend) != "torch" \
                or query.q.shape[0] != len(query.request_ids):
            return None
        key = (query.request_ids, window)
        hit = self._served_plans.get(key)
        if hit is not None and torch.equal(hit[0], query.q_pos) and torch.equal(hit[1], query.blocks):
            return hit[2]
        plan = build_decode_plan(cu_q, q_pos, bt, bs, bl, self.block_size, window)
        if len(self._served_plans) >= 16:  # a few debtors' steps at a time
            self._served_plans.pop(next(iter(self._served_plans)))
        self._served_plans[key] = (query.q_pos, query.blocks, plan)
        return plan

    # ---- statistics --------------------------------------------------------------------------

    def statistics(self) -> EngineStats:
        c = self.pool.counters()
        s = self.planner.statistics()
        return EngineStats(
            instance_id=self.instance_id,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_capacity_blocks=c.capacity,
            kv_free_blocks=c.free,
            kv_used_blocks=c.used,
            kv_lent_blocks=c.lent,
            kv_borrowed_blocks=c.borrowed,
            kv_reserved_blocks=c.reserved,
            block_size=self.block_size,
            num_steps=self.num_steps,
            num_preemptions=s.num_preemptions,
            generated_tokens=self.generated_tokens,
            prompt_tokens=self.prompt_tokens,
            max_lent_blocks=self.pool.max_lent_blocks,
            memory_total_bytes=self.memory.reading.total if self.memory is not None and self.memory.reading else 0,
            memory_free_bytes=self.memory.reading.free if self.memory is not None and self.memory.reading else 0,
            kv_cached_blocks=self.pool.num_cached,
            prefix_query_tokens=s.prefix_query_tokens,
            prefix_hit_tokens=s.prefix_hit_tokens,
        )
