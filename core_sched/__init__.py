"""The scheduler core: where every KV block lives.

Two implementations with one interface, as msgpack-python does it:

- ``compiled``: Cython over C++ containers (``_core.pyx`` over ``csrc/*.hpp``), the default.
- ``python``: a readable pure-Python twin of every structure (``pool.py``, ...).

``INFINILLM_CORE`` chooses: ``compiled`` (the default: fail loudly if the extension is missing),
``python``, or ``auto`` (compiled if it imports, else the twin). ``IMPLEMENTATION`` says which
one was taken; ``implementation(name)`` returns either, for tests that run against both.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from ..errors import ValidationError
from . import pool as _twin_pool
from .types import BLOCK_FREE, BLOCK_RESERVED, BLOCK_USED, PoolCounters, PoolDelta

__all__ = [
    "BlockPool",
    "PoolCounters",
    "PoolDelta",
    "BLOCK_FREE",
    "BLOCK_RESERVED",
    "BLOCK_USED",
    "IMPLEMENTATION",
    "implementation",
    "compiled_available",
]

_CHOICES = ("compiled", "python", "auto")

twin = SimpleNamespace(name="python", BlockPool=_twin_pool.BlockPool)

try:
    from . import _core as _compiled_module
except ImportError as exc:  # the extension was not built (e.g. running from a bare checkout)
    _compiled_module = None
    _compiled_import_error: ImportError | None = exc
else:
    _compiled_import_error = None

compiled = (
    SimpleNamespace(name="compiled", BlockPool=_compiled_module.BlockPool) if _compiled_module is not None else None
)


def compiled_available() -> bool:
    return compiled is not None


def implementation(name: str) -> SimpleNamespace:
    """The named implementation's classes (``"compiled"`` or ``"python"``)."""
    if name == "python":
        return twin
    if name == "compiled":
        if compiled is None:
            raise ImportError(
                "the compiled scheduler core (infinillm.core_sched._core) is not built: "
                "run `pip install -e .` (or `make test`)"
            ) from _compiled_import_error
        return compiled
    raise ValidationError("INFINILLM_CORE", name, f"must be one of {', '.join(_CHOICES)}")


def _choose() -> SimpleNamespace:
    choice = os.environ.get("INFINILLM_CORE", "compiled").strip().lower() or "compiled"
    if choice == "auto":
        return compiled if compiled is not None else twin
    return implementation(choice)


_chosen = _choose()
IMPLEMENTATION: str = _chosen.name
BlockPool = _chosen.BlockPool
