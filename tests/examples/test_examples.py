"""Every example under ``examples/`` runs as written (real processes, the bundled SmolLM2). The
long-context chat (04) runs as the README's ``printf ... | make chat ARGS="--document README.md"``
in ``tests/test_readme.py``: scripted turns, each answered, the second from the cached KV."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


def run_example(name: str, *args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_the_examples_are_numbered_and_each_is_tested():
    names = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert names == ["01_offline_generate.py", "02_streaming_trio.py", "03_several_instances.py",
                     "04_long_context_chat.py", "05_asyncio_web_handler.py"]


def test_01_offline_generate():
    r = run_example("01_offline_generate.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("(24 tokens, length)") == 3
    assert "finished requests: 3" in r.stdout


def test_02_streaming_trio():
    r = run_example("02_streaming_trio.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[a] done: length, 24 tokens" in r.stdout and "[b] done: length, 24 tokens" in r.stdout
    assert re.search(r"finished 2, aborted 1, KV blocks in use 0", r.stdout), r.stdout


def test_03_several_instances_spreads_a_long_prompt():
    r = run_example("03_several_instances.py")
    assert r.returncode == 0, r.stderr[-3000:]
    spread = re.search(r"its KV blocks were on: (.*)", r.stdout).group(1)
    assert spread.count("instance") >= 2, r.stdout  # more than one instance held the prompt's KV
    assert len(re.findall(r"instance \d: 0 used", r.stdout)) == 3  # everything given back


def test_05_asyncio_web_handler():
    r = run_example("05_asyncio_web_handler.py")
    assert r.returncode == 0, r.stderr[-3000:]
    answer = re.search(r"answer: (.*)", r.stdout).group(1)
    assert len(answer.split()) > 5
    assert "finished requests: 1" in r.stdout
