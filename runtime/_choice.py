"""``INFINILLM_CORE``: which implementation of the compiled parts to use.

``compiled`` (the default: an error if an extension is missing), ``python`` (the pure-Python
twins everywhere), or ``auto`` (compiled where it imports). Read by the scheduler core, the
codec and the socket layer.
"""

from __future__ import annotations

import os

from .errors import ValidationError

CHOICES = ("compiled", "python", "auto")


def requested() -> str:
    """The variable as set (normalised, ``compiled`` when unset), not checked."""
    return os.environ.get("INFINILLM_CORE", "compiled").strip().lower() or "compiled"


def core_choice() -> str:
    """The checked choice: one of ``CHOICES``, or ``ValidationError`` naming the value."""
    name = requested()
    if name not in CHOICES:
        raise ValidationError("INFINILLM_CORE", name, f"must be one of {', '.join(CHOICES)}")
    return name
