"""The ``infinillm`` command, run as a real process."""

import subprocess
import sys

from infinillm.testing import make_tiny_model


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinillm.cli", *args], capture_output=True, text=True, timeout=120)


def test_generate_streams_a_completion(tmp_path):
    make_tiny_model(tmp_path / "m")
    r = run("generate", "hello", "--model", str(tmp_path / "m"), "--max-tokens", "5", "--device", "cpu",
            "--kv-capacity-tokens", "1024", "--max-model-len", "512")
    assert r.returncode == 0, r.stderr
    assert "tokens, finish_reason=" in r.stderr


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path):
    r = run("generate", "hello", "--model", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "error: model=" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_error_inside_the_runtime_is_printed_as_an_error_not_a_traceback(tmp_path):
    # The empty prompt is refused by generate(), inside the open runtime.
    make_tiny_model(tmp_path / "m")
    r = run("generate", "", "--raw", "--model", str(tmp_path / "m"), "--device", "cpu",
            "--kv-capacity-tokens", "1024", "--max-model-len", "512")
    assert r.returncode == 2
    assert "error: prompt='' is invalid: must be a non-empty string" in r.stderr
    assert "Traceback" not in r.stderr


def test_keys_writes_a_pair(tmp_path):
    r = run("keys", str(tmp_path), "--name", "node")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "node.key").exists() and (tmp_path / "node.key_secret").exists()
