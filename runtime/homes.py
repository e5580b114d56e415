"""Workers as homes of their own requests: the control protocol's two ends.

The runtime places each new request on one instance, its *home* (``router.py``). Instance 0 is
the engine in the application's process; a worker is reached over its control socket::

    runtime (application process)                      worker i (its own trio loop)
      _admit: router picks i
      WorkerHome.add ── AddRequest(wire id, prompt ids, sampling) ──► ControlService: Runtime.generate
      abort(id) ─────── AbortRequest(wire id) ─────────────────────► Runtime.abort
                                                                     its Runtime steps its Engine
      _receive: StepOutputs(RequestDelta per request) ◄── push ───── after each step: the outputs as
        RemoteOutput.apply -> cumulative RequestOutput -> stream      deltas, then a HeartbeatDelta

A worker runs the very ``Runtime`` the application runs in process (same admission, abort and
stream rules), fed by the control socket instead of ``generate`` calls; each output it routes
is turned into a ``RequestDelta`` (new tokens, text, logprobs, metrics, placement) and pushed
with the step's heartbeat on one ordered socket. The runtime turns the deltas back into the
cumulative ``RequestOutput`` s its streams yield, so a stream cannot tell where its request ran.

Control messages to one worker go one at a time, each answered before the next is sent, so an
abort never overtakes the request it aborts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import trio

from .errors import InfiniLLMError, TransportError
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling import SamplingParams
from .transport import (
    AbortRequest,
    AddRequest,
    Client,
    InstancesLost,
    LendableUpdate,
    MoveBlocks,
    RequestDelta,
    StepOutputs,
)

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["sampling_to_wire", "sampling_from_wire", "DeltaMaker", "RemoteOutput", "WorkerHome", "ControlService"]

log = logging.getLogger("infinillm.homes")


def sampling_to_wire(params: SamplingParams) -> dict:
    """``SamplingParams`` as ``AddRequest.sampling`` (every field by name: scalars and tuples)."""
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def sampling_from_wire(sampling: dict) -> SamplingParams:
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(sampling) - names)
    if unknown:
        raise InfiniLLMError(f"AddRequest.sampling has unknown options {unknown}")
    return SamplingParams(**sampling)


# ---- the worker's side: outputs as deltas -----------------------------------------------------


class DeltaMaker:
    """Turns one request's cumulative outputs into ``RequestDelta`` s (what is new since the
    last one: tokens, logprobs, text)."""

    __slots__ = ("wire_id", "_tokens", "_text")

    def __init__(self, wire_id: int) -> None:
        self.wire_id = wire_id
        self._tokens = 0
        self._text = ""

    def delta(self, out: RequestOutput, placement: dict[int, int]) -> RequestDelta:
        c = out.outputs[0]
        new = tuple(c.token_ids[self._tokens :])
        lps = c.logprobs[self._tokens :] if c.logprobs is not None else None
        self._tokens = len(c.token_ids)
        text = c.text
        offset = len(self._text)
        if not text.startswith(self._text):  # a stop string found late took characters back
            offset = next((i for i, (a, b) in enumerate(zip(text, self._text)) if a != b), min(len(text), offset))
        added = text[offset:]
        self._text = text
        top_counts, top_ids, top_lps, top_ranks, top_decoded, chosen = [], [], [], [], [], []
        if lps is not None:
            for tok, entry in zip(new, lps):
                top_counts.append(len(entry))
                chosen.append(entry[tok].logprob if tok in entry else 0.0)  # ({}: a resumed request's earlier token)
                for tid, lp in entry.items():
                    top_ids.append(tid)
                    top_lps.append(lp.logprob)
                    top_ranks.append(lp.rank or 0)
                    top_decoded.append(lp.decoded_token or "")
        stop = c.stop_reason
        m = out.metrics
        return RequestDelta(
            self.wire_id, new, tuple(chosen), c.finish_reason,
            text_offset=offset, text=added, cumulative_logprob=c.cumulative_logprob,
            stop_reason=stop if isinstance(stop, str) else None,
            stop_token_id=stop if isinstance(stop, int) else None,
            error=out.error,
            top_counts=tuple(top_counts), top_token_ids=tuple(top_ids), top_logprobs=tuple(top_lps),
            top_ranks=tuple(top_ranks), top_decoded=tuple(top_decoded),
            num_preemptions=m.num_preemptions if m else 0,
            arrival_time=m.arrival_time if m else 0.0,
            first_scheduled_time=m.first_scheduled_time if m else None,
            first_token_time=m.first_token_time if m else None,
            last_token_time=m.last_token_time if m else None,
            placement=tuple(x for pair in sorted(placement.items()) for x in pair),
        )  # fmt: skip


class ControlService:
    """A worker's control socket: requests in, handed to the worker's ``Runtime``.

    ``AddRequest`` starts a request (validated as ``generate`` validates: a refusal is the
    reply, an ``ErrorReply`` naming the value and the limit); its outputs leave through the
    runtime's output sink (``outputs_to_deltas``), not through this socket. ``AbortRequest``
    aborts it (a no-op for an id that is not live); its last delta says ``"abort"``.
    """

    def __init__(self, runtime: Runtime, nursery: trio.Nursery) -> None:
        self.runtime = runtime
        self.nursery = nursery
        self.makers: dict[str, DeltaMaker] = {}

    async def handle(self, msg):
        if isinstance(msg, AddRequest):
            params = sampling_from_wire(msg.sampling)
            request_id = str(msg.request_id)
            stream = self.runtime.generate({"prompt_token_ids": msg.prompt_token_ids.tolist()}, params, request_id)
            if msg.output_token_ids is not None:  # resumed after its home was lost (admitted later, between steps)
                self.runtime._requests[request_id].resume = msg.output_token_ids.tolist()
            self.makers[request_id] = DeltaMaker(msg.request_id)
            self.nursery.start_soon(self._drain, stream)
            return None
        if isinstance(msg, AbortRequest):
            self.runtime.abort(str(msg.request_id))
            return None
        if isinstance(msg, LendableUpdate):
            peers = self.runtime.engine.peers
            for instance_id, n in zip(msg.instance_ids, msg.lendable):
                if instance_id in peers:
                    peers[instance_id].set_lendable(n)
            self.runtime._wake.set()  # a request waiting for a loan may get one now
            return None
        if isinstance(msg, InstancesLost):
            self.runtime.lose_peers(msg.instance_ids, msg.max_lent, msg.reason)
            return None
        if isinstance(msg, MoveBlocks):  # the gManager's planner: carried out between two steps
            request = self.runtime._requests.get(str(msg.request_id))
            if request is not None and request.rid is not None:
                self.runtime.engine.queue_move(request.rid, msg.num_blocks, msg.src, msg.dst)
                self.runtime._wake.set()
            return None
        raise InfiniLLMError(
            f"{type(msg).__name__} is not a control message "
            "(AddRequest, AbortRequest, LendableUpdate, InstancesLost, MoveBlocks)"
        )

    async def _drain(self, stream) -> None:
        """Keep the request's stream read (the deltas leave through the output sink)."""
        async with stream:
            async for _ in stream:
                pass

    def outputs_to_deltas(self, outputs: list[RequestOutput]) -> StepOutputs | None:
        """The runtime's outputs of one step as one ``StepOutputs`` (called between steps)."""
        runtime = self.runtime
        engine = runtime.engine
        deltas = []
        for out in outputs:
            maker = self.makers.get(out.request_id)
            if maker is None:
                continue
            request = runtime._requests.get(out.request_id)
            placement = {}
            if not runtime._stepping and request is not None and request.rid is not None \
                    and engine.tables.has_request(request.rid):
                placement = engine.placement(request.rid)
            deltas.append(maker.delta(out, placement))
            if out.finished:
                del self.makers[out.request_id]
        if not deltas:
            return None
        return StepOutputs(engine.instance_id, engine.num_steps, tuple(deltas))


# ---- the runtime's side ---------------------------------------------------------------------------


class RemoteOutput:
    """A request homed on a worker, as its stream sees it: the deltas folded back into the
    cumulative ``RequestOutput``."""

    __slots__ = ("request_id", "prompt", "prompt_token_ids", "logprobs", "token_ids", "text", "logprob_list",
                 "cumulative_logprob", "placement", "last", "arrival")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], logprobs: bool) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.logprobs = logprobs
        self.token_ids: list[int] = []
        self.text = ""
        self.logprob_list: list[dict[int, Logprob]] | None = [] if logprobs else None
        self.cumulative_logprob: float | None = None
        self.placement: dict[int, int] = {}
        self.last: RequestOutput | None = None
        self.arrival = time.monotonic()  # until the worker's own figure comes

    def apply(self, d: RequestDelta) -> RequestOutput:
        self.token_ids.extend(d.token_ids)
        self.text = self.text[: d.text_offset] + d.text
        if self.logprob_list is not None:
            at = 0
            for count in d.top_counts:
                self.logprob_list.append({
                    d.top_token_ids[i]: Logprob(d.top_logprobs[i], d.top_ranks[i] or None, d.top_decoded[i])
                    for i in range(at, at + count)
                })  # fmt: skip
                at += count
        self.cumulative_logprob = d.cumulative_logprob
        if d.placement:
            self.placement = dict(zip(d.placement[::2], d.placement[1::2]))
        stop = d.stop_reason if d.stop_reason is not None else d.stop_token_id
        finished = d.finish_reason is not None
        metrics = RequestMetrics(
            arrival_time=d.arrival_time or self.arrival, first_scheduled_time=d.first_scheduled_time,
            first_token_time=d.first_token_time, last_token_time=d.last_token_time,
            finished_time=d.last_token_time if finished else None, num_prompt_tokens=len(self.prompt_token_ids),
            num_generated_tokens=len(self.token_ids), num_preemptions=d.num_preemptions,
        )  # fmt: skip
        self.last = self._output(d.finish_reason, stop, finished, metrics, d.error)
        return self.last

    def final(self, reason: str, error: str | None = None) -> RequestOutput:
        """The last output, made here (the runtime is closing, or the worker refused it), with
        the metrics an engine gives a request it ends: finished at its last token."""
        m = self.last.metrics if self.last is not None else None
        if m is None:
            m = RequestMetrics(arrival_time=self.arrival, num_prompt_tokens=len(self.prompt_token_ids))
        else:
            m = dataclasses.replace(m, finished_time=m.last_token_time)
        return self._output(reason, None, True, m, error)

    def _output(self, reason, stop, finished, metrics, error) -> RequestOutput:
        completion = CompletionOutput(
            index=0, text=self.text, token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob if self.logprob_list is not None else None,
            logprobs=list(self.logprob_list) if self.logprob_list is not None else None,
            finish_reason=reason, stop_reason=stop,
        )  # fmt: skip
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [completion], finished, metrics, error)


class WorkerHome:
    """A worker as a home, seen from the runtime: its control ``Client`` and one ordered
    sender (``run``), so an abort never overtakes the request it aborts. ``on_refused(wire
    id, error)`` is told when the worker refuses a request (or cannot be reached)."""

    def __init__(self, instance_id: int, client: Client, on_refused: Callable[[int, str], None]) -> None:
        self.instance_id = instance_id
        self.client = client
        self._on_refused = on_refused
        self._send, self._recv = trio.open_memory_channel(math.inf)
        self._scope = trio.CancelScope()
        self._gone: str | None = None

    def lost(self, reason: str) -> None:
        """The worker is gone: stop sending; whoever waits for an answer gets an error."""
        self._gone = reason
        self._scope.cancel()

    def send(self, msg) -> None:
        """Send a one-way control message after everything queued before it (dropped once the
        home has stopped: the runtime is closing, or the worker is gone)."""
        try:
            self._send.send_nowait(msg)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def add(self, wire_id: int, prompt_token_ids: list[int], params: SamplingParams,
            output_token_ids: list[int] | None = None) -> None:
        self._send.send_nowait(AddRequest(
            wire_id, torch.tensor(prompt_token_ids, dtype=torch.int64), sampling_to_wire(params),
            torch.tensor(output_token_ids, dtype=torch.int64) if output_token_ids else None,
        ))

    def abort(self, wire_id: int) -> None:
        self._send.send_nowait(AbortRequest(wire_id))

    def lendable(self, update: LendableUpdate) -> None:
        self.send(update)

    async def request(self, msg):
        """Send ``msg`` after everything queued before it and return the worker's answer;
        ``InfiniLLMError`` if the runtime stops talking to the worker first (it is closing)."""
        done, box = trio.Event(), []
        try:
            self._send.send_nowait((msg, done, box))
        except trio.ClosedResourceError:
            raise InfiniLLMError(f"instance {self.instance_id}: the runtime is closing") from None
        await done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    async def run(self) -> None:
        try:
            with self._scope:
                await self._run()
        finally:  # closing (or the worker is gone): nothing more is sent; waiters get an error
            self._send.close()
            closing = InfiniLLMError(f"instance {self.instance_id}: " + (
                f"the instance is gone ({self._gone})" if self._gone else "the runtime is closing"))
            while True:
                try:
                    msg = self._recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if isinstance(msg, tuple):
                    msg[2].append(closing)
                    msg[1].set()

    async def _run(self) -> None:
        async for msg in self._recv:
            if isinstance(msg, tuple):  # a request whose caller waits for the answer
                msg, done, box = msg
                try:
                    box.append(await self.client.request(msg))
                except BaseException as e:  # handed to the caller (a cancellation: re-raised too)
                    box.append(e if isinstance(e, Exception) else InfiniLLMError(f"instance {self.instance_id}: " + (
                        f"the instance is gone ({self._gone})" if self._gone else "the runtime is closing")))
                    if not isinstance(e, Exception):
                        raise
                finally:
                    done.set()
                continue
            try:
                await self.client.request(msg)
            except trio.ClosedResourceError:
                return  # the runtime is closing: its requests have ended already
            except (InfiniLLMError, TransportError) as e:
                if isinstance(msg, AddRequest):
                    self._on_refused(msg.request_id, f"instance {self.instance_id}: {e}")
                elif isinstance(msg, AbortRequest):
                    log.warning("instance %d: abort of request %d failed: %s", self.instance_id, msg.request_id, e)
