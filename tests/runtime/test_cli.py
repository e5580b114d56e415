"""The ``infinillm`` command, run as a real process."""

import subprocess
import sys

import pytest

from infinillm.cli import main
from infinillm.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("cli") / "m"))


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-capacity-tokens", "0"], "error: CacheConfig.kv_capacity_tokens=0 is invalid: must be in [16, "),
        (["--max-model-len", "0"], "error: ModelConfig.max_model_len=0 is invalid: must be in [2, 2147483648]"),
        (["--max-tokens", "0"], "error: SamplingParams.max_tokens=0 is invalid: must be None or an integer >= 1"),
    ],
)
def test_zero_options_are_checked_not_dropped(tiny_folder, capsys, args, message):
    options = {"--kv-capacity-tokens": "1024", "--max-model-len": "512"}
    for flag, value in zip(args[::2], args[1::2]):
        options[flag] = value
    argv = ["generate", "hi", "--model", tiny_folder, "--device", "cpu", *[x for kv in options.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("model.safetensors", "is not a readable safetensors file"),
        ("config.json", "config.json must hold a JSON object, not a list"),
        ("tokenizer.json", "cannot be read by tokenizers"),
    ],
)
def test_a_broken_model_file_is_an_error_naming_the_file(tmp_path, capsys, broken, message):
    folder = make_tiny_model(tmp_path / "m")
    (folder / broken).write_text({"model.safetensors": "", "config.json": "[{}]", "tokenizer.json": "{not json"}[broken])
    assert main(["generate", "hi", "--model", str(folder), "--device", "cpu", "--kv-capacity-tokens", "1024",
                 "--max-model-len", "512"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and str(folder / broken) in err and message.split(" ", 1)[-1] in err
    assert "Traceback" not in err
