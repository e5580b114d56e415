"""Shared fixtures.

``core`` runs a test once against each scheduler-core implementation (the compiled Cython/C++
core and its pure-Python twin), the msgpack-python pattern.
"""

from __future__ import annotations

import pytest

from infinillm import core_sched


@pytest.fixture(params=["compiled", "python"])
def core(request):
    return core_sched.implementation(request.param)
