"""Each configuration concern validates itself and names the field, value and limit."""

import dataclasses

import pytest

from infinillm import (
    CacheConfig,
    ModelConfig,
    ParallelConfig,
    RuntimeConfig,
    SchedulerConfig,
    TransportConfig,
    ValidationError,
)


def test_defaults_are_valid_and_frozen():
    cfg = RuntimeConfig()
    assert cfg.model.model == "smollm2"
    assert cfg.cache.block_size == 16
    assert cfg.parallel.num_instances == 1
    assert cfg.transport.bind_host == "127.0.0.1"  # loopback unless configured
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cache.block_size = 32  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ModelConfig, {"model": ""}, "ModelConfig.model='' is invalid: must be a non-empty path or 'smollm2'"),
        (ModelConfig, {"dtype": "float8"}, "ModelConfig.dtype='float8' is invalid: must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
        (ModelConfig, {"device": "tpu"}, "ModelConfig.device='tpu' is invalid: must be one of 'auto', 'cpu', 'cuda'"),
        (ModelConfig, {"max_model_len": 0}, "ModelConfig.max_model_len=0 is invalid: must be in [2, 2147483648]"),
        (ModelConfig, {"max_model_len": 1.5}, "ModelConfig.max_model_len=1.5 is invalid: must be an integer"),
        (CacheConfig, {"block_size": 7}, "CacheConfig.block_size=7 is invalid: must be a power of two in [1, 1024]"),
        (CacheConfig, {"block_size": 2048}, "CacheConfig.block_size=2048 is invalid: must be in [1, 1024]"),
        (CacheConfig, {"block_size": True}, "CacheConfig.block_size=True is invalid: must be an integer"),
        (CacheConfig, {"kv_capacity_tokens": 8}, "CacheConfig.kv_capacity_tokens=8 is invalid: must be in [16, 1099511627776]"),
        (CacheConfig, {"gpu_memory_utilization": 0.0}, "CacheConfig.gpu_memory_utilization=0.0 is invalid: must be in (0.0, 1.0]"),
        (CacheConfig, {"gpu_memory_utilization": 1.2}, "CacheConfig.gpu_memory_utilization=1.2 is invalid: must be in (0.0, 1.0]"),
        (CacheConfig, {"max_lend_fraction": -0.1}, "CacheConfig.max_lend_fraction=-0.1 is invalid: must be in [0.0, 1.0]"),
        (CacheConfig, {"reservation_ttl_s": 0}, "CacheConfig.reservation_ttl_s=0 is invalid: must be in (0.0, 3600.0]"),
        (CacheConfig, {"reservation_ttl_s": float("nan")}, "CacheConfig.reservation_ttl_s=nan is invalid: must be a number"),
        (SchedulerConfig, {"max_num_seqs": 0}, "SchedulerConfig.max_num_seqs=0 is invalid: must be in [1, 65536]"),
        (SchedulerConfig, {"max_num_batched_tokens": -5}, "SchedulerConfig.max_num_batched_tokens=-5 is invalid: must be in [1, 16777216]"),
        (SchedulerConfig, {"max_moves_per_step": -1}, "SchedulerConfig.max_moves_per_step=-1 is invalid: must be in [0, 1048576]"),
        (SchedulerConfig, {"preemption_mode": "swap"}, "SchedulerConfig.preemption_mode='swap' is invalid: must be one of 'recompute'"),
        (ParallelConfig, {"num_instances": 0}, "ParallelConfig.num_instances=0 is invalid: must be in [1, 4096]"),
        (ParallelConfig, {"instance_mode": "thread"}, "ParallelConfig.instance_mode='thread' is invalid: must be one of 'inprocess', 'process'"),
        (
            ParallelConfig,
            {"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 0.5},
            "ParallelConfig.heartbeat_timeout_s=0.5 is invalid: must be greater than heartbeat_interval_s=1.0",
        ),
        (TransportConfig, {"transport": "udp"}, "TransportConfig.transport='udp' is invalid: must be one of 'inproc', 'ipc', 'tcp'"),
        (TransportConfig, {"bind_host": "example.com"}, "TransportConfig.bind_host='example.com' is invalid: must be an IP address, 'localhost' or '*'"),
        (TransportConfig, {"base_port": 80}, "TransportConfig.base_port=80 is invalid: must be in [1024, 65535]"),
        (
            TransportConfig,
            {"curve_secret_key_file": "k.key"},
            "TransportConfig.curve_secret_key_file='k.key' is invalid: must be given together with curve_public_key_file",
        ),
        (TransportConfig, {"request_timeout_s": -1}, "TransportConfig.request_timeout_s=-1 is invalid: must be in (0.0, 86400.0]"),
        (TransportConfig, {"max_message_bytes": 10}, "TransportConfig.max_message_bytes=10 is invalid: must be in [1024, 1099511627776]"),
    ],
)
def test_bad_values_name_field_value_and_limit(cls, kwargs, message):
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    assert info.value.field == next(iter(kwargs)) or info.value.field in str(info.value)


def test_capacity_in_blocks_rounds_down_and_lending_cap():
    cache = CacheConfig(block_size=16, kv_capacity_tokens=2050, max_lend_fraction=0.25)
    assert cache.num_blocks == 128  # 2050 // 16
    assert cache.max_lent_blocks(128) == 32  # 128 * 0.25
    assert CacheConfig().num_blocks is None  # derived from memory at start


def test_from_options_routes_each_option_to_its_concern():
    cfg = RuntimeConfig.from_options(
        model="/models/x", num_instances=4, kv_capacity_tokens=2048, block_size=32, device="cpu", bind_host="0.0.0.0"
    )
    assert cfg.model == ModelConfig(model="/models/x", device="cpu")
    assert cfg.cache.num_blocks == 64  # 2048 // 32
    assert cfg.parallel.num_instances == 4
    assert cfg.transport.bind_host == "0.0.0.0"


def test_unknown_option_is_refused_with_the_known_ones():
    with pytest.raises(ValidationError) as info:
        RuntimeConfig.from_options(num_instance=4)
    assert str(info.value) == (
        "num_instance=4 is invalid: unknown option; known options: base_port, bind_host, block_size, cpu_kv_fraction, "
        "curve_public_key_file, curve_secret_key_file, curve_server_public_key_file, device, dtype, "
        "enable_prefix_caching, gpu_memory_utilization, heartbeat_interval_s, heartbeat_timeout_s, instance_mode, join_address, kv_capacity_tokens, "
        "launcher, "
        "max_lend_fraction, max_message_bytes, max_model_len, max_moves_per_step, max_num_batched_tokens, max_num_seqs, "
        "min_free_memory_fraction, "
        "model, num_instances, planner_interval_s, preemption_mode, request_timeout_s, reservation_ttl_s, seed, transport, worker_threads"
    )


def test_replace_revalidates():
    cfg = RuntimeConfig().replace(block_size=64)
    assert cfg.cache.block_size == 64
    with pytest.raises(ValidationError, match=r"CacheConfig\.block_size=48 is invalid: must be a power of two in \[1, 1024\]"):
        cfg.replace(block_size=48)
