"""Workers placed as Ray actors (``open_runtime(..., launcher="ray")``, the optional extra
``pip install 'infinillm[ray]'``).

Each worker is one Ray actor that holds the worker's resources (its GPU on a GPU host: Ray sets
its ``CUDA_VISIBLE_DEVICES``, which the worker inherits) and runs the very same
``python -m infinillm.worker`` process as the local launcher, as its child: the workers and the
runtime still speak ZeroMQ to each other, Ray only places and starts them. The runtime joins
the cluster named by ``RAY_ADDRESS`` when set, else starts a local one for its lifetime. Across
Ray nodes, give the runtime ``transport="tcp"`` and a reachable ``bind_host`` (and CURVE keys).

The runtime watches a worker through ``RayWorkerProcess``, which has what it needs of a
``trio.Process`` (``wait``, ``returncode``, ``kill``, ``pid``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .errors import InfiniLLMError

__all__ = ["open_ray_worker", "RayWorkerProcess"]

_POLL_S = 0.2  # how often a worker's exit is looked for


def _ray():
    try:
        import ray
    except ImportError:
        raise InfiniLLMError("launcher='ray' needs Ray: pip install 'infinillm[ray]'") from None
    return ray


class _WorkerActor:
    """Runs in the actor's process: starts the worker as its child, reports its ready line."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()

    def start(self, argv: list[str], env: dict[str, str] | None) -> tuple[str, int]:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env={**os.environ, **env} if env else None)
        line = self.proc.stdout.readline().decode()
        if not line:
            rc = self.proc.wait()
            self.log.seek(0)
            return f"exited {rc}: " + self.log.read()[-2000:].decode(errors="replace").strip(), self.proc.pid
        return line, self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def stop(self, timeout_s: float) -> int | None:
        """Let the worker go (close its stdin) and wait for it; kill it after ``timeout_s``."""
        if self.proc is None:
            return None
        try:
            self.proc.stdin.close()
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class RayWorkerProcess:
    """A worker started by a Ray actor, as the runtime's watchers see a process."""

    def __init__(self, actor, pid: int) -> None:
        self._actor = actor
        self.pid = pid  # (the worker's pid on its node)
        self._returncode: int | None = None
        self._poll = None  # the actor's answer on its way

    @property
    def returncode(self) -> int | None:
        """The worker's exit status once known, else None; never blocks (it looks whether the
        actor has answered its last question, and asks again)."""
        if self._returncode is not None:
            return self._returncode
        ray = _ray()
        if self._poll is None:
            self._poll = self._actor.poll.remote()
        ready, _ = ray.wait([self._poll], timeout=0)
        if ready:
            try:
                rc = ray.get(self._poll)
            except Exception:  # noqa: BLE001 - the actor itself is gone: so is its worker
                rc = -9
            self._poll = None
            if rc is not None:
                self._returncode = rc
        return self._returncode

    async def wait(self) -> int:
        while self.returncode is None:
            await trio.sleep(_POLL_S)
        return self._returncode

    def kill(self) -> None:
        self._actor.kill.remote()


@asynccontextmanager
async def open_ray_worker(argv: list[str], instance_id: int, *, device: str = "cpu", threads: int | None = None,
                          env: dict[str, str] | None = None, ready_timeout_s: float = 300.0) -> AsyncIterator:
    """One worker as a Ray actor (``num_gpus=1`` for a CUDA device, ``num_cpus`` its threads);
    yields a ``WorkerProcess``; on exit the worker is let go and the actor killed."""
    from .worker import WorkerProcess

    ray = _ray()
    actor_class = ray.remote(_WorkerActor)
    gpus = 1 if str(device).startswith("cuda") else 0
    if gpus:  # the actor's GPU is the worker's: Ray sets CUDA_VISIBLE_DEVICES for it
        argv = [a if a != device else "cuda" for a in argv]
    actor = actor_class.options(num_cpus=threads or 1, num_gpus=gpus).remote()
    process: RayWorkerProcess | None = None
    try:
        with trio.fail_after(ready_timeout_s):
            line, pid = await trio.to_thread.run_sync(ray.get, actor.start.remote(argv, env))
        words = line.split()
        if len(words) != 3 or words[0] != "ready":
            raise InfiniLLMError(f"worker {instance_id} (a Ray actor) did not start: {line.strip()}")
        process = RayWorkerProcess(actor, pid)
        yield WorkerProcess(instance_id, process, words[1], words[2])
    finally:
        with trio.CancelScope(shield=True):
            try:
                rc = await trio.to_thread.run_sync(ray.get, actor.stop.remote(30.0))
                if process is not None and process._returncode is None:
                    process._returncode = rc
            except Exception:  # noqa: BLE001 - the actor (and so its worker) is gone already
                pass
            finally:
                ray.kill(actor)


def ensure_ray() -> bool:
    """Connect to the Ray cluster of ``RAY_ADDRESS``, else start a local one; True when this
    call started it (the caller shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return address is None
