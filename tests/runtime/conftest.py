"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch


@pytest.fixture
def device() -> str:
    """Where the runtime's own tests run: cuda where a GPU is present (``benchmarks/gpu_check.sh``
    runs them there), else cpu; ``INFINILLM_TEST_DEVICE`` overrides."""
    from infinillm.testing import default_device

    return default_device()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-weight Llama folder (``infinillm.testing.make_tiny_model``), one per module."""
    from infinillm.testing import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_model(folder)
    return str(folder)


@pytest.fixture
def open_tiny(tiny_model, device):
    """``open_tiny(**options)`` opens a runtime on the tiny model, on the ``device`` fixture's
    device, with small defaults (blocks of 16 tokens, 64 of them, max_model_len 512)."""
    import infinillm

    def open_(**options):
        options.setdefault("model", tiny_model)
        options.setdefault("kv_capacity_tokens", 64 * 16)
        options.setdefault("block_size", 16)
        options.setdefault("device", device)
        options.setdefault("max_model_len", 512)
        return infinillm.open_runtime(**options)

    return open_


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' SmolLM2 model (fp32) and tokenizer on the bundled GGUF: the reference.

    Loaded once per session (about 20 s); ``(model, tokenizer)``.
    """
    from infinillm.loader import SMOLLM2_FILE, resolve_model_path
    from infinillm.testing import import_transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = import_transformers()
    folder = resolve_model_path("smollm2").parent
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(autouse=True)
def runtime_leak_check(monkeypatch):
    """Every runtime a runtime test opens must leave nothing behind once it is closed: no live
    request, stream, queued request, id or abort, no engine request, every KV block free
    (closing aborts whatever was still in flight, so this checks that path too)."""
    import infinillm
    import infinillm.runtime
    from infinillm.testing import assert_runtime_idle

    real = infinillm.runtime.open_runtime

    @contextlib.asynccontextmanager
    async def checked(**options):
        async with real(**options) as rt:
            yield rt
        assert rt.closed
        assert_runtime_idle(rt)

    monkeypatch.setattr(infinillm, "open_runtime", checked)
    monkeypatch.setattr(infinillm.runtime, "open_runtime", checked)
