"""Shared fixtures and the suite's hypothesis profile.

``core`` runs a test once against each scheduler-core implementation (the compiled Cython/C++
core and its pure-Python twin), the msgpack-python pattern.

The hypothesis profile is registered once here, so tests set only what is theirs
(``max_examples``): no deadline (this machine has 2 shared cores, and a deadline there
measures the neighbours, not the code), and ``print_blob`` so a failure prints the line that
replays it.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from infinillm import core_sched

settings.register_profile(
    "infinillm", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "infinillm"))


@pytest.fixture(params=["compiled", "python"])
def core(request):
    return core_sched.implementation(request.param)
