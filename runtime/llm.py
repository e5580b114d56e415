"""The runtime for applications that are not trio: ``LLM`` (blocking) and ``AsyncLLM`` (asyncio).

Both host the trio runtime (``open_runtime``) on a thread of their own, started by the
constructor and joined by ``close()``. Every request is a trio task in that thread's nursery,
which hands its outputs to the caller's thread (a ``queue.Queue`` for ``LLM``, the caller's
asyncio loop for ``AsyncLLM``); the caller leaving early (an exception, ``KeyboardInterrupt``,
an asyncio task cancelled, an ``async for`` left) aborts the request, and closing ends every
request still running with a final output whose ``finish_reason`` is ``"abort"``.

    llm = infinillm.LLM(model="smollm2", kv_capacity_tokens=8192)
    outs = llm.generate(["Why is the sea salty?", "Name a lighthouse."], SamplingParams(max_tokens=32))
    llm.close()

    async with infinillm.AsyncLLM(model="smollm2") as llm:          # inside asyncio
        async for out in llm.generate("Why is the sea salty?", SamplingParams(max_tokens=32)):
            print(out.outputs[0].text)
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import trio

from .errors import InfiniLLMError, ValidationError
from .outputs import RequestOutput
from . import runtime as _runtime
from .runtime import Runtime, RuntimeStats
from .sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM"]

_OUT, _END, _ERROR = "out", "end", "error"
_RELEASE_WAIT_S = 30.0  # (a bound on waiting for a request to be let go; the runtime answers in a step)
_live_hosts: weakref.WeakSet[_Host] = weakref.WeakSet()


@atexit.register
def _close_live_hosts() -> None:
    """At interpreter exit, close what the application left open (its runtime thread is a
    daemon so that exit reaches this point; here it is stopped and joined)."""
    for host in list(_live_hosts):
        host.close()


class _Host:
    """``open_runtime(**options)`` served on a thread of its own until ``close()``."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._options = dict(options)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._ready_callbacks: list[Callable[[], None]] = []
        self._done_callbacks: list[Callable[[], None]] = []
        self._done = False
        self._error: BaseException | None = None  # opening failed
        self._failure: BaseException | None = None  # the runtime stopped with this error
        self._closing = False
        self._runtime: Runtime | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._thread = threading.Thread(target=self._main, name="infinillm-runtime", daemon=True)
        _live_hosts.add(self)
        self._thread.start()

    # ---- the runtime's thread ----------------------------------------------------------------

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]  # the requests' nursery wraps what the runtime raised
            with self._lock:
                if not self._ready.is_set():
                    self._error = exc  # opening failed: the constructor or ready() raises it
                else:
                    self._failure = exc  # serving or closing failed: close() raises it
        finally:
            with self._lock:
                self._done = True
                self._closing = True
                ready, done = self._ready_callbacks, self._done_callbacks
                self._ready_callbacks, self._done_callbacks = [], []
            self._ready.set()
            for fn in ready + done:
                fn()

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:  # the requests' tasks: they end after the runtime
            async with _runtime.open_runtime(**self._options) as rt:
                self._stop = trio.Event()
                self._runtime, self._nursery = rt, nursery
                self._token = trio.lowlevel.current_trio_token()
                with self._lock:
                    callbacks, self._ready_callbacks = self._ready_callbacks, []
                    self._ready.set()
                    if self._closing:  # closed (or dropped) while it was opening
                        self._stop.set()
                for fn in callbacks:
                    fn()
                await self._stop.wait()
            # The runtime is closed: every stream still open has had its final "abort" output,
            # so the tasks below end on their own.

    async def _pump(self, stream, sink: Callable[[str, Any], bool], scope: trio.CancelScope) -> None:
        """One request: its outputs to ``sink``, then the end (or the error that ended it), sent
        once the runtime has let the request go (its blocks free, its id usable again). A sink
        that returns False (its reader is gone) stops the request."""
        error: BaseException | None = None
        try:
            with scope:
                async for out in stream:
                    if sink(_OUT, out) is False:
                        scope.cancel()
        except BaseException as exc:  # noqa: BLE001 - the caller sees it
            error = exc
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_RELEASE_WAIT_S):
                await stream.aclose()  # aborts an unfinished request; returns once it is let go
        if error is None:
            sink(_END, None)
        elif isinstance(error, Exception):
            sink(_ERROR, error)
        else:  # the runtime's own cancellation: the caller hears the request ended, then it goes on
            sink(_ERROR, InfiniLLMError(f"the request ended with the runtime: {error!r}"))
            raise error

    # ---- the caller's threads ----------------------------------------------------------------

    def wait_ready(self) -> None:
        self._ready.wait()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            self._thread.join()
            raise error

    def on_ready(self, fn: Callable[[], None]) -> None:
        """``fn()`` once the runtime is open, or opening failed (on the runtime's thread, or here
        if that has happened already)."""
        with self._lock:
            if not self._ready.is_set():
                self._ready_callbacks.append(fn)
                return
        fn()

    def on_done(self, fn: Callable[[], None]) -> None:
        """``fn()`` once the runtime's thread has finished (there, or here if it has)."""
        with self._lock:
            if not self._done:
                self._done_callbacks.append(fn)
                return
        fn()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the runtime's thread, between its steps; its result or exception."""
        self.wait_ready()
        if self._closing or self._token is None:
            raise InfiniLLMError("the runtime is closed: it serves nothing more")
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise InfiniLLMError("the runtime is closed: it serves nothing more") from self._failure

    def submit(self, requests: Sequence[tuple[Any, SamplingParams | None, str | None]],
               sinks: Sequence[Callable[[str, Any], bool]], started: list[trio.CancelScope]) -> None:
        """Start requests, all or none: each is validated (bad input raises here, on the caller's
        thread, and nothing has started); ``started`` gets each one's cancel scope as it starts
        (on the runtime's thread, so a caller interrupted meanwhile can still stop them all)."""

        def start() -> None:
            if self._stop.is_set():
                raise InfiniLLMError("the runtime is closed: it serves nothing more")
            streams = []
            try:
                for prompt, params, request_id in requests:
                    streams.append(self._runtime.generate(prompt, params, request_id))
            except BaseException:
                for stream in streams:  # made, never read: their ids are free at once
                    stream._close()
                raise
            for stream, sink in zip(streams, sinks):
                scope = trio.CancelScope()
                started.append(scope)
                self._nursery.start_soon(self._pump, stream, sink, scope)

        self._call(start)

    def cancel(self, scopes: Sequence[trio.CancelScope]) -> None:
        """Stop requests' tasks (each stream is closed, which aborts its request). Runs after
        any ``submit`` still in progress on the runtime's thread, so none is missed."""

        def cancel_all() -> None:
            for scope in scopes:
                scope.cancel()

        try:
            self._call(cancel_all)
        except InfiniLLMError:
            pass  # closed: the requests have ended anyway

    def abort(self, request_id: str) -> None:
        self._call(lambda: self._runtime.abort(request_id))

    def statistics(self) -> RuntimeStats:
        self.wait_ready()
        return self._runtime.statistics()  # safe from any thread

    def begin_close(self) -> None:
        """Ask the runtime's thread to close the runtime (returns at once)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        token = self._token
        if token is not None:  # (not yet open: _serve stops as soon as it opens)
            try:
                token.run_sync_soon(self._stop.set)  # from any thread, the runtime's own included
            except trio.RunFinishedError:
                pass

    def close(self) -> None:
        """Close the runtime and join its thread (requests still running end with "abort")."""
        if threading.current_thread() is self._thread:
            raise InfiniLLMError("close() cannot be called from the runtime's own thread")
        self._ready.wait()
        self.begin_close()
        self._thread.join()
        _live_hosts.discard(self)
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    @property
    def closed(self) -> bool:
        return self._closing


def _is_single_prompt(prompts: Any) -> bool:
    """A string, a ``{"prompt_token_ids": [...]}`` or one conversation (a list of messages)."""
    if isinstance(prompts, (str, Mapping)):
        return True
    return isinstance(prompts, Sequence) and len(prompts) > 0 and all(
        isinstance(m, Mapping) and "role" in m for m in prompts
    )


class _Hosted:
    """What ``LLM`` and ``AsyncLLM`` share: the hosted runtime's abort, statistics and state."""

    _host: _Host

    def abort(self, request_id: str) -> None:
        """Abort a request by id (from any thread); its stream ends with a final ``"abort"``
        output (a blocking ``generate`` returns it)."""
        self._host.abort(request_id)

    def statistics(self) -> RuntimeStats:
        """The runtime's ``statistics()`` (taken on the runtime's thread)."""
        return self._host.statistics()

    @property
    def closed(self) -> bool:
        return self._host.closed


class LLM(_Hosted):
    """A blocking interface to the runtime, as vLLM's ``LLM``: ``generate(prompts,
    sampling_params)`` returns the final ``RequestOutput`` of every prompt, in order.

    Takes ``open_runtime``'s options; the constructor returns once the model is loaded (a bad
    option raises here). ``close()`` (or leaving ``with``) ends the runtime and joins its
    thread; an interpreter that exits with one open closes it first.
    """

    def __init__(self, model: str = "smollm2", **options: Any) -> None:
        self._host = _Host({"model": model, **options})
        weakref.finalize(self, self._host.begin_close)  # dropped without close(): it still ends
        self._host.wait_ready()

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        request_ids: Sequence[str] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list of them (each a string, chat messages or
        ``{"prompt_token_ids": [...]}``), all at once; ``sampling_params`` is one for all or one
        per prompt. Returns the final output of each, in the prompts' order. Bad input raises
        ``ValidationError`` before anything starts; an interrupt (``KeyboardInterrupt``) aborts
        every request of the call and is raised again."""
        if _is_single_prompt(prompts):
            batch = [prompts]
        elif isinstance(prompts, (list, tuple)):
            batch = list(prompts)
        else:
            raise ValidationError("prompts", type(prompts).__name__, "must be a prompt (a string, chat messages or "
                                  "{'prompt_token_ids': [...]}) or a list of them")
        if isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
            if len(params) != len(batch):
                raise ValidationError("sampling_params", f"{len(params)} of them",
                                      f"must be one, or one per prompt ({len(batch)})")
        else:
            params = [sampling_params] * len(batch)
        if request_ids is not None:
            if not isinstance(request_ids, (list, tuple)) or len(request_ids) != len(batch):
                raise ValidationError("request_ids", request_ids, f"must be a list of strings, one per prompt ({len(batch)})")
        if not batch:
            return []
        inbox: queue.Queue = queue.Queue()
        started: list[trio.CancelScope] = []
        finals: list[RequestOutput | None] = [None] * len(batch)
        ended = [False] * len(batch)

        def sink_for(i: int) -> Callable[[str, Any], bool]:
            return lambda kind, item: inbox.put((i, kind, item)) or True

        rids = request_ids if request_ids is not None else [None] * len(batch)
        try:
            self._host.submit(list(zip(batch, params, rids)), [sink_for(i) for i in range(len(batch))], started)
            while not all(ended):
                i, kind, item = inbox.get()
                if kind == _OUT:
                    finals[i] = item
                    continue
                ended[i] = True
                if kind == _ERROR:
                    raise item
        except BaseException:
            # Stop every request of this call, and wait until each is let go (its id is free
            # again when this raises), unless interrupted again.
            self._host.cancel(started)
            for _ in range(len(started) - sum(ended)):
                while inbox.get()[1] == _OUT:
                    pass
            raise
        if any(f is None for f in finals):  # the runtime closed before a request's first output
            raise InfiniLLMError("the runtime closed before every request had an output")
        return finals  # type: ignore[return-value]

    def close(self) -> None:
        """End every request, close the runtime, join its thread (idempotent)."""
        self._host.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncLLM(_Hosted):
    """The runtime for asyncio: ``async for out in llm.generate(prompt, params)`` streams
    cumulative ``RequestOutput`` s, as ``Runtime.generate`` does in trio.

    The constructor starts loading and returns at once; ``async with AsyncLLM(...)`` (or the
    first ``generate``) waits for the model without blocking the event loop, and raises a bad
    option's error. Cancelling the task that reads a stream, or closing the stream
    (``aclose()``, ``contextlib.aclosing``), aborts the request and returns once its id is free
    again; a stream left by ``break`` is closed when asyncio finalizes it (soon after, in a task
    of its own), as every async generator. ``await llm.close()`` ends every request and the
    runtime's thread.
    """

    def __init__(self, model: str = "smollm2", **options: Any) -> None:
        self._host = _Host({"model": model, **options})
        weakref.finalize(self, self._host.begin_close)  # dropped without close(): it still ends

    async def _wait_host(self, register: Callable[[Callable[[], None]], None]) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done() -> None:
            try:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
            except RuntimeError:  # that loop is closed
                pass

        register(done)
        await fut

    async def ready(self) -> None:
        """Wait until the model is loaded and the runtime serves (or raise why it cannot)."""
        await self._wait_host(self._host.on_ready)
        self._host._raise_if_failed()

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; the last has ``finished`` True."""
        await self.ready()
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, item: Any) -> bool:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, (kind, item))
                return True
            except RuntimeError:  # the caller's loop is closed: nobody reads, the request stops
                return False

        started: list[trio.CancelScope] = []
        self._host.submit([(prompt, sampling_params, request_id)], [sink], started)
        ended = False
        try:
            while True:
                kind, item = await inbox.get()
                if kind == _OUT:
                    yield item
                    continue
                ended = True
                if kind == _ERROR:
                    raise item
                return
        finally:
            if not ended:  # the reader left early or was cancelled: abort, and wait until let go
                self._host.cancel(started)
                try:
                    while (await inbox.get())[0] == _OUT:
                        pass
                except (asyncio.CancelledError, RuntimeError):
                    pass  # cancelled again, or the loop is going: the abort goes on without us

    async def close(self) -> None:
        """End every request, close the runtime and join its thread, without blocking the loop."""
        await self._wait_host(self._host.on_ready)
        self._host.begin_close()
        await self._wait_host(self._host.on_done)
        self._host.close()

    async def __aenter__(self) -> AsyncLLM:
        await self.ready()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
