"""Which implementation computes attention: Triton kernels or the torch reference.

Triton serves CUDA devices; the torch path serves CPU (interpreted Triton is far too slow for
production there) and any machine where Triton is not installed (macOS, Windows).
``INFINILLM_KERNELS`` (``auto`` | ``torch`` | ``triton``) or an explicit ``backend=`` argument
overrides the choice.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

from ..errors import ValidationError

Backend = Literal["torch", "triton"]
BACKENDS = ("auto", "torch", "triton")

__all__ = ["Backend", "BACKENDS", "triton_available", "resolve_backend"]


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it may still lack a GPU)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in its interpreter on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device_type: str, backend: str | None = None) -> Backend:
    """The backend for tensors on ``device_type`` (``"cpu"``/``"cuda"``).

    ``backend`` (or ``INFINILLM_KERNELS`` when None) may force one; forcing ``triton`` where it
    cannot run (not installed, or CPU tensors without ``TRITON_INTERPRET=1``) is an error.
    """
    choice = backend if backend is not None else os.environ.get("INFINILLM_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValidationError("backend", choice, f"must be one of {', '.join(map(repr, BACKENDS))}")
    if choice == "torch":
        return "torch"
    triton_ok = triton_available() and (device_type == "cuda" or triton_interpreting())
    if choice == "triton":
        if not triton_available():
            raise ValidationError("backend", choice, "needs the triton package, which is not installed")
        if not triton_ok:
            raise ValidationError(
                "backend", choice,
                f"runs on cuda tensors, or on {device_type} tensors with TRITON_INTERPRET=1 "
                f"(these are {device_type} tensors and TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET', 'unset')})",
            )
        return "triton"
    return "triton" if triton_available() and device_type == "cuda" else "torch"
