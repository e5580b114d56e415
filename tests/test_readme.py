"""Every command in the README works as written.

The README's ``sh`` blocks are commands to run here and its ``python`` blocks are programs; this
test runs each one as written (commands in a scratch directory that links the venv, the
examples and the README, so that ``./keys`` and ``sim-out`` land there; ``make`` in the
repository). Two kinds are run elsewhere, by name: ``make test`` (this suite) and the examples
(``tests/examples``). ``text`` blocks are shown, not run: what needs a GPU or a second host
(the worker's join is tested in ``tests/runtime/test_join.py``) and sample output.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

pytestmark = pytest.mark.slow

RUN_ELSEWHERE = {
    "make test": "this suite is what `make test` runs",
    ".venv/bin/python examples/01_offline_generate.py": "tests/examples/test_examples.py::test_01_offline_generate",
    ".venv/bin/python examples/02_streaming_trio.py": "tests/examples/test_examples.py::test_02_streaming_trio",
    ".venv/bin/python examples/03_several_instances.py":
        "tests/examples/test_examples.py::test_03_several_instances_spreads_a_long_prompt",
    ".venv/bin/python examples/05_asyncio_web_handler.py": "tests/examples/test_examples.py::test_05_asyncio_web_handler",
}

# What each command must print (beyond exiting 0).
EXPECT = {
    "make chat": "",
    ".venv/bin/infinillm --help": "commands:",
    ".venv/bin/infinillm keys ./keys": "infinillm.key",
}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.M | re.S)


def commands() -> list[str]:
    out = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
            if line and not line.startswith("#"):
                out.append(re.sub(r"\s+", " ", line))
    return out


def test_the_readme_has_the_blocks_this_test_reads():
    assert len(commands()) >= 10 and len(blocks("python")) == 3
    assert "make chat" in commands() and "make test" in commands()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> pathlib.Path:
    where = tmp_path_factory.mktemp("readme")
    for name in (".venv", "examples", "README.md"):
        (where / name).symlink_to(ROOT / name)
    return where


@pytest.mark.parametrize("command", commands())
def test_each_command(command, scratch):
    if command in RUN_ELSEWHERE:
        pytest.skip(f"run by {RUN_ELSEWHERE[command]}")
    in_repo = command.startswith("make ") or "| make " in command
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT if in_repo else scratch,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    if command.startswith("printf") and "make chat" in command:
        ttfts = [float(x) for x in re.findall(r"first token after ([\d.]+) s", r.stdout)]
        assert len(ttfts) == 2 and ttfts[1] * 3 < ttfts[0], r.stdout  # the second from the cache
    for key, text in EXPECT.items():
        if command == key:
            assert text in r.stdout + r.stderr


@pytest.mark.parametrize("index", range(3))
def test_each_python_block(index, tmp_path):
    program = tmp_path / f"readme_{index}.py"
    program.write_text(blocks("python")[index], encoding="utf-8")
    r = subprocess.run([sys.executable, str(program)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.strip()) > 20
