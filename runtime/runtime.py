"""The embeddable runtime: ``open_runtime`` and its async ``generate`` API.

::

    async with infinillm.open_runtime(model="smollm2", kv_capacity_tokens=8192, device="cpu") as rt:
        async for out in rt.generate("Hello", SamplingParams(max_tokens=32, temperature=0)):
            print(out.outputs[0].text)        # cumulative; out.finished on the last one only
        print(rt.statistics())

A request's life (one instance, inside the application's process):

1. ``generate`` validates the prompt and the sampling parameters *at the call* (bad input
   raises ``ValidationError``, a request that can never fit raises ``RequestTooLongError``),
   takes the ``request_id`` (a second live request with the same id is refused) and returns an
   async iterator; nothing is queued until it is first iterated.
2. The first ``__anext__`` queues the request; the serving task adds it to the engine between
   two steps.
3. The serving task runs ``engine.step`` in a worker thread (``trio.to_thread``: the model's
   compute releases the GIL and the application's event loop stays responsive), then routes
   each ``RequestOutput`` to its request's channel.
4. The iterator yields the cumulative outputs; the last has ``finished=True``, whatever ends
   the request: a stop condition, its length, an error, or an abort (``abort(request_id)``,
   or the runtime closing with it in flight) with ``finish_reason="abort"``. Leaving the
   ``async for`` early (the stream is closed or dropped) aborts it too. Every abort frees the
   request's KV blocks; the id is free again once its stream has ended, ``aclose()`` has
   returned, or (a dropped stream) its abort has been applied.

Only the serving task touches the engine, and only between steps: ``abort`` and a closing
stream record what is to be done and wake it. A failure inside a step ends the requests that
were in that step with ``finish_reason="error"`` (their blocks freed); the others go on.
Leaving ``open_runtime`` waits for the step in flight (if any), ends every request still
queued or running with an ``abort`` output, and stops the serving task; a stream first read
after that raises ``InfiniLLMError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import trio

from . import core_sched
from .cluster import PeerService, connect_peer
from .config import RuntimeConfig
from .engine import Engine, EngineStats, block_hashes
from .homes import RemoteOutput, WorkerHome
from .router import InstanceLoad, Router
from .errors import InfiniLLMError, InstanceDeadError, ValidationError
from .memory import MemoryWatch, default_probe, derive_num_blocks, kv_bytes_per_token
from .outputs import CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .transport import (
    ConnectPeers,
    HeartbeatDelta,
    InstancesLost,
    Joined,
    JoinReady,
    JoinRequest,
    LendableUpdate,
    MoveBlocks,
    StepOutputs,
    Sync,
    Synced,
    open_transport,
)

if TYPE_CHECKING:
    from .worker import WorkerProcess

__all__ = ["open_runtime", "Runtime", "RuntimeStats", "RequestStream"]

log = logging.getLogger("infinillm.runtime")

# Ledger ids of requests homed on workers: apart from the engine ids of this instance's own.
_WIRE_LID = 1 << 62
# A worker whose connection closed is given this long to be seen exiting before its silence is
# taken for an error (the kernel closes a killed process's sockets before it can be reaped).
_DYING_S = 2.0
# A worker that joined counts, for the router, as this many more queued requests, fading to
# none over _JOIN_RAMP_S seconds: it takes load gradually.
_JOIN_RAMP_QUEUE = 4
_JOIN_RAMP_S = 10.0
# A worker given an id (Joined) must say it serves (JoinReady) within this long: it loads its
# model before, so this is generous; after it the id is free again.
_JOIN_READY_S = 600.0

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_THROUGHPUT_WINDOW_S = 10.0
_SETTLE_S = 10.0  # at close, how long the workers get to apply the last aborts
_PREFIX_HOMES = 1 << 16  # block hashes the router remembers the home of


@dataclass(frozen=True, slots=True)
class RuntimeStats:
    """A frozen snapshot of the runtime (``Runtime.statistics()``).

    ``instances[0]`` is the in-process instance; with workers, ``instances[i]`` is worker i as
    the gManager's ledger last heard from it (its heartbeats: blocks and load; no step
    counters; ``Runtime.sync_statistics()`` asks every worker first); a worker that died is
    left out of ``instances`` and named in ``lost_instances`` (with what happened). ``homes`` maps each
    placed request's id to the instance serving it, ``placements`` each running request's id to
    the blocks each instance holds of it (``{instance: blocks}``; for a request on a worker, as
    of its last output).

    ``num_finished``, ``num_aborted`` and ``num_errors`` count the requests that were started
    (their stream read at least once) by how they ended: a stop or length limit, an abort, an
    error. A stream closed or dropped before its first read started nothing and is not counted.
    """

    num_running: int
    num_waiting: int
    num_finished: int
    num_aborted: int
    num_errors: int
    generation_tokens_per_s: float
    instances: tuple[EngineStats, ...]
    placements: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    homes: Mapping[str, int] = field(default_factory=dict)
    lost_instances: Mapping[int, str] = field(default_factory=dict)
    refused_joins: int = 0  # workers whose CURVE handshake on the join socket failed (a wrong key)

    @property
    def kv_free_blocks(self) -> int:
        return sum(i.kv_free_blocks for i in self.instances)

    @property
    def kv_used_blocks(self) -> int:
        return sum(i.kv_used_blocks for i in self.instances)

    @property
    def kv_cached_blocks(self) -> int:
        """Blocks named by the prefix cache, over every instance (in use or evictable)."""
        return sum(i.kv_cached_blocks for i in self.instances)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Of the tokens of every admission so far (a preempted request counts again when it
        is admitted again), the share found cached."""
        query = sum(i.prefix_query_tokens for i in self.instances)
        return sum(i.prefix_hit_tokens for i in self.instances) / query if query else 0.0


@dataclass(slots=True, eq=False)
class _Request:
    """A request the runtime knows, from ``generate`` until its id is free again.

    Its stage: made (``send`` is None: not iterated yet), queued (in ``Runtime._queue``),
    running (``rid`` is the engine's id). ``ended`` is set when the runtime lets it go.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    send: trio.MemorySendChannel | None = None
    rid: int | None = None  # its id in instance 0's engine, when it runs there
    remote: RemoteOutput | None = None  # when it runs on a worker: its outputs so far
    wire: int | None = None  # and its id on the control socket
    instance: int = 0  # its home, once placed
    need: int = 0  # KV blocks it may grow to (prompt + max new tokens): the router's measure
    block_hashes: list[int] | None = None  # its prompt's, while the router places it (prefix affinity)
    aborted: bool = False  # abort() before its stream was first read
    ended: trio.Event = field(default_factory=trio.Event)
    last: RequestOutput | None = None  # the last output its stream was given
    abort_sent: bool = False  # an AbortRequest went to its (worker) home: if that home dies, it ends
    resume: list[int] | None = None  # tokens it made before its home was lost (it resumes after them)
    lid: int | None = None  # its id in the gManager's ledger (placement, the planner's moves)
    recorded: dict[int, int] = field(default_factory=dict)  # its blocks per instance, as the ledger has them
    # After its home was lost: what it had produced before, which the outputs of its new home
    # (a request of the tokens so far) continue.
    base: RequestOutput | None = None


class RequestStream:
    """The async iterator ``Runtime.generate`` returns: cumulative ``RequestOutput`` s.

    The request is queued on the first ``__anext__``; the stream ends after the output with
    ``finished=True``. Leaving the ``async for`` early aborts it: as soon as the stream is
    closed (``aclose``, ``async with``, from any task: a loop blocked on it then ends) or dropped
    (the iterator is garbage collected, which CPython does the moment a loop over it is left),
    the runtime aborts the request and frees its blocks. A plain class rather than an async
    generator, so dropping it unfinished is a normal way to stop, not a resource leak.
    """

    __slots__ = ("_runtime", "_request", "_recv", "_done", "__weakref__")

    def __init__(self, runtime: Runtime, request: _Request) -> None:
        self._runtime = runtime
        self._request = request
        self._recv: trio.MemoryReceiveChannel | None = None
        self._done = False

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._recv is None:
            try:
                self._recv = self._runtime._submit(self._request)
            except InfiniLLMError:
                self._done = True
                raise
        try:
            out = await self._recv.receive()
        except trio.EndOfChannel:  # another task reading this stream took the final output
            self._done = True
            raise StopAsyncIteration from None
        except trio.ClosedResourceError:
            if not self._done:
                raise
            raise StopAsyncIteration from None  # closed by another task while this one waited
        if out.finished:
            self._done = True
            self._recv.close()
        return out

    async def aclose(self) -> None:
        """Close the stream; an unfinished request is aborted, and this waits until the
        runtime has let it go (its blocks are free and its id can be used again)."""
        self._close()
        if self._request.ended.is_set():
            await trio.lowlevel.checkpoint()
        else:
            await self._request.ended.wait()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def _close(self) -> None:
        if self._done:
            return
        self._done = True
        if self._recv is None:
            self._runtime._release(self._request)
        else:
            self._runtime._abort_request(self._request)
            self._recv.close()

    def __del__(self) -> None:
        if self._done:
            return
        try:
            # The runtime's state belongs to its trio thread; a collection elsewhere (a cycle
            # freed by the GC in the step's worker thread) hands the close over to it.
            if threading.get_ident() == self._runtime._thread:
                self._close()
            else:
                self._runtime._token.run_sync_soon(self._close)
        except Exception:  # noqa: BLE001 - never raise from a finalizer (e.g. after trio.run ended)
            pass


class Runtime:
    """An embedded LLM runtime. Build it with ``open_runtime``; see the module docstring."""

    def __init__(self, config: RuntimeConfig, engine: Engine, tokenizer, *,
                 output_sink: Callable[[list[RequestOutput]], None] | None = None,
                 pool_sink: Callable[[], None] | None = None) -> None:
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self._thread = threading.get_ident()
        self._token = trio.lowlevel.current_trio_token()
        self._wake = trio.Event()
        self._stopped = trio.Event()
        self._requests: dict[str, _Request] = {}  # every live id
        self._queue: dict[str, _Request] = {}  # iterated, not yet in the engine (arrival order)
        self._aborts: set[str] = set()  # to abort between two steps
        self._closed = False
        self._stepping = False
        self._stats_before_step: tuple[EngineStats, dict[str, dict[int, int]]] | None = None
        # The gManager's view of every instance's pool: this one's deltas after each step,
        # the workers' from their heartbeats (``open_runtime`` registers them).
        self.ledger = core_sched.DebtLedger()
        self.ledger.register_instance(engine.instance_id, engine.pool.num_blocks, engine.pool.max_lent_blocks)
        self._throughput: deque[tuple[float, int]] = deque()
        self._remote_tokens = 0  # generated by the requests homed on workers
        self._last_lendable: tuple[int, ...] = ()  # as last told to the homes
        self._heard = trio.Event()  # set (and replaced) at each worker heartbeat
        self._after_steps = trio.Event()  # set (and replaced) each time aborts are applied
        self._num_finished = 0
        self._num_aborted = 0
        self._num_errors = 0
        self.workers: tuple[WorkerProcess, ...] = ()  # instances 1..N-1, when N > 1
        self.homes: dict[int, WorkerHome] = {}  # their control sockets
        self.router = Router()
        # block hash -> the home of the last request whose prompt had it (the router's affinity)
        self._prefix_homes: OrderedDict[int, int] = OrderedDict()
        self._wire: dict[int, _Request] = {}  # requests homed on workers, by wire id
        self._next_wire = 1
        # A worker's runtime hands its outputs and pool changes to its control socket instead.
        self._output_sink = output_sink
        self._pool_sink = pool_sink
        self.lost_instances: dict[int, str] = {}  # workers that died, and how
        self.memory: MemoryWatch | None = None  # with peers: the device memory that caps lending
        self._worker_memory: dict[int, tuple[int, int]] = {}  # (total, free) bytes, from heartbeats
        self._worker_prefix: dict[int, tuple[int, int, int]] = {}  # cached blocks, query and hit tokens, from heartbeats
        self._heard_count: dict[int, int] = {}  # heartbeats received from each worker
        self._last_heard: dict[int, float] = {}  # and when the last one came (trio time)
        self._by_lid: dict[int, _Request] = {}  # placed requests by ledger id
        self._cluster_nursery: trio.Nursery | None = None  # the workers' tasks (``_start_workers``)
        self._cluster: _Cluster | None = None  # what a worker joining from another host needs
        self._joining: dict[int, tuple[int, int, float]] = {}  # id -> (blocks, lendable, deadline) until ready
        self._joined_at: dict[int, float] = {}  # (trio time) the router gives a newcomer load gradually
        self.join_address: str | None = None  # where workers on other hosts join, once bound
        self._refused_joins = 0
        self.planner = None  # core_sched.Planner, with workers (``_plan_moves``)
        self.num_moves = 0  # planner moves sent to the homes

    # ---- public API --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once ``open_runtime``'s block has been left (nothing more is served)."""
        return self._closed

    def generate(
        self,
        prompt: str | Sequence[Mapping[str, str]] | Mapping[str, Any],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Generate from ``prompt``: a string (encoded as Hugging Face does with
        ``add_special_tokens=True``), chat messages (``{"role", "content"}``, the chat template
        applied) or ``{"prompt_token_ids": [...]}``. Returns an async iterator of cumulative
        ``RequestOutput`` s; validation happens here, at the call, and so does taking the
        ``request_id``: it must not belong to another live request."""
        if self._closed:
            raise InfiniLLMError("the runtime is closed: generate() needs an open runtime")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValidationError("sampling_params", type(params).__name__, "must be a SamplingParams")
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str) or not request_id:
            raise ValidationError("request_id", request_id, "must be a non-empty string")
        if request_id in self._requests:
            raise ValidationError("request_id", request_id, "is already in use by a live request")
        text, token_ids = self._tokenize(prompt)
        max_new = self.engine.check_request(token_ids, params)
        request = self._requests[request_id] = _Request(request_id, text, token_ids, params)
        request.need = -(-(len(token_ids) + max_new) // self.engine.block_size)
        return RequestStream(self, request)

    def abort(self, request_id: str) -> None:
        """Abort a request by id (a no-op if no live request has it). Its stream ends with a
        final output whose ``finish_reason`` is ``"abort"``; its blocks are freed between two
        steps."""
        request = self._requests.get(request_id)
        if request is not None:
            self._abort_request(request)

    def _abort_request(self, request: _Request) -> None:
        """Abort this request, if it is still the live one of its id (a stream closed after its
        request ended must not abort a newer request that took the id)."""
        if self._requests.get(request.request_id) is not request:
            return
        if request.send is None:
            request.aborted = True  # its first read gives the abort output
            return
        self._aborts.add(request.request_id)
        self._wake.set()

    def statistics(self) -> RuntimeStats:
        """A frozen snapshot. While a step runs, the instance's figures are those from just
        before it (the engine is not read while a step changes it). Safe from any thread: from
        another one it is taken on the runtime's trio thread; after the run has ended, the last
        figures with a rate of 0."""
        if threading.get_ident() != self._thread:
            try:
                return trio.from_thread.run_sync(self._statistics, trio_token=self._token)
            except trio.RunFinishedError:
                return self._statistics(idle=True)
        return self._statistics(idle=self._run_finished())

    async def sync_statistics(self) -> RuntimeStats:
        """``statistics()`` with every worker as of now, not as of its last heartbeat: each
        instance first waits until the blocks it gave back have been freed where they lay, then
        reports its pool; this returns once the ledger holds every report."""
        await trio.lowlevel.checkpoint()
        try:
            await self._sync_workers()
        except InfiniLLMError:
            if not self._closed:
                raise
        return self.statistics()  # (after the close: the last figures)

    async def _sync_workers(self) -> None:
        if self._closed:
            return
        if self.memory is not None and self.memory.poll():  # this instance's memory as of now
            self._ledger_changed()
        await self._aborts_applied()
        for peer in self.engine.peers.values():
            await peer.wait_released()
        homes = list(self.homes.values())
        for snapshot in (False, True):
            replies = {}

            failed: list[InfiniLLMError] = []

            async def sync(home, snapshot=snapshot) -> None:
                try:
                    replies[home.instance_id] = await home.request(Sync(snapshot))
                except InfiniLLMError as e:  # closing: the last figures will do; a dead worker: left out
                    if not self._closed and not await self._dying(home.instance_id):
                        failed.append(e)

            async with trio.open_nursery() as nursery:
                for home in homes:
                    nursery.start_soon(sync, home)
            if failed:
                raise failed[0]
        for instance_id, reply in replies.items():
            while self._heard_count.get(instance_id, 0) < reply.heartbeats and not self._closed \
                    and instance_id not in self.lost_instances:
                await self._heard.wait()
        if self._closed:
            return
        if not self._stepping:
            self._apply_own_delta()

    def _apply_own_delta(self) -> bool:
        """This instance's heartbeat: its pool's changes since the last one, to the ledger
        (never while a step runs). True when there were some."""
        with self.engine.pool_lock:
            delta = self.engine.pool.take_delta()
        if delta.empty:
            return False
        self.ledger.apply_delta(delta)
        return True

    def _engine_snapshot(self) -> tuple[EngineStats, dict[str, dict[int, int]]]:
        engine = self.engine
        placements = {req.request_id: engine.placement(req.rid) for req in engine.requests.values()
                      if engine.tables.has_request(req.rid)}
        return engine.statistics(), placements

    def _statistics(self, idle: bool = False) -> RuntimeStats:
        stats, placements = self._stats_before_step if self._stepping else self._engine_snapshot()
        workers = tuple(
            _stats_from_view(self.ledger.instance(i), stats.block_size, self._worker_memory.get(i),
                             self._worker_prefix.get(i))
            for i in sorted(self.homes) if self.ledger.has_instance(i)
        )
        placements = dict(placements)
        for request in self._wire.values():
            if request.remote.placement:
                placements[request.request_id] = dict(request.remote.placement)
        homes = {r.request_id: r.instance for r in self._requests.values() if r.rid is not None or r.wire is not None}
        return RuntimeStats(
            num_running=stats.num_running + sum(w.num_running for w in workers),
            num_waiting=stats.num_waiting + sum(w.num_waiting for w in workers) + len(self._queue),
            num_finished=self._num_finished,
            num_aborted=self._num_aborted,
            num_errors=self._num_errors,
            generation_tokens_per_s=0.0 if idle else self._tokens_per_s(),
            instances=(stats, *workers),
            placements=placements,
            homes=homes,
            lost_instances=dict(self.lost_instances),
            refused_joins=self._refused_joins,
        )



    @staticmethod
    def _run_finished() -> bool:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:  # on the runtime's thread after trio.run returned
            return True
        return False

    # ---- the request stream ------------------------------------------------------------------

    def _submit(self, request: _Request) -> trio.MemoryReceiveChannel:
        """Queue a request at its stream's first read; returns the channel of its outputs."""
        if self._closed:
            self._release(request)
            raise InfiniLLMError(f"the runtime is closed: request {request.request_id!r} was never started")
        # Unbounded: the serving task never waits on a slow consumer (a snapshot per step).
        request.send, recv = trio.open_memory_channel(float("inf"))
        if request.aborted:
            self._route([_final_output(request, "abort")])
        else:
            self._queue[request.request_id] = request
            self._wake.set()
        return recv

    def _release(self, request: _Request) -> None:
        """Let a request go: its id is free again."""
        if self._requests.get(request.request_id) is request:
            del self._requests[request.request_id]
        request.ended.set()

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValidationError("prompt", prompt, "must be a non-empty string")
            _check_unicode("prompt", prompt)
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, Mapping):
            if set(prompt) != {"prompt_token_ids"}:
                raise ValidationError(
                    "prompt keys", sorted(map(str, prompt)), "a dict prompt must have exactly one key, 'prompt_token_ids'"
                )
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise ValidationError("prompt_token_ids", ids, "must be a list of int token ids")
            return None, list(ids)
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            for i, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValidationError(f"prompt[{i}]", dict(m), "a chat message needs string 'role' and 'content'")
                _check_unicode(f"prompt[{i}]['content']", m["content"])
            # The rendered template holds its own special tokens: encode it without adding any.
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
            return text, self.tokenizer.encode(text)
        raise ValidationError(
            "prompt", prompt, "must be a string, a list of chat messages or {'prompt_token_ids': [...]}"
        )

    # ---- the serving task --------------------------------------------------------------------

    async def _serve(self) -> None:
        """Run steps while there is work; between steps, apply aborts and admit requests.
        On the way out (closed, or cancelled from outside) end every request still here."""
        engine = self.engine
        try:
            while not self._closed:
                await self._wake.wait()
                self._wake = trio.Event()
                self._between_steps()
                while engine.has_work and not self._closed:
                    steps, loans, claims = engine.num_steps, engine.num_loans, engine.num_failed_claims
                    self._stats_before_step = self._engine_snapshot()
                    self._stepping = True
                    try:
                        outputs = await trio.to_thread.run_sync(self._step)
                    finally:
                        self._stepping = False
                    self._throughput.append((trio.current_time(), self._generated_tokens()))
                    self._route(outputs)
                    self._between_steps()
                    if engine.num_steps == steps and engine.num_loans == loans and not outputs \
                            and engine.num_failed_claims == claims:
                        break  # nothing ran or was borrowed (waiting on memory): sleep until something changes
                    await trio.lowlevel.checkpoint()
        finally:
            try:
                self._end_all()
            finally:
                self._stopped.set()

    def _step(self) -> list[RequestOutput]:
        """One engine step (runs in a worker thread). The engine ends the requests of a step
        that fails; a failure outside any step's requests (the scheduler itself) leaves the
        engine's state unknown, and ends every request it holds."""
        try:
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a step failure must not stop the runtime
            log.exception("engine step failed outside its requests")
            return [out for rid in list(self.engine.requests)
                    if (out := self.engine.fail(rid, f"{type(exc).__name__}: {exc}")) is not None]

    async def _aborts_applied(self) -> None:
        """Return once every abort asked for so far has been applied (between two steps)."""
        while self._aborts and not self._closed:
            await self._after_steps.wait()

    def _between_steps(self) -> None:
        if self.engine._lost_pending:
            self._route(self.engine.reap_lost())
        if self.homes:
            self._record_own_placements()
        self._apply_aborts()
        self._after_steps.set()
        self._after_steps = trio.Event()
        self._admit()
        if self._pool_sink is not None:  # a worker: its heartbeat goes to the gManager
            self._pool_sink()
            return
        if self._apply_own_delta() and self.homes:
            self._ledger_changed()

    def _tokens_per_s(self) -> float:
        """Tokens generated per second by the steps of the last ``_THROUGHPUT_WINDOW_S``; 0 when
        no request is running or waiting."""
        if not self.engine.has_work and not self._queue and not self._wire:
            self._throughput.clear()
            return 0.0
        now = trio.current_time()
        samples = self._throughput
        while samples and samples[0][0] < now - _THROUGHPUT_WINDOW_S:
            samples.popleft()
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0)

    def _generated_tokens(self) -> int:
        return self.engine.generated_tokens + self._remote_tokens

    def _route(self, outputs: list[RequestOutput]) -> None:
        if self._output_sink is not None and outputs:
            self._output_sink(outputs)
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is None or request.send is None:
                continue
            if request.base is not None:
                out = _continued(request, out)
            request.last = out
            try:
                request.send.send_nowait(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the consumer has gone; its stream's close has asked for the abort
            if out.finished:
                request.send.close()
                self._queue.pop(out.request_id, None)
                self._aborts.discard(out.request_id)
                if request.wire is not None:
                    self._wire.pop(request.wire, None)
                self._forget(request)
                self._release(request)
                reason = out.outputs[0].finish_reason if out.outputs else None
                if reason == "abort":
                    self._num_aborted += 1
                elif reason == "error":
                    self._num_errors += 1
                else:
                    self._num_finished += 1

    def _admit(self) -> None:
        """Place the queued requests (the router, when there are workers) and hand each to its
        home: this process's engine, or a worker's control socket."""
        if not self._queue:
            return
        queued = list(self._queue.values())
        self._queue.clear()
        homes = (self.router.place([r.need for r in queued], self._loads(), self._affinity(queued)) if self.homes
                 else [self.engine.instance_id] * len(queued))
        for request, home in zip(queued, homes):
            request.instance = home
            self._remember_prefix(request, home)
            if home == self.engine.instance_id:
                try:
                    request.rid = self.engine.add_request(
                        request.request_id, request.prompt_token_ids, request.params, request.prompt,
                        request.resume or (),
                    )
                except InfiniLLMError as exc:  # e.g. the cluster shrank since the call was checked
                    self._route([_final_output(request, "error", str(exc))])
                    continue
                self._place(request, request.rid)
            else:
                self._hand_to_worker(request, home)

    def _affinity(self, queued: list[_Request]) -> list[int | None] | None:
        """Each request's instance of choice for the router: the last home of the longest prefix
        of its prompt (block hashes, as the engines name their cached blocks), or None."""
        if not self.engine.prefix_caching:
            return None
        out: list[int | None] = []
        for request in queued:
            request.block_hashes = block_hashes(request.prompt_token_ids, self.engine.block_size)
            home = None
            for h in request.block_hashes:
                if h not in self._prefix_homes:
                    break
                home = self._prefix_homes[h]
            out.append(home)
        return out

    def _remember_prefix(self, request: _Request, home: int) -> None:
        if not request.block_hashes:
            return
        for h in request.block_hashes:
            self._prefix_homes[h] = home
            self._prefix_homes.move_to_end(h)
        while len(self._prefix_homes) > _PREFIX_HOMES:
            self._prefix_homes.popitem(last=False)
        request.block_hashes = None

    def _hand_to_worker(self, request: _Request, home: int) -> None:
        """Send a request to worker ``home`` (its control socket), under a new wire id; its
        outputs come back as deltas (``RemoteOutput``). A resumed one brings its tokens."""
        request.wire = self._next_wire
        self._next_wire += 1
        self._place(request, _WIRE_LID | request.wire)
        request.remote = RemoteOutput(request.request_id, request.prompt, request.prompt_token_ids,
                                      request.params.logprobs is not None)
        self._wire[request.wire] = request
        self.homes[home].add(request.wire, request.prompt_token_ids, request.params, request.resume)

    # ---- the gManager's view of where requests live (for the planner) ----------------------

    def _record(self, request: _Request, placement: Mapping[int, int]) -> None:
        """Bring the ledger's placement of a request to ``placement`` (blocks per instance), for
        the planner (none without one)."""
        ledger = self.ledger
        if self.planner is None or request.lid is None or not ledger.has_instance(request.instance):
            return
        for instance in set(placement) | set(request.recorded):
            diff = placement.get(instance, 0) - request.recorded.get(instance, 0)
            if diff and ledger.has_instance(instance):
                ledger.record_blocks(request.lid, request.instance, instance, diff)
                request.recorded[instance] = placement.get(instance, 0)

    def _forget(self, request: _Request) -> None:
        if request.lid is not None:
            self._by_lid.pop(request.lid, None)
            if self.ledger.has_request(request.lid):
                self.ledger.forget_request(request.lid)
            request.lid = None
            request.recorded.clear()

    def _record_own_placements(self) -> None:
        """After a step of this instance: its load, and (for the planner) its requests'
        placements, to the ledger."""
        engine = self.engine
        for req in (engine.requests.values() if self.planner is not None else ()):
            request = self._requests.get(req.request_id)
            if request is not None and request.rid == req.rid and engine.tables.has_request(req.rid):
                self._record(request, engine.placement(req.rid))
        s = engine.planner.statistics()
        self.ledger.set_load(engine.instance_id, s.num_running, s.num_waiting, s.waiting_blocks)

    def _place(self, request: _Request, lid: int) -> None:
        if self.homes:  # (one instance: no ledger placements, no planner)
            request.lid = lid
            self._by_lid[lid] = request

    def _loads(self) -> list[InstanceLoad]:
        """Every instance's free blocks (after reservations, less the needs of the requests
        placed there that have not produced a token yet) and queue, for the router."""
        engine = self.engine
        free = {engine.instance_id: engine.pool.counters().free}
        for w in self.homes:
            free[w] = self.ledger.instance(w).free
        queue = dict.fromkeys(free, 0)
        for r in self._requests.values():
            if r.rid is not None:
                started = (er := engine.requests.get(r.rid)) is None or er.first_token_at is not None
            elif r.wire is not None:
                started = r.remote.last is not None
            else:
                continue  # not placed yet
            if r.instance not in queue:
                continue  # its home was lost: being placed again
            queue[r.instance] += 1
            if not started:
                free[r.instance] -= r.need
        now = trio.current_time()
        for i, since in self._joined_at.items():  # a newcomer takes load gradually
            ramp = 1.0 - (now - since) / _JOIN_RAMP_S
            if ramp > 0 and i in queue:
                queue[i] += math.ceil(_JOIN_RAMP_QUEUE * ramp)
        return [InstanceLoad(i, free[i], queue[i]) for i in free]

    def _remote_outputs(self, msg: StepOutputs) -> None:
        """A worker's step: its requests' deltas, as cumulative outputs to their streams."""
        outputs = []
        for d in msg.outputs:
            request = self._wire.get(d.request_id)
            if request is None:
                continue  # it ended here already (the runtime closed, or the worker refused it)
            self._remote_tokens += len(d.token_ids)
            outputs.append(request.remote.apply(d))
            if d.placement:
                self._record(request, request.remote.placement)
        if outputs:
            self._throughput.append((trio.current_time(), self._generated_tokens()))
            self._route(outputs)

    def _ledger_changed(self) -> None:
        """The gManager's part after a heartbeat: when what the instances may lend changed,
        tell every home (this engine's peers, each worker) and wake a home that may be waiting
        for a loan."""
        ids = self.ledger.instance_ids()
        lendable = tuple(self.ledger.instance(i).lendable for i in ids)
        if lendable == self._last_lendable:
            return
        self._last_lendable = lendable
        for i, n in zip(ids, lendable):
            if i in self.engine.peers:
                self.engine.peers[i].set_lendable(n)
        if self.engine.has_work:
            self._wake.set()
        update = LendableUpdate(tuple(ids), lendable)
        for home in self.homes.values():
            home.lendable(update)

    async def _heartbeats(self) -> None:
        """This instance's heartbeat while it is idle (it lends between its own steps), and its
        memory reading (``memory``: the lending cap follows the device's free memory)."""
        while True:
            await trio.sleep(self.config.parallel.heartbeat_interval_s)
            capped = self.memory is not None and self.memory.poll()
            if (not self._stepping and self._apply_own_delta()) or capped:
                self._ledger_changed()

    async def _plan_moves(self) -> None:
        """The gManager's planner, every ``planner_interval_s``: its moves (at most
        ``max_moves_per_step`` blocks a round) go to each request's home, which carries them out
        between two steps (``Engine.queue_move``; a worker through ``MoveBlocks``)."""
        while True:
            await trio.sleep(self.config.scheduler.planner_interval_s)
            if self.planner is None or self._closed:
                continue
            for move in self.planner.plan(self.ledger):
                request = self._by_lid.get(move.request_id)
                if request is None:
                    continue
                self.num_moves += 1
                if request.instance == self.engine.instance_id and request.rid is not None:
                    self.engine.queue_move(request.rid, move.num_blocks, move.src, move.dst)
                    self._wake.set()
                elif request.wire is not None and request.instance in self.homes:
                    self.homes[request.instance].send(
                        MoveBlocks(request.wire, move.num_blocks, move.src, move.dst, move.kind)
                    )

    async def _settle_workers(self) -> None:
        """At close: each worker has applied the aborts sent to it and its creditors have
        answered its releases (so every block any instance lent is free again)."""
        async def settle(home: WorkerHome) -> None:
            try:
                await home.request(Sync(False))
            except (InfiniLLMError, trio.ClosedResourceError) as e:
                log.warning("instance %d did not settle at close: %s", home.instance_id, e)

        async with trio.open_nursery() as nursery:
            for home in self.homes.values():
                nursery.start_soon(settle, home)

    def _remote_refused(self, wire: int, error: str) -> None:
        request = self._wire.get(wire)
        if request is None or not self._worker_alive(request.instance):
            return  # (a worker that died refuses everything: its loss starts its requests again elsewhere)
        if self._cluster_nursery is None:
            self._route([request.remote.final("error", error)])
        else:
            self._cluster_nursery.start_soon(self._refused, request, wire, error)

    async def _refused(self, request: _Request, wire: int, error: str) -> None:
        """A refusal from a worker whose connection closed may come a moment before its process
        is seen to end: wait for that moment before taking it as the request's error."""
        if await self._dying(request.instance):
            return
        if self._wire.get(wire) is request:
            self._route([request.remote.final("error", error)])

    async def _dying(self, instance_id: int) -> bool:
        """True when a worker this runtime started ends within ``_DYING_S`` (or is lost)."""
        for w in self.workers:
            if w.instance_id == instance_id:
                with trio.move_on_after(_DYING_S):
                    await w.process.wait()
        return not self._worker_alive(instance_id)

    def _worker_alive(self, instance_id: int) -> bool:
        """Whether a worker is still a member: not lost, and (one this runtime started) its
        process still runs (it may have died a moment before its watcher noticed)."""
        if instance_id in self.lost_instances or instance_id not in self.homes:
            return False
        for w in self.workers:
            if w.instance_id == instance_id:
                return w.process.returncode is None
        return True

    # ---- lost instances ----------------------------------------------------------------------

    def lose_peers(self, instance_ids: Sequence[int], max_lent: Sequence[int], reason: str) -> None:
        """Other instances are gone: this engine stops waiting on them and, between two steps,
        recomputes its requests that had blocks there (``Engine.reap_lost``)."""
        for instance_id, n in zip(instance_ids, max_lent):
            self.engine.lose_peer(instance_id, n, reason)
        self._wake.set()

    def _instance_lost(self, instance_id: int, reason: str) -> None:
        """The gManager's part when a worker dies: it leaves the ledger, the router and every
        survivor's peers; the requests it was home to start again on the survivors from the
        tokens they have (each stream goes on where it was)."""
        if self._closed or instance_id not in self.homes:
            return
        home = self.homes.pop(instance_id)
        log.warning("instance %d lost: %s", instance_id, reason)
        self.lost_instances[instance_id] = reason
        home.lost(reason)
        max_lent = self.ledger.instance(instance_id).max_lent
        self.ledger.remove_instance(instance_id)
        self._joined_at.pop(instance_id, None)
        if self._cluster is not None:
            self._cluster.addresses.pop(instance_id, None)
            self._cluster.lendable.pop(instance_id, None)
        for request in self._by_lid.values():
            request.recorded.pop(instance_id, None)
            if request.lid is not None and not self.ledger.has_request(request.lid):
                request.recorded.clear()  # (homed there: the ledger forgot it)
        self.lose_peers((instance_id,), (max_lent,), reason)
        for other in self.homes.values():
            other.send(InstancesLost((instance_id,), (max_lent,), reason))
        for request in [r for r in self._wire.values() if r.instance == instance_id]:
            self._rehome(request, instance_id, reason)
        self._last_lendable = ()  # tell every home what each survivor may lend
        self._ledger_changed()
        self._heard.set()  # a sync_statistics() waiting for the lost one's heartbeat goes on
        self._heard = trio.Event()

    def _rehome(self, request: _Request, lost: int, reason: str) -> None:
        """Start a request whose home was lost again on a survivor, resuming after the tokens
        it had generated (``Engine.add_request(output_token_ids=...)``: its text, stop strings,
        penalties and limits go on as if nothing happened); its stream continues
        (``_continued`` puts back the logprobs it had). One that cannot fit any more ends with
        an error that says why."""
        del self._wire[request.wire]
        request.wire = request.remote = None
        self._forget(request)
        if request.abort_sent:  # aborted before its home died: it ends as it was asked to
            self._route([_final_output(request, "abort")])
            return
        if request.last is not None:
            request.base = request.last
        done = list(request.base.outputs[0].token_ids) if request.base is not None else []
        try:
            max_new = self.engine.check_request(request.prompt_token_ids, request.params)
        except InfiniLLMError as e:
            self._route([_final_output(request, "error", f"instance {lost} was lost ({reason}); {e}")])
            return
        if len(done) >= max_new:  # its last output was lost with it
            self._route([_final_output(request, "length")])
            return
        request.resume = done
        request.need = -(-(len(request.prompt_token_ids) + max_new) // self.engine.block_size)
        loads = [load for load in self._loads() if load.instance_id == self.engine.instance_id
                 or self._worker_alive(load.instance_id)]
        home = self.router.place([request.need], loads)[0]
        request.instance = home
        if home == self.engine.instance_id:
            request.rid = self.engine.add_request(request.request_id, request.prompt_token_ids, request.params,
                                                  request.prompt, done)
            self._place(request, request.rid)
            self._wake.set()
        else:
            self._hand_to_worker(request, home)

    def _apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, set()
        for request_id in aborts:
            self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        if request.rid is not None:
            out = self.engine.abort(request.rid)
            if out is not None:
                self._route([out])
        elif request.wire is not None:
            if request.wire in self._wire:
                request.abort_sent = True
                home = self.homes.get(request.instance)
                if home is not None:
                    home.abort(request.wire)  # its last delta ends the stream
                if self._closed:  # nothing more will be read from the worker: end it here
                    self._route([request.remote.final("abort")])
        elif request.send is not None:  # queued, never admitted
            self._route([_final_output(request, "abort")])
        else:  # made, never read: the stream's first read raises (closed) or gives the abort
            self._release(request)

    def _end_all(self) -> None:
        """At close: every request still here ends with an abort output (engine between steps)."""
        self._closed = True
        self._heard.set()  # a sync_statistics() waiting for a heartbeat returns
        self._after_steps.set()
        for request_id in list(self._requests):
            self._abort_now(request_id)
        self._queue.clear()
        self._aborts.clear()

    async def _close(self) -> None:
        """Stop serving: wait for the step in flight, end every request, stop the task."""
        self._closed = True
        self._wake.set()
        with trio.CancelScope(shield=True):
            await self._stopped.wait()


def _check_unicode(field: str, text: str) -> None:
    """Text must be encodable (a lone surrogate such as '\\ud800' is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValidationError(field, text[max(0, e.start - 8) : e.end + 8], f"must be valid Unicode: {e.reason} at index {e.start}") from None


def _stats_from_view(view, block_size: int, memory: tuple[int, int] | None = None,
                     prefix: tuple[int, int, int] | None = None) -> EngineStats:
    """A worker's figures as the ledger holds them (no step counters), and its memory and
    prefix cache as its last heartbeat had them."""
    total, free = memory or (0, 0)
    cached, query, hit = prefix or (0, 0, 0)
    return EngineStats(
        instance_id=view.instance_id, num_running=view.batch_size, num_waiting=view.num_waiting,
        kv_capacity_blocks=view.capacity, kv_free_blocks=view.free, kv_used_blocks=view.used,
        kv_lent_blocks=view.lent, kv_borrowed_blocks=view.borrowed, kv_reserved_blocks=view.reserved,
        block_size=block_size, num_steps=0, num_preemptions=0, generated_tokens=0, prompt_tokens=0,
        max_lent_blocks=view.max_lent, memory_total_bytes=total, memory_free_bytes=free,
        kv_cached_blocks=cached, prefix_query_tokens=query, prefix_hit_tokens=hit,
    )


def _continued(request: _Request, out: RequestOutput) -> RequestOutput:
    """An output of a request resumed after its home was lost, as its stream expects. The new
    home's outputs hold every token and the whole text (it resumed after the earlier tokens),
    but not the earlier tokens' logprobs (placeholders there): they come from what the stream
    had (``request.base``). An output made here (an abort or an error) has nothing of its own
    yet: the stream's last one, ended."""
    base, was = request.base, request.base.outputs[0]
    now = out.outputs[0] if out.outputs else None
    k = len(was.token_ids)
    if now is None or len(now.token_ids) < k:  # made here
        completion = dataclasses.replace(
            was, finish_reason=now.finish_reason if now is not None else None,
            stop_reason=now.stop_reason if now is not None else None,
        )  # fmt: skip
    else:
        logprobs = now.logprobs
        if was.logprobs is not None and now.logprobs is not None:
            logprobs = [*was.logprobs, *now.logprobs[k:]]
        cumulative = now.cumulative_logprob
        if was.cumulative_logprob is not None and now.cumulative_logprob is not None:
            cumulative = was.cumulative_logprob + now.cumulative_logprob
        completion = dataclasses.replace(now, logprobs=logprobs, cumulative_logprob=cumulative)
    metrics = out.metrics
    if metrics is None and base.metrics is not None:  # an output made here: it ends at its last token
        metrics = dataclasses.replace(base.metrics, finished_time=base.metrics.last_token_time if out.finished else None)
    elif metrics is not None and base.metrics is not None:
        b = base.metrics
        metrics = dataclasses.replace(
            metrics, arrival_time=b.arrival_time, first_scheduled_time=b.first_scheduled_time or metrics.first_scheduled_time,
            first_token_time=b.first_token_time or metrics.first_token_time, num_prompt_tokens=b.num_prompt_tokens,
            num_generated_tokens=len(completion.token_ids), num_preemptions=b.num_preemptions + metrics.num_preemptions + 1,
        )  # fmt: skip
    return dataclasses.replace(out, prompt=request.prompt, prompt_token_ids=list(request.prompt_token_ids),
                               outputs=[completion], metrics=metrics)


def _final_output(request: _Request, reason: str, error: str | None = None) -> RequestOutput:
    """The last output of a request that never reached the engine."""
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=list(request.prompt_token_ids),
        outputs=[CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None, logprobs=None,
                                  finish_reason=reason, stop_reason=None)],
        finished=True,
        error=error,
    )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device", name, "needs a CUDA device, and torch sees none")
    return torch.device(name)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _check_model_len(max_model_len: int, max_position_embeddings: int, num_blocks: int, block_size: int) -> None:
    """Refuse at open what would make requests fail later: a length the model cannot encode
    positions for, or one the KV cache cannot hold (every ``max_tokens=None`` request would)."""
    if max_model_len > max_position_embeddings:
        raise ValidationError(
            "max_model_len", max_model_len,
            f"must be <= the model's max_position_embeddings={max_position_embeddings}",
        )  # fmt: skip
    need = -(-max_model_len // block_size)
    if need > num_blocks:
        raise ValidationError(
            "max_model_len", max_model_len,
            f"needs {need} KV blocks of {block_size} tokens, but the KV cache holds {num_blocks} blocks "
            f"({num_blocks * block_size} tokens): give a larger kv_capacity_tokens or a smaller max_model_len",
        )  # fmt: skip


@asynccontextmanager
async def open_runtime(**options: Any) -> AsyncIterator[Runtime]:
    """Start a runtime with the given options (see ``RuntimeConfig``) and serve until exit.

    Every option belongs to one configuration dataclass; an unknown or bad one raises
    ``ValidationError`` before anything is loaded. An exception raised in the ``async with``
    block comes out as itself (not wrapped in an exception group) once the runtime has shut
    down.

    With ``num_instances`` N > 1, instance 0 runs here and instances 1..N-1 are worker
    processes (``python -m infinillm.worker``), each with ``kv_capacity_tokens`` of its own.
    The router places each request on one of them (its home); every instance lends the others
    at most ``max_lend_fraction`` of its blocks and computes partial attention over what it
    lends. Leaving the block ends every request, lets the workers free what they lent, and
    stops them.
    """
    from .loader import load_model

    config = RuntimeConfig.from_options(**options)
    num_instances = config.parallel.num_instances
    device = _resolve_device(config.model.device)
    dtype = _resolve_dtype(config.model.dtype, device)
    if num_instances > 1 and config.cache.kv_capacity_tokens is None:
        raise ValidationError("kv_capacity_tokens", None, "must be given with num_instances > 1 (each worker's KV capacity)")
    model, tokenizer, args = await trio.to_thread.run_sync(
        lambda: load_model(config.model.model, dtype=dtype, device=device)
    )
    num_blocks = derive_num_blocks(
        config.cache, kv_bytes_per_token(args.num_layers, args.num_kv_heads, args.head_dim, dtype), device,
        num_instances=num_instances,
    )
    cluster_blocks = num_blocks + (num_instances - 1) * config.cache.max_lent_blocks(num_blocks)
    # Not given: the model's context length, or what the cluster's KV holds for one request if less.
    max_model_len = config.model.max_model_len or min(args.max_position_embeddings, cluster_blocks * config.cache.block_size)
    _check_model_len(max_model_len, args.max_position_embeddings, cluster_blocks, config.cache.block_size)
    engine = Engine(
        model, args, tokenizer,
        cache=config.cache,
        scheduler=config.scheduler,
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        device=device,
        dtype=dtype,
        seed=config.model.seed,
        cluster_blocks=cluster_blocks,
    )  # fmt: skip
    runtime = Runtime(config, engine, tokenizer)
    body_error: BaseException | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if num_instances > 1 or config.transport.join_address is not None:
                await _start_workers(stack, runtime, num_blocks, cluster_blocks, device, dtype)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runtime._serve)
                try:
                    yield runtime
                except (trio.Cancelled, GeneratorExit):
                    raise  # trio's own: the cancel scope that sent it unwraps it
                except BaseException as exc:  # noqa: BLE001 - re-raised below, outside every nursery
                    body_error = exc
                finally:
                    await runtime._close()
                    nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_SETTLE_S):  # the workers have applied the aborts of the close
                    await runtime._settle_workers()
                for peer in engine.peers.values():  # the creditors have answered every release
                    await peer.wait_released()
    except BaseExceptionGroup as group:  # a worker that failed to start, through the nurseries
        leaf = _single_error(group)
        if leaf is None:
            raise
        raise leaf from None
    if body_error is not None:
        raise body_error


async def _receive_from_workers(puller, runtime: Runtime) -> None:
    """The workers' one-way traffic, in order per worker: heartbeats to the gManager's ledger,
    step outputs to their requests' streams."""
    ledger = runtime.ledger
    try:
        async for msg in puller:
            if isinstance(msg, StepOutputs):
                runtime._remote_outputs(msg)
            elif isinstance(msg, HeartbeatDelta):
                runtime._heard_count[msg.instance_id] = runtime._heard_count.get(msg.instance_id, 0) + 1
                runtime._last_heard[msg.instance_id] = trio.current_time()
                if not ledger.has_instance(msg.instance_id):
                    continue
                if not ledger.apply_delta(msg.to_pool_delta()):
                    log.warning("instance %d: heartbeat %d does not follow %d; waiting for the next", msg.instance_id,
                                msg.version, ledger.instance(msg.instance_id).version)
                ledger.set_load(msg.instance_id, msg.batch_size, msg.num_waiting, msg.waiting_blocks)
                if msg.max_lent >= 0:
                    ledger.set_max_lent(msg.instance_id, min(msg.max_lent, ledger.instance(msg.instance_id).capacity))
                if msg.memory_total:
                    runtime._worker_memory[msg.instance_id] = (msg.memory_total, msg.memory_free)
                runtime._worker_prefix[msg.instance_id] = (msg.cached_blocks, msg.prefix_query_tokens,
                                                           msg.prefix_hit_tokens)
                runtime._ledger_changed()
                runtime._heard.set()
                runtime._heard = trio.Event()
    except trio.ClosedResourceError:
        return  # the runtime is closing


def _throughput_model(args, dtype: torch.dtype, device: torch.device, block_size: int):
    """The planner's throughput model of one instance, from the model's shape and a roofline
    of the device (``core_sched.ThroughputModel``): dense layers read their weights once a step
    (memory bound at small batches, compute bound at large ones), attention reads each context
    token's k and v once a layer. Rough figures: the planner needs the shape of the curves,
    not their last digit."""
    bandwidth, flops = (2e12, 2e14) if device.type == "cuda" else (1e10, 1e11)  # bytes/s, FLOP/s
    width = torch.empty((), dtype=dtype).element_size()
    hidden, inter = args.hidden_size, args.intermediate_size
    kv = args.num_kv_heads * args.head_dim
    layer_params = hidden * (hidden + 2 * kv + hidden) + 3 * hidden * inter
    batches = [1.0, 4.0, 16.0, 64.0, 256.0]
    dense = [b / max(layer_params * width / bandwidth, 2 * layer_params * b / flops) for b in batches]
    contexts = [float(block_size), 1024.0, 65536.0]
    attn = [bandwidth / (2 * kv * width)] * len(contexts)
    return core_sched.ThroughputModel(batches, dense, contexts, attn, args.num_layers, block_size)


def _memory_watch(runtime: Runtime, device: torch.device, full_cap: int) -> MemoryWatch:
    """Instance 0's memory watch (``memory.default_probe``), which keeps the ledger's cap too."""
    engine = runtime.engine
    engine.memory = MemoryWatch(default_probe(device), (device.index or 0) if device.type == "cuda" else 0, engine.pool,
                                full_cap, runtime.config.cache.min_free_memory_fraction, lock=engine.pool_lock,
                                ledger=runtime.ledger)
    return engine.memory


@dataclass(slots=True)
class _Cluster:
    """The runtime's side of the cluster, for workers that join later: its transport, the
    nursery of the workers' tasks, where heartbeats go, and every member's peer socket and the
    blocks it may lend."""

    tp: Any
    nursery: trio.Nursery
    heartbeat_address: str
    addresses: dict[int, str]
    lendable: dict[int, int]


def _fingerprint(args) -> str:
    """What a joining worker's model must match: the shape that makes KV and attention agree."""
    return (f"{args.num_layers}x{args.hidden_size}/{args.num_heads}q{args.num_kv_heads}kv{args.head_dim}d"
            f"/v{args.vocab_size}")


async def _join_handler(runtime: Runtime, joins: trio.MemorySendChannel, msg):
    """The join socket: ``JoinRequest`` (a worker on another host: its id and the cluster's
    settings), ``JoinReady`` (it serves: connected by ``_own_joins``), ``Sync`` (its check
    that the runtime is still there)."""
    if isinstance(msg, Sync):  # a joined worker's check: still here, and is it still a member?
        if msg.instance_id in runtime.lost_instances:
            raise InstanceDeadError(f"instance {msg.instance_id} was declared lost: {runtime.lost_instances[msg.instance_id]}")
        return Synced(0, 0)
    if runtime.closed:
        raise InfiniLLMError("the runtime is closing")
    engine, config = runtime.engine, runtime.config
    if isinstance(msg, JoinRequest):
        if msg.model != _fingerprint(engine.args):
            raise ValidationError("model", msg.model, f"must be this runtime's model ({_fingerprint(engine.args)})")
        now = trio.current_time()  # (ids given to workers that never said they were ready expire)
        runtime._joining = {i: j for i, j in runtime._joining.items() if j[2] > now}
        taken = set(runtime.ledger.instance_ids()) | set(runtime.lost_instances) | set(runtime._joining)
        instance_id = max(taken | {engine.instance_id}) + 1
        lendable = config.cache.max_lent_blocks(msg.num_blocks)
        # A member only once it serves (``_admit_joined``): until then the ledger, the router
        # and the planner do not see it.
        runtime._joining[instance_id] = (msg.num_blocks, lendable, now + _JOIN_READY_S)
        cluster = runtime._cluster
        options = {
            "block_size": config.cache.block_size, "max_lend_fraction": config.cache.max_lend_fraction,
            "reservation_ttl_s": config.cache.reservation_ttl_s,
            "min_free_memory_fraction": config.cache.min_free_memory_fraction,
            "no_prefix_caching": not config.cache.enable_prefix_caching,
            "cluster_blocks": msg.num_blocks + sum(cluster.lendable.values()),
            "max_model_len": runtime.engine.max_model_len, "seed": config.model.seed,
            "max_num_seqs": config.scheduler.max_num_seqs,
            "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
            "heartbeat_address": cluster.heartbeat_address,
            "heartbeat_interval_s": config.parallel.heartbeat_interval_s,
            "keepalive_s": config.parallel.heartbeat_timeout_s / 4,
            "dtype": str(engine.dtype).removeprefix("torch."),
        }
        log.info("instance %d joining: %d blocks", instance_id, msg.num_blocks)
        return Joined(instance_id, options)
    if isinstance(msg, JoinReady):
        done, box = trio.Event(), []
        await joins.send((msg, done, box))
        await done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return None
    raise ValidationError("message", type(msg).__name__, "is not a join message (JoinRequest, JoinReady, Sync)")


async def _count_refused_joins(runtime: Runtime, sock) -> None:
    """Counts the failed handshakes on the join socket (libzmq's monitor): a worker with a key
    that is not the cluster's fails there, before any message."""
    import zmq

    from .transport.socket import ZmqSocket

    monitor = ZmqSocket(sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    ))
    try:
        while True:
            frames = await monitor._receive()
            if frames is None:
                return
            runtime._refused_joins += 1
            log.warning("a worker's handshake on the join socket failed (a wrong key?): %d so far", runtime._refused_joins)
    finally:
        monitor.close()


async def _own_joins(runtime: Runtime, joins: trio.MemoryReceiveChannel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Owns the connections to the workers that joined (they open and close in this task)."""
    async with contextlib.AsyncExitStack() as stack:
        task_status.started()
        async for msg, done, box in joins:
            try:
                box.append(await _admit_joined(runtime, stack, msg))
            except Exception as e:  # noqa: BLE001 - the reply to JoinReady
                box.append(e)
            finally:
                done.set()


async def _admit_joined(runtime: Runtime, stack: contextlib.AsyncExitStack, msg: JoinReady) -> None:
    """Make a worker that joined a member: this engine's peer, a home (its control socket),
    every other instance's peer (``ConnectPeers(joined=True)``: the cluster grows), its peers
    every member."""
    instance_id = msg.instance_id
    joining = runtime._joining.pop(instance_id, None)
    if joining is None:
        raise ValidationError("instance_id", instance_id, "must be the id this runtime gave in its Joined answer")
    num_blocks, lendable, _ = joining
    runtime.ledger.register_instance(instance_id, num_blocks, lendable)
    try:
        await _connect_joined(runtime, stack, msg, lendable)
    except BaseException:
        if instance_id not in runtime.homes:  # not a member after all
            runtime.ledger.remove_instance(instance_id)
        raise


async def _connect_joined(runtime: Runtime, stack: contextlib.AsyncExitStack, msg: JoinReady, lendable: int) -> None:
    instance_id = msg.instance_id
    cluster, engine = runtime._cluster, runtime.engine
    peer = await connect_peer(stack, cluster.tp, instance_id, msg.peer_address, cluster.nursery, lendable)
    control = await stack.enter_async_context(cluster.tp.open_client(msg.control_address))
    home = WorkerHome(instance_id, control, runtime._remote_refused)
    cluster.nursery.start_soon(home.run)
    others = sorted(cluster.addresses)
    await home.request(ConnectPeers(tuple(others), tuple(cluster.addresses[i] for i in others),
                                    tuple(cluster.lendable[i] for i in others)))
    for other in list(runtime.homes.values()):
        await other.request(ConnectPeers((instance_id,), (msg.peer_address,), (lendable,), joined=True))
    engine.peers = {**engine.peers, instance_id: peer}  # (a new dict: a step may be reading the old one)
    engine.planner.cluster_blocks = engine.planner.cluster_blocks + lendable
    cluster.addresses[instance_id] = msg.peer_address
    cluster.lendable[instance_id] = lendable
    now = trio.current_time()
    runtime.homes[instance_id] = home
    runtime._last_heard[instance_id] = runtime._joined_at[instance_id] = now
    runtime._last_lendable = ()
    runtime._ledger_changed()
    log.warning("instance %d joined from %s", instance_id, msg.peer_address)


async def _watch_heartbeats(runtime: Runtime) -> None:
    """A worker not heard from for ``heartbeat_timeout_s`` (hung, or cut off) is lost; one this
    runtime started is killed too, so that it cannot come back as a stale member."""
    timeout = runtime.config.parallel.heartbeat_timeout_s
    start = trio.current_time()
    while True:
        tick = trio.current_time()
        await trio.sleep(timeout / 4)
        now = trio.current_time()
        if now - tick > timeout / 2:  # this loop itself was held up: nobody could be heard meanwhile
            start = now
            runtime._last_heard = dict.fromkeys(runtime._last_heard, now)
            continue
        for instance_id in list(runtime.homes):
            heard = runtime._last_heard.get(instance_id, start)
            if now - heard > timeout and not runtime.closed:
                runtime._instance_lost(instance_id, f"no heartbeat for {now - heard:.1f} s (heartbeat_timeout_s={timeout})")
                for w in runtime.workers:
                    if w.instance_id == instance_id and w.process.returncode is None:
                        w.process.kill()


async def _watch_worker(runtime: Runtime, worker: WorkerProcess) -> None:
    """A worker's process ending while the runtime serves is the loss of that instance."""
    rc = await worker.process.wait()
    if runtime.closed:  # a step still in flight must not wait out its timeout on a dead creditor
        runtime.engine.lose_peer(worker.instance_id, 0, f"its process exited ({rc}) while the runtime closed")
    else:
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        runtime._instance_lost(worker.instance_id, f"its process was {how}" if rc < 0 else f"its process {how}")


def _single_error(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception (not a cancellation) inside nested groups, or None."""
    leaves = []
    stack = [group]
    while stack:
        for e in stack.pop().exceptions:
            (stack.append(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e))
    return leaves[0] if len(leaves) == 1 and not isinstance(leaves[0], trio.Cancelled) else None


def _worker_device(device: torch.device, instance_id: int) -> str:
    """A worker's device: on a host with several GPUs, one each (instance i on GPU i modulo
    their number; instance 0, in this process, on the one ``device`` names); else ``device``."""
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{instance_id % torch.cuda.device_count()}"
    return str(device)


async def _start_workers(stack: contextlib.AsyncExitStack, runtime: Runtime, num_blocks: int, cluster_blocks: int,
                         device: torch.device, dtype: torch.dtype) -> None:
    """Start instances 1..N-1 as worker processes (``num_blocks`` each, one after another),
    each registered in the ledger before it starts; connect this engine to each as a peer
    (``ZmqPeer``) and as a home (``WorkerHome``, its control socket); serve this engine's own
    peer socket; then tell every worker where all the others are (``ConnectPeers``). ``stack``
    stops the workers and closes the connections when the runtime is done."""
    from .worker import open_worker  # not at import: `python -m infinillm.worker` imports infinillm first

    config = runtime.config
    engine = runtime.engine
    cache = config.cache
    lendable = cache.max_lent_blocks(num_blocks)
    threads = config.parallel.worker_threads
    if threads is None and device.type == "cpu":  # the host's cores, shared among its instances
        threads = max(1, (os.cpu_count() or 1) // config.parallel.num_instances)
    tp = await stack.enter_async_context(open_transport(config.transport))
    nursery = await stack.enter_async_context(trio.open_nursery())  # the peers' and homes' tasks run here
    runtime._cluster_nursery = nursery
    puller = await stack.enter_async_context(tp.open_puller(name="from-workers"))
    stack.callback(nursery.cancel_scope.cancel)  # at the end, before the sockets close
    nursery.start_soon(_receive_from_workers, puller, runtime)
    service = PeerService(engine, reservation_ttl_s=cache.reservation_ttl_s)
    server = await stack.enter_async_context(tp.open_server(service.handle, name="peer0", concurrency=4))
    addresses = {engine.instance_id: server.address}
    workers: list[WorkerProcess] = []
    if config.parallel.launcher == "ray" and config.parallel.num_instances > 1:
        from .ray_launcher import ensure_ray

        if await trio.to_thread.run_sync(ensure_ray):
            import ray

            stack.callback(ray.shutdown)  # (runs after the workers below have stopped)
    for instance_id in range(1, config.parallel.num_instances):
        runtime.ledger.register_instance(instance_id, num_blocks, lendable)
        worker = await stack.enter_async_context(open_worker(
            config.model.model, instance_id, num_blocks, block_size=cache.block_size,
            max_lend_fraction=cache.max_lend_fraction, max_model_len=runtime.engine.max_model_len,
            dtype=str(dtype).removeprefix("torch."), device=_worker_device(device, instance_id),
            heartbeat_address=puller.address, reservation_ttl_s=cache.reservation_ttl_s,
            heartbeat_interval_s=config.parallel.heartbeat_interval_s, cluster_blocks=cluster_blocks,
            max_num_seqs=config.scheduler.max_num_seqs, max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            seed=config.model.seed, threads=threads, min_free_memory_fraction=cache.min_free_memory_fraction,
            keepalive_s=config.parallel.heartbeat_timeout_s / 4, launcher=config.parallel.launcher,
            enable_prefix_caching=cache.enable_prefix_caching,
        ))  # fmt: skip
        addresses[instance_id] = worker.peer_address
        engine.peers[instance_id] = await connect_peer(stack, tp, instance_id, worker.peer_address, nursery, lendable)
        control = await stack.enter_async_context(tp.open_client(worker.control_address))
        home = runtime.homes[instance_id] = WorkerHome(instance_id, control, runtime._remote_refused)
        workers.append(worker)
    runtime.workers = tuple(workers)
    for instance_id, home in runtime.homes.items():
        others = [i for i in addresses if i != instance_id]
        await home.client.request(ConnectPeers(tuple(others), tuple(addresses[i] for i in others),
                                               tuple(lendable for _ in others)))
        nursery.start_soon(home.run)
    # Members from here on: a worker that ends now is lost (one that fails to start is an error).
    for worker in workers:
        nursery.start_soon(_watch_worker, runtime, worker)
    nursery.start_soon(_watch_heartbeats, runtime)
    if config.scheduler.max_moves_per_step > 0:
        runtime.planner = core_sched.Planner(
            _throughput_model(engine.args, dtype, device, cache.block_size), config.scheduler.max_moves_per_step
        )
        nursery.start_soon(runtime._plan_moves)
    runtime.memory = _memory_watch(runtime, device, lendable)
    nursery.start_soon(runtime._heartbeats)
    runtime._cluster = _Cluster(tp, nursery, puller.address, addresses, dict.fromkeys(addresses, lendable))
    if config.transport.join_address is not None:
        joins_send, joins_recv = trio.open_memory_channel(0)
        await nursery.start(_own_joins, runtime, joins_recv)
        join_server = await stack.enter_async_context(tp.open_server(
            functools.partial(_join_handler, runtime, joins_send), config.transport.join_address, name="join"))
        runtime.join_address = join_server.address
        nursery.start_soon(_count_refused_joins, runtime, join_server._sock.zmq_socket)
    stack.callback(nursery.cancel_scope.cancel)  # first thing at the end: no task sends on a closed socket
