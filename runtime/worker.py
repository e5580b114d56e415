"""An instance in its own process, serving its peer socket.

    python -m infinillm.worker --model PATH --instance-id 1 --num-blocks 64 [--block-size 16]
        [--max-lend-fraction 0.5] [--dtype float32] [--device cpu] [--transport ipc]

The worker loads the model, builds its ``Engine`` (the same code as the in-process instance)
and serves a peer ``Server`` (``cluster.PeerService``): debtors reserve, commit and release its
blocks and send it partial-attention queries over them. With ``--heartbeat-address`` it pushes
its pool's counter changes (``HeartbeatDelta``) there every ``--heartbeat-interval-s`` seconds
when there are some: the gManager's ledger. It prints ``ready <peer address>`` on
stdout once it serves, and exits when its standard input closes (the parent let it go) or its
parent process dies (checked every ``_PARENT_POLL_S`` seconds), so no worker outlives the
runtime that started it.

Still to come (issue #11): the control socket (requests in, outputs out) that makes a worker a
home instance of its own.
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

from .cluster import PeerService
from .config import CacheConfig, SchedulerConfig, TransportConfig
from .engine import Engine
from .errors import InfiniLLMError
from .loader import load_model
from .transport import HeartbeatDelta, open_transport

__all__ = ["main", "serve", "open_worker", "WorkerProcess"]

_PARENT_POLL_S = 1.0
_DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infinillm.worker", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--instance-id", type=int, required=True)
    p.add_argument("--num-blocks", type=int, required=True)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-lend-fraction", type=float, default=0.5)
    p.add_argument("--reservation-ttl-s", type=float, default=2.0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    p.add_argument("--heartbeat-address", default=None, help="where to push HeartbeatDelta s (the gManager's puller)")
    p.add_argument("--heartbeat-interval-s", type=float, default=0.1)
    return p


async def _send_heartbeats(engine: Engine, pusher, interval_s: float) -> None:
    """Push the pool's counter changes to the gManager whenever there are some."""
    while True:
        with engine.pool_lock:
            delta = engine.pool.take_delta()
        if not delta.empty:
            await pusher.send(HeartbeatDelta.from_pool_delta(delta))
        await trio.sleep(interval_s)


async def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        await trio.sleep(_PARENT_POLL_S)


async def _wait_stdin_closed() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some():
            pass


async def serve(args: argparse.Namespace) -> None:
    import torch

    parent = os.getppid()
    dtype = getattr(torch, args.dtype)
    model, tokenizer, margs = await trio.to_thread.run_sync(
        lambda: load_model(args.model, dtype=dtype, device=args.device, progress=False)
    )
    cache = CacheConfig(block_size=args.block_size, kv_capacity_tokens=args.num_blocks * args.block_size,
                        max_lend_fraction=args.max_lend_fraction, reservation_ttl_s=args.reservation_ttl_s)
    engine = Engine(model, margs, tokenizer, cache=cache, scheduler=SchedulerConfig(), num_blocks=args.num_blocks,
                    max_model_len=args.max_model_len or margs.max_position_embeddings, instance_id=args.instance_id,
                    device=args.device, dtype=dtype)
    service = PeerService(engine, reservation_ttl_s=args.reservation_ttl_s)
    async with open_transport(TransportConfig(transport=args.transport)) as tp:
        async with tp.open_server(service.handle, name=f"peer{args.instance_id}", concurrency=4) as server:
            print("ready", server.address, flush=True)
            async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
                if args.heartbeat_address:
                    pusher = await stack.enter_async_context(tp.open_pusher(args.heartbeat_address))
                    nursery.start_soon(_send_heartbeats, engine, pusher, args.heartbeat_interval_s)
                for wait in (_wait_stdin_closed, lambda: _watch_parent(parent)):
                    async def stop_when(wait=wait) -> None:
                        await wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(stop_when)


@dataclass(slots=True)
class WorkerProcess:
    """A started worker: its process and the address of its peer socket."""

    instance_id: int
    process: trio.Process
    peer_address: str


@asynccontextmanager
async def open_worker(
    model: str, instance_id: int, num_blocks: int, *, block_size: int = 16, max_lend_fraction: float = 0.5,
    max_model_len: int | None = None, dtype: str = "float32", device: str = "cpu", ready_timeout_s: float = 300.0,
    heartbeat_address: str | None = None, heartbeat_interval_s: float = 0.1,
) -> AsyncIterator[WorkerProcess]:
    """Start ``python -m infinillm.worker`` and wait until it serves; on exit close its stdin
    (it stops) and wait for it. A worker that dies before it is ready raises ``InfiniLLMError``
    with what it printed on stderr."""
    argv = [sys.executable, "-m", "infinillm.worker", "--model", str(model), "--instance-id", str(instance_id),
            "--num-blocks", str(num_blocks), "--block-size", str(block_size), "--max-lend-fraction",
            str(max_lend_fraction), "--dtype", dtype, "--device", device]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if heartbeat_address is not None:
        argv += ["--heartbeat-address", heartbeat_address, "--heartbeat-interval-s", str(heartbeat_interval_s)]
    # Its stderr goes to a file (a pipe nobody reads would fill and stall it), read back if it
    # dies before it is ready.
    log_file = tempfile.TemporaryFile()
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)
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
        word, address = line.decode().split()
        if word != "ready":
            raise InfiniLLMError(f"worker {instance_id} said {line!r}, not 'ready <address>'")
        yield WorkerProcess(instance_id, proc, address)
    finally:
        with trio.CancelScope(shield=True):
            await proc.stdin.aclose()
            with trio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log_file.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        trio.run(serve, args)
    except InfiniLLMError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
