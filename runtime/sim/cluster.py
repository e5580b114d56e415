"""The discrete-event simulation of a cluster serving a trace.

Every scheduling decision is made by the real scheduler core, the objects the runtime uses
(``infinillm.core_sched``: a ``BlockPool``, ``BlockTables`` and ``BatchPlanner`` per instance,
one ``DebtLedger`` fed by the pools' heartbeat deltas, the gManager's ``Planner``), by the
runtime's ``Router`` for placement and by ``lending`` for the size and the creditors of a loan;
the simulator only supplies time, from the cost model (``cost.py``).

An instance runs what the engine runs between two steps (``Engine.step``): queued moves, then
``BatchPlanner.schedule(loan_available)``, the preempted requests' remote blocks freed, the
loans taken (reserve and commit on creditors, ``add_loan``), then the step's chunks, timed as

    dense(T tokens, S sampled) + max(local attention, max over creditors c of
                                     (attention of the parts on c + the messages to c))

Attention a creditor computes for others is charged to the creditor too: it delays the
creditor's next step by that much (a creditor serves queries between its own steps).

Policies (``POLICIES``):

- ``infinite-llm``: borrowing between instances and the gManager's planner (spread, home);
- ``borrow-only``: borrowing on demand, no planner;
- ``vllm-multi``: the same instances, isolated: no loans (``loan_available=0``, a request must
  fit in one instance); the same router places each request on the least loaded instance;
- ``vllm-single``: one instance over every GPU (tensor parallel across nodes), its all-reduces
  timed by the cost model.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import core_sched as _default_core
from ..errors import RequestTooLongError, ValidationError
from ..lending import borrow, loan_size, movable, part_limit
from ..router import InstanceLoad, Router
from .cost import CostModel, Efficiency
from .hardware import GPU, ModelShape
from .traces import TraceRequest

__all__ = ["POLICIES", "ClusterSpec", "RequestRecord", "SimResult", "Simulation", "simulate"]

POLICIES = ("infinite-llm", "borrow-only", "vllm-multi", "vllm-single")

_ARRIVAL, _STEP_END, _PLAN, _SAMPLE = 0, 1, 2, 3
_RESERVATION_TTL_S = 60.0
MAX_GPUS = 4096  # 512 nodes of 8


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The cluster: ``num_gpus`` of ``gpu`` serving ``model`` as instances of ``instance_tp`` GPUs
    (``vllm-single``: one instance of all of them), with vLLM's defaults for memory and batching."""

    gpu: GPU
    model: ModelShape
    num_gpus: int = 32
    instance_tp: int = 1
    block_size: int = 16
    memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    planner_interval_s: float = 0.5
    max_moves_per_step: int = 1024
    efficiency: Efficiency = field(default_factory=Efficiency)

    def __post_init__(self) -> None:
        def integer(name: str, lo: int, hi: int) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValidationError(name, v, f"must be an integer in [{lo}, {hi}]")
            return v

        if not isinstance(self.gpu, GPU):
            raise ValidationError("gpu", self.gpu, "must be a GPU (infinillm.sim.gpu('a100'), ...)")
        if not isinstance(self.model, ModelShape):
            raise ValidationError("model", self.model, "must be a ModelShape (infinillm.sim.model_shape(...))")
        tp = integer("instance_tp", 1, MAX_GPUS)
        if tp & (tp - 1):
            raise ValidationError("instance_tp", tp, "must be a power of two")
        if integer("num_gpus", 1, MAX_GPUS) % tp:
            raise ValidationError("num_gpus", self.num_gpus, f"must be a multiple of instance_tp={tp}")
        bs = integer("block_size", 1, 1024)
        if bs & (bs - 1):
            raise ValidationError("block_size", bs, "must be a power of two in [1, 1024]")
        integer("max_num_seqs", 1, 1 << 20)
        integer("max_num_batched_tokens", 1, 1 << 24)
        integer("max_moves_per_step", 0, 1 << 30)
        mu = self.memory_utilization
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 < mu <= 1:
            raise ValidationError("memory_utilization", mu, "must be a fraction in (0, 1]")
        pi = self.planner_interval_s
        if isinstance(pi, bool) or not isinstance(pi, (int, float)) or not 1e-3 <= pi <= 3600:
            raise ValidationError("planner_interval_s", pi, "must be in [0.001, 3600] seconds")
        if not isinstance(self.efficiency, Efficiency):
            raise ValidationError("efficiency", self.efficiency, "must be an Efficiency")

    def cost_model(self, policy: str) -> CostModel:
        tp = self.num_gpus if policy == "vllm-single" else self.instance_tp
        return CostModel(self.gpu, self.model, tp, self.efficiency)

    def num_instances(self, policy: str) -> int:
        return 1 if policy == "vllm-single" else self.num_gpus // self.instance_tp


@dataclass(slots=True)
class RequestRecord:
    """One request of the trace, as the simulation served it (times in simulated seconds)."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    home: int = -1
    first_token_s: float | None = None
    finish_s: float | None = None
    generated: int = 0
    rejected: str | None = None
    away: dict[int, int] = field(default_factory=dict)  # blocks on creditors, per instance
    recorded: dict[int, int] = field(default_factory=dict)  # what the ledger holds of its placement
    most_instances: int = 1  # the most instances its KV lay on at once
    computed: int = 0  # prompt positions computed so far (the most, across preemptions)
    progress: int = 0  # positions whose KV it holds now (lost when it is preempted)
    preemptions: int = 0

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(slots=True)
class SimResult:
    """What one run measured.

    ``throughput`` is the useful work the cluster did while loaded: prompt tokens computed for
    the first time (a preempted request's recomputation does not count) and tokens generated,
    per second, over the window from ``warmup_fraction`` of the arrivals' span (after the first
    arrival) to the last arrival (``window_s``). At a rate the cluster cannot keep up with, that is its capacity,
    with neither the warm-up from empty nor the drain after the last arrival (where a few long
    requests may run alone). ``makespan_throughput`` is the other common measure (vLLM's
    ``benchmark_throughput``): every completed request's tokens over the whole run, from the
    first arrival to the last completion.
    """

    policy: str
    num_instances: int
    instance_tp: int
    blocks_per_instance: int
    requests: list[RequestRecord]
    window_s: float
    window_tokens: int
    window_output_tokens: int
    makespan_s: float
    num_steps: int
    num_loans: int
    num_moves: int
    blocks_moved: int
    num_preemptions: int
    recomputed_tokens: int
    kv_times: list[float]
    kv_used: list[list[float]]  # per sample time: each instance's used fraction (own and lent)
    leaked_blocks: int

    @property
    def completed(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.finish_s is not None]

    @property
    def rejected(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.rejected is not None]

    @property
    def throughput(self) -> float:
        """Useful tokens/s (prompt and output) while loaded (see the class docstring); for a
        trace whose arrivals span no time, or too little for one step to end in it, the
        makespan throughput."""
        return self.window_tokens / self.window_s if self._windowed else self.makespan_throughput

    @property
    def _windowed(self) -> bool:
        return self.window_s > 0 and self.window_tokens > 0

    @property
    def output_throughput(self) -> float:
        if self._windowed:
            return self.window_output_tokens / self.window_s
        done = self.completed
        return sum(r.output_tokens for r in done) / self.makespan_s if done and self.makespan_s > 0 else 0.0

    @property
    def makespan_throughput(self) -> float:
        """Tokens/s (prompt and output) of the completed requests over the whole run."""
        done = self.completed
        return sum(r.context_tokens for r in done) / self.makespan_s if done and self.makespan_s > 0 else 0.0

    @property
    def max_context_served(self) -> int:
        return max((r.context_tokens for r in self.completed), default=0)

    def mean_ttft(self) -> float:
        done = self.completed
        return sum(r.first_token_s - r.arrival_s for r in done) / len(done) if done else 0.0


class _Instance:
    __slots__ = ("id", "node", "pool", "tables", "planner", "busy", "stalled", "owed_s", "moves", "step", "placed")

    def __init__(self, instance_id: int, node: int, pool, tables, planner) -> None:
        self.id = instance_id
        self.node = node
        self.pool = pool
        self.tables = tables
        self.planner = planner
        self.busy = False
        self.stalled = False  # its last schedule found nothing to run: wait for memory or work
        self.owed_s = 0.0  # attention served for others and copies, not yet paid for
        self.moves: list = []
        self.step = None  # the plan in flight
        self.placed = 0  # requests placed here that have not started (the router's view)


class Simulation:
    """One policy serving one trace on one cluster (see the module docstring). ``core`` is the
    scheduler core's implementation (``core_sched.implementation(...)``; the default is the
    one the runtime uses)."""

    def __init__(self, spec: ClusterSpec, policy: str, trace: list[TraceRequest], *, core=None,
                 kv_samples: int = 200, warmup_fraction: float = 0.1, on_request_done: Callable[[], None] | None = None) -> None:
        if policy not in POLICIES:
            raise ValidationError("policy", policy, f"must be one of {', '.join(POLICIES)}")
        if not trace:
            raise ValidationError("trace", len(trace), "must hold at least one request")
        core = core or _default_core
        self.spec = spec
        self.policy = policy
        self.cost = spec.cost_model(policy)
        self.pooled = policy in ("infinite-llm", "borrow-only")
        n = spec.num_instances(policy)
        bs = spec.block_size
        blocks = self.cost.kv_capacity_tokens(spec.memory_utilization) // bs
        if blocks < 1:
            raise ValidationError(
                "instance", f"{self.cost.tp} x {spec.gpu.name} at memory_utilization={spec.memory_utilization}",
                f"must hold {spec.model.name}'s weights ({spec.model.weight_bytes / 1e9:.1f} GB) and one block of "
                f"{bs} tokens ({self.cost.block_bytes(bs) / 1e6:.1f} MB): more GPUs per instance (instance_tp), "
                "a higher memory_utilization or smaller blocks",
            )
        self.blocks_per_instance = blocks
        cluster_blocks = n * blocks if self.pooled else blocks
        self.ledger = core.DebtLedger()
        self.instances: list[_Instance] = []
        for i in range(n):
            pool = core.BlockPool(i, blocks)
            tables = core.BlockTables(bs)
            planner = core.BatchPlanner(pool, tables, spec.max_num_seqs, spec.max_num_batched_tokens, cluster_blocks)
            node = (i * self.cost.tp) // spec.gpu.gpus_per_node
            self.instances.append(_Instance(i, node, pool, tables, planner))
            self.ledger.register_instance(i, blocks, blocks, node)
        self.gmanager = None
        if policy == "infinite-llm" and n > 1:
            model = core.ThroughputModel(*self.cost.throughput_tables(bs), spec.model.num_layers, bs)
            self.gmanager = core.Planner(model, spec.max_moves_per_step)
        self.router = Router()
        self.trace = trace
        self.requests = [RequestRecord(i, r.arrival_s, r.prompt_tokens, r.output_tokens) for i, r in enumerate(trace)]
        self.now = 0.0
        self._events: list = []
        self._seq = 0
        self._dirty: set[int] = set()
        self._pending: list[int] = []  # arrived, not placed yet
        self._wake = False  # memory was freed: idle instances with work look again
        self._first_arrival = min(r.arrival_s for r in trace)
        self._last_arrival = max(r.arrival_s for r in trace)
        span = self._last_arrival - self._first_arrival
        self._window = (self._first_arrival + warmup_fraction * span, self._last_arrival)
        self._window_tokens = 0
        self._window_output = 0
        self._kv_samples = kv_samples
        self.kv_times: list[float] = []
        self.kv_used: list[list[float]] = []
        self.num_steps = self.num_loans = self.num_moves = self.blocks_moved = self.num_preemptions = 0
        self.recomputed_tokens = 0  # KV positions preemptions threw away (computed again later)
        self._done = 0
        self._on_done = on_request_done
        self._layers = spec.model.num_layers

    # ---- the event loop ----------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def run(self) -> SimResult:
        for r in self.requests:
            self._push(r.arrival_s, _ARRIVAL, r.index)
        self._plan_due = False  # a planner round is in the queue (only while requests run)
        self._sample_every = None
        self._push(self._first_arrival, _SAMPLE, 0)
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            self.now = t
            if kind == _ARRIVAL:
                self._pending.append(payload)
                if self._events and self._events[0][0] == t and self._events[0][2] == _ARRIVAL:
                    continue  # place requests arriving together at once
                self._place()
            elif kind == _STEP_END:
                self._end_step(self.instances[payload])
            elif kind == _PLAN:
                self._plan_due = False
                self._plan()
            else:
                self._sample()
                if self._done < len(self.requests):
                    # While the cluster is idle before a far arrival, the next sample is then.
                    busy = any(i.planner.num_requests for i in self.instances) or self._pending
                    nxt = t + self._sample_interval()
                    if not busy and self._events:
                        nxt = max(nxt, min(e[0] for e in self._events))
                    self._push(nxt, _SAMPLE, 0)
            self._kick()
            if self.gmanager is not None and not self._plan_due and any(i.planner.num_requests for i in self.instances):
                self._plan_due = True
                self._push(t + self.spec.planner_interval_s, _PLAN, 0)
            if kind in (_PLAN, _SAMPLE) and self._done < len(self.requests) and self._stuck():
                self._fail_rest("no instance can make progress (every request left waits for memory no one will free)")
                break
        return self._result()

    def _stuck(self) -> bool:
        """Nothing runs, nothing will arrive, and looking again starts nothing."""
        if any(inst.busy for inst in self.instances) or any(e[2] in (_ARRIVAL, _STEP_END) for e in self._events):
            return False
        self._wake = True
        self._kick()
        return not any(inst.busy for inst in self.instances)

    def _fail_rest(self, reason: str) -> None:
        for inst in self.instances:
            for rid in inst.planner.running_ids() + inst.planner.waiting_ids():
                r = self.requests[rid]
                self._release_remote(r, inst.planner.abort(rid))
                r.rejected = f"request {rid}: {reason}"
                if self.ledger.has_request(rid):
                    self.ledger.forget_request(rid)
                self._request_done()
        self._sync_ledger()

    def _sample_interval(self) -> float:
        if self._sample_every is None:
            # From the trace: about kv_samples samples over twice the arrivals' span.
            self._sample_every = max(self._last_arrival - self._first_arrival, 1.0) * 2 / self._kv_samples
        return self._sample_every

    def _kick(self) -> None:
        """Start every idle instance that has something to do."""
        wake, self._wake = self._wake, False
        for inst in self.instances:
            if not inst.busy and (inst.moves or (inst.planner.num_requests and (wake or not inst.stalled))):
                self._start_step(inst)

    # ---- placement ---------------------------------------------------------------------------

    def _place(self) -> None:
        pending, self._pending = self._pending, []
        bs = self.spec.block_size
        needs = [-(-self.requests[i].context_tokens // bs) for i in pending]
        self._sync_ledger()
        loads = []
        for inst in self.instances:
            view = self.ledger.instance(inst.id)
            loads.append(InstanceLoad(inst.id, view.free - inst.placed, inst.planner.num_requests))
        homes = self.router.place(needs, loads)
        for i, home, need in zip(pending, homes, needs):
            r = self.requests[i]
            inst = self.instances[home]
            try:
                inst.planner.add_request(i, r.prompt_tokens, r.output_tokens)
            except RequestTooLongError as e:
                r.rejected = str(e)
                self._request_done()
                continue
            r.home = home
            inst.placed += need
            inst.stalled = False  # new work: it looks again even if it found nothing to do before
        self._wake = True

    # ---- one step ----------------------------------------------------------------------------

    def _loan_available(self, inst: _Instance) -> int:
        if not self.pooled:
            return 0
        self._sync_ledger()
        return self.ledger.totals().lendable - self.ledger.instance(inst.id).lendable

    def _start_step(self, inst: _Instance) -> None:
        if inst.moves:
            self._run_moves(inst)
        for _ in range(8):  # a step that only borrowed made progress: plan again at once
            plan = inst.planner.schedule(self._loan_available(inst))
            self._dirty.add(inst.id)
            for p in plan.preempted:
                r = self.requests[p.request_id]
                self.num_preemptions += 1
                self.recomputed_tokens += r.progress
                r.preemptions += 1
                r.progress = 0
                self._release_remote(r, p.remote_runs)
            granted = 0
            for loan in plan.loans:
                granted += self._borrow(inst, self.requests[loan.request_id], loan.num_blocks)
            if plan.chunks or not granted:
                break
        if not plan.chunks:
            inst.stalled = True  # nothing to do until memory frees or work arrives
            self.ledger.set_load(inst.id, inst.planner.num_running, inst.planner.num_waiting, inst.planner.statistics().waiting_blocks)
            return
        inst.busy = True
        inst.stalled = False
        inst.step = plan
        self.num_steps += 1
        duration = self._step_time(inst, plan) + inst.owed_s
        inst.owed_s = 0.0
        self._push(self.now + duration, _STEP_END, inst.id)

    def _step_time(self, inst: _Instance, plan) -> float:
        cost = self.cost
        bs = self.spec.block_size
        sampled = 0
        local = 0.0
        remote: dict[int, list[float]] = {}
        for c in plan.chunks:
            if c.samples:
                sampled += 1
            r = self.requests[c.request_id]
            seen = c.start + c.num_tokens
            if r.away:
                here = seen
                for j, blocks in r.away.items():
                    tokens = min(blocks * bs, here)
                    if tokens <= 0:
                        continue
                    here -= tokens
                    part = remote.get(j)
                    if part is None:
                        part = remote[j] = [0.0, 0.0]
                    part[0] += cost.attention_time(c.num_tokens, tokens)
                    part[1] += c.num_tokens
                local += cost.attention_time(c.num_tokens, here, causal=True)
            else:
                local += cost.attention_time(c.num_tokens, seen, causal=True)
        wait = local
        if remote:
            per_query = cost.query_bytes_per_layer + cost.result_bytes_per_layer
            for j, (attn, queries) in remote.items():
                creditor = self.instances[j]
                creditor.owed_s += attn  # the creditor computes it between its own steps
                comm = self._layers * cost.message_time(queries * per_query, creditor.node == inst.node, cost.tp)
                wait = max(wait, attn + comm)
        return cost.dense_time(plan.num_batched_tokens, sampled) + wait

    def _end_step(self, inst: _Instance) -> None:
        plan = inst.step
        inst.busy = False
        inst.step = None
        planner = inst.planner
        counted = self._window[0] <= self.now <= self._window[1]
        for c in plan.chunks:
            r = self.requests[c.request_id]
            r.progress = c.start + c.num_tokens
            end = min(c.start + c.num_tokens, r.prompt_tokens)
            if end > r.computed:
                if counted:
                    self._window_tokens += end - r.computed
                r.computed = end
            if not c.samples:
                continue
            if counted:
                self._window_tokens += 1
                self._window_output += 1
            r.generated += 1
            if r.first_token_s is None:
                r.first_token_s = self.now
                inst.placed -= -(-r.context_tokens // self.spec.block_size)
            if r.generated == r.output_tokens:
                runs = planner.finish(r.index)
                self._release_remote(r, runs)
                r.finish_s = self.now
                if self.ledger.has_request(r.index):
                    self.ledger.forget_request(r.index)
                r.recorded.clear()
                self._wake = True
                self._request_done()
            else:
                planner.append_output(r.index)
        self._dirty.add(inst.id)
        self.ledger.set_load(inst.id, planner.num_running, planner.num_waiting, planner.statistics().waiting_blocks)

    def _request_done(self) -> None:
        self._done += 1
        if self._on_done is not None:
            self._on_done()

    # ---- loans and remote blocks -------------------------------------------------------------

    def _borrow(self, inst: _Instance, r: RequestRecord, short: int) -> int:
        """As ``Engine._borrow``: the loan's size and creditors from ``lending``; reserve and
        commit on each creditor's pool, ``add_loan`` at home. Returns the blocks granted."""
        bs = self.spec.block_size
        most = -(-r.context_tokens // bs)
        n = loan_size(short, most, inst.tables.num_blocks(r.index))
        self._sync_ledger()
        offers = [(j.id, self.ledger.instance(j.id).lendable) for j in self.instances if j is not inst]

        def ask(j: int, take: int) -> bool:
            creditor = self.instances[j]
            reservation = creditor.pool.try_reserve(inst.id, take, self.now, _RESERVATION_TTL_S)
            if reservation is None:
                return False
            blocks = creditor.pool.commit(reservation, r.index, self.now)
            inst.planner.add_loan(r.index, j, blocks)
            self._dirty.add(j)
            r.away[j] = r.away.get(j, 0) + take
            r.most_instances = max(r.most_instances, 1 + len(r.away))
            self.num_loans += 1
            return True

        return borrow(n, offers, r.away, part_limit(most, len(self.instances), bs), ask)

    def _release_remote(self, r: RequestRecord, runs) -> None:
        for j, blocks in runs:
            self.instances[j].pool.free_blocks(r.index, list(blocks))
            self._dirty.add(j)
        r.away.clear()
        if runs:
            self._wake = True

    # ---- the gManager's planner and migration ------------------------------------------------

    def _plan(self) -> None:
        """Every ``planner_interval_s``: the ledger learns where every running request's blocks
        are (as the runtime's ``_record``), the planner plans, homes queue the moves."""
        self._sync_ledger()
        for inst in self.instances:
            for rid in inst.planner.running_ids():
                r = self.requests[rid]
                away = sum(r.away.values())
                placement = {inst.id: inst.tables.num_blocks(rid) - away, **r.away}
                for j in set(placement) | set(r.recorded):
                    diff = placement.get(j, 0) - r.recorded.get(j, 0)
                    if diff:
                        self.ledger.record_blocks(rid, inst.id, j, diff)
                        r.recorded[j] = placement.get(j, 0)
        for move in self.gmanager.plan(self.ledger):
            self.instances[self.requests[move.request_id].home].moves.append(move)

    def _run_moves(self, inst: _Instance) -> None:
        moves, inst.moves = inst.moves, []
        for m in moves:
            r = self.requests[m.request_id]
            if r.finish_s is not None or not inst.tables.has_request(r.index):
                continue
            if m.src == inst.id and m.dst != inst.id:
                self._move_out(inst, r, m.num_blocks, self.instances[m.dst])
            elif m.dst == inst.id and m.src != inst.id:
                self._move_home(inst, r, m.num_blocks, self.instances[m.src])

    def _copy(self, a: _Instance, b: _Instance, num_blocks: int) -> None:
        t = self.cost.message_time(num_blocks * self.cost.block_bytes(self.spec.block_size), a.node == b.node, self.cost.tp)
        a.owed_s += t
        b.owed_s += t
        self.num_moves += 1
        self.blocks_moved += num_blocks

    def _move_out(self, inst: _Instance, r: RequestRecord, n: int, dst: _Instance) -> None:
        ids, tail_here = movable(inst.tables.runs(r.index), inst.id)
        self._sync_ledger()
        n = min(n, len(ids) - (0 if tail_here else 1), dst.pool.lendable)
        if n <= 0:
            return
        reservation = dst.pool.try_reserve(inst.id, n, self.now, _RESERVATION_TTL_S)
        if reservation is None:
            return
        new_ids = dst.pool.commit(reservation, r.index, self.now)
        old = ids[len(ids) - n:]
        inst.tables.move_blocks(r.index, inst.id, dst.id, new_ids, keep_last=1)
        inst.pool.free_blocks(r.index, old)
        inst.pool.add_borrowed(r.index, inst.id, n)
        r.away[dst.id] = r.away.get(dst.id, 0) + n
        r.most_instances = max(r.most_instances, 1 + len(r.away))
        self._dirty.update((inst.id, dst.id))
        self._copy(inst, dst, n)

    def _move_home(self, inst: _Instance, r: RequestRecord, n: int, src: _Instance) -> None:
        ids, _ = movable(inst.tables.runs(r.index), src.id)
        n = min(n, len(ids), inst.pool.num_free)
        if n <= 0:
            return
        new_ids = inst.pool.allocate(r.index, n)
        old = ids[len(ids) - n:]
        inst.tables.move_blocks(r.index, src.id, inst.id, new_ids, keep_last=1)
        inst.pool.remove_borrowed(r.index, n)
        src.pool.free_blocks(r.index, old)
        left = r.away.get(src.id, 0) - n
        if left > 0:
            r.away[src.id] = left
        else:
            r.away.pop(src.id, None)
        self._dirty.update((inst.id, src.id))
        self._copy(inst, src, n)
        self._wake = True

    # ---- heartbeats, samples, the result -----------------------------------------------------

    def _sync_ledger(self) -> None:
        """The heartbeats: every pool that changed sends its delta to the ledger."""
        if not self._dirty:
            return
        for i in sorted(self._dirty):
            delta = self.instances[i].pool.take_delta()
            if not delta.empty and not self.ledger.apply_delta(delta):
                self.ledger.apply_snapshot(i, self.instances[i].pool.counters())
        self._dirty.clear()

    def _sample(self) -> None:
        self.kv_times.append(self.now)
        self.kv_used.append([inst.pool.num_used / inst.pool.num_blocks for inst in self.instances])

    def _result(self) -> SimResult:
        leaked = 0
        for inst in self.instances:
            leaked += inst.pool.num_used + inst.pool.num_reserved + inst.pool.num_borrowed
            leaked += inst.planner.num_requests
        makespan = max([self._last_arrival] + [r.finish_s or 0.0 for r in self.requests]) - self._first_arrival
        return SimResult(
            self.policy, len(self.instances), self.cost.tp, self.blocks_per_instance, self.requests,
            self._window[1] - self._window[0], self._window_tokens, self._window_output, makespan, self.num_steps,
            self.num_loans,
            self.num_moves, self.blocks_moved, self.num_preemptions, self.recomputed_tokens, self.kv_times, self.kv_used, leaked,
        )


def simulate(spec: ClusterSpec, policy: str, trace: list[TraceRequest], **kwargs) -> SimResult:
    """Run one policy over one trace (see ``Simulation``)."""
    return Simulation(spec, policy, trace, **kwargs).run()
