"""Kernel tests run the Triton kernels compiled on CUDA, and in Triton's interpreter elsewhere.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it is set here,
before anything imports ``infinillm.kernels.triton_attention``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from infinillm.kernels import triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture
def device() -> str:
    return DEVICE
