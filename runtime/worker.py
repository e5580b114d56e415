"""An instance in its own process: a home of its own requests and a creditor of its peers.

    python -m infinillm.worker --model PATH --instance-id 1 --num-blocks 64 [--block-size 16]
        [--max-lend-fraction 0.5] [--cluster-blocks N] [--dtype float32] [--device cpu]
        [--transport ipc] [--heartbeat-address ADDR]

The worker loads the model, builds its ``Engine`` (the same code as the in-process instance)
and runs the same ``Runtime`` around it, with two sockets:

- its **control** socket (``homes.ControlService``): ``AddRequest`` / ``AbortRequest`` from the
  runtime that placed the request here, and once ``ConnectPeers`` (the other instances' peer
  sockets, which this engine borrows from);
- its **peer** socket (``cluster.PeerService``): debtors reserve, commit and release its blocks
  and send it partial-attention queries over them.

Its outputs (one ``StepOutputs`` per step) and its pool's counter changes and load
(``HeartbeatDelta``, after each step and every ``--heartbeat-interval-s`` when the pool changed
in between) go, in order, to ``--heartbeat-address``: the runtime's puller (the gManager's
ledger and the requests' streams). It prints ``ready <peer address> <control address>`` on
stdout once it serves, and exits when its standard input closes (the parent let it go) or its
parent process dies (checked every ``_PARENT_POLL_S`` seconds), so no worker outlives the
runtime that started it.

``INFINILLM_FAIL_STEPS`` (fault injection, for tests): comma-separated ``instance:step`` pairs;
the worker with that instance id raises in the model run of that step, as a device error would.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .cluster import PeerService, connect_peer
from .config import CacheConfig, RuntimeConfig, SchedulerConfig, TransportConfig
from .engine import Engine
from .errors import InfiniLLMError, InstanceDeadError, TransportError
from .homes import ControlService
from .loader import load_model
from .memory import MemoryWatch, default_probe
from .runtime import Runtime, _fingerprint, _single_error
from .transport import ConnectPeers, HeartbeatDelta, JoinReady, JoinRequest, Sync, Synced, open_transport
from .transport.endpoint import RemoteError

__all__ = ["main", "serve", "open_worker", "WorkerProcess"]

_PARENT_POLL_S = 1.0
_RUNTIME_POLL_S = 1.0  # how often a joined worker checks that its runtime is still there
_DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infinillm.worker", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="'smollm2', a Hugging Face folder or a GGUF file: the runtime's model")
    p.add_argument("--instance-id", type=int, default=None, help="(required unless --join: the runtime gives it)")
    p.add_argument("--num-blocks", type=int, required=True, help="KV blocks of this instance")
    p.add_argument("--block-size", type=int, default=16, help="tokens a KV block (the runtime's)")
    p.add_argument("--max-lend-fraction", type=float, default=0.5, help="most of its blocks this instance lends")
    p.add_argument("--reservation-ttl-s", type=float, default=2.0, help="a loan reservation not committed by then expires")
    p.add_argument("--min-free-memory-fraction", type=float, default=CacheConfig().min_free_memory_fraction,
                   help="lend nothing new while at most this fraction of the device's memory is free")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off (CacheConfig)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + generated tokens of one request (None: the model's)")
    p.add_argument("--cluster-blocks", type=int, default=None, help="blocks a request may span (own + lendable)")
    p.add_argument("--max-num-seqs", type=int, default=SchedulerConfig().max_num_seqs, help="requests in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig().max_num_batched_tokens, help="tokens in one step")
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU): default torch's own")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="the weights' and the KV cache's dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc", help="ipc on one host, tcp across hosts (--join sets tcp)")
    p.add_argument("--heartbeat-address", default=None, help="where to push HeartbeatDelta s (the gManager's puller)")
    p.add_argument("--heartbeat-interval-s", type=float, default=0.1, help="how often a changed pool is reported")
    p.add_argument("--keepalive-s", type=float, default=1.0, help="a heartbeat at least this often, changes or not")
    p.add_argument("--join", default=None, metavar="tcp://HOST:PORT",
                   help="join a running runtime at its join address (a worker on another host)")
    p.add_argument("--key", default=None, metavar="FILE",
                   help="with --join: the cluster's CURVE secret key file (infinillm keys DIR)")
    p.add_argument("--join-timeout-s", type=float, default=30.0,
                   help="with --join: how long to wait for the runtime's answer (a wrong key gets none)")
    p.add_argument("--bind-host", default="127.0.0.1",
                   help="with --join: the address this worker's sockets bind to (reachable from the others)")
    return p


def _heartbeat(engine: Engine, force: bool = False) -> HeartbeatDelta | None:
    """The pool's counter changes since the last heartbeat and the batch's load (None when
    nothing changed and ``force`` is false)."""
    with engine.pool_lock:  # (the planner changes under it too: a consistent load)
        delta = engine.pool.take_delta()
        s = engine.planner.statistics()
        cached = engine.pool.num_cached
    if delta.empty and not force:
        return None
    reading = engine.memory.reading if engine.memory is not None else None
    return HeartbeatDelta.from_pool_delta(
        delta, batch_size=s.num_running, num_waiting=s.num_waiting, waiting_blocks=s.waiting_blocks,
        max_lent=engine.pool.max_lent_blocks,
        memory_total=reading.total if reading else 0, memory_free=reading.free if reading else 0,
        cached_blocks=cached, prefix_query_tokens=s.prefix_query_tokens, prefix_hit_tokens=s.prefix_hit_tokens,
    )


class _Pushed:
    """The worker's one-way messages to the runtime, in order, counting its heartbeats (a
    ``Synced`` says how many were pushed before it, so the runtime waits for that one)."""

    def __init__(self, send: trio.MemorySendChannel) -> None:
        self._send = send
        self.heartbeats = 0

    def send(self, msg) -> None:
        if isinstance(msg, HeartbeatDelta):
            self.heartbeats += 1
        self._send.send_nowait(msg)


async def _send_heartbeats(engine: Engine, out: _Pushed, interval_s: float, keepalive_s: float) -> None:
    """Between steps too: lending changes the pool while this engine is idle; and its memory
    reading, which sets its lending cap (a change is reported at once). At least one every
    ``keepalive_s``, changes or not: the runtime declares an instance it has not heard from
    for its ``heartbeat_timeout_s`` dead."""
    last = trio.current_time()
    while True:
        capped = engine.memory is not None and engine.memory.poll()
        now = trio.current_time()
        hb = _heartbeat(engine, force=capped or now - last >= keepalive_s)
        if hb is not None:
            out.send(hb)
            last = now
        await trio.sleep(interval_s)


async def _push(recv: trio.MemoryReceiveChannel, pusher) -> None:
    async for msg in recv:
        if pusher is not None:
            await pusher.send(msg)


async def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        await trio.sleep(_PARENT_POLL_S)


async def _wait_stdin_closed() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some():
            pass


class _FaultyModel:
    """Fault injection (``INFINILLM_FAIL_STEPS``): the model, raising on the listed steps."""

    def __init__(self, model, engine_steps, fail_at: set[int]) -> None:
        self._model = model
        self._steps = engine_steps
        self._fail_at = fail_at

    def __call__(self, *args, **kwargs):
        step = self._steps()
        if step in self._fail_at:
            raise RuntimeError(f"injected fault at step {step} (INFINILLM_FAIL_STEPS)")
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


async def serve(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tokenizer, margs = await trio.to_thread.run_sync(
        lambda: load_model(args.model, dtype=dtype, device=args.device, progress=False)
    )
    if args.join is None:
        async with open_transport(TransportConfig(transport=args.transport)) as tp:
            await _serve(args, tp, model, tokenizer, margs, dtype, None)
        return
    # A worker on another host: tcp, with the cluster's CURVE key; the runtime gives its id and
    # settings (``JoinRequest`` -> ``Joined``) before the engine is made.
    config = TransportConfig(transport="tcp", bind_host=args.bind_host, curve_secret_key_file=args.key,
                             curve_public_key_file=args.key)
    async with open_transport(config) as tp, tp.open_client(args.join, timeout=args.join_timeout_s) as client:
        try:
            joined = await client.request(JoinRequest(_fingerprint(margs), args.num_blocks))
        except RemoteError as e:  # it answered: a refusal, which says why
            raise InfiniLLMError(f"the runtime at {args.join} refused this worker: {e}") from None
        except TransportError as e:
            raise InfiniLLMError(
                f"no answer from the runtime at {args.join} within {args.join_timeout_s:g} s ({e}): is that its "
                f"join address, and is {args.key!r} the cluster's key? (a wrong key is refused without a word)"
            ) from None
        options = dict(joined.options)
        if options.pop("dtype", args.dtype) != args.dtype:
            raise InfiniLLMError(f"the runtime at {args.join} runs {joined.options['dtype']}: start this worker "
                                 f"with --dtype {joined.options['dtype']} (it has {args.dtype})")
        args.instance_id = joined.instance_id
        for name, value in options.items():
            setattr(args, name, value)
        await _serve(args, tp, model, tokenizer, margs, dtype, client)


async def _serve(args, tp, model, tokenizer, margs, dtype, join_client) -> None:
    import math

    import torch

    parent = os.getppid()
    cache = CacheConfig(block_size=args.block_size, kv_capacity_tokens=args.num_blocks * args.block_size,
                        max_lend_fraction=args.max_lend_fraction, reservation_ttl_s=args.reservation_ttl_s,
                        enable_prefix_caching=not args.no_prefix_caching)
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    engine = Engine(model, margs, tokenizer, cache=cache, scheduler=scheduler, num_blocks=args.num_blocks,
                    max_model_len=args.max_model_len or margs.max_position_embeddings, instance_id=args.instance_id,
                    device=args.device, dtype=dtype, cluster_blocks=args.cluster_blocks, seed=args.seed)
    fail_at = {int(step) for instance, _, step in (x.partition(":") for x in os.environ.get("INFINILLM_FAIL_STEPS", "").split(","))
               if step.strip() and int(instance) == args.instance_id}
    if fail_at:
        engine.model = _FaultyModel(model, lambda: engine.num_steps, fail_at)
    device = torch.device(args.device)
    engine.memory = MemoryWatch(default_probe(device), (device.index or 0) if device.type == "cuda" else 0, engine.pool,
                                engine.pool.max_lent_blocks, args.min_free_memory_fraction, lock=engine.pool_lock)
    service = PeerService(engine, reservation_ttl_s=args.reservation_ttl_s)
    out_send, out_recv = trio.open_memory_channel(math.inf)  # to the runtime, in order
    pushed = _Pushed(out_send)
    async with trio.open_nursery() as peer_nursery, contextlib.AsyncExitStack() as stack:
        pusher = None
        if args.heartbeat_address:
            pusher = await stack.enter_async_context(tp.open_pusher(args.heartbeat_address))
        peer_nursery.start_soon(_push, out_recv, pusher)
        connect_send, connect_recv = trio.open_memory_channel(0)
        await peer_nursery.start(_connect_peers, tp, engine, peer_nursery, connect_recv)

        async def connect(msg: ConnectPeers) -> None:
            done, box = trio.Event(), []
            await connect_send.send((msg, done, box))
            await done.wait()
            if box:
                raise box[0]

        async with trio.open_nursery() as nursery:

            def outputs(outs) -> None:  # (control is made just below, before any output)
                msg = control.outputs_to_deltas(outs)
                if msg is not None:
                    pushed.send(msg)

            def heartbeat() -> None:
                pushed.send(_heartbeat(engine, force=True))

            runtime = Runtime(RuntimeConfig(), engine, tokenizer, output_sink=outputs, pool_sink=heartbeat)
            control = ControlService(runtime, nursery)

            async def handle(msg):
                if isinstance(msg, ConnectPeers):
                    return await connect(msg)
                if isinstance(msg, Sync):
                    await runtime._aborts_applied()  # the requests it aborts have let their blocks go
                    for p in engine.peers.values():
                        await p.wait_released()
                    if not msg.snapshot:
                        return Synced(engine.instance_id, 0)
                    if engine.memory is not None:  # as of now, memory included
                        engine.memory.poll()
                    hb = _heartbeat(engine, force=True)
                    pushed.send(hb)
                    return Synced(engine.instance_id, hb.version, pushed.heartbeats)
                return await control.handle(msg)

            peer = await nursery.start(_serve_socket, tp, service.handle, f"peer{args.instance_id}", 4)
            ctl = await nursery.start(_serve_socket, tp, handle, f"control{args.instance_id}", 1)
            nursery.start_soon(runtime._serve)
            nursery.start_soon(_send_heartbeats, engine, pushed, args.heartbeat_interval_s, args.keepalive_s)
            if join_client is None:
                print("ready", peer, ctl, flush=True)
                waits = (_wait_stdin_closed, lambda: _watch_parent(parent))
            else:
                await join_client.request(JoinReady(args.instance_id, peer, ctl))
                print("joined as instance", args.instance_id, peer, ctl, flush=True)
                waits = (lambda: _watch_runtime(join_client, args.instance_id),)
            for wait in waits:
                async def stop_when(wait=wait) -> None:
                    await wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_when)
        with trio.move_on_after(5):  # the requests ended above: their loans go back
            for p in engine.peers.values():
                await p.wait_released()
        peer_nursery.cancel_scope.cancel()


async def _watch_runtime(client, instance_id: int) -> None:
    """A joined worker's tie to its runtime: it asks every ``_RUNTIME_POLL_S`` whether the
    runtime is still there and still counts it a member, and returns (the worker stops) when
    it was dropped (declared lost while it was silent) or after three silent answers."""
    silent = 0
    while silent < 3:
        await trio.sleep(_RUNTIME_POLL_S)
        try:
            with trio.fail_after(_RUNTIME_POLL_S * 2):
                await client.request(Sync(False, instance_id))
            silent = 0
        except InstanceDeadError as e:
            print(f"dropped by the runtime: {e}: stopping", file=sys.stderr, flush=True)
            return
        except (TransportError, InfiniLLMError, trio.TooSlowError):
            silent += 1
    print("the runtime is gone: stopping", file=sys.stderr, flush=True)


async def _connect_peers(tp, engine: Engine, nursery: trio.Nursery, requests: trio.MemoryReceiveChannel, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Owns the connections to the other instances (``ConnectPeers``), so they open and close
    in this one task, and makes each a ``ZmqPeer`` of the engine."""
    async with contextlib.AsyncExitStack() as stack:
        task_status.started()
        async for msg, done, box in requests:
            try:
                for instance_id, address, lendable in zip(msg.instance_ids, msg.addresses, msg.lendable):
                    if instance_id == engine.instance_id or instance_id in engine.peers:
                        raise InfiniLLMError(f"ConnectPeers: instance {instance_id} is this one or already connected")
                    peer = await connect_peer(stack, tp, instance_id, address, nursery, lendable)
                    engine.peers = {**engine.peers, instance_id: peer}  # (a new dict: a step may be reading the old one)
                    if msg.joined:  # it joined later: the cluster grows by what it may lend
                        engine.planner.cluster_blocks = engine.planner.cluster_blocks + lendable
            except Exception as e:  # noqa: BLE001 - the reply to ConnectPeers
                box.append(e)
            finally:
                done.set()


async def _serve_socket(tp, handler, name: str, concurrency: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with tp.open_server(handler, name=name, concurrency=concurrency) as server:
        task_status.started(server.address)
        await trio.sleep_forever()


@dataclass(slots=True)
class WorkerProcess:
    """A started worker: its process and the addresses of its peer and control sockets."""

    instance_id: int
    process: trio.Process
    peer_address: str
    control_address: str


@asynccontextmanager
async def open_worker(
    model: str, instance_id: int, num_blocks: int, *, block_size: int = 16, max_lend_fraction: float = 0.5,
    max_model_len: int | None = None, dtype: str = "float32", device: str = "cpu", ready_timeout_s: float = 300.0,
    heartbeat_address: str | None = None, heartbeat_interval_s: float = 0.1, cluster_blocks: int | None = None,
    max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None, seed: int = 0,
    threads: int | None = None, reservation_ttl_s: float | None = None, env: dict[str, str] | None = None,
    min_free_memory_fraction: float | None = None, keepalive_s: float | None = None, launcher: str = "local",
    enable_prefix_caching: bool = True,
) -> AsyncIterator[WorkerProcess]:
    """Start ``python -m infinillm.worker`` and wait until it serves; on exit close its stdin
    (it stops) and wait for it. A worker that dies before it is ready raises ``InfiniLLMError``
    with what it printed on stderr. ``launcher="ray"``: the same process, started by a Ray
    actor that holds its resources (``ray_launcher.open_ray_worker``)."""
    argv = [sys.executable, "-m", "infinillm.worker", "--model", str(model), "--instance-id", str(instance_id),
            "--num-blocks", str(num_blocks), "--block-size", str(block_size), "--max-lend-fraction",
            str(max_lend_fraction), "--dtype", dtype, "--device", device]
    optional = {"--max-model-len": max_model_len, "--cluster-blocks": cluster_blocks, "--max-num-seqs": max_num_seqs,
                "--max-num-batched-tokens": max_num_batched_tokens, "--seed": seed or None, "--threads": threads,
                "--reservation-ttl-s": reservation_ttl_s, "--min-free-memory-fraction": min_free_memory_fraction,
                "--keepalive-s": keepalive_s}
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    if not enable_prefix_caching:
        argv.append("--no-prefix-caching")
    if heartbeat_address is not None:
        argv += ["--heartbeat-address", heartbeat_address, "--heartbeat-interval-s", str(heartbeat_interval_s)]
    if launcher == "ray":
        from .ray_launcher import open_ray_worker

        async with open_ray_worker(argv, instance_id, device=device, threads=threads, env=env,
                                   ready_timeout_s=ready_timeout_s) as worker:
            yield worker
        return
    # Its stderr goes to a file (a pipe nobody reads would fill and stall it), read back if it
    # dies before it is ready.
    log_file = tempfile.TemporaryFile()
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                            env={**os.environ, **env} if env else None)
    try:
        line = b""
        with trio.fail_after(ready_timeout_s):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                if not chunk:
                    rc = await proc.wait()
                    log_file.seek(0)
                    err = log_file.read()[-2000:].decode(errors="replace").strip()
                    raise InfiniLLMError(f"worker {instance_id} exited before it was ready (rc {rc}): {err}")
                line += chunk
        words = line.decode().split()
        if len(words) != 3 or words[0] != "ready":
            raise InfiniLLMError(f"worker {instance_id} said {line!r}, not 'ready <peer address> <control address>'")
        yield WorkerProcess(instance_id, proc, words[1], words[2])
    finally:
        with trio.CancelScope(shield=True):
            await proc.stdin.aclose()
            with trio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log_file.close()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = _parser()
    if prog is not None:
        parser.prog = prog
    args = parser.parse_args(argv)
    if args.join is None and args.instance_id is None:
        parser.error("--instance-id is required (unless --join: the runtime gives it)")
    if args.join is not None and args.key is None:
        parser.error("--join needs --key: the cluster's CURVE secret key file (infinillm keys DIR)")
    try:
        try:
            trio.run(serve, args)
        except BaseExceptionGroup as group:  # one error through the nurseries: as itself
            leaf = _single_error(group)
            if leaf is None:
                raise
            raise leaf from None
    except InfiniLLMError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
