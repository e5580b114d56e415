"""KV capacity derivation and the memory monitor (NVML through a test double on this CPU-only machine)."""

import pytest
import torch

from infinillm import CacheConfig, CapacityError, ValidationError
from infinillm import memory
from infinillm.memory import MemoryMonitor, derive_num_blocks, host_available_bytes, kv_bytes_per_token
from infinillm.testing import FakeNvmlProbe


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer():
    # SmolLM2-135M: 30 layers, 3 KV heads x 64 dims; fp32 -> 2 * 30 * 3 * 64 * 4 bytes
    assert kv_bytes_per_token(30, 3, 64, torch.float32) == 46080
    assert kv_bytes_per_token(30, 3, 64, torch.bfloat16) == 23040


def test_given_capacity_wins_and_rounds_down_to_blocks():
    cache = CacheConfig(block_size=16, kv_capacity_tokens=1000)
    assert derive_num_blocks(cache, 46080, torch.device("cpu")) == 62  # 1000 // 16


def test_gpu_capacity_comes_from_nvml_free_memory():
    gib = 1 << 30
    probe = FakeNvmlProbe(total=80 * gib, free=40 * gib)  # test double: no GPU on this machine
    cache = CacheConfig(block_size=16, gpu_memory_utilization=0.5)
    per_token = 46080
    blocks = derive_num_blocks(cache, per_token, torch.device("cuda:0"), probe=probe)
    # (40 GiB * 0.5 - 512 MiB workspace) // (46080 * 16 bytes per block)
    assert blocks == (20 * gib - (512 << 20)) // (per_token * 16)


def test_no_room_is_a_capacity_error_with_the_numbers():
    probe = FakeNvmlProbe(total=1 << 30, free=100 << 20)
    with pytest.raises(CapacityError) as e:
        derive_num_blocks(CacheConfig(gpu_memory_utilization=0.5), 46080, torch.device("cuda:0"), probe=probe)
    # 100 MiB free * 0.5 - 512 MiB workspace = -484442112 bytes; one block: 46080 * 16 bytes
    assert str(e.value) == (
        "no room for a KV cache on cuda:0: 104857600 bytes free x gpu_memory_utilization=0.5 = 52428800, less a "
        "536870912-byte workspace, leaves -484442112 bytes for KV, and one block of 16 tokens needs 737280 bytes; "
        "give kv_capacity_tokens or more memory"
    )


def test_cpu_capacity_is_a_fraction_of_available_memory_split_over_instances(monkeypatch):
    # One fixed reading (the real one moves between calls): 10 GiB available.
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 10 << 30)
    cache = CacheConfig(block_size=16, cpu_kv_fraction=0.1)
    per_block = 46080 * 16
    assert derive_num_blocks(cache, 46080, torch.device("cpu")) == int((10 << 30) * 0.1) // per_block  # 1456
    assert derive_num_blocks(cache, 46080, torch.device("cpu"), num_instances=4) == int((10 << 30) * 0.1) // 4 // per_block  # 364


def test_host_available_bytes_reads_memavailable():
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert 0 < host_available_bytes() <= total_kib * 1024


def test_monitor_polls_every_device():
    probe = FakeNvmlProbe(total=100, free=25, count=2)
    readings = MemoryMonitor(probe).poll()
    assert sorted(readings) == [0, 1]
    assert readings[1].used == 75 and readings[1].used_fraction == 0.75
    with pytest.raises(ValidationError, match=r"device_index=2 is invalid: must be in \[0, 1\]"):
        probe.read(2)


def test_lend_cap_follows_free_memory():
    from infinillm.memory import MemoryInfo, lend_cap

    def at(free):
        return lend_cap(MemoryInfo(0, 1000, free, 1000 - free), 40, 0.1)

    assert [at(f) for f in (1000, 200, 150, 120, 100, 50, 0)] == [40, 40, 20, 8, 0, 0, 0]
    assert lend_cap(MemoryInfo(0, 1000, 0, 1000), 40, 0.0) == 40  # no floor: never limited


def test_memory_pressure_stops_lending_and_relief_resumes_it():
    """Another process takes device memory (the NVML test double says so): the pool's and the
    ledger's lending caps drop to 0 and reservations are refused, loans already made are kept;
    when it leaves, lending resumes."""
    from infinillm import core_sched
    from infinillm.memory import MemoryWatch

    gib = 1 << 30
    probe = FakeNvmlProbe(total=80 * gib, free=40 * gib)  # test double: no GPU on this machine
    pool = core_sched.BlockPool(0, 64, 32)
    ledger = core_sched.DebtLedger()
    ledger.register_instance(0, 64, 32)
    watch = MemoryWatch(probe, 0, pool, full_cap=32, min_free_fraction=0.05, ledger=ledger)
    assert not watch.poll() and pool.lendable == 32 and watch.reading.free == 40 * gib
    rid = pool.try_reserve(1, 8, 0.0, 10.0)
    pool.commit(rid, (1 << 40) + 1, 0.1)
    probe.free = 2 * gib  # 2.5% free: another process took the rest
    assert watch.poll()
    assert pool.max_lent_blocks == 0 and pool.lendable == 0 and ledger.instance(0).max_lent == 0
    assert pool.try_reserve(1, 1, 0.2, 10.0) is None and pool.num_lent == 8
    probe.free = 6 * gib  # 7.5%: half way back
    assert watch.poll() and pool.max_lent_blocks == 16 and pool.lendable == 8
    probe.free = 40 * gib
    assert watch.poll() and pool.lendable == 24 and ledger.instance(0).max_lent == 32


def test_the_host_probe_reads_this_machine():
    from infinillm.memory import HostMemoryProbe

    r = HostMemoryProbe().read(0)
    assert r.total > 0 and 0 < r.free <= r.total and r.used == r.total - r.free


def test_a_failed_reading_keeps_the_last_cap(tmp_path, caplog):
    """NVML errors, or a file being rewritten: the reading is skipped (logged), the cap stands."""
    from infinillm import core_sched
    from infinillm.memory import MemoryWatch
    from infinillm.testing import FileMemoryProbe

    path = tmp_path / "mem"
    path.write_text("1000 20")
    pool = core_sched.BlockPool(0, 16, 8)
    watch = MemoryWatch(FileMemoryProbe(str(path)), 0, pool, 8, 0.05)
    assert watch.poll() and pool.max_lent_blocks == 0
    for text in ("", "garbage", "1000"):
        path.write_text(text)
        assert not watch.poll()
        assert pool.max_lent_blocks == 0 and watch.reading.free == 20
    assert watch.num_failed_reads == 3 and "not '<total bytes> <free bytes>'" in caplog.text
