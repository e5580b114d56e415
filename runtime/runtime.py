"""The embeddable runtime: ``open_runtime`` and its async ``generate`` API.

::

    async with infinillm.open_runtime(model="smollm2", kv_capacity_tokens=8192, device="cpu") as rt:
        async for out in rt.generate("Hello", SamplingParams(max_tokens=32, temperature=0)):
            print(out.outputs[0].text)        # cumulative; out.finished on the last one only
        print(rt.statistics())

A request's life (one instance, inside the application's process):

1. ``generate`` validates the prompt and the sampling parameters *at the call* (bad input
   raises ``ValidationError``, a request that can never fit raises ``RequestTooLongError``)
   and returns an async iterator; nothing is queued until it is first iterated.
2. The first ``__anext__`` hands the request to the serving task, which adds it to the engine
   between two steps (the engine is never touched while a step runs).
3. The serving task runs ``engine.step`` in a worker thread (``trio.to_thread``: the model's
   compute releases the GIL and the application's event loop stays responsive), then routes
   each ``RequestOutput`` to its request's channel.
4. The iterator yields the cumulative outputs; the last has ``finished=True``. Leaving the
   ``async for`` early (the iterator is closed) or ``abort(request_id)`` aborts the request,
   which frees every KV block it holds, and its stream ends with ``finish_reason="abort"``.

A failure inside a step ends the requests of that step with ``finish_reason="error"`` (their
blocks freed); the runtime keeps serving the others.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
import trio

from .config import RuntimeConfig
from .engine import Engine, EngineStats
from .errors import InfiniLLMError, ValidationError
from .memory import derive_num_blocks, kv_bytes_per_token
from .outputs import RequestOutput
from .sampling import SamplingParams

__all__ = ["open_runtime", "Runtime", "RuntimeStats", "RequestStream"]

log = logging.getLogger("infinillm.runtime")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_THROUGHPUT_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class RuntimeStats:
    """A frozen snapshot of the runtime (``Runtime.statistics()``)."""

    num_running: int
    num_waiting: int
    num_finished: int
    num_aborted: int
    num_errors: int
    generation_tokens_per_s: float
    instances: tuple[EngineStats, ...]

    @property
    def kv_free_blocks(self) -> int:
        return sum(i.kv_free_blocks for i in self.instances)

    @property
    def kv_used_blocks(self) -> int:
        return sum(i.kv_used_blocks for i in self.instances)


@dataclass(slots=True)
class _Pending:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    send: trio.MemorySendChannel | None


class RequestStream:
    """The async iterator ``Runtime.generate`` returns: cumulative ``RequestOutput`` s.

    The request is queued on the first ``__anext__``. Leaving the ``async for`` early aborts
    it: as soon as the stream is closed (``aclose``, ``async with``) or dropped (the iterator
    is garbage collected, which CPython does the moment a loop over it is left), the runtime
    aborts the request and frees its blocks. A plain class rather than an async generator, so
    dropping it unfinished is a normal way to stop, not a resource leak.
    """

    __slots__ = ("_runtime", "_pending", "_recv", "_done", "__weakref__")

    def __init__(self, runtime: Runtime, pending: _Pending) -> None:
        self._runtime = runtime
        self._pending = pending
        self._recv: trio.MemoryReceiveChannel | None = None
        self._done = False

    @property
    def request_id(self) -> str:
        return self._pending.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._recv is None:
            self._recv = self._runtime._submit(self._pending)
        try:
            out = await self._recv.receive()
        except trio.EndOfChannel:
            self._done = True
            raise StopAsyncIteration from None
        if out.finished:
            self._done = True
            self._recv.close()
        return out

    async def aclose(self) -> None:
        self._close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            if self._recv is not None:
                self._runtime.abort(self._pending.request_id)
                self._recv.close()

    def __del__(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer (e.g. at interpreter exit)
            pass


class Runtime:
    """An embedded LLM runtime. Build it with ``open_runtime``; see the module docstring."""

    def __init__(self, config: RuntimeConfig, engine: Engine, tokenizer) -> None:
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self._wake = trio.Event()
        self._pending: dict[str, _Pending] = {}
        self._aborts: set[str] = set()
        self._streams: dict[str, trio.MemorySendChannel] = {}
        self._rids: dict[str, int] = {}
        self._closed = False
        self._throughput: deque[tuple[float, int]] = deque()
        self._num_finished = 0
        self._num_aborted = 0
        self._num_errors = 0

    # ---- public API --------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[Mapping[str, str]] | Mapping[str, Any],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Generate from ``prompt``: a string, chat messages (``{"role", "content"}``, the chat
        template applied) or ``{"prompt_token_ids": [...]}``. Returns an async iterator of
        cumulative ``RequestOutput`` s; validation happens here, at the call."""
        if self._closed:
            raise InfiniLLMError("the runtime is closed")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValidationError("sampling_params", type(params).__name__, "must be a SamplingParams")
        text, token_ids = self._tokenize(prompt)
        self.engine.check_request(token_ids, params)
        if request_id is None:
            request_id = uuid.uuid4().hex
        elif not isinstance(request_id, str) or not request_id:
            raise ValidationError("request_id", request_id, "must be a non-empty string")
        if request_id in self._streams or request_id in self._pending:
            raise ValidationError("request_id", request_id, "is already in use by a live request")
        return self._stream(request_id, text, token_ids, params)

    def abort(self, request_id: str) -> None:
        """Abort a request by id (no-op if it is unknown or finished)."""
        if request_id in self._streams or request_id in self._pending:
            self._aborts.add(request_id)
            self._wake.set()

    def statistics(self) -> RuntimeStats:
        stats = self.engine.statistics()
        return RuntimeStats(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting + len(self._pending),
            num_finished=self._num_finished,
            num_aborted=self._num_aborted,
            num_errors=self._num_errors,
            generation_tokens_per_s=self._tokens_per_s(),
            instances=(stats,),
        )

    # ---- the request stream ------------------------------------------------------------------

    def _stream(self, request_id, text, token_ids, params) -> RequestStream:
        return RequestStream(self, _Pending(request_id, text, token_ids, params, None))

    def _submit(self, pending: _Pending) -> trio.MemoryReceiveChannel:
        send, recv = trio.open_memory_channel(math.inf)
        pending.send = send
        self._pending[pending.request_id] = pending
        self._wake.set()
        return recv

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValidationError("prompt", prompt, "must be a non-empty string")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Mapping):
            ids = prompt.get("prompt_token_ids")
            if ids is None or set(prompt) - {"prompt_token_ids"}:
                raise ValidationError("prompt", dict(prompt), "a dict prompt must be {'prompt_token_ids': [...]}")
            if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise ValidationError("prompt_token_ids", ids, "must be a list of int token ids")
            return None, list(ids)
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            for i, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValidationError(f"prompt[{i}]", dict(m), "a chat message needs string 'role' and 'content'")
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
            return text, self.tokenizer.encode(text)
        raise ValidationError(
            "prompt", prompt, "must be a string, a list of chat messages or {'prompt_token_ids': [...]}"
        )

    # ---- the serving task --------------------------------------------------------------------

    async def _serve(self) -> None:
        engine = self.engine
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self._apply_aborts()
            self._admit()
            while engine.has_work:
                steps = engine.num_steps
                outputs = await trio.to_thread.run_sync(self._step)
                self._route(outputs)
                self._apply_aborts()
                self._admit()
                if engine.num_steps == steps and not outputs:
                    break  # nothing could run (waiting on memory): sleep until something changes
                await trio.lowlevel.checkpoint()

    def _step(self) -> list[RequestOutput]:
        """One engine step (runs in a worker thread). A failure fails that step's requests."""
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a step failure must not stop the runtime
            log.exception("engine step failed")
            outputs = []
            for rid in list(self.engine.requests):
                out = self.engine.fail(rid, f"{type(exc).__name__}: {exc}")
                if out is not None:
                    outputs.append(out)
        now = time.monotonic()
        self._throughput.append((now, self.engine.generated_tokens))
        while len(self._throughput) > 2 and now - self._throughput[0][0] > _THROUGHPUT_WINDOW_S:
            self._throughput.popleft()
        return outputs

    def _tokens_per_s(self) -> float:
        """Generated tokens per second over the last steps (about ``_THROUGHPUT_WINDOW_S``)."""
        if len(self._throughput) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._throughput[0], self._throughput[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _route(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            send = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
                self._rids.pop(out.request_id, None)
                reason = out.outputs[0].finish_reason if out.outputs else None
                if reason == "abort":
                    self._num_aborted += 1
                elif reason == "error":
                    self._num_errors += 1
                else:
                    self._num_finished += 1
            if send is not None:
                try:
                    send.send_nowait(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the consumer has gone; its stream's finally aborts or has aborted
                if out.finished:
                    send.close()

    def _admit(self) -> None:
        while self._pending:
            request_id, p = next(iter(self._pending.items()))
            del self._pending[request_id]
            try:
                rid = self.engine.add_request(request_id, p.prompt_token_ids, p.params, p.prompt)
            except InfiniLLMError as exc:  # e.g. the cluster shrank since the call was checked
                self._num_errors += 1
                p.send.send_nowait(_error_output(request_id, p, str(exc)))
                p.send.close()
                continue
            self._streams[request_id] = p.send
            self._rids[request_id] = rid

    def _apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, set()
        for request_id in aborts:
            p = self._pending.pop(request_id, None)
            if p is not None:
                self._num_aborted += 1
                p.send.close()
                continue
            rid = self._rids.get(request_id)
            if rid is None:
                continue
            out = self.engine.abort(rid)
            if out is not None:
                self._route([out])


def _error_output(request_id: str, p: _Pending, message: str) -> RequestOutput:
    from .outputs import CompletionOutput

    return RequestOutput(
        request_id=request_id,
        prompt=p.prompt,
        prompt_token_ids=list(p.prompt_token_ids),
        outputs=[CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None, logprobs=None,
                                  finish_reason="error", stop_reason=None)],
        finished=True,
        error=message,
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


@asynccontextmanager
async def open_runtime(**options: Any) -> AsyncIterator[Runtime]:
    """Start a runtime with the given options (see ``RuntimeConfig``) and serve until exit.

    Every option belongs to one configuration dataclass; an unknown or bad one raises
    ``ValidationError`` before anything is loaded.
    """
    from .loader import load_model

    config = RuntimeConfig.from_options(**options)
    if config.parallel.num_instances != 1:
        raise ValidationError(
            "num_instances", config.parallel.num_instances, "must be 1 until many-instance serving lands"
        )
    device = _resolve_device(config.model.device)
    dtype = _resolve_dtype(config.model.dtype, device)
    model, tokenizer, args = await trio.to_thread.run_sync(
        lambda: load_model(config.model.model, dtype=dtype, device=device)
    )
    max_model_len = config.model.max_model_len or args.max_position_embeddings
    num_blocks = derive_num_blocks(
        config.cache, kv_bytes_per_token(args.num_layers, args.num_kv_heads, args.head_dim, dtype), device
    )
    engine = Engine(
        model, args, tokenizer,
        cache=config.cache,
        scheduler=config.scheduler,
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        device=device,
        dtype=dtype,
    )  # fmt: skip
    runtime = Runtime(config, engine, tokenizer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runtime._serve)
        try:
            yield runtime
        finally:
            runtime._closed = True
            for request_id in list(runtime._streams) + list(runtime._pending):
                runtime.abort(request_id)
            runtime._apply_aborts()
            nursery.cancel_scope.cancel()
