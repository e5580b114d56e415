"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import os

import pytest
import torch


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
