"""The package imports under its import names and runs on the compiled scheduler core."""

import importlib
import os

import infinillm


def test_import_names_map_onto_the_source_folders():
    roots = {
        "infinillm": "runtime",
        "infinillm.core_sched": "core_sched",
        "infinillm.kernels": "kernels",
        "infinillm.transport": "transport",
    }
    for name, folder in roots.items():
        module = importlib.import_module(name)
        assert os.path.basename(os.path.dirname(module.__file__)) == folder, name


def test_compiled_core_is_a_shared_object_and_is_the_default():
    from infinillm import core_sched

    assert core_sched.compiled_available()
    assert core_sched._pool.__file__.endswith(".so")
    if os.environ.get("INFINILLM_CORE", "compiled") == "compiled":
        assert core_sched.IMPLEMENTATION == "compiled"
        assert core_sched.BlockPool is core_sched._pool.BlockPool


def test_unknown_core_choice_is_refused():
    from infinillm import core_sched

    try:
        core_sched.implementation("fortran")
    except infinillm.ValidationError as e:
        assert "INFINILLM_CORE='fortran'" in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected ValidationError")


def test_version_is_exposed():
    assert infinillm.__version__.count(".") == 2


def test_compiled_codec_is_built_and_used_by_default():
    from infinillm.transport import Codec, codec

    assert codec.compiled_available()
    assert codec._wire.__file__.endswith(".so")
    if os.environ.get("INFINILLM_CORE", "compiled") == "compiled":
        assert Codec().compiled
    assert not Codec(compiled=False).compiled
