"""How much KV memory an instance gets, and the GPU memory monitor (NVML).

When ``kv_capacity_tokens`` is not given, an instance's KV capacity is derived at start:

- on CUDA from NVML: ``free memory x gpu_memory_utilization``, minus what the weights and a
  working margin take (the weights are already resident when this runs);
- on CPU from the host's available memory x ``cpu_kv_fraction``, divided by the instances.

``MemoryMonitor`` reads device memory through a ``MemoryProbe``: ``NvmlProbe`` on GPUs; on
machines without a GPU the tests use ``infinillm.testing.FakeNvmlProbe``, a test double
standing in for the absent hardware, named as such.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

import logging

from .config import CacheConfig
from .errors import CapacityError

__all__ = [
    "MemoryInfo",
    "MemoryProbe",
    "NvmlProbe",
    "MemoryMonitor",
    "MemoryWatch",
    "HostMemoryProbe",
    "lend_cap",
    "default_probe",
    "kv_bytes_per_token",
    "derive_num_blocks",
    "host_available_bytes",
]

# Kept free on a GPU beyond the KV cache: activations, the sampler, allocator slack.
_GPU_WORKSPACE_BYTES = 512 << 20

log = logging.getLogger("infinillm.memory")


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    """One reading of a device's memory, in bytes."""

    device_index: int
    total: int
    free: int
    used: int

    @property
    def used_fraction(self) -> float:
        return self.used / self.total if self.total else 0.0


class MemoryProbe(Protocol):
    def read(self, device_index: int) -> MemoryInfo: ...

    def device_count(self) -> int: ...


class NvmlProbe:
    """Reads GPU memory through NVML (``nvidia-ml-py``)."""

    def __init__(self) -> None:
        import pynvml  # from nvidia-ml-py

        self._nvml = pynvml
        pynvml.nvmlInit()

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def read(self, device_index: int) -> MemoryInfo:
        handle = self._nvml.nvmlDeviceGetHandleByIndex(device_index)
        info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        return MemoryInfo(device_index, int(info.total), int(info.free), int(info.used))

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class HostMemoryProbe:
    """The host's memory as a ``MemoryProbe`` (one device, index 0): ``MemTotal`` and
    ``MemAvailable`` of ``/proc/meminfo``. On CPU hosts it plays NVML's part."""

    def device_count(self) -> int:
        return 1

    def read(self, device_index: int) -> MemoryInfo:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free = min(total, host_available_bytes())
        return MemoryInfo(device_index, total, free, total - free)


def lend_cap(reading: MemoryInfo, full_cap: int, min_free_fraction: float) -> int:
    """Blocks an instance may lend given a memory reading of its device: all of ``full_cap``
    while at least twice ``min_free_fraction`` of the device is free; none when
    ``min_free_fraction`` or less is (other processes have taken the memory: the instance stops
    taking new loans); in between, in proportion. Loans already made are kept."""
    if reading.total <= 0 or min_free_fraction <= 0:
        return full_cap
    free = reading.free / reading.total
    if free >= 2 * min_free_fraction:
        return full_cap
    if free <= min_free_fraction:
        return 0
    return int(full_cap * (free - min_free_fraction) / min_free_fraction + 1e-9)  # (1e-9: 0.15 - 0.1 is 0.0499...)


def default_probe(device: torch.device | str) -> MemoryProbe:
    """The probe of an instance's device: NVML on a GPU, the host's memory on CPU; with
    ``INFINILLM_FAKE_MEMORY_FILE`` set, ``infinillm.testing.FileMemoryProbe`` (a test double
    for NVML, for tests on machines without a GPU: the file says the memory)."""
    fake = os.environ.get("INFINILLM_FAKE_MEMORY_FILE")
    if fake:
        from .testing import FileMemoryProbe

        return FileMemoryProbe(fake)
    return NvmlProbe() if torch.device(device).type == "cuda" else HostMemoryProbe()


class MemoryWatch:
    """An instance's device memory, read every ``poll()``, setting its pool's lending cap
    (``lend_cap``; under the engine's ``pool_lock``) and, where the gManager keeps this
    instance, the ledger's. ``reading`` is the last one; ``poll`` returns True when the cap
    changed."""

    def __init__(self, probe: MemoryProbe, device_index: int, pool, full_cap: int, min_free_fraction: float,
                 lock=None, ledger=None) -> None:
        self.probe = probe
        self.device_index = device_index
        self.pool = pool
        self.full_cap = full_cap
        self.min_free_fraction = min_free_fraction
        self.lock = lock
        self.ledger = ledger
        self.reading: MemoryInfo | None = None
        self.num_failed_reads = 0

    def poll(self) -> bool:
        """Read the memory and set the cap; a reading that fails (NVML error, a file being
        rewritten) is logged and skipped: the last cap stands."""
        try:
            reading = self.probe.read(self.device_index)
        except Exception as e:  # noqa: BLE001 - a monitor must not take the instance down
            self.num_failed_reads += 1
            if self.num_failed_reads in (1, 10, 100) or self.num_failed_reads % 1000 == 0:
                log.warning("memory reading of device %d failed (%d so far): %s", self.device_index,
                            self.num_failed_reads, e)
            return False
        self.reading = reading
        cap = lend_cap(self.reading, self.full_cap, self.min_free_fraction)
        if cap == self.pool.max_lent_blocks:
            return False
        if self.lock is not None:
            with self.lock:
                self.pool.set_max_lent_blocks(cap)
        else:
            self.pool.set_max_lent_blocks(cap)
        if self.ledger is not None:
            self.ledger.set_max_lent(self.pool.instance_id, cap)
        return True


class MemoryMonitor:
    """Keeps the latest memory reading of each device; ``poll`` refreshes them."""

    def __init__(self, probe: MemoryProbe) -> None:
        self.probe = probe
        self.readings: dict[int, MemoryInfo] = {}

    def poll(self) -> dict[int, MemoryInfo]:
        self.readings = {i: self.probe.read(i) for i in range(self.probe.device_count())}
        return dict(self.readings)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def host_available_bytes() -> int:
    """Memory the host can still give (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def derive_num_blocks(
    cache: CacheConfig,
    bytes_per_token: int,
    device: torch.device,
    *,
    num_instances: int = 1,
    probe: MemoryProbe | None = None,
) -> int:
    """KV blocks per instance: given by ``kv_capacity_tokens``, else derived from memory."""
    if cache.kv_capacity_tokens is not None:
        return cache.kv_capacity_tokens // cache.block_size
    bytes_per_block = bytes_per_token * cache.block_size
    if device.type == "cuda":
        probe = probe or NvmlProbe()
        info = probe.read(device.index or 0)
        share = int(info.free * cache.gpu_memory_utilization)
        budget = share - _GPU_WORKSPACE_BYTES
        where = (f"{info.free} bytes free x gpu_memory_utilization={cache.gpu_memory_utilization} = {share}, "
                 f"less a {_GPU_WORKSPACE_BYTES}-byte workspace, leaves {budget} bytes for KV")
    else:
        available = host_available_bytes()
        budget = int(available * cache.cpu_kv_fraction) // num_instances
        where = (f"{available} bytes available x cpu_kv_fraction={cache.cpu_kv_fraction} / {num_instances} "
                 f"instances leaves {budget} bytes for KV")
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise CapacityError(
            f"no room for a KV cache on {device}: {where}, and one block of {cache.block_size} tokens "
            f"needs {bytes_per_block} bytes; give kv_capacity_tokens or more memory"
        )
    return int(blocks)
