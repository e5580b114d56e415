"""The scheduler core: where every KV block lives.

Two implementations with one interface, as msgpack-python does it:

- ``compiled``: Cython over C++ containers (``_<name>.pyx`` over ``csrc/*.hpp``), the default.
- ``python``: a readable pure-Python twin of every structure (``pool.py``, ...).

``INFINILLM_CORE`` chooses: ``compiled`` (the default: fail loudly if the extension is missing),
``python``, or ``auto`` (compiled if it imports, else the twin). ``IMPLEMENTATION`` says which
one was taken; ``implementation(name)`` returns either, for tests that run against both.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

from .._choice import CHOICES, requested
from ..errors import ValidationError
from .types import BLOCK_CACHED, BLOCK_FREE, BLOCK_RESERVED, BLOCK_USED, PoolCounters, PoolDelta

# Each structure: (its class name, the twin's module, the compiled module).
_STRUCTURES: list[tuple[str, str, str]] = [
    ("BlockPool", "pool", "_pool"),
    ("BlockTables", "block_table", "_block_table"),
    ("BatchPlanner", "batch", "_batch"),
    ("DebtLedger", "ledger", "_ledger"),
    ("ThroughputModel", "planner", "_ledger"),
    ("Planner", "planner", "_ledger"),
]

__all__ = [
    *(name for name, _, _ in _STRUCTURES),
    "PoolCounters",
    "PoolDelta",
    "BLOCK_FREE",
    "BLOCK_RESERVED",
    "BLOCK_USED",
    "BLOCK_CACHED",
    "IMPLEMENTATION",
    "implementation",
    "compiled_available",
]



def _load(kind: str) -> SimpleNamespace:
    classes = {}
    for name, twin_module, compiled_module in _STRUCTURES:
        module = importlib.import_module(f".{twin_module if kind == 'python' else compiled_module}", __name__)
        classes[name] = getattr(module, name)
    return SimpleNamespace(name=kind, **classes)


twin = _load("python")
try:
    compiled: SimpleNamespace | None = _load("compiled")
except ImportError as exc:  # the extensions were not built (e.g. running from a bare checkout)
    compiled = None
    _compiled_import_error: ImportError | None = exc
else:
    _compiled_import_error = None


def compiled_available() -> bool:
    return compiled is not None


def implementation(name: str) -> SimpleNamespace:
    """The named implementation's classes (``"compiled"`` or ``"python"``)."""
    if name == "python":
        return twin
    if name == "compiled":
        if compiled is None:
            raise ImportError(
                "the compiled scheduler core (infinillm.core_sched._*) is not built: "
                "run `make build` (or `pip install -e .`)"
            ) from _compiled_import_error
        return compiled
    raise ValidationError("INFINILLM_CORE", name, f"must be one of {', '.join(CHOICES)}")


def _choose() -> SimpleNamespace:
    choice = requested()
    if choice == "auto":
        return compiled if compiled is not None else twin
    return implementation(choice)


_chosen = _choose()
IMPLEMENTATION: str = _chosen.name
globals().update({name: getattr(_chosen, name) for name, _, _ in _STRUCTURES})
