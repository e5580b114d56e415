"""Build of the compiled parts: the scheduler core (``infinillm.core_sched._*``), the CPU
quantised kernels (``infinillm.kernels._quant_cpu``) and the codec's hot path
(``infinillm.transport._wire``).

Everything else about the package is declared in pyproject.toml and setup.cfg; this file
exists only because C++ extension modules cannot be declared there.

One extension module per structure: ``core_sched/_<name>.pyx`` over ``core_sched/csrc/*.hpp``
(declared to Cython in ``core_sched/csrc/*.pxd``). ``INFINILLM_BUILD_ONLY=_pool,_ledger``
builds a subset (handy while working on one of them).
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ["_pool", "_block_table", "_ledger", "_batch"]
CSRC = sorted(glob.glob("core_sched/csrc/*.hpp") + glob.glob("core_sched/csrc/*.pxd"))

only = [m for m in os.environ.get("INFINILLM_BUILD_ONLY", "").split(",") if m]
extensions = [
    Extension(
        f"infinillm.core_sched.{name}",
        sources=[f"core_sched/{name}.pyx"],
        include_dirs=["core_sched/csrc"],
        depends=CSRC,
        language="c++",
        extra_compile_args=["-std=c++17", "-O3"],
    )
    for name in MODULES
    if os.path.exists(f"core_sched/{name}.pyx") and (not only or name in only)
]

# CPU kernels over quantised weights (infinillm.kernels._quant_cpu).
if os.path.exists("kernels/_quant_cpu.pyx") and (not only or "_quant_cpu" in only):
    extensions.append(
        Extension(
            "infinillm.kernels._quant_cpu",
            sources=["kernels/_quant_cpu.pyx"],
            include_dirs=["kernels/csrc"],
            depends=sorted(glob.glob("kernels/csrc/*.hpp")),
            language="c++",
            # (GCC's own intrinsics headers trip -Wmaybe-uninitialized on their "undefined" registers)
            extra_compile_args=["-std=c++17", "-O3", "-Wno-maybe-uninitialized"],
        )
    )

# The codec's hot path (infinillm.transport._wire): plain C over the CPython API.
if os.path.exists("transport/_wire.pyx") and (not only or "_wire" in only):
    extensions.append(
        Extension(
            "infinillm.transport._wire",
            sources=["transport/_wire.pyx"],
            extra_compile_args=["-O2"],
        )
    )

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        include_path=["core_sched/csrc"],
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    )
)
