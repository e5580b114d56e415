"""Build of the compiled scheduler core (``infinillm.core_sched._core``).

Everything else about the package is declared in pyproject.toml and setup.cfg; this file
exists only because C++ extension modules cannot be declared there.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "infinillm.core_sched._core",
        sources=["core_sched/_core.pyx"],
        include_dirs=["core_sched/csrc"],
        depends=["core_sched/csrc/cpp_core.pxd"] + [f"core_sched/csrc/{h}" for h in ("block_pool.hpp",)],
        language="c++",
        extra_compile_args=["-std=c++17", "-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        include_path=["core_sched/csrc"],
        compiler_directives={"boundscheck": False, "wraparound": False, "embedsignature": True},
    )
)
